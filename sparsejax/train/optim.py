"""Optimizer and sparsity transform from config; every default lives in one signature.

``config.optimizer`` holds exactly ``make_optimizer``'s keyword arguments.
``config.sparsity.name`` picks a factory from ``TRANSFORMS`` and the rest of
``config.sparsity`` holds exactly that factory's keyword arguments (``transform_arguments``
lists them with their defaults, read from the factory's signature). An unknown key is an
error naming the accepted ones (docs/architecture.md, "Configuration").

Example::

    tx = make_transform(config)   # a sparsejax.SparseTransformation
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping

import optax

from sparsejax import dst, nm
from sparsejax.base import SparseTransformation, dense

TRANSFORMS: dict[str, Callable[..., SparseTransformation]] = {
    "dense": dense, "static": dst.static_sparse, "one_shot": dst.one_shot_magnitude,
    "gradual": dst.gradual_magnitude, "set": dst.set_, "rigl": dst.rigl,
    "nm_ste": nm.nm_ste, "sr_ste": nm.sr_ste, "mdgf": nm.mdgf, "sdgf": nm.sdgf,
}
"""``config.sparsity.name`` → the factory it calls as ``factory(inner, **arguments)``."""

REQUIRED = inspect.Parameter.empty
"""The default ``transform_arguments`` reports for an argument the config must set."""


def keyword_arguments(fn: Callable, skip: int = 0) -> dict:
    """``{name: default}`` of ``fn``'s parameters after the first ``skip`` positional ones
    (``REQUIRED`` where there is no default).

    Example::

        keyword_arguments(make_optimizer, skip=1)['learning_rate']   # 0.001
    """
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {p.name: p.default for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_section(section: Mapping, accepted, where: str) -> dict:
    """``section`` as a dict, or a ValueError naming the keys it may hold.

    Example::

        check_section({'learning_rate': 0.1}, keyword_arguments(make_optimizer, 1),
                      'config.optimizer')
    """
    given = dict(section)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; it accepts {sorted(accepted)}")
    return given


def transform_arguments(name: str) -> dict:
    """The keyword arguments ``config.sparsity`` may hold for method ``name``, with the
    factory's defaults.

    Example::

        transform_arguments('rigl')['drop_fraction']   # 0.3
    """
    if name not in TRANSFORMS:
        raise ValueError(f"config.sparsity.name: unknown sparsity transform {name!r}; known: "
                         f"{sorted(TRANSFORMS)}")
    return keyword_arguments(TRANSFORMS[name], skip=1)


def make_schedule(num_steps: int, learning_rate: float, schedule: str = "cosine",
                  warmup_steps: int = 0) -> optax.Schedule:
    """'constant', or 'cosine' (linear warm-up, then cosine decay to 0 at ``num_steps``).

    Example::

        make_schedule(100, 1e-3, 'cosine', warmup_steps=10)(10)   # 1e-3
    """
    if schedule == "constant":
        return optax.constant_schedule(learning_rate)
    if schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                                  max(num_steps, warmup_steps + 1))
    raise ValueError(f"config.optimizer.schedule: unknown schedule {schedule!r}; known: "
                     "['constant', 'cosine']")


def make_optimizer(num_steps: int, *, name: str = "adamw", learning_rate: float = 1e-3,
                   schedule: str = "cosine", warmup_steps: int = 50, weight_decay: float = 1e-4,
                   momentum: float = 0.9, nesterov: bool = False,
                   grad_clip: float = 0.0) -> optax.GradientTransformation:
    """'sgd' (decoupled ``weight_decay``, ``momentum``, ``nesterov``), 'adam', or 'adamw'
    (``weight_decay``), on ``make_schedule``, with global-norm clipping when ``grad_clip``.

    Example::

        make_optimizer(1000, name='adamw', learning_rate=1e-3)
    """
    lr = make_schedule(num_steps, learning_rate, schedule, warmup_steps)
    if name == "sgd":
        opt = optax.chain(optax.add_decayed_weights(weight_decay),
                          optax.sgd(lr, momentum=momentum or None, nesterov=nesterov))
    elif name == "adam":
        opt = optax.adam(lr)
    elif name == "adamw":
        opt = optax.adamw(lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"config.optimizer.name: unknown optimizer {name!r}; known: "
                         "['adam', 'adamw', 'sgd']")
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip else opt


def make_transform(config, rules=None) -> SparseTransformation:
    """``TRANSFORMS[config.sparsity.name](optimizer, **config.sparsity)``; ``rules``
    replaces ``config.sparsity.rules`` (Sparse-IFT brings its own; ``[]``, nothing sparse,
    gives the dense baseline).

    Example::

        tx = make_transform(config); state = tx.init(params)
    """
    inner = make_optimizer(config.num_steps, **check_section(
        config.optimizer, keyword_arguments(make_optimizer, skip=1), "config.optimizer"))
    section = {k: v for k, v in dict(config.sparsity).items() if k != "name"}
    name = config.sparsity.name
    accepted = transform_arguments(name)
    kwargs = check_section(section, accepted, f"config.sparsity (name={name!r})")
    if rules is not None:
        if not rules:  # nothing is sparse (e.g. Sparse-IFT at s = 0): the dense baseline
            return dense(inner)
        if "rules" not in accepted:
            raise ValueError(f"Sparse-IFT brings sparsity rules, but config.sparsity.name="
                             f"{name!r} takes none; use a sparse method such as 'rigl'")
        kwargs["rules"] = rules
    if "rules" in kwargs and kwargs["rules"] is not None:
        kwargs["rules"] = tuple(tuple(r) for r in kwargs["rules"])
    missing = sorted(k for k, v in accepted.items() if v is REQUIRED and k not in kwargs)
    if missing:
        raise ValueError(f"config.sparsity (name={name!r}) must set {missing}")
    return TRANSFORMS[name](inner, **kwargs)


__all__ = ["REQUIRED", "TRANSFORMS", "check_section", "keyword_arguments", "make_optimizer",
           "make_schedule", "make_transform", "transform_arguments"]
