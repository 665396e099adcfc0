"""Essential sparsity (Jaiswal et al. 2023, "The Emergence of Essential Sparsity in Large
Pre-trained Models: The Weights that Matter"): one-shot magnitude pruning of a trained
model at increasing sparsity, without retraining, and the sharp-drop point where the
metric leaves the dense model's.

Pruning keeps the largest ``|w|`` of the sparse parameters (picked by path rules, as in
``sparsejax.masks.resolve_rules``; every kernel by default):

- ``scope='global'``: one threshold over all sparse parameters together, keeping
  ``round((1 − s) · N)`` of the ``N`` weights (the paper's setting); layers end up with
  different sparsities.
- ``scope='layer'``: every sparse parameter keeps ``round((1 − s) · size)`` of its own.
- ``structure='n:m'``: every sparse parameter keeps the ``N`` largest ``|w|`` of each
  group of ``M`` along ``axis`` (``sparsejax.nm.nm_mask``); sparsity ``1 − N/M``.

Ties go to the lower index (``sparsejax.masks.topk_mask``).

Example (a linear classifier, scored against the dense model's predictions):

    >>> import numpy as np
    >>> from sparsejax.analysis import essential_sparsity_sweep, sharp_drop
    >>> rng = np.random.default_rng(0)
    >>> x, w = rng.normal(size=(256, 16)), rng.normal(size=(16, 4)) ** 3
    >>> params, labels = {'linear': {'kernel': w}}, np.argmax(x @ w, -1)
    >>> def accuracy(p):
    ...     return float(np.mean(np.argmax(x @ np.asarray(p['linear']['kernel']), -1) == labels))
    >>> sweep = essential_sparsity_sweep(params, lambda p: accuracy(p), [0.1, 0.3, 0.5, 0.7, 0.9])
    >>> [round(a, 3) for a in sweep['metric']]   # dense first
    [1.0, 1.0, 1.0, 0.98, 0.879, 0.691]
    >>> drop = sharp_drop(sweep['sparsity'], sweep['metric'], tolerance=0.01)
    >>> drop.sparsity     # the essential sparsity: largest s within 1 point of dense
    0.3
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from sparsejax.nm import nm_masks_from_params, nm_rules_like
from sparsejax.analysis.table import Table
from sparsejax.masks import (apply_masks, global_magnitude_masks, global_sparsity, is_unowned,
                             resolve_rules, topk_mask)
from sparsejax.paths import path_str

STRUCTURES = ("unstructured", "n:m")
_SLACK = 1e-12  # float rounding: 0.9 - 0.89 is 0.010000000000000009
SCOPES = ("global", "layer")


def _sparse_tree(params, rules):
    """``True`` for every sparse leaf of ``params`` (by rules), ``None`` for dense ones."""
    specs = resolve_rules(params, rules)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree_util.tree_unflatten(
        treedef, [None if specs[path_str(p)] == "dense" else True for p, _ in flat])


def magnitude_masks(params, sparsity: float, *, rules=None, scope: str = "global"):
    """Masks keeping the largest ``|w|``: ``round((1−s)·N)`` over all sparse leaves
    (``'global'``) or ``round((1−s)·size)`` per leaf (``'layer'``); ``None`` for dense
    leaves. Every rule that is not ``'dense'`` makes its leaves sparse.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.analysis import magnitude_masks
        >>> p, rules = {'a': jnp.array([4., -3.]), 'b': jnp.array([2., 1.])}, [('a|b', 'sparse')]
        >>> magnitude_masks(p, 0.5, rules=rules)
        {'a': Array([ True,  True], dtype=bool), 'b': Array([False, False], dtype=bool)}
        >>> magnitude_masks(p, 0.5, rules=rules, scope='layer')
        {'a': Array([ True, False], dtype=bool), 'b': Array([ True, False], dtype=bool)}
    """
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity {sparsity!r} is outside [0, 1)")
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; known: {SCOPES}")
    if scope == "global":
        return global_magnitude_masks(params, sparsity, rules)
    return jax.tree.map(lambda s, w: None if s is None else
                        topk_mask(jnp.abs(w), round((1.0 - sparsity) * w.size), method="sort"),
                        _sparse_tree(params, rules), params, is_leaf=is_unowned)


def _nm_masks(params, n: int, m: int, rules, axis: int):
    """N:M masks for every leaf a non-dense rule selects (``'sparse'`` or a sparsity
    become ``'n:m'``), through ``sparsejax.nm.nm_masks_from_params``."""
    return nm_masks_from_params(params, nm_rules_like(rules), axis, pattern=f"{n}:{m}")


def _metrics(value) -> dict[str, float]:
    if isinstance(value, dict):
        return {str(k): float(v) for k, v in value.items()}
    return {"metric": float(value)}


def essential_sparsity_sweep(params, evaluate: Callable[[Any], Any],
                             sparsities: Sequence[float] = (), *, rules=None,
                             structure: str = "unstructured",
                             patterns: Sequence[tuple[int, int]] = (), scope: str = "global",
                             axis: int = -2, include_dense: bool = True) -> Table:
    """One-shot magnitude pruning sweep: rows ``(sparsity, structure, pattern,
    realised_sparsity, metric…)``, one per sparsity (or N:M pattern), ascending.

    ``evaluate(pruned_params)`` returns a number (column ``metric``) or a dict of them
    (one column each). ``structure='unstructured'`` prunes to each of ``sparsities``
    with ``scope`` 'global' or 'layer'; ``structure='n:m'`` uses ``patterns`` ``[(n, m),
    …]``, sparsity ``1 − n/m``. ``include_dense`` adds the unpruned model as sparsity 0
    (the reference ``sharp_drop`` needs). ``realised_sparsity`` is the measured fraction
    of zeros in the masks (rounding of the kept count).

    Example (``evaluate`` here is the ``|w|`` mass the pruning keeps):

        >>> import jax.numpy as jnp
        >>> from sparsejax.analysis import essential_sparsity_sweep
        >>> params = {'w': {'kernel': jnp.arange(1., 17.).reshape(8, 2)}}
        >>> def evaluate(p):
        ...     return float(jnp.abs(p['w']['kernel']).sum())
        >>> sweep = essential_sparsity_sweep(params, evaluate, structure='n:m',
        ...                                  patterns=[(2, 4), (1, 4), (1, 8)])
        >>> sweep
        sparsity  structure  pattern  realised_sparsity  metric
        0         dense      None     0                  136
        0.5       n:m        2:4      0.5                84
        0.75      n:m        1:4      0.75               46
        0.875     n:m        1:8      0.875              31
    """
    if structure not in STRUCTURES:
        raise ValueError(f"unknown structure {structure!r}; known: {STRUCTURES}")
    if structure == "unstructured":
        if patterns:
            raise ValueError("patterns are for structure='n:m'; pass sparsities instead")
        for s in sparsities:
            if not 0.0 <= float(s) < 1.0:
                raise ValueError(f"sparsity {s!r} is outside [0, 1)")
        points = [(float(s), None) for s in sparsities]
    else:
        if not patterns:
            raise ValueError("structure='n:m' needs patterns, e.g. [(2, 4), (1, 4)]")
        if sparsities:
            raise ValueError("structure='n:m' takes patterns, not sparsities")
        points = [(1.0 - n / m, (int(n), int(m))) for n, m in patterns]
    _sparse_tree(params, rules)  # bad rules fail before any evaluation
    rows = []
    if include_dense and not any(s == 0.0 and p is None for s, p in points):
        rows.append({"sparsity": 0.0, "structure": "dense", "pattern": None,
                     "realised_sparsity": 0.0, **_metrics(evaluate(params))})
    for s, pattern in sorted(points, key=lambda sp: sp[0]):
        if pattern is None:
            masks = magnitude_masks(params, s, rules=rules, scope=scope)
        else:
            masks = _nm_masks(params, *pattern, rules, axis)
        rows.append({"sparsity": s, "structure": structure,
                     "pattern": None if pattern is None else f"{pattern[0]}:{pattern[1]}",
                     "realised_sparsity": global_sparsity(masks),
                     **_metrics(evaluate(apply_masks(params, masks)))})
    return Table(rows)


class SharpDrop(NamedTuple):
    """The essential sparsity: its ``sparsity`` and ``index`` in the input sequences
    (both ``None`` if no point qualifies), and the ``dense`` metric it was compared with.

    Example:

        >>> from sparsejax.analysis import sharp_drop
        >>> sharp_drop([0, .5, .9], [.9, .895, .6], 0.01)
        SharpDrop(sparsity=0.5, index=1, dense=0.9)
        >>> sharp_drop([0, .5], [.9, .5], 0.01)   # no sparse point qualifies
        SharpDrop(sparsity=0.0, index=0, dense=0.9)
    """

    sparsity: float | None
    index: int | None
    dense: float


def sharp_drop(sparsities: Sequence[float], metric: Sequence[float], tolerance: float = 0.01,
               *, dense: float | None = None, higher_is_better: bool = True,
               contiguous: bool = True) -> SharpDrop:
    """The largest sparsity whose metric is within ``tolerance`` (absolute) of the dense
    metric: ``metric ≥ dense − tolerance`` (or ``≤ dense + tolerance`` when lower is
    better), inclusive up to float rounding. Being better than dense always qualifies.

    ``dense`` defaults to the metric at sparsity 0. With ``contiguous`` (default), points
    are scanned by increasing sparsity and the scan stops at the first one outside the
    tolerance, so a noisy recovery after the drop does not count; with
    ``contiguous=False`` it is the largest qualifying sparsity anywhere. Several points at
    one sparsity (N:M patterns 1:2 and 2:4) count as the best of them.

    Example:

        >>> from sparsejax.analysis import sharp_drop
        >>> sharp_drop([0.0, 0.5, 0.7, 0.9], [0.90, 0.895, 0.85, 0.20], 0.01)
        SharpDrop(sparsity=0.5, index=1, dense=0.9)
        >>> sharp_drop([0.0, 0.5, 0.7, 0.9], [0.90, 0.85, 0.90, 0.20], 0.01,
        ...            contiguous=False)   # the recovery at 0.7 counts
        SharpDrop(sparsity=0.7, index=2, dense=0.9)
    """
    s, y = [float(v) for v in sparsities], [float(v) for v in metric]
    if len(s) != len(y):
        raise ValueError(f"{len(s)} sparsities but {len(y)} metric values")
    if not s:
        raise ValueError("sharp_drop needs at least one point")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    if dense is None:
        zero = [i for i, v in enumerate(s) if v == 0.0]
        if not zero:
            raise ValueError("no dense point (sparsity 0) in the sweep; pass dense=<metric>")
        dense = y[zero[0]]
    loss = [dense - v if higher_is_better else v - dense for v in y]
    best = None
    for level in sorted(set(s)):  # points at one sparsity (1:2 and 2:4) count as their best
        i = min((j for j in range(len(s)) if s[j] == level), key=lambda j: loss[j])
        if loss[i] <= tolerance + _SLACK:
            best = i
        elif contiguous:
            break
    return SharpDrop(None if best is None else s[best], best, float(dense))
