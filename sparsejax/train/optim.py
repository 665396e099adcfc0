"""Optimizer and sparsity transform from config; every default lives in one signature.

``config.optimizer`` holds exactly ``make_optimizer``'s keyword arguments.
``config.method.name`` picks a factory from ``TRANSFORMS`` and the rest of
``config.method`` holds exactly that factory's keyword arguments (``transform_arguments``
lists them with their defaults, read from the factory's signature). An unknown key is an
error naming the accepted ones (docs/architecture.md, "Configuration").

Example:

    >>> import sparsejax
    >>> from configs import quickstart
    >>> from sparsejax.train.optim import make_transform
    >>> config = quickstart.get_config('rigl,0.9,tiny')
    >>> config.method.name, config.method.drop_fraction, config.optimizer.name
    ('rigl', 0.3, 'adamw')
    >>> tx = make_transform(config)
    >>> isinstance(tx, sparsejax.SparseTransformation)
    True
"""

from __future__ import annotations

import inspect
from typing import Callable, Mapping, Sequence

import optax

from sparsejax import dst, nm
from sparsejax.base import SparseTransformation, check_int, check_number, dense

TRANSFORMS: dict[str, Callable[..., SparseTransformation]] = {
    "dense": dense, "static": dst.static_sparse, "one_shot": dst.one_shot_magnitude,
    "gradual": dst.gradual_magnitude, "set": dst.set_, "rigl": dst.rigl,
    "nm_ste": nm.nm_ste, "sr_ste": nm.sr_ste, "mdgf": nm.mdgf, "sdgf": nm.sdgf,
}
"""``config.method.name`` → the factory it calls as ``factory(inner, **arguments)``."""

REQUIRED = inspect.Parameter.empty
"""The default ``transform_arguments`` reports for an argument the config must set."""


def keyword_arguments(fn: Callable, skip: int = 0) -> dict:
    """``{name: default}`` of ``fn``'s parameters after the first ``skip`` positional ones
    (``REQUIRED`` where there is no default).

    Example:

        >>> from sparsejax.train.optim import keyword_arguments, make_optimizer
        >>> args = keyword_arguments(make_optimizer)
        >>> args['learning_rate'], list(args)
        (0.001, ['name', 'learning_rate', 'schedule', 'warmup_steps', 'decay_steps',
                 'weight_decay', 'momentum', 'nesterov', 'grad_clip'])
    """
    params = list(inspect.signature(fn).parameters.values())[skip:]
    return {p.name: p.default for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def check_section(section: Mapping, accepted, where: str) -> dict:
    """``section`` as a dict, or a ValueError naming the keys it may hold.

    Example:

        >>> from sparsejax.train.optim import check_section, keyword_arguments, make_optimizer
        >>> check_section({'learning_rate': 0.1}, keyword_arguments(make_optimizer),
        ...               'config.optimizer')
        {'learning_rate': 0.1}
        >>> check_section({'lr': 0.1}, keyword_arguments(make_optimizer), 'config.optimizer')
        Traceback (most recent call last):
        ...
        ValueError: config.optimizer: unknown key(s) ['lr']; it accepts ['decay_steps', ...]
    """
    given = dict(section)
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; it accepts {sorted(accepted)}")
    return given


def transform_arguments(name: str) -> dict:
    """The keyword arguments ``config.method`` may hold for method ``name``, with the
    factory's defaults.

    Example:

        >>> from sparsejax.train.optim import REQUIRED, transform_arguments
        >>> args = transform_arguments('rigl')
        >>> args['drop_fraction'], args['update_every'], args['end_step'] is REQUIRED
        (0.3, 100, True)
    """
    if name not in TRANSFORMS:
        raise ValueError(f"config.method.name: unknown sparsity method {name!r}; known: "
                         f"{sorted(TRANSFORMS)}")
    return keyword_arguments(TRANSFORMS[name], skip=1)


def make_schedule(decay_steps: int | None, learning_rate: float, schedule: str = "cosine",
                  warmup_steps: int = 0) -> optax.Schedule:
    """'constant' (``warmup_steps`` and ``decay_steps`` are not used), or 'cosine' (linear
    warm-up over ``warmup_steps``, then cosine decay to 0 at ``decay_steps``, and 0 after).

    ``learning_rate`` is a finite number > 0 and ``warmup_steps`` an integer >= 0; with
    'cosine' also ``warmup_steps < decay_steps``, since a warm-up that fills the decay
    never decays (and one longer never reaches ``learning_rate``). A bad value is a
    ValueError naming its ``config.optimizer`` key.

    Example:

        >>> from sparsejax.train.optim import make_schedule
        >>> lr = make_schedule(100, 1e-3, 'cosine', warmup_steps=10)
        >>> [round(float(lr(t)), 6) for t in (0, 5, 10, 55, 100)]   # warm-up, peak, cosine
        [0.0, 0.0005, 0.001, 0.0005, 0.0]
        >>> make_schedule(100, 1e-3, 'cosine', warmup_steps=100)
        Traceback (most recent call last):
            ...
        ValueError: config.optimizer.warmup_steps must be < decay_steps=100 with the cosine ...
    """
    check_number("config.optimizer.learning_rate", learning_rate, positive=True)
    check_int(0, **{"config.optimizer.warmup_steps": warmup_steps})
    if schedule == "constant":
        return optax.constant_schedule(learning_rate)
    if schedule == "cosine":
        check_int(**{"config.optimizer.decay_steps": decay_steps})
        if warmup_steps >= decay_steps:
            raise ValueError(f"config.optimizer.warmup_steps must be < decay_steps="
                             f"{decay_steps} with the cosine schedule (the warm-up would "
                             f"leave no decay), got {warmup_steps}")
        return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                                  decay_steps)
    raise ValueError(f"config.optimizer.schedule: unknown schedule {schedule!r}; known: "
                     "['constant', 'cosine']")


def make_optimizer(*, name: str = "adamw", learning_rate: float = 1e-3,
                   schedule: str = "cosine", warmup_steps: int = 50,
                   decay_steps: int | None = None, weight_decay: float = 1e-4,
                   momentum: float = 0.9, nesterov: bool = False,
                   grad_clip: float = 0.0) -> optax.GradientTransformation:
    """'sgd' (decoupled ``weight_decay``, ``momentum``, ``nesterov``), 'adam', or 'adamw'
    (``weight_decay``), on ``make_schedule(decay_steps, ...)``, with global-norm clipping
    when ``grad_clip``. Configs set ``decay_steps`` to follow ``config.num_steps``; it is
    its own key so that a run extended past its decay says so (``train.workdir``).

    ``weight_decay`` is a finite number >= 0, ``momentum`` one in [0, 1) (0: plain SGD),
    ``grad_clip`` a finite number > 0, or 0 / None for no clipping; they are checked for
    every ``name``, used or not. A bad value is a ValueError naming its
    ``config.optimizer`` key.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.train.optim import make_optimizer
        >>> opt = make_optimizer(name='sgd', learning_rate=0.1, schedule='constant',
        ...                      weight_decay=0.0, momentum=0.0, grad_clip=1.0)
        >>> params = {'w': jnp.zeros(2)}
        >>> updates, _ = opt.update({'w': jnp.array([3., 4.])}, opt.init(params), params)
        >>> [round(u, 4) for u in updates['w'].tolist()]   # clipped to norm 1, times -0.1
        [-0.06, -0.08]
        >>> make_optimizer(decay_steps=1000, learning_rate=-0.1)
        Traceback (most recent call last):
            ...
        ValueError: config.optimizer.learning_rate must be a finite number > 0, got -0.1
    """
    lr = make_schedule(decay_steps, learning_rate, schedule, warmup_steps)
    check_number("config.optimizer.weight_decay", weight_decay, positive=False)
    check_number("config.optimizer.momentum", momentum, positive=False)
    if momentum >= 1:
        raise ValueError(f"config.optimizer.momentum must be < 1, got {momentum!r}")
    if grad_clip is not None and grad_clip != 0:
        check_number("config.optimizer.grad_clip", grad_clip, positive=True)
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


def make_transform(config, rules=None, stacked: Sequence[str] = ()) -> SparseTransformation:
    """``TRANSFORMS[config.method.name](optimizer, **config.method)``; ``rules``
    replaces ``config.method.rules`` (Sparse-IFT brings its own; ``[]``, nothing sparse,
    gives the dense baseline). ``stacked``: the model's layer-stacked parameter paths
    (``DecoderLM.stacked_paths`` of a scanned model), given to a method that selects per
    layer (``stacked=``) unless ``config.method.stacked`` is set; a method whose
    selection does not depend on layers (N:M groups, global pruning) ignores them.

    Example:

        >>> import jax.numpy as jnp
        >>> import sparsejax
        >>> from configs import quickstart
        >>> from sparsejax.train.optim import make_transform
        >>> config = quickstart.get_config('rigl,0.9,tiny')   # rules: head dense, kernels sparse
        >>> params = {'layers': [{'kernel': jnp.ones((64, 32)), 'bias': jnp.zeros(32)}],
        ...           'head': {'kernel': jnp.ones((32, 10)), 'bias': jnp.zeros(10)}}
        >>> tx = make_transform(config); state = tx.init(params)
        >>> sparsejax.mask_counts(state.masks)           # 10% of 2048 kept
        {'layers/0/kernel': (205, 2048)}
        >>> sparsejax.sparsity_states(make_transform(config, rules=[]).init(params))  # dense
        []
    """
    inner = make_optimizer(**check_section(
        config.optimizer, keyword_arguments(make_optimizer), "config.optimizer"))
    section = {k: v for k, v in dict(config.method).items() if k != "name"}
    name = config.method.name
    accepted = transform_arguments(name)
    kwargs = check_section(section, accepted, f"config.method (name={name!r})")
    if rules is not None:
        if not rules:  # nothing is sparse (e.g. Sparse-IFT at s = 0): the dense baseline
            return dense(inner)
        if "rules" not in accepted:
            raise ValueError(f"Sparse-IFT brings sparsity rules, but config.method.name="
                             f"{name!r} takes none; use a sparse method such as 'rigl'")
        kwargs["rules"] = rules
    if "rules" in kwargs and kwargs["rules"] is not None:
        kwargs["rules"] = tuple(tuple(r) for r in kwargs["rules"])
    if stacked and "stacked" in accepted and not kwargs.get("stacked"):
        kwargs["stacked"] = tuple(stacked)
    missing = sorted(k for k, v in accepted.items() if v is REQUIRED and k not in kwargs)
    if missing:
        raise ValueError(f"config.method (name={name!r}) must set {missing}; choose the method "
                         f"in the config argument (e.g. configs/quickstart.py:{name}) so that "
                         "config.method holds its arguments")
    return TRANSFORMS[name](inner, **kwargs)


__all__ = ["REQUIRED", "TRANSFORMS", "check_section", "keyword_arguments", "make_optimizer",
           "make_schedule", "make_transform", "transform_arguments"]
