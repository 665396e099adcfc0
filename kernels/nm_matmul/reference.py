"""The answer for ``x @ W`` with W N:M-compressed: ``sparsejax.nm.nm_matmul``, re-exported.

There is one implementation of the answer, in ``sparsejax/nm.py``: for a ``[K, out]``
kernel compressed along axis 0 (``values, indices: [K/M, N, out]``),

    y[r, o] = Σ_g Σ_j x[r, g·M + indices[g, j, o]] · values[g, j, o]

(a gather of the N kept inputs of every group, then a contraction). This module adds
only the argument checks the other implementations share.

Example::

    from sparsejax.kernels.nm_matmul import reference
    c = reference.compress_nm(w, 2, 4, axis=0)
    y = reference.nm_matmul(x, c)          # == x @ reference.decompress_nm(c)
"""

from __future__ import annotations

import jax

from sparsejax.nm import NMCompressed, compress_nm, decompress_nm, nm_matmul

__all__ = ["NMCompressed", "compress_nm", "decompress_nm", "nm_matmul", "check_args"]


def check_args(x: jax.Array, c: NMCompressed, axes: tuple[int, ...] = (0,)
               ) -> tuple[int, int, int, int]:
    """Checks ``x @ W`` is well defined for a 2-D ``c`` compressed along one of ``axes``
    (default: axis 0, the input features) and returns ``(n, m, K, out)``; a ValueError
    names the first problem.

    Example::

        n, m, k, out = check_args(x, compress_nm(w, 2, 4, axis=0))
    """
    n, m, shape, axis = c.n, c.m, tuple(c.shape), c.axis
    if len(shape) != 2:
        raise ValueError(f"nm_matmul needs a 2-D [K, out] kernel, got shape {shape}")
    axis %= 2
    if axis not in axes:
        raise ValueError(f"nm_matmul needs the kernel compressed along axis 0 (the input "
                         f"features K), got axis {axis}")
    k, out = shape
    grouped, rest = shape[axis], shape[1 - axis]
    if grouped % m:
        raise ValueError(f"kernel {'K' if axis == 0 else 'out'}={grouped} is not divisible "
                         f"by M={m}")
    expect = (grouped // m, n, rest)
    if tuple(c.values.shape) != expect or tuple(c.indices.shape) != expect:
        raise ValueError(f"compressed {n}:{m} kernel of shape {shape} along axis {axis} "
                         f"needs values and indices of shape {expect}, got "
                         f"{tuple(c.values.shape)} and {tuple(c.indices.shape)}")
    if x.ndim < 1 or x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1] if x.ndim else 0} features (shape "
                         f"{tuple(x.shape)}), the kernel expects K={k}")
    return n, m, k, out
