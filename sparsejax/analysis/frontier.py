"""The FLOPs–accuracy Pareto frontier and small matplotlib helpers that draw on an ``ax``.

A point ``p`` is dominated when another point ``q`` is at least as good in both
coordinates and strictly better in one: ``x_q ≤ x_p`` and ``y_q ≥ y_p`` with one strict
(lower x, e.g. FLOPs, and higher y, e.g. accuracy, are better by default). The frontier
is the set of non-dominated points, sorted by x; of identical points the first is kept.

The plot helpers take a matplotlib ``Axes`` and rows (a ``Table`` or list of dicts),
draw, and return the artists; they never import matplotlib themselves, so the library
does not depend on it.

Example (``matplotlib.figure.Figure().subplots()`` gives an ``ax`` as
``plt.subplots()`` does):

    >>> from matplotlib.figure import Figure
    >>> from sparsejax.analysis import pareto_frontier, plot_frontier
    >>> runs = [{'method': 'rigl', 'flops': 1.0, 'eval_accuracy': 0.80},
    ...         {'method': 'rigl', 'flops': 2.0, 'eval_accuracy': 0.85},
    ...         {'method': 'set', 'flops': 1.0, 'eval_accuracy': 0.78},
    ...         {'method': 'dense', 'flops': 4.0, 'eval_accuracy': 0.84}]
    >>> front = pareto_frontier(runs, x='flops', y='eval_accuracy')
    >>> front['method'], front['flops']
    (['rigl', 'rigl'], [1.0, 2.0])
    >>> ax = Figure().subplots()
    >>> scatters, line = plot_frontier(ax, runs, x='flops', y='eval_accuracy', label='method')
    >>> len(scatters), line.get_xydata().tolist()   # one scatter per method; the frontier
    (3, [[1.0, 0.8], [2.0, 0.85]])
"""

from __future__ import annotations

from sparsejax.analysis.table import Table, as_table


def _xy(rows: Table, x: str, y: str) -> list[tuple[float, float, int]]:
    for col in (x, y):
        if col not in rows.columns:
            raise KeyError(f"no column {col!r}; columns are {rows.columns}")
    return [(float(r[x]), float(r[y]), i) for i, r in enumerate(rows)]


def pareto_frontier(rows, x: str = "flops", y: str = "accuracy", *,
                    y_higher_is_better: bool = True) -> Table:
    """The non-dominated rows sorted by ``x`` ascending (lower ``x`` better; higher ``y``
    better unless ``y_higher_is_better=False``). Along the result ``y`` strictly
    improves with ``x``.

    Example:

        >>> from sparsejax.analysis import pareto_frontier
        >>> pareto_frontier([{'flops': 1, 'accuracy': .8}, {'flops': 2, 'accuracy': .7},
        ...                  {'flops': 3, 'accuracy': .9}])   # flops 1 dominates flops 2
        flops  accuracy
        1      0.8
        3      0.9
    """
    rows = as_table(rows)
    sign = 1.0 if y_higher_is_better else -1.0
    points = sorted(_xy(rows, x, y), key=lambda p: (p[0], -sign * p[1], p[2]))
    keep, best = [], None
    for _, yv, i in points:
        if best is None or sign * yv > best:
            keep.append(i)
            best = sign * yv
    return Table([rows[i] for i in keep], rows.columns)


def _groups(rows: Table, by: str | None) -> dict:
    if by is None:
        return {None: rows}
    if by not in rows.columns:
        raise KeyError(f"no column {by!r}; columns are {rows.columns}")
    out: dict = {}
    for r in rows:
        out.setdefault(r[by], []).append(r)
    return {k: Table(v, rows.columns) for k, v in out.items()}


def _lines(ax, rows, x: str, y: str, by: str | None, **kw) -> list:
    rows = as_table(rows)
    for col in (x, y):
        if col not in rows.columns:
            raise KeyError(f"no column {col!r}; columns are {rows.columns}")
    artists = []
    for key, group in _groups(rows, by).items():
        group = group.sort_by(x)
        artists += ax.plot(group[x], group[y], label=None if key is None else str(key), **kw)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    if by is not None:
        ax.legend()
    return artists


def plot_frontier(ax, rows, x: str = "flops", y: str = "accuracy", *, label: str | None = None,
                  y_higher_is_better: bool = True):
    """Scatter of every row (one colour per value of column ``label``, if given) and the
    Pareto frontier as a line; returns ``(scatters, frontier_line)``.

    Example:

        >>> from matplotlib.figure import Figure
        >>> from sparsejax.analysis import plot_frontier
        >>> runs = [{'method.name': 'rigl', 'flops': 1.0, 'eval_accuracy': 0.8},
        ...         {'method.name': 'set', 'flops': 1.0, 'eval_accuracy': 0.7},
        ...         {'method.name': 'dense', 'flops': 3.0, 'eval_accuracy': 0.9}]
        >>> ax = Figure().subplots()
        >>> scatters, line = plot_frontier(ax, runs, x='flops', y='eval_accuracy',
        ...                                label='method.name')
        >>> [t.get_text() for t in ax.get_legend().get_texts()]
        ['rigl', 'set', 'dense', 'Pareto frontier']
        >>> line.get_xydata().tolist()
        [[1.0, 0.8], [3.0, 0.9]]
    """
    rows = as_table(rows)
    _xy(rows, x, y)
    scatters = [ax.scatter(g[x], g[y], label=None if k is None else str(k))
                for k, g in _groups(rows, label).items()]
    front = pareto_frontier(rows, x, y, y_higher_is_better=y_higher_is_better)
    (line,) = ax.plot(front[x], front[y], color="black", linestyle="--", label="Pareto frontier")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend()
    return scatters, line


def plot_activation_sparsity(ax, rows, *, x: str = "step", y: str = "fraction_nonzero",
                             by: str = "layer") -> list:
    """One line per layer of ``ActivationSparsityRecorder.table()`` rows (fraction of
    nonzero activations over training); returns the lines.

    Example (rows as ``ActivationSparsityRecorder.table()`` gives them):

        >>> from matplotlib.figure import Figure
        >>> from sparsejax.analysis import plot_activation_sparsity
        >>> rows = [{'step': 0, 'layer': 'acts/0', 'fraction_nonzero': 0.5},
        ...         {'step': 100, 'layer': 'acts/0', 'fraction_nonzero': 0.3},
        ...         {'step': 0, 'layer': 'acts/1', 'fraction_nonzero': 0.4},
        ...         {'step': 100, 'layer': 'acts/1', 'fraction_nonzero': 0.2}]
        >>> lines = plot_activation_sparsity(Figure().subplots(), rows)
        >>> [(l.get_label(), l.get_ydata().tolist()) for l in lines]
        [('acts/0', [0.5, 0.3]), ('acts/1', [0.4, 0.2])]
    """
    return _lines(ax, rows, x, y, by, marker="o")


def plot_mask_dynamics(ax, rows, *, y: str = "turnover", x: str = "step",
                       by: str | None = "layer") -> list:
    """One line per layer (``TOTAL`` included) of ``MaskRecorder`` tables: ``turnover``,
    ``flip_rate`` or the ITOP ``rate``; returns the lines.

    Example:

        >>> import numpy as np
        >>> from matplotlib.figure import Figure
        >>> from sparsejax.analysis import TOTAL, MaskRecorder, plot_mask_dynamics
        >>> rec = MaskRecorder()
        >>> for step, kernel in [(0, [1, 1, 0, 0]), (1, [0, 1, 1, 0]), (2, [0, 1, 0, 1])]:
        ...     rec.record(step, {'w': np.array(kernel, bool)})
        >>> ax = Figure().subplots()
        >>> (line,) = plot_mask_dynamics(ax, rec.ever_active().where(layer=TOTAL), y='rate')
        >>> line.get_xydata().tolist(), ax.get_ylabel()
        ([[0.0, 0.5], [1.0, 0.75], [2.0, 1.0]], 'rate')
    """
    return _lines(ax, rows, x, y, by)


def plot_sweep(ax, rows, *, x: str = "sparsity", y: str = "metric", drop=None) -> list:
    """The metric against sparsity of an ``essential_sparsity_sweep``, and a vertical line
    at ``drop`` (a ``SharpDrop`` or a sparsity) if given; returns the artists.

    Example (rows as ``essential_sparsity_sweep`` gives them):

        >>> from matplotlib.figure import Figure
        >>> from sparsejax.analysis import plot_sweep, sharp_drop
        >>> sweep = [{'sparsity': s, 'metric': m} for s, m in [(0.0, 0.9), (0.5, 0.895),
        ...                                                    (0.7, 0.85), (0.9, 0.2)]]
        >>> drop = sharp_drop([r['sparsity'] for r in sweep], [r['metric'] for r in sweep])
        >>> artists = plot_sweep(Figure().subplots(), sweep, drop=drop)
        >>> len(artists), artists[-1].get_label()
        (2, 'sharp drop at 0.5')
    """
    artists = _lines(ax, rows, x, y, None, marker="o")
    s = getattr(drop, "sparsity", drop)
    if s is not None:
        artists.append(ax.axvline(float(s), color="red", linestyle=":",
                                  label=f"sharp drop at {float(s):g}"))
        ax.legend()
    return artists
