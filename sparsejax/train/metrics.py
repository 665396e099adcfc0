"""Metrics to JSONL (always) and TensorBoard event files, from process 0 only.

Example:

    >>> import tempfile
    >>> from pathlib import Path
    >>> from sparsejax.train.metrics import MetricsWriter, read_jsonl
    >>> workdir = Path(tempfile.mkdtemp())
    >>> w = MetricsWriter(workdir)
    >>> w.write(100, 'train', {'loss': 0.3, 'accuracy': 0.9})
    >>> w.close()
    >>> read_jsonl(workdir / 'metrics.jsonl')
    [{'step': 100, 'split': 'train', 'loss': 0.3, 'accuracy': 0.9}]
    >>> sorted(p.name for p in workdir.iterdir())   # and TensorBoard event files
    ['metrics.jsonl', 'tensorboard']
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax


class MetricsWriter:
    """Appends one JSON object per (step, split) to ``metrics.jsonl`` and mirrors scalars
    to TensorBoard under ``tensorboard/`` as ``split/name``. A run resumed from its
    checkpoint at ``resume_step`` first drops the rows after it (``supersede_after``), so
    every (step, split) keeps one value.

    Example:

        >>> import tempfile
        >>> import numpy as np
        >>> from sparsejax.train.metrics import MetricsWriter
        >>> w = MetricsWriter(tempfile.mkdtemp())
        >>> w.write(1, 'eval', {'accuracy': np.float32(0.5)})
        >>> w.write(2, 'eval', {'accuracy': 0.75}); w.close()
        >>> w.path.read_text().splitlines()   # values become plain floats
        ['{"step": 1, "split": "eval", "accuracy": 0.5}',
         '{"step": 2, "split": "eval", "accuracy": 0.75}']
    """

    def __init__(self, workdir: str | Path, enabled: bool | None = None,
                 resume_step: int = 0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step and self.path.exists():
                supersede_after(self.path, resume_step)
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard drops the events a resumed run writes again
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)

    def write(self, step: int, split: str, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "split": split, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in metrics.items():
            self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | Path) -> list[dict]:
    """All rows of a metrics JSONL file.

    Example:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from sparsejax.train.metrics import read_jsonl
        >>> path = Path(tempfile.mkdtemp()) / 'metrics.jsonl'
        >>> _ = path.write_text('{"step": 1, "split": "train", "loss": 2.0}\\n\\n'
        ...                     '{"step": 1, "split": "eval", "loss": 2.1}\\n'
        ...                     '{"step": 2, "split": "train", "loss": 1.5}\\n')
        >>> [r['loss'] for r in read_jsonl(path) if r['split'] == 'train']
        [2.0, 1.5]
    """
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def supersede_after(path: str | Path, step: int) -> int:
    """Drops the rows after ``step`` from a metrics JSONL file (atomically: the file is
    rewritten beside and renamed); returns how many were dropped. A run resumed from its
    checkpoint at ``step`` writes those steps again.

    Example:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from sparsejax.train.metrics import read_jsonl, supersede_after
        >>> path = Path(tempfile.mkdtemp()) / 'metrics.jsonl'
        >>> _ = path.write_text(''.join(f'{{"step": {s}, "split": "train"}}\\n' for s in (5, 10, 15)))
        >>> supersede_after(path, 10), [r['step'] for r in read_jsonl(path)]
        (1, [5, 10])
    """
    path = Path(path)
    rows = read_jsonl(path)
    kept = [r for r in rows if r["step"] <= step]
    if len(kept) < len(rows):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return len(rows) - len(kept)
