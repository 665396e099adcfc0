"""Pallas kernel for ``x @ W`` with W stored N:M-compressed (values + uint8 indices).

The kernel reads the compressed weights (``K·N/M`` values and as many uint8 indices
instead of ``K`` dense entries per output column), rebuilds each dense tile of W in
registers and runs an ordinary dense MMA on it. Per ``block_k`` slice of K:

- load ``val_j, idx_j`` of shape ``[block_k/M, block_n]`` for each kept slot
  ``j < N`` (group ``g``, column ``c``);
- ``W[g·M + p, c] = Σ_j [idx_j[g, c] = p] · val_j[g, c]`` built as a select chain on a
  ``[block_k/M, M, block_n]`` iota (the slots of one group are distinct, so the
  selects never collide) and reshaped to ``[block_k, block_n]``;
- ``acc += x[:, k-slice] @ W_tile`` with f32 accumulation.

Compute is therefore dense: what the kernel saves is weight memory traffic, which
only matters where the matmul is bound by reading W (decode-like, few rows). Hopper
has no sparse MMA reachable from Pallas (see this folder's README).

Grid: ``(rows / block_m, out / block_n)``, both parallel; K is a loop inside each
program, as Pallas's GPU (Triton) lowering has no sequential grid axis to accumulate
over. Uses the portable BlockSpec form with Triton compiler params, so
``interpret=True`` runs it on CPU.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.nm import compress_nm, decompress_nm
    >>> from sparsejax.kernels.nm_matmul.pallas import nm_matmul_pallas
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> x = jax.random.normal(jax.random.key(1), (16, 64))
    >>> c = compress_nm(w, 2, 4, axis=0)
    >>> c.values.shape, c.indices.dtype                   # [K/M, N, out] values, uint8 slots
    ((16, 2, 32), dtype('uint8'))
    >>> y = nm_matmul_pallas(x, c, block_m=16, block_n=16, block_k=32, interpret=True)
    >>> y.shape, float(jnp.abs(y - x @ decompress_nm(c)).max()) < 1e-5
    ((16, 32), True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .._common import on_gpu, triton_params
from .reference import check_args

MIN_TILE = 16  # smallest M/N/K extent of a dot in Pallas's Triton lowering


def _is_pow2(v: int) -> bool:
    return v > 0 and (v & (v - 1)) == 0


def check_tiles(rows: int, k: int, out: int, m: int, block_m: int, block_n: int,
                block_k: int) -> None:
    """Raises a ValueError naming the first reason the kernel cannot take these shapes.

    The rules: tiles are powers of two of at least 16 (Triton tensors and dots);
    ``block_k`` is a multiple of ``M`` (whole groups per tile); ``M`` is a power of two
    (the ``[block_k/M, M, block_n]`` rebuild tile); rows, K and out divide into tiles.

    Example:

        >>> from sparsejax.kernels.nm_matmul.pallas import check_tiles
        >>> check_tiles(128, 256, 128, 4, 32, 32, 64)   # passes silently
        >>> check_tiles(128, 256, 128, 4, 32, 32, 48)
        Traceback (most recent call last):
            ...
        ValueError: block_k=48 is not a power of two (Triton tiles must be)
        >>> check_tiles(100, 256, 128, 4, 32, 32, 64)
        Traceback (most recent call last):
            ...
        ValueError: rows of x=100 is not divisible by block_m=32
    """
    for name, v in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        if not isinstance(v, int) or not _is_pow2(v):
            raise ValueError(f"{name}={v!r} is not a power of two (Triton tiles must be)")
        if v < MIN_TILE:
            raise ValueError(f"{name}={v} is below {MIN_TILE}, the smallest dot extent "
                             "Pallas's Triton lowering takes")
    if not _is_pow2(m):
        raise ValueError(f"M={m} is not a power of two; the kernel rebuilds "
                         f"[block_k/M, M, block_n] tiles, which Triton needs in powers of two")
    if block_k % m:
        raise ValueError(f"block_k={block_k} is not a multiple of M={m}")
    for name, size, tile, tname in (("rows of x", rows, block_m, "block_m"),
                                    ("K", k, block_k, "block_k"),
                                    ("output columns", out, block_n, "block_n")):
        if size % tile:
            raise ValueError(f"{name}={size} is not divisible by {tname}={tile}")


def _nm_matmul_kernel(x_ref, v_ref, i_ref, o_ref, *, n: int, m: int, block_k: int):
    """One ``[block_m, block_n]`` output tile: loop over K, rebuild W, dense dot."""
    bkm = block_k // m
    block_m, block_n = o_ref.shape
    num_k = x_ref.shape[1] // block_k
    slot = lax.broadcasted_iota(jnp.int32, (bkm, m, block_n), 1)   # p of row g·M + p

    def body(kk, acc):
        k0 = pl.multiple_of(kk * block_k, block_k)
        g0 = pl.multiple_of(kk * bkm, bkm)
        x = x_ref[:, pl.ds(k0, block_k)]                              # [bm, bk]
        w = jnp.zeros((bkm, m, block_n), v_ref.dtype)
        for j in range(n):                                            # N kept per group
            val = v_ref[pl.ds(g0, bkm), j, :]                         # [bk/M, bn]
            idx = i_ref[pl.ds(g0, bkm), j, :].astype(jnp.int32)       # uint8 -> int32
            w = jnp.where(slot == idx[:, None, :], val[:, None, :], w)
        w = w.reshape(block_k, block_n).astype(x.dtype)
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, num_k, body, jnp.zeros((block_m, block_n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("m", "block_m", "block_n", "block_k",
                                             "interpret", "num_warps", "num_stages"))
def _call(x, values, indices, *, m, block_m, block_n, block_k, interpret, num_warps,
          num_stages):
    rows, k = x.shape
    g, n, out = values.shape
    kernel = functools.partial(_nm_matmul_kernel, n=n, m=m, block_k=block_k)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((rows, out), x.dtype),
        grid=(rows // block_m, out // block_n),
        in_specs=[pl.BlockSpec((block_m, k), lambda i, j: (i, 0)),
                  pl.BlockSpec((g, n, block_n), lambda i, j: (0, 0, j)),
                  pl.BlockSpec((g, n, block_n), lambda i, j: (0, 0, j))],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        compiler_params=triton_params(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="nm_matmul",
    )(x, values, indices)


def nm_matmul_pallas(x: jax.Array, c, *, block_m: int = 64, block_n: int = 128,
                     block_k: int = 64, interpret: bool | None = None,
                     num_warps: int = 4, num_stages: int = 3) -> jax.Array:
    """``x @ W`` for ``x [rows, K]`` and ``c`` an N:M-compressed ``[K, out]`` kernel
    (``sparsejax.nm.compress_nm(w, n, m, axis=0)``), as one Pallas kernel.

    Strict: shapes must divide into the tiles (see :func:`check_tiles`); the api pads
    rows and falls back to XLA instead. ``interpret=None`` means ``not on_gpu()``.
    Output dtype is ``x.dtype``; values are cast to it inside the kernel and products
    accumulate in f32. Not differentiable by itself: ``api.nm_matmul`` adds the VJP.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.nm import compress_nm, decompress_nm
        >>> from sparsejax.kernels.nm_matmul.pallas import nm_matmul_pallas
        >>> w = jax.random.normal(jax.random.key(0), (64, 32))
        >>> x = jax.random.normal(jax.random.key(1), (16, 64))
        >>> c = compress_nm(w, 1, 4, axis=0)
        >>> y = nm_matmul_pallas(x, c, block_m=16, block_n=16, block_k=32, interpret=True)
        >>> float(jnp.abs(y - x @ decompress_nm(c)).max()) < 1e-5
        True
        >>> nm_matmul_pallas(x[:10], c, block_m=16, block_n=16, block_k=32, interpret=True)
        Traceback (most recent call last):
            ...
        ValueError: rows of x=10 is not divisible by block_m=16
    """
    if x.ndim != 2:
        raise ValueError(f"nm_matmul_pallas needs x of shape [rows, K], got {x.shape}")
    _, m, k, out = check_args(x, c)
    check_tiles(x.shape[0], k, out, m, block_m, block_n, block_k)
    if interpret is None:
        interpret = not on_gpu()
    return _call(x, c.values, c.indices, m=m, block_m=block_m, block_n=block_n,
                 block_k=block_k, interpret=bool(interpret), num_warps=num_warps,
                 num_stages=num_stages)
