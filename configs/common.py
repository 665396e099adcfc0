"""The shared shape of every config: all keys exist here, so a typo is an error.

Each experiment config calls ``base(...)``, sets its fields and returns
``finalize(config, arg)``, which applies the ``tiny`` variant (a few steps, used by CI and
smoke tests) and locks the config.

Example::

    config = base(model=ConfigDict({'name': 'mlp', 'hidden': (64,)}),
                  data=ConfigDict({'name': 'digits'}))
"""

from __future__ import annotations

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
    c.sparsity = ml_collections.ConfigDict(dict(name="dense"))
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


def finalize(c: ml_collections.ConfigDict, arg: str | None):
    """Applies ``arg`` ('' or 'tiny') and locks the config against new keys."""
    arg = arg or ""
    if arg not in ("", "tiny"):
        raise ValueError(f"unknown config argument {arg!r}; use '' or 'tiny'")
    if arg == "tiny":
        c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 20, 5, 10, 10
        c.batch_size = min(c.batch_size, 32)
        c.optimizer.warmup_steps = 2
    c.lock()
    return c
