"""The sparsity-transform contract: ``init``, ``update`` and ``forward``.

A weight-sparsity transform is optax's ``GradientTransformationExtraArgs`` extended by
one pure function, ``forward(params, state) -> params_seen_by_the_model``. It wraps an
inner optax optimizer and keeps its masks (and the inner optimizer state) in a pytree
of arrays, and never needs the model's code to change. See docs/architecture.md, "The
transform contract".

What the model sees is a function of ``(params, opt_state)`` alone. Every sparsejax
state (a *sparsity state*: ``SparseState``, ``NMState``) carries what its ``forward``
needs as arrays, so ``forward(params, opt_state)`` finds every sparsity state anywhere
inside any optax state (``chain``, ``masked``, ``multi_transform``, ``MultiSteps``,
``inject_hyperparams``, ``nnx.Optimizer``'s wrapped state) and applies each to the
parameters it owns. Placements that would silently lose sparsity are errors:

- a transformation after a sparsity transform in ``optax.chain`` changes the updates
  after the masks were applied, so pruned weights would not stay zero and regrown
  weights would not start at zero: put it inside, ``rigl(optax.chain(adamw, scale))``;
- ``optax.MultiSteps`` inside a sparsity transform would count micro-steps: put it
  outside, ``optax.MultiSteps(rigl(...), k)``;
- two sparsity transforms owning one parameter.

Example:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax, sparsejax
    >>> params = {'dense': {'kernel': jnp.ones((8, 4)), 'bias': jnp.zeros(4)}}
    >>> x = jnp.ones((2, 8))
    >>> model_apply = lambda p, x: x @ p['dense']['kernel'] + p['dense']['bias']
    >>> tx = optax.chain(optax.clip_by_global_norm(1.0), sparsejax.rigl(optax.adam(1e-3), 0.9,
    ...                                                                 end_step=1000))
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum(model_apply(sparsejax.forward(p, state), x) ** 2)  # model sees
    >>> updates, state = tx.update(jax.grad(loss)(params), state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> int(jnp.sum(params['dense']['kernel'] != 0))   # 10% of 32 weights; the rest exactly 0
    3
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from sparsejax.masks import count_true, is_unowned, like_param
from sparsejax.paths import named_leaves, path_str, unbox

Params = Any
State = Any


class SparseTransformation(NamedTuple):
    """A sparsity transform: optax's ``(init, update)`` plus ``forward``.

    ``init(params) -> state``; ``update(grads, state, params=None, **extra) ->
    (updates, state)`` with the optax signature, so it drops into any loop or wrapper
    that takes an optax transformation; ``forward(params, state) -> params`` gives the
    parameters the model computes with (``W ⊙ m`` and any custom gradient). ``forward``
    is ``sparsejax.forward`` for every transform: the state says what to apply.

    ``mask_update_due(count) -> 'due' | False`` is the mask-update schedule on the host,
    for a transform whose masks change on a schedule (SET, RigL, gradual pruning):
    whether the update that finds ``count`` in the state (its ``count`` field, the
    number of updates applied before it) changes the masks, as the value to pass on.
    ``None`` where the masks never change on a schedule (static, one-shot, N:M) or the
    schedule is not known (``dense`` around a composed optimizer). Such a transform's
    ``update`` takes ``mask_update``: True (the default) decides on the device, in one
    program for every step; a loop that passes ``mask_update=tx.mask_update_due(count)``
    (a static argument of its jitted step) compiles two programs: the non-update steps
    carry no mask-update code at all, and the update steps no ``lax.cond`` (see
    ``sparsejax.dst``). ``count`` is the number of updates applied, so a loop that skips
    steps counts applied ones; a flag that contradicts the state's count makes that
    step's updates NaN rather than silently keep the old masks or change them.

    Example:

        >>> import optax, sparsejax
        >>> tx = sparsejax.dense(optax.sgd(0.1))
        >>> isinstance(tx, sparsejax.SparseTransformation), tx._fields
        (True, ('init', 'update', 'forward', 'mask_update_due'))
        >>> rigl = sparsejax.rigl(optax.sgd(0.1), 0.9, end_step=1000, update_every=100)
        >>> [t for t in range(350) if rigl.mask_update_due(t)]
        [0, 100, 200, 300]
        >>> rigl.mask_update_due(100), rigl.mask_update_due(101)
        ('due', False)
    """

    init: Callable[[Params], State]
    update: Callable[..., tuple[Params, State]]
    forward: Callable[[Params, State], Params]
    mask_update_due: Callable[[int], bool | str] | None = None


def is_sparsity_state(x) -> bool:
    """Whether ``x`` is a sparsejax sparsity state: it has ``masks`` (``None`` or
    ``optax.MaskedNode`` for parameters it does not make sparse) and a
    ``sparsify(params, differentiable)`` method.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> from sparsejax.base import is_sparsity_state
        >>> params = {'w': {'kernel': jnp.ones((8, 4))}}
        >>> is_sparsity_state(sparsejax.rigl(optax.sgd(.1), .9, end_step=9).init(params))
        True
        >>> is_sparsity_state(optax.sgd(.1).init(params))
        False
    """
    return hasattr(x, "masks") and callable(getattr(type(x), "sparsify", None))


def _child(node, key):
    if isinstance(key, jax.tree_util.SequenceKey):
        return node[key.idx]
    if isinstance(key, jax.tree_util.DictKey):
        return node[key.key]
    if isinstance(key, jax.tree_util.GetAttrKey):
        return getattr(node, key.name)
    return None  # a custom node (FlattenedIndexKey): no chain below it to check


def _check_placement(opt_state, path) -> None:
    """Raises if a sparsity state at ``path`` is followed by more of an ``optax.chain``."""
    node = opt_state
    for depth, key in enumerate(path):
        if type(node) is tuple and isinstance(key, jax.tree_util.SequenceKey):
            after = len(node) - 1 - key.idx
            if after:
                where = jax.tree_util.keystr(tuple(path[:depth + 1]))
                raise ValueError(
                    f"a sparsity transform (state at opt_state{where}) is followed by {after} "
                    "more transformation(s) in optax.chain. They would change the updates "
                    "after the masks are applied, so pruned weights would not stay zero and "
                    "regrown weights would not start at zero. Put them inside the sparsity "
                    "transform, e.g. sparsejax.rigl(optax.chain(optax.adamw(lr), "
                    "optax.scale(0.5)), ...), or before it in the chain.")
        node = _child(node, key)
        if node is None:
            return


def sparsity_states(opt_state) -> list[tuple[str, Any]]:
    """``(where, state)`` for every sparsity state inside ``opt_state``, outermost first.

    ``opt_state`` may be any optax state (``nnx.Optimizer.opt_state`` included). Raises
    if a sparsity state is placed where it would silently lose sparsity (see the module
    docstring).

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> from sparsejax.base import sparsity_states
        >>> p = {'w': {'kernel': jnp.ones((8, 4))}}
        >>> clip = optax.clip_by_global_norm(1.0)
        >>> rigl = sparsejax.rigl(optax.sgd(.1), .9, end_step=9)
        >>> state = optax.chain(clip, rigl).init(p)
        >>> [(where, type(s).__name__) for where, s in sparsity_states(state)]
        [('[1]', 'SparseState')]
        >>> sparsity_states(optax.chain(rigl, clip).init(p))
        Traceback (most recent call last):
            ...
        ValueError: a sparsity transform (state at opt_state[0]) is followed by 1 more ...
    """
    opt_state = unbox(opt_state)
    found = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_sparsity_state)[0]
    out = []
    for path, node in found:
        if is_sparsity_state(node):
            _check_placement(opt_state, path)
            out.append((jax.tree_util.keystr(path), node))
            out.extend((jax.tree_util.keystr(path) + w, s) for w, s in sparsity_states(node.inner))
    return out


def _owned(state) -> set[str]:
    flat = jax.tree_util.tree_flatten_with_path(state.masks, is_leaf=is_unowned)[0]
    return {path_str(p) for p, m in flat if not is_unowned(m)}


def _keeps_masked(state) -> bool:
    return bool(getattr(state, "keeps_params_masked", False))


def _apply(params, opt_state, differentiable: bool, params_masked: bool = False):
    states = sparsity_states(opt_state)
    owner: dict[str, str] = {}
    for where, state in states:
        for path in _owned(state):
            if path in owner:
                raise ValueError(f"parameter {path!r} is made sparse by two sparsity transforms "
                                 f"(states at opt_state{owner[path]} and opt_state{where}); "
                                 "give each parameter to one of them with rules")
            owner[path] = where
    params = unbox(params)
    for _, state in states:
        if not (params_masked and _keeps_masked(state)):
            params = state.sparsify(params, differentiable)
    return params


def forward(params: Params, opt_state: State, *, params_masked: bool = False) -> Params:
    """What the model computes with: every sparsity state found in ``opt_state`` applied to
    the parameters it owns, with its training gradient (RigL's dense ``∂L/∂(W⊙m)``, STE,
    SR-STE, MDGF). Parameters no state owns pass through unchanged.

    Works for any optax state that holds sparsejax transforms, however wrapped; a plain
    optax state gives ``params`` back. ``nnx.Variable`` leaves are read as their values.

    ``params_masked=True`` says the params are already exactly 0 wherever a static,
    one-shot, gradual, SET or RigL mask is 0. They are after ``mask_params`` once, and
    every ``update`` of those transforms keeps them so. Those transforms then pass the
    params through, with the same values and the same dense gradient, and the step
    skips writing a masked copy of every sparse kernel. N:M, SR-STE and MDGF keep dense
    weights and still apply their forward. A loop that says so verifies it now and then
    with ``count_unmasked``, as ``train_and_evaluate`` does at every log, eval and
    checkpoint step.

    Example:

        >>> import jax
        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> params = {'kernel': jnp.arange(1., 17.).reshape(4, 4)}
        >>> loss = lambda p: jnp.sum(p['kernel'])
        >>> tx = optax.MultiSteps(sparsejax.sr_ste(optax.adam(1e-3), [(r'.*kernel', '2:4')]), 4)
        >>> state = tx.init(params)
        >>> sparsejax.forward(params, state)['kernel'][:, 0].tolist()   # 2 of every 4 kept
        [0.0, 0.0, 9.0, 13.0]
        >>> grads = jax.grad(lambda p: loss(sparsejax.forward(p, state)))(params)
        >>> [round(float(g), 4) for g in grads['kernel'][:, 0]]   # SR-STE: g + λ·w where pruned
        [1.0002, 1.001, 1.0, 1.0]
    """
    return _apply(params, opt_state, differentiable=True, params_masked=params_masked)


def mask_params(params: Params, opt_state: State) -> Params:
    """``params`` set to exactly 0 wherever a static, one-shot, gradual, SET or RigL mask
    in ``opt_state`` is 0: what one ``update`` would do to them, done once after ``init``
    so that ``forward(..., params_masked=True)`` holds from the first step. The weights
    of N:M transforms stay dense (they train every weight).

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> params = {'kernel': jnp.ones((4, 4))}
        >>> state = sparsejax.static_sparse(optax.sgd(0.1), 0.75).init(params)
        >>> params = sparsejax.mask_params(params, state)
        >>> int((params['kernel'] != 0).sum()), int(sparsejax.count_unmasked(params, state))
        (4, 0)
    """
    params = unbox(params)
    for _, state in sparsity_states(opt_state):
        if _keeps_masked(state):
            params = state.sparsify(params, differentiable=False)
    return params


def count_unmasked(params: Params, opt_state: State) -> jax.Array:
    """The number of parameter entries that are not 0 where a static, one-shot, gradual,
    SET or RigL mask in ``opt_state`` is 0 (``float32``: exact below 2**24 and never
    wrapping at any size; NaN counts): 0 whenever
    ``forward(..., params_masked=True)`` is right. One pass over those params and masks.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> params = {'kernel': jnp.ones((4, 4))}
        >>> state = sparsejax.static_sparse(optax.sgd(0.1), 0.75).init(params)
        >>> int(sparsejax.count_unmasked(params, state))   # 12 pruned weights still 1.0
        12
    """
    params = unbox(params)
    total = jnp.zeros((), jnp.float32)  # exact below 2**24, never wraps
    for _, state in sparsity_states(opt_state):
        if _keeps_masked(state):
            flat_m, treedef = jax.tree_util.tree_flatten(state.masks, is_leaf=is_unowned)
            for m, w in zip(flat_m, treedef.flatten_up_to(params)):
                if not is_unowned(m):
                    total = total + count_true(~like_param(m, w) & (w != 0), jnp.float32)
    return total


def materialize(params: Params, opt_state: State) -> Params:
    """The effective weights as a plain params tree: what ``forward`` computes, with no
    custom gradient, as arrays a model loads without sparsejax (for export, evaluation,
    serving).

    Example:

        >>> import optax, sparsejax
        >>> from flax import nnx
        >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        >>> params = nnx.state(model, nnx.Param)
        >>> state = sparsejax.rigl(optax.adam(1e-3), 0.9, end_step=100).init(params)
        >>> effective = sparsejax.materialize(params, state)   # exact zeros where masked
        >>> nnx.update(model, effective)
        >>> int((model.kernel[...] != 0).sum())   # 3 of 32 weights left
        3
    """
    return jax.lax.stop_gradient(_apply(params, opt_state, differentiable=False))


# ----------------------------------------------------------------------------- nnx


def _opt_state(optimizer) -> State:
    if not hasattr(optimizer, "opt_state") or not hasattr(optimizer, "wrt"):
        raise TypeError(f"expected an nnx.Optimizer, got {type(optimizer).__name__}")
    return unbox(optimizer.opt_state)


@contextlib.contextmanager
def sparse_weights(model: nnx.Module, optimizer, *, params_masked: bool = False):
    """Within the block, ``model``'s parameters are what the model should compute with
    (``forward(params, optimizer.opt_state, params_masked=params_masked)``); on exit they
    are the stored ones again.

    Made for ``nnx.Optimizer`` loops: inside ``nnx.value_and_grad`` the gradient reaches
    the stored parameters through the transform's custom backward. Other state the model
    changes in the block (BatchNorm statistics, Dropout rng counts) is kept.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> from flax import nnx
        >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        >>> tx = sparsejax.rigl(optax.adam(1e-3), 0.9, end_step=100)
        >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        >>> with sparsejax.sparse_weights(model, optimizer):
        ...     nonzero_inside = int((model.kernel[...] != 0).sum())
        ...     logits = model(jnp.ones((1, 8)))
        >>> nonzero_inside, int((model.kernel[...] != 0).sum()), logits.shape
        (3, 32, (1, 4))
    """
    pure = nnx.to_pure_dict(nnx.state(model, optimizer.wrt))
    _set_params(model, optimizer.wrt,
                forward(pure, _opt_state(optimizer), params_masked=params_masked))
    try:
        yield model
    finally:
        _set_params(model, optimizer.wrt, pure)


def _set_params(model: nnx.Module, wrt, pure) -> None:
    state = nnx.state(model, wrt)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)


def value_and_grad(fn: Callable, optimizer, *, has_aux: bool = False,
                   params_masked: bool = False, **grad_kw) -> Callable:
    """``nnx.value_and_grad(fn)`` where ``fn(model, *args)`` sees the sparse weights.

    The drop-in for the Flax training loop: replace
    ``nnx.value_and_grad(loss_fn, has_aux=True)`` with
    ``sparsejax.value_and_grad(loss_fn, optimizer, has_aux=True)``; ``optimizer`` is the
    ``nnx.Optimizer`` holding a sparsejax transform (inside ``nnx.jit``, the traced one
    passed to the step). Gradients are with respect to the stored parameters, ready for
    ``optimizer.update(model, grads)``. ``params_masked=True`` is ``forward``'s: mask
    the model's parameters once after building the optimizer, ``nnx.update(model,
    sparsejax.mask_params(nnx.state(model, nnx.Param), optimizer.opt_state))``, and the
    static/SET/RigL/gradual kernels are used as stored, with no masked copy per step.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> from flax import nnx
        >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        >>> tx = sparsejax.rigl(optax.adam(1e-3), 0.9, end_step=100)
        >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        >>> def loss_fn(model, batch):
        ...     logits = model(batch)
        ...     return jnp.mean(logits ** 2), logits
        >>> grad_fn = sparsejax.value_and_grad(loss_fn, optimizer, has_aux=True)
        >>> (loss, logits), grads = grad_fn(model, jnp.ones((2, 8)))
        >>> grads['kernel'][...].shape   # w.r.t. the stored (dense) kernel
        (8, 4)
        >>> _ = optimizer.update(model, grads)
        >>> int((model.kernel[...] != 0).sum())   # pruned weights stored as exact zeros
        3
    """

    def sparse_fn(model, *args, **kw):
        with sparse_weights(model, optimizer, params_masked=params_masked):
            return fn(model, *args, **kw)

    return nnx.value_and_grad(sparse_fn, has_aux=has_aux, **grad_kw)


def sparse_model(model: nnx.Module, optimizer) -> nnx.Module:
    """A copy of ``model`` whose parameters are ``materialize(params, opt_state)``: the
    model to evaluate or export. ``model`` is not changed.

    Example:

        >>> import optax, sparsejax
        >>> from flax import nnx
        >>> model = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
        >>> tx = sparsejax.rigl(optax.adam(1e-3), 0.9, end_step=100)
        >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        >>> evaluated = sparsejax.sparse_model(model, optimizer)   # e.g. for eval_step
        >>> int((evaluated.kernel[...] != 0).sum()), int((model.kernel[...] != 0).sum())
        (3, 32)
    """
    copy = nnx.clone(model)
    pure = nnx.to_pure_dict(nnx.state(copy, optimizer.wrt))
    _set_params(copy, optimizer.wrt, materialize(pure, _opt_state(optimizer)))
    return copy


# ----------------------------------------------------------------------------- checks


def check_static(**args) -> None:
    """Raises a TypeError naming any argument that is a JAX array: what these arguments
    fix (mask sizes, schedules) must be known when the transform is built.

    ``optax.inject_hyperparams`` turns every numeric argument of the factory it wraps into
    an array; a sparsity transform cannot be rebuilt with traced sizes.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.base import check_static
        >>> check_static(sparsity=0.9, end_step=100)   # fine
        >>> check_static(sparsity=jnp.float32(.9))
        Traceback (most recent call last):
            ...
        TypeError: sparsity: JAX array(s), but they fix the masks and schedules ...
    """
    arrays = [name for name, value in args.items() if isinstance(value, jax.Array)]
    if arrays:  # (tracers are jax.Array too)
        raise TypeError(
            f"{', '.join(arrays)}: JAX array(s), but they fix the masks and schedules and "
            "must be Python numbers. optax.inject_hyperparams makes every numeric argument "
            "an array: inject the inner optimizer's hyperparameters instead, e.g. "
            "sparsejax.rigl(optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3), 0.9, "
            "end_step=...), or list these arguments in static_args.")


def check_int(minimum: int = 1, **args) -> None:
    """Raises a ValueError naming the first argument that is not an integer ``>= minimum``
    (Python or numpy integers; ``bool`` is not one). A tuple or list argument must hold
    such integers only (layer widths).

    Example:

        >>> import numpy as np
        >>> from sparsejax.base import check_int
        >>> check_int(update_every=100, hidden=(64, np.int64(32)))   # fine
        >>> check_int(0, begin_step=0)                               # minimum 0: fine
        >>> check_int(update_every=1.5)
        Traceback (most recent call last):
            ...
        ValueError: update_every must be a positive integer, got 1.5
        >>> check_int(hidden=(0,))
        Traceback (most recent call last):
            ...
        ValueError: hidden must be positive integers, got (0,)
    """
    what = {1: "positive", 0: "non-negative"}.get(minimum, f">= {minimum}")
    for name, value in args.items():
        many = isinstance(value, (tuple, list))
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= minimum
                   for v in (value if many else [value])):
            kind = f"{what} integers" if many else f"a {what} integer"
            raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_number(name: str, value, *, positive: bool = True) -> None:
    """Raises a ValueError naming ``name`` unless ``value`` is a finite real number, ``> 0``
    (``positive``) or ``>= 0`` (``bool`` is not a number here).

    Example:

        >>> from sparsejax.base import check_number
        >>> check_number('learning_rate', 1e-3)                      # fine
        >>> check_number('learning_rate', float('nan'))
        Traceback (most recent call last):
            ...
        ValueError: learning_rate must be a finite number > 0, got nan
    """
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            or not math.isfinite(value) or value < 0 or (positive and value == 0)):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, "
                         f"got {value!r}")


def check_grads(grads, params, name: str) -> None:
    """Raises a ValueError unless ``params`` is given and ``grads`` has its parameters (by
    path, as ``sparsejax.paths`` names them) with the same shape and dtype each: what a
    ``name``'s ``update`` checks while tracing, before it mixes the two.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.base import check_grads
        >>> params = {'layers': [{'kernel': jnp.ones((4, 2))}]}
        >>> check_grads({'layers': [{'kernel': jnp.zeros((4, 2))}]}, params, 'rigl')   # fine
        >>> check_grads({'layers': [{'kernel': jnp.zeros((4, 2), jnp.float16)}]}, params, 'rigl')
        Traceback (most recent call last):
            ...
        ValueError: rigl: the gradient of parameter 'layers/0/kernel' is float16 (4, 2), the
        parameter float32 (4, 2): cast the gradients to the parameter dtype...
    """
    if params is None:
        raise ValueError(f"{name} need params: call update(grads, state, params)")
    g, p = dict(named_leaves(grads)), dict(named_leaves(params))
    if g.keys() != p.keys():
        raise ValueError(f"{name}: grads and params differ in structure: parameters without a "
                         f"gradient {sorted(p.keys() - g.keys())[:4]}, gradients without a "
                         f"parameter {sorted(g.keys() - p.keys())[:4]}; pass the gradients of "
                         "exactly the parameters given to update")
    for path, w in p.items():
        gd, wd = jnp.result_type(g[path]), jnp.result_type(w)
        if np.shape(g[path]) != np.shape(w) or gd != wd:
            fix = ("cast the gradients to the parameter dtype, e.g. jax.tree.map(lambda g, p: "
                   "g.astype(p.dtype), grads, params)" if np.shape(g[path]) == np.shape(w) else
                   "pass the gradients of the parameters given to update")
            raise ValueError(f"{name}: the gradient of parameter {path!r} is {gd} "
                             f"{tuple(np.shape(g[path]))}, the parameter {wd} "
                             f"{tuple(np.shape(w))}: {fix}")


def check_inner_state(inner_state, name: str = "sparsity transform") -> None:
    """Raises if the inner optimizer's state holds ``optax.MultiSteps``: the transform
    would count micro-steps and update masks from one micro-batch's gradient.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax
        >>> from sparsejax.base import check_inner_state
        >>> params = {'w': jnp.ones(3)}
        >>> check_inner_state(optax.adam(1e-3).init(params))   # fine
        >>> check_inner_state(optax.MultiSteps(optax.adam(1e-3), 4).init(params))
        Traceback (most recent call last):
            ...
        ValueError: optax.MultiSteps inside a sparsity transform would count micro-steps ...
    """
    if optax.tree_utils.tree_get_all_with_path(inner_state, "MultiStepsState"):
        raise ValueError(f"optax.MultiSteps inside a {name} would count micro-steps and "
                         "change masks on one micro-batch: put it outside, "
                         "optax.MultiSteps(sparsejax.rigl(optax.adam(lr), ...), "
                         "every_k_schedule=k)")


# ----------------------------------------------------------------------------- wrapping


def _checked_init(init: Callable) -> Callable:
    def checked(params):
        state = init(params)
        sparsity_states(state)  # raises on a placement that would lose sparsity
        return state
    return checked


def dense(inner: optax.GradientTransformation) -> SparseTransformation:
    """``inner`` as a ``SparseTransformation``: ``forward`` applies whatever sparsity
    states ``inner`` holds (none for a plain optimizer: the dense baseline).

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> tx = sparsejax.dense(optax.adamw(3e-4))
        >>> state = tx.init({'w': jnp.ones(3)})
        >>> tx.forward({'w': jnp.ones(3)}, state)['w'].tolist()   # nothing masked
        [1.0, 1.0, 1.0]
    """
    inner = optax.with_extra_args_support(inner)
    return SparseTransformation(_checked_init(inner.init), inner.update, forward)


def as_sparse_transformation(tx: Any) -> SparseTransformation:
    """Any optax transformation as a ``SparseTransformation``: ``tx`` itself if it is
    one, else ``dense(tx)``, whose ``forward`` finds the sparsity states inside (so
    ``optax.chain(clip, sparsejax.sr_ste(...))`` keeps its N:M forward).

    Example:

        >>> import optax, sparsejax
        >>> tx = sparsejax.as_sparse_transformation(optax.sgd(0.1))
        >>> tx.forward({'w': 1.0}, tx.init({'w': 1.0}))
        {'w': 1.0}
        >>> rigl = sparsejax.rigl(optax.sgd(0.1), 0.9, end_step=9)
        >>> sparsejax.as_sparse_transformation(rigl) is rigl
        True
    """
    if isinstance(tx, SparseTransformation):
        return tx
    if hasattr(tx, "init") and hasattr(tx, "update"):
        return dense(tx)
    raise TypeError(
        f"expected an optax GradientTransformation or a sparsejax SparseTransformation, "
        f"got {type(tx).__name__}"
    )
