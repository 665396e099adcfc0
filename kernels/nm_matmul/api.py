"""``x @ W`` with W N:M-compressed: picks the Pallas kernel or XLA, with a VJP.

Implementations:

- ``"pallas"``: :func:`..pallas.nm_matmul_pallas`, reads the compressed weights and
  rebuilds dense tiles in registers (GPU; interpreted on CPU). Rows are zero-padded up
  to a whole tile. Differentiable through a custom VJP computed by XLA:
  ``dx = g Wᵀ`` (W decompressed) and ``d values[g, j, o] = (xᵀ g)[g·M + idx[g, j, o], o]``
  (the dense weight gradient read at the kept positions); indices get none.
- ``"xla"``: decompress then one dense matmul, ``x @ decompress_nm(c)``. This is the
  CPU default: on the CPU it beats the gather reference at every size measured by
  ``bench.py`` (the gather materialises ``[rows, K/M, N, out]``). It also takes a
  2-D kernel compressed along axis 1.
- ``"reference"``: ``reference.nm_matmul_reference``, the gather that defines the answer.

``implementation=None`` uses ``"pallas"`` on a GPU when the kernel applies (2-D
kernel compressed along axis 0, M a power of two, K and out divisible by power-of-two
tiles of at least 16, x in f32/bf16/f16) and ``"xla"`` otherwise. An explicit
``"pallas"`` on an input it cannot take raises a ValueError naming the problem.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.nm import compress_nm, decompress_nm
    >>> from sparsejax.kernels.nm_matmul import nm_matmul
    >>> kernel = jax.random.normal(jax.random.key(0), (64, 32))
    >>> x = jax.random.normal(jax.random.key(1), (2, 3, 64))
    >>> c = compress_nm(kernel, 2, 4, axis=0)      # kernel: [K, out]
    >>> y = nm_matmul(x, c)                       # x: [..., K] -> [..., out]
    >>> y.shape, float(jnp.abs(y - x @ decompress_nm(c)).max()) < 1e-5
    ((2, 3, 32), True)
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .._common import on_gpu
from . import reference
from .pallas import check_tiles, nm_matmul_pallas
from sparsejax.nm import NMCompressed, decompress_nm

from .reference import check_args

IMPLEMENTATIONS = ("pallas", "xla", "reference")
KERNEL_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class Tiles(NamedTuple):
    """Tile sizes and Triton launch options of one Pallas call.

    Example:

        >>> from sparsejax.kernels.nm_matmul.api import Tiles
        >>> Tiles(block_m=64, block_n=128, block_k=64)       # launch options defaulted
        Tiles(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=3)
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def _largest_pow2_divisor(size: int, lo: int, hi: int, multiple_of: int = 1) -> int | None:
    t = hi
    while t >= lo:
        if size % t == 0 and t % multiple_of == 0:
            return t
        t //= 2
    return None


def default_tiles(rows: int, k: int, out: int, m: int) -> Tiles | None:
    """Tiles for ``[rows, K] @ [K, out]`` with N:M groups of ``m``, or ``None`` when no
    power-of-two tiling fits (then the api falls back to XLA).

    Few rows (decode-like) get thin row tiles, narrower column tiles (more programs to
    fill the GPU) and longer K tiles; many rows get 128×128 tiles. Untuned guesses:
    this session had no GPU to tune them on.

    Example:

        >>> from sparsejax.kernels.nm_matmul.api import default_tiles
        >>> default_tiles(16, 4096, 4096, 4)
        Tiles(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)
        >>> default_tiles(4096, 4096, 4096, 4)
        Tiles(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
        >>> default_tiles(16, 4096, 4096, 3) is None          # M not a power of two
        True
    """
    if m & (m - 1):
        return None
    block_m = min(128, max(16, 1 << max(rows - 1, 0).bit_length()))
    small = rows <= 64
    block_n = _largest_pow2_divisor(out, 16, 64 if small else 128)
    block_k = _largest_pow2_divisor(k, max(16, m), 128 if small else 64, multiple_of=m)
    if block_n is None or block_k is None:
        return None
    warps = 8 if block_m * block_n >= 128 * 128 else 4
    return Tiles(block_m, block_n, block_k, warps, 3)


def _tiles(rows: int, k: int, out: int, m: int, block_m, block_n, block_k) -> Tiles:
    """The tiles to use (defaults filled in); a ValueError says why the kernel cannot run."""
    auto = default_tiles(rows, k, out, m)
    if auto is None and None in (block_m, block_n, block_k):
        raise ValueError(f"no power-of-two tiling (>= 16) fits K={k}, out={out} with M={m}"
                         " (K and out must be divisible by a power of two >= 16 that is a "
                         "multiple of M, and M a power of two)")
    auto = auto or Tiles(16, 16, 16)
    tiles = Tiles(block_m or auto.block_m, block_n or auto.block_n, block_k or auto.block_k,
                  auto.num_warps, auto.num_stages)
    check_tiles(k=k, out=out, m=m, block_m=tiles.block_m, block_n=tiles.block_n,
                block_k=tiles.block_k, rows=0)  # rows are padded to a whole tile
    return tiles


def _kernel_problem(x: jax.Array, c: NMCompressed, block_m, block_n, block_k) -> str | None:
    """Why the Pallas kernel does not apply to ``(x, c)``, or ``None`` when it does."""
    try:
        _, m, k, out = check_args(x, c)
        if x.dtype not in KERNEL_DTYPES:
            return f"x dtype {x.dtype} is not one of f32/bf16/f16"
        rows = max(1, x.size // k) if x.ndim > 1 else 1
        _tiles(rows, k, out, m, block_m, block_n, block_k)
    except ValueError as e:
        return str(e)
    return None


# ----------------------------------------------------------------------------- pallas + VJP


def _decompress(values, indices, m: int) -> jax.Array:
    g, n, out = values.shape
    return decompress_nm(NMCompressed(values, indices, n, m, (g * m, out), 0))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _pallas_2d(x, values, indices, m: int, tiles: Tiles, interpret: bool):
    c = NMCompressed(values, indices, values.shape[1], m, (x.shape[1], values.shape[2]), 0)
    return nm_matmul_pallas(x, c, block_m=tiles.block_m, block_n=tiles.block_n,
                            block_k=tiles.block_k, interpret=interpret,
                            num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _pallas_2d_fwd(x, values, indices, m, tiles, interpret):
    return _pallas_2d(x, values, indices, m, tiles, interpret), (x, values, indices)


def _pallas_2d_bwd(m, tiles, interpret, res, g):
    x, values, indices = res
    w = _decompress(values, indices, m).astype(g.dtype)                 # [K, out]
    dx = jnp.matmul(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.matmul(x.T, g, preferred_element_type=jnp.float32)        # [K, out]
    groups, n, out = values.shape
    dv = jnp.take_along_axis(dw.reshape(groups, m, out), indices.astype(jnp.int32), axis=1)
    return dx, dv.astype(values.dtype), None


_pallas_2d.defvjp(_pallas_2d_fwd, _pallas_2d_bwd)


def _run_pallas(x, c, interpret, block_m, block_n, block_k) -> jax.Array:
    _, m, k, out = check_args(x, c)
    if x.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the Pallas nm_matmul kernel takes x in f32/bf16/f16, got {x.dtype}")
    x2 = x.reshape(-1, k)
    rows = x2.shape[0]
    tiles = _tiles(rows, k, out, m, block_m, block_n, block_k)
    pad = -rows % tiles.block_m
    x2 = jnp.pad(x2, ((0, pad), (0, 0))) if pad else x2
    interpret = (not on_gpu()) if interpret is None else bool(interpret)
    y = _pallas_2d(x2, c.values, c.indices, m, tiles, interpret)
    return y[:rows].reshape(*x.shape[:-1], out)


# ----------------------------------------------------------------------------- xla


def nm_matmul_xla(x: jax.Array, c: NMCompressed) -> jax.Array:
    """``x @ decompress_nm(c)``: rebuild the dense kernel, then one XLA matmul.

    Takes any 2-D kernel (compressed along axis 0 or 1); output dtype is ``x.dtype``.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.nm import compress_nm, nm_mask
        >>> from sparsejax.kernels.nm_matmul.api import nm_matmul_xla
        >>> kernel = jax.random.normal(jax.random.key(0), (64, 32))
        >>> x = jax.random.normal(jax.random.key(1), (2, 64))
        >>> y = nm_matmul_xla(x, compress_nm(kernel, 2, 4, axis=0))
        >>> float(jnp.abs(y - x @ (kernel * nm_mask(kernel, 2, 4, axis=0))).max()) < 1e-5
        True
        >>> y1 = nm_matmul_xla(x, compress_nm(kernel, 2, 4, axis=1))   # grouped along out
        >>> float(jnp.abs(y1 - x @ (kernel * nm_mask(kernel, 2, 4, axis=1))).max()) < 1e-5
        True
    """
    check_args(x, c, axes=(0, 1))
    return jnp.matmul(x, decompress_nm(c).astype(x.dtype))


# ----------------------------------------------------------------------------- api


def nm_matmul(x: jax.Array, c: NMCompressed, *, implementation: str | None = None,
              interpret: bool | None = None, block_m: int | None = None,
              block_n: int | None = None, block_k: int | None = None) -> jax.Array:
    """``x @ W`` for ``x [..., K]`` and ``c`` a compressed ``[K, out]`` kernel.

    ``implementation``: ``None`` (Pallas on GPU where it applies, else XLA),
    ``"pallas"``, ``"xla"`` or ``"reference"`` (see the module doc). ``interpret``
    applies to Pallas only (``None``: interpreted unless on GPU). Tile sizes default to
    :func:`default_tiles`; with ``implementation=None`` tiles that do not fit fall back
    to XLA, with ``"pallas"`` they raise. Differentiable in ``x`` and ``c.values``.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.nm import compress_nm
        >>> from sparsejax.kernels.nm_matmul.api import nm_matmul
        >>> kernel = jax.random.normal(jax.random.key(0), (64, 32))
        >>> x = jax.random.normal(jax.random.key(1), (2, 3, 64))
        >>> c = compress_nm(kernel, 2, 4, axis=0)
        >>> y = nm_matmul(x, c)                                     # [..., out]
        >>> y_pallas = nm_matmul(x, c, implementation="pallas", interpret=True)   # on CPU
        >>> y.shape, float(jnp.abs(y_pallas - y).max()) < 1e-5
        ((2, 3, 32), True)
        >>> grad = lambda impl: jax.jit(jax.grad(lambda x: nm_matmul(
        ...     x, c, implementation=impl, interpret=True).sum()))(x)
        >>> float(jnp.abs(grad("pallas") - grad("xla")).max()) < 1e-5   # the custom VJP
        True
    """
    if implementation not in (None,) + IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; known: "
                         f"{IMPLEMENTATIONS} or None")
    if implementation is None:
        use_pallas = on_gpu() and _kernel_problem(x, c, block_m, block_n, block_k) is None
        implementation = "pallas" if use_pallas else "xla"
    if implementation == "pallas":
        return _run_pallas(x, c, interpret, block_m, block_n, block_k)
    if implementation == "reference":
        check_args(x, c)
        return reference.nm_matmul_reference(x, c)
    return nm_matmul_xla(x, c)


def nm_linear_apply(x: jax.Array, c: NMCompressed, bias: jax.Array | None = None,
                    **kwargs) -> jax.Array:
    """A Linear layer with an N:M-compressed kernel: ``nm_matmul(x, c) + bias``.

    ``kwargs`` go to :func:`nm_matmul` (``implementation``, ``interpret``, tiles).

    Example:

        >>> import jax, jax.numpy as jnp
        >>> import sparsejax
        >>> from sparsejax.nm import NMCompressed, nm_mask
        >>> from sparsejax.kernels.nm_matmul.api import nm_linear_apply
        >>> kernel = jax.random.normal(jax.random.key(0), (64, 32))
        >>> params = {'mlp': {'fc1': {'kernel': kernel, 'bias': jnp.ones(32)}}}
        >>> exported = sparsejax.export_nm(params, [(r'.*kernel', '2:4')], axis=0)
        >>> fc1 = exported['mlp']['fc1']
        >>> x = jax.random.normal(jax.random.key(1), (2, 64))
        >>> y = nm_linear_apply(x, NMCompressed.from_export(fc1['kernel']), fc1['bias'])
        >>> want = x @ (kernel * nm_mask(kernel, 2, 4, axis=0)) + 1
        >>> y.shape, float(jnp.abs(y - want).max()) < 1e-5
        ((2, 32), True)
    """
    y = nm_matmul(x, c, **kwargs)
    return y if bias is None else y + bias.astype(y.dtype)
