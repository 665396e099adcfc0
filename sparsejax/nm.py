"""N:M sparsity with STE, SR-STE and progressive gradient flow (MDGF, SDGF).

Masks are recomputed from ``|w|`` at every forward pass, as the reference code does: the
weight tensor is cut into groups of ``M`` consecutive entries along ``axis`` (default
-2: the input features of a Flax ``Linear`` kernel ``[in, out]``, the input channels of
a ``Conv`` kernel ``[h, w, in, out]``) and the ``N`` largest magnitudes of each group
are kept (ties to the lower index).

Forward and backward (``w`` dense weights, ``m`` the N:M mask, ``g`` the incoming
gradient of the forward weights):

- STE (Bengio et al. 2013): forward ``w ⊙ m``, backward ``g``.
- SR-STE (Zhou et al. 2021): forward ``w ⊙ m``, backward ``g + λ_w (1 − m) ⊙ w``,
  ``λ_w = 2e-4``.
- MDGF (Bambhaniya et al. 2024): forward ``w ⊙ (m + (1 − m) β(t))`` with
  ``β(t) = max(0, 1 − α t)`` (linear) or ``exp(−α t)`` (exponential), ``t`` counting
  optimizer steps after the dense phase. Backward: ``'ste'`` passes ``g`` unchanged as the
  authors' code does; ``'scaled'`` is the exact gradient ``g ⊙ (m + (1 − m) β(t))``.
- SDGF (Bambhaniya et al. 2024): the sparse phase is split into equal frames and the
  pattern tightens at each boundary: stepwise ``(M−1):M → M/2:M → M/4:M → … → N:M`` or
  geometric ``8N:8M → 4N:4M → 2N:2M → N:M`` (same ratio, narrower groups).

Phases: an optional dense warm-up (``dense_steps``), the sparse phase, and an optional
final fine-tune (``finetune_steps``) with a binary mask (β = 0, fixed final pattern).

Path rules pick the pattern per parameter: ``'2:4'``-style strings (or ``(2, 4)``)
for N:M, a float for unstructured magnitude sparsity recomputed the same way, and
``'dense'``/``None``.

Example:

    >>> import jax, jax.numpy as jnp
    >>> import optax, sparsejax
    >>> params = {'mlp': {'kernel': jnp.arange(1., 17.).reshape(8, 2)}}
    >>> tx = sparsejax.mdgf(optax.adamw(1e-3), rules=[(r'.*mlp/.*kernel', '1:8')],
    ...                     decay='exp', alpha=0.5)
    >>> state = tx.init(params)
    >>> state.masks['mlp']['kernel'].T.astype(int).tolist()   # 1 of every 8 along 'in'
    [[0, 0, 0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, 0, 1]]
    >>> zero = jax.tree.map(jnp.zeros_like, params)
    >>> for _ in range(2):
    ...     _, state = tx.update(zero, state, params)
    >>> round(float(state.beta), 4)                     # β(2) = exp(-0.5 · 2)
    0.3679
    >>> fwd = tx.forward(params, state)   # w ⊙ (m + (1−m) β(t)), gradient per `backward`
    >>> [round(v, 2) for v in fwd['mlp']['kernel'][:, 0].tolist()]
    [0.37, 1.1, 1.84, 2.58, 3.31, 4.05, 4.78, 15.0]
"""

from __future__ import annotations

import inspect

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.base import (SparseTransformation, check_grads, check_inner_state, check_int,
                            check_static, forward)
from sparsejax.masks import (count_true, is_unowned, map_masked_by_path, topk_mask,
                             variadic_sums)
from sparsejax.paths import (SparsityRule, match_rules, named_leaves, path_str, pattern_name,
                             rules_or_default, unbox)


DECAYS = ("linear", "exp")
SCHEDULES = ("fixed", "stepwise", "geometric")
BACKWARDS = ("ste", "scaled")


# ----------------------------------------------------------------------------- masks


def _check_nm(n: int, m: int, where: str = "") -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))):
        raise ValueError(f"{where}N:M pattern needs integers, got {n!r}:{m!r}")
    if not 0 < n < m:
        raise ValueError(f"{where}N:M pattern {n}:{m} needs 0 < N < M")


def _magnitude_keys(w: jax.Array) -> jax.Array:
    """Integers ordered as ``|w|`` is by ``lax.top_k``'s total order: a float's bits with
    the sign cleared (so ``-0 = +0``, ``inf`` below every NaN, NaNs by payload); ``|w|``
    itself for integer weights."""
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        return jnp.abs(w)
    bits = jnp.dtype(f"int{8 * w.dtype.itemsize}")
    return jax.lax.bitcast_convert_type(w, bits) & jnp.iinfo(bits).max


def _group_keep(keys: jax.Array, n: int, m: int, ga: int) -> jax.Array:
    """``rank < n`` along axis ``ga`` (of size ``m``) of ``keys``, ``rank_i = #{j : k_j > k_i
    or (k_j = k_i and j < i)}``: a permutation of ``0..m-1`` in each group, so exactly
    ``n`` entries are kept. No sort: for ``min(n, m−n) ≤ m/16`` (N:M with a large M and a
    small N, or its complement) ``n`` rounds of "first maximum among those not kept yet"
    (``m−n`` rounds of "last minimum among those not dropped yet"), two reductions over
    the group each; otherwise the rank itself, unrolled over ``j`` so that one fused pass
    adds up the comparisons without building the ``[.., m, m, ..]`` tensor."""
    idx = jax.lax.broadcasted_iota(jnp.int32, keys.shape, ga)
    if min(n, m - n) * 16 <= m:
        info = jnp.iinfo(keys.dtype)
        keep = n * 16 <= m
        taken = jnp.zeros(keys.shape, jnp.bool_)
        for _ in range(n if keep else m - n):
            if keep:   # the highest-ranked one left: largest key, lowest index among equals
                top = jnp.max(jnp.where(taken, info.min, keys), axis=ga, keepdims=True)
                at = jnp.min(jnp.where(~taken & (keys == top), idx, m), axis=ga, keepdims=True)
            else:      # the lowest-ranked one left: smallest key, highest index among equals
                low = jnp.min(jnp.where(taken, info.max, keys), axis=ga, keepdims=True)
                at = jnp.max(jnp.where(~taken & (keys == low), idx, -1), axis=ga, keepdims=True)
            taken = taken | (idx == at)
        return taken if keep else ~taken
    return _group_rank(keys, m, ga) < n


@functools.partial(jax.jit, static_argnums=(1, 2))
def _group_rank(keys: jax.Array, m: int, ga: int) -> jax.Array:
    """``rank_i`` along axis ``ga`` (size ``m``), added up over ``j`` unrolled. Its own jit
    (inlined by XLA) so that the masks of several ``n`` share one traced rank."""
    idx = jax.lax.broadcasted_iota(jnp.int32, keys.shape, ga)
    rank = jnp.zeros(keys.shape, jnp.int32)
    for j in range(m):
        kj = jax.lax.index_in_dim(keys, j, ga, keepdims=True)
        rank = rank + jnp.where(j < idx, kj >= keys, kj > keys).astype(jnp.int32)
    return rank


def nm_mask(w: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
    """Boolean mask keeping the ``n`` largest ``|w|`` of every ``m`` consecutive entries
    along ``axis`` (ties to the lower index).

    For the magnitudes ``a_0 … a_{M−1}`` of one group the mask is

        rank_i = #{j : a_j > a_i  or  (a_j = a_i  and  j < i)},    keep_i = rank_i < N,

    computed from comparisons within the group (no sort, no ``lax.top_k``); the same mask
    as ``lax.top_k`` of the group's ``|w|``. NaN counts as larger than every number
    (``top_k``'s order; NaNs among themselves by bit pattern), so a group keeps its NaNs
    first and a diverged weight shows up in the mask instead of being pruned silently.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nm import nm_mask
        >>> w = jnp.array([[4., 1.], [2., 3.], [0., 9.], [5., 5.]])
        >>> nm_mask(w, 1, 2, axis=0).tolist()   # 1 of each pair of rows, per column
        [[True, False], [False, True], [False, True], [True, False]]
        >>> a = jnp.array([3., -7., 3., 0.])      # ranks 1, 0, 2, 3: the tie 3 = 3 to index 0
        >>> nm_mask(a, 2, 4, axis=0).tolist()
        [True, True, False, False]
    """
    _check_nm(n, m)
    axis = axis % w.ndim
    if w.shape[axis] % m:
        raise ValueError(f"N:M {n}:{m}: axis {axis} of size {w.shape[axis]} is not "
                         f"divisible by M={m}")
    keys = _magnitude_keys(w)
    groups = keys.reshape(*w.shape[:axis], w.shape[axis] // m, m, *w.shape[axis + 1:])
    return _group_keep(groups, n, m, axis + 1).reshape(w.shape)


def stepwise_frames(n: int, m: int) -> list[tuple[int, int]]:
    """SDGF stepwise patterns ``(M−1):M, M/2:M, M/4:M, …, N:M``.

    Example:

        >>> from sparsejax.nm import stepwise_frames
        >>> stepwise_frames(1, 8)
        [(7, 8), (4, 8), (2, 8), (1, 8)]
    """
    _check_nm(n, m)
    frames, k = [m - 1], m // 2
    while k > n:
        frames.append(k)
        k //= 2
    if frames[-1] != n:
        frames.append(n)
    return [(k, m) for k in frames]


def geometric_frames(n: int, m: int) -> list[tuple[int, int]]:
    """SDGF geometric patterns ``8N:8M → 4N:4M → 2N:2M → N:M``.

    Example:

        >>> from sparsejax.nm import geometric_frames
        >>> geometric_frames(1, 4)
        [(8, 32), (4, 16), (2, 8), (1, 4)]
    """
    _check_nm(n, m)
    return [(f * n, f * m) for f in (8, 4, 2, 1)]


def frame_length(sparse_steps: int, n_frames: int) -> int:
    """SDGF's frame length: the sparse phase split into ``n_frames`` equal frames (the last
    frame also holds the remainder); frame ``k`` starts at sparse step ``k · length``.

    Example:

        >>> from sparsejax.nm import frame_length
        >>> frame_length(1000, 4), frame_length(1001, 4), frame_length(3, 4)
        (250, 250, 1)
    """
    return max(sparse_steps // n_frames, 1)


def nm_rules_like(rules):
    """Rules that put the transform's ``pattern`` wherever ``rules`` make a leaf sparse
    (``'sparse'`` or a sparsity) and keep ``'dense'``/None leaves dense: unstructured
    rules read as N:M ones. ``None`` stays None (the default rules).

    Example:

        >>> from sparsejax.nm import nm_rules_like
        >>> nm_rules_like([('head/kernel', 'dense'), ('.*kernel', 0.9)])
        [('head/kernel', 'dense'), ('.*kernel', 'sparse')]
    """
    if rules is None:
        return None
    return [(pattern, "dense" if spec in (None, "dense") else "sparse") for pattern, spec in rules]


def decay_beta(t, decay: str, alpha: float):
    """MDGF's ``β(t)``: ``max(0, 1 − α t)`` ('linear') or ``exp(−α t)`` ('exp').

    Example:

        >>> from sparsejax.nm import decay_beta
        >>> round(float(decay_beta(1000, 'exp', 2e-4)), 4)      # exp(-0.2)
        0.8187
        >>> [round(float(decay_beta(t, 'linear', 2e-4)), 4) for t in (1000, 9000)]
        [0.8, 0.0]
    """
    t = jnp.asarray(t, jnp.float32)
    if decay == "linear":
        return jnp.maximum(0.0, 1.0 - alpha * t)
    if decay == "exp":
        return jnp.exp(-alpha * t)
    raise ValueError(f"unknown decay {decay!r}; known: {DECAYS}")


# ----------------------------------------------------------------------------- forward


def _nm_weights_fwd_impl(w, m, beta):
    return jnp.where(m, w, w * beta.astype(w.dtype))


@jax.custom_vjp
def _nm_weights(w, m, beta, lam, scaled):
    return _nm_weights_fwd_impl(w, m, beta)


def _nm_weights_fwd(w, m, beta, lam, scaled):
    return _nm_weights_fwd_impl(w, m, beta), (w, m, beta, lam, scaled)


def _nm_weights_bwd(res, g):
    w, m, beta, lam, scaled = res
    keep = m.astype(g.dtype)
    g = jnp.where(scaled, g * (keep + (1 - keep) * beta.astype(g.dtype)), g)
    g = g + lam.astype(g.dtype) * (1 - keep) * w  # SR-STE's decay of pruned weights
    zero = lambda x: np.zeros(x.shape, jax.dtypes.float0) if x.dtype == bool else jnp.zeros_like(x)  # noqa: E731
    return g, zero(m), jnp.zeros_like(beta), jnp.zeros_like(lam), zero(scaled)


_nm_weights.defvjp(_nm_weights_fwd, _nm_weights_bwd)


def nm_weights(w: jax.Array, mask: jax.Array, beta=0.0, sr_ste_lambda=0.0,
               scaled_backward: bool = False) -> jax.Array:
    """``w ⊙ (m + (1−m) β)`` with the STE-family backward described in the module doc.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.nm import nm_mask, nm_weights
        >>> w = jnp.array([[1., -2.], [3., 0.5], [-4., 1.], [2., -3.]])
        >>> m = nm_mask(w, 2, 4)
        >>> nm_weights(w, m).tolist()
        [[0.0, -2.0], [3.0, 0.0], [-4.0, 0.0], [0.0, -3.0]]
        >>> loss = lambda w: jnp.sum(nm_weights(w, m, sr_ste_lambda=0.5))   # dL/dŵ = 1
        >>> jax.grad(loss)(w).tolist()                       # 1 + 0.5 (1 − m) ⊙ w
        [[1.5, 1.0], [1.0, 1.25], [1.0, 1.5], [2.0, 1.0]]
    """
    return _nm_weights(w, mask, jnp.asarray(beta, jnp.float32),
                       jnp.asarray(sr_ste_lambda, jnp.float32),
                       jnp.asarray(scaled_backward, jnp.bool_))


# ----------------------------------------------------------------------------- rules


class LeafSpec(NamedTuple):
    """How one parameter is sparsified: N:M (``n``, ``m``, ``axis``) or unstructured
    (``sparsity``)."""

    path: str
    n: int = 0
    m: int = 0
    axis: int = -2
    sparsity: float = 0.0


def parse_pattern(spec, where: str = "") -> tuple[int, int]:
    """``(N, M)`` from ``'N:M'`` or ``(N, M)``, checked (``0 < N < M``).

    Example:

        >>> from sparsejax.nm import parse_pattern
        >>> parse_pattern('2:4'), parse_pattern((1, 8))
        ((2, 4), (1, 8))
    """
    if isinstance(spec, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec)
        if not match:
            raise ValueError(f"{where}unknown spec {spec!r}; use 'N:M', a sparsity, 'sparse' "
                             "(the transform's pattern) or 'dense'")
        n, m = int(match.group(1)), int(match.group(2))
    else:
        n, m = (int(x) for x in spec)
    _check_nm(n, m, where)
    return n, m


def _parse(path: str, pattern, spec, shape, axis: int, default: str) -> LeafSpec | None:
    if spec is None or spec == "dense":
        return None
    where = f"rule {pattern_name(pattern)} on parameter {path!r}: "
    if spec == "sparse":
        spec = default
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not 0.0 <= float(spec) < 1.0:
            raise ValueError(f"{where}sparsity {spec} is outside [0, 1)")
        return LeafSpec(path, sparsity=float(spec), axis=axis)
    n, m = parse_pattern(spec, where)
    if len(shape) == 0:
        raise ValueError(f"{where}scalar parameter cannot hold an N:M pattern")
    ax = axis % len(shape)
    if shape[ax] % m:
        raise ValueError(f"{where}axis {ax} of shape {tuple(shape)} has size {shape[ax]}, "
                         f"not divisible by M={m}")
    return LeafSpec(path, n=n, m=m, axis=axis)


def resolve_nm_rules(params, rules: Sequence[SparsityRule] | None = None, axis: int = -2,
                     pattern: str = "2:4") -> dict[str, LeafSpec]:
    """``{path: LeafSpec}`` for every sparse parameter. Rules are ``sparsejax.paths`` rules
    (regex or predicate; first match wins; ``None`` means ``paths.DEFAULT_RULES``) whose
    spec is ``'N:M'``, a float sparsity, ``'sparse'`` (meaning ``pattern``) or ``'dense'``.
    A rule that matches nothing, N ≥ M, or an axis M does not divide is an error naming
    the path.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nm import resolve_nm_rules
        >>> params = {'mlp': {'kernel': jnp.ones((8, 4)), 'bias': jnp.zeros(4)},
        ...           'head': {'kernel': jnp.ones((4, 2))}}
        >>> resolve_nm_rules(params, [(r'.*mlp/.*kernel', '2:4'), (r'head/kernel', 0.5)])
        {'head/kernel': LeafSpec(path='head/kernel', n=0, m=0, axis=-2, sparsity=0.5),
         'mlp/kernel': LeafSpec(path='mlp/kernel', n=2, m=4, axis=-2, sparsity=0.0)}
    """
    out = {}
    for path, leaf, pat, spec in match_rules(params, rules_or_default(rules, params, "N:M"),
                                             "N:M"):
        parsed = None if pat is None else _parse(path, pat, spec, np.shape(leaf), axis, pattern)
        if parsed is not None:
            out[path] = parsed
    return out


# ----------------------------------------------------------------------------- transform


class NMState(NamedTuple):
    """State of an N:M transform; everything its forward pass needs, as arrays.

    ``inner``: the wrapped optimizer's state; ``masks``: the N:M masks of the parameters
    as they are after the last update (bool; ``None`` for dense leaves,
    ``optax.MaskedNode`` for leaves a wrapper gives to another transform); ``count``:
    optimizer steps so far (``t``); ``beta``: MDGF's ``β(t)`` (0 outside MDGF and in the
    fine-tune phase); ``sr_ste_lambda`` and ``scaled_backward``: the backward's
    settings; ``diagnostics``: scalars (mask flip rate, norm and variance of the gradient
    on pruned weights) measured on every ``diagnostics_every``-th update and held between
    measurements; the training loop logs them.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> params = {'kernel': jnp.array([[1.], [2.], [3.], [4.]])}
        >>> tx = sparsejax.nm_ste(optax.sgd(0.1), [(r'kernel', '2:4')])
        >>> state = tx.init(params)
        >>> state.masks['kernel'][:, 0].tolist()
        [False, False, True, True]
        >>> grads = {'kernel': jnp.array([[-30.], [0.], [0.], [0.]])}   # w[0]: 1 -> 4
        >>> _, state = tx.update(grads, state, params)
        >>> state.masks['kernel'][:, 0].tolist(), int(state.count)   # tie to the lower index
        ([True, False, False, True], 1)
        >>> float(state.diagnostics['flip_rate'])            # 2 of 4 mask entries changed
        0.5
    """

    inner: Any
    masks: Any
    count: jax.Array
    beta: jax.Array
    sr_ste_lambda: jax.Array
    scaled_backward: jax.Array
    diagnostics: dict

    def sparsify(self, params, differentiable: bool = True):
        """``w ⊙ (m + (1−m) β)`` on the leaves this state owns; with ``differentiable`` the
        STE / SR-STE / MDGF backward of ``nm_weights``."""
        if differentiable:
            fn = lambda m, w: nm_weights(w, m, self.beta, self.sr_ste_lambda,  # noqa: E731
                                         self.scaled_backward)
        else:
            fn = lambda m, w: _nm_weights_fwd_impl(w, m, self.beta)  # noqa: E731
        return map_masked_by_path(fn, self.masks, params)


def _frames(spec: LeafSpec, schedule: str) -> list[tuple[int, int]]:
    if spec.sparsity or schedule == "fixed":
        return [(spec.n, spec.m)]
    return stepwise_frames(spec.n, spec.m) if schedule == "stepwise" else geometric_frames(spec.n, spec.m)


def _leaf_mask(w, spec: LeafSpec, frames: list[tuple[int, int]], frame) -> jax.Array:
    if spec.sparsity:
        return topk_mask(jnp.abs(w), round((1.0 - spec.sparsity) * w.size), method="threshold")
    if len(frames) == 1:
        return nm_mask(w, *frames[0], axis=spec.axis)
    return jax.lax.switch(frame, [lambda w, f=f: nm_mask(w, *f, axis=spec.axis) for f in frames], w)


def _masks_by_spec(params, specs: dict, leaf_mask) -> Any:
    """``leaf_mask(w, spec)`` for every parameter with a spec, ``None`` elsewhere."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for p, w in flat:
        spec = specs.get(path_str(p))
        out.append(None if spec is None else leaf_mask(w, spec))
    return jax.tree_util.tree_unflatten(treedef, out)


def nm_masks_from_params(params, rules: Sequence[SparsityRule] | None = None, axis: int = -2, pattern: str = "2:4"):
    """The masks a fixed-pattern N:M transform would use for ``params`` now: per path rule,
    ``'N:M'`` keeps the ``N`` largest ``|w|`` of every ``M`` along ``axis``, a float ``s``
    keeps the ``round((1−s)·size)`` largest ``|w|``; other leaves ``None``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nm import nm_masks_from_params
        >>> params = {'dense': {'kernel': jnp.array([[1., 8.], [-7., 2.], [3., -6.], [5., 4.]]),
        ...                     'bias': jnp.zeros(2)}}
        >>> m = nm_masks_from_params(params, [(r'.*kernel', '2:4')])
        >>> m['dense']['kernel'].tolist(), m['dense']['bias']
        ([[False, True], [True, False], [False, True], [True, False]], None)
    """
    params = unbox(params)
    specs = resolve_nm_rules(params, rules, axis, pattern)
    return _masks_by_spec(params, specs,
                          lambda w, spec: _leaf_mask(w, spec, [(spec.n, spec.m)], 0))


def _count(x) -> jax.Array:
    """``float32`` sum of a float array of small non-negative integers: float32 sums
    along the last axis (exact while a row adds up to < 2^24), then their float32 sum
    (exact below 2^24 in all, never wrapping)."""
    rows = x.reshape(-1, x.shape[-1] if x.ndim else 1)
    return jnp.sum(jnp.sum(rows, axis=-1).astype(jnp.int32).astype(jnp.float32))


def _pruned_stats(m, g, nxt):
    """``(#pruned, #flipped, Σ g, Σ g²)`` over one leaf's pruned entries (``~m``; flipped:
    ``m != nxt``), all ``float32`` (the counts exact below 2^24, never wrapping). With
    more than one device these are four all-reducing sums. On one CPU device it costs
    about one read of ``m`` and ``g``: the pruned count and the gradient sums are one
    3-operand reduction over ``F ≤ 16`` blocks of the leading axis, into which XLA fuses the ``where``/``square`` (separate reductions
    would each write their operand out first), then sums of that ``1/F``-size partial.
    The flips are counted apart (``count_true``: an integer reduction, which XLA:CPU
    vectorises, and no float copy of the flips), so that the float partial sums do not
    carry the mask computation that XLA fuses into the count."""
    gp = jnp.where(m, 0.0, g.astype(jnp.float32))
    n_flip = count_true(m != nxt, jnp.float32)
    if not variadic_sums():  # all-reducing sums: no all-gather when sharded
        return count_true(~m, jnp.float32), n_flip, jnp.sum(gp), jnp.sum(gp * gp)
    shape = m.shape if m.ndim else (1,)
    f = next(f for f in (16, 8, 4, 2, 1) if shape[0] % f == 0)
    ops = tuple(x.reshape(f, shape[0] // f, *shape[1:]) for x in
                ((~m).astype(jnp.float32), gp, gp * gp))
    part = jax.lax.reduce(ops, (np.float32(0),) * 3,
                          lambda a, b: tuple(x + y for x, y in zip(a, b)), (0,))
    if f * shape[-1] >= 2 ** 24:  # rows of the partial too long for exact float32 counts
        n_pruned = count_true(~m, jnp.float32)
    else:
        n_pruned = _count(part[0])
    return n_pruned, n_flip, jnp.sum(part[1]), jnp.sum(part[2])


def nm_sparse(inner: optax.GradientTransformation, rules: Sequence[SparsityRule] | None = None, *, pattern: str = "2:4",
              axis: int = -2, sr_ste_lambda: float = 0.0, decay: str | None = None,
              alpha: float = 2e-4, backward: str = "ste", schedule: str = "fixed",
              dense_steps: int = 0, sparse_steps: int | None = None,
              finetune_steps: int = 0, diagnostics_every: int = 16) -> SparseTransformation:
    """The general N:M transform; ``nm_ste``, ``sr_ste``, ``mdgf`` and ``sdgf`` fix its knobs.

    ``rules``: ``sparsejax.paths`` rules whose spec is ``'N:M'``, a float sparsity,
    ``'sparse'`` (meaning ``pattern``) or ``'dense'``; ``None`` makes every ≥2-D kernel
    ``pattern``. ``sparse_steps`` is the length of the sparse phase that SDGF splits into
    frames (required for 'stepwise'/'geometric'); the fine-tune phase starts at
    ``dense_steps + sparse_steps``. The diagnostics (the mask flip rate of one
    update, the norm and variance of the gradient on pruned weights) are measured on the
    updates whose ``count`` is a multiple of ``diagnostics_every`` (the first update is
    one) and held until the next measurement: a measurement reads every sparse kernel's
    gradient and both masks once more, about 13% of an adamw step of a 2048-wide MLP on
    a CPU, so every step costs 1/``diagnostics_every`` of that
    (``experiments/bench_sparsity.py``). ``diagnostics_every=1`` measures every update;
    ``0`` never (``NMState.diagnostics`` is then empty).

    The masks are those of the weights the next forward pass sees: ``init`` computes them
    from the initial weights and every ``update`` from the updated ones (``params +
    updates``), so ``sparsejax.forward(params, state)`` needs nothing but the state.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> from sparsejax.nm import nm_sparse
        >>> params = {'kernel': jnp.arange(1., 9.).reshape(4, 2), 'bias': jnp.ones(2)}
        >>> tx = nm_sparse(optax.adam(1e-3), [(r'.*kernel', '2:4')], sr_ste_lambda=2e-4)
        >>> state = tx.init(params)
        >>> round(float(state.sr_ste_lambda), 6), float(state.beta), state.masks['bias']
        (0.0002, 0.0, None)
        >>> sparsejax.forward(params, state)['kernel'].tolist()   # 2 largest of each 4
        [[0.0, 0.0], [0.0, 0.0], [5.0, 6.0], [7.0, 8.0]]
    """
    check_static(pattern=pattern, axis=axis, sr_ste_lambda=sr_ste_lambda, alpha=alpha,
                 dense_steps=dense_steps, sparse_steps=sparse_steps,
                 finetune_steps=finetune_steps)
    if isinstance(diagnostics_every, (bool, np.bool_)) or not isinstance(
            diagnostics_every, (int, np.integer)) or diagnostics_every < 0:
        raise TypeError(f"diagnostics_every must be an int >= 0 (0: no diagnostics), got "
                        f"{diagnostics_every!r}")
    parse_pattern(pattern, "pattern: ")
    if decay is not None and decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; known: {DECAYS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {SCHEDULES}")
    if backward not in BACKWARDS:
        raise ValueError(f"unknown backward {backward!r}; known: {BACKWARDS}")
    if schedule != "fixed" and not sparse_steps:
        raise ValueError(f"schedule {schedule!r} needs sparse_steps (the phase split into "
                         "frames)")
    check_int(0, dense_steps=dense_steps, finetune_steps=finetune_steps,
              **({} if sparse_steps is None else {"sparse_steps": sparse_steps}))
    for name, v in (("sr_ste_lambda", sr_ste_lambda), ("alpha", alpha)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    rules = None if rules is None else tuple(tuple(r) for r in rules)
    inner = optax.with_extra_args_support(inner)

    def plan(params):
        specs = resolve_nm_rules(params, rules, axis, pattern)
        shapes = dict(named_leaves(params))
        for spec in specs.values():
            if spec.sparsity:  # unstructured: no groups to check
                continue
            for n, m in _frames(spec, schedule):
                shape = shapes[spec.path].shape
                if shape[spec.axis % len(shape)] % m:
                    raise ValueError(f"parameter {spec.path!r}: SDGF {schedule} frame {n}:{m} "
                                     f"needs axis size {shape[spec.axis % len(shape)]} "
                                     f"divisible by {m}")
        return specs

    def phase(t):
        """(steps into the sparse phase, β, in dense warm-up) at optimizer step t."""
        t_sparse = jnp.asarray(t) - dense_steps
        beta = jnp.zeros((), jnp.float32)
        if decay is not None:
            finetune = (t_sparse >= sparse_steps) if sparse_steps is not None else False
            beta = jnp.where(finetune, 0.0, decay_beta(jnp.maximum(t_sparse, 0), decay, alpha))
        return t_sparse, beta, t_sparse < 0

    def frame_index(t_sparse, n_frames):
        length = frame_length(sparse_steps, n_frames)
        return jnp.clip(t_sparse // length, 0, n_frames - 1).astype(jnp.int32)

    def state_at(inner_state, params, t, diagnostics) -> NMState:
        """The state whose forward is the N:M weights of ``params`` at step ``t``."""
        t_sparse, beta, warm = phase(t)

        def leaf(w, spec):
            frames = _frames(spec, schedule)
            frame = frame_index(t_sparse, len(frames)) if len(frames) > 1 else 0
            return _leaf_mask(w, spec, frames, frame) | warm  # dense warm-up: all kept
        masks = _masks_by_spec(params, plan(params), leaf)
        return NMState(inner_state, masks, jnp.asarray(t, jnp.int32), beta,
                       jnp.asarray(sr_ste_lambda, jnp.float32),
                       jnp.asarray(backward == "scaled", jnp.bool_), diagnostics)

    def init(params):
        params = unbox(params)
        inner_state = inner.init(params)
        check_inner_state(inner_state, "N:M transform")
        diag = {"flip_rate": jnp.zeros(()), "pruned_grad_norm": jnp.zeros(()),
                "pruned_grad_var": jnp.zeros(())} if diagnostics_every else {}
        return state_at(inner_state, params, 0, diag)

    def update(grads, state, params=None, **extra):
        check_grads(grads, params, "N:M transforms")
        grads, params = unbox(grads), unbox(params)
        updates, inner_state = inner.update(grads, state.inner, params, **extra)
        weights = optax.apply_updates(params, updates)
        new = state_at(inner_state, weights, state.count + 1, {})
        if not diagnostics_every:
            return updates, new

        def measure(weights):  # this step's forward used state.masks; the next one, new.masks
            # recomputed here: a branch operand is materialised, and the new masks otherwise
            # fuse into their consumers (about 9% of the project loop's step on a CPU)
            nxt_masks = state_at(inner_state, weights, state.count + 1, {}).masks
            flat_m, treedef = jax.tree_util.tree_flatten(state.masks, is_leaf=is_unowned)
            live = [(m, g, nxt) for m, g, nxt in zip(flat_m, treedef.flatten_up_to(grads),
                                                     treedef.flatten_up_to(nxt_masks))
                    if not is_unowned(m)]
            size = float(max(sum(m.size for m, _, _ in live), 1))  # a Python int may pass 2^31
            stats = [_pruned_stats(m, g, nxt) for m, g, nxt in live]
            n_pruned = jnp.maximum(sum(s[0] for s in stats), 1)
            total = sum(s[2] for s in stats)
            sq = sum(s[3] for s in stats)
            return {"flip_rate": sum(s[1] for s in stats) / size,
                    "pruned_grad_norm": jnp.sqrt(sq),
                    "pruned_grad_var": sq / n_pruned - (total / n_pruned) ** 2}

        if diagnostics_every == 1:
            diag = measure(weights)
        else:  # a real branch: the untaken one reads nothing (its outputs are scalars)
            diag = jax.lax.cond(state.count % diagnostics_every == 0, measure,
                                lambda _: state.diagnostics, weights)
        return updates, new._replace(diagnostics=diag)

    return SparseTransformation(init, update, forward)


def nm_ste(inner, rules: Sequence[SparsityRule] | None = None, **kw) -> SparseTransformation:
    """N:M with the plain straight-through estimator.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> params = {'kernel': jnp.ones((8, 3))}
        >>> tx = sparsejax.nm_ste(optax.adam(1e-3), [(r'.*kernel', '2:4')])
        >>> state = tx.init(params)
        >>> int(state.masks['kernel'].sum()), float(state.sr_ste_lambda)   # 2 of every 4
        (12, 0.0)
    """
    return nm_sparse(inner, rules, **kw)


def sr_ste(inner, rules: Sequence[SparsityRule] | None = None, *, sr_ste_lambda: float = 2e-4, **kw) -> SparseTransformation:
    """N:M with SR-STE (Zhou et al. 2021): backward ``g + λ_w (1 − m) ⊙ w``, λ_w = 2e-4.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> tx = sparsejax.sr_ste(optax.adam(1e-3), [(r'.*kernel', '2:4')])
        >>> state = tx.init({'kernel': jnp.ones((8, 3))})
        >>> int(state.masks['kernel'].sum()), round(float(state.sr_ste_lambda), 6)
        (12, 0.0002)
    """
    return nm_sparse(inner, rules, sr_ste_lambda=sr_ste_lambda, **kw)


def mdgf(inner, rules: Sequence[SparsityRule] | None = None, *, decay: str = "exp", alpha: float = 2e-4, backward: str = "ste",
         **kw) -> SparseTransformation:
    """Mask Decay Gradient Flow: forward ``w ⊙ (m + (1−m) β(t))``; backward 'ste' (the
    authors' code) or 'scaled'.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> params = {'mlp': {'kernel': jnp.ones((8, 2))}}
        >>> tx = sparsejax.mdgf(optax.adamw(1e-3), [(r'.*mlp/.*kernel', '1:8')], decay='exp')
        >>> state = tx.init(params)
        >>> int(state.masks['mlp']['kernel'].sum()), float(state.beta)   # β(0) = 1
        (2, 1.0)
    """
    return nm_sparse(inner, rules, decay=decay, alpha=alpha, backward=backward, **kw)


def sdgf(inner, rules: Sequence[SparsityRule] | None = None, *, schedule: str = "stepwise", sparse_steps: int,
         **kw) -> SparseTransformation:
    """Structure Decay Gradient Flow: the pattern tightens over equal frames of the
    sparse phase, 'stepwise' ``(M−1):M → … → N:M`` or 'geometric' ``8N:8M → … → N:M``.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> params = {'kernel': jnp.ones((8, 2))}
        >>> tx = sparsejax.sdgf(optax.adamw(1e-3), [(r'.*kernel', '1:8')], sparse_steps=9000)
        >>> state = tx.init(params)
        >>> int(state.masks['kernel'].sum())     # first frame 7:8 of (7:8, 4:8, 2:8, 1:8)
        14
    """
    return nm_sparse(inner, rules, schedule=schedule, sparse_steps=sparse_steps, **kw)


PHASE_ARGS = ("pattern", "axis", "dense_steps", "sparse_steps", "finetune_steps",
              "diagnostics_every")
"""The ``nm_sparse`` keywords every named N:M method passes through (``**kw``)."""


def _show_phase_args(fn):
    """``inspect.signature(fn)`` lists the ``PHASE_ARGS`` it forwards to ``nm_sparse``, so
    ``help()`` and config checks see one signature whose defaults live in ``nm_sparse``."""
    own = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    names = {p.name for p in own}
    shared = [p for p in inspect.signature(nm_sparse).parameters.values()
              if p.name in PHASE_ARGS and p.name not in names]
    fn.__signature__ = inspect.signature(fn).replace(parameters=own + shared)
    return fn


for _fn in (nm_ste, sr_ste, mdgf, sdgf):
    _show_phase_args(_fn)


# ----------------------------------------------------------------------------- compressed

EXPORT_KEYS = ("values", "indices", "pattern")
"""The keys of one exported N:M leaf: ``values`` and ``indices`` ``[G, N, *rest]`` and
``pattern``, the int32 array ``[n, m, axis]``."""

MAX_M = 256  # indices are stored as uint8


def _integer_dtype(x) -> bool:
    return np.issubdtype(np.dtype(x.dtype), np.integer)


def _concrete(x):
    """``x`` as a numpy array, or ``None`` when it is traced (inside ``jax.jit``)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _dense_shape(values_shape, m: int, axis: int) -> tuple:
    """The dense shape of ``[G, N, *rest]`` values: ``rest`` with ``G·M`` put back at ``axis``."""
    rest = tuple(int(s) for s in values_shape[2:])
    return rest[:axis] + (int(values_shape[0]) * m,) + rest[axis:]


def _check_indices(indices, m: int, where: str) -> None:
    """Offsets in ``[0, m)``, strictly increasing within each group (skipped when traced)."""
    idx = _concrete(indices)
    if idx is None or idx.size == 0:
        return
    idx = idx.astype(np.int64)
    if idx.min() < 0 or idx.max() >= m:
        raise ValueError(f"{where}indices must lie in [0, M={m}), got [{idx.min()}, {idx.max()}]")
    if idx.shape[1] > 1 and not np.all(np.diff(idx, axis=1) > 0):
        raise ValueError(f"{where}indices must be distinct and increasing within each group "
                         f"(axis 1), as compress_nm writes them")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "indices"],
                   meta_fields=["n", "m", "shape", "axis"])
@dataclasses.dataclass(frozen=True)
class NMCompressed:
    """N:M weights stored as values and small-integer indices.

    The weight ``[..., K, ...]`` (``K`` along ``axis``) is moved to ``[K, rest]`` and cut
    into ``G = K/M`` groups; ``values[g, j, *r]`` is the j-th kept entry of group ``g`` at
    position ``r`` of the other axes and ``indices[g, j, *r] ∈ [0, M)`` its offset in the
    group (uint8, increasing in ``j``). ``shape`` and ``axis`` give the dense layout back.
    A pytree whose leaves are ``values`` and ``indices``; ``n, m, shape, axis`` are static,
    so it passes through ``jax.jit`` as an argument.

    For checkpoints, ``to_export()`` gives a plain dict of arrays (``EXPORT_KEYS``) that
    any checkpointer saves and restores as is, and ``from_export`` reads it back.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nm import NMCompressed, compress_nm, decompress_nm
        >>> w = jnp.arange(24.).reshape(8, 3)
        >>> c = compress_nm(w, 2, 4)
        >>> c.values.shape, c.indices.dtype, (c.n, c.m, c.shape, c.axis)   # (K/4, 2, out)
        ((2, 2, 3), dtype('uint8'), (2, 4, (8, 3), 0))
        >>> c.indices[:, :, 0].tolist()          # offsets of the kept entries per group
        [[2, 3], [2, 3]]
        >>> back = NMCompressed.from_export(c.to_export())
        >>> bool((decompress_nm(back) == decompress_nm(c)).all())
        True
    """

    values: jax.Array
    indices: jax.Array
    n: int
    m: int
    shape: tuple
    axis: int

    def to_export(self) -> dict:
        """``{'values', 'indices', 'pattern'}``: arrays only, ``pattern`` the int32 array
        ``[n, m, axis]`` (axis non-negative). The dense shape follows from them.

        Example:

            >>> import jax.numpy as jnp
            >>> from sparsejax.nm import compress_nm
            >>> leaf = compress_nm(jnp.ones((8, 3)), 2, 4).to_export()
            >>> sorted(leaf), leaf['values'].shape
            (['indices', 'pattern', 'values'], (2, 2, 3))
            >>> leaf['pattern']   # [n, m, axis] for a 2-D w (axis -2 stored as 0)
            array([2, 4, 0], dtype=int32)
        """
        shape = tuple(int(s) for s in self.shape)
        _check_nm(self.n, self.m, "NMCompressed: ")
        if self.m > MAX_M:
            raise ValueError(f"NMCompressed: M={self.m} does not fit uint8 indices "
                             f"(M <= {MAX_M})")
        axis = self.axis % len(shape)
        expect = (shape[axis] // self.m, self.n) + shape[:axis] + shape[axis + 1:]
        if (shape[axis] % self.m or tuple(self.values.shape) != expect
                or tuple(self.indices.shape) != expect):
            raise ValueError(f"NMCompressed: a {self.n}:{self.m} weight of shape {shape} along "
                             f"axis {axis} needs values and indices of shape {expect}, got "
                             f"{tuple(self.values.shape)} and {tuple(self.indices.shape)}")
        return {"values": self.values, "indices": self.indices,
                "pattern": np.array([self.n, self.m, axis], np.int32)}

    @classmethod
    def from_export(cls, leaf, path: str = "") -> NMCompressed:
        """Reads one leaf written by ``to_export``/``export_nm`` (also after a checkpoint
        restored without a target). A missing key, a malformed ``pattern``, shapes that do
        not agree with it, or M > 256 is a ValueError naming the problem (and ``path``).

        Example:

            >>> import numpy as np
            >>> import jax.numpy as jnp
            >>> from sparsejax.nm import NMCompressed, compress_nm
            >>> leaf = compress_nm(jnp.ones((8, 3)), 2, 4).to_export()
            >>> restored = {k: np.asarray(v) for k, v in leaf.items()}   # as a checkpointer gives it
            >>> c = NMCompressed.from_export(restored, 'mlp/fc1/kernel')
            >>> c.n, c.m, c.shape, c.axis, c.indices.dtype
            (2, 4, (8, 3), 0, dtype('uint8'))
            >>> NMCompressed.from_export({'values': leaf['values'], 'pattern': leaf['pattern']},
            ...                          'mlp/fc1/kernel')
            Traceback (most recent call last):
            ...
            ValueError: N:M export leaf 'mlp/fc1/kernel': needs exactly the keys ...
        """
        where = f"N:M export leaf {path!r}: " if path else "N:M export leaf: "
        if not isinstance(leaf, Mapping):
            raise TypeError(f"{where}expected a dict with keys {list(EXPORT_KEYS)}, got "
                            f"{type(leaf).__name__}")
        missing = [k for k in EXPORT_KEYS if k not in leaf]
        extra = sorted(str(k) for k in leaf if k not in EXPORT_KEYS)
        if missing or extra:
            raise ValueError(f"{where}needs exactly the keys {list(EXPORT_KEYS)}; missing "
                             f"{missing}, unexpected {extra}")
        pattern = _concrete(leaf["pattern"])
        if pattern is None:
            raise ValueError(f"{where}'pattern' is traced; n, m and axis are static, so read "
                             "the export outside jax.jit")
        if pattern.shape != (3,) or not _integer_dtype(pattern):
            raise ValueError(f"{where}'pattern' must be 3 integers [n, m, axis], got "
                             f"{pattern.dtype} array of shape {pattern.shape}")
        n, m, axis = (int(v) for v in pattern)
        _check_nm(n, m, where)
        if m > MAX_M:
            raise ValueError(f"{where}M={m} does not fit uint8 indices (M <= {MAX_M})")
        values, indices = leaf["values"], leaf["indices"]
        vshape, ishape = tuple(np.shape(values)), tuple(np.shape(indices))
        if len(vshape) < 2:
            raise ValueError(f"{where}'values' must be [G, N, ...], got shape {vshape}")
        if vshape != ishape:
            raise ValueError(f"{where}'values' {vshape} and 'indices' {ishape} differ in shape")
        if vshape[1] != n:
            raise ValueError(f"{where}'values' {vshape} keep {vshape[1]} entries per group "
                             f"(axis 1) but pattern says N={n}")
        if not 0 <= axis < len(vshape) - 1:
            raise ValueError(f"{where}pattern axis {axis} is not an axis of the "
                             f"{len(vshape) - 1}-D weight (must be in [0, {len(vshape) - 1}))")
        if not _integer_dtype(indices):
            raise ValueError(f"{where}'indices' must be integers, got {indices.dtype}")
        _check_indices(indices, m, where)
        return cls(jnp.asarray(values), jnp.asarray(indices).astype(jnp.uint8), n, m,
                   _dense_shape(vshape, m, axis), axis)


def is_nm_export(x) -> bool:
    """Whether ``x`` is one exported N:M leaf: a dict whose keys are two or three of
    ``EXPORT_KEYS`` and nothing else (two, so a leaf missing a key is still recognised
    and then rejected by ``NMCompressed.from_export``). Use it as ``is_leaf`` to walk an
    exported tree.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.nm import export_nm, is_nm_export
        >>> params = {'dense': {'kernel': jnp.ones((8, 2)), 'bias': jnp.zeros(2)}}
        >>> exported = export_nm(params, [(r'.*kernel', '2:4')])
        >>> jax.tree.map(lambda x: is_nm_export(x), exported, is_leaf=is_nm_export)
        {'dense': {'bias': False, 'kernel': True}}
    """
    return (isinstance(x, Mapping) and len(x) >= 2
            and all(isinstance(k, str) and k in EXPORT_KEYS for k in x))


def compress_nm(w: jax.Array, n: int, m: int, axis: int = -2) -> NMCompressed:
    """Keeps the ``n`` largest ``|w|`` of each group of ``m`` along ``axis``, compressed.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.nm import compress_nm, decompress_nm, nm_mask
        >>> w = jax.random.normal(jax.random.key(0), (16, 4))
        >>> c = compress_nm(w, 2, 4)
        >>> c.values.shape, bool(jnp.allclose(decompress_nm(c), w * nm_mask(w, 2, 4)))
        ((4, 2, 4), True)
    """
    _check_nm(n, m)
    if m > MAX_M:
        raise ValueError(f"M={m} does not fit uint8 indices (M <= {MAX_M})")
    axis = axis % w.ndim
    if w.shape[axis] % m:
        raise ValueError(f"N:M {n}:{m}: axis {axis} of size {w.shape[axis]} is not divisible by M")
    moved = jnp.moveaxis(jnp.asarray(w), axis, 0)
    rest = moved.shape[1:]
    groups = moved.reshape(moved.shape[0] // m, m, -1)                   # [G, M, R]
    keep = _group_keep(_magnitude_keys(groups), n, m, 1)                 # nm_mask's
    # the s-th kept offset (s = 0..N-1, increasing) is the number of offsets j before it,
    # i.e. those with at most s kept entries in 0..j
    upto = jnp.cumsum(keep, axis=1, dtype=jnp.int32)                      # [G, M, R]
    slots = jnp.arange(n, dtype=jnp.int32)[None, None, :, None]
    idx = jnp.sum(upto[:, :, None] <= slots, axis=1, dtype=jnp.int32)     # [G, N, R]
    vals = jnp.take_along_axis(groups, idx, axis=1)                       # [G, N, R]
    return NMCompressed(vals.reshape(-1, n, *rest), idx.reshape(-1, n, *rest).astype(jnp.uint8),
                        n, m, tuple(w.shape), axis)


def decompress_nm(c: NMCompressed) -> jax.Array:
    """The dense weight (zeros at pruned entries).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nm import compress_nm, decompress_nm
        >>> w = jnp.arange(16.).reshape(8, 2)
        >>> w_sparse = decompress_nm(compress_nm(w, 1, 8))
        >>> w_sparse.shape, w_sparse[-1].tolist(), int((w_sparse != 0).sum())
        ((8, 2), [14.0, 15.0], 2)
    """
    g, n = c.values.shape[:2]
    vals = c.values.reshape(g, n, -1)
    idx = c.indices.reshape(g, n, -1).astype(jnp.int32)
    hit = jax.nn.one_hot(idx, c.m, axis=1, dtype=jnp.bool_)               # [G, M, N, R]
    dense = jnp.sum(jnp.where(hit, vals[:, None], jnp.zeros((), vals.dtype)), axis=2)
    moved_shape = (c.shape[c.axis],) + tuple(s for i, s in enumerate(c.shape) if i != c.axis)
    return jnp.moveaxis(dense.reshape(moved_shape), 0, c.axis)


def _plain(tree):
    """``tree`` with ``nnx.Variable``s unboxed and every mapping (``nnx.State``, dict) a
    plain dict; lists and tuples kept. What a checkpointer restores without a target."""
    def walk(x):
        if isinstance(x, Mapping):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
            return type(x)(walk(v) for v in x)
        return x
    return walk(unbox(tree))


def export_nm(params, rules: Sequence[SparsityRule] | None = None, axis: int = -2, pattern: str = "2:4"):
    """``params`` with every N:M parameter replaced by its compressed export leaf
    (``NMCompressed.to_export()``: ``{'values', 'indices', 'pattern'}``, arrays only).

    Same nesting and keys as ``params``; ``nnx.Variable``s are unboxed and an
    ``nnx.State`` becomes nested dicts. Parameters that no N:M rule selects (dense,
    unstructured-sparsity floats, biases, norms) are kept unchanged. The result is a plain
    pytree of arrays: a checkpointer saves it as is and restores it without a target, and
    ``import_nm`` (dense params) or ``NMCompressed.from_export`` (one leaf) read it back.
    ``rules``, ``axis`` and ``pattern`` are those of ``resolve_nm_rules``.

    Example:

        >>> from flax import nnx
        >>> from sparsejax.models import MLP
        >>> from sparsejax.nm import export_nm
        >>> model = MLP(8, (16,), 4, rngs=nnx.Rngs(0))
        >>> exported = export_nm(nnx.state(model, nnx.Param), [(r'layers/.*/kernel', '2:4')])
        >>> kernel = exported['layers'][0]['kernel']     # ready for any checkpointer
        >>> type(exported).__name__, kernel['values'].shape, kernel['pattern'].tolist()
        ('dict', (2, 2, 16), [2, 4, 0])
        >>> exported['head']['kernel'].shape            # not selected: kept dense
        (16, 4)
    """
    specs = resolve_nm_rules(params, rules, axis, pattern)
    leaves = dict(named_leaves(params))
    packed = {p: compress_nm(leaves[p], s.n, s.m, s.axis).to_export()
              for p, s in specs.items() if s.n}
    return jax.tree_util.tree_map_with_path(lambda p, x: packed.get(path_str(p), x),
                                            _plain(params))


def import_nm(exported):
    """The dense params of an ``export_nm`` tree: every export leaf decompressed (zeros at
    pruned entries, the values' dtype), every other leaf unchanged. A malformed export
    leaf is a ValueError naming its path.

    Example:

        >>> from flax import nnx
        >>> from sparsejax.models import MLP
        >>> from sparsejax.nm import export_nm, import_nm
        >>> model = MLP(8, (16,), 4, rngs=nnx.Rngs(0))
        >>> exported = export_nm(nnx.state(model, nnx.Param), [(r'layers/.*/kernel', '2:4')])
        >>> dense = import_nm(exported)          # e.g. what a checkpointer restored
        >>> state = nnx.state(model, nnx.Param)
        >>> nnx.replace_by_pure_dict(state, dense); nnx.update(model, state)
        >>> int((model.layers[0].kernel[...] != 0).sum()), model.layers[0].kernel.shape
        (64, (8, 16))
    """
    def leaf(p, x):
        if not is_nm_export(x):
            return x
        return decompress_nm(NMCompressed.from_export(x, path_str(p)))
    return jax.tree_util.tree_map_with_path(leaf, exported, is_leaf=is_nm_export)
