"""Masks: pytrees matching params, path rules, apply, counts, packing, scores, selection.

A mask tree has the structure of the params with a boolean array for every sparse leaf
and ``None`` for every dense one (biases, norms, layers kept dense by rule). Which
leaves are sparse is decided by path rules: ``(regex, spec)`` pairs over the
'/'-joined parameter path, the first full match wins, and a rule that matches no
parameter is an error. ``spec`` is ``'sparse'`` (density from the distribution),
``'dense'``/``None``, or a float: that layer's own sparsity (left out of ERK's solve).

Selection keeps exactly ``k`` entries. Scores are mapped to a ``uint32`` sort key (NaN
counts as -inf; entries that are not eligible rank below every eligible one), and ties
go to the lower flat index (row-major, then leaf order for global selection). Two
methods give the same mask: ``'sort'`` (a stable argsort) and ``'threshold'`` (sort-free
radix select: 16 counting passes of 3 thresholds each on a CPU, 8 of 15 on an
accelerator, find the k-th key; if the cut falls inside a run of ties, one more pass
finds the row, and a few more the column, of the last tie kept), so O(n) with a fixed
number of passes. The threshold method needs only
sums, so on sharded arrays XLA reduces per shard and moves only counts, never the
tensor.

Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax.masks import apply_masks, resolve_rules, topk_mask
    >>> params = {'layers': [{'kernel': jnp.ones((4, 4))},
    ...                      {'kernel': jnp.arange(-4., 4.).reshape(4, 2)}]}
    >>> rules = [(r'layers/0/kernel', 'dense'), (r'.*kernel', 'sparse')]
    >>> resolve_rules(params, rules)
    {'layers/0/kernel': 'dense', 'layers/1/kernel': 'sparse'}
    >>> w = params['layers'][1]['kernel']
    >>> m = topk_mask(jnp.abs(w), k=3)                # exactly 3 True
    >>> m.tolist()
    [[True, True], [False, False], [False, False], [False, True]]
    >>> masks = {'layers': [{'kernel': None}, {'kernel': m}]}
    >>> apply_masks(params, masks)['layers'][1]['kernel'].tolist()
    [[-4.0, -3.0], [0.0, 0.0], [0.0, 0.0], [0.0, 3.0]]
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.paths import (SparsityRule, match_rules, named_leaves, path_str, pattern_name,
                             rules_or_default, unbox)


def is_unowned(x) -> bool:
    """A mask-tree leaf that is not a mask: ``None`` (a dense parameter) or
    ``optax.MaskedNode`` (a parameter another transform owns, under ``optax.masked`` or
    ``optax.multi_transform``).

    Example:

        >>> import jax.numpy as jnp
        >>> import optax
        >>> from sparsejax.masks import is_unowned
        >>> is_unowned(None), is_unowned(optax.MaskedNode()), is_unowned(jnp.ones(2, bool))
        (True, True, False)
    """
    return x is None or isinstance(x, optax.MaskedNode)



# ----------------------------------------------------------------------------- rules


def _normalize_spec(spec, path: str, pattern):
    pattern = pattern_name(pattern)
    if spec is None or spec == "dense":
        return "dense"
    if spec == "sparse":
        return "sparse"
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not 0.0 <= float(spec) < 1.0:
            raise ValueError(f"rule {pattern}: sparsity {spec} for parameter {path!r} is "
                             "outside [0, 1)")
        return float(spec)
    raise ValueError(f"rule {pattern}: unknown spec {spec!r} for parameter {path!r}; use "
                     "'sparse', 'dense'/None, or a sparsity in [0, 1)")


def resolve_rules(params, rules: Sequence[SparsityRule] | None = None) -> dict[str, Any]:
    """``{path: 'sparse' | 'dense' | sparsity}`` for every parameter leaf.

    Rules are ``sparsejax.paths`` rules (regex or predicate); the first match wins,
    unmatched parameters are dense, ``None`` means ``paths.DEFAULT_RULES``. Raises if a
    rule matches nothing or a sparse rule hits a scalar.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import resolve_rules
        >>> resolve_rules({'a': {'kernel': jnp.ones((3, 3))}, 'b': {'bias': jnp.ones(3)}})
        {'a/kernel': 'sparse', 'b/bias': 'dense'}
    """
    out = {}
    for path, leaf, pattern, spec in match_rules(params, rules_or_default(rules, params, "sparsity"),
                                                 "sparsity"):
        out[path] = "dense" if pattern is None else _normalize_spec(spec, path, pattern)
        if out[path] != "dense" and np.ndim(leaf) == 0:
            raise ValueError(f"rule {pattern_name(pattern)} makes scalar parameter {path!r} sparse; a "
                             "mask needs at least one dimension")
    return out


# ----------------------------------------------------------------------------- trees


def map_masked(fn, masks, *trees):
    """``fn(mask, *leaves)`` on sparse leaves; other leaves (mask ``None`` or
    ``optax.MaskedNode``) pass the first tree's leaf through (or stay as they are when no
    other tree is given).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import map_masked
        >>> masks = {'w': jnp.array([True, False]), 'b': None}
        >>> params = {'w': jnp.array([1., 2.]), 'b': jnp.array([3.])}
        >>> out = map_masked(lambda m, w: jnp.where(m, w, 0), masks, params)
        >>> out['w'].tolist(), out['b'].tolist()
        ([1.0, 0.0], [3.0])
    """
    return jax.tree.map(lambda m, *xs: (xs[0] if xs else m) if is_unowned(m) else fn(m, *xs),
                        masks, *trees, is_leaf=is_unowned)


def like_param(m: jax.Array, w) -> jax.Array:
    """``m`` laid out like ``w`` when ``w`` has an explicit sharding (a mesh with
    ``AxisType.Explicit`` axes, the default of ``jax.make_mesh``); else ``m`` unchanged.
    Masks then shard like their parameters, and ``where(m, w, 0)`` type-checks.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import like_param, topk_mask
        >>> w = jnp.array([[0.5, -2.0], [1.0, 0.1]])
        >>> m = like_param(topk_mask(jnp.abs(w), 2), w)   # no explicit sharding: m unchanged
        >>> m.tolist()
        [[False, True], [True, False]]
    """
    sharding = getattr(jax.typeof(w), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    explicit = jax.sharding.AxisType.Explicit
    if mesh is None or explicit not in tuple(getattr(mesh, "axis_types", ())):
        return m
    if jax.sharding.get_abstract_mesh().empty:  # outside jax.set_mesh nothing type-checks
        return m
    if getattr(jax.typeof(m), "sharding", None) == sharding:
        return m
    return jax.sharding.reshard(m, sharding)


def map_masked_by_path(fn, masks, params):
    """``fn(mask, leaf)`` on every leaf of ``params`` whose path has a mask in ``masks``;
    other leaves unchanged. Matching is by path (``sparsejax.paths``), so the containers
    may differ (``nnx.State`` masks, plain-dict params). A mask whose parameter is
    missing, or has another shape, is an error: the masks belong to other parameters.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.masks import map_masked_by_path
        >>> params = nnx.state(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), nnx.Param)  # nnx.State
        >>> masks = {'kernel': jnp.array([[True, False], [False, True]])}       # plain dict
        >>> out = map_masked_by_path(lambda m, w: jnp.where(m, w, 0), masks, params)
        >>> (out['kernel'] != 0).tolist(), out['bias'].tolist()
        ([[True, False], [False, True]], [0.0, 0.0])
    """
    flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_unowned)[0]
    by_path = {path_str(p): m for p, m in flat if not is_unowned(m)}
    seen = set()

    def f(path, w):
        name = path_str(path)
        m = by_path.get(name)
        if m is None or is_unowned(w):
            return w
        if tuple(np.shape(w)) != tuple(m.shape):
            raise ValueError(f"parameter {name!r} has shape {tuple(np.shape(w))}, its mask "
                             f"{tuple(m.shape)}: these masks were made for other parameters")
        seen.add(name)
        return fn(like_param(m, w), w)

    out = jax.tree_util.tree_map_with_path(f, unbox(params), is_leaf=is_unowned)
    missing = sorted(set(by_path) - seen)
    if missing:
        raise ValueError(f"masks for {missing[:4]} have no parameter in the params given "
                         f"(paths there look like {[p for p, _ in named_leaves(params)[:4]]}): "
                         "these masks were made for other parameters")
    return out


def apply_masks(params, masks):
    """``W ⊙ m`` on sparse leaves (exact zeros), dense leaves unchanged; masks are matched
    to parameters by path (``map_masked_by_path``).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import apply_masks
        >>> apply_masks({'w': jnp.ones(3)}, {'w': jnp.array([True, False, True])})['w'].tolist()
        [1.0, 0.0, 1.0]
    """
    return map_masked_by_path(lambda m, w: jnp.where(m, w, jnp.zeros_like(w)), masks, params)


@jax.custom_vjp
def _mask_with_dense_grad(w: jax.Array, m: jax.Array) -> jax.Array:
    return jnp.where(m, w, jnp.zeros_like(w))


def _mask_with_dense_grad_fwd(w, m):
    return _mask_with_dense_grad(w, m), m


def _mask_with_dense_grad_bwd(m, g):
    return g, np.zeros(m.shape, jax.dtypes.float0)


_mask_with_dense_grad.defvjp(_mask_with_dense_grad_fwd, _mask_with_dense_grad_bwd)


def masked_with_dense_grad(params, masks):
    """Forward value ``W ⊙ m`` exactly, gradient the dense ``∂L/∂(W⊙m)`` at every entry.

    A ``custom_vjp``: forward ``where(m, w, 0)`` (exact zeros even if a stored inactive
    weight is NaN), backward passes the cotangent to every entry. The model computes
    with the masked weights while ``jax.grad`` returns the gradient RigL grows by;
    transforms mask it before the inner optimizer sees it.

    Example:

        >>> import jax
        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import masked_with_dense_grad
        >>> params, masks = {'w': jnp.array([1., 2., 3.])}, {'w': jnp.array([True, False, True])}
        >>> masked_with_dense_grad(params, masks)['w'].tolist()
        [1.0, 0.0, 3.0]
        >>> loss = lambda p: jnp.dot(p['w'], jnp.array([4., 5., 6.]))
        >>> g = jax.grad(lambda p: loss(masked_with_dense_grad(p, masks)))(params)
        >>> g['w'].tolist()   # dense: the masked-out entry gets its gradient too
        [4.0, 5.0, 6.0]
    """
    return map_masked_by_path(lambda m, w: _mask_with_dense_grad(w, m), masks, params)


def mask_counts(masks) -> dict[str, tuple[int, int]]:
    """``{path: (nonzeros, size)}`` for every sparse leaf (host values).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import mask_counts
        >>> mask_counts({'w': jnp.array([True, False]), 'b': None})
        {'w': (1, 2)}
    """
    flat = jax.tree_util.tree_flatten_with_path(masks, is_leaf=is_unowned)[0]
    return {path_str(p): (int(np.sum(np.asarray(row_counts(m)), dtype=np.int64)), int(m.size))
            for p, m in flat if not is_unowned(m)}


def global_sparsity(masks) -> float:
    """Fraction of zeros over all sparse leaves together.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import global_sparsity
        >>> global_sparsity({'w': jnp.array([True, False, False, False])})
        0.75
    """
    counts = mask_counts(masks).values()
    total = sum(s for _, s in counts)
    return 1.0 - sum(n for n, _ in counts) / max(total, 1)


def pack_masks(masks):
    """Bit-packs each boolean mask into ``uint8`` (8× smaller), for storage and export.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import pack_masks, unpack_masks
        >>> masks = {'w': jnp.arange(12).reshape(3, 4) % 3 == 0, 'b': None}
        >>> packed = pack_masks(masks)
        >>> packed['w'].dtype, packed['w'].shape, packed['b']   # 12 bits in 2 bytes
        (dtype('uint8'), (2,), None)
        >>> same = unpack_masks(packed, masks)
        >>> bool((same['w'] == masks['w']).all())
        True
    """
    return map_masked(lambda m: jnp.packbits(m.reshape(-1)), masks)


def unpack_masks(packed, like):
    """Inverse of ``pack_masks``; ``like`` gives the shapes (masks, params or abstract).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import pack_masks, unpack_masks
        >>> masks = {'w': jnp.array([[True, False, True], [False, False, True]])}
        >>> unpack_masks(pack_masks(masks), {'w': jnp.zeros((2, 3))})['w'].tolist()
        [[True, False, True], [False, False, True]]
    """
    return jax.tree.map(
        lambda p, x: p if is_unowned(p) else
        jnp.unpackbits(p, count=math.prod(x.shape)).reshape(x.shape).astype(bool),
        packed, like, is_leaf=is_unowned)


def param_like_paths(tree, params) -> Any:
    """For each leaf of ``tree``, the path of the parameter it shadows, else ``""``.

    A leaf shadows a parameter when its path ends with the parameter's path and it has
    the parameter's shape: optimizer moments (``0/mu/layers/0/kernel``), masks, EMA
    copies. This is how state is matched to parameters without knowing its types.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax
        >>> from sparsejax.masks import param_like_paths
        >>> params = {'w': jnp.ones((2, 3)), 'b': jnp.zeros(3)}
        >>> param_like_paths(optax.adam(1e-3).init(params), params)
        (ScaleByAdamState(count='', mu={'b': 'b', 'w': 'w'}, nu={'b': 'b', 'w': 'w'}), EmptyState())
    """
    shapes = {p: tuple(np.shape(x)) for p, x in named_leaves(params)}

    def match(path, leaf):
        parts = path_str(path).split("/")
        for i in range(len(parts)):  # longest suffix first
            name = "/".join(parts[i:])
            if name in shapes and shapes[name] == tuple(np.shape(leaf)):
                return name
        return ""  # not None: None is an empty pytree node and would change the structure

    return jax.tree_util.tree_map_with_path(match, tree)


# ----------------------------------------------------------------------------- scores


def magnitude_score(w: jax.Array) -> jax.Array:
    """``|w|`` (magnitude pruning; RigL/SET drop score). Example: ``magnitude_score(w)``."""
    return jnp.abs(w)


def gradient_score(g: jax.Array) -> jax.Array:
    """``|∇L|`` (RigL grow score). Example: ``gradient_score(grads['w'])``."""
    return jnp.abs(g)


def saliency_score(w: jax.Array, g: jax.Array) -> jax.Array:
    """``|w · ∇L|`` (SNIP connection sensitivity). Example: ``saliency_score(w, g)``."""
    return jnp.abs(w * g)


def random_score(key: jax.Array, shape) -> jax.Array:
    """Uniform noise in [0, 1) (SET growth, random masks). Example: ``random_score(k, (3, 4))``."""
    return jax.random.uniform(key, shape)


def _mix32(x: jax.Array) -> jax.Array:
    """A bijective 32-bit integer hash with full avalanche (two multiply-xorshift rounds)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def tie_noise(key: jax.Array, shape) -> jax.Array:
    """Standard normal ``float32`` noise for breaking ties in a score, drawn from a counter
    hash of each entry's index under ``key``: ~7x cheaper than ``jax.random.normal`` on
    a CPU (threefry's 20 rounds cost ~1.1 s at 10**8 entries; this ~0.15 s), elementwise,
    so a sharded score stays sharded. Its 24-bit uniforms are far finer than what a
    tie-break at σ = 1e-5 can resolve, but it is not a general-purpose PRNG: draws that
    are the algorithm (SET's growth, random masks) use ``random_score``.

    Example:

        >>> import jax
        >>> from sparsejax.masks import tie_noise
        >>> z = tie_noise(jax.random.PRNGKey(0), (1000, 100))
        >>> bool(abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01)
        True
    """
    data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    k = data.reshape(-1).astype(jnp.uint32)
    h = jnp.broadcast_to(_mix32(k[0]), shape)
    for d in range(len(shape)):  # fold every axis' index in: no flat index to overflow
        h = _mix32(h ^ jax.lax.broadcasted_iota(jnp.uint32, shape, d)) + k[-1]
    u = ((h >> 8).astype(jnp.float32) + 0.5) * np.float32(2.0**-24)  # uniform in (0, 1)
    return np.float32(math.sqrt(2.0)) * jax.lax.erf_inv(2.0 * u - 1.0)  # Φ^-1(u)


# ----------------------------------------------------------------------------- selection


def sort_key(scores: jax.Array, eligible: jax.Array | None = None) -> jax.Array:
    """Order-preserving ``uint32`` key of float scores; NaN → -inf; ineligible → 0.

    Every float (``-inf`` included) maps above 0, so ineligible entries rank last.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import sort_key
        >>> sort_key(jnp.array([-1.0, 0.0, 2.0])).tolist()   # increasing uint32 keys
        [1082130431, 2147483648, 3221225472]
        >>> sort_key(jnp.array([jnp.nan, 1.0]), eligible=jnp.array([True, False])).tolist()
        [8388607, 0]
    """
    s = scores.astype(jnp.float32)
    s = jnp.where(jnp.isnan(s), -jnp.inf, s)
    bits = jax.lax.bitcast_convert_type(s, jnp.uint32)
    # -0.0 ties with +0.0. On the bits, since XLA folds the float ``x + 0.0`` away under jit.
    bits = jnp.where(bits == jnp.uint32(0x80000000), jnp.uint32(0), bits)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))
    if eligible is not None:
        key = jnp.where(eligible, key, jnp.uint32(0))
    return key


def _digit_bits() -> int:
    """Key bits settled per counting pass of the radix select. A pass with ``2**b − 1``
    thresholds streams the keys once; on a CPU it is memory-bound up to 3 thresholds and
    compute-bound beyond (10**8 keys, 2 cores: 0.019 s for 3, 0.082 s for 15), so 2 bits
    (16 passes, 0.31 s) beat 4 bits (8 passes, 0.65 s). Accelerators have the compute
    for 15 and pay per pass (and per all-reduce when sharded): 4 bits there."""
    return 2 if jax.default_backend() == "cpu" else 4


def variadic_sums() -> bool:
    """Whether ``_sums`` reduces its operands together, as one variadic reduction: on a
    single XLA:CPU device, where that is one pass over the data and ~5x faster per
    element than a lone ``jnp.sum`` (measured at 10**8 entries). With more devices each
    sum is its own reduction: XLA's SPMD partitioner turns a sharded variadic reduction
    into all-gathers of per-device partials, a single-output one into an all-reduce.
    Accelerators fuse a reduction's producer either way.

    Example:

        >>> import jax
        >>> from sparsejax.masks import variadic_sums
        >>> variadic_sums() == (jax.default_backend() == 'cpu' and jax.device_count() == 1)
        True
    """
    return jax.default_backend() == "cpu" and jax.device_count() == 1


def _sums(ops: list[jax.Array], axes, variadic: bool) -> list[jax.Array]:
    """``int32`` sums of same-shape arrays over ``axes``: one variadic reduction where
    ``variadic`` (``variadic_sums()``, or per device inside ``jax.shard_map``; callers
    then give at least two operands even where they need one sum), else one sum each
    (all-reducing when sharded)."""
    ops = tuple(o.astype(jnp.int32) for o in ops)
    if not variadic:
        return [jnp.sum(o, axis=tuple(axes)) for o in ops]
    return list(jax.lax.reduce(ops, (jnp.int32(0),) * len(ops),
                               lambda a, b: tuple(u + v for u, v in zip(a, b)), tuple(axes)))


_INT32_MAX = 2**31 - 1  # the largest count an int32 holds


def row_counts(mask: jax.Array) -> jax.Array:
    """``int32[rows]``: the nonzeros of a mask per block of its flattened entries, each
    block below ``2**31`` entries, so no count wraps at any size (the leading axis, or
    equal splits of it). Sum them as ``float32`` (a statistic) or on the host (exact).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import row_counts
        >>> row_counts(jnp.array([[True, False, True], [True, True, True]])).tolist()
        [2, 3]
    """
    m = jnp.asarray(mask) != 0
    m = m.reshape(1, -1) if m.ndim < 2 else m.reshape(m.shape[0], -1)
    rows = m.shape[0]
    if m.shape[1] > _INT32_MAX:  # split the rows further into equal blocks
        f = next((f for f in range(-(-m.shape[1] // _INT32_MAX), 1 << 20)
                  if m.shape[1] % f == 0), None)
        if f is None:
            raise ValueError(f"row_counts: rows of {m.shape[1]} entries have no split into "
                             f"blocks of fewer than 2**31; reshape the mask")
        m, rows = m.reshape(rows * f, -1), rows * f
    if not variadic_sums():
        return jnp.sum(m, axis=1, dtype=jnp.int32)
    n_true, n_false = _sums([m, ~m], [1], True)
    return (n_true + (m.shape[1] - n_false)) // 2  # = n_true; both outputs used


def count_true(mask: jax.Array, dtype=jnp.int32) -> jax.Array:
    """The number of nonzero entries of a mask as ``dtype``, in one streaming pass.

    ``int32`` (the default) is exact and needs fewer than ``2**31`` entries: a larger
    mask is an ``OverflowError``, never a wrapped count. ``dtype=jnp.float32`` counts
    any size (exact int32 counts per block of ``row_counts``, summed as float32, exact
    below ``2**24``): the form for statistics such as densities and rates.

    It reduces ``m`` and ``~m`` together and uses both sums: on XLA:CPU a reduction with
    two used outputs fuses its producer, while a lone ``jnp.sum(m)`` first writes an
    ``int32`` copy of the mask (at 10**8 entries: 0.009 s against 0.18 s).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import count_true
        >>> int(count_true(jnp.array([[True, False, True], [True, True, False]])))
        4
        >>> count_true(jnp.ones((2, 3), bool), jnp.float32).dtype
        dtype('float32')
    """
    m = jnp.asarray(mask) != 0
    if m.size > _INT32_MAX:
        if jnp.issubdtype(dtype, jnp.integer):  # int32 at most (jax_enable_x64 is off)
            raise OverflowError(f"count_true: a mask of {m.size} entries can hold more "
                                f"nonzeros than {jnp.dtype(dtype).name} holds; pass "
                                "dtype=jnp.float32 for a statistic, or sum row_counts(mask) "
                                "on the host for an exact count")
        return jnp.sum(row_counts(m).astype(dtype))
    if not variadic_sums():
        return jnp.sum(m, dtype=jnp.int32).astype(dtype)
    m = m.reshape(1) if m.ndim == 0 else m
    n_true, n_false = _sums([m, ~m], range(m.ndim), True)
    return ((n_true + (m.size - n_false)) // 2).astype(dtype)  # = n_true; both outputs used


# Selection runs over units: a unit keeps its own k entries. Every key array is given
# with a leading row axis (a stacked kernel's layer axis, or a new axis of 1), and row
# ``r`` of leaf ``i`` belongs to unit ``rows[i][r]``, where it starts at flat index
# ``offsets[i][r]`` of the unit (leaves in order, row-major within a leaf). Per-layer
# selection makes every row its own unit; global selection puts everything in unit 0.
#
# Under ``selection_shardings`` the threshold select runs inside ``jax.shard_map``:
# the functions below then see each device's block of a key array, ``axes[i][d]`` names
# the mesh axes that split dim ``d`` of leaf ``i``, and every count is a local variadic
# reduction plus a ``psum`` of the ``[units]`` counts.


class _Layout(NamedTuple):
    rows: tuple  # per leaf: np.int32[rows], the unit of each row
    offsets: tuple  # per leaf: np.int64[rows], each row's first flat index in its unit
    sizes: np.ndarray  # np.int64[units], entries per unit
    shapes: tuple  # per leaf: the global shape of its key array
    axes: tuple = ()  # inside shard_map, per leaf and dim: the mesh axes splitting it
    mesh_axes: tuple = ()  # inside shard_map: every axis of the mesh


def _layout(shapes, one_unit: bool) -> _Layout:
    rows, offsets, sizes, total = [], [], [], 0
    for s in shapes:
        n_rows, per_row = s[0], math.prod(s[1:])
        if one_unit:
            rows.append(np.zeros(n_rows, np.int32))
            offsets.append(total + per_row * np.arange(n_rows, dtype=np.int64))
            total += n_rows * per_row
        else:
            rows.append(np.arange(len(sizes), len(sizes) + n_rows, dtype=np.int32))
            offsets.append(np.zeros(n_rows, np.int64))
            sizes += [per_row] * n_rows
    sizes = np.array([total] if one_unit else sizes, np.int64)
    if sizes.size and sizes.max() > _INT32_MAX:  # the counts are int32: refuse, never wrap
        raise OverflowError(f"selection over {int(sizes.max())} entries at once: its int32 "
                            "counts would wrap; select per layer (or per slice of a stacked "
                            "kernel), each below 2**31 entries")
    return _Layout(tuple(rows), tuple(offsets), sizes, tuple(tuple(s) for s in shapes))


def _with_rows(x: jax.Array, stacked: bool) -> jax.Array:
    """``x`` with its leading row axis: a stacked leaf's own, or a new one of size 1;
    at least 2-D, so every row has entries to reduce over."""
    if not stacked:
        return x.reshape((1,) + x.shape + ((1,) if x.ndim == 0 else ()))
    if x.ndim == 0:
        raise ValueError("a stacked leaf needs a leading layer axis; got a scalar")
    return x[:, None] if x.ndim == 1 else x


def _start(i: int, x: jax.Array, d: int, layout: _Layout):
    """The global index of the first entry of ``x`` (leaf ``i``'s block) along dim ``d``:
    0 unless a mesh axis splits that dim inside shard_map."""
    axes = layout.axes[i][d] if layout.axes else ()
    return jax.lax.axis_index(axes) * x.shape[d] if axes else 0


def _local_rows(v, i: int, x: jax.Array, layout: _Layout) -> jax.Array:
    """The entries of ``v`` (one per global row of leaf ``i``) for the rows of ``x``."""
    v = jnp.asarray(v)
    if v.shape[0] == x.shape[0]:
        return v
    return jax.lax.dynamic_slice_in_dim(v, _start(i, x, 0, layout), x.shape[0])


def _per_row(v: jax.Array, i: int, x: jax.Array, layout: _Layout) -> jax.Array:
    """Per-unit values ``v[units, ...]`` for the rows of ``x`` (leaf ``i``),
    broadcastable against it. A leaf's rows are all one unit or consecutive units
    (``_layout``): a broadcast or a slice, never a gather (one per leaf and threshold
    in every pass, which the SPMD partitioner and XLA:CPU compile slowly)."""
    rows = layout.rows[i]
    lo = int(rows[0])
    if np.all(rows == lo):
        r = jnp.broadcast_to(jax.lax.index_in_dim(v, lo, keepdims=True),
                             (x.shape[0],) + v.shape[1:])
    else:
        r = _local_rows(jax.lax.slice_in_dim(v, lo, lo + rows.size), i, x, layout)
    return r.reshape(r.shape[:1] + (1,) * (x.ndim - 1) + r.shape[1:])


def _unit_counts(keys: list[jax.Array], layout: _Layout, preds) -> jax.Array:
    """``int32[m, units]``: the entries of every unit satisfying each of the ``m >= 2``
    predicates ``preds(i, x)`` (bool arrays shaped like leaf ``x``). One reduction per
    leaf over all but the row axis; the per-row counts are then summed (one unit) or
    laid side by side (every row its own unit, in leaf order: ``_layout``). Inside
    shard_map, the reductions are local and variadic (one pass that fuses the
    predicates, where XLA:CPU would write each single-output sum's predicate to memory
    first), counted once among devices that hold the same block, and one ``psum``
    over the mesh adds them up."""
    variadic = bool(layout.axes) or variadic_sums()
    per_leaf = [jnp.stack(_sums(preds(i, x), range(1, x.ndim), variadic))
                for i, x in enumerate(keys)]
    parts = []
    for i, c in enumerate(per_leaf):
        if layout.axes:
            split = {a for d in layout.axes[i] for a in d}
            copies = tuple(a for a in layout.mesh_axes if a not in split)
            if copies:  # devices along these hold the same block: the first counts it
                c = c * (jax.lax.axis_index(copies) == 0).astype(jnp.int32)
            if c.shape[1] != layout.rows[i].size:  # this device's rows at their place
                # (XLA makes the psum of this update slice an all-gather of the counts)
                c = jax.lax.dynamic_update_slice_in_dim(
                    jnp.zeros((c.shape[0], layout.rows[i].size), jnp.int32), c,
                    _start(i, keys[i], 0, layout), axis=1)
        parts.append(jnp.sum(c, axis=1, keepdims=True) if layout.sizes.size == 1 else c)
    total = sum(parts) if layout.sizes.size == 1 else jnp.concatenate(parts, axis=1)
    return jax.lax.psum(total, layout.mesh_axes) if layout.axes else total


def _unit_index(i: int, x: jax.Array, layout: _Layout) -> jax.Array:
    """``uint32``: every entry's flat index within its unit (fused, never stored)."""
    shape = layout.shapes[i]
    idx = jnp.zeros(x.shape, jnp.int32)
    for d in range(1, x.ndim):
        idx = idx + ((jax.lax.broadcasted_iota(jnp.int32, x.shape, d) + _start(i, x, d, layout))
                     * math.prod(shape[d + 1:]))
    off = _local_rows(np.asarray(layout.offsets[i], np.uint32), i, x, layout)
    return idx.astype(jnp.uint32) + off.reshape(off.shape + (1,) * (x.ndim - 1))


def _split_ties(keys: list[jax.Array], layout: _Layout, t, need) -> jax.Array:
    """``uint32[units]``: per unit the largest flat index ``p`` with fewer than
    ``need`` ties (``key == t``) before it, so the ties at indices ``<= p`` are the
    first ``need`` in flat order. A radix search over the index, ``b`` bits a pass, all
    units at once; only per-unit counts cross devices (all-reduces when sharded)."""
    digit = _digit_bits()
    ways = jnp.arange(1, 2**digit, dtype=jnp.uint32)
    bits = max(1, int(layout.sizes.max() - 1).bit_length())
    passes = -(-bits // digit)

    def index_pass(j, p):
        shift = jnp.uint32(digit * (passes - 1)) - jnp.uint32(digit) * j.astype(jnp.uint32)
        c = p[:, None] + (ways[None, :] << shift)  # [units, ways] candidate cuts

        def preds(i, x):
            tie, idx = x == _per_row(t, i, x, layout), _unit_index(i, x, layout)
            return [tie & (idx < _per_row(c[:, w], i, x, layout)) for w in range(len(ways))]

        f = _unit_counts(keys, layout, preds)  # [ways, units] ties before each candidate
        return p + (jnp.sum(f < need[None], axis=0, dtype=jnp.uint32) << shift)

    return jax.lax.fori_loop(0, passes, index_pass, jnp.zeros(layout.sizes.shape, jnp.uint32))


def _threshold_select(keys: list[jax.Array], k: jax.Array, layout: _Layout) -> list[jax.Array]:
    # Radix select by counting, every unit at once. Each unit's k-th largest key t is
    # settled b = _digit_bits() bits at a time from the top: a pass counts, per unit,
    # ``key >= prefix | j << shift`` for j = 1..2**b − 1, 32 / b passes in one loop
    # whatever the size or the number of units. The counts just below and above the
    # interval holding t are carried along, so the number of ties at t comes for free;
    # only when some unit leaves some of them out does _split_ties run.
    # A unit with fewer eligible keys (> 0) than k ends with t = 0: every count of a
    # candidate >= 1 falls short of k. Its mask is then key >= 1, every eligible entry.
    digit = _digit_bits()
    ways = jnp.arange(1, 2**digit, dtype=jnp.uint32)

    def key_pass(j, state):
        prefix, n_ge_lo, n_gt_hi = state
        shift = jnp.uint32(32 - digit) - jnp.uint32(digit) * j.astype(jnp.uint32)
        c = prefix[:, None] | (ways[None, :] << shift)  # [units, ways]
        g = _unit_counts(keys, layout, lambda i, x: [
            x >= _per_row(c[:, w], i, x, layout) for w in range(len(ways))])
        d = jnp.sum(g >= k[None], axis=0, dtype=jnp.int32)  # counts fall as j grows
        ext = jnp.concatenate([n_ge_lo[None], g, n_gt_hi[None]])
        pick = lambda e: jnp.take_along_axis(ext, e[None], axis=0)[0]
        return prefix | (d.astype(jnp.uint32) << shift), pick(d), pick(d + 1)

    units = layout.sizes.size
    t, n_ge, n_gt = jax.lax.fori_loop(
        0, 32 // digit, key_pass, (jnp.zeros(units, jnp.uint32),
                                   jnp.asarray(layout.sizes, jnp.int32), jnp.zeros(units, jnp.int32)))
    need = k - n_gt  # ties (key == t) to keep per unit: the first `need` in flat order
    split = (k > 0) & (t > 0) & (need < n_ge - n_gt)
    t = jnp.maximum(t, 1)  # t = 0: fewer eligible keys than k, all of them kept
    on = [_per_row(k > 0, i, x, layout) for i, x in enumerate(keys)]

    # The masks come out of a lax.cond: without a tie to leave out they are key >= t,
    # and no flat index is computed (at 10**8 keys on a CPU, 0.90 s a selection against
    # 1.0 s for a cond over the cut alone and 1.13 s for a tie-split loop of 0 passes).
    def all_ties():
        return [(x >= _per_row(t, i, x, layout)) & on[i] for i, x in enumerate(keys)]

    def first_ties():  # the first `need` ties of a unit in flat order (_split_ties)
        cut = _split_ties(keys, layout, t, jnp.where(split, need, jnp.asarray(
            layout.sizes, jnp.int32)))  # no split: every tie before the cut
        out = []
        for i, x in enumerate(keys):
            t_i = _per_row(t, i, x, layout)
            keep = (x > t_i) | ((x == t_i) & (_unit_index(i, x, layout)
                                              <= _per_row(cut, i, x, layout)))
            out.append(keep & on[i])
        return out

    return jax.lax.cond(jnp.any(split), first_ties, all_ties)


def _sort_select(keys: list[jax.Array], k: jax.Array, layout: _Layout) -> list[jax.Array]:
    # A stable argsort per unit (descending key, ties: lower flat index first): the
    # rows of one leaf side by side when each is its own unit, everything in one row
    # when there is one unit.
    one_unit = layout.sizes.size == 1 and len(keys) > 1

    def rank_select(x2, k_rows):  # x2: [rows, n]
        ranks = jnp.argsort(jnp.argsort(~x2, axis=1, stable=True), axis=1)
        n_eligible = jnp.sum(x2 > 0, axis=1, dtype=jnp.int32)
        return ranks < jnp.clip(k_rows, 0, n_eligible)[:, None]

    if one_unit:
        chosen = rank_select(jnp.concatenate([x.reshape(1, -1) for x in keys], 1), k)[0]
        starts = np.cumsum([0] + [x.size for x in keys])
        return [chosen[a:b].reshape(x.shape) for x, a, b in zip(keys, starts, starts[1:])]
    return [rank_select(x.reshape(x.shape[0], -1), k[layout.rows[i]]).reshape(x.shape)
            for i, x in enumerate(keys)]


SELECTION_METHODS = ("sort", "threshold")


_SHARDINGS: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "sparsejax_selection_shardings", default=None)


@contextlib.contextmanager
def selection_shardings(shardings):
    """Trace-time context: selections traced inside it count per device.

    ``shardings`` is a tree like the params of ``NamedSharding`` (what ``jax.jit`` gets
    as their ``in_shardings``). A 'threshold' selection whose every leaf has one, by
    path, then runs inside ``jax.shard_map`` over those shardings: each count is one
    fused reduction of the device's own block plus a ``psum`` of per-layer counts, and
    no selection predicate is ever written to memory. Without the context, or for a
    leaf it does not cover, XLA's partitioner places the sums: the same masks, with
    predicate temporaries as large as the kernels on XLA:CPU. The training loop sets
    it around ``tx.update``; a hand-written sharded loop may do the same.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from jax.sharding import NamedSharding, PartitionSpec as P
        >>> from sparsejax.masks import layer_topk_masks, selection_shardings
        >>> mesh = jax.make_mesh((1,), ('data',), devices=jax.devices()[:1],
        ...                      axis_types=(jax.sharding.AxisType.Auto,))
        >>> scores = {'w': jnp.array([[3., 1.], [2., 4.]])}
        >>> with selection_shardings({'w': NamedSharding(mesh, P('data'))}):
        ...     m = jax.jit(lambda s: layer_topk_masks(s, {'w': 2}))(scores)
        >>> m['w'].tolist()
        [[True, False], [False, True]]
    """
    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, NamedSharding) or x is None)[0]
    token = _SHARDINGS.set({path_str(p): s for p, s in flat if isinstance(s, NamedSharding)})
    try:
        yield
    finally:
        _SHARDINGS.reset(token)


def _axes(spec: P, ndim: int) -> list[tuple]:
    """The mesh axes splitting each of ``ndim`` dims under ``spec`` (``()``: none)."""
    dims = [() if a is None else (a,) if isinstance(a, str) else tuple(a) for a in spec]
    return dims + [()] * (ndim - len(dims))


def _key_axes(shardings: list, keys: list, scores: list, stacked: list):
    """``(mesh, axes)`` for running the selection under shard_map: per leaf and dim of
    its key array the axes splitting it; ``None`` unless every leaf has a sharding of
    one mesh that divides it."""
    if not shardings or any(not isinstance(sh, NamedSharding) for sh in shardings):
        return None
    mesh = shardings[0].mesh
    if any(t != jax.sharding.AxisType.Auto for t in getattr(mesh, "axis_types", ())):
        return None  # explicit axes: the arrays' types carry their shardings already
    out = []
    for sh, x, s, st in zip(shardings, keys, scores, stacked):
        if sh.mesh != mesh or len(sh.spec) > np.ndim(s):
            return None
        dims = _axes(sh.spec, np.ndim(s))
        dims = (dims + [()] if np.ndim(s) == 1 else dims) if st else (
            [()] + dims + ([()] if np.ndim(s) == 0 else []))
        if any(n % math.prod(mesh.shape[a] for a in d) for n, d in zip(x.shape, dims)):
            return None
        out.append(tuple(dims))
    return mesh, tuple(out)


def _select(scores: list[jax.Array], k, eligible: list | None, method: str,
            stacked: Sequence[bool] | None = None, shardings: list | None = None
            ) -> list[jax.Array]:
    """Masks keeping the top ``k`` keys. ``k`` a scalar: one unit over every leaf
    (global selection). ``k`` a list, one entry per leaf (a scalar, or one per layer of
    a ``stacked`` leaf): every leaf, and every layer of a stacked one, its own unit.
    ``shardings`` (one ``NamedSharding`` per leaf): 'threshold' counts per device
    under ``jax.shard_map`` (``selection_shardings``)."""
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; known: {SELECTION_METHODS}")
    if not scores:
        return []
    eligible = [None] * len(scores) if eligible is None else eligible
    stacked = [False] * len(scores) if stacked is None else list(stacked)
    keys = [_with_rows(sort_key(s, e), st) for s, e, st in zip(scores, eligible, stacked)]
    one_unit = not isinstance(k, (list, tuple))
    layout = _layout([x.shape for x in keys], one_unit)
    if one_unit:
        k = jnp.asarray(k, jnp.int32).reshape(1)
    else:
        k = jnp.concatenate([jnp.broadcast_to(jnp.asarray(kk, jnp.int32), (x.shape[0],))
                             for kk, x in zip(k, keys)])
    sharded = method == "threshold" and _key_axes(shardings, keys, scores, stacked)
    if sharded:
        mesh, axes = sharded
        specs = tuple(P(*(None if not d else d[0] if len(d) == 1 else d for d in a))
                      for a in axes)
        chosen = jax.shard_map(
            lambda kk, *xs: tuple(_threshold_select(
                list(xs), kk, layout._replace(axes=axes, mesh_axes=tuple(mesh.axis_names)))),
            mesh=mesh, in_specs=(P(),) + specs, out_specs=specs, check_vma=False)(k, *keys)
    else:
        chosen = (_threshold_select if method == "threshold" else _sort_select)(keys, k, layout)
    return [c.reshape(jnp.shape(s)) for c, s in zip(chosen, scores)]


def topk_mask(scores: jax.Array, k, eligible: jax.Array | None = None,
              method: str = "sort", stacked: bool = False) -> jax.Array:
    """Boolean mask of the ``k`` highest scores (exactly ``min(k, #eligible)`` True).

    ``k`` may be traced. Ties go to the lower flat index; NaN ranks as -inf; only
    ``eligible`` entries can be chosen. ``method`` is 'sort' or 'threshold' (same mask).
    ``stacked``: the leading axis stacks layers (``nnx.scan``); each slice keeps its own
    ``k`` (a scalar for all, or one per slice).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import topk_mask
        >>> topk_mask(jnp.array([3., 1., 3., 2.]), 2).tolist()
        [True, False, True, False]
        >>> topk_mask(jnp.array([[3., 1., 2.], [0., 5., 4.]]), jnp.array([1, 2]),
        ...           stacked=True).tolist()                  # per layer: 1 of row 0, 2 of row 1
        [[True, False, False], [False, True, True]]
    """
    return _select([scores], [k], None if eligible is None else [eligible], method,
                   [stacked])[0]


def _select_tree(scores, k, eligible, method: str, stacked=None):
    """``_select`` on a tree: ``stacked`` (one bool per leaf) given: per layer, ``k`` a
    tree like ``scores``; else global, ``k`` a scalar. Shardings, by path, from
    ``selection_shardings``."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(scores, is_leaf=is_unowned)
    el = [None] * len(flat) if eligible is None else treedef.flatten_up_to(eligible)
    live = [i for i, (_, s) in enumerate(flat) if not is_unowned(s)]
    st = None
    if stacked is not None:
        k_flat = treedef.flatten_up_to(k)
        k, st = [k_flat[i] for i in live], [stacked[i] for i in live]
    by_path = _SHARDINGS.get()
    sh = None if by_path is None else [by_path.get(path_str(flat[i][0])) for i in live]
    chosen = _select([flat[i][1] for i in live], k, [el[i] for i in live], method, st, sh)
    out = [s for _, s in flat]
    for i, c in zip(live, chosen):
        out[i] = c
    return jax.tree_util.tree_unflatten(treedef, out)


def layer_topk_masks(scores, k, eligible=None, method: str = "threshold", stacked=()):
    """``topk_mask`` on every leaf of a pytree, all layers in one selection: one loop of
    counting passes whose every pass reduces each leaf once, so a mask update compiles
    and communicates (all-reduces of per-layer counts) once, however deep the model.
    ``k`` is a tree like ``scores`` (an int, or one per layer of a stacked leaf);
    ``stacked`` holds the paths whose leading axis stacks layers (each slice is then
    its own layer). ``None`` leaves are skipped and stay ``None``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import layer_topk_masks
        >>> scores = {'a': jnp.array([0.5, 3.0, 1.0]), 'b': jnp.array([[2., 1.], [0., 4.]]),
        ...           'c': None}
        >>> m = layer_topk_masks(scores, {'a': 1, 'b': jnp.array([1, 1]), 'c': None},
        ...                      stacked={'b'})
        >>> m['a'].tolist(), m['b'].tolist(), m['c']
        ([False, True, False], [[True, False], [False, True]], None)
    """
    paths = [path_str(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(scores, is_leaf=is_unowned)[0]]
    stacked = set(stacked)
    unknown = sorted(stacked - set(paths))
    if unknown:
        raise ValueError(f"stacked paths {unknown} name no leaf; leaf paths look like "
                         f"{paths[:4]}")
    return _select_tree(scores, k, eligible, method, [p in stacked for p in paths])


def global_topk_masks(scores, k, eligible=None, method: str = "sort"):
    """``topk_mask`` over all leaves of a pytree at once (global pruning); ties go to the
    earlier leaf, then the lower index. ``None`` leaves are skipped and stay ``None``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import global_topk_masks
        >>> w1, w2 = jnp.array([0.5, -3.0]), jnp.array([[2.0, 0.1], [-1.0, 4.0]])
        >>> m = global_topk_masks({'a': jnp.abs(w1), 'b': jnp.abs(w2)}, k=3)
        >>> m['a'].tolist(), m['b'].tolist()
        ([False, True], [[True, False], [False, True]])
    """
    return _select_tree(scores, jnp.asarray(k, jnp.int32), eligible, method)


def global_magnitude_masks(params, sparsity: float, rules=None, method: str = "sort"):
    """Masks keeping the ``round((1 − s)·N)`` largest ``|w|`` over all sparse leaves
    together (one threshold; ``N`` their total size); ``None`` for dense leaves. Every
    rule that is not ``'dense'`` makes its leaves sparse (``resolve_rules``).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.masks import global_magnitude_masks
        >>> m = global_magnitude_masks({'a': jnp.array([4., -3.]), 'b': jnp.array([2., 1.]),
        ...                             'c': jnp.ones(3)}, 0.5, [('a|b', 'sparse'), ('c', 'dense')])
        >>> m['a'].tolist(), m['b'].tolist(), m['c']
        ([True, True], [False, False], None)
    """
    specs = resolve_rules(params, rules)
    leaves = named_leaves(params)
    scores = jax.tree_util.tree_unflatten(
        jax.tree.structure(params),
        [jnp.abs(w) if specs[p] != "dense" else None for p, w in leaves])
    total = sum(int(np.size(w)) for p, w in leaves if specs[p] != "dense")
    return global_topk_masks(scores, round((1.0 - sparsity) * total), method=method)

