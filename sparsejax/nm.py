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

Example::

    tx = sparsejax.mdgf(optax.adamw(1e-3), rules=[(r'.*mlp/.*kernel', '1:8')],
                        decay='exp', alpha=2e-4)
    state = tx.init(params)
    fwd = tx.forward(params, state)   # w ⊙ (m + (1−m) β(t)), gradient per `backward`
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.base import SparseTransformation
from sparsejax.masks import match_rules, named_leaves, path_str, topk_mask

_is_none = lambda x: x is None  # noqa: E731

DECAYS = ("linear", "exp")
SCHEDULES = ("fixed", "stepwise", "geometric")
BACKWARDS = ("ste", "scaled")


# ----------------------------------------------------------------------------- masks


def _check_nm(n: int, m: int, where: str = "") -> None:
    if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))):
        raise ValueError(f"{where}N:M pattern needs integers, got {n!r}:{m!r}")
    if not 0 < n < m:
        raise ValueError(f"{where}N:M pattern {n}:{m} needs 0 < N < M")


def nm_mask(w: jax.Array, n: int, m: int, axis: int = -2) -> jax.Array:
    """Boolean mask keeping the ``n`` largest ``|w|`` of every ``m`` consecutive entries
    along ``axis`` (ties to the lower index).

    Example::

        nm_mask(jnp.array([[4., 1.], [2., 3.], [0., 9.], [5., 5.]]), 1, 2, axis=0)
        # [[True, False], [False, False], [False, True], [True, True]]... per column pairs
    """
    _check_nm(n, m)
    axis = axis % w.ndim
    if w.shape[axis] % m:
        raise ValueError(f"N:M {n}:{m}: axis {axis} of size {w.shape[axis]} is not "
                         f"divisible by M={m}")
    moved = jnp.moveaxis(jnp.abs(w), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // m, m)
    _, idx = jax.lax.top_k(groups, n)  # lower index first among equal values
    keep = jnp.any(jax.nn.one_hot(idx, m, dtype=jnp.bool_), axis=-2)
    return jnp.moveaxis(keep.reshape(moved.shape), -1, axis)


def stepwise_frames(n: int, m: int) -> list[tuple[int, int]]:
    """SDGF stepwise patterns ``(M−1):M, M/2:M, M/4:M, …, N:M``.

    Example::

        stepwise_frames(1, 8)   # [(7, 8), (4, 8), (2, 8), (1, 8)]
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

    Example::

        geometric_frames(1, 4)   # [(8, 32), (4, 16), (2, 8), (1, 4)]
    """
    _check_nm(n, m)
    return [(f * n, f * m) for f in (8, 4, 2, 1)]


def decay_beta(t, decay: str, alpha: float):
    """MDGF's ``β(t)``: ``max(0, 1 − α t)`` ('linear') or ``exp(−α t)`` ('exp').

    Example::

        decay_beta(1000, 'exp', 2e-4)   # exp(-0.2)
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

    Example::

        g = jax.grad(lambda w: loss(nm_weights(w, nm_mask(w, 2, 4), sr_ste_lambda=2e-4)))(w)
        # == dL/dŵ + 2e-4 (1 − m) ⊙ w
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


def _parse(path: str, pattern: str, spec, shape, axis: int) -> LeafSpec | None:
    if spec is None or spec == "dense":
        return None
    where = f"rule {pattern!r} on parameter {path!r}: "
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not 0.0 <= float(spec) < 1.0:
            raise ValueError(f"{where}sparsity {spec} is outside [0, 1)")
        return LeafSpec(path, sparsity=float(spec), axis=axis)
    if isinstance(spec, str):
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", spec)
        if not match:
            raise ValueError(f"{where}unknown spec {spec!r}; use 'N:M', a sparsity, or 'dense'")
        n, m = int(match.group(1)), int(match.group(2))
    else:
        n, m = (int(x) for x in spec)
    _check_nm(n, m, where)
    if len(shape) == 0:
        raise ValueError(f"{where}scalar parameter cannot hold an N:M pattern")
    ax = axis % len(shape)
    if shape[ax] % m:
        raise ValueError(f"{where}axis {ax} of shape {tuple(shape)} has size {shape[ax]}, "
                         f"not divisible by M={m}")
    return LeafSpec(path, n=n, m=m, axis=axis)


def resolve_nm_rules(params, rules: Sequence[tuple[str, Any]], axis: int = -2) -> dict[str, LeafSpec]:
    """``{path: LeafSpec}`` for every sparse parameter; first full match wins; a rule that
    matches nothing, N ≥ M, or an axis M does not divide is an error naming the path.

    Example::

        resolve_nm_rules(params, [(r'.*mlp/.*kernel', '2:4')])
    """
    out = {}
    for path, leaf, pattern, spec in match_rules(params, rules, "N:M"):
        parsed = None if pattern is None else _parse(path, pattern, spec, np.shape(leaf), axis)
        if parsed is not None:
            out[path] = parsed
    return out


# ----------------------------------------------------------------------------- transform


class NMState(NamedTuple):
    """State of an N:M transform.

    ``inner``: the wrapped optimizer's state; ``masks``: the masks of the last update
    (bool, ``None`` for dense leaves), for diagnostics; ``count``: optimizer steps so
    far; ``diagnostics``: per-step scalars (mask flip rate, norm and variance of the
    gradient on pruned weights) that the training loop logs.

    Example::

        state.diagnostics['flip_rate']
    """

    inner: Any
    masks: Any
    count: jax.Array
    diagnostics: dict


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


def nm_masks_from_params(params, rules: Sequence[tuple[str, Any]], axis: int = -2):
    """The masks a fixed-pattern N:M transform would use for ``params`` now: per path rule,
    ``'N:M'`` keeps the ``N`` largest ``|w|`` of every ``M`` along ``axis``, a float ``s``
    keeps the ``round((1−s)·size)`` largest ``|w|``; other leaves ``None``.

    Example::

        m = nm_masks_from_params(params, [(r'.*kernel', '2:4')])
    """
    specs = resolve_nm_rules(params, rules, axis)
    return _masks_by_spec(params, specs,
                          lambda w, spec: _leaf_mask(w, spec, [(spec.n, spec.m)], 0))


def nm_sparse(inner: optax.GradientTransformation, rules: Sequence[tuple[str, Any]], *,
              axis: int = -2, sr_ste_lambda: float = 0.0, decay: str | None = None,
              alpha: float = 2e-4, backward: str = "ste", schedule: str = "fixed",
              dense_steps: int = 0, sparse_steps: int | None = None,
              finetune_steps: int = 0) -> SparseTransformation:
    """The general N:M transform; ``nm_ste``, ``sr_ste``, ``mdgf`` and ``sdgf`` fix its knobs.

    ``sparse_steps`` is the length of the sparse phase that SDGF splits into frames
    (required for 'stepwise'/'geometric'); the fine-tune phase starts at
    ``dense_steps + sparse_steps``.

    Example::

        tx = nm_sparse(optax.adam(1e-3), [(r'.*kernel', '2:4')], sr_ste_lambda=2e-4)
    """
    if decay is not None and decay not in DECAYS:
        raise ValueError(f"unknown decay {decay!r}; known: {DECAYS}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {SCHEDULES}")
    if backward not in BACKWARDS:
        raise ValueError(f"unknown backward {backward!r}; known: {BACKWARDS}")
    if schedule != "fixed" and not sparse_steps:
        raise ValueError(f"schedule {schedule!r} needs sparse_steps (the phase split into "
                         "frames)")
    for name, v in (("dense_steps", dense_steps), ("finetune_steps", finetune_steps),
                    ("sr_ste_lambda", sr_ste_lambda), ("alpha", alpha)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    rules = tuple(tuple(r) for r in rules)
    inner = optax.with_extra_args_support(inner)

    def plan(params):
        specs = resolve_nm_rules(params, rules, axis)
        for spec in specs.values():
            if spec.sparsity:  # unstructured: no groups to check
                continue
            for n, m in _frames(spec, schedule):
                shape = dict(named_leaves(params))[spec.path].shape
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
        length = max(sparse_steps // n_frames, 1)
        return jnp.clip(t_sparse // length, 0, n_frames - 1).astype(jnp.int32)

    def masks_at(params, t):
        t_sparse, beta, warm = phase(t)

        def leaf(w, spec):
            frames = _frames(spec, schedule)
            frame = frame_index(t_sparse, len(frames)) if len(frames) > 1 else 0
            return _leaf_mask(w, spec, frames, frame) | warm  # dense warm-up: all kept
        return _masks_by_spec(params, plan(params), leaf), beta

    def init(params):
        masks, _ = masks_at(params, 0)
        diag = {"flip_rate": jnp.zeros(()), "pruned_grad_norm": jnp.zeros(()),
                "pruned_grad_var": jnp.zeros(())}
        return NMState(inner.init(params), masks, jnp.zeros((), jnp.int32), diag)

    def forward(params, state):
        masks, beta = masks_at(params, state.count)
        return jax.tree.map(
            lambda m, w: w if m is None else nm_weights(w, m, beta, sr_ste_lambda,
                                                        backward == "scaled"),
            masks, params, is_leaf=_is_none)

    def update(grads, state, params=None, **extra):
        if params is None:
            raise ValueError("N:M transforms need params: call update(grads, state, params)")
        updates, inner_state = inner.update(grads, state.inner, params, **extra)
        masks, _ = masks_at(params, state.count)  # the mask this step's forward used
        flat_m, treedef = jax.tree_util.tree_flatten(masks, is_leaf=_is_none)
        live = [(m, g, old) for m, g, old in zip(flat_m, treedef.flatten_up_to(grads),
                                                  treedef.flatten_up_to(state.masks))
                if m is not None]
        size = max(sum(m.size for m, _, _ in live), 1)
        g_pruned = [jnp.where(m, 0.0, g.astype(jnp.float32)) for m, g, _ in live]
        n_pruned = jnp.maximum(sum(jnp.sum(~m) for m, _, _ in live), 1)
        total = sum(jnp.sum(x) for x in g_pruned)
        sq = sum(jnp.sum(x * x) for x in g_pruned)
        diag = {"flip_rate": sum(jnp.sum(m != old) for m, _, old in live) / size,
                "pruned_grad_norm": jnp.sqrt(sq),
                "pruned_grad_var": sq / n_pruned - (total / n_pruned) ** 2}
        return updates, NMState(inner_state, masks, state.count + 1, diag)

    return SparseTransformation(init, update, forward)


def nm_ste(inner, rules, **kw) -> SparseTransformation:
    """N:M with the plain straight-through estimator.

    Example::

        tx = sparsejax.nm_ste(optax.adam(1e-3), [(r'.*kernel', '2:4')])
    """
    return nm_sparse(inner, rules, **kw)


def sr_ste(inner, rules, *, sr_ste_lambda: float = 2e-4, **kw) -> SparseTransformation:
    """N:M with SR-STE (Zhou et al. 2021): backward ``g + λ_w (1 − m) ⊙ w``, λ_w = 2e-4.

    Example::

        tx = sparsejax.sr_ste(optax.adam(1e-3), [(r'.*kernel', '2:4')])
    """
    return nm_sparse(inner, rules, sr_ste_lambda=sr_ste_lambda, **kw)


def mdgf(inner, rules, *, decay: str = "exp", alpha: float = 2e-4, backward: str = "ste",
         **kw) -> SparseTransformation:
    """Mask Decay Gradient Flow: forward ``w ⊙ (m + (1−m) β(t))``; backward 'ste' (the
    authors' code) or 'scaled'.

    Example::

        tx = sparsejax.mdgf(optax.adamw(1e-3), [(r'.*mlp/.*kernel', '1:8')], decay='exp')
    """
    return nm_sparse(inner, rules, decay=decay, alpha=alpha, backward=backward, **kw)


def sdgf(inner, rules, *, schedule: str = "stepwise", sparse_steps: int, **kw) -> SparseTransformation:
    """Structure Decay Gradient Flow: the pattern tightens over equal frames of the
    sparse phase, 'stepwise' ``(M−1):M → … → N:M`` or 'geometric' ``8N:8M → … → N:M``.

    Example::

        tx = sparsejax.sdgf(optax.adamw(1e-3), [(r'.*kernel', '1:8')], sparse_steps=9000)
    """
    return nm_sparse(inner, rules, schedule=schedule, sparse_steps=sparse_steps, **kw)


# ----------------------------------------------------------------------------- compressed


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "indices"],
                   meta_fields=["n", "m", "shape", "axis"])
@dataclasses.dataclass(frozen=True)
class NMCompressed:
    """N:M weights stored as values and small-integer indices.

    The weight ``[..., K, ...]`` (``K`` along ``axis``) is moved to ``[K, rest]`` and cut
    into ``K/M`` groups; ``values[g, j, r]`` is the j-th kept entry of group ``g`` in
    column ``r`` and ``indices[g, j, r] ∈ [0, M)`` its offset in the group (uint8).
    ``shape`` and ``axis`` give the dense layout back. A pytree whose leaves are
    ``values`` and ``indices``; ``n, m, shape, axis`` are static, so it passes through
    ``jax.jit`` as an argument.

    Example::

        c = compress_nm(w, 2, 4); c.values.shape   # (K/4, 2, out)
    """

    values: jax.Array
    indices: jax.Array
    n: int
    m: int
    shape: tuple
    axis: int


def compress_nm(w: jax.Array, n: int, m: int, axis: int = -2) -> NMCompressed:
    """Keeps the ``n`` largest ``|w|`` of each group of ``m`` along ``axis``, compressed.

    Example::

        c = compress_nm(kernel, 2, 4); jnp.allclose(decompress_nm(c), w * nm_mask(w, 2, 4))
    """
    _check_nm(n, m)
    if m > 256:
        raise ValueError(f"M={m} does not fit uint8 indices")
    axis = axis % w.ndim
    if w.shape[axis] % m:
        raise ValueError(f"N:M {n}:{m}: axis {axis} of size {w.shape[axis]} is not divisible by M")
    moved = jnp.moveaxis(w, axis, 0)
    rest = moved.shape[1:]
    groups = moved.reshape(moved.shape[0] // m, m, -1)                   # [G, M, R]
    _, idx = jax.lax.top_k(jnp.abs(jnp.swapaxes(groups, 1, 2)), n)        # [G, R, N]
    idx = jnp.sort(idx, axis=-1)
    vals = jnp.take_along_axis(jnp.swapaxes(groups, 1, 2), idx, axis=-1)  # [G, R, N]
    to_gnr = lambda x: jnp.swapaxes(x, 1, 2).reshape(x.shape[0], n, *rest)  # noqa: E731
    return NMCompressed(to_gnr(vals), to_gnr(idx).astype(jnp.uint8), n, m, tuple(w.shape), axis)


def decompress_nm(c: NMCompressed) -> jax.Array:
    """The dense weight (zeros at pruned entries).

    Example::

        w_sparse = decompress_nm(compress_nm(w, 1, 8))
    """
    g, n = c.values.shape[:2]
    vals = c.values.reshape(g, n, -1)
    idx = c.indices.reshape(g, n, -1).astype(jnp.int32)
    dense = jnp.sum(jax.nn.one_hot(idx, c.m, axis=1, dtype=vals.dtype) * vals[:, None], axis=2)
    moved_shape = (c.shape[c.axis],) + tuple(s for i, s in enumerate(c.shape) if i != c.axis)
    return jnp.moveaxis(dense.reshape(moved_shape), 0, c.axis)


def nm_matmul(x: jax.Array, c: NMCompressed) -> jax.Array:
    """``x @ W`` for a compressed ``[K, N_out]`` kernel (axis 0), read directly: each output
    gathers the ``N`` kept inputs of every group. The reference the kernels must match.

    Example::

        y = nm_matmul(x, compress_nm(kernel, 2, 4, axis=0))   # == x @ (kernel ⊙ mask)
    """
    if len(c.shape) != 2 or c.axis != 0:
        raise ValueError(f"nm_matmul needs a 2-D kernel compressed along axis 0, got shape "
                         f"{c.shape} axis {c.axis}")
    k = c.shape[0]
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features, the kernel expects {k}")
    xg = x.reshape(*x.shape[:-1], k // c.m, c.m, 1)                    # [..., G, M, 1]
    idx = c.indices.astype(jnp.int32)[(None,) * (x.ndim - 1)]          # [1.., G, N, out]
    picked = jnp.take_along_axis(xg, idx, axis=-2)                     # [..., G, N, out]
    return jnp.einsum("...gno,gno->...o", picked, c.values.astype(x.dtype))


def export_nm(params, rules: Sequence[tuple[str, Any]], axis: int = -2) -> dict[str, NMCompressed]:
    """Compresses every N:M parameter of a trained model: ``{path: NMCompressed}``.

    Example::

        packed = export_nm(params, [(r'.*mlp/.*kernel', '2:4')])
    """
    specs = resolve_nm_rules(params, rules, axis)
    leaves = dict(named_leaves(params))
    return {p: compress_nm(leaves[p], s.n, s.m, s.axis) for p, s in specs.items() if s.n}


def import_nm(params, packed: dict[str, NMCompressed]):
    """Params with every compressed entry of ``packed`` replaced by its dense form.

    Example::

        params = import_nm(params, export_nm(params, rules))
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for p, w in flat:
        c = packed.get(path_str(p))
        if c is not None and tuple(c.shape) != tuple(w.shape):
            raise ValueError(f"compressed {path_str(p)!r} has shape {c.shape}, params {w.shape}")
        out.append(w if c is None else decompress_nm(c).astype(w.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)
