"""Pure-jnp definitions of the activation-sparse FFN ops (the answers the kernels must give).

Decode (batch 1..8), after unit selection, is a **gather-GEMV**. Row ``b`` keeps up to
``k`` FFN units ``idx[b, :]`` (``-1`` = padding) with coefficients ``coef[b, :]``:

    y[b] = Σ_i coef[b,i] · (x2[b] · w_in[idx[b,i], :]  if w_in is given else 1)
                         · w_out[idx[b,i], :]

``w_in`` is **unit-major** ``[F, d2]`` (a unit's input weights are one contiguous row;
``api.unit_major`` converts an ``nnx.Linear`` kernel ``[d2, F]``), ``w_out`` is ``[F,
d_out]``. Spark FFN (You et al. 2025) is ``coef = GELU(STopk(K1ᵀq1))``, ``w_in = K2ᵀ``,
``w_out = V``; a top-k FFN (Li et al. 2023) is ``coef = top-k of act(x W_up)``, no
``w_in``, ``w_out = W_down``. The reference scatters ``(idx, coef)`` back to a dense
``[B, F]`` matrix and runs the dense FFN on it; a unit listed twice counts twice.

Training (block-granular): units are grouped in blocks of ``block_units``, tokens in tiles
of ``tile_tokens``; every tile keeps ``keep_blocks`` unit blocks, and

    y = (act(x W_up + b_up) ⊙ M) W_down + b_down,   M[t, j] = [block(j) kept by tile(t)].

Example:

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from sparsejax.kernels.sparse_ffn.reference import (
    ...     block_scores, block_sparse_ffn_reference, dropped_units, select_blocks,
    ...     sparse_ffn_decode_reference, topk_indices)
    >>> rng = np.random.default_rng(0)
    >>> x, w_up, w_down = (jnp.asarray(rng.normal(size=s), jnp.float32)
    ...                    for s in [(4, 8), (8, 32), (32, 8)])
    >>> h_sparse = jax.nn.relu(x @ w_up)
    >>> idx, coef = topk_indices(h_sparse, k=24)                  # [4, 24] each
    >>> dropped_units(h_sparse, 24).tolist()                      # every nonzero fits
    [0, 0, 0, 0]
    >>> y = sparse_ffn_decode_reference(None, None, w_down, idx, coef)
    >>> float(jnp.abs(y - h_sparse @ w_down).max()) < 1e-4
    True
    >>> sel = select_blocks(block_scores(x, w_up, activation='relu', block_units=8,
    ...                                  tile_tokens=2), 2)
    >>> sel.tolist()                      # per tile of 2 tokens, 2 of the 4 unit blocks
    [[2, 3], [1, 0]]
    >>> y_train = block_sparse_ffn_reference(x, w_up, w_down, sel, activation='relu',
    ...                                      block_units=8, tile_tokens=2)
    >>> y_train.shape
    (4, 8)
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from sparsejax.activations import activation_fn


# ----------------------------------------------------------------------------- helpers


@functools.partial(jax.jit, static_argnames="num_units")
def dense_coefficients(idx: jax.Array, coef: jax.Array, num_units: int) -> jax.Array:
    """Scatters ``(idx, coef)`` ``[B, k]`` back to a dense ``[B, F]`` activation.

    Padding entries (``idx < 0``) are dropped, an index ``>= F`` gives a NaN row
    (``clean_indices``); a unit listed twice gets the sum of its coefficients. The
    inverse of ``topk_indices`` when nothing overflowed.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.sparse_ffn.reference import dense_coefficients
        >>> dense_coefficients(jnp.array([[2, -1]]), jnp.array([[5., 9.]]), 4).tolist()
        [[0.0, 0.0, 5.0, 0.0]]
        >>> dense_coefficients(jnp.array([[2, 2]]), jnp.array([[5., 9.]]), 4).tolist()
        [[0.0, 0.0, 14.0, 0.0]]
    """
    safe, coef = clean_indices(idx, coef, num_units)
    rows = jnp.broadcast_to(jnp.arange(safe.shape[0])[:, None], safe.shape)
    return jnp.zeros((safe.shape[0], num_units), coef.dtype).at[rows, safe].add(coef)


def clean_indices(idx: jax.Array, coef: jax.Array, num_units: int
                  ) -> tuple[jax.Array, jax.Array]:
    """Makes ``(idx, coef)`` safe to gather with: padding (``idx < 0``) becomes unit 0
    with coefficient 0; an index ``>= num_units`` (an error that cannot be raised under
    ``jit``) becomes unit 0 with coefficient NaN, so its row of the output is NaN.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.sparse_ffn.reference import clean_indices
        >>> idx, coef = clean_indices(jnp.array([[3, -1, 9]]), jnp.ones((1, 3)), 4)
        >>> idx.tolist(), coef.tolist()
        ([[3, 0, 0]], [[1.0, 0.0, nan]])
    """
    idx = jnp.asarray(idx)
    coef = jnp.asarray(coef)
    pad, bad = idx < 0, idx >= num_units
    safe = jnp.where(pad | bad, 0, idx).astype(jnp.int32)
    coef = jnp.where(pad, jnp.zeros((), coef.dtype), coef)
    return safe, jnp.where(bad, jnp.full((), jnp.nan, coef.dtype), coef)


# ----------------------------------------------------------------------------- selection


@functools.partial(jax.jit, static_argnames="k")
def topk_indices(a: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The (at most) ``k`` largest-``|value|`` nonzero units of each row of ``a [B, F]``.

    Returns ``idx [B, k]`` int32 (descending ``|value|``, ties to the lower index) and
    ``coef [B, k]`` = ``a`` at those units. Slots whose value is 0 become padding:
    ``idx = -1``, ``coef = 0``. Rows with more than ``k`` nonzeros (a statistical
    threshold can keep more than its capacity) keep their ``k`` largest ``|value|``;
    ``dropped_units`` counts the rest. Uses ``lax.top_k`` (a full sort on GPU).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.sparse_ffn.reference import topk_indices
        >>> idx, coef = topk_indices(jnp.array([[0., 3., -5., 0.]]), 3)
        >>> idx.tolist(), coef.tolist()
        ([[2, 1, -1]], [[-5.0, 3.0, 0.0]])
    """
    a = jnp.asarray(a)
    _, idx = lax.top_k(jnp.abs(a), k)
    coef = jnp.take_along_axis(a, idx, axis=-1)
    keep = coef != 0
    return jnp.where(keep, idx, -1).astype(jnp.int32), jnp.where(keep, coef, 0)


@functools.partial(jax.jit, static_argnames="k")
def nonzero_indices(a: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The first ``k`` nonzero units of each row of ``a [B, F]`` in unit order; no sort.

    A prefix sum of the nonzero mask gives each nonzero its slot (about ``3F`` operations
    per row instead of a sort). Slots past a row's count are padding (``idx = -1``,
    ``coef = 0``). A row with more than ``k`` nonzeros keeps its ``k`` LOWEST-index
    nonzeros (not the largest: use ``topk_indices`` for that); ``dropped_units`` counts
    the rest. Same output set as ``topk_indices`` whenever nothing overflows.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.sparse_ffn.reference import nonzero_indices
        >>> idx, coef = nonzero_indices(jnp.array([[0., 3., -5., 0.]]), 3)
        >>> idx.tolist(), coef.tolist()
        ([[1, 2, -1]], [[3.0, -5.0, 0.0]])
    """
    a = jnp.asarray(a)
    b, f = a.shape
    nz = a != 0
    slot = jnp.cumsum(nz, axis=-1) - 1
    slot = jnp.where(nz & (slot < k), slot, k)                 # k = a dump slot
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, f))
    units = jnp.broadcast_to(jnp.arange(f, dtype=jnp.int32), (b, f))
    idx = jnp.full((b, k + 1), -1, jnp.int32).at[rows, slot].set(units, mode="drop")
    coef = jnp.zeros((b, k + 1), a.dtype).at[rows, slot].set(a, mode="drop")
    return idx[:, :k], jnp.where(idx[:, :k] >= 0, coef[:, :k], 0)


def dropped_units(a: jax.Array, k: int) -> jax.Array:
    """Per row of ``a [B, F]``: how many nonzeros do not fit a capacity of ``k``.

    ``max(0, nnz(a[b]) − k)``; nonzero means a statistical threshold kept more units
    than the decode capacity ``k_max`` (raise ``k_max`` or lower the density).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.sparse_ffn.reference import dropped_units
        >>> dropped_units(jnp.array([[1., 2., 0., 3.]]), 2).tolist()
        [1]
    """
    return jnp.maximum(jnp.sum(jnp.asarray(a) != 0, axis=-1) - k, 0)


# ----------------------------------------------------------------------------- decode


@jax.jit
def sparse_ffn_decode_reference(x2: jax.Array | None, w_in: jax.Array | None,
                                w_out: jax.Array, idx: jax.Array, coef: jax.Array) -> jax.Array:
    """Dense definition of the gather-GEMV (module docstring), in float32.

    ``x2 [B, d2]`` and unit-major ``w_in [F, d2]`` (both or neither), ``w_out [F, d_out]``,
    ``idx [B, k]`` (``-1`` = padding), ``coef [B, k]``. Computes
    ``((A ⊙ (x2 w_inᵀ)) w_out)`` with ``A = dense_coefficients(idx, coef, F)``; the
    result has the promoted dtype of the inputs.

    Example:

        >>> import jax.numpy as jnp, numpy as np
        >>> from sparsejax.kernels.sparse_ffn.reference import sparse_ffn_decode_reference
        >>> rng = np.random.default_rng(0)
        >>> x2, k2_t, v = (rng.normal(size=s).astype(np.float32)
        ...                for s in [(2, 8), (16, 8), (16, 4)])
        >>> idx = jnp.array([[3, 7, -1], [0, 0, 5]])          # row 1 lists unit 0 twice
        >>> coef = jnp.array([[1., 2., 9.], [1., 1., -1.]])
        >>> y = sparse_ffn_decode_reference(x2, k2_t, v, idx, coef)     # [B, d_out]
        >>> want = np.stack([(x2[0] @ k2_t[3]) * v[3] + 2 * (x2[0] @ k2_t[7]) * v[7],
        ...                  2 * (x2[1] @ k2_t[0]) * v[0] - (x2[1] @ k2_t[5]) * v[5]])
        >>> y.shape, float(np.abs(y - want).max()) < 1e-4
        ((2, 4), True)
    """
    dtype = jnp.result_type(*[t for t in (x2, w_in, w_out, coef) if t is not None])
    hp = lax.Precision.HIGHEST
    a = dense_coefficients(idx, jnp.asarray(coef, jnp.float32), w_out.shape[0])
    if w_in is not None:
        a = a * jnp.matmul(x2.astype(jnp.float32), w_in.astype(jnp.float32).T, precision=hp)
    return jnp.matmul(a, w_out.astype(jnp.float32), precision=hp).astype(dtype)


# ----------------------------------------------------------------------------- training


@functools.partial(jax.jit, static_argnames=("activation", "block_units", "tile_tokens",
                                             "dims"))
def block_scores(x: jax.Array, w_up: jax.Array, b_up: jax.Array | None = None, *,
                 activation: str | Callable, block_units: int, tile_tokens: int,
                 dims: int | None = None) -> jax.Array:
    """Score of each (token tile, unit block): ``Σ_{t ∈ tile, j ∈ block} |act(z_tj)|``.

    ``z = x W_up + b_up`` over all input dims (``dims=None``: exact, costs one dense
    up-projection forward), or the cheap predictor ``z = x[:, :dims] W_up[:dims] + b_up``
    (Spark's first-``r``-dims predictor; ``dims = d/2`` halves the cost). Returned with
    ``stop_gradient``: selection is a constant for the backward pass. ``x [T, d]`` →
    ``[T / tile_tokens, F / block_units]`` float32.

    Example:

        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from sparsejax.kernels.sparse_ffn.reference import block_scores
        >>> rng = np.random.default_rng(0)
        >>> x, w_up = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(4, 8), (8, 32)])
        >>> s = block_scores(x, w_up, activation='relu', block_units=8, tile_tokens=2)
        >>> s.shape, float(jnp.abs(s.sum() - jax.nn.relu(x @ w_up).sum())) < 1e-3
        ((2, 4), True)
    """
    t, f = x.shape[0], w_up.shape[1]
    if dims is not None:
        x, w_up = x[:, :dims], w_up[:dims]
    z = jnp.matmul(x, w_up, preferred_element_type=jnp.float32)
    if b_up is not None:
        z = z + b_up.astype(jnp.float32)
    a = jnp.abs(activation_fn(activation)(z))
    s = a.reshape(t // tile_tokens, tile_tokens, f // block_units, block_units).sum((1, 3))
    return lax.stop_gradient(s)


@functools.partial(jax.jit, static_argnames="keep_blocks")
def select_blocks(scores: jax.Array, keep_blocks: int) -> jax.Array:
    """The ``keep_blocks`` highest-scoring unit blocks of each token tile, ``[n_tiles,
    keep_blocks]`` int32 (descending score, ties to the lower block).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.sparse_ffn.reference import select_blocks
        >>> select_blocks(jnp.array([[1., 5., 3.]]), 2).tolist()
        [[1, 2]]
    """
    return lax.top_k(lax.stop_gradient(scores), keep_blocks)[1].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_blocks", "block_units", "tile_tokens"))
def block_mask(selected: jax.Array, num_blocks: int, block_units: int,
               tile_tokens: int) -> jax.Array:
    """Expands per-tile block lists ``[n_tiles, keep]`` to a token × unit mask ``[T, F]``.

    ``M[t, j] = 1`` iff block ``j // block_units`` is in ``selected[t // tile_tokens]``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.sparse_ffn.reference import block_mask
        >>> block_mask(jnp.array([[1]]), 2, 2, 1).tolist()
        [[False, False, True, True]]
    """
    n_tiles = selected.shape[0]
    m = jnp.zeros((n_tiles, num_blocks), bool).at[jnp.arange(n_tiles)[:, None], selected].set(True)
    return jnp.repeat(jnp.repeat(m, tile_tokens, axis=0), block_units, axis=1)


@functools.partial(jax.jit, static_argnames=("activation", "block_units", "tile_tokens"))
def block_sparse_ffn_reference(x: jax.Array, w_up: jax.Array, w_down: jax.Array,
                               selected: jax.Array, *, activation: str | Callable,
                               block_units: int, tile_tokens: int,
                               b_up: jax.Array | None = None,
                               b_down: jax.Array | None = None) -> jax.Array:
    """Dense masked FFN: ``(act(x W_up + b_up) ⊙ M) W_down + b_down`` with ``M =
    block_mask(selected, ...)``; ``x [T, d]``, ``selected [T / tile_tokens, keep]``.
    Differentiable in ``x`` and the weights (the mask is a constant).

    Example:

        >>> import jax, jax.numpy as jnp, numpy as np
        >>> from sparsejax.kernels.sparse_ffn.reference import block_sparse_ffn_reference
        >>> rng = np.random.default_rng(0)
        >>> x, w_up, w_down = (jnp.asarray(rng.normal(size=s), jnp.float32)
        ...                    for s in [(4, 8), (8, 8), (8, 3)])
        >>> sel = jnp.array([[1, 3]])             # one tile of 4 tokens keeps blocks 1 and 3
        >>> y = block_sparse_ffn_reference(x, w_up, w_down, sel, activation='relu',
        ...                                block_units=2, tile_tokens=4)
        >>> kept = jnp.array([0, 0, 1, 1, 0, 0, 1, 1])
        >>> float(jnp.abs(y - (jax.nn.relu(x @ w_up) * kept) @ w_down).max()) < 1e-5
        True
    """
    z = x @ w_up
    if b_up is not None:
        z = z + b_up
    m = block_mask(selected, w_up.shape[1] // block_units, block_units, tile_tokens)
    y = jnp.where(m, activation_fn(activation)(z), 0) @ w_down
    return y if b_down is None else y + b_down
