"""The shared shape of every config; each section holds exactly its function's arguments.

- ``model_name`` picks ``sparsejax.models.MODELS[model_name]``; ``model`` holds that
  class's constructor arguments (the data supplies the rest: ``train.build.data_kwargs``).
- ``optimizer`` holds ``train.optim.make_optimizer``'s keyword arguments.
- ``method.name`` picks the weight-sparsity method ``train.optim.TRANSFORMS[name]``; the
  rest of ``method`` holds exactly that factory's keyword arguments, with the factory's defaults (read from its
  signature, so each default has one home).
- ``ift`` holds ``sparsejax.ift.transform``'s arguments (``family='none'``: off).

Each config file calls ``base(arg, ...)`` and returns ``finalize(config, arg)``. ``arg``
is a comma-separated list: a sparsity method (``TRANSFORMS``), a sparsity in [0, 1), an
N:M pattern (``1:8``), a Sparse-IFT family (``wide``, ``parallel``, ``factorized``,
``doped``; trained with RigL unless a method is given), and ``tiny`` (a few steps, for CI
and smoke tests), e.g. ``rigl,0.9,tiny``, ``mdgf,1:8`` or ``doped,0.75``. The config is
then locked, so a misspelt key is an error.

Example::

    config = base('rigl,0.9', model_name='mlp', model={'hidden': (64,)},
                  data=ConfigDict({'name': 'digits'}))
    config.method.drop_fraction    # 0.3, dst.rigl's default
"""

from __future__ import annotations

import re

import ml_collections
from ml_collections.config_dict import placeholder

from sparsejax.train.optim import REQUIRED, TRANSFORMS, keyword_arguments, make_optimizer, transform_arguments

IFT_FAMILIES = ("wide", "parallel", "factorized", "doped")
SPARSITY_METHODS = tuple(TRANSFORMS)
END_FRACTION = 0.75
"""DST methods stop changing masks after this fraction of training (RigL's T_end)."""


def parse_arg(arg: str | None, extra: tuple[str, ...] = ()) -> dict:
    """``'rigl,0.9,tiny'`` → ``{'method': 'rigl', 'sparsity': 0.9, 'tiny': True, ...}``;
    an N:M pattern such as ``'1:8'`` sets ``pattern``."""
    out = {"method": None, "sparsity": None, "pattern": None, "ift": None, "tiny": False,
           "extra": set()}
    for tok in filter(None, (t.strip() for t in (arg or "").split(","))):
        if re.fullmatch(r"\d+:\d+", tok):
            out["pattern"] = tok
        elif tok == "tiny":
            out["tiny"] = True
        elif tok in SPARSITY_METHODS:
            out["method"] = tok
        elif tok in IFT_FAMILIES:
            out["ift"] = tok
        elif tok in extra:
            out["extra"].add(tok)
        else:
            try:
                out["sparsity"] = float(tok)
            except ValueError:
                raise ValueError(f"unknown config argument {tok!r}; use a sparsity method "
                                 f"{SPARSITY_METHODS}, a sparsity in [0, 1), 'tiny'"
                                 + (f" or one of {extra}" if extra else "")) from None
    return out


def _section(defaults: dict) -> ml_collections.ConfigDict:
    """A ConfigDict of a signature's defaults; a None default takes any type later."""
    return ml_collections.ConfigDict({k: (placeholder(object) if v is None else v)
                                      for k, v in defaults.items()})


def method_section(c: ml_collections.ConfigDict, name: str, **choices) -> ml_collections.ConfigDict:
    """``config.method`` for method ``name``: the factory's arguments with its defaults,
    then ``choices`` for the arguments it takes (the config's choices: a target sparsity,
    ERK, rules). Arguments without a default that no choice sets follow ``num_steps``:
    ``end_step`` is ``END_FRACTION`` of it, ``sparse_steps`` what the dense and fine-tune
    phases leave, ``begin_step`` 0.

    Example::

        method_section(config, 'sdgf', pattern='1:8').sparse_steps   # config.num_steps
    """
    accepted = transform_arguments(name)
    s = _section({k: v for k, v in accepted.items() if v is not REQUIRED})
    s.name = name
    for key, value in choices.items():
        if key in accepted and value is not None:
            s[key] = value
    steps = c.get_ref("num_steps")
    if "end_step" in accepted and "end_step" not in choices:
        s.end_step = (steps * END_FRACTION).to_int()
    if "sparse_steps" in accepted and "sparse_steps" not in choices:
        s.sparse_steps = steps - s.get_ref("dense_steps") - s.get_ref("finetune_steps")
    if "begin_step" in accepted and "begin_step" not in s:
        s.begin_step = 0
    missing = [k for k, v in accepted.items() if v is REQUIRED and k not in s]
    if missing:
        raise ValueError(f"method {name!r}: the config must choose {missing}")
    return s


def base(arg: str | None, *, model_name: str, model: dict, data: ml_collections.ConfigDict,
         method: dict | None = None, extra: tuple[str, ...] = ()) -> ml_collections.ConfigDict:
    """A full config: ``arg``'s method (default dense) with 90% ERK sparsity where the
    method takes them, the config file's ``method`` choices (e.g. rules) where it takes
    them, the optimizer's defaults, a data-parallel mesh."""
    a = parse_arg(arg, extra)
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model_name = model_name
    c.model = ml_collections.ConfigDict(model)
    c.data = data
    c.num_steps = 1000
    c.optimizer = _section(keyword_arguments(make_optimizer))
    c.optimizer.decay_steps = c.get_ref("num_steps")  # the learning rate decays over the run
    choices = dict(sparsity=0.9, distribution="erk", **(method or {}))
    if a["sparsity"] is not None:
        choices["sparsity"] = a["sparsity"]
    if a["pattern"] is not None:
        choices["pattern"] = a["pattern"]
    name = a["method"] or "dense"
    c.ift = ml_collections.ConfigDict(dict(family="none", sparsity=0.0,
                                           layers=placeholder(object), norm=placeholder(str),
                                           sigma="norm_relu"))
    if a["ift"] is not None:  # Sparse-IFT: s is the IFT knob; RigL, uniform, by default
        c.ift.family = a["ift"]
        c.ift.sparsity = choices["sparsity"]
        name = a["method"] or "rigl"
        choices["distribution"] = "uniform"
    accepted = transform_arguments(name)
    for key in ("sparsity", "pattern"):  # asked for, but the method would ignore it
        if a[key] is not None and key not in accepted and not (key == "sparsity" and a["ift"]):
            raise ValueError(f"config argument {arg!r}: method {name!r} takes no {key}, so "
                             f"{a[key]} would be ignored; name a method that does, e.g. "
                             f"{'rigl,' if key == 'sparsity' else 'nm_ste,'}{a[key]}")
    c.method = method_section(c, name, **choices)
    # mesh.shape may hold one -1 (all remaining devices); batches split over data_axes.
    # num_devices=0 uses every device; a positive number uses the first n (tests, debugging).
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1), axes=("data", "model"),
                                            data_axes=("data",), num_devices=0))
    # (regex over '/'-joined param path, per-dimension mesh axes); unmatched: replicated.
    c.sharding_rules = ()
    c.batch_size = 128
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 500
    c.max_checkpoints = 3
    # a step with a non-finite loss, gradient or parameter is never applied; 'stop' ends
    # the run naming the step, 'skip' goes on (train.loop.ON_NONFINITE)
    c.on_nonfinite = "stop"
    c.max_consecutive_skips = 10
    return c


def finalize(c: ml_collections.ConfigDict, arg: str | None, extra: tuple[str, ...] = ()):
    """Applies ``tiny`` (20 steps, small batches, masks every 5 steps) and locks the config
    against new keys."""
    if parse_arg(arg, extra)["tiny"]:
        c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 5, 10, 10
        c.batch_size = min(c.batch_size, 32)
        c.optimizer.warmup_steps = 2
        if "update_every" in c.method:
            c.method.update_every = min(c.method.update_every, 5)
    c.lock()
    return c
