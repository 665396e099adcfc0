"""Flax NNX modules: Sparse-IFT layers (and, later, Spark FFN/attention, sparse attention).

Example::

    from sparsejax.nn import SparseParallel
"""

from sparsejax.nn.ift import SparseDoped, SparseFactorized, SparseParallel, clone_layer

__all__ = ["SparseDoped", "SparseFactorized", "SparseParallel", "clone_layer"]
