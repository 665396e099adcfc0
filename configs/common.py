"""The shared shape of every config: all keys exist here, so a typo is an error.

Each experiment config calls ``base(...)``, sets its fields and returns
``finalize(config, arg)``. ``arg`` is a comma-separated list: a sparsity method
(``dense``, ``static``, ``one_shot``, ``gradual``, ``set``, ``rigl``, ``nm_ste``,
``sr_ste``, ``mdgf``, ``sdgf``), a sparsity in [0, 1), an N:M pattern (``1:8``), a
Sparse-IFT family (``wide``, ``parallel``, ``factorized``, ``doped``; trained with RigL
unless a method is given), and ``tiny`` (a few steps, used by CI and smoke tests), e.g.
``rigl,0.9,tiny``, ``mdgf,1:8`` or ``doped,0.75``.
The config is then locked, so a misspelt key is an error.

Example::

    config = base(model=ConfigDict({'name': 'mlp', 'hidden': (64,)}),
                  data=ConfigDict({'name': 'digits'}))
"""

from __future__ import annotations

import re

import ml_collections


def base(*, model: ml_collections.ConfigDict, data: ml_collections.ConfigDict):
    """A full config with defaults: adamw + cosine, dense sparsity, data-parallel mesh."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model
    c.data = data
    c.optimizer = ml_collections.ConfigDict(dict(
        name="adamw", learning_rate=1e-3, weight_decay=1e-4, schedule="cosine",
        warmup_steps=50, momentum=0.9, nesterov=False, grad_clip=0.0))
    # Weight sparsity (sparsejax.dst). rules: (regex over param path, 'sparse' | 'dense' |
    # a sparsity) first match wins; () means every kernel is sparse. end_step < 0 means
    # end_fraction of num_steps. skip_gradient_on_update None: the method's default.
    c.sparsity = ml_collections.ConfigDict(dict(
        name="dense", sparsity=0.9, distribution="erk", power_scale=1.0, rules=(),
        mask_init="random", update_every=100, begin_step=0, end_step=-1, end_fraction=0.75,
        drop_fraction=0.3, drop_fraction_anneal="cosine",
        skip_gradient_on_update=ml_collections.config_dict.placeholder(bool),
        initial_sparsity=0.0, scope="layer", selection="threshold", drop_noise_std=1e-5, seed=0,
        # N:M (sparsejax.nm): 'sparse' rules mean this pattern, grouped along `axis`.
        pattern="2:4", axis=-2, sr_ste_lambda=2e-4, decay="exp", alpha=2e-4, backward="ste",
        schedule="stepwise", dense_steps=0, finetune_steps=0))
    # Sparse-IFT (sparsejax.ift): family none | wide | parallel | factorized | doped at
    # sparsity s; rules: regexes of the Linear/Conv modules to transform (() = all but the
    # stem and head); norm '' = BatchNorm after convs, LayerNorm after Linear.
    c.ift = ml_collections.ConfigDict(dict(family="none", sparsity=0.0, rules=(), norm="",
                                           sigma="norm_relu"))
    # mesh.shape may hold one -1 (all remaining devices); batches split over data_axes.
    # num_devices=0 uses every device; a positive number uses the first n (tests, debugging).
    c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1), axes=("data", "model"),
                                            data_axes=("data",), num_devices=0))
    # (regex over '/'-joined param path, per-dimension mesh axes); unmatched: replicated.
    c.sharding_rules = ()
    c.batch_size = 128
    c.num_steps = 1000
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 500
    c.max_checkpoints = 3
    return c


IFT_FAMILIES = ("wide", "parallel", "factorized", "doped")
SPARSITY_METHODS = ("dense", "static", "one_shot", "gradual", "set", "rigl",
                    "nm_ste", "sr_ste", "mdgf", "sdgf")


def parse_arg(arg: str | None, extra: tuple[str, ...] = ()) -> dict:
    """``'rigl,0.9,tiny'`` → ``{'method': 'rigl', 'sparsity': 0.9, 'tiny': True}``;
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


def finalize(c: ml_collections.ConfigDict, arg: str | None, extra: tuple[str, ...] = ()):
    """Applies ``arg`` (method, sparsity, 'tiny') and locks the config against new keys."""
    a = parse_arg(arg, extra)
    if a["method"]:
        c.sparsity.name = a["method"]
    if a["sparsity"] is not None:
        c.sparsity.sparsity = a["sparsity"]
    if a["pattern"] is not None:
        c.sparsity.pattern = a["pattern"]
    if a["ift"] is not None:  # Sparse-IFT: s is the IFT knob; RigL, uniform, by default
        c.ift.family = a["ift"]
        c.ift.sparsity = c.sparsity.sparsity if a["sparsity"] is None else a["sparsity"]
        c.sparsity.name = a["method"] or "rigl"
        c.sparsity.distribution = "uniform"
    if a["tiny"]:
        c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 5, 10, 10
        c.batch_size = min(c.batch_size, 32)
        c.optimizer.warmup_steps = 2
        c.sparsity.update_every = min(c.sparsity.update_every, 5)
    c.lock()
    return c
