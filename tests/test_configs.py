"""Every shipped config builds: its rules match the model, its transform initialises."""

import importlib
from pathlib import Path

import jax
import pytest
from flax import nnx

from sparsejax.models import DataInfo, build_model
from sparsejax.train.optim import make_transform

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))
# tfds configs need prepared data; their models are checked on the dataset's shapes
INFO = {"resnet_cifar10": DataInfo("classification", (32, 32, 3), 10)}
METHODS = ["", "static,0.9", "rigl,0.95", "nm_ste,2:4", "mdgf,1:8", "sdgf,2:4", "wide,0.75",
           "parallel,0.5", "doped,0.9"]  # one per code path (set/gradual/sr_ste share them)


def _info(name, config):
    if name in INFO:
        return INFO[name]
    from sparsejax.train.data import get_dataset

    return get_dataset(config.data).info


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_with_every_method(name):
    module = importlib.import_module(f"configs.{name}")
    assert "python -m experiments.train --config configs/" in module.__doc__  # launch command
    info = _info(name, module.get_config())
    for arg in METHODS:
        config = module.get_config(arg)
        if config.ift.family != "none":  # Sparse-IFT rewrites the model: the trainer builds it
            from sparsejax.train.loop import sparse_ift_plan

            model_cfg, paths, rules = sparse_ift_plan(config, info)
            assert rules, (name, arg)
            tx = make_transform(config, rules=rules)
            model = nnx.eval_shape(lambda: build_model(model_cfg, info, nnx.Rngs(0)))
            if paths:
                from sparsejax import ift

                ift.transform(model, config.ift.family, config.ift.sparsity, paths)
        else:
            tx = make_transform(config)
            model = nnx.eval_shape(lambda: build_model(config.model, info, nnx.Rngs(0)))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        state = jax.eval_shape(tx.init, params)  # rules resolve, N:M fits
        masks = [m for m in jax.tree.leaves(getattr(state, "masks", None)) if m is not None]
        assert bool(masks) == bool(arg), (name, arg)
