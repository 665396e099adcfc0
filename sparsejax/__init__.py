"""sparsejax: sparse training for JAX and Flax NNX.

Weight-sparsity transforms follow optax's ``(init, update)`` plus ``forward``; see
``sparsejax.base``. Training lives in ``sparsejax.train``, models in
``sparsejax.models``, kernels in ``sparsejax.kernels``.

Example::

    import optax, sparsejax
    tx = sparsejax.dense(optax.adamw(1e-3))
"""

from sparsejax.base import SparseTransformation, as_sparse_transformation, dense

__version__ = "0.1.0"

__all__ = ["SparseTransformation", "as_sparse_transformation", "dense"]
