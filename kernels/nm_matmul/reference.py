"""The answer for ``x @ W`` with W N:M-compressed, which every implementation must match.

The compressed format is ``sparsejax.nm.NMCompressed`` (``compress_nm``/``decompress_nm``,
the same format ``export_nm`` writes). For a ``[K, out]`` kernel compressed along axis 0
(``values, indices: [K/M, N, out]``),

    y[r, o] = Σ_g Σ_j x[r, g·M + indices[g, j, o]] · values[g, j, o]

a gather of the N kept inputs of every group, then a contraction. ``check_args`` holds
the argument checks every implementation shares.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.nm import compress_nm, decompress_nm
    >>> from sparsejax.kernels.nm_matmul import reference
    >>> w = jax.random.normal(jax.random.key(0), (16, 8))
    >>> x = jax.random.normal(jax.random.key(1), (3, 16))
    >>> c = compress_nm(w, 2, 4, axis=0)
    >>> y = reference.nm_matmul_reference(x, c)
    >>> y.shape, bool(jnp.allclose(y, x @ decompress_nm(c), atol=1e-5))
    ((3, 8), True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsejax.nm import NMCompressed

__all__ = ["check_args", "nm_matmul_reference"]


def check_args(x: jax.Array, c: NMCompressed, axes: tuple[int, ...] = (0,)
               ) -> tuple[int, int, int, int]:
    """Checks ``x @ W`` is well defined for a 2-D ``c`` compressed along one of ``axes``
    (default: axis 0, the input features) and returns ``(n, m, K, out)``; a ValueError
    names the first problem.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nm import compress_nm
        >>> from sparsejax.kernels.nm_matmul.reference import check_args
        >>> w, x = jnp.ones((16, 8)), jnp.ones((3, 16))
        >>> check_args(x, compress_nm(w, 2, 4, axis=0))                # (n, m, K, out)
        (2, 4, 16, 8)
        >>> check_args(jnp.ones((3, 12)), compress_nm(w, 2, 4, axis=0))
        Traceback (most recent call last):
        ...
        ValueError: x has 12 features (shape (3, 12)), the kernel expects K=16
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


def nm_matmul_reference(x: jax.Array, c: NMCompressed) -> jax.Array:
    """``x @ W`` for a compressed ``[K, out]`` kernel (axis 0), read directly: each output
    gathers the ``N`` kept inputs of every group, ``y[r, o] = Σ_g Σ_j x[r, g·M + idx] · v``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nm import compress_nm
        >>> from sparsejax.kernels.nm_matmul.reference import nm_matmul_reference
        >>> kernel = jnp.array([[1., 5.], [-4., 2.], [3., -1.], [2., 6.]])   # [K=4, out=2]
        >>> x = jnp.array([[1., 10., 100., 1000.]])
        >>> y = nm_matmul_reference(x, compress_nm(kernel, 2, 4, axis=0))  # x @ (kernel ⊙ mask)
        >>> y.tolist()          # column 0 keeps -4, 3; column 1 keeps 5, 6
        [[260.0, 6005.0]]
    """
    check_args(x, c)
    k = c.shape[0]
    xg = x.reshape(*x.shape[:-1], k // c.m, c.m, 1)                    # [..., G, M, 1]
    idx = c.indices.astype(jnp.int32)[(None,) * (x.ndim - 1)]          # [1.., G, N, out]
    picked = jnp.take_along_axis(xg, idx, axis=-2)                     # [..., G, N, out]
    return jnp.einsum("...gno,gno->...o", picked, c.values.astype(x.dtype))
