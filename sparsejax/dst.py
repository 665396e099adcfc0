"""Weight-sparsity transforms: static, one-shot magnitude, gradual magnitude, SET, RigL.

Each factory wraps an optax optimizer and returns a ``SparseTransformation``
(``init``, ``update``, ``forward``; see ``sparsejax.base``). Masks live in
``SparseState``, a NamedTuple of arrays that jits, shards like the params and
checkpoints with orbax unchanged. Masks change inside ``jit`` through ``lax.cond`` on
the step counter, so a train step compiles once.

What every transform guarantees:

- the model sees ``W ⊙ m`` (``forward``); the gradient it returns is the dense
  ``∂L/∂(W⊙m)``, and the inner optimizer sees it masked to active weights;
- inactive weights are exactly 0 after every ``update`` (a weight that is already NaN or
  inf when dropped cannot be zeroed through optax's additive ``params + updates``; the
  model still sees exact zeros there, since ``forward`` selects rather than multiplies);
- each sparse layer's nonzero count is exactly preserved by SET/RigL updates;
- new connections start at 0, and so does every parameter-shaped leaf of the inner
  optimizer's state at inactive positions (moments, schedule-free's ``z``), found by tree
  structure (subtrees shaped like the params), whatever the optimizer. The state
  is zeroed when masks change (``init`` and mask-update steps); between updates inactive
  entries see zero gradient and zero weight, so an elementwise optimizer keeps them 0.

Drop/grow update (Evci et al. 2020, RigL, Alg. 1; Mocanu et al. 2018, SET), per layer
at update steps ``t = begin, begin+ΔT, … ≤ T_end``:
``n_drop = ⌊f_t · n_active⌋``; keep the ``n_active − n_drop`` largest ``|w| + N(0, σ²)``
among active weights (σ = 1e-5, the reference's tie-breaking noise, drawn by
``masks.tie_noise``, a counter hash ~7x cheaper than threefry); grow ``n_drop``
among the rest (a just-dropped weight may come back) by largest ``|∂L/∂(W⊙m)|`` (RigL)
or at random (SET). RigL skips the gradient step on update steps as the reference code
does; SET applies it first. Both are switchable (``skip_gradient_on_update``).

Example:

    >>> import jax
    >>> import jax.numpy as jnp
    >>> import optax, sparsejax
    >>> params = {'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.zeros(8)}}
    >>> x = jnp.ones((2, 16))
    >>> loss = lambda p: jnp.sum((x @ p['dense']['kernel'] + p['dense']['bias']) ** 2)
    >>> tx = sparsejax.rigl(optax.adamw(3e-4), sparsity=0.9, distribution=sparsejax.erk(),
    ...                     update_every=100, end_step=7500, drop_fraction=0.3)
    >>> state = tx.init(params)
    >>> before = state.masks['dense']['kernel']
    >>> grads = jax.grad(loss)(tx.forward(params, state))   # or grad through forward
    >>> updates, state = tx.update(grads, state, params)   # t = 0: a mask-update step
    >>> sparsejax.mask_counts(state.masks), int(state.count)   # nonzero count preserved
    ({'dense/kernel': (13, 128)}, 1)
    >>> bool((before != state.masks['dense']['kernel']).any())   # connections dropped and grown
    True
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sparsejax.base import (SparseTransformation, check_grads, check_inner_state, check_int,
                            check_static, forward)
from sparsejax.distributions import Distribution, as_distribution, layer_counts
from sparsejax.masks import (SELECTION_METHODS, apply_masks, count_true, global_magnitude_masks,
                             is_unowned, layer_topk_masks, like_param, magnitude_score,
                             map_masked, masked_with_dense_grad, random_score, resolve_rules,
                             tie_noise)
from sparsejax.paths import SparsityRule, match_rules, named_leaves, path_str, unbox
from sparsejax.schedules import drop_fraction_schedule, gradual_sparsity, is_update_step


class SparseState(NamedTuple):
    """State of a weight-sparsity transform.

    ``inner``: the wrapped optimizer's state; ``masks``: bool arrays for sparse leaves,
    ``None`` for dense ones (``optax.MaskedNode`` for parameters a wrapper gives to
    another transform); ``count``: updates applied so far (the step ``t``);
    ``key``: PRNG key for random masks, SET growth and tie-breaking noise.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> params = {'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.zeros(8)}}
        >>> tx = sparsejax.static_sparse(optax.sgd(0.1), 0.9)
        >>> state = tx.init(params)
        >>> sparsejax.mask_counts(state.masks), state.masks['dense']['bias'], int(state.count)
        ({'dense/kernel': (13, 128)}, None, 0)
    """

    inner: Any
    masks: Any
    count: jax.Array
    key: jax.Array

    # Every ``update`` leaves the params exactly 0 where the mask is 0, so params that
    # are masked once stay masked: ``base.forward(..., params_masked=True)`` passes them
    # through instead of writing a masked copy.
    keeps_params_masked = True

    def sparsify(self, params, differentiable: bool = True):
        """``W ⊙ m`` on the leaves this state owns; with ``differentiable`` the gradient is
        the dense ``∂L/∂(W⊙m)`` at every entry (what RigL grows by)."""
        return (masked_with_dense_grad if differentiable else apply_masks)(params, self.masks)


# A mask update: (t, weights, dense grads, masks, key) -> (new masks, new connections).
MaskUpdate = Callable[..., tuple[Any, Any]]


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_sparsity(sparsity: float) -> None:
    check_static(sparsity=sparsity)
    _check(isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0,
           f"sparsity {sparsity!r} is outside [0, 1)")


def _check_steps(update_every: int, begin_step: int, end_step: int) -> None:
    check_int(update_every=update_every)
    check_int(0, begin_step=begin_step, end_step=end_step)
    _check(begin_step <= end_step, f"need 0 <= begin_step <= end_step, got "
                                   f"{begin_step}, {end_step}")


def mask_param_state(inner_state, keep, params):
    """Zeros every parameter-shaped copy inside an optimizer state where ``keep`` is False.

    A parameter-shaped copy (Adam's moments, momentum, schedule-free's ``z``) is a subtree
    with the params' tree structure and leaf shapes: found by structure, whatever the
    optimizer's state types, without re-running its ``init``. ``keep`` is a mask tree
    (``None`` or ``optax.MaskedNode`` leaves are left alone).

    Example:

        >>> import jax.numpy as jnp
        >>> import optax
        >>> from sparsejax.dst import mask_param_state
        >>> params, masks = {'w': jnp.ones(3)}, {'w': jnp.array([True, False, True])}
        >>> adam = optax.adam(1e-3)
        >>> _, state = adam.update({'w': jnp.ones(3)}, adam.init(params))   # moments now nonzero
        >>> inner = mask_param_state(state, masks, params)
        >>> (inner[0].mu['w'] != 0).tolist(), (inner[0].nu['w'] != 0).tolist(), int(inner[0].count)
        ([True, False, True], [True, False, True], 1)
    """
    treedef = jax.tree.structure(params, is_leaf=is_unowned)
    shapes = [np.shape(x) for x in jax.tree.leaves(params, is_leaf=is_unowned)]

    def params_like(x) -> bool:
        return (jax.tree.structure(x, is_leaf=is_unowned) == treedef and
                [np.shape(v) for v in jax.tree.leaves(x, is_leaf=is_unowned)] == shapes)

    def zero(x, k):
        return x if is_unowned(k) or is_unowned(x) else jnp.where(k, x, jnp.zeros_like(x))

    return jax.tree.map(lambda x: jax.tree.map(zero, x, keep, is_leaf=is_unowned)
                        if params_like(x) else x, inner_state, is_leaf=params_like)


def stacked_paths(params, stacked: str | Sequence[str] = ()) -> frozenset[str]:
    """The parameter paths whose leading axis stacks layers (``nnx.scan`` over layers):
    every regex in ``stacked`` must fully match at least one path.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.dst import stacked_paths
        >>> params = {'blocks': {'w': jnp.ones((4, 8, 8))}, 'head': {'w': jnp.ones((8, 2))}}
        >>> sorted(stacked_paths(params, [r'blocks/.*']))
        ['blocks/w']
    """
    if isinstance(stacked, str):
        stacked = (stacked,)
    if not stacked:
        return frozenset()
    return frozenset(path for path, _, pattern, _ in
                     match_rules(params, [(s, True) for s in stacked], "stacked-layer")
                     if pattern is not None)


def sparse_layer_counts(params, sparsity: float, distribution: Distribution,
                        rules: Sequence[SparsityRule] | None = None,
                        stacked: str | Sequence[str] = ()) -> dict[str, Any]:
    """Exact nonzero count of every sparse leaf, from path rules and a distribution.

    A ``stacked`` leaf (regexes, see ``stacked_paths``) is a stack of layers along its
    leading axis: each slice is its own layer for the distribution (ERK sees the slice's
    shape), and its count is an ``int`` array with one entry per slice. Slices enter the
    solve layer by layer, as an unscanned model's layers do, so both give equal counts.

    Example:

        >>> import jax.numpy as jnp
        >>> import sparsejax
        >>> from sparsejax.dst import sparse_layer_counts
        >>> params = {'l1': {'kernel': jnp.ones((16, 8)), 'bias': jnp.zeros(8)},
        ...           'l2': {'kernel': jnp.ones((8, 4))}}
        >>> sparse_layer_counts(params, 0.9, sparsejax.erk())   # 10% of 160 weights, by ERK
        {'l1/kernel': 11, 'l2/kernel': 5}
        >>> stack = {'blocks': {'kernel': jnp.ones((2, 16, 8))}}   # two layers, stacked
        >>> sparse_layer_counts(stack, 0.9, sparsejax.erk(), stacked='blocks/.*')
        {'blocks/kernel': array([13, 13])}
    """
    _check_sparsity(sparsity)
    specs = resolve_rules(params, rules)
    stacks = stacked_paths(params, stacked)
    leaves = [(p, x) for p, x in named_leaves(params) if specs[p] != "dense"]
    for p, x in leaves:
        _check(p not in stacks or np.ndim(x) >= 2,
               f"stacked parameter {p!r} of shape {tuple(np.shape(x))} has no layer axis and "
               "kernel dims: a stacked sparse leaf needs at least 2 dimensions")
    shapes, custom, names = {}, {}, {}
    grouped = [(p, x) for p, x in leaves if p in stacks]
    depth = max([np.shape(x)[0] for _, x in grouped], default=0)
    for p, x in leaves:
        if p in stacks:
            if p != grouped[0][0]:
                continue
            for layer in range(depth):  # slices layer-major, like an unscanned model
                for q, y in grouped:
                    if layer < np.shape(y)[0]:
                        shapes[f"{q}[{layer}]"] = tuple(np.shape(y)[1:])
                        names.setdefault(q, []).append(f"{q}[{layer}]")
        else:
            shapes[p] = tuple(np.shape(x))
            names[p] = [p]
    for p, _ in leaves:
        if isinstance(specs[p], float):
            custom.update({n: specs[p] for n in names[p]})
    counts = layer_counts(distribution, shapes, sparsity, custom)
    return {p: np.array([counts[n] for n in names[p]]) if p in stacks else counts[p]
            for p, _ in leaves}


def _flat_masks(masks):
    return jax.tree_util.tree_flatten(masks, is_leaf=is_unowned)


def init_masks(params, counts: dict[str, Any], how: str, key, selection: str = "threshold"):
    """Masks with exactly ``counts[path]`` nonzeros: 'random' or 'magnitude' (largest |w|).
    A count array (one per layer, ``sparse_layer_counts`` of a stacked leaf) selects each
    slice of that leaf on its own. All layers are selected together
    (``masks.layer_topk_masks``).

    Example:

        >>> import jax
        >>> import jax.numpy as jnp
        >>> from sparsejax.dst import init_masks
        >>> params = {'w': jnp.arange(20.).reshape(4, 5) - 10, 'b': jnp.zeros(5)}
        >>> masks = init_masks(params, {'w': 10}, 'magnitude', jax.random.PRNGKey(0))
        >>> masks['w'].astype(int).tolist(), masks['b']   # the 10 largest |w|; 'b' stays dense
        ([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], None)
    """
    _check(how in ("random", "magnitude"), f"unknown mask_init {how!r}; known: "
                                            "['magnitude', 'random']")
    flat, treedef = jax.tree_util.tree_flatten_with_path(unbox(params), is_leaf=is_unowned)
    scores, ks, stacks = [], [], set()
    for i, (path, w) in enumerate(flat):
        name = path_str(path)
        if is_unowned(w) or name not in counts:
            scores.append(w if is_unowned(w) else None)  # keep optax.MaskedNode
            ks.append(None)
            continue
        scores.append(random_score(jax.random.fold_in(key, i), w.shape) if how == "random"
                      else magnitude_score(w))
        ks.append(counts[name])
        if np.ndim(counts[name]):
            stacks.add(name)
    masks = layer_topk_masks(jax.tree_util.tree_unflatten(treedef, scores),
                             jax.tree_util.tree_unflatten(treedef, ks), method=selection,
                             stacked=stacks)
    return jax.tree.map(lambda m, w: m if is_unowned(m) else like_param(m, w), masks,
                        unbox(params), is_leaf=is_unowned)


def _poison_where(updates, bad):
    """``updates`` + NaN where ``bad``: a static ``mask_update`` that contradicts the
    device's schedule (False on a due step, ``'due'`` on another) gives NaN parameters
    instead of silently keeping the old masks or changing them off schedule.

    One fused add per leaf and no host callback (a callback that raises inside a sharded
    program leaves the other devices waiting in their collectives). Float leaves only.
    """
    nan = jnp.where(bad, jnp.nan, 0.0)
    return jax.tree.map(lambda u: u + nan.astype(u.dtype)
                        if jnp.issubdtype(u.dtype, jnp.floating) else u, updates)


def _after_gradients(grads, tree):
    """``tree``, unchanged, but computed only once all of ``grads`` is.

    A mask update's inputs other than the gradients are ready when the step starts, so
    XLA may start the update during the backward pass and add its temporaries to that
    pass's peak; after it, they reuse its memory. An optimization barrier would say so
    on accelerators, but XLA:CPU removes barriers before it schedules, so the order is a
    data dependence: a flag computed from one max of ``|g|`` per leaf (an all-reduce of
    scalars) that is always False (``x != x and x == x``), which XLA cannot know. The
    update passes the sparse leaves' gradients only: the others (biases, norms) are
    small, finish with them, and would each add a reduction kernel to compile."""
    leaves = [g for g in jax.tree.leaves(grads) if jnp.size(g)]
    if not leaves:
        return tree
    g = jnp.max(jnp.stack([jnp.max(jnp.abs(x)).astype(jnp.float32) for x in leaves]))
    never = (g != g) & (g == g)
    return jax.tree.map(lambda x: jnp.where(never, jnp.zeros((), x.dtype), x), tree)


#: The static ``mask_update`` of a step whose mask update the host schedule says is due
#: (what ``SparseTransformation.mask_update_due`` returns for such a step).
DUE = "due"


def _sparse_transform(inner: optax.GradientTransformation, *, init_counts, mask_init: str,
                      seed: int, selection: str, mask_update: MaskUpdate | None = None,
                      update_due: Callable | None = None,
                      skip_gradient_on_update: bool = False) -> SparseTransformation:
    """The engine every weight-sparsity transform is built from.

    ``update(..., mask_update=True)`` decides on the device: ``lax.cond(update_due(t),
    …)``, one compiled step for every call. A loop that knows the schedule
    (``mask_update_due(count)``, False or ``DUE``) passes it as a static argument and
    dispatches two programs. ``False`` leaves the mask-update code out: a cond holds its
    untaken branch's buffers on XLA:CPU, so those steps cost what masking costs.
    ``DUE`` updates the masks with no cond around the update: a cond is a fusion
    barrier, and without it the update program is the plain step's kernels plus the
    selection's, not a second copy of the step's update code inside a branch (1B
    decoder on FSDP-64: 1,032 generated kernels against 1,183 with the cond; the dense
    step has 801). A static flag that contradicts the device's count is never silent: that
    step's updates are NaN (``_poison_where``), which a loop's finiteness check stops on.
    """
    mask_update_fn = mask_update
    _check(selection in SELECTION_METHODS,
           f"unknown selection method {selection!r}; known: {SELECTION_METHODS}")
    inner = optax.with_extra_args_support(inner)

    def init(params):
        params = unbox(params)
        key, sub = jax.random.split(jax.random.PRNGKey(seed))
        masks = init_masks(params, init_counts(params), mask_init, sub, selection)
        inner_state = inner.init(params)
        check_inner_state(inner_state)
        inner_state = mask_param_state(inner_state, masks, params)  # e.g. schedule-free's z
        return SparseState(inner_state, masks, jnp.zeros((), jnp.int32), key)

    def update(grads, state, params=None, *, mask_update: bool | str = True, **extra):
        check_grads(grads, params, "sparsity transforms")
        if not (isinstance(mask_update, (bool, np.bool_))
                or (isinstance(mask_update, str) and mask_update == DUE)):
            raise TypeError(f"mask_update must be a Python bool or {DUE!r}, got "
                            f"{mask_update!r} ({type(mask_update).__name__}): make it a "
                            "static argument of the jitted step (static_argnums), e.g. "
                            "mask_update=tx.mask_update_due(count)")
        grads, params = unbox(grads), unbox(params)
        masks, t = state.masks, state.count
        masked_grads = map_masked(lambda m, g: jnp.where(m, g, 0), masks, grads)
        u, inner_state = inner.update(masked_grads, state.inner, params, **extra)
        # params + step: active entries move, inactive ones become exactly 0.
        step_updates = map_masked(lambda m, d, p: jnp.where(m, d, -p), masks, u, params)
        if mask_update_fn is None or not mask_update:
            if mask_update_fn is not None:  # the caller said no update is due: if it is, NaN
                step_updates = _poison_where(step_updates, update_due(t))
            return step_updates, SparseState(inner_state, masks, t + 1, state.key)

        def with_mask_update(_):
            if skip_gradient_on_update:
                base_updates, base_inner = jax.tree.map(jnp.zeros_like, params), state.inner
            else:
                base_updates, base_inner = step_updates, inner_state
            weights = optax.apply_updates(params, base_updates)
            key, sub = jax.random.split(state.key)
            flat_m, treedef = _flat_masks(masks)
            sparse_grads = [g for m, g in zip(flat_m, treedef.flatten_up_to(grads))
                            if not is_unowned(m)]
            w, m, sub = _after_gradients(sparse_grads, (weights, masks, sub))
            new_masks, new_conn = mask_update_fn(t, w, grads, m, sub)
            keep = map_masked(lambda m, c: m & ~c, new_masks, new_conn)  # new ones start at 0
            updates = map_masked(lambda k, d, p: jnp.where(k, d, -p), keep, base_updates, params)
            return updates, mask_param_state(base_inner, keep, params), new_masks, key

        def without(_):
            return step_updates, inner_state, masks, state.key

        if isinstance(mask_update, str):  # DUE: the caller says an update is due; if not, NaN
            updates, inner_state, masks, key = with_mask_update(None)
            updates = _poison_where(updates, ~update_due(t))
        else:
            updates, inner_state, masks, key = jax.lax.cond(update_due(t), with_mask_update,
                                                            without, None)
        return updates, SparseState(inner_state, masks, t + 1, key)

    due_on_host = None if mask_update_fn is None else (
        lambda count: DUE if bool(update_due(int(count))) else False)
    return SparseTransformation(init, update, forward, due_on_host)


# ----------------------------------------------------------------------------- factories


def static_sparse(inner: optax.GradientTransformation, sparsity: float, *,
                  distribution: Distribution | str | None = None, rules: Sequence[SparsityRule] | None = None,
                  mask_init: str = "random", seed: int = 0, selection: str = "threshold",
                  stacked: str | Sequence[str] = ()) -> SparseTransformation:
    """Fixed masks for all of training: random (sparse-from-scratch, Liu et al. 2022's
    random pruning with ER/ERK ratios) or by magnitude at init.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> tx = sparsejax.static_sparse(optax.sgd(0.1), 0.9, distribution=sparsejax.erk())
        >>> state = tx.init({'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.zeros(8)}})
        >>> sparsejax.mask_counts(state.masks)
        {'dense/kernel': (13, 128)}
    """
    _check_sparsity(sparsity)
    dist = as_distribution(distribution)
    return _sparse_transform(
        inner, init_counts=lambda p: sparse_layer_counts(p, sparsity, dist, rules, stacked),
        mask_init=mask_init, seed=seed, selection=selection)


def one_shot_magnitude(inner: optax.GradientTransformation, sparsity: float, *,
                       distribution: Distribution | str | None = None, rules: Sequence[SparsityRule] | None = None,
                       scope: str = "layer", selection: str = "threshold",
                       stacked: str | Sequence[str] = ()) -> SparseTransformation:
    """Prune the smallest ``|w|`` of the params given to ``init`` once, then train the
    rest with fixed masks. ``scope='layer'`` follows ``distribution``; ``'global'``
    ranks all sparse layers together (one threshold, exact total count).

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> trained_params = {'l1': {'kernel': jnp.arange(128.).reshape(16, 8)},
        ...                   'l2': {'kernel': jnp.arange(32.).reshape(8, 4) * 10}}
        >>> tx = sparsejax.one_shot_magnitude(optax.adam(1e-4), 0.8, scope='global')
        >>> state = tx.init(trained_params)
        >>> sparsejax.mask_counts(state.masks)   # 32 of 160 kept, wherever |w| is largest
        {'l1/kernel': (12, 128), 'l2/kernel': (20, 32)}
    """
    _check_sparsity(sparsity)
    _check(scope in ("layer", "global"), f"unknown scope {scope!r}; known: ['global', 'layer']")
    dist = as_distribution(distribution)
    if scope == "layer":
        return _sparse_transform(
            inner, init_counts=lambda p: sparse_layer_counts(p, sparsity, dist, rules, stacked),
            mask_init="magnitude", seed=0, selection=selection)
    tx = _sparse_transform(inner, init_counts=lambda p: {}, mask_init="magnitude", seed=0,
                           selection=selection)

    def init(params):
        params = unbox(params)
        masks = global_magnitude_masks(params, sparsity, rules, method=selection)
        return tx.init(params)._replace(masks=masks)

    return SparseTransformation(init, tx.update, tx.forward, tx.mask_update_due)


def gradual_magnitude(inner: optax.GradientTransformation, sparsity: float, *,
                      begin_step: int, end_step: int, update_every: int = 100,
                      initial_sparsity: float = 0.0, distribution: Distribution | str | None = None,
                      rules: Sequence[SparsityRule] | None = None, selection: str = "threshold",
                      stacked: str | Sequence[str] = ()) -> SparseTransformation:
    """Gradual magnitude pruning (Zhu & Gupta 2017): at ``t = t_0, t_0 + ΔT, … ≤ T`` and at
    ``T`` itself, prune the smallest active ``|w|`` of each layer to
    ``s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(T − t_0))³`` (per layer, with ``s_f`` that
    layer's final sparsity from ``distribution``). Pruned weights stay pruned. The update
    at ``T`` keeps exactly the layer's final count (``sparse_layer_counts``), so training
    ends on the target even when ``T − t_0`` is not a multiple of ΔT.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> tx = sparsejax.gradual_magnitude(optax.adam(1e-3), 0.9, begin_step=1000,
        ...                                  end_step=8000, update_every=100)
        >>> state = tx.init({'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.zeros(8)}})
        >>> sparsejax.mask_counts(state.masks)   # dense until begin_step (initial_sparsity=0)
        {'dense/kernel': (128, 128)}
    """
    check_static(sparsity=sparsity, initial_sparsity=initial_sparsity,
                 update_every=update_every, begin_step=begin_step, end_step=end_step)
    _check_sparsity(sparsity)
    _check_sparsity(initial_sparsity)
    _check_steps(update_every, begin_step, end_step)
    dist = as_distribution(distribution)
    ramp = gradual_sparsity(1.0, begin_step, end_step, 0.0)  # 1 − (1 − frac)³

    def init_counts(params):  # s_i everywhere, never below a layer's final count
        final = sparse_layer_counts(params, sparsity, dist, rules, stacked)
        sizes = dict((p, x.size // (x.shape[0] if np.ndim(final.get(p, 0)) else 1))
                     for p, x in named_leaves(params))  # per layer
        return {p: np.maximum(round((1.0 - initial_sparsity) * sizes[p]), final[p])
                for p in final}

    def mask_update(t, weights, grads, masks, key):
        final = sparse_layer_counts(weights, sparsity, dist, rules, stacked)
        flat, treedef = _flat_masks(masks)
        w_by = dict(named_leaves(weights))
        paths = [path_str(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_unowned)[0]]
        scores, keeps = [], []
        for path, m in zip(paths, flat):
            if is_unowned(m):
                scores.append(m)
                keeps.append(None)
                continue
            size = m.size // (m.shape[0] if np.ndim(final[path]) else 1)  # per layer
            s_final = 1.0 - final[path] / size
            s_t = initial_sparsity + (s_final - initial_sparsity) * ramp(t)
            keep = jnp.round((1.0 - s_t) * size).astype(jnp.int32)
            keeps.append(jnp.where(t >= end_step, final[path], jnp.maximum(keep, final[path])))
            scores.append(magnitude_score(w_by[path]))
        new_masks = layer_topk_masks(
            jax.tree_util.tree_unflatten(treedef, scores),
            jax.tree_util.tree_unflatten(treedef, keeps), eligible=masks, method=selection,
            stacked={p for p in paths if np.ndim(final.get(p, 0))})
        return new_masks, map_masked(jnp.zeros_like, new_masks)

    return _sparse_transform(
        inner, init_counts=init_counts, mask_init="magnitude", seed=0, selection=selection,
        mask_update=mask_update,
        update_due=lambda t: is_update_step(t, update_every, begin_step, end_step,
                                            at_end=True))


def _drop_and_grow(grow: str, drop_fraction_fn, noise_std: float, selection: str,
                   reinit_when_same: bool, stacked) -> MaskUpdate:
    """Per layer (each slice of a stacked leaf): keep the largest active ``|w| + noise``,
    grow ``n_drop`` among the rest. Two selections, each over all layers at once, run
    as the two iterations of one loop: drop (scores ``|w| + noise``, eligible the
    mask), then grow (``|g|`` or random, eligible what drop left out). One loop body
    is one selection for the compiler to build, not two (each is some 190 fused
    kernels at 1B on 64 devices); the scores are formed inside the body, so no score
    array outlives its iteration."""

    def mask_update(t, weights, grads, masks, key):
        f = drop_fraction_fn(t)
        stacks = stacked_paths(weights, stacked)
        flat_m, treedef = _flat_masks(masks)
        paths = [path_str(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_unowned)[0]]
        flat_w = treedef.flatten_up_to(weights)
        flat_g = treedef.flatten_up_to(grads)
        live = [i for i, m in enumerate(flat_m) if not is_unowned(m)]
        # one split for every leaf's two keys: a split per leaf is a loop each in XLA:CPU's
        # threefry, 2 per sparse leaf for the compiler to build
        leaf_keys = jax.random.split(key, (len(flat_m), 2))
        n_keep, n_drop = {}, {}
        for i in live:
            m = flat_m[i]
            n_active = (jnp.sum(m, axis=tuple(range(1, m.ndim)), dtype=jnp.int32)
                        if paths[i] in stacks else count_true(m))  # per layer
            n_drop[i] = jnp.floor(f * n_active.astype(jnp.float32)).astype(jnp.int32)
            n_keep[i] = n_active - n_drop[i]

        def drop_score(i):
            score = magnitude_score(flat_w[i]).astype(jnp.float32)
            if noise_std:
                score = score + noise_std * tie_noise(leaf_keys[i, 0], flat_w[i].shape)
            return score

        def grow_score(i):
            g = flat_g[i]
            return (jnp.abs(g).astype(jnp.float32) if grow == "gradient"
                    else random_score(leaf_keys[i, 1], g.shape))

        def tree(per_live):  # a masks-like tree: per_live(i) on the sparse leaves
            return jax.tree_util.tree_unflatten(
                treedef, [per_live(i) if i in n_keep else m for i, m in enumerate(flat_m)])

        def select(j, out):  # j = 0: drop (kept), j = 1: grow (grown)
            kept, grown = (treedef.flatten_up_to(x) for x in out)
            first = j == 0
            chosen = layer_topk_masks(
                tree(lambda i: jnp.where(first, drop_score(i), grow_score(i))),
                tree(lambda i: jnp.where(first, n_keep[i], n_drop[i])),
                eligible=tree(lambda i: jnp.where(first, flat_m[i], ~kept[i])),
                method=selection, stacked=stacks)
            chosen = treedef.flatten_up_to(chosen)
            return (tree(lambda i: jnp.where(first, chosen[i], kept[i])),
                    tree(lambda i: jnp.where(first, grown[i], chosen[i])))

        # grown starts as the masks, a value never read (drop leaves it, grow replaces it):
        # zeros would be a constant XLA:CPU fills at the start of the step, before the
        # backward pass's peak, where the masks are ready only with the gradients
        kept, grown = jax.lax.fori_loop(0, 2, select, (masks, masks))
        new_m = map_masked(jnp.logical_or, kept, grown)
        new_c = grown if reinit_when_same else map_masked(lambda gr, m: gr & ~m, grown, masks)
        return new_m, new_c

    return mask_update


def _dynamic(inner, sparsity, *, grow: str, distribution, rules, update_every, begin_step,
             end_step, drop_fraction, drop_fraction_anneal, skip_gradient_on_update,
             mask_init, seed, selection, drop_noise_std, reinit_when_same, stacked):
    check_static(sparsity=sparsity, update_every=update_every, begin_step=begin_step,
                 end_step=end_step, drop_fraction=drop_fraction, drop_noise_std=drop_noise_std,
                 seed=seed)
    _check_sparsity(sparsity)
    _check_steps(update_every, begin_step, end_step)
    _check(0.0 <= drop_fraction <= 1.0, f"drop_fraction {drop_fraction} is outside [0, 1]")
    dist = as_distribution(distribution)
    f = drop_fraction_schedule(drop_fraction, drop_fraction_anneal, max(end_step, 1))
    return _sparse_transform(
        inner, init_counts=lambda p: sparse_layer_counts(p, sparsity, dist, rules, stacked),
        mask_init=mask_init, seed=seed, selection=selection,
        mask_update=_drop_and_grow(grow, f, drop_noise_std, selection, reinit_when_same,
                                   stacked),
        update_due=lambda t: is_update_step(t, update_every, begin_step, end_step),
        skip_gradient_on_update=skip_gradient_on_update)


def set_(inner: optax.GradientTransformation, sparsity: float, *, end_step: int,
         distribution: Distribution | str | None = None, rules: Sequence[SparsityRule] | None = None, update_every: int = 100,
         begin_step: int = 0, drop_fraction: float = 0.3, drop_fraction_anneal: str = "cosine",
         skip_gradient_on_update: bool = False, mask_init: str = "random", seed: int = 0,
         selection: str = "threshold", drop_noise_std: float = 1e-5,
         reinit_when_same: bool = False, stacked: str | Sequence[str] = ()) -> SparseTransformation:
    """SET (Mocanu et al. 2018): drop the smallest active ``|w|``, regrow at random.

    Named ``set_`` because ``set`` is a Python builtin. The gradient step is applied on
    update steps before the mask changes, as in the reference code.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> tx = sparsejax.set_(optax.sgd(0.1, 0.9), 0.9, end_step=7500, update_every=100)
        >>> state = tx.init({'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.zeros(8)}})
        >>> sparsejax.mask_counts(state.masks)
        {'dense/kernel': (13, 128)}
    """
    return _dynamic(inner, sparsity, grow="random", distribution=distribution, rules=rules,
                    update_every=update_every, begin_step=begin_step, end_step=end_step,
                    drop_fraction=drop_fraction, drop_fraction_anneal=drop_fraction_anneal,
                    skip_gradient_on_update=skip_gradient_on_update, mask_init=mask_init,
                    seed=seed, selection=selection, drop_noise_std=drop_noise_std,
                    reinit_when_same=reinit_when_same, stacked=stacked)


def rigl(inner: optax.GradientTransformation, sparsity: float, *, end_step: int,
         distribution: Distribution | str | None = None, rules: Sequence[SparsityRule] | None = None, update_every: int = 100,
         begin_step: int = 0, drop_fraction: float = 0.3, drop_fraction_anneal: str = "cosine",
         skip_gradient_on_update: bool = True, mask_init: str = "random", seed: int = 0,
         selection: str = "threshold", drop_noise_std: float = 1e-5,
         reinit_when_same: bool = False, stacked: str | Sequence[str] = ()) -> SparseTransformation:
    """RigL (Evci et al. 2020): drop the smallest active ``|w|``, grow the largest dense
    ``|∂L/∂(W⊙m)|``. ``f_t = f_0·½(1 + cos(πt/T_end))`` by default; on update steps the
    gradient step is skipped, as in the reference code.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> tx = sparsejax.rigl(optax.adamw(3e-4), 0.9, distribution=sparsejax.erk(),
        ...                     update_every=100, end_step=7500, drop_fraction=0.3)
        >>> state = tx.init({'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.zeros(8)}})
        >>> sparsejax.mask_counts(state.masks)
        {'dense/kernel': (13, 128)}
    """
    return _dynamic(inner, sparsity, grow="gradient", distribution=distribution, rules=rules,
                    update_every=update_every, begin_step=begin_step, end_step=end_step,
                    drop_fraction=drop_fraction, drop_fraction_anneal=drop_fraction_anneal,
                    skip_gradient_on_update=skip_gradient_on_update, mask_init=mask_init,
                    seed=seed, selection=selection, drop_noise_std=drop_noise_std,
                    reinit_when_same=reinit_when_same, stacked=stacked)


__all__ = ["SparseState", "gradual_magnitude", "init_masks", "mask_param_state",
           "one_shot_magnitude", "rigl", "set_", "sparse_layer_counts", "stacked_paths",
           "static_sparse"]
