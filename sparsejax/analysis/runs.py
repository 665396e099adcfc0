"""Reading training runs back: metrics, summary, config and checkpoints of a workdir.

A workdir written by ``sparsejax.train.train_and_evaluate`` holds ``metrics.jsonl``
(one JSON object per logged (step, split)), ``summary.json``, ``config.json``,
``tensorboard/`` and orbax checkpoints under ``checkpoints/<step>/``. Nothing here
writes to a workdir.

Example::

    m = read_metrics('runs/qs_rigl')                  # rows (step, split, metric, value)
    m.where(split='eval', metric='accuracy')['value']
    ckpt = load_checkpoint('runs/qs_rigl', 500, make_trainer(config))
    sparsejax.global_sparsity(ckpt.masks)
    read_runs(['runs/qs', 'runs/qs_rigl'])             # one row per run
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax

from sparsejax.analysis.dynamics import find_masks
from sparsejax.analysis.table import Table

DEFAULT_RUN_KEYS = ("model.name", "sparsity.name", "sparsity.sparsity", "sparsity.distribution",
                    "sparsity.pattern", "ift.family", "ift.sparsity", "seed", "num_steps")
"""Config keys (dotted) that ``read_runs`` puts in every row by default."""


def _workdir(workdir) -> Path:
    path = Path(workdir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {str(path)!r} does not exist (or is not a "
                                "directory)")
    return path


def _file(workdir, name: str) -> Path:
    path = _workdir(workdir) / name
    if not path.is_file():
        raise FileNotFoundError(f"no {name} in run directory {str(workdir)!r}")
    return path


def read_metrics(workdir) -> Table:
    """Tidy rows ``(step, split, metric, value)`` from ``metrics.jsonl``, in file order
    (within a line, in the order the metrics were written).

    Example::

        m = read_metrics('runs/quickstart')
        m.where(split='train', metric='loss')['value']
    """
    rows = []
    with open(_file(workdir, "metrics.jsonl")) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{workdir}/metrics.jsonl line {n} is not JSON: {e}") from e
            step, split = int(obj.pop("step")), obj.pop("split")
            rows += [{"step": step, "split": split, "metric": k, "value": v}
                     for k, v in obj.items()]
    return Table(rows, ["step", "split", "metric", "value"])


def read_summary(workdir) -> dict:
    """``summary.json`` (written when a run finishes): final train/eval metrics, steps,
    wall time.

    Example::

        read_summary('runs/quickstart')['eval_accuracy']
    """
    return json.loads(_file(workdir, "summary.json").read_text())


def read_config(workdir) -> dict:
    """``config.json``: the run's config as nested dicts (tuples became lists).

    Example::

        read_config('runs/quickstart')['sparsity']['name']
    """
    return json.loads(_file(workdir, "config.json").read_text())


def config_value(config: dict, key: str, default=None):
    """``config['a']['b']`` for ``key='a.b'``, or ``default`` when a part is missing.

    Example::

        config_value(read_config(workdir), 'sparsity.sparsity')   # 0.9
    """
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def checkpoint_steps(workdir) -> list[int]:
    """Steps of the finished checkpoints under ``checkpoints/``, ascending (orbax
    writes to a temporary name and renames, so only finished ones have a bare step name).

    Example::

        checkpoint_steps('runs/quickstart')   # [1000, 1250, 1500]
    """
    directory = _workdir(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


class Checkpoint(NamedTuple):
    """A restored checkpoint: the whole ``TrainState``, its params, the sparsity masks
    found in the optimizer state (``None`` for a dense run) and the data position.

    Example::

        ckpt = load_checkpoint(workdir, 500, trainer)
        ckpt.params['layers'][0]['kernel'], mask_counts(ckpt.masks)
    """

    step: int
    state: Any
    params: Any
    masks: Any
    data_position: int


def _restore_target(like):
    """``ShapeDtypeStruct`` leaves with shardings, from a Trainer, a config or a tree."""
    from sparsejax.train.checkpoint import abstract_like

    if hasattr(like, "abstract_state") and hasattr(like, "state_shardings"):  # a Trainer
        return abstract_like(like.abstract_state, like.state_shardings)
    if hasattr(like, "sparsity") and hasattr(like, "model"):  # a config
        from sparsejax.train.loop import make_trainer

        return _restore_target(make_trainer(like))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def leaf(x):
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
            raise TypeError(f"load_checkpoint: {type(x).__name__} is not an array or "
                            "ShapeDtypeStruct; pass a Trainer, a config or an abstract state")
        sharding = getattr(x, "sharding", None) or device
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, like)


def load_checkpoint(workdir, step: int, like) -> Checkpoint:
    """Restores the checkpoint of ``step`` from ``workdir/checkpoints``.

    ``like`` gives the structure, shapes and shardings: the run's ``Trainer``
    (``make_trainer(config)``), its config, or an abstract state (``ShapeDtypeStruct`` or
    array leaves; those without a sharding go to the first device). Reads only; an
    unknown step or missing workdir raises before anything is opened.

    Example::

        trainer = make_trainer(config)
        ckpt = load_checkpoint('runs/qs_rigl', 500, trainer)
        sparsejax.global_sparsity(ckpt.masks)   # 0.9
    """
    steps = checkpoint_steps(workdir)
    if int(step) not in steps:
        where = str(Path(workdir) / "checkpoints")
        raise ValueError(f"no checkpoint for step {step} in {where!r}; saved steps: {steps}")
    from sparsejax.train.checkpoint import Checkpointer

    target = _restore_target(like)
    ckpt = Checkpointer(Path(workdir) / "checkpoints", max_to_keep=None)
    try:
        state, position = ckpt.restore(target, step=int(step))
    finally:
        ckpt.close()
    return Checkpoint(int(step), state, getattr(state, "params", None),
                      find_masks(getattr(state, "opt_state", state)), position)


def read_runs(workdirs: Sequence, keys: Sequence[str] = DEFAULT_RUN_KEYS) -> Table:
    """One row per run: ``workdir``, the config ``keys`` (dotted; ``None`` if absent),
    ``finished`` (a summary exists) and every summary metric.

    Example::

        runs = read_runs(sorted(Path('runs').glob('qs_*')))
        runs.where(**{'sparsity.name': 'rigl'})['eval_accuracy']
    """
    if isinstance(workdirs, (str, Path)):
        raise TypeError("read_runs takes a list of workdirs; for one run use [workdir]")
    rows = []
    for w in workdirs:
        config = read_config(w)
        try:
            summary = read_summary(w)
        except FileNotFoundError:
            summary = None
        row = {"workdir": str(w), **{k: config_value(config, k) for k in keys},
               "finished": summary is not None}
        row.update({k: v for k, v in (summary or {}).items() if k != "workdir"})
        rows.append(row)
    return Table(rows)
