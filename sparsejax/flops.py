"""Dense and sparse FLOP accounting, per layer and per training step.

``layer_flops`` traces a function with ``jax.make_jaxpr`` and prices every contraction
(``dot_general``, ``conv_general_dilated``) at 2 FLOPs per multiply-add, attributing
each to the parameter leaf that feeds it (by '/'-joined path, as in
``sparsejax.paths.path_str``). Contractions between activations only (the
attention scores ``q·kᵀ`` and ``probs·v``) go under ``ACTIVATION_KEY``, so the total is
complete. Elementwise work (bias adds, norms, softmax, activations) is not counted, as
in the RigL paper's accounting.

``sparse_flops`` scales each layer by its density; ``training_flops_per_step`` turns
inference FLOPs into per-step training FLOPs following Evci et al. 2020 ("Rigging the
Lottery", Section 4 and Appendix H).

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.flops import model_flops, sparse_flops, total, training_flops_per_step
    >>> from sparsejax.models import MLP
    >>> model = MLP(64, (32,), 10, rngs=nnx.Rngs(0))
    >>> dense = model_flops(model, lambda m: m(jnp.ones((4, 64))))
    >>> dense
    {'head/kernel': 2560, 'layers/0/kernel': 16384, '<activations>': 0}
    >>> sparse = sparse_flops(dense, {'layers/0/kernel': 0.1})
    >>> total(dense), round(total(sparse), 1)
    (18944, 4198.4)
    >>> round(training_flops_per_step('rigl', total(dense), total(sparse), update_every=100), 1)
    12741.2
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
from flax import errors as flax_errors
from flax import nnx
from jax.extend import core as jcore

from sparsejax.masks import mask_counts
from sparsejax.paths import named_leaves
from sparsejax.surgery import OUTSIDE_OBJECT_HINT, check_call

ACTIVATION_KEY = "<activations>"
"""Key of the FLOPs whose operands come from no parameter (e.g. attention q·kᵀ, probs·v)."""

TRAINING_METHODS = ("dense", "static", "set", "snfs", "rigl")
"""Methods known to ``training_flops_per_step``."""

# Ops that move or retype one value without computing with it: the output of one of these
# stands for the same parameter as its first operand.
_FOLLOW_UNARY = frozenset({
    "convert_element_type", "reshape", "transpose", "squeeze", "expand_dims",
    "broadcast_in_dim", "copy", "copy_p", "stop_gradient", "reduce_precision",
    "sharding_constraint", "pvary", "neg", "slice", "dynamic_slice", "rev",
})
# Elementwise ops through which a parameter is followed when the other operands carry no
# other parameter and no activation: ``w * m``, ``where(m, w, 0)``,
# ``w + stop_gradient(where(m, w, 0) - w)``.
_FOLLOW_ELEMENTWISE = frozenset({"mul", "div", "add", "add_any", "sub", "select_n",
                                 "max", "min"})


class _Info(NamedTuple):
    """What a traced value is: the parameter path it stands for (or None), and whether it
    depends on a contraction's output (an activation; such values never stand for a
    parameter)."""

    source: str | None
    tainted: bool


_PLAIN = _Info(None, False)
_ACT = _Info(None, True)


# ----------------------------------------------------------------------------- costs


def dot_general_flops(lhs_shape: Sequence[int], rhs_shape: Sequence[int],
                      dimension_numbers) -> int:
    """FLOPs of ``lax.dot_general``: 2 × batch × lhs-free × rhs-free × contracting.

    ``dimension_numbers`` is ``((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))``.

    Example:

        >>> from sparsejax.flops import dot_general_flops
        >>> dot_general_flops((4, 64), (64, 32), (((1,), (0,)), ((), ())))   # 2*4*64*32
        16384
    """
    (lc, rc), (lb, rb) = dimension_numbers
    contract = math.prod(lhs_shape[d] for d in lc)
    batch = math.prod(lhs_shape[d] for d in lb)
    lhs_free = math.prod(s for d, s in enumerate(lhs_shape) if d not in (*lc, *lb))
    rhs_free = math.prod(s for d, s in enumerate(rhs_shape) if d not in (*rc, *rb))
    return 2 * batch * lhs_free * rhs_free * contract


def conv_flops(out_shape: Sequence[int], rhs_shape: Sequence[int], rhs_spec: Sequence[int]) -> int:
    """FLOPs of ``lax.conv_general_dilated``: 2 × |output| × |kernel window| × in-features.

    ``rhs_spec`` is the kernel's ``(out_feature_dim, in_feature_dim, *spatial_dims)``
    (``ConvDimensionNumbers.rhs_spec``). The kernel's input-feature dimension already is
    ``C_in / feature_group_count``, so grouped and depthwise convs are priced per group.
    Padded positions are counted (the usual ``H_out·W_out·k²·C_in·C_out`` convention;
    XLA's ``cost_analysis`` skips them).

    Example:

        >>> from sparsejax.flops import conv_flops
        >>> conv_flops((2, 8, 8, 8), (3, 3, 3, 8), (3, 2, 0, 1))   # 2*2*8*8*8 * 3*3 * 3
        55296
    """
    window = math.prod(rhs_shape[d] for d in rhs_spec[2:])
    in_per_group = rhs_shape[rhs_spec[1]]
    return 2 * math.prod(out_shape) * window * in_per_group


def _eqn_cost(eqn) -> int:
    shapes = [v.aval.shape for v in eqn.invars]
    if eqn.primitive.name == "dot_general":
        return dot_general_flops(shapes[0], shapes[1], eqn.params["dimension_numbers"])
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec
    return conv_flops(eqn.outvars[0].aval.shape, shapes[1], rhs_spec)


# ----------------------------------------------------------------------------- jaxpr walk


def _read(env: dict, v) -> _Info:
    if isinstance(v, jcore.Literal):
        return _PLAIN
    return env.get(v, _PLAIN)


def _elementwise_info(eqn, infos: list[_Info]) -> _Info:
    """A parameter survives ``op(w, other)`` when nothing else is a parameter or an
    activation and ``w`` is not broadcast up (which would make the result activation-
    shaped, as in ``x * scale``)."""
    if any(i.tainted for i in infos):
        return _ACT
    sources = {i.source for i in infos if i.source is not None}
    if len(sources) != 1:
        return _PLAIN
    out_shape = eqn.outvars[0].aval.shape
    if any(i.source is not None and v.aval.shape == out_shape
           for v, i in zip(eqn.invars, infos)):
        return _Info(sources.pop(), False)
    return _PLAIN


def _contraction_key(infos: list[_Info]) -> str:
    """The kernel operand (rhs, as flax's Linear/Conv/Einsum emit it) wins, then the lhs."""
    for info in (infos[1], infos[0]):
        if info.source is not None:
            return info.source
    return ACTIVATION_KEY


def _add(acc: dict, key: str, flops: int) -> None:
    acc[key] = acc.get(key, 0) + flops


def _as_jaxpr(j):
    return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def _sub_jaxprs(params: Mapping[str, Any]) -> list:
    out = []
    for value in params.values():
        for j in (value if isinstance(value, (tuple, list)) else (value,)):
            if isinstance(j, (jcore.Jaxpr, jcore.ClosedJaxpr)):
                out.append(_as_jaxpr(j))
    return out


def _walk(jaxpr, in_infos: Sequence[_Info], scale: int, acc: dict) -> list[_Info]:
    """Adds ``scale`` × the FLOPs of ``jaxpr`` to ``acc``; returns its outputs' infos."""
    env = dict(zip(jaxpr.invars, in_infos))
    for eqn in jaxpr.eqns:
        infos = [_read(env, v) for v in eqn.invars]
        outs = _eqn(eqn, infos, scale, acc)
        env.update(zip(eqn.outvars, outs))
    return [_read(env, v) for v in jaxpr.outvars]


def _eqn(eqn, infos: list[_Info], scale: int, acc: dict) -> list[_Info]:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    tainted = _Info(None, any(i.tainted for i in infos))
    if name in ("dot_general", "conv_general_dilated"):
        _add(acc, _contraction_key(infos), scale * _eqn_cost(eqn))
        return [_ACT]
    if name in _FOLLOW_UNARY:
        return [infos[0]] * n_out
    if name in _FOLLOW_ELEMENTWISE:
        return [_elementwise_info(eqn, infos)]
    if name == "scan":
        return _scan(eqn, infos, scale, acc)
    if name == "cond":
        return _cond(eqn, infos, scale, acc)
    if name == "while":
        return _while(eqn, infos, scale, acc)
    if name == "shard_map":
        mesh = eqn.params["mesh"]
        manual = eqn.params.get("newly_manual_axes", eqn.params.get("manual_axes"))
        manual = tuple(mesh.shape) if manual is None else manual
        shards = math.prod(mesh.shape[a] for a in manual)
        return _walk(_as_jaxpr(eqn.params["jaxpr"]), infos, scale * shards, acc)
    if name == "pallas_call":
        return _pallas(eqn, infos, scale, acc)
    # jit/pjit, custom_jvp_call, custom_vjp_call, remat2/checkpoint, closed_call, and any
    # other call-like primitive: one sub-jaxpr whose inputs are the equation's inputs.
    outs = None
    for sub in _sub_jaxprs(eqn.params):
        if len(sub.invars) == len(infos):
            result = _walk(sub, infos, scale, acc)
            if len(result) == n_out:
                outs = result
        else:
            _walk(sub, [_ACT] * len(sub.invars), scale, acc)
    return outs if outs is not None else [tainted] * n_out


def _scan(eqn, infos, scale, acc):
    """Body × ``length``. Consts and per-step slices of ``xs`` keep their parameter (a
    scan over stacked layer weights attributes to the stacked leaf); carries are
    treated as activations."""
    p = eqn.params
    n_c, n_carry = p["num_consts"], p["num_carry"]
    body_in = [*infos[:n_c], *[_ACT] * n_carry, *infos[n_c + n_carry:]]
    body_out = _walk(_as_jaxpr(p["jaxpr"]), body_in, scale * p["length"], acc)
    return [*[_ACT] * n_carry, *body_out[n_carry:]]


def _cond(eqn, infos, scale, acc):
    """The most expensive branch (an upper bound: which branch runs is data-dependent)."""
    best, best_outs = None, None
    for branch in eqn.params["branches"]:
        trial: dict = {}
        outs = _walk(_as_jaxpr(branch), infos[1:], scale, trial)
        if best is None or sum(trial.values()) > sum(best.values()):
            best, best_outs = trial, outs
    for key, value in best.items():
        _add(acc, key, value)
    if infos[0].tainted:
        return [_ACT] * len(best_outs)
    return best_outs


def _while(eqn, infos, scale, acc):
    """Condition and body counted once: the trip count is not known when tracing."""
    p = eqn.params
    n_cond, n_body = p["cond_nconsts"], p["body_nconsts"]
    carry = [_ACT] * (len(infos) - n_cond - n_body)
    _walk(_as_jaxpr(p["cond_jaxpr"]), [*infos[:n_cond], *carry], scale, acc)
    _walk(_as_jaxpr(p["body_jaxpr"]), [*infos[n_cond:n_cond + n_body], *carry], scale, acc)
    return [_ACT] * len(eqn.outvars)


def _pallas(eqn, infos, scale, acc):
    """A Pallas kernel is priced by its ``cost_estimate`` (the kernel body runs once per
    grid step on blocks, so walking it would miscount)."""
    flops = getattr(eqn.params.get("cost_estimate"), "flops", None)
    if flops is None:
        warnings.warn(f"pallas_call {eqn.params.get('name')!r} has no cost_estimate; its "
                      "FLOPs are not counted", stacklevel=4)
    else:
        sources = {i.source for i in infos if i.source is not None}
        key = sources.pop() if len(sources) == 1 else ACTIVATION_KEY
        _add(acc, key, scale * int(flops))
    return [_ACT] * len(eqn.outvars)


# ----------------------------------------------------------------------------- public API


def layer_flops(fn: Callable, params, *args) -> dict[str, int]:
    """FLOPs of one call ``fn(params, *args)``, by parameter path, plus ``ACTIVATION_KEY``.

    Every ``dot_general`` costs ``2·batch·lhs_free·rhs_free·contract`` and every
    ``conv_general_dilated`` ``2·|out|·|window|·C_in/groups`` (2 FLOPs per
    multiply-add). A contraction is attributed to the parameter leaf feeding its kernel
    operand (rhs first, then lhs), followed back through shape/dtype-only ops (reshape,
    transpose, broadcast, convert, slice, stop_gradient, ...) and through elementwise
    ``mul/div/add/sub/select_n/max/min`` whose other operands carry no other parameter
    and no activation, so sparsity transforms (``w*m``,
    ``w + stop_gradient(where(m, w, 0) - w)``) keep the attribution. Values computed from
    a contraction's output are activations and never stand for a parameter (``x@W + b``
    is not ``b``). Sub-jaxprs are entered: jit, custom_jvp/vjp, remat, closed_call;
    ``scan`` bodies count ``length`` times, ``cond`` counts its most expensive branch,
    ``while`` bodies count once, ``shard_map`` bodies count once per manual shard, and
    ``pallas_call`` uses its ``cost_estimate``. Elementwise work is not counted.

    Returns ints: parameter paths with nonzero FLOPs in parameter order, then
    ``ACTIVATION_KEY`` (always present, possibly 0).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.flops import layer_flops
        >>> params = {'w': jnp.ones((64, 32))}
        >>> layer_flops(lambda p, x: x @ p['w'], params, jnp.ones((4, 64)))
        {'w': 16384, '<activations>': 0}
    """
    named = named_leaves(params)
    closed = jax.make_jaxpr(fn)(params, *args)
    jaxpr = closed.jaxpr
    n_params = len(named)
    in_infos = [_Info(path, False) for path, _ in named]
    in_infos += [_PLAIN] * (len(jaxpr.invars) - n_params)
    acc: dict[str, int] = {}
    _walk(jaxpr, in_infos, 1, acc)
    out = {path: int(acc[path]) for path, _ in named if acc.get(path)}
    out[ACTIVATION_KEY] = int(acc.get(ACTIVATION_KEY, 0))
    return out


def total(flops: Mapping[str, float]) -> float:
    """Sum of a per-layer FLOPs dict (activations included).

    Example:

        >>> from sparsejax.flops import total
        >>> total({'layers/0/kernel': 16384, '<activations>': 8})
        16392
    """
    return sum(flops.values())


def sparse_flops(dense: Mapping[str, int], densities: Mapping[str, float]) -> dict[str, float]:
    """Per-layer FLOPs with each parameter's FLOPs × its density (nnz/size).

    ``f_S(layer) = f_D(layer) · density(layer)``: a sparse kernel does only the
    multiply-adds of its nonzeros (Evci et al. 2020, Section 4). Paths missing from
    ``densities`` are dense; ``ACTIVATION_KEY`` FLOPs are unchanged. Densities of
    parameters that cost no FLOPs (embeddings, biases) are ignored.

    Example:

        >>> from sparsejax.flops import sparse_flops
        >>> sparse_flops({'w': 100, '<activations>': 8}, {'w': 0.5})
        {'w': 50.0, '<activations>': 8.0}
    """
    for path, d in densities.items():
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"density of {path!r} is {d}; densities lie in [0, 1]")
    return {path: float(f) * (1.0 if path == ACTIVATION_KEY else float(densities.get(path, 1.0)))
            for path, f in dense.items()}


def densities_from_masks(masks) -> dict[str, float]:
    """``{path: nnz/size}`` of a mask pytree (bool leaves; ``None`` for dense parameters),
    from ``sparsejax.masks.mask_counts``. Returns Python floats, so call it outside ``jit``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.flops import densities_from_masks
        >>> densities_from_masks({'w': jnp.array([True, False]), 'b': None})
        {'w': 0.5}
    """
    return {path: nnz / max(size, 1) for path, (nnz, size) in mask_counts(masks).items()}


def _number(f) -> float:
    return float(total(f)) if isinstance(f, Mapping) else float(f)


def training_flops_per_step(method: str, f_dense, f_sparse, update_every: int = 100) -> float:
    """Average training FLOPs per step, after Evci et al. 2020 (RigL), Appendix H.

    ``f_dense``/``f_sparse`` are the inference (forward) FLOPs of the dense and the
    sparse model (numbers, or per-layer dicts that are summed). A step is a forward
    pass plus a backward pass costing twice the forward (gradients w.r.t. activations
    and w.r.t. weights):

    - ``dense``: ``3·f_D``
    - ``static``, ``set``: ``3·f_S`` (SET's random regrowth costs no gradient)
    - ``snfs``: ``2·f_S + f_D`` (dense weight gradient every step)
    - ``rigl``: ``(3·f_S·ΔT + 2·f_S + f_D) / (ΔT + 1)``, the dense gradient once every
      ``ΔT = update_every`` steps

    Example:

        >>> from sparsejax.flops import training_flops_per_step
        >>> training_flops_per_step('rigl', 100, 10, update_every=100) == (3000 + 20 + 100) / 101
        True
        >>> training_flops_per_step('snfs', 100, 10)   # 2·f_S + f_D
        120.0
    """
    f_d, f_s, dt = _number(f_dense), _number(f_sparse), update_every
    if method == "dense":
        return 3 * f_d
    if method in ("static", "set"):
        return 3 * f_s
    if method == "snfs":
        return 2 * f_s + f_d
    if method == "rigl":
        if dt < 1:
            raise ValueError(f"update_every must be >= 1, got {dt}")
        return (3 * f_s * dt + 2 * f_s + f_d) / (dt + 1)
    raise ValueError(f"unknown training method {method!r}; known: {list(TRAINING_METHODS)}")


def gradual_training_flops(dense: Mapping[str, int],
                           densities_over_steps: Iterable[Mapping[str, float]]) -> float:
    """Average training FLOPs per step of gradual magnitude pruning (Zhu & Gupta 2017):
    ``mean_t 3·f(t)`` with ``f(t)`` the forward FLOPs at step ``t``'s densities, as the
    RigL paper (Appendix H) accounts for pruning.

    Example:

        >>> from sparsejax.flops import gradual_training_flops
        >>> gradual_training_flops({'w': 100}, [{'w': 1.0}, {'w': 0.5}])   # 3 * 75
        225.0
    """
    per_step = [3 * total(sparse_flops(dense, d)) for d in densities_over_steps]
    if not per_step:
        raise ValueError("densities_over_steps is empty")
    return sum(per_step) / len(per_step)


def model_flops(model: nnx.Module, call: Callable[[nnx.Module], Any]) -> dict[str, int]:
    """``layer_flops`` of one forward pass ``call(model)``, by ``nnx.Param`` path.

    ``call(model) -> output`` runs the model however it is called, e.g.
    ``lambda m: m(x)``, ``lambda m: m(tokens, positions)`` or ``lambda m: m(x, nnx.Rngs(0))``
    (create such objects inside the call: it is traced). The model is split into its
    parameters (as a pure dict) and the rest, and traced as
    ``call(nnx.merge(graphdef, params, rest))``; the model itself is not changed.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.flops import model_flops
        >>> from sparsejax.models import MLP
        >>> model_flops(MLP(64, (32,), 10, rngs=nnx.Rngs(0)), lambda m: m(jnp.ones((4, 64))))
        {'head/kernel': 2560, 'layers/0/kernel': 16384, '<activations>': 0}
    """
    check_call(call)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    # rest (BatchNorm statistics) is traced too, so abstract models (eval_shape) work
    try:
        return layer_flops(lambda p, r: call(nnx.merge(graphdef, p, r)), params, rest)
    except flax_errors.TraceContextError as e:
        raise ValueError(OUTSIDE_OBJECT_HINT) from e


__all__ = ["ACTIVATION_KEY", "TRAINING_METHODS", "conv_flops", "densities_from_masks",
           "dot_general_flops", "gradual_training_flops", "layer_flops", "model_flops",
           "sparse_flops", "total", "training_flops_per_step"]
