"""``x @ W`` with W stored N:M-compressed (``sparsejax.nm.compress_nm``, axis 0).

``nm_matmul`` picks the Pallas kernel (GPU: reads N/M of the weights plus uint8
indices, rebuilds dense tiles in registers, dense MMA) or XLA (decompress, then one
matmul), and is differentiable in ``x`` and the kept values. The answer is
``reference.nm_matmul_reference``. See README.md for
what Hopper can and cannot give here.

Example::

    import jax, jax.numpy as jnp
    from sparsejax.nm import compress_nm, decompress_nm
    from sparsejax.kernels.nm_matmul import nm_matmul

    w = jax.random.normal(jax.random.key(0), (256, 128))
    c = compress_nm(w, 2, 4, axis=0)               # values/indices [64, 2, 128]
    x = jnp.ones((8, 32, 256))
    y = nm_matmul(x, c)                            # [8, 32, 128] == x @ decompress_nm(c)
    y = nm_matmul(x, c, implementation="pallas", interpret=True)   # the kernel, on CPU
"""

from . import reference
from .api import IMPLEMENTATIONS, Tiles, default_tiles, nm_linear_apply, nm_matmul, nm_matmul_xla
from .pallas import check_tiles, nm_matmul_pallas

__all__ = ["IMPLEMENTATIONS", "Tiles", "check_tiles", "default_tiles", "nm_linear_apply",
           "nm_matmul", "nm_matmul_pallas", "nm_matmul_xla", "reference"]
