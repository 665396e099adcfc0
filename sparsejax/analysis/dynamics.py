"""Mask dynamics of sparse training: turnover, N:M flip rate, in-time over-parameterisation.

Masks may be given as the params-shaped trees the transforms hold (``None`` for dense
leaves), as flat ``{path: mask}`` dicts, or as one array; layers are named by their
'/'-joined parameter path. Per-layer rows end with one row for all layers together,
whose ``layer`` is ``TOTAL``.

- Turnover (DST drop/grow; Evci et al. 2020, Mocanu et al. 2018): of the weights active
  before, the fraction no longer active, ``|m_prev ∧ ¬m_next| / |m_prev|``; ``grown =
  |¬m_prev ∧ m_next|``. SET/RigL keep ``|m|`` fixed, so ``dropped == grown``.
- Flip rate (Zhou et al. 2021, SR-STE): ``‖m_t − m_{t−1}‖₁ / D``, the fraction of the
  ``D`` entries whose mask changed.
- In-time over-parameterisation rate (Liu et al. 2021, "Do We Actually Need Dense
  Over-Parameterization? In-Time Over-Parameterization in Sparse Training"):
  ``R_s = |∪_t m_t| / N``, the fraction of the ``N`` weights ever active so far.

Example (``train_and_evaluate(config, workdir, hooks=[rec])`` records the run's masks
every 100 steps; here three snapshots are recorded by hand):

    >>> import numpy as np
    >>> from sparsejax.analysis import TOTAL, MaskRecorder
    >>> rec = MaskRecorder(every=100)
    >>> for step, kernel in [(0, [1, 1, 0, 0]), (100, [0, 1, 1, 0]), (200, [0, 1, 0, 1])]:
    ...     rec.record(step, {'dense': {'kernel': np.array(kernel, bool), 'bias': None}})
    >>> rec.turnover().where(layer=TOTAL)['turnover']
    [0.5, 0.5]
    >>> rec.ever_active().where(layer=TOTAL)['rate']      # the ITOP rate over training
    [0.5, 0.75, 1.0]
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from sparsejax.analysis.table import Table
from sparsejax.base import sparsity_states
from sparsejax.paths import named_leaves

TOTAL = "<total>"
"""``layer`` of the row that sums over all layers."""



# ----------------------------------------------------------------------------- finding masks


def find_masks(tree) -> Any:
    """The masks of the first sparsity state in ``tree`` (``sparsejax.sparsity_states``,
    outermost first), e.g. the ``SparseState``/``NMState`` inside a train state's
    ``opt_state``, however wrapped; ``None`` if there is none.

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> from sparsejax.analysis import find_masks
        >>> params = {'w': {'kernel': jnp.ones((4, 4)), 'bias': jnp.zeros(4)}}
        >>> tx = optax.chain(optax.clip_by_global_norm(1.0),
        ...                  sparsejax.static_sparse(optax.sgd(0.1), 0.5))
        >>> masks = find_masks(tx.init(params))   # params-shaped, None for dense leaves
        >>> masks['w']['bias'], masks['w']['kernel'].shape, int(masks['w']['kernel'].sum())
        (None, (4, 4), 8)
        >>> find_masks(optax.sgd(0.1).init(params)) is None   # a dense run
        True
    """
    states = sparsity_states(tree)
    return states[0][1].masks if states else None


def _host(x) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:  # multi-host: gather
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def mask_dict(masks) -> dict[str, np.ndarray]:
    """``{path: bool numpy array}`` of every mask leaf (``None`` leaves skipped), on host.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.analysis import mask_dict
        >>> mask_dict({'a': {'kernel': jnp.array([1, 0, 1])}, 'b': {'bias': None}})
        {'a/kernel': array([ True, False,  True])}
    """
    if masks is None:
        raise ValueError("no masks given (None): a dense run has no masks")
    leaves = named_leaves(masks)
    if not leaves:
        raise ValueError("the mask tree has no mask leaves (every leaf is None)")
    return {path: _host(m).astype(bool) for path, m in leaves}


def _paired(prev, nxt) -> list[tuple[str, np.ndarray, np.ndarray]]:
    a, b = mask_dict(prev), mask_dict(nxt)
    if a.keys() != b.keys():
        raise ValueError(f"the two mask trees hold different layers: only before "
                         f"{sorted(a.keys() - b.keys())}, only after {sorted(b.keys() - a.keys())}")
    out = []
    for path in a:
        if a[path].shape != b[path].shape:
            raise ValueError(f"mask shape mismatch for layer {path!r}: {a[path].shape} before, "
                             f"{b[path].shape} after")
        out.append((path, a[path], b[path]))
    return out


# ----------------------------------------------------------------------------- turnover


def _turnover_row(layer, size, prev_active, next_active, dropped, grown) -> dict:
    return {"layer": layer, "size": size, "prev_active": prev_active,
            "next_active": next_active, "dropped": dropped, "grown": grown,
            "turnover": dropped / prev_active if prev_active else 0.0}


def mask_turnover(prev_masks, next_masks) -> Table:
    """Per layer and in total: ``dropped = |prev ∧ ¬next|``, ``grown = |¬prev ∧ next|``,
    active counts, and ``turnover = dropped / |prev|`` (0 when nothing was active).

    Example:

        >>> import numpy as np
        >>> from sparsejax.analysis import TOTAL, mask_turnover
        >>> before = {'a': np.array([1, 1, 0, 0], bool), 'b': np.array([1, 1, 0, 0], bool)}
        >>> after = {'a': np.array([0, 1, 1, 0], bool), 'b': np.array([1, 1, 0, 0], bool)}
        >>> t = mask_turnover(before, after)
        >>> t['layer'], t['dropped'], t['grown'], t['turnover']
        (['a', 'b', '<total>'], [1, 0, 1], [1, 0, 1], [0.5, 0.0, 0.25])
        >>> t.value('turnover', layer=TOTAL)    # 1 of the 4 active weights was dropped
        0.25
    """
    rows, totals = [], np.zeros(5, np.int64)
    for path, a, b in _paired(prev_masks, next_masks):
        counts = np.array([a.size, a.sum(), b.sum(), (a & ~b).sum(), (~a & b).sum()], np.int64)
        totals += counts
        rows.append(_turnover_row(path, *(int(c) for c in counts)))
    rows.append(_turnover_row(TOTAL, *(int(c) for c in totals)))
    return Table(rows)


def flip_rate(prev_mask, next_mask) -> Table:
    """SR-STE flip rate ``‖m_t − m_{t−1}‖₁ / D`` per layer and in total (``D`` entries).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax import nm_masks_from_params
        >>> from sparsejax.analysis import TOTAL, flip_rate
        >>> rules = [('w', '2:4')]
        >>> p0 = {'w': jnp.array([[4.], [3.], [2.], [1.]])}   # keeps rows 0 and 1
        >>> p1 = {'w': jnp.array([[4.], [1.], [2.], [3.]])}   # keeps rows 0 and 3
        >>> flip_rate(nm_masks_from_params(p0, rules),
        ...           nm_masks_from_params(p1, rules)).value('flip_rate', layer=TOTAL)
        0.5
    """
    rows, flips_total, size_total = [], 0, 0
    for path, a, b in _paired(prev_mask, next_mask):
        flips = int((a != b).sum())
        rows.append({"layer": path, "size": a.size, "flips": flips, "flip_rate": flips / a.size})
        flips_total, size_total = flips_total + flips, size_total + a.size
    rows.append({"layer": TOTAL, "size": size_total, "flips": flips_total,
                 "flip_rate": flips_total / size_total})
    return Table(rows)


# ----------------------------------------------------------------------------- ITOP


class InTimeOverParam:
    """Running union of masks: ``R_s = |∪_t m_t| / N`` (Liu et al. 2021), per layer and
    in total. ``update(masks)`` adds one snapshot.

    Example:

        >>> import numpy as np
        >>> from sparsejax.analysis import InTimeOverParam
        >>> snapshots = [{'a': np.array([1, 0, 0, 0], bool), 'b': np.array([1, 0], bool)},
        ...              {'a': np.array([0, 1, 0, 0], bool), 'b': np.array([1, 0], bool)}]
        >>> itop = InTimeOverParam()
        >>> for masks in snapshots:
        ...     _ = itop.update(masks)
        >>> itop.rate, itop.layer_rates
        (0.5, {'a': 0.5, 'b': 0.5})
    """

    def __init__(self):
        self.union: dict[str, np.ndarray] = {}
        self.snapshots = 0

    def update(self, masks) -> "InTimeOverParam":
        """Adds one mask snapshot to the union; returns ``self``."""
        current = mask_dict(masks)
        if self.union:
            _paired(self.union, current)  # same layers and shapes, or a clear error
            self.union = {p: self.union[p] | current[p] for p in self.union}
        else:
            self.union = {p: m.copy() for p, m in current.items()}
        self.snapshots += 1
        return self

    def _check(self):
        if not self.union:
            raise ValueError("InTimeOverParam has seen no masks yet; call update(masks)")

    @property
    def layer_rates(self) -> dict[str, float]:
        """``{path: |∪ m| / size}``."""
        self._check()
        return {p: float(u.mean()) for p, u in self.union.items()}

    @property
    def rate(self) -> float:
        """``|∪ m| / N`` over all layers together."""
        self._check()
        union = self.union.values()
        return sum(int(u.sum()) for u in union) / sum(u.size for u in union)

    def rows(self) -> list[dict]:
        """Per layer and total: ``ever_active`` count, ``size``, ``rate``."""
        self._check()
        rows = [{"layer": p, "ever_active": int(u.sum()), "size": u.size, "rate": float(u.mean())}
                for p, u in self.union.items()]
        n, size = sum(r["ever_active"] for r in rows), sum(r["size"] for r in rows)
        return rows + [{"layer": TOTAL, "ever_active": n, "size": size, "rate": n / size}]


def ever_active(mask_sequence: Sequence, steps: Sequence[int] | None = None) -> Table:
    """Cumulative fraction of weights ever active after each snapshot (the ITOP rate
    ``R_s = |∪_{τ≤t} m_τ| / N``), per layer and in total; ``step`` is ``steps[t]`` or
    the snapshot index.

    Example:

        >>> import numpy as np
        >>> from sparsejax.analysis import TOTAL, ever_active
        >>> m0, m1, m2 = ({'w': np.array(m, bool)} for m in ([1, 0, 0, 0], [0, 1, 0, 0],
        ...                                                 [1, 0, 0, 0]))
        >>> ever_active([m0, m1, m2], steps=[0, 10, 20]).where(layer=TOTAL)['rate']
        [0.25, 0.5, 0.5]
    """
    mask_sequence = list(mask_sequence)
    if not mask_sequence:
        raise ValueError("ever_active needs at least one mask snapshot, got none")
    if steps is not None and len(steps) != len(mask_sequence):
        raise ValueError(f"{len(steps)} steps for {len(mask_sequence)} mask snapshots")
    itop, rows = InTimeOverParam(), []
    for t, masks in enumerate(mask_sequence):
        itop.update(masks)
        step = t if steps is None else steps[t]
        rows += [{"step": step, **r} for r in itop.rows()]
    return Table(rows)


# ----------------------------------------------------------------------------- recorder


class MaskRecorder:
    """A ``train_and_evaluate`` hook that keeps a host copy of the masks every ``every``
    steps (found in ``state.opt_state`` by ``find_masks``), then tabulates their dynamics.

    Snapshots are bool numpy arrays, one byte per weight of every sparse layer; choose
    ``every`` accordingly for large models. ``record(step, masks)`` adds a snapshot by hand
    (e.g. the masks at init).

    Example (a training loop calls the hook with its state at every step, as
    ``train_and_evaluate(config, workdir, hooks=[rec])`` does):

        >>> import jax, jax.numpy as jnp
        >>> import optax, sparsejax
        >>> from sparsejax.analysis import TOTAL, MaskRecorder
        >>> params = {'w': {'kernel': jnp.ones((8, 8)), 'bias': jnp.zeros(8)}}
        >>> tx = sparsejax.rigl(optax.sgd(0.1), 0.5, update_every=1, end_step=10)
        >>> state, update = tx.init(params), jax.jit(tx.update)
        >>> rec = MaskRecorder(every=1)
        >>> for step in range(3):
        ...     rec(step, state)
        ...     grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(step), x.shape),
        ...                          params)
        ...     _, state = update(grads, state, params)
        >>> rec.turnover().columns
        ['step', 'layer', 'size', 'prev_active', 'next_active', 'dropped', 'grown', 'turnover']
        >>> rec.turnover().where(layer=TOTAL)['turnover']   # RigL: dropped == grown
        [0.28125, 0.25]
        >>> rec.ever_active().where(layer=TOTAL)['rate']
        [0.5, 0.640625, 0.75]
    """

    def __init__(self, every: int = 1):
        if int(every) < 1:
            raise ValueError(f"MaskRecorder: every must be >= 1, got {every}")
        self.every = int(every)
        self.steps: list[int] = []
        self.masks: list[dict[str, np.ndarray]] = []

    def __call__(self, step: int, state) -> None:
        if int(step) % self.every:
            return
        masks = find_masks(getattr(state, "opt_state", state))
        if masks is None:
            raise ValueError("MaskRecorder: the train state holds no masks (no NamedTuple "
                             "with a `masks` field, such as SparseState or NMState, in "
                             "opt_state); is this a dense run?")
        self.record(step, masks)

    def record(self, step: int, masks) -> None:
        """Adds a host copy of ``masks`` taken at ``step``."""
        self.steps.append(int(step))
        self.masks.append(mask_dict(masks))

    def _pairs(self):
        if len(self.masks) < 2:
            raise ValueError(f"MaskRecorder has {len(self.masks)} snapshot(s); dynamics need "
                             "at least two")
        return zip(self.steps[1:], self.masks[:-1], self.masks[1:])

    def counts(self) -> Table:
        """Rows ``(step, layer, active, size)``, with a ``TOTAL`` row per step."""
        rows = []
        for step, masks in zip(self.steps, self.masks):
            layer = [{"step": step, "layer": p, "active": int(m.sum()), "size": m.size}
                     for p, m in masks.items()]
            rows += layer + [{"step": step, "layer": TOTAL,
                              "active": sum(r["active"] for r in layer),
                              "size": sum(r["size"] for r in layer)}]
        return Table(rows)

    def turnover(self) -> Table:
        """``mask_turnover`` between consecutive snapshots, labelled by the later step."""
        return Table([{"step": step, **r} for step, a, b in self._pairs()
                      for r in mask_turnover(a, b)])

    def flip_rate(self) -> Table:
        """``flip_rate`` between consecutive snapshots, labelled by the later step."""
        return Table([{"step": step, **r} for step, a, b in self._pairs()
                      for r in flip_rate(a, b)])

    def ever_active(self) -> Table:
        """``ever_active`` over the snapshots so far."""
        return ever_active(self.masks, self.steps)
