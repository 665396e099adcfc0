"""``x @ W`` with W stored N:M-compressed (``sparsejax.nm.compress_nm``, axis 0).

``nm_matmul`` picks the Pallas kernel (GPU: reads N/M of the weights plus uint8
indices, rebuilds dense tiles in registers, dense MMA) or XLA (decompress, then one
matmul), and is differentiable in ``x`` and the kept values. The answer is
``reference.nm_matmul_reference``. See README.md for
what Hopper can and cannot give here.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.nm import compress_nm, decompress_nm
    >>> from sparsejax.kernels.nm_matmul import nm_matmul
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> c = compress_nm(w, 2, 4, axis=0)
    >>> c.values.shape, c.indices.shape
    ((16, 2, 32), (16, 2, 32))
    >>> x = jax.random.normal(jax.random.key(1), (2, 4, 64))
    >>> y = nm_matmul(x, c)
    >>> y.shape, bool(jnp.allclose(y, x @ decompress_nm(c), atol=1e-5))
    ((2, 4, 32), True)
    >>> y = nm_matmul(x, c, implementation="pallas", interpret=True)   # the kernel, on CPU
    >>> bool(jnp.allclose(y, x @ decompress_nm(c), atol=1e-5))
    True
"""

from . import reference
from .api import IMPLEMENTATIONS, Tiles, default_tiles, nm_linear_apply, nm_matmul, nm_matmul_xla
from .pallas import check_tiles, nm_matmul_pallas

__all__ = ["IMPLEMENTATIONS", "Tiles", "check_tiles", "default_tiles", "nm_linear_apply",
           "nm_matmul", "nm_matmul_pallas", "nm_matmul_xla", "reference"]
