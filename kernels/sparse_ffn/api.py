"""Activation-sparse FFN: decode gather-GEMV and block-granular training, with fallbacks.

Decode (batch 1..8): ``sparse_ffn_decode`` picks the Pallas gather-GEMV on GPU and the
XLA gather (``jnp.take`` of the selected rows, then matrix-vector products) elsewhere;
``spark_ffn_decode`` and ``topk_ffn_decode`` do the unit selection exactly as
``sparsejax.nn.spark.SparkFFN`` and ``TopKFFN`` do, then read only the selected rows of
the second (and, for Spark, the gated first) matrix. Training: ``block_sparse_ffn``
keeps ``keep_blocks`` unit blocks per token tile (a token-level top-k would use every
unit of a 128-token tile) and computes the FFN on those blocks only, differentiably.

Weight layouts: ``w_out``/``v``/``w_down`` ``[F, d_out]`` (an ``nnx.Linear(F, d_out)``
kernel as is); the gated input matrix ``w_in``/``k2`` is **unit-major** ``[F, d2]`` so a
unit is one contiguous row: convert an ``nnx.Linear(d2, F)`` kernel once with
``unit_major`` (not per call on a hot path: it copies the matrix).

Example:

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from flax import nnx
    >>> from sparsejax.nn.spark import SparkFFN
    >>> from sparsejax.kernels.sparse_ffn.api import block_sparse_ffn, spark_ffn_decode, unit_major
    >>> ffn = SparkFFN(32, 128, 'gelu', density=0.08, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (2, 32))
    >>> k2_t = unit_major(ffn.k2)                                  # once
    >>> y = spark_ffn_decode(x, ffn.k1.kernel[...], k2_t, ffn.v.kernel[...],
    ...                      v_bias=ffn.v.bias[...], density=0.08, k_max=24)
    >>> float(jnp.abs(y - ffn(x)).max()) < 1e-5
    True
    >>> rng = np.random.default_rng(0)
    >>> xt, w_up, w_down = (jnp.asarray(rng.normal(size=s), jnp.float32)
    ...                     for s in [(8, 16), (16, 64), (64, 16)])
    >>> cfg = dict(activation='relu', block_units=16, tile_tokens=4, keep_blocks=2)
    >>> y = block_sparse_ffn(xt, w_up, w_down, **cfg)
    >>> y_masked = block_sparse_ffn(xt, w_up, w_down, **cfg, implementation='masked')
    >>> y.shape, float(jnp.abs(y - y_masked).max()) < 1e-4
    ((8, 16), True)
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sparsejax.activations import activation_fn, statistical_topk

from .._common import on_gpu
from . import reference
from .pallas import sparse_ffn_decode_pallas, unsupported_reason
from .reference import (block_scores, block_sparse_ffn_reference, clean_indices,
                        nonzero_indices, select_blocks, topk_indices)

DECODE_IMPLEMENTATIONS = ("pallas", "xla", "dense", "reference")
TRAIN_IMPLEMENTATIONS = ("gather", "ragged", "masked")
SELECTIONS = ("topk", "nonzero")
MAX_PALLAS_BATCH = 8
_TRAIN_STATIC = ("activation", "block_units", "tile_tokens")


# ----------------------------------------------------------------------------- layout


def unit_major(w) -> jax.Array:
    """``[d_in, F]`` (an ``nnx.Linear`` kernel, or the module itself) → unit-major
    ``[F, d_in]``, the layout ``w_in``/``k2`` take (a unit's weights are one row).

    Example:

        >>> from flax import nnx
        >>> from sparsejax.kernels.sparse_ffn.api import unit_major
        >>> k2 = nnx.Linear(16, 128, use_bias=False, rngs=nnx.Rngs(0))
        >>> k2_t = unit_major(k2)
        >>> k2_t.shape, bool((k2_t == k2.kernel[...].T).all())
        ((128, 16), True)
    """
    w = getattr(w, "kernel", w)
    w = jnp.asarray(w[...])
    if w.ndim != 2:
        raise ValueError(f"unit_major takes a 2-D kernel [d_in, F]; got shape {w.shape}")
    return w.T


# ----------------------------------------------------------------------------- decode


def _concrete(a) -> np.ndarray | None:
    try:
        return np.asarray(a)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_decode(x2, w_in, w_out, idx, coef) -> None:
    if jnp.ndim(w_out) != 2:
        raise ValueError(f"w_out must be [F, d_out]; got shape {jnp.shape(w_out)}")
    f = w_out.shape[0]
    if jnp.ndim(idx) < 1 or not jnp.issubdtype(jnp.result_type(idx), jnp.integer):
        raise ValueError(f"idx must be an integer array [..., k]; got shape {jnp.shape(idx)} "
                         f"dtype {jnp.result_type(idx)}")
    if jnp.shape(coef) != jnp.shape(idx):
        raise ValueError(f"coef shape {jnp.shape(coef)} must equal idx shape {jnp.shape(idx)}")
    k = idx.shape[-1]
    if not 1 <= k <= f:
        raise ValueError(f"k={k} selected units per row must be in [1, F={f}]")
    if (x2 is None) != (w_in is None):
        raise ValueError("give x2 and w_in together (gated form), or neither")
    if w_in is not None:
        if jnp.ndim(w_in) != 2 or w_in.shape[0] != f:
            raise ValueError(f"w_in must be unit-major [F={f}, d2]; got shape "
                             f"{jnp.shape(w_in)} (convert an nnx.Linear kernel with "
                             "unit_major)")
        if jnp.shape(x2) != (*idx.shape[:-1], w_in.shape[1]):
            raise ValueError(f"x2 shape {jnp.shape(x2)} must be {(*idx.shape[:-1], w_in.shape[1])}"
                             f" (idx's leading dims, then w_in's d2)")
    values = _concrete(idx)
    if values is not None and values.size and (values.min() < -1 or values.max() >= f):
        raise ValueError(f"idx values must be unit ids in [0, F={f}) or -1 for padding; got "
                         f"range [{values.min()}, {values.max()}]")


@jax.jit
def sparse_ffn_decode_xla(x2: jax.Array | None, w_in: jax.Array | None, w_out: jax.Array,
                          idx: jax.Array, coef: jax.Array) -> jax.Array:
    """XLA gather-GEMV: per row (``lax.map``), ``jnp.take`` of the selected rows, then two
    matrix-vector products (float32 accumulate).

    Same contract as ``reference.sparse_ffn_decode_reference`` on 2-D ``idx [B, k]``;
    reads ``B·k`` rows of ``w_out`` (and ``w_in``) instead of all ``F``. Mapping over
    rows keeps the gathered block at ``[k, d]`` (a batched ``[B, k, d]`` einsum was up
    to 3× slower on CPU at B = 8).

    Example:

        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from sparsejax.kernels.sparse_ffn.api import sparse_ffn_decode_xla
        >>> from sparsejax.kernels.sparse_ffn.reference import (sparse_ffn_decode_reference,
        ...                                                     topk_indices)
        >>> rng = np.random.default_rng(0)
        >>> x, w_up, w_down = (jnp.asarray(rng.normal(size=s), jnp.float32)
        ...                    for s in [(2, 16), (16, 64), (64, 16)])
        >>> idx, coef = topk_indices(jax.nn.relu(x @ w_up), 8)
        >>> y = sparse_ffn_decode_xla(None, None, w_down, idx, coef)
        >>> want = sparse_ffn_decode_reference(None, None, w_down, idx, coef)
        >>> y.shape, float(jnp.abs(y - want).max()) < 1e-4
        ((2, 16), True)
    """
    dtype = jnp.result_type(*[t for t in (x2, w_in, w_out, coef) if t is not None])
    safe, cf = clean_indices(idx, coef, w_out.shape[0])
    f32 = jnp.float32

    def one_row(args):
        rows, c = args[0], args[1].astype(f32)
        if w_in is not None:
            c = c * jnp.matmul(jnp.take(w_in, rows, axis=0), args[2], preferred_element_type=f32)
        return jnp.matmul(c, jnp.take(w_out, rows, axis=0), preferred_element_type=f32)

    xs = (safe, cf) if w_in is None else (safe, cf, x2)
    return lax.map(one_row, xs).astype(dtype)


@jax.jit
def sparse_ffn_decode_dense(x2: jax.Array | None, w_in: jax.Array | None, w_out: jax.Array,
                            idx: jax.Array, coef: jax.Array) -> jax.Array:
    """Dense matmuls on the scattered coefficients, in the inputs' dtype:
    ``(A ⊙ x2 w_inᵀ) w_out`` with ``A = dense_coefficients(idx, coef, F)``.

    What reading every row costs; the right choice when the rows together select more
    units than ``F`` (``choose_decode`` picks it then), e.g. a prefill.

    Example:

        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from sparsejax.kernels.sparse_ffn.api import sparse_ffn_decode_dense
        >>> from sparsejax.kernels.sparse_ffn.reference import (sparse_ffn_decode_reference,
        ...                                                     topk_indices)
        >>> rng = np.random.default_rng(0)
        >>> x, w_up, w_down = (jnp.asarray(rng.normal(size=s), jnp.float32)
        ...                    for s in [(8, 16), (16, 64), (64, 16)])
        >>> idx, coef = topk_indices(jax.nn.relu(x @ w_up), 16)    # 8 rows x 16 > F = 64 units
        >>> y = sparse_ffn_decode_dense(None, None, w_down, idx, coef)
        >>> want = sparse_ffn_decode_reference(None, None, w_down, idx, coef)
        >>> y.shape, float(jnp.abs(y - want).max()) < 1e-4
        ((8, 16), True)
    """
    dtype = jnp.result_type(*[t for t in (x2, w_in, w_out, coef) if t is not None])
    a = reference.dense_coefficients(idx, coef, w_out.shape[0]).astype(dtype)
    if w_in is not None:
        a = a * jnp.matmul(x2, w_in.T).astype(dtype)
    return jnp.matmul(a, w_out).astype(dtype)


def choose_decode(x2, w_in, w_out, idx, coef, implementation: str | None) -> str:
    """The implementation ``sparse_ffn_decode`` runs: the given one (checked), or with
    ``None``: 'dense' when the rows together select more than ``F`` units (a gather would
    read more than the matrix), else Pallas on a GPU for ≤ 8 rows and supported inputs,
    else the XLA gather.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.sparse_ffn.api import choose_decode
        >>> w = jnp.ones((64, 16))                                   # F = 64
        >>> idx, coef = jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8))
        >>> choose_decode(None, None, w, idx, coef, None)   # 'xla' on CPU
        'xla'
        >>> idx, coef = jnp.zeros((8, 16), jnp.int32), jnp.ones((8, 16))   # 128 > F units
        >>> choose_decode(None, None, w, idx, coef, None)
        'dense'
        >>> choose_decode(None, None, w[:, :8], idx, coef, 'pallas')
        Traceback (most recent call last):
            ...
        ValueError: implementation='pallas' cannot run this input: w_out has d_out=8 columns; ...
    """
    if implementation is not None and implementation not in DECODE_IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; use one of "
                         f"{DECODE_IMPLEMENTATIONS} or None")
    reason = unsupported_reason(x2, w_in, w_out, idx, coef)
    if implementation == "pallas" and reason:
        raise ValueError(f"implementation='pallas' cannot run this input: {reason}")
    if implementation is not None:
        return implementation
    rows = int(np.prod(idx.shape[:-1]))
    if rows * idx.shape[-1] > w_out.shape[0]:
        return "dense"
    return "pallas" if on_gpu() and reason is None and rows <= MAX_PALLAS_BATCH else "xla"


def sparse_ffn_decode(x2: jax.Array | None, w_in: jax.Array | None, w_out: jax.Array,
                      idx: jax.Array, coef: jax.Array, *, implementation: str | None = None,
                      interpret: bool | None = None) -> jax.Array:
    """Activation-sparse FFN decode: ``y[b] = Σ_i coef[b,i]·(x2[b]·w_in[idx[b,i]])·
    w_out[idx[b,i]]`` (the ``x2·w_in`` factor only in the gated form).

    ``idx [..., k]`` int unit ids (``-1`` = padding, for variable counts up to a capacity
    ``k``), ``coef [..., k]`` their gate/activation values, ``w_out [F, d_out]``; gated
    form: ``x2 [..., d2]`` and unit-major ``w_in [F, d2]`` (``unit_major``). Returns
    ``[..., d_out]``. ``implementation``: None (``choose_decode``: Pallas on GPU for ≤ 8
    rows, XLA gather otherwise, dense when the rows select more than F units in all),
    'pallas', 'xla', 'dense' (native-dtype dense matmuls) or 'reference' (float32).
    Bad shapes and ``k > F`` raise ``ValueError``; so do out-of-range ids when ``idx`` is
    concrete (outside ``jit``; the check reads ``idx`` to the host, so call it under
    ``jit`` on a hot path); under ``jit`` an id ``>= F`` makes its output row NaN.
    ``interpret`` is passed to Pallas (None: interpret off GPU).

    Example:

        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from sparsejax.kernels.sparse_ffn.api import sparse_ffn_decode
        >>> from sparsejax.kernels.sparse_ffn.reference import topk_indices
        >>> rng = np.random.default_rng(0)
        >>> x, w_up, w_down = (jnp.asarray(rng.normal(size=s), jnp.float32)
        ...                    for s in [(1, 16), (16, 64), (64, 16)])
        >>> h = jax.nn.relu(x @ w_up)
        >>> int((h != 0).sum())
        41
        >>> idx, coef = topk_indices(h, k=48)           # capacity 48: every nonzero fits
        >>> y = sparse_ffn_decode(None, None, w_down, idx, coef)
        >>> float(jnp.abs(y - h @ w_down).max()) < 1e-4
        True
        >>> sparse_ffn_decode(None, None, w_down, idx.at[0, 0].set(64), coef)
        Traceback (most recent call last):
            ...
        ValueError: idx values must be unit ids in [0, F=64) or -1 for padding; got range [-1, 64]
    """
    _check_decode(x2, w_in, w_out, idx, coef)
    impl = choose_decode(x2, w_in, w_out, idx, coef, implementation)
    return _decode(x2, w_in, w_out, idx, coef, impl=impl, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("impl", "interpret"))
def _decode(x2, w_in, w_out, idx, coef, *, impl: str, interpret: bool | None):
    lead, k = idx.shape[:-1], idx.shape[-1]
    idx2, coef2 = idx.reshape(-1, k), coef.reshape(-1, k)
    x22 = None if x2 is None else x2.reshape(-1, x2.shape[-1])
    if impl == "pallas":
        y = sparse_ffn_decode_pallas(x22, w_in, w_out, idx2, coef2, interpret=interpret)
    elif impl == "xla":
        y = sparse_ffn_decode_xla(x22, w_in, w_out, idx2, coef2)
    elif impl == "dense":
        y = sparse_ffn_decode_dense(x22, w_in, w_out, idx2, coef2)
    else:
        y = reference.sparse_ffn_decode_reference(x22, w_in, w_out, idx2, coef2)
    return y.reshape(*lead, w_out.shape[1])


def _select(a: jax.Array, k: int, selection: str) -> tuple[jax.Array, jax.Array]:
    return (topk_indices if selection == "topk" else nonzero_indices)(a, k)


def spark_ffn_decode(x: jax.Array, k1: jax.Array, k2: jax.Array, v: jax.Array, *,
                     density: float, k_max: int, activation: str | Callable = "gelu",
                     v_bias: jax.Array | None = None, selection: str = "topk",
                     implementation: str | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """Spark FFN decode (You et al. 2025), reading only the selected units of K2 and V.

    ``y = Vᵀ(act(STopk(K1ᵀq1)) ⊙ (K2ᵀq2)) + b_v`` with ``q1 = x[..., :r]``, ``q2 =
    x[..., r:]``, STopk the soft statistical top-k ``max(z − θ, 0)``, ``θ = mean(z) +
    std(z)·Φ⁻¹(1 − density)``, exactly as ``SparkFFN.gate``. The predictor ``K1ᵀq1`` is
    dense (``k1 [r, F]``, the nnx kernel); the ≤ ``k_max`` nonzero gates per token go
    through ``sparse_ffn_decode`` with unit-major ``k2 [F, d − r]`` and ``v [F, d_out]``.
    If the threshold keeps more than ``k_max`` units, ``selection='topk'`` keeps the
    ``k_max`` largest gates (sorts), ``'nonzero'`` the lowest-index ones (no sort);
    ``reference.dropped_units`` counts the loss. Equal to the module when nothing is
    dropped. ``x [..., d]`` → ``[..., d_out]``.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.spark import SparkFFN
        >>> from sparsejax.kernels.sparse_ffn.api import spark_ffn_decode, unit_major
        >>> ffn = SparkFFN(32, 128, 'gelu', density=0.08, rngs=nnx.Rngs(0))
        >>> x = jax.random.normal(jax.random.key(1), (2, 32))
        >>> (ffn.gate(x) != 0).sum(-1).tolist()                       # units kept per token
        [7, 11]
        >>> decode = lambda k_max: spark_ffn_decode(
        ...     x, ffn.k1.kernel[...], unit_major(ffn.k2), ffn.v.kernel[...],
        ...     v_bias=ffn.v.bias[...], density=0.08, k_max=k_max)
        >>> float(jnp.abs(decode(24) - ffn(x)).max()) < 1e-5         # nothing dropped
        True
        >>> float(jnp.abs(decode(4) - ffn(x)).max()) < 1e-5          # k_max=4 drops units
        False
    """
    if jnp.ndim(k1) != 2 or jnp.ndim(k2) != 2 or jnp.ndim(v) != 2:
        raise ValueError(f"k1 [r, F], k2 [F, d - r] and v [F, d_out] must be 2-D; got shapes "
                         f"{jnp.shape(k1)}, {jnp.shape(k2)}, {jnp.shape(v)}")
    r, f = k1.shape
    d = x.shape[-1]
    if not 0 < r < d or k2.shape != (f, d - r):
        raise ValueError(f"k2 must be unit-major [F={f}, d - r={d - r}] for x with d={d} and "
                         f"k1 [r={r}, F={f}]; got {k2.shape} (convert with unit_major)")
    if not 1 <= k_max <= f:
        raise ValueError(f"k_max={k_max} must be in [1, F={f}]")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; use one of {SELECTIONS}")
    return _spark_decode(x, k1, k2, v, v_bias, density=density, k_max=k_max,
                         activation=activation, selection=selection,
                         implementation=implementation, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("density", "k_max", "activation", "selection",
                                             "implementation", "interpret"))
def _spark_decode(x, k1, k2, v, v_bias, *, density, k_max, activation, selection,
                  implementation, interpret):
    r, d = k1.shape[0], x.shape[-1]
    xf = x.reshape(-1, d)
    gate = activation_fn(activation)(statistical_topk(xf[:, :r] @ k1, density, mode="soft"))
    idx, coef = _select(gate, k_max, selection)
    y = sparse_ffn_decode(xf[:, r:], k2, v, idx, coef, implementation=implementation,
                          interpret=interpret)
    y = y if v_bias is None else y + v_bias
    return y.reshape(*x.shape[:-1], v.shape[1])


def topk_ffn_decode(x: jax.Array, w_up: jax.Array, b_up: jax.Array | None, w_down: jax.Array,
                    b_down: jax.Array | None, *, activation: str | Callable, k: int,
                    mode: str = "exact", density: float | None = None,
                    selection: str = "topk", implementation: str | None = None,
                    interpret: bool | None = None) -> jax.Array:
    """Top-k FFN decode (Li et al. 2023): ``h = act(x W_up + b_up)`` dense, keep units,
    then ``y = Σ_{j kept} h_j W_down[j] + b_down`` reading only the kept rows of W_down.

    ``mode='exact'``: the ``k`` largest ``h`` per token (``lax.top_k``, as
    ``TopKActivation(mode='exact')``); ``mode='statistical'``: the hard statistical
    top-k ``h·[h > θ]`` at ``density`` (as ``StatisticalTopKFFN``), with ``k`` the
    capacity (overflow handled by ``selection`` as in ``spark_ffn_decode``). ``w_up [d,
    F]``, ``w_down [F, d_out]``, biases may be None. ``x [..., d]`` → ``[..., d_out]``.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.spark import TopKFFN
        >>> from sparsejax.kernels.sparse_ffn.api import topk_ffn_decode
        >>> ffn = TopKFFN(16, 64, 'relu', density=0.125, mode='exact', rngs=nnx.Rngs(0))   # k = 8
        >>> x = jax.random.normal(jax.random.key(1), (2, 16))
        >>> y = topk_ffn_decode(x, ffn.up.kernel[...], ffn.up.bias[...], ffn.down.kernel[...],
        ...                     ffn.down.bias[...], activation='relu', k=8)
        >>> float(jnp.abs(y - ffn(x)).max()) < 1e-5
        True
    """
    if mode not in ("exact", "statistical"):
        raise ValueError(f"unknown mode {mode!r}; use 'exact' or 'statistical'")
    if mode == "statistical" and density is None:
        raise ValueError("mode='statistical' needs density=")
    if jnp.ndim(w_up) != 2 or jnp.ndim(w_down) != 2 or w_up.shape[1] != w_down.shape[0]:
        raise ValueError(f"w_up [d, F] and w_down [F, d_out] must agree on F; got shapes "
                         f"{jnp.shape(w_up)}, {jnp.shape(w_down)}")
    f = w_up.shape[1]
    if not 1 <= k <= f:
        raise ValueError(f"k={k} selected units per token must be in [1, F={f}]")
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}; use one of {SELECTIONS}")
    return _topk_decode(x, w_up, b_up, w_down, b_down, activation=activation, k=k, mode=mode,
                        density=density, selection=selection, implementation=implementation,
                        interpret=interpret)


@functools.partial(jax.jit, static_argnames=("activation", "k", "mode", "density", "selection",
                                             "implementation", "interpret"))
def _topk_decode(x, w_up, b_up, w_down, b_down, *, activation, k, mode, density, selection,
                 implementation, interpret):
    z = x.reshape(-1, x.shape[-1]) @ w_up
    h = activation_fn(activation)(z if b_up is None else z + b_up)
    if mode == "exact":
        coef, idx = lax.top_k(h, k)
        idx = idx.astype(jnp.int32)
    else:
        idx, coef = _select(statistical_topk(h, density, mode="hard"), k, selection)
    y = sparse_ffn_decode(None, None, w_down, idx, coef, implementation=implementation,
                          interpret=interpret)
    y = y if b_down is None else y + b_down
    return y.reshape(*x.shape[:-1], w_down.shape[1])


# ----------------------------------------------------------------------------- training


def _check_train(x, w_up, w_down, block_units, tile_tokens, keep_blocks, scores):
    if jnp.ndim(w_up) != 2 or jnp.ndim(w_down) != 2:
        raise ValueError(f"w_up [d, F] and w_down [F, d_out] must be 2-D; got shapes "
                         f"{jnp.shape(w_up)}, {jnp.shape(w_down)}")
    d, f = w_up.shape
    if x.shape[-1] != d or w_down.shape[0] != f:
        raise ValueError(f"shapes disagree: x {x.shape}, w_up {w_up.shape} (d, F), w_down "
                         f"{w_down.shape} (F, d_out)")
    if block_units < 1 or f % block_units:
        raise ValueError(f"block_units={block_units} must divide the FFN width F={f}")
    t = int(np.prod(x.shape[:-1]))
    if tile_tokens < 1 or t % tile_tokens:
        raise ValueError(f"tile_tokens={tile_tokens} must divide the token count T={t}")
    n_blocks = f // block_units
    if not 1 <= keep_blocks <= n_blocks:
        raise ValueError(f"keep_blocks={keep_blocks} must be in [1, F/block_units={n_blocks}]")
    if scores is not None and jnp.shape(scores) != (t // tile_tokens, n_blocks):
        raise ValueError(f"scores must be [T/tile_tokens, F/block_units] = "
                         f"{(t // tile_tokens, n_blocks)}; got {jnp.shape(scores)}")


@functools.partial(jax.jit, static_argnames=_TRAIN_STATIC)
def block_sparse_ffn_gather(x: jax.Array, w_up: jax.Array, w_down: jax.Array,
                            selected: jax.Array, *, activation: str | Callable,
                            block_units: int, tile_tokens: int, b_up: jax.Array | None = None,
                            b_down: jax.Array | None = None) -> jax.Array:
    """Block-sparse FFN by gather + batched matmul: each tile's kept blocks of W_up/W_down
    are gathered (``[tiles, keep, d, block]``) and multiplied in one einsum.

    ``x [T, d]``, ``selected [T / tile_tokens, keep]`` block ids. FLOPs ``keep·block/F``
    of the dense FFN; memory: the gathered weights, ``tiles·keep/n_blocks`` weight copies.
    Gradients flow to x and (scatter-added) to the weights.

    Example:

        >>> import jax.numpy as jnp, numpy as np
        >>> from sparsejax.kernels.sparse_ffn.api import block_sparse_ffn_gather
        >>> from sparsejax.kernels.sparse_ffn.reference import block_sparse_ffn_reference
        >>> rng = np.random.default_rng(0)
        >>> x, w_up, w_down = (jnp.asarray(rng.normal(size=s), jnp.float32)
        ...                    for s in [(8, 16), (16, 64), (64, 16)])
        >>> sel = jnp.array([[0, 3], [2, 1]])            # 2 tiles of 4 tokens, 2 of 4 blocks each
        >>> cfg = dict(activation='relu', block_units=16, tile_tokens=4)
        >>> y = block_sparse_ffn_gather(x, w_up, w_down, sel, **cfg)
        >>> float(jnp.abs(y - block_sparse_ffn_reference(x, w_up, w_down, sel, **cfg)).max()) < 1e-4
        True
    """
    (t, d), f, n_tiles = x.shape, w_up.shape[1], selected.shape[0]
    nb = f // block_units
    xt = x.reshape(n_tiles, tile_tokens, d)
    wu = w_up.reshape(d, nb, block_units).transpose(1, 0, 2)[selected]    # [n, keep, d, u]
    h = jnp.einsum("ntd,nkdu->ntku", xt, wu)
    if b_up is not None:
        h = h + b_up.reshape(nb, block_units)[selected][:, None]
    wd = w_down.reshape(nb, block_units, -1)[selected]                    # [n, keep, u, e]
    y = jnp.einsum("ntku,nkue->nte", activation_fn(activation)(h), wd).reshape(t, -1)
    return y if b_down is None else y + b_down


@functools.partial(jax.jit, static_argnames=_TRAIN_STATIC)
def block_sparse_ffn_ragged(x: jax.Array, w_up: jax.Array, w_down: jax.Array,
                            selected: jax.Array, *, activation: str | Callable,
                            block_units: int, tile_tokens: int, b_up: jax.Array | None = None,
                            b_down: jax.Array | None = None) -> jax.Array:
    """Block-sparse FFN by ``lax.ragged_dot`` grouped by unit block: the (tile, block)
    pairs are sorted by block, each tile's tokens are repeated once per kept block, and
    one grouped matmul per weight runs each block's rows against that block only.

    Same contract as ``block_sparse_ffn_gather``; no weight copies (token copies
    instead). Slow where XLA has no native ragged dot (on CPU it is lowered densely).

    Example:

        >>> import jax.numpy as jnp, numpy as np
        >>> from sparsejax.kernels.sparse_ffn.api import block_sparse_ffn_ragged
        >>> from sparsejax.kernels.sparse_ffn.reference import block_sparse_ffn_reference
        >>> rng = np.random.default_rng(0)
        >>> x, w_up, w_down = (jnp.asarray(rng.normal(size=s), jnp.float32)
        ...                    for s in [(8, 16), (16, 64), (64, 16)])
        >>> sel = jnp.array([[0, 3], [2, 1]])            # 2 tiles of 4 tokens, 2 of 4 blocks each
        >>> cfg = dict(activation='relu', block_units=16, tile_tokens=4)
        >>> y = block_sparse_ffn_ragged(x, w_up, w_down, sel, **cfg)
        >>> float(jnp.abs(y - block_sparse_ffn_reference(x, w_up, w_down, sel, **cfg)).max()) < 1e-4
        True
    """
    (t, d), f = x.shape, w_up.shape[1]
    n_tiles, keep = selected.shape
    nb = f // block_units
    flat = selected.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    tiles, blocks = (jnp.arange(n_tiles * keep) // keep)[order], flat[order]
    sizes = (jnp.bincount(flat, length=nb) * tile_tokens).astype(jnp.int32)
    lhs = x.reshape(n_tiles, tile_tokens, d)[tiles].reshape(-1, d)
    h = lax.ragged_dot(lhs, w_up.reshape(d, nb, block_units).transpose(1, 0, 2), sizes)
    if b_up is not None:
        h = (h.reshape(n_tiles * keep, tile_tokens, block_units)
             + b_up.reshape(nb, block_units)[blocks][:, None]).reshape(h.shape)
    o = lax.ragged_dot(activation_fn(activation)(h), w_down.reshape(nb, block_units, -1), sizes)
    y = jnp.zeros((n_tiles, tile_tokens, o.shape[-1]), o.dtype).at[tiles].add(
        o.reshape(n_tiles * keep, tile_tokens, -1)).reshape(t, -1)
    return y if b_down is None else y + b_down


def block_sparse_ffn(x: jax.Array, w_up: jax.Array, w_down: jax.Array, *,
                     activation: str | Callable, block_units: int, tile_tokens: int,
                     keep_blocks: int, scores: jax.Array | None = None,
                     b_up: jax.Array | None = None, b_down: jax.Array | None = None,
                     implementation: str | None = None) -> jax.Array:
    """Block-granular sparse FFN for training: each tile of ``tile_tokens`` tokens keeps
    its ``keep_blocks`` best blocks of ``block_units`` FFN units, and

        y_tile = act(x_tile W_up[:, kept] + b_up[kept]) W_down[kept, :] + b_down.

    ``scores [T/tile_tokens, F/block_units]`` rank the blocks (higher kept); None uses
    ``reference.block_scores``: ``Σ_{tile, block} |act(x W_up + b_up)|`` (exact; one extra
    dense up-projection forward, no backward; pass ``block_scores(..., dims=r)`` for a
    cheaper predictor). Selection carries no gradient; outputs and gradients equal the
    dense masked FFN ``reference.block_sparse_ffn_reference``. ``x [..., d]`` (leading
    dims flattened into tokens, in order) → ``[..., d_out]``. ``implementation``: None /
    'gather' (gather + batched matmul; fastest on CPU), 'ragged' (``lax.ragged_dot``),
    'masked' (dense masked reference). ``keep_blocks = F/block_units`` is the dense FFN.

    Example:

        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from sparsejax.kernels.sparse_ffn.api import block_sparse_ffn
        >>> rng = np.random.default_rng(0)
        >>> x, w_up, w_down = (jnp.asarray(rng.normal(size=s), jnp.float32)
        ...                    for s in [(2, 4, 16), (16, 64), (64, 16)])
        >>> cfg = dict(activation='gelu', block_units=16, tile_tokens=4, keep_blocks=2)
        >>> y = block_sparse_ffn(x, w_up, w_down, **cfg)
        >>> y.shape
        (2, 4, 16)
        >>> grad = lambda impl: jax.grad(lambda x: block_sparse_ffn(
        ...     x, w_up, w_down, **cfg, implementation=impl).sum())(x)
        >>> float(jnp.abs(grad('gather') - grad('masked')).max()) < 1e-4
        True
        >>> full = block_sparse_ffn(x, w_up, w_down, **{**cfg, 'keep_blocks': 4})   # all blocks
        >>> float(jnp.abs(full - jax.nn.gelu(x @ w_up) @ w_down).max()) < 1e-4
        True
    """
    _check_train(x, w_up, w_down, block_units, tile_tokens, keep_blocks, scores)
    impl = "gather" if implementation is None else implementation
    if impl not in TRAIN_IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {implementation!r}; use one of "
                         f"{TRAIN_IMPLEMENTATIONS} or None")
    return _block_sparse(x, w_up, w_down, scores, b_up, b_down, activation=activation,
                         block_units=block_units, tile_tokens=tile_tokens,
                         keep_blocks=keep_blocks, impl=impl)


@functools.partial(jax.jit, static_argnames=(*_TRAIN_STATIC, "keep_blocks", "impl"))
def _block_sparse(x, w_up, w_down, scores, b_up, b_down, *, activation, block_units,
                  tile_tokens, keep_blocks, impl):
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1])
    if scores is None:
        scores = block_scores(xf, w_up, b_up, activation=activation, block_units=block_units,
                              tile_tokens=tile_tokens)
    selected = select_blocks(scores, keep_blocks)
    fn = {"gather": block_sparse_ffn_gather, "ragged": block_sparse_ffn_ragged,
          "masked": block_sparse_ffn_reference}[impl]
    y = fn(xf, w_up, w_down, selected, activation=activation, block_units=block_units,
           tile_tokens=tile_tokens, b_up=b_up, b_down=b_down)
    return y.reshape(*lead, w_down.shape[1])
