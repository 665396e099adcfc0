"""Pallas gather-GEMV for activation-sparse FFN decode (portable Triton form).

Computes ``y[b] = Σ_i coef[b,i] · (x2[b] · w_in[idx[b,i]]) · w_out[idx[b,i]]`` (the
``x2 · w_in`` factor only when ``w_in`` is given; see ``reference.py``), reading only the
selected rows of the unit-major ``w_in [F, d2]`` and of ``w_out [F, d_out]``.

Grid ``(B, ⌈k / units_per_step⌉, col_splits)``: program ``(b, c, g)`` takes the
``units_per_step`` selected units ``idx[b, c·u : (c+1)·u]`` (padding → unit 0 with
coefficient 0). It gathers their ``w_in`` rows in column tiles, ``[u, td]`` at a time,
and reduces ``s_i = x2[b] · w_in[idx_i]`` in float32; then it gathers their ``w_out`` rows
in its share of the output columns, ``[u, tn]`` at a time, and writes
``Σ_i coef_i s_i w_out[idx_i, cols]`` (an elementwise multiply and a reduction over the
``u`` units: no ``tl.dot``, so any batch size 1..8 works without padding rows to 16).
The partial sums ``[n_chunks, B, d_out]`` (float32) are added by XLA. Index arrays are
ordinary inputs (scalar prefetch is TPU-only); gathers are vector-indexed loads.

Example:

    >>> import jax.numpy as jnp, numpy as np
    >>> from sparsejax.kernels.sparse_ffn.pallas import sparse_ffn_decode_pallas
    >>> from sparsejax.kernels.sparse_ffn.reference import sparse_ffn_decode_reference
    >>> rng = np.random.default_rng(0)
    >>> x2, k2_t, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
    ...                for s in [(2, 16), (32, 16), (32, 16)])
    >>> idx = jnp.array([[3, 7, 30, -1], [0, 5, 5, 9]])
    >>> coef = jnp.array([[1., 2., -1., 0.], [0.5, 1., 1., 2.]])
    >>> y = sparse_ffn_decode_pallas(x2, k2_t, v, idx, coef, interpret=True)
    >>> want = sparse_ffn_decode_reference(x2, k2_t, v, idx, coef)
    >>> y.shape, float(jnp.abs(y - want).max()) < 1e-4
    ((2, 16), True)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .._common import on_gpu, triton_params
from .reference import clean_indices

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MIN_COLS = 16


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _col_tile(d: int, cap: int) -> int:
    """Largest power of two ``<= cap`` that divides ``d`` (``d`` a multiple of 16)."""
    t = cap
    while d % t:
        t //= 2
    return t


def unsupported_reason(x2, w_in, w_out, idx, coef, *, col_splits: int = 1) -> str | None:
    """Why the Pallas kernel cannot take these inputs, or ``None`` if it can.

    Needs: float32/bfloat16/float16 weights and activations; ``d2`` and ``d_out /
    col_splits`` multiples of 16 (column tiles are powers of two, as Triton needs).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.sparse_ffn.pallas import unsupported_reason
        >>> w_out, idx, coef = jnp.ones((32, 16)), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4))
        >>> unsupported_reason(None, None, w_out, idx, coef) is None
        True
        >>> unsupported_reason(None, None, w_out[:, :8], idx, coef)
        'w_out has d_out=8 columns; with col_splits=1 the kernel needs d_out / col_splits to be
        a whole multiple of 16'
    """
    for name, t in (("x2", x2), ("w_in", w_in), ("w_out", w_out), ("coef", coef)):
        if t is not None and jnp.dtype(t.dtype) not in [jnp.dtype(d) for d in DTYPES]:
            return f"{name} has dtype {jnp.dtype(t.dtype).name}; the kernel takes float32, " \
                   "bfloat16 or float16"
    if w_in is not None and w_in.shape[1] % MIN_COLS:
        return f"w_in has d2={w_in.shape[1]} columns; the kernel needs a multiple of {MIN_COLS}"
    d_out = w_out.shape[1]
    if d_out % col_splits or (d_out // col_splits) % MIN_COLS:
        return (f"w_out has d_out={d_out} columns; with col_splits={col_splits} the kernel "
                f"needs d_out / col_splits to be a whole multiple of {MIN_COLS}")
    return None


def _kernel(*refs, has_in: bool, td: int, tn: int, d2: int, cols: int):
    if has_in:
        idx_ref, c_ref, x_ref, win_ref, wout_ref, o_ref = refs
    else:
        idx_ref, c_ref, wout_ref, o_ref = refs
    rows = idx_ref[...]                                   # [u] unit ids
    coef = c_ref[...].astype(jnp.float32)                 # [u]
    if has_in:
        def in_tile(t, s):
            c = pl.ds(pl.multiple_of(t * td, td), td)
            w = win_ref[rows, c].astype(jnp.float32)      # gather [u, td]
            return s + jnp.sum(w * x_ref[c].astype(jnp.float32)[None, :], axis=1)
        coef = coef * lax.fori_loop(0, d2 // td, in_tile, jnp.zeros(rows.shape, jnp.float32))
    base = pl.program_id(2) * cols

    def out_tile(t, carry):
        c = pl.ds(pl.multiple_of(base + t * tn, tn), tn)
        w = wout_ref[rows, c].astype(jnp.float32)         # gather [u, tn]
        o_ref[pl.ds(pl.multiple_of(t * tn, tn), tn)] = jnp.sum(w * coef[:, None], axis=0)
        return carry

    lax.fori_loop(0, cols // tn, out_tile, 0)


@functools.partial(jax.jit, static_argnames=("units_per_step", "block_cols", "col_splits",
                                             "num_warps", "num_stages", "interpret"))
def sparse_ffn_decode_pallas(x2: jax.Array | None, w_in: jax.Array | None, w_out: jax.Array,
                             idx: jax.Array, coef: jax.Array, *, units_per_step: int = 16,
                             block_cols: int = 256, col_splits: int = 1, num_warps: int = 4,
                             num_stages: int = 2, interpret: bool | None = None) -> jax.Array:
    """Gather-GEMV decode FFN in Pallas (module docstring); ``[B, d_out]``.

    ``x2 [B, d2]`` and unit-major ``w_in [F, d2]`` (both or neither), ``w_out [F, d_out]``,
    ``idx [B, k]`` int (``-1`` = padding), ``coef [B, k]``. Tuning: ``units_per_step``
    (power of two: units gathered per program), ``block_cols`` (power of two: widest
    column tile), ``col_splits`` (programs sharing one unit chunk's output columns; each
    recomputes ``x2 · w_in``). ``interpret=None`` means interpret off GPU. Raises
    ``ValueError`` on inputs the kernel does not take (``unsupported_reason``); use
    ``api.sparse_ffn_decode`` for automatic fallback.

    Example:

        >>> import jax.numpy as jnp, numpy as np
        >>> from sparsejax.kernels.sparse_ffn.pallas import sparse_ffn_decode_pallas
        >>> w_down = jnp.asarray(np.random.default_rng(0).normal(size=(64, 32)), jnp.float32)
        >>> idx, coef = jnp.array([[5, 60, -1]]), jnp.array([[2., -1., 7.]])   # -1: padding
        >>> y = sparse_ffn_decode_pallas(None, None, w_down, idx, coef, interpret=True)
        >>> float(jnp.abs(y[0] - (2 * w_down[5] - w_down[60])).max()) < 1e-5
        True
    """
    if (x2 is None) != (w_in is None):
        raise ValueError("give x2 and w_in together, or neither")
    if not (_is_pow2(units_per_step) and _is_pow2(block_cols) and block_cols >= MIN_COLS):
        raise ValueError(f"units_per_step={units_per_step} and block_cols={block_cols} must "
                         f"be powers of two (block_cols >= {MIN_COLS})")
    reason = unsupported_reason(x2, w_in, w_out, idx, coef, col_splits=col_splits)
    if reason:
        raise ValueError(f"Pallas sparse_ffn_decode: {reason}")
    interpret = (not on_gpu()) if interpret is None else interpret
    b, k = idx.shape
    f, d_out = w_out.shape
    safe, cf = clean_indices(idx, coef.astype(jnp.float32), f)
    u = min(units_per_step, 1 << (k - 1).bit_length())      # power of two, not above need
    n_chunks = -(-k // u)
    pad = n_chunks * u - k
    safe = jnp.pad(safe, ((0, 0), (0, pad)))
    cf = jnp.pad(cf, ((0, 0), (0, pad)))
    cols = d_out // col_splits
    tn = _col_tile(cols, block_cols)
    unit_spec = pl.BlockSpec((None, u), lambda i, c, g: (i, c))
    in_specs, args = [unit_spec, unit_spec], [safe, cf]
    d2 = td = 0
    if w_in is not None:
        d2 = w_in.shape[1]
        td = _col_tile(d2, block_cols)
        in_specs += [pl.BlockSpec((None, d2), lambda i, c, g: (i, 0)),
                     pl.BlockSpec(w_in.shape, lambda i, c, g: (0, 0))]
        args += [x2, w_in]
    in_specs.append(pl.BlockSpec(w_out.shape, lambda i, c, g: (0, 0)))
    args.append(w_out)
    partial = pl.pallas_call(
        functools.partial(_kernel, has_in=w_in is not None, td=td, tn=tn, d2=d2, cols=cols),
        grid=(b, n_chunks, col_splits),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, cols), lambda i, c, g: (c, i, g)),
        out_shape=jax.ShapeDtypeStruct((n_chunks, b, d_out), jnp.float32),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="sparse_ffn_gather_gemv",
    )(*args)
    dtype = jnp.result_type(*[t for t in (x2, w_in, w_out, coef) if t is not None])
    return partial.sum(axis=0).astype(dtype)
