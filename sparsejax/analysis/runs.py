"""Reading training runs back: metrics, summary, config and checkpoints of a workdir.

A workdir written by ``sparsejax.train.train_and_evaluate`` holds ``metrics.jsonl``
(one JSON object per logged (step, split)), ``summary.json``, ``config.json``,
``tensorboard/`` and orbax checkpoints under ``checkpoints/<step>/``. Nothing here
writes to a workdir.

Example (a workdir written by hand here: metrics, config and one checkpoint):

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> import jax, jax.numpy as jnp
    >>> import optax, sparsejax
    >>> from sparsejax.analysis import load_checkpoint, read_metrics, read_runs
    >>> from sparsejax.train.checkpoint import Checkpointer
    >>> from sparsejax.train.state import TrainState
    >>> workdir = Path(tempfile.mkdtemp()) / 'qs_rigl'
    >>> workdir.mkdir()
    >>> _ = (workdir / 'metrics.jsonl').write_text(
    ...     '{"step": 250, "split": "eval", "accuracy": 0.81}\\n'
    ...     '{"step": 500, "split": "eval", "accuracy": 0.86}\\n')
    >>> _ = (workdir / 'config.json').write_text(json.dumps({'method': {'name': 'rigl'}}))
    >>> params = {'w': {'kernel': jnp.ones((4, 4)), 'bias': jnp.zeros(4)}}
    >>> opt_state = sparsejax.static_sparse(optax.sgd(0.1), 0.75).init(params)
    >>> state = TrainState(jnp.int32(500), params, {}, opt_state, jax.random.PRNGKey(0))
    >>> ckpt = Checkpointer(workdir / 'checkpoints')
    >>> ckpt.save(500, state, data_position=500); ckpt.close()
    >>> m = read_metrics(workdir)                  # rows (step, split, metric, value)
    >>> m.where(split='eval', metric='accuracy')['value']
    [0.81, 0.86]
    >>> ckpt = load_checkpoint(workdir, 500, state)
    >>> sparsejax.global_sparsity(ckpt.masks)
    0.75
    >>> read_runs([workdir], keys=['method.name'])   # one row per run; unfinished
    workdir  method.name  finished
    /.../qs_rigl  rigl  False
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import jax

from sparsejax.analysis.dynamics import find_masks
from sparsejax.analysis.table import Table
from sparsejax.train.checkpoint import Checkpointer, abstract_like
from sparsejax.train.loop import make_trainer

DEFAULT_RUN_KEYS = ("model_name", "method.name", "method.sparsity", "method.distribution",
                    "method.pattern", "ift.family", "ift.sparsity", "seed", "num_steps")
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

    Example:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from sparsejax.analysis import read_metrics
        >>> workdir = Path(tempfile.mkdtemp())
        >>> _ = (workdir / 'metrics.jsonl').write_text(
        ...     '{"step": 1, "split": "train", "loss": 2.3, "accuracy": 0.1}\\n'
        ...     '{"step": 2, "split": "train", "loss": 1.9, "accuracy": 0.3}\\n')
        >>> m = read_metrics(workdir)
        >>> m[:2]
        step  split  metric    value
        1     train  loss      2.3
        1     train  accuracy  0.1
        >>> m.where(split='train', metric='loss')['value']
        [2.3, 1.9]
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

    Example:

        >>> import json, tempfile
        >>> from pathlib import Path
        >>> from sparsejax.analysis import read_summary
        >>> workdir = Path(tempfile.mkdtemp())
        >>> _ = (workdir / 'summary.json').write_text(json.dumps({'eval_accuracy': 0.93}))
        >>> read_summary(workdir)['eval_accuracy']
        0.93
        >>> read_summary(tempfile.mkdtemp())
        Traceback (most recent call last):
        ...
        FileNotFoundError: no summary.json in run directory '...'
    """
    return json.loads(_file(workdir, "summary.json").read_text())


def read_config(workdir) -> dict:
    """``config.json``: the run's config as nested dicts (tuples became lists).

    Example:

        >>> import json, tempfile
        >>> from pathlib import Path
        >>> from sparsejax.analysis import read_config
        >>> workdir = Path(tempfile.mkdtemp())
        >>> config = {'method': {'name': 'rigl'}, 'model': {'hidden': (64, 64)}}
        >>> _ = (workdir / 'config.json').write_text(json.dumps(config))
        >>> read_config(workdir)['method']['name'], read_config(workdir)['model']['hidden']
        ('rigl', [64, 64])
    """
    return json.loads(_file(workdir, "config.json").read_text())


def config_value(config: dict, key: str, default=None):
    """``config['a']['b']`` for ``key='a.b'``, or ``default`` when a part is missing.

    Example:

        >>> from sparsejax.analysis import config_value
        >>> config = {'method': {'name': 'rigl', 'sparsity': 0.9}}   # as read_config gives it
        >>> config_value(config, 'method.sparsity'), config_value(config, 'ift.family', 'none')
        (0.9, 'none')
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

    Example:

        >>> import tempfile
        >>> from pathlib import Path
        >>> from sparsejax.analysis import checkpoint_steps
        >>> workdir = Path(tempfile.mkdtemp())
        >>> for name in ['1250', '1000', '1500.orbax-checkpoint-tmp-17']:   # the last unfinished
        ...     (workdir / 'checkpoints' / name).mkdir(parents=True)
        >>> checkpoint_steps(workdir)
        [1000, 1250]
    """
    directory = _workdir(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit())


class Checkpoint(NamedTuple):
    """A restored checkpoint: the whole ``TrainState``, its params, the sparsity masks
    found in the optimizer state (``None`` for a dense run) and the data position.

    Example (a dense run's checkpoint, saved here by hand):

        >>> import tempfile
        >>> import jax, jax.numpy as jnp
        >>> import optax
        >>> from sparsejax.analysis import load_checkpoint
        >>> from sparsejax.train.checkpoint import Checkpointer
        >>> from sparsejax.train.state import TrainState
        >>> params = {'layers': [{'kernel': jnp.ones((2, 3))}]}
        >>> state = TrainState(jnp.int32(7), params, {}, optax.sgd(0.1).init(params),
        ...                    jax.random.PRNGKey(0))
        >>> workdir = tempfile.mkdtemp()
        >>> saver = Checkpointer(f'{workdir}/checkpoints')
        >>> saver.save(7, state, data_position=7); saver.close()
        >>> ckpt = load_checkpoint(workdir, 7, state)
        >>> ckpt.step, ckpt.params['layers'][0]['kernel'].shape, ckpt.masks, ckpt.data_position
        (7, (2, 3), None, 7)
    """

    step: int
    state: Any
    params: Any
    masks: Any
    data_position: int


def _restore_target(like):
    """``ShapeDtypeStruct`` leaves with shardings, from a Trainer, a config or a tree."""
    if hasattr(like, "abstract_state") and hasattr(like, "state_shardings"):  # a Trainer
        return abstract_like(like.abstract_state, like.state_shardings)
    if hasattr(like, "method") and hasattr(like, "model"):  # a config
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

    Example (``like`` here is the saved state itself; a run passes its ``Trainer``):

        >>> import tempfile
        >>> import jax, jax.numpy as jnp
        >>> import optax, sparsejax
        >>> from sparsejax.analysis import load_checkpoint
        >>> from sparsejax.train.checkpoint import Checkpointer
        >>> from sparsejax.train.state import TrainState
        >>> params = {'w': {'kernel': jnp.ones((4, 4)), 'bias': jnp.zeros(4)}}
        >>> opt_state = sparsejax.static_sparse(optax.sgd(0.1), 0.75).init(params)
        >>> state = TrainState(jnp.int32(500), params, {}, opt_state, jax.random.PRNGKey(0))
        >>> workdir = tempfile.mkdtemp()
        >>> saver = Checkpointer(f'{workdir}/checkpoints')
        >>> saver.save(500, state, data_position=500); saver.close()
        >>> ckpt = load_checkpoint(workdir, 500, state)
        >>> sparsejax.global_sparsity(ckpt.masks), sparsejax.mask_counts(ckpt.masks)
        (0.75, {'w/kernel': (4, 16)})
        >>> load_checkpoint(workdir, 400, state)
        Traceback (most recent call last):
        ...
        ValueError: no checkpoint for step 400 in '.../checkpoints'; saved steps: [500]
    """
    steps = checkpoint_steps(workdir)
    if int(step) not in steps:
        where = str(Path(workdir) / "checkpoints")
        raise ValueError(f"no checkpoint for step {step} in {where!r}; saved steps: {steps}")
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

    Example:

        >>> import json, tempfile
        >>> from pathlib import Path
        >>> from sparsejax.analysis import read_runs
        >>> root = Path(tempfile.mkdtemp())
        >>> for name, method, accuracy in [('qs_dense', 'dense', 0.9), ('qs_rigl', 'rigl', 0.88)]:
        ...     run = root / name
        ...     run.mkdir()
        ...     _ = (run / 'config.json').write_text(json.dumps({'method': {'name': method}}))
        ...     _ = (run / 'summary.json').write_text(json.dumps({'eval_accuracy': accuracy}))
        >>> runs = read_runs(sorted(root.glob('qs_*')))
        >>> runs.where(**{'method.name': 'rigl'})['eval_accuracy']
        [0.88]
        >>> runs['finished'], runs['seed']   # keys missing from a config read as None
        ([True, True], [None, None])
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
