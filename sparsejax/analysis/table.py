"""``Table``: a tidy table as a list of row dicts, with ``to_pandas()`` only on request.

Every measurement in ``sparsejax.analysis`` returns one, so a notebook can filter and
plot it without pandas, or hand it to pandas when pandas is installed. Rows are plain
dicts; the columns are the union of the rows' keys in first-seen order (a missing cell
reads as ``None``).

Example:

    >>> from sparsejax.analysis import Table
    >>> t = Table([{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.4}])
    >>> t['loss']
    [0.5, 0.4]
    >>> t.where(step=2)[0]
    {'step': 2, 'loss': 0.4}
    >>> t.value('loss', step=1)
    0.5
    >>> t
    step  loss
    1     0.5
    2     0.4
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping


class Table:
    """Rows of a tidy table (one observation per row, one variable per column).

    ``t[i]`` is row ``i`` (a dict), ``t['col']`` the column as a list, ``len(t)`` the
    number of rows; ``where`` filters by equality, ``sort_by`` orders, ``value`` reads
    the one cell a filter selects, ``to_pandas`` converts (lazy import).

    Example:

        >>> from sparsejax.analysis import Table
        >>> t = Table([{'layer': 'a', 'rate': 0.5}, {'layer': 'b', 'rate': 0.25}])
        >>> t.columns, len(t)
        (['layer', 'rate'], 2)
        >>> t.where(layer='b')['rate']
        [0.25]
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]] = (),
                 columns: Iterable[str] | None = None):
        self._rows = [dict(r) for r in rows]
        cols = list(columns or ())
        for r in self._rows:
            cols.extend(k for k in r if k not in cols)
        self._columns = cols

    @property
    def columns(self) -> list[str]:
        """Column names in first-seen order."""
        return list(self._columns)

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict]:
        return (dict(r) for r in self._rows)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key not in self._columns:
                raise KeyError(f"no column {key!r}; columns are {self._columns}")
            return [r.get(key) for r in self._rows]
        if isinstance(key, slice):
            return Table(self._rows[key], self._columns)
        return dict(self._rows[key])

    def __eq__(self, other) -> bool:
        return isinstance(other, Table) and self.records() == other.records()

    def records(self) -> list[dict]:
        """The rows as new dicts, every column present (missing cells ``None``).

        Example:

            >>> from sparsejax.analysis import Table
            >>> Table([{'a': 1}, {'b': 2}]).records()
            [{'a': 1, 'b': None}, {'a': None, 'b': 2}]
        """
        return [{c: r.get(c) for c in self._columns} for r in self._rows]

    def where(self, predicate: Callable[[dict], bool] | None = None, **equal) -> "Table":
        """Rows whose columns equal ``equal`` (and satisfy ``predicate``, if given).

        Example:

            >>> from sparsejax.analysis import Table
            >>> t = Table([{'step': 100, 'split': 'eval', 'metric': 'accuracy', 'value': 0.8},
            ...            {'step': 100, 'split': 'train', 'metric': 'loss', 'value': 0.6},
            ...            {'step': 200, 'split': 'eval', 'metric': 'accuracy', 'value': 0.9}])
            >>> t.where(split='eval', metric='accuracy')['value']
            [0.8, 0.9]
            >>> t.where(lambda r: r['step'] > 100)['value']
            [0.9]
        """
        for k in equal:
            if k not in self._columns:
                raise KeyError(f"no column {k!r}; columns are {self._columns}")
        keep = [r for r in self._rows if all(r.get(k) == v for k, v in equal.items())
                and (predicate is None or predicate(r))]
        return Table(keep, self._columns)

    def sort_by(self, *columns: str, reverse: bool = False) -> "Table":
        """Rows ordered by ``columns`` (stable).

        Example:

            >>> from sparsejax.analysis import Table
            >>> t = Table([{'step': 2, 'loss': 0.4}, {'step': 1, 'loss': 0.5}])
            >>> t.sort_by('step')['step'], t.sort_by('step', reverse=True)['step']
            ([1, 2], [2, 1])
        """
        return Table(sorted(self._rows, key=lambda r: tuple(r.get(c) for c in columns),
                            reverse=reverse), self._columns)

    def value(self, column: str, **equal):
        """The single cell of ``column`` in the one row matching ``equal``; an error if
        no row or several rows match.

        Example:

            >>> from sparsejax.analysis import TOTAL, Table
            >>> turnover = Table([{'layer': 'a', 'turnover': 0.5},
            ...                   {'layer': TOTAL, 'turnover': 0.25}])
            >>> turnover.value('turnover', layer=TOTAL)
            0.25
            >>> Table([{'a': 1}, {'a': 1}]).value('a', a=1)
            Traceback (most recent call last):
            ...
            ValueError: 2 rows match {'a': 1}; expected exactly one
        """
        hits = self.where(**equal)[column]
        if len(hits) != 1:
            raise ValueError(f"{len(hits)} rows match {equal}; expected exactly one")
        return hits[0]

    def to_pandas(self):
        """A ``pandas.DataFrame`` of the rows (pandas is imported here, only when asked).

        Example (pandas is optional, so this holds with or without it):

            >>> from sparsejax.analysis import Table
            >>> t = Table([{'step': 1, 'loss': 0.5}, {'step': 2, 'loss': 0.4}])
            >>> try:
            ...     shape = t.to_pandas().shape
            ... except ImportError:   # no pandas: the same rows are t.records()
            ...     shape = (len(t.records()), len(t.columns))
            >>> shape
            (2, 2)
        """
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("Table.to_pandas() needs pandas, which sparsejax does not "
                              "depend on: pip install pandas (or use Table.records())") from e
        return pd.DataFrame(self.records(), columns=self._columns)

    def __repr__(self) -> str:
        head = self.records()[:20]
        cells = [[_fmt(r[c]) for c in self._columns] for r in head]
        widths = [max([len(c)] + [len(row[i]) for row in cells])
                  for i, c in enumerate(self._columns)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(self._columns, widths))]
        lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
        if len(self) > len(head):
            lines.append(f"... ({len(self)} rows)")
        return "\n".join(lines)


def _fmt(x) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


def as_table(rows) -> Table:
    """``rows`` as a ``Table`` (a Table, or any iterable of dicts).

    Example:

        >>> from sparsejax.analysis import Table, as_table
        >>> t = as_table([{'flops': 1.0, 'accuracy': 0.9}])
        >>> t.columns, as_table(t) is t
        (['flops', 'accuracy'], True)
    """
    return rows if isinstance(rows, Table) else Table(rows)
