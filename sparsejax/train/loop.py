"""``train_and_evaluate(config, workdir)``: the sharded, checkpointed training loop.

Config → data + model + transform → one ``jax.jit`` train step (in/out shardings,
donation) → metrics and checkpoints. The model is NNX; the hot step is
``nnx.merge`` inside ``jax.jit`` of pure-dict parameters, and the sparsity transform's
``forward`` gives the parameters the model computes with.

Example:

    >>> import tempfile
    >>> from pathlib import Path
    >>> from configs import quickstart
    >>> from sparsejax.train import train_and_evaluate
    >>> workdir = tempfile.mkdtemp()
    >>> summary = train_and_evaluate(quickstart.get_config('tiny'), workdir, progress=False)
    >>> summary['steps'], summary['resumed_from'], summary['eval_accuracy'] > 0.3   # chance: 0.1
    (20, 0, True)
    >>> sorted(p.name for p in Path(workdir).iterdir())
    ['checkpoints', 'config.json', 'metrics.jsonl', 'summary.json', 'tensorboard']
    >>> import shutil; shutil.rmtree(workdir)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax.base import SparseTransformation, forward, sparsity_states
from sparsejax.train.build import build
from sparsejax.train.checkpoint import Checkpointer, abstract_like
from sparsejax.train.data import BatchIterator, Dataset, eval_batches, get_dataset
from sparsejax.train.metrics import MetricsWriter
from sparsejax.train.sharding import (batch_sharding, make_mesh, param_shardings,
                                      shardings_like_params)
from sparsejax.train.state import TrainState


def weighted_cross_entropy(logits: jax.Array, batch: dict) -> tuple[jax.Array, dict]:
    """Mean next-label cross entropy over weighted positions, plus summed statistics.

    Works for ``[B, C]`` classification and ``[B, T, V]`` language-model logits.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.train.loop import weighted_cross_entropy
        >>> logits = jnp.array([[0., 0.], [9., 0.], [0., 9.]])    # [B, C]
        >>> y, w = jnp.array([0, 0, 0]), jnp.array([1., 1., 0.])   # the last one is padding
        >>> loss, stats = weighted_cross_entropy(logits, {'targets': y, 'weights': w})
        >>> round(float(loss), 4), {k: round(float(v), 4) for k, v in stats.items()}
        (0.3466, {'loss_sum': 0.6933, 'correct': 2.0, 'weight': 2.0})
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    w = batch["weights"].astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)
    total = jnp.sum(w)
    stats = {"loss_sum": jnp.sum(nll * w), "correct": jnp.sum(correct * w), "weight": total}
    return stats["loss_sum"] / jnp.maximum(total, 1.0), stats


class Trainer(NamedTuple):
    """The compiled pieces of a run, built by ``make_trainer`` before any file is touched.

    ``init(rng) -> TrainState`` and ``step(state, batch) -> (state, stats)`` are jitted
    with explicit shardings; ``evaluate(state) -> stats`` runs the eval split.

    Example:

        >>> import jax
        >>> from configs import quickstart
        >>> from sparsejax.train.data import BatchIterator
        >>> from sparsejax.train.loop import make_trainer
        >>> config = quickstart.get_config('tiny')
        >>> t = make_trainer(config)
        >>> iterator = BatchIterator(t.dataset.train, config.batch_size, config.seed)
        >>> with jax.set_mesh(t.mesh):
        ...     state = t.init(jax.random.PRNGKey(0))
        ...     state, stats = t.step(state, t.device_batch(next(iterator)))
        >>> int(state.step), sorted(stats), float(stats['weight'])
        (1, ['correct', 'grad_norm', 'loss_sum', 'weight'], 32.0)
    """

    mesh: jax.sharding.Mesh
    dataset: Dataset
    tx: SparseTransformation
    graphdef: Any
    init: Callable
    step: Callable
    eval_step: Callable
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    global_batch: int

    def device_batch(self, local: dict) -> dict:
        """Assembles this process's numpy batch into global arrays on the mesh."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in local.items()}

    def evaluate(self, state: TrainState) -> dict:
        """Eval loss and accuracy over the whole eval split (each example once)."""
        totals = None
        for b in eval_batches(self.dataset.eval, self.global_batch, jax.process_index(),
                              jax.process_count()):
            s = self.eval_step(state, self.device_batch(b))
            totals = s if totals is None else jax.tree.map(jnp.add, totals, s)
        totals = jax.device_get(totals)
        w = max(float(totals["weight"]), 1.0)
        return {"loss": float(totals["loss_sum"]) / w, "accuracy": float(totals["correct"]) / w}


def _check_config(config) -> None:
    for key in ("num_steps", "batch_size"):
        if int(config[key]) <= 0:
            raise ValueError(f"config.{key} must be positive, got {config[key]}")
    for key in ("log_every", "eval_every", "checkpoint_every"):
        if int(config[key]) < 0:
            raise ValueError(f"config.{key} must be >= 0, got {config[key]}")


def make_trainer(config, tx=None) -> Trainer:
    """Builds mesh, data, model, transform and the jitted init/step/eval functions.

    Everything that can fail on a bad config fails here, before a workdir is touched.
    ``tx`` overrides the configured transform: a ``SparseTransformation`` or any plain
    optax transformation (wrapped in ``sparsejax.dense``).

    Example:

        >>> import jax
        >>> from configs import quickstart
        >>> from sparsejax.train.loop import make_trainer
        >>> trainer = make_trainer(quickstart.get_config('tiny'))
        >>> trainer.dataset.info, trainer.global_batch
        (DataInfo(task='classification', input_shape=(8, 8, 1), num_classes=10), 32)
        >>> jax.tree.map(lambda x: x.shape, trainer.abstract_state.params['layers'])  # abstract
        {0: {'bias': (256,), 'kernel': (64, 256)}, 1: {'bias': (256,), 'kernel': (256, 256)}}
    """
    _check_config(config)
    n_dev = config.mesh.get("num_devices", 0)
    mesh = make_mesh(config.mesh.shape, config.mesh.axes,
                     jax.devices()[:n_dev] if n_dev else None)
    dataset = get_dataset(config.data)
    data_axes = tuple(a for a in config.mesh.get("data_axes", ("data",)) if a in mesh.shape)
    b_sharding = batch_sharding(mesh, data_axes)
    n_shards = int(np.prod([mesh.shape[a] for a in data_axes]))
    if config.batch_size % max(n_shards, jax.process_count()):
        raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                         f"{n_shards} data shards of mesh {dict(mesh.shape)}")

    built = build(config, dataset.info, tx)  # every model rewrite happens here, once
    make_model, tx = built.make_model, built.tx

    abstract_model = nnx.eval_shape(lambda: make_model(jax.random.PRNGKey(0)))
    graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
    abstract_model.eval()
    eval_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)

    def init(rng) -> TrainState:
        model = make_model(jax.random.fold_in(rng, 0))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        return TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params), rng)

    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
    replicated = NamedSharding(mesh, P())
    p_sh = param_shardings(abstract_state.params, config.get("sharding_rules", ()), mesh)
    state_sh = TrainState(
        step=replicated, params=p_sh,
        rest=jax.tree.map(lambda _: replicated, abstract_state.rest),
        opt_state=shardings_like_params(abstract_state.opt_state, abstract_state.params,
                                        p_sh, mesh),
        rng=replicated)

    def train_step(state: TrainState, batch: dict):
        def loss_fn(params):
            model = nnx.merge(graphdef, forward(params, state.opt_state), state.rest)
            loss, stats = weighted_cross_entropy(model(batch["inputs"]), batch)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, (stats, nnx.to_pure_dict(rest))

        (_, (stats, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        stats["grad_norm"] = optax.tree.norm(grads)
        stats.update(sparsity_stats(opt_state))
        return TrainState(state.step + 1, params, rest, opt_state, state.rng), stats

    def eval_step(state: TrainState, batch: dict):
        model = nnx.merge(eval_graphdef, forward(state.params, state.opt_state), state.rest)
        return weighted_cross_entropy(model(batch["inputs"]), batch)[1]

    return Trainer(
        mesh=mesh, dataset=dataset, tx=tx, graphdef=graphdef,
        init=jax.jit(init, out_shardings=state_sh),
        step=jax.jit(train_step, in_shardings=(state_sh, b_sharding),
                     out_shardings=(state_sh, replicated), donate_argnums=0),
        eval_step=jax.jit(eval_step, in_shardings=(state_sh, b_sharding),
                          out_shardings=replicated),
        abstract_state=abstract_state, state_shardings=state_sh, batch_sharding=b_sharding,
        global_batch=config.batch_size)


def sparsity_stats(opt_state) -> dict:
    """Per-step scalars of every sparsity state in ``opt_state``: ``sparsity`` (fraction of
    zeros over all masked leaves together) and each state's ``diagnostics`` (N:M flip rate
    and pruned-gradient statistics).

    Example:

        >>> import jax.numpy as jnp
        >>> import optax, sparsejax
        >>> from sparsejax.train.loop import sparsity_stats
        >>> params = {'dense': {'kernel': jnp.ones((16, 8)), 'bias': jnp.zeros(8)}}
        >>> tx = sparsejax.rigl(optax.adam(1e-3), 0.9, end_step=100)
        >>> {k: round(float(v), 4) for k, v in sparsity_stats(tx.init(params)).items()}
        {'sparsity': 0.8984}
        >>> tx = sparsejax.nm_ste(optax.adam(1e-3), [(r'.*kernel', '2:4')])
        >>> {k: round(float(v), 4) for k, v in sparsity_stats(tx.init(params)).items()}
        {'flip_rate': 0.0, 'pruned_grad_norm': 0.0, 'pruned_grad_var': 0.0, 'sparsity': 0.5}
    """
    stats, masks = {}, []
    for _, s in sparsity_states(opt_state):
        stats.update(getattr(s, "diagnostics", {}))
        masks += [m for m in jax.tree.leaves(s.masks) if hasattr(m, "dtype")]
    if masks:
        kept = sum(jnp.sum(m, dtype=jnp.float32) for m in masks)
        stats["sparsity"] = 1.0 - kept / sum(m.size for m in masks)
    return stats


def _every(step: int, interval: int, last: int) -> bool:
    return step == last or (interval > 0 and step % interval == 0)


Hook = Callable[[int, TrainState], None]


def train_and_evaluate(config, workdir: str | Path, *, hooks: Sequence[Hook] = (),
                       tx=None, progress: bool = True) -> dict:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if any.

    Writes ``metrics.jsonl``, TensorBoard events, orbax checkpoints (state + data
    position) and ``summary.json``; returns the summary. ``hooks`` are called as
    ``hook(step, state)`` after every step (analysis, early stopping). A bad config
    raises before the workdir is touched, so existing checkpoints are never harmed.

    Example:

        >>> import os, tempfile
        >>> from configs import quickstart
        >>> from sparsejax.train.loop import train_and_evaluate
        >>> config = quickstart.get_config('tiny')
        >>> config.num_steps = 0
        >>> workdir = os.path.join(tempfile.mkdtemp(), 'run')
        >>> train_and_evaluate(config, workdir)
        Traceback (most recent call last):
        ...
        ValueError: config.num_steps must be positive, got 0
        >>> os.path.exists(workdir)          # a bad config never touches the workdir
        False
        >>> os.rmdir(os.path.dirname(workdir))
    """
    trainer = make_trainer(config, tx)
    workdir = Path(workdir)
    main = jax.process_index() == 0
    t_start = time.time()
    ckpt = Checkpointer(workdir / "checkpoints", config.get("max_checkpoints", 3))
    with jax.set_mesh(trainer.mesh):
        start = ckpt.latest_step()
        if start is None:
            state, position, start = trainer.init(jax.random.PRNGKey(config.seed)), 0, 0
        else:  # restore before writing anything, so a failed restore changes nothing
            state, position = ckpt.restore(abstract_like(trainer.abstract_state,
                                                         trainer.state_shardings))
        if main:
            (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
        writer = MetricsWriter(workdir)
        it = BatchIterator(trainer.dataset.train, config.batch_size, config.seed, position,
                           jax.process_index(), jax.process_count())
        num_steps = config.num_steps
        window, last_train, last_eval = [], {}, {}
        from tqdm.auto import tqdm

        bar = tqdm(total=num_steps, initial=start, disable=not (progress and main),
                   desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)
        t_window = time.time()
        for step in range(start + 1, num_steps + 1):
            state, stats = trainer.step(state, trainer.device_batch(next(it)))
            window.append(stats)
            for hook in hooks:
                hook(step, state)
            bar.update(1)
            if _every(step, config.log_every, num_steps):
                s = jax.device_get(jax.tree.map(lambda *x: jnp.sum(jnp.stack(x)), *window))
                w = max(float(s["weight"]), 1.0)
                dt = time.time() - t_window
                last_train = {"loss": float(s["loss_sum"]) / w,
                              "accuracy": float(s["correct"]) / w,
                              **{k: float(v) / len(window) for k, v in s.items()
                                 if k not in ("loss_sum", "correct", "weight")},
                              "steps_per_sec": len(window) / dt,
                              "examples_per_sec": len(window) * config.batch_size / dt}
                writer.write(step, "train", last_train)
                bar.set_postfix(loss=f"{last_train['loss']:.4f}")
                window, t_window = [], time.time()
            if _every(step, config.eval_every, num_steps):
                last_eval = trainer.evaluate(state)
                writer.write(step, "eval", last_eval)
            if _every(step, config.checkpoint_every, num_steps):
                ckpt.save(step, state, it.position)
        bar.close()
    ckpt.close()
    writer.close()
    summary = {"steps": int(num_steps), "resumed_from": int(start),
               "wall_time_s": time.time() - t_start,
               **{f"train_{k}": v for k, v in last_train.items()},
               **{f"eval_{k}": v for k, v in last_eval.items()},
               "workdir": str(workdir)}
    if main:
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
