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
    ['.lock', 'checkpoints', 'config.json', 'metrics.jsonl', 'run.json', 'summary.json',
     'tensorboard']
    >>> import shutil; shutil.rmtree(workdir)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from sparsejax.base import (SparseTransformation, check_int, count_unmasked, forward,
                            mask_params, sparsity_states)
from sparsejax.masks import count_true, selection_shardings
from sparsejax.train.build import build
from sparsejax.train.checkpoint import Checkpointer, abstract_like
from sparsejax.train.data import BatchIterator, Dataset, eval_batches, get_dataset
from sparsejax.train.metrics import MetricsWriter, read_jsonl
from sparsejax.train.sharding import (batch_sharding, make_mesh, param_shardings,
                                      shardings_like_params)
from sparsejax.train.state import TrainState
from sparsejax.train.workdir import (RunMismatch, WorkdirLock, check_same_run, fingerprint,
                                     flat_config)


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


def chunked_cross_entropy(hidden: jax.Array, head: Callable[[jax.Array], jax.Array],
                          batch: dict, chunk: int) -> tuple[jax.Array, dict]:
    """``weighted_cross_entropy(head(hidden), batch)`` without ever holding the full
    ``[B, T, V]`` logits: ``hidden`` ``[B, T, D]`` goes through ``head`` ``chunk``
    positions at a time (``lax.scan``), each chunk's logits in the head's dtype and upcast
    to float32 only for that chunk's log-softmax, under ``jax.checkpoint`` so the backward
    recomputes them. Same loss, statistics and gradients up to summation order. A
    sequence that ``chunk`` does not divide is padded with zero-weight positions.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.train.loop import chunked_cross_entropy, weighted_cross_entropy
        >>> h = jax.random.normal(jax.random.key(0), (2, 6, 4))
        >>> kernel = jax.random.normal(jax.random.key(1), (4, 10))
        >>> batch = {'targets': jnp.arange(12).reshape(2, 6) % 10, 'weights': jnp.ones((2, 6))}
        >>> loss, stats = chunked_cross_entropy(h, lambda x: x @ kernel, batch, chunk=4)
        >>> ref, ref_stats = weighted_cross_entropy(h @ kernel, batch)
        >>> bool(jnp.allclose(loss, ref)), float(stats['weight'])
        (True, 12.0)
    """
    check_int(chunk=chunk)
    b, t = hidden.shape[:2]
    chunk = min(chunk, t)
    n = -(-t // chunk)
    y, w = batch["targets"], batch["weights"].astype(jnp.float32)
    if n * chunk != t:  # zero-weight padding: the statistics are unchanged
        pad = n * chunk - t
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        y, w = jnp.pad(y, ((0, 0), (0, pad))), jnp.pad(w, ((0, 0), (0, pad)))

    def chunks(a):  # [B, n*c, ...] -> [n, B, c, ...]
        return jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def sums(h, y, w):
        logits = head(h)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
        correct = (jnp.argmax(logits, axis=-1) == y).astype(jnp.float32)
        return jnp.sum(nll * w), jnp.sum(correct * w)

    def body(carry, xs):
        loss_sum, correct = sums(*xs)
        return (carry[0] + loss_sum, carry[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), (chunks(hidden), chunks(y),
                                                               chunks(w)))
    total = jnp.sum(w)
    stats = {"loss_sum": loss_sum, "correct": correct, "weight": total}
    return loss_sum / jnp.maximum(total, 1.0), stats


def model_loss(model, batch: dict, loss_chunk: int = 0) -> tuple[jax.Array, dict]:
    """The loop's loss of ``model`` on ``batch``: ``weighted_cross_entropy`` of its output,
    or with ``loss_chunk > 0`` (``config.loss_chunk``; a model with ``hidden`` and
    ``head``, the decoder LM) ``chunked_cross_entropy`` of its hidden states.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.models import DecoderLM
        >>> from sparsejax.train.loop import model_loss
        >>> lm = DecoderLM(vocab_size=16, max_len=8, rngs=nnx.Rngs(0))
        >>> batch = {'inputs': jnp.zeros((2, 8), jnp.int32),
        ...          'targets': jnp.ones((2, 8), jnp.int32), 'weights': jnp.ones((2, 8))}
        >>> bool(jnp.allclose(model_loss(lm, batch, 3)[0], model_loss(lm, batch)[0]))
        True
    """
    if loss_chunk:
        return chunked_cross_entropy(model.hidden(batch["inputs"]), model.head, batch,
                                     loss_chunk)
    return weighted_cross_entropy(model(batch["inputs"]), batch)


class Trainer(NamedTuple):
    """The compiled pieces of a run, built by ``make_trainer`` before any file is touched.

    ``init(rng) -> TrainState`` and ``step(state, batch, mask_update=True) -> (state,
    stats)`` are jitted with explicit shardings; ``evaluate(state) -> stats`` runs the
    eval split. ``mask_update`` is static and positional (jit takes no keyword
    arguments with ``in_shardings``): where ``tx.mask_update_due`` gives the
    transform's schedule, the loop passes its value, False on the steps where no mask
    update is due and ``'due'`` on the others (two compiled steps: one without the
    update's code, one without a ``lax.cond`` around it; see ``MaskDispatch``).
    The gradients are constrained to the params' shardings, so the update and the
    optimizer work on reduce-scattered shards.
    ``init`` zeroes the params outside their static/SET/RigL/gradual masks and the steps
    compute with them as stored (``forward(..., params_masked=True)``: no masked copy
    per step); ``unmasked(state)`` counts entries that broke that, which the loop checks
    at every log, eval and checkpoint step (``MaskViolation``).

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
        (1, ['correct', 'finite', 'grad_norm', 'loss_sum', 'weight'], 32.0)
    """

    mesh: jax.sharding.Mesh
    dataset: Dataset
    tx: SparseTransformation
    graphdef: Any
    init: Callable
    step: Callable
    eval_step: Callable
    unmasked: Callable
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    global_batch: int

    def device_batch(self, local: dict) -> dict:
        """Assembles this process's numpy batch into global arrays on the mesh."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, v)
                for k, v in local.items()}

    def evaluate(self, state: TrainState) -> dict:
        """Eval loss and accuracy over the whole eval split (each example once). The
        per-batch sums are added on the host (float32, in order): the host path runs no
        eager multi-device computation."""
        outs = jax.device_get([
            self.eval_step(state, self.device_batch(b))
            for b in eval_batches(self.dataset.eval, self.global_batch, jax.process_index(),
                                  jax.process_count())])
        totals = {k: np.float32(0) for k in outs[0]}
        for out in outs:
            totals = {k: totals[k] + np.float32(out[k]) for k in totals}
        w = max(float(totals["weight"]), 1.0)
        return {"loss": float(totals["loss_sum"]) / w, "accuracy": float(totals["correct"]) / w}


#: What the loop does with a step whose loss, gradients or new parameters are not finite
#: (``config.on_nonfinite``). Either way the step's update is not applied, so no
#: non-finite state is ever checkpointed. 'stop': the run stops with ``NonFiniteError``
#: naming the step. 'skip': the step counts but changes nothing; more than
#: ``config.max_consecutive_skips`` in a row stop the run.
ON_NONFINITE = ("stop", "skip")


class NonFiniteError(FloatingPointError):
    """A step's loss, gradients or parameters were not finite; nothing after the last
    checkpoint was saved."""


class MaskViolation(RuntimeError):
    """Parameters were nonzero where a weight-sparsity mask is 0: something outside the
    sparsity transform changed them. The step computes with the params as stored
    (``forward(..., params_masked=True)``), so the run stops instead of training denser
    than configured; nothing after the last checkpoint was saved."""


class Preempted(Exception):
    """SIGTERM (or the multi-host preemption notice) arrived; a checkpoint at ``step`` is
    saved and rerunning the same command resumes from it."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _check_config(config) -> None:
    check_int(**{f"config.{k}": config.get(k, 1)
                 for k in ("num_steps", "batch_size", "max_checkpoints")})
    check_int(0, **{f"config.{k}": config.get(k, 0) for k in (
        "log_every", "eval_every", "checkpoint_every", "max_consecutive_skips",
        "loss_chunk")})
    if config.get("on_nonfinite", "stop") not in ON_NONFINITE:
        raise ValueError(f"config.on_nonfinite must be one of {ON_NONFINITE}, got "
                         f"{config.on_nonfinite!r}")


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
    if config.batch_size > len(dataset.train):
        raise ValueError(f"config.batch_size={config.batch_size} exceeds the "
                         f"{len(dataset.train)} examples of the training split of "
                         f"{config.data.name!r}")

    built = build(config, dataset.info, tx)  # every model rewrite happens here, once
    make_model, tx = built.make_model, built.tx

    abstract_model = nnx.eval_shape(lambda: make_model(jax.random.PRNGKey(0)))
    loss_chunk = config.get("loss_chunk", 0)  # > 0: the loss computes the logits in chunks
    if loss_chunk and not (hasattr(abstract_model, "hidden") and hasattr(abstract_model, "head")):
        raise ValueError(f"config.loss_chunk={loss_chunk} needs a model with hidden() and "
                         f"head (the 'lm' model), not {type(abstract_model).__name__}; "
                         "set config.loss_chunk=0")
    graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)
    abstract_model.eval()
    eval_graphdef, _, _ = nnx.split(abstract_model, nnx.Param, ...)

    def init(rng) -> TrainState:
        model = make_model(jax.random.fold_in(rng, 0))
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
        opt_state = tx.init(params)
        # zero outside the masks once; every update keeps them so (params_masked below)
        params = mask_params(params, opt_state)
        return TrainState(jnp.zeros((), jnp.int32), params, rest, opt_state, rng)

    abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
    replicated = NamedSharding(mesh, P())
    p_sh = param_shardings(abstract_state.params, config.get("sharding_rules", ()), mesh)
    state_sh = TrainState(
        step=replicated, params=p_sh,
        rest=jax.tree.map(lambda _: replicated, abstract_state.rest),
        opt_state=shardings_like_params(abstract_state.opt_state, abstract_state.params,
                                        p_sh, mesh),
        rng=replicated)

    # a transform with a host schedule gets two compiled steps (mask_update static)
    flag = (lambda mask_update: {"mask_update": mask_update}) if tx.mask_update_due else (
        lambda mask_update: {})

    def train_step(state: TrainState, batch: dict, mask_update: bool | str = True):
        def loss_fn(params):
            model = nnx.merge(graphdef, forward(params, state.opt_state, params_masked=True),
                              state.rest)
            loss, stats = model_loss(model, batch, loss_chunk)
            _, _, rest = nnx.split(model, nnx.Param, ...)
            return loss, (stats, nnx.to_pure_dict(rest))

        (_, (stats, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        # sharded like the params: else, without a cond around RigL's update, the
        # partitioner keeps full gathered head/embedding gradients (+500 MiB at 1B, FSDP)
        grads = jax.lax.with_sharding_constraint(grads, p_sh)
        with selection_shardings(p_sh):  # selections count per device (shard_map)
            updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                           **flag(mask_update))
        params = optax.apply_updates(state.params, updates)
        stats["grad_norm"] = optax.tree.norm(grads)
        stats.update(sparsity_stats(opt_state))
        new = TrainState(state.step + 1, params, rest, opt_state, state.rng)
        # a non-finite step changes nothing but the step count (ON_NONFINITE)
        finite = (jnp.isfinite(stats["loss_sum"]) & jnp.isfinite(stats["grad_norm"])
                  & all_finite((params, rest)))
        stats["finite"] = finite
        kept = state._replace(step=new.step)
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, kept), stats

    def unmasked(state: TrainState):
        return count_unmasked(state.params, state.opt_state)

    def eval_step(state: TrainState, batch: dict):
        model = nnx.merge(eval_graphdef,
                          forward(state.params, state.opt_state, params_masked=True), state.rest)
        return model_loss(model, batch, loss_chunk)[1]

    return Trainer(
        mesh=mesh, dataset=dataset, tx=tx, graphdef=graphdef,
        init=jax.jit(init, out_shardings=state_sh),
        step=jax.jit(train_step, in_shardings=(state_sh, b_sharding),
                     out_shardings=(state_sh, replicated), donate_argnums=0,
                     static_argnums=2),
        eval_step=jax.jit(eval_step, in_shardings=(state_sh, b_sharding),
                          out_shardings=replicated),
        unmasked=jax.jit(unmasked, in_shardings=(state_sh,), out_shardings=replicated),
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
        kept = sum(count_true(m, jnp.float32) for m in masks)  # any size, no int32 total
        stats["sparsity"] = 1.0 - kept / float(sum(m.size for m in masks))
    return stats


def all_finite(tree) -> jax.Array:
    """True if every floating-point entry of ``tree`` is finite (one boolean scalar).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.train.loop import all_finite
        >>> bool(all_finite({'w': jnp.ones(3), 'n': jnp.int32(2)}))
        True
        >>> bool(all_finite({'w': jnp.array([1., jnp.inf]), 'b': jnp.zeros(2)}))
        False
        >>> bool(all_finite({'w': jnp.array([3e38, 3e38])}))   # large but finite: no overflow
        True
    """
    # x·0 is 0 where x is finite and NaN where it is not, and a sum of it cannot overflow:
    # exact, and a multiply before a reduction is far cheaper on XLA:CPU than a compare
    zeros = [jnp.sum(x * 0) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.isfinite(sum(zeros)) if zeros else jnp.bool_(True)


class MaskDispatch:
    """Which compiled step the loop runs: ``mask_update`` for the next step, from the
    transform's host schedule (``SparseTransformation.mask_update_due``).

    The schedule counts updates applied (the sparsity state's ``count``), which falls
    behind the loop's step by one for every skipped non-finite step. The host learns
    of skips only when it reads the per-step statistics, so while a due update lies
    within the steps not yet read, ``needs_sync`` asks the loop to read them first:
    the flag is then exact, and the False branch's guard never fires in this loop.

    Example:

        >>> import optax, sparsejax
        >>> from sparsejax.train.loop import MaskDispatch
        >>> tx = sparsejax.rigl(optax.sgd(0.1), 0.9, end_step=1000, update_every=100)
        >>> d = MaskDispatch(tx.mask_update_due, skipped=0)
        >>> [s for s in range(1, 302) if d.mask_update(s)]   # step s applies update s − 1
        [1, 101, 201, 301]
        >>> d.needs_sync(101, unread=3), d.needs_sync(150, unread=3)
        (True, False)
        >>> d.skipped += 1                                     # one step was skipped
        >>> d.mask_update(101), d.mask_update(102)
        (False, 'due')
    """

    def __init__(self, due: Callable[[int], bool | str] | None, skipped: int = 0):
        self.due, self.skipped = due, skipped

    def count(self, step: int) -> int:
        """The sparsity count the update of loop step ``step`` finds (no unread skips)."""
        return step - 1 - self.skipped

    def needs_sync(self, step: int, unread: int) -> bool:
        """Whether an update is due at any count step ``step`` may find, given ``unread``
        steps whose skips the host has not read yet."""
        c = self.count(step)
        return self.due is not None and unread > 0 and any(
            self.due(c - u) for u in range(unread + 1) if c - u >= 0)

    def mask_update(self, step: int) -> bool | str:
        """The static ``mask_update`` of ``Trainer.step`` for loop step ``step``."""
        return True if self.due is None else self.due(self.count(step))


def _every(step: int, interval: int, last: int) -> bool:
    return step == last or (interval > 0 and step % interval == 0)


Hook = Callable[[int, TrainState], None]


class _Window:
    """Host-side sums of the per-step statistics since the last train row. Saved with
    each checkpoint, so the first row after a resume averages the same steps as an
    uninterrupted run."""

    def __init__(self, record: dict | None = None):
        record = record or {}
        self.sums = dict(record.get("sums", {}))
        self.steps = int(record.get("steps", 0))
        self.skipped = int(record.get("skipped", 0))
        self.t0, self.timed = time.time(), 0

    def add(self, stats: dict) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.steps += 1

    def row(self, batch_size: int) -> dict:
        s, n = self.sums, max(self.steps, 1)
        w = max(s.get("weight", 0.0), 1.0)
        dt = max(time.time() - self.t0, 1e-9)
        averages = {"loss": s["loss_sum"] / w, "accuracy": s["correct"] / w,
                    **{k: v / n for k, v in s.items()
                       if k not in ("loss_sum", "correct", "weight")}} if self.steps else {}
        return {**averages, "skipped_steps": self.skipped, "steps_per_sec": self.timed / dt,
                "examples_per_sec": self.timed * batch_size / dt}

    def record(self) -> dict:
        return {"sums": self.sums, "steps": self.steps, "skipped": self.skipped}


class _Preemption:
    """SIGTERM sets a flag (one process); with several processes JAX's preemption sync
    point, through orbax, picks the step all of them save at."""

    def __init__(self, manager):
        self.manager, self.flag, self._old = manager, False, None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum, frame) -> None:
        self.flag = True

    def reached(self, step: int) -> bool:
        return self.flag if jax.process_count() == 1 else self.manager.reached_preemption(step)

    def close(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None


def finished_summary(workdir: str | Path, config) -> dict | None:
    """The summary of the run in ``workdir`` if it already finished ``config.num_steps``
    with this config's identity, else None. Reads only.

    Example:

        >>> import tempfile
        >>> from configs import quickstart
        >>> from sparsejax.train.loop import finished_summary
        >>> finished_summary(tempfile.mkdtemp(), quickstart.get_config('tiny')) is None
        True
    """
    path = Path(workdir) / "summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    same = summary.get("fingerprint") == fingerprint(flat_config(config))
    return summary if same and summary.get("steps") == config.num_steps else None


def train_and_evaluate(config, workdir: str | Path, *, hooks: Sequence[Hook] = (),
                       tx=None, progress: bool = True) -> dict:
    """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if any.

    Writes ``config.json``, ``run.json`` (fingerprint and starts), ``metrics.jsonl``,
    TensorBoard events, orbax checkpoints (state, data position, partial metric sums) and
    ``summary.json``; returns the summary. ``hooks`` are called as ``hook(step, state)``
    after every step (analysis, early stopping).

    Nothing is written before every check has passed: the config and the data
    (``make_trainer``), the workdir's recorded config (``RunMismatch`` lists the changed
    keys; only ``SAFE_TO_CHANGE`` keys may change), its lock (``WorkdirLocked`` names the
    holder) and the checkpoint. A finished run is not trained again: its summary is
    returned as recorded. A resumed run drops the metric rows after its checkpoint. A
    non-finite step is never applied (``ON_NONFINITE``); SIGTERM saves a checkpoint and
    raises ``Preempted``.

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
        ValueError: config.num_steps must be a positive integer, got 0
        >>> os.path.exists(workdir)          # a bad config never touches the workdir
        False
        >>> os.rmdir(os.path.dirname(workdir))
    """
    trainer = make_trainer(config, tx)  # checks the config and the data
    workdir = Path(workdir)
    flat = flat_config(config)
    fp = fingerprint(flat)
    recorded = check_same_run(workdir, flat)  # reads only
    done = finished_summary(workdir, config)
    main = jax.process_index() == 0
    if done is not None:
        if progress and main:
            print(f"{workdir}: the run already finished its {config.num_steps} steps; "
                  "nothing to do", file=sys.stderr)
        return done
    with WorkdirLock(workdir):  # the first write: creates the workdir and its lock file
        ckpt = Checkpointer(workdir / "checkpoints", config.max_checkpoints)
        try:
            return _train(trainer, config, workdir, ckpt, fp, recorded, hooks, progress)
        finally:
            ckpt.close()


def _train(trainer, config, workdir, ckpt, fp, recorded, hooks, progress) -> dict:
    main = jax.process_index() == 0
    num_steps, t_start = config.num_steps, time.time()
    policy = config.get("on_nonfinite", "stop")
    max_skips = config.get("max_consecutive_skips", 10)
    with jax.set_mesh(trainer.mesh):
        start = ckpt.latest_step()
        if start is None:
            state, position, start, record = (trainer.init(jax.random.PRNGKey(config.seed)),
                                              0, 0, {})
        else:  # check and restore before writing anything
            if start > num_steps:
                raise ValueError(f"config.num_steps={num_steps} is below the last checkpoint "
                                 f"of the run in {workdir} (step {start}). Nothing was "
                                 f"written; set num_steps >= {start}")
            record = ckpt.record(start)
            if record.get("fingerprint", fp) != fp:
                raise RunMismatch(f"checkpoint {ckpt.directory / str(start)} belongs to a "
                                  f"run with fingerprint {record['fingerprint']}, not this "
                                  f"config's {fp}. Nothing was written")
            state, position = ckpt.restore(abstract_like(trainer.abstract_state,
                                                         trainer.state_shardings), start)
        if main:
            _write_record(workdir, config, fp, recorded, start)
        writer = MetricsWriter(workdir, resume_step=start)
        it = BatchIterator(trainer.dataset.train, config.batch_size, config.seed, position,
                           jax.process_index(), jax.process_count())
        window, pending = _Window(record.get("window")), []
        dispatch = MaskDispatch(trainer.tx.mask_update_due)
        if dispatch.due is not None:  # steps skipped before this start
            dispatch.skipped = start - int(jax.device_get(state.opt_state.count))
        last_train, last_eval, consecutive = {}, {}, 0
        preemption = _Preemption(ckpt.manager)

        def check_masked(step):
            """The params are exactly 0 outside their masks (what the steps assume)."""
            n = int(jax.device_get(trainer.unmasked(state)))
            if n:
                raise MaskViolation(
                    f"step {step}: {n} parameter entries are nonzero where their sparsity "
                    "masks are 0, so the model has computed with weights it should not "
                    "have; something outside the sparsity transform changed the params. "
                    "Nothing after the last checkpoint was saved")

        check_masked(start)

        def drain():
            """Host sync: per-step statistics into the window, non-finite steps handled."""
            nonlocal consecutive
            for step, s in zip([p[0] for p in pending], jax.device_get([p[1] for p in pending])):
                if bool(s.pop("finite")):
                    window.add(s)
                    consecutive = 0
                    continue
                what = (f"step {step}: the loss, gradients or parameters are not finite "
                        f"(loss_sum={float(s['loss_sum'])}, grad_norm={float(s['grad_norm'])})")
                last = ckpt.latest_step()
                keep = (f"the last checkpoint (step {last}) is finite and kept"
                        if last is not None else "no checkpoint was written")
                if policy == "stop":
                    raise NonFiniteError(f"{what}; the run stopped and {keep}. Lower the "
                                         "learning rate, or set config.on_nonfinite='skip'")
                window.skipped += 1
                dispatch.skipped += 1
                consecutive += 1
                if consecutive > max_skips:
                    raise NonFiniteError(f"{what}; {consecutive} non-finite steps in a row "
                                         f"(config.max_consecutive_skips={max_skips}): the "
                                         f"run stopped and {keep}")
            pending.clear()

        bar = tqdm(total=num_steps, initial=start, disable=not (progress and main),
                   desc="train", unit="step", dynamic_ncols=True, mininterval=0.5)
        try:
            for step in range(start + 1, num_steps + 1):
                if dispatch.needs_sync(step, len(pending)):
                    drain()
                state, stats = trainer.step(state, trainer.device_batch(next(it)),
                                            dispatch.mask_update(step))
                pending.append((step, stats))
                window.timed += 1
                for hook in hooks:
                    hook(step, state)
                bar.update(1)
                preempted = preemption.reached(step)
                logs = _every(step, config.log_every, num_steps)
                evals = _every(step, config.eval_every, num_steps)
                saves = _every(step, config.checkpoint_every, num_steps) or preempted
                if logs or evals or saves or len(pending) >= 64:
                    drain()
                if logs or evals or saves:
                    check_masked(step)
                if logs:
                    last_train = window.row(config.batch_size)
                    writer.write(step, "train", last_train)
                    bar.set_postfix(loss=f"{last_train.get('loss', float('nan')):.4f}")
                    window = _Window()
                if evals:
                    last_eval = trainer.evaluate(state)
                    writer.write(step, "eval", last_eval)
                if saves:
                    ckpt.save(step, state, it.position, fingerprint=fp, window=window.record())
                if preempted:
                    ckpt.wait()
                    raise Preempted(f"preempted (SIGTERM) at step {step}: checkpoint saved; "
                                    "rerun the same command to resume", step)
            if start == num_steps:  # finished, but killed before its summary was written
                last_eval = trainer.evaluate(state)
                last_train = next((r for r in reversed(read_jsonl(writer.path))
                                   if r["split"] == "train"), {}) if writer.path.exists() else {}
                last_train = {k: v for k, v in last_train.items() if k not in ("step", "split")}
        finally:
            bar.close()
            preemption.close()
            writer.close()
    summary = {"steps": int(num_steps), "resumed_from": int(start),
               "wall_time_s": time.time() - t_start,
               **{f"train_{k}": v for k, v in last_train.items()},
               **{f"eval_{k}": v for k, v in last_eval.items()},
               "fingerprint": fp, "workdir": str(workdir)}
    ckpt.wait()  # the summary marks a finished run: only once its checkpoint is committed
    if main:
        _write_json(workdir / "summary.json", summary)
    return summary


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _write_record(workdir: Path, config, fp: str, recorded: dict | None, start: int) -> None:
    """config.json (the config of the latest start) and run.json (fingerprint, starts)."""
    run_path = workdir / "run.json"
    run = json.loads(run_path.read_text()) if run_path.exists() else {"fingerprint": fp,
                                                                       "starts": []}
    new = flat_config(config)
    changed = {k: [recorded.get(k), v] for k, v in new.items()
               if recorded is not None and recorded.get(k) != v}
    run["starts"].append({"from_step": start, "num_steps": config.num_steps,
                          "time": time.strftime("%Y-%m-%d %H:%M:%S"), "changed": changed,
                          "command": " ".join(sys.argv)})
    _write_json(workdir / "config.json", json.loads(config.to_json_best_effort()))
    _write_json(run_path, run)
