"""Activation sparsity per layer and over training (Li et al. 2023, "The Lazy Neuron
Phenomenon").

The Lazy Neuron measurement is the fraction of nonzero entries of the FFN activation
``a = σ(x W_up)`` of each token, averaged over tokens:
``f = mean_tokens (1/d_ff) Σ_j [a_j ≠ 0]``, which is ``mean(a ≠ 0)`` over all entries
since every token has ``d_ff`` of them. The fractions come from
``sparsejax.surgery.activation_sparsity``; this module adds each layer's depth (the
order in which the forward pass first calls it) and width (``d_ff``, the output's last
dimension), and a hook that records them over training.

Example (``train_and_evaluate(config, workdir, hooks=[rec])`` calls the hook at every
step with the train state; here a loop does, with a ``state -> model`` function):

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from sparsejax.analysis import ActivationSparsityRecorder, activation_sparsity_by_layer
    >>> from sparsejax.models import MLP
    >>> model, batch = MLP(8, (16, 16), 4, rngs=nnx.Rngs(0)), jnp.ones((2, 8))
    >>> activation_sparsity_by_layer(model, lambda m: m(batch))   # (layer, depth, width, fraction)
    layer   depth  width  fraction_nonzero
    acts/0  0      16     0.625
    acts/1  1      16     0.5625
    >>> graphdef, params = nnx.split(model)
    >>> rec = ActivationSparsityRecorder(lambda p: nnx.merge(graphdef, p), lambda m: m(batch),
    ...                                  every=100)
    >>> for step in range(0, 250, 50):
    ...     rec(step, params)
    >>> rec.table()               # rows (step, layer, depth, width, fraction_nonzero)
    step  layer   depth  width  fraction_nonzero
    0     acts/0  0      16     0.625
    0     acts/1  1      16     0.5625
    100   acts/0  0      16     0.625
    100   acts/1  1      16     0.5625
    200   acts/0  0      16     0.625
    200   acts/1  1      16     0.5625
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx

from sparsejax.analysis.table import Table
from sparsejax.surgery import (ModelCall, activation_sparsity, check_call, named_modules,
                               trace_calls)


def _output_widths(model: nnx.Module, call, paths) -> dict[str, int]:
    """``{path: last output dim}`` of the modules at ``paths``, in first-call order
    (abstractly evaluated on a merged copy, so nothing is computed or mutated)."""
    kinds = tuple({type(m) for p, m in named_modules(model) if p in paths})
    widths: dict[str, int] = {}
    for c in trace_calls(model, call, kinds=kinds, abstract=True):
        if c.path in paths:
            widths[c.path] = int(c.out.shape[-1]) if c.out.ndim else 1
    return widths


def activation_sparsity_by_layer(model: nnx.Module, call: ModelCall, *, kinds=None,
                                 after: dict[str, Callable] | None = None) -> Table:
    """Rows ``(layer, depth, width, fraction_nonzero)`` for every activation module that
    the forward pass ``call(model)`` calls, in call order.

    ``fraction_nonzero = mean(a ≠ 0)`` (the Lazy Neuron fraction, from
    ``surgery.activation_sparsity``); ``depth`` counts activations in first-call order
    from 0; ``width`` is the last dimension of the module's output. ``kinds`` and
    ``after`` (``{path: fn}``: ``fn`` applied to the output of the module at ``path``, for
    activations computed by plain functions) as in ``surgery.activation_sparsity``
    (sparsejax's activation modules by default). A module
    called more than once (one module shared by several layers) gives one row: its last
    call's fraction; give each layer its own activation module (as the reference models
    do) to see them all.

    Example:

        >>> import numpy as np
        >>> from flax import nnx
        >>> from sparsejax.analysis import activation_sparsity_by_layer
        >>> from sparsejax.models import MLP
        >>> model = MLP(64, (32, 16), 10, activation='relu', rngs=nnx.Rngs(0))
        >>> x = np.random.default_rng(0).normal(size=(16, 64))
        >>> rows = activation_sparsity_by_layer(model, lambda m: m(x))
        >>> rows['layer'], rows['depth'], rows['width']
        (['acts/0', 'acts/1'], [0, 1], [32, 16])
        >>> [round(f, 2) for f in rows['fraction_nonzero']]   # ≈ [0.5, 0.5] at init
        [0.46, 0.46]
    """
    fractions = activation_sparsity(model, call, kinds=kinds, after=after)
    widths = _output_widths(model, call, set(fractions))
    order = list(widths) + [p for p in fractions if p not in widths]
    return Table([{"layer": p, "depth": i, "width": widths.get(p), "fraction_nonzero": fractions[p]}
                  for i, p in enumerate(order)])


def _model_builder(model, tx) -> Callable[[Any], nnx.Module]:
    """``state -> model`` from a Trainer, an NNX GraphDef (+ optional transform) or a
    callable."""
    if hasattr(model, "graphdef") and hasattr(model, "tx"):  # a Trainer
        model, tx = model.graphdef, tx or model.tx
    if isinstance(model, nnx.GraphDef):
        graphdef = model

        def build(state):
            params = state.params if tx is None else tx.forward(state.params, state.opt_state)
            m = nnx.merge(graphdef, params, state.rest)
            m.eval()
            return m
        return build
    if callable(model):
        return model
    raise TypeError(f"ActivationSparsityRecorder needs a Trainer, an nnx.GraphDef or a "
                    f"callable state -> model, got {type(model).__name__}")


class ActivationSparsityRecorder:
    """A ``train_and_evaluate`` hook: every ``every`` steps, rebuilds the model from the
    train state and records ``activation_sparsity_by_layer`` of the forward pass
    ``call(model)`` (on a fixed input, e.g. ``lambda m: m(x)``).

    ``model`` is the run's ``Trainer`` (its graphdef and transform, so the model sees
    ``tx.forward(params)`` as in training), an ``nnx.GraphDef`` of the
    ``nnx.split(model, nnx.Param, ...)`` kind (with ``tx`` for sparse runs), or any
    callable ``state -> nnx.Module``. The rebuilt model is put in eval mode. ``kinds``
    and ``after`` as in ``activation_sparsity_by_layer``.

    Example (``model`` an ``nnx.GraphDef``, and the state a ``TrainState`` as in training):

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.analysis import ActivationSparsityRecorder
        >>> from sparsejax.models import MLP
        >>> from sparsejax.train.state import TrainState
        >>> batch = {'inputs': jnp.ones((2, 8))}
        >>> graphdef, params, rest = nnx.split(MLP(8, (16,), 4, rngs=nnx.Rngs(0)), nnx.Param, ...)
        >>> state = TrainState(jnp.int32(0), nnx.to_pure_dict(params), nnx.to_pure_dict(rest),
        ...                    opt_state=(), rng=jax.random.PRNGKey(0))
        >>> rec = ActivationSparsityRecorder(graphdef, lambda m: m(batch['inputs'][:64]), every=100)
        >>> for step in (99, 100, 101):
        ...     rec(step, state)
        >>> rec.table()['step']   # every 100 steps
        [100]
        >>> rec.table().where(layer='acts/0')['fraction_nonzero']
        [0.625]
    """

    def __init__(self, model, call: ModelCall, *, every: int = 1, kinds=None,
                 after: dict[str, Callable] | None = None, tx=None):
        if int(every) < 1:
            raise ValueError(f"ActivationSparsityRecorder: every must be >= 1, got {every}")
        check_call(call)
        self.build = _model_builder(model, tx)
        self.call, self.every, self.kinds, self.after = call, int(every), kinds, after
        self.rows: list[dict] = []

    def __call__(self, step: int, state) -> None:
        if int(step) % self.every:
            return
        self.record(step, self.build(state))

    def record(self, step: int, model: nnx.Module) -> None:
        """Measures ``self.call(model)`` and adds rows for ``step``."""
        self.rows += [{"step": int(step), **r}
                      for r in activation_sparsity_by_layer(model, self.call, kinds=self.kinds,
                                                            after=self.after)]

    def table(self) -> Table:
        """Rows ``(step, layer, depth, width, fraction_nonzero)`` recorded so far."""
        return Table(self.rows, ["step", "layer", "depth", "width", "fraction_nonzero"])
