"""Optimizer and sparsity transform from config.

``config.optimizer`` picks an optax optimizer and learning-rate schedule;
``config.sparsity.name`` picks a sparsity transform from ``SPARSITY`` that wraps it.
Sparsity techniques register their factory in ``SPARSITY``.

Example::

    tx = make_transform(config)   # a sparsejax.SparseTransformation
"""

from __future__ import annotations

from typing import Callable

import optax

from sparsejax import dst, nm
from sparsejax.base import SparseTransformation, dense
from sparsejax.distributions import get_distribution


def make_schedule(cfg, num_steps: int) -> optax.Schedule:
    """'constant' or 'cosine' (linear warm-up then cosine decay to 0).

    Example::

        make_schedule(ConfigDict({'learning_rate': 1e-3, 'schedule': 'cosine',
                                  'warmup_steps': 10}), 100)(10)   # 1e-3
    """
    lr, name = cfg.learning_rate, cfg.get("schedule", "constant")
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "cosine":
        warmup = cfg.get("warmup_steps", 0)
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(num_steps, warmup + 1))
    raise ValueError(f"config.optimizer.schedule: unknown schedule {name!r}; known: "
                     "['constant', 'cosine']")


def make_optimizer(cfg, num_steps: int) -> optax.GradientTransformation:
    """'sgd' (momentum, nesterov), 'adam' or 'adamw', with optional global-norm clipping.

    Example::

        make_optimizer(ConfigDict({'name': 'adamw', 'learning_rate': 1e-3}), 1000)
    """
    lr = make_schedule(cfg, num_steps)
    name = cfg.name
    if name == "sgd":
        opt = optax.chain(optax.add_decayed_weights(cfg.get("weight_decay", 0.0)),
                          optax.sgd(lr, momentum=cfg.get("momentum", 0.9) or None,
                                    nesterov=cfg.get("nesterov", False)))
    elif name == "adam":
        opt = optax.adam(lr)
    elif name == "adamw":
        opt = optax.adamw(lr, weight_decay=cfg.get("weight_decay", 1e-4))
    else:
        raise ValueError(f"config.optimizer.name: unknown optimizer {name!r}; known: "
                         "['adam', 'adamw', 'sgd']")
    clip = cfg.get("grad_clip", 0.0)
    return optax.chain(optax.clip_by_global_norm(clip), opt) if clip else opt


SparsityFactory = Callable[[optax.GradientTransformation, object, int], SparseTransformation]


def _end_step(cfg, num_steps: int) -> int:
    """``cfg.end_step`` if set (>= 0), else ``end_fraction`` of training (RigL: 0.75)."""
    end = cfg.get("end_step", -1)
    return int(end) if end is not None and end >= 0 else int(cfg.get("end_fraction", 0.75) * num_steps)


def _common(cfg) -> dict:
    return dict(distribution=get_distribution(cfg.get("distribution", "uniform"),
                                              cfg.get("power_scale", 1.0)),
                rules=tuple(tuple(r) for r in cfg.get("rules", ())) or None,
                selection=cfg.get("selection", "threshold"))


def _dynamic(factory):
    def make(inner, cfg, num_steps):
        kw = dict(update_every=cfg.get("update_every", 100), begin_step=cfg.get("begin_step", 0),
                  drop_fraction=cfg.get("drop_fraction", 0.3),
                  drop_fraction_anneal=cfg.get("drop_fraction_anneal", "cosine"),
                  mask_init=cfg.get("mask_init", "random"), seed=cfg.get("seed", 0),
                  drop_noise_std=cfg.get("drop_noise_std", 1e-5))
        if cfg.get("skip_gradient_on_update", None) is not None:
            kw["skip_gradient_on_update"] = cfg.skip_gradient_on_update
        return factory(inner, cfg.sparsity, end_step=_end_step(cfg, num_steps), **_common(cfg),
                       **kw)

    return make


def _nm(factory, **fixed):
    """N:M methods take ``cfg.rules``, where 'sparse' means ``cfg.pattern`` (e.g. '2:4')."""

    def make(inner, cfg, num_steps):
        rules = tuple(tuple(r) for r in cfg.get("rules", ())) or None
        dense, finetune = cfg.get("dense_steps", 0), cfg.get("finetune_steps", 0)
        kw = dict(pattern=cfg.get("pattern", "2:4"), axis=cfg.get("axis", -2),
                  dense_steps=dense, finetune_steps=finetune,
                  sparse_steps=max(num_steps - dense - finetune, 1), **fixed)
        if factory is nm.sr_ste:
            kw["sr_ste_lambda"] = cfg.get("sr_ste_lambda", 2e-4)
        if factory is nm.mdgf:
            kw.update(decay=cfg.get("decay", "exp"), alpha=cfg.get("alpha", 2e-4),
                      backward=cfg.get("backward", "ste"))
        if factory is nm.sdgf:
            kw["schedule"] = cfg.get("schedule", "stepwise")
        return factory(inner, rules, **kw)

    return make


SPARSITY: dict[str, SparsityFactory] = {
    "dense": lambda inner, cfg, num_steps: dense(inner),
    "static": lambda inner, cfg, num_steps: dst.static_sparse(
        inner, cfg.sparsity, mask_init=cfg.get("mask_init", "random"), seed=cfg.get("seed", 0),
        **_common(cfg)),
    "one_shot": lambda inner, cfg, num_steps: dst.one_shot_magnitude(
        inner, cfg.sparsity, scope=cfg.get("scope", "layer"), **_common(cfg)),
    "gradual": lambda inner, cfg, num_steps: dst.gradual_magnitude(
        inner, cfg.sparsity, begin_step=cfg.get("begin_step", 0),
        end_step=_end_step(cfg, num_steps), update_every=cfg.get("update_every", 100),
        initial_sparsity=cfg.get("initial_sparsity", 0.0), **_common(cfg)),
    "set": _dynamic(dst.set_),
    "rigl": _dynamic(dst.rigl),
    "nm_ste": _nm(nm.nm_ste),
    "sr_ste": _nm(nm.sr_ste),
    "mdgf": _nm(nm.mdgf),
    "sdgf": _nm(nm.sdgf),
}


def make_transform(config, rules=None) -> SparseTransformation:
    """The sparsity transform named ``config.sparsity.name`` around the configured optimizer;
    ``rules`` replaces ``config.sparsity.rules`` (Sparse-IFT supplies its own).

    Example::

        tx = make_transform(config); state = tx.init(params)
    """
    name = config.sparsity.name
    if rules is not None:
        config = config.copy_and_resolve_references()
        with config.unlocked():
            config.sparsity.rules = tuple(tuple(r) for r in rules)
            if not rules:  # nothing is sparse (e.g. Sparse-IFT at s = 0): the dense baseline
                name = config.sparsity.name = "dense"
    if name not in SPARSITY:
        raise ValueError(f"config.sparsity.name: unknown sparsity transform {name!r}; known: "
                         f"{sorted(SPARSITY)}")
    inner = make_optimizer(config.optimizer, config.num_steps)
    return SPARSITY[name](inner, config.sparsity, config.num_steps)
