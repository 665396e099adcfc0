"""Every shipped config builds, and each config section is exactly its function's arguments."""

import importlib
from pathlib import Path

import jax
import ml_collections
import pytest
from flax import nnx

from configs import common, quickstart
from sparsejax.train.build import build
from sparsejax.train.data import DataInfo, get_dataset
from sparsejax.train.optim import REQUIRED, TRANSFORMS, keyword_arguments, make_optimizer, make_transform

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common"))
# tfds configs need prepared data; their models are checked on the dataset's shapes
# (lm_text prepares its tokenised corpus on first use: tests/test_tokens.py runs it)
INFO = {"resnet_cifar10": DataInfo("classification", (32, 32, 3), 10),
        "lm_text": DataInfo("lm", (128,), 4096),
        "lm_bytes": DataInfo("lm", (128,), 256)}  # its corpus is pinned to CPython 3.11.7
METHODS = ["", "static,0.9", "rigl,0.95", "nm_ste,2:4", "mdgf,1:8", "sdgf,2:4", "wide,0.75",
           "parallel,0.5", "doped,0.9"]  # one per code path (set/gradual/sr_ste share them)


def _info(name, config):
    return INFO[name] if name in INFO else get_dataset(config.data).info


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_with_every_method(name):
    module = importlib.import_module(f"configs.{name}")
    assert "python -m experiments.train --config configs/" in module.__doc__  # launch command
    info = _info(name, module.get_config())
    for arg in METHODS:
        config = module.get_config(arg)
        built = build(config, info)  # the builder step the trainer runs
        assert (built.plan.rules is not None) == (config.ift.family != "none"), (name, arg)
        model = nnx.eval_shape(lambda: built.make_model(jax.random.key(0)))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        state = jax.eval_shape(built.tx.init, params)  # rules resolve, N:M fits
        masks = [m for m in jax.tree.leaves(getattr(state, "masks", None)) if m is not None]
        assert bool(masks) == bool(arg), (name, arg)


@pytest.mark.parametrize("method", sorted(TRANSFORMS))
def test_method_section_is_exactly_the_factory_arguments(method):
    config = quickstart.get_config(method).copy_and_resolve_references()
    accepted = keyword_arguments(TRANSFORMS[method], skip=1)
    assert set(config.method) - {"name"} == set(accepted)
    chosen = {"sparsity": 0.9, "distribution": "erk", "begin_step": 0,
              "rules": ((r"head/kernel", "dense"), (r".*kernel", "sparse")),
              "end_step": int(0.75 * config.num_steps), "sparse_steps": config.num_steps}
    for key, default in accepted.items():  # the rest is the factory's own default
        want = chosen[key] if key in chosen else default
        assert default is not REQUIRED or key in chosen, key
        assert config.method[key] == want, (method, key)
    assert set(config.optimizer) == set(keyword_arguments(make_optimizer))


def test_schedules_follow_num_steps_overrides():
    config = quickstart.get_config("rigl")
    config.num_steps = 400  # e.g. --config.num_steps=400
    assert config.method.end_step == 300
    config = quickstart.get_config("sdgf,1:8")
    config.num_steps, config.method.dense_steps = 400, 100
    assert config.method.sparse_steps == 300


def test_unknown_keys_are_errors_naming_the_accepted_ones():
    config = quickstart.get_config("rigl,0.9")
    with pytest.raises(AttributeError, match="drop_fracton"):
        config.method.drop_fracton = 0.5  # locked: a typo cannot be set
    with config.unlocked():
        config.method.pattern = "2:4"  # an N:M argument given to RigL
    with pytest.raises(ValueError, match=r"config.method \(name='rigl'\): unknown key\(s\) "
                                         r"\['pattern'\]; it accepts \[.*'drop_fraction'"):
        make_transform(config)
    config = quickstart.get_config("nm_ste")
    with config.unlocked():
        config.optimizer.lerning_rate = 0.1
    with pytest.raises(ValueError, match=r"config.optimizer: unknown key\(s\) \['lerning_rate'\]"):
        make_transform(config)
    config = quickstart.get_config("tiny")
    with config.unlocked():
        config.model.hiden = (8,)
    with pytest.raises(ValueError, match=r"MLP takes no argument\(s\) \['hiden'\]"):
        build(config, DataInfo("classification", (8, 8, 1), 10))


def test_a_method_that_takes_no_rules_refuses_sparse_ift_rules():
    config = quickstart.get_config("dense,doped,0.75")
    info = DataInfo("classification", (8, 8, 1), 10)
    with pytest.raises(ValueError, match="takes none; use a sparse method"):
        build(config, info)


@pytest.mark.parametrize("arg,message", [
    ("0.9", r"method 'dense' takes no sparsity, so 0.9 would be ignored; .* rigl,0.9"),
    ("rigl,2:4", r"method 'rigl' takes no pattern, so 2:4 would be ignored; .* nm_ste,2:4"),
    ("nm_ste,0.5", r"method 'nm_ste' takes no sparsity"),
])
def test_a_knob_the_method_would_ignore_is_an_error(arg, message):
    with pytest.raises(ValueError, match=message):  # not a dense run that looks sparse
        quickstart.get_config(arg)


def test_section_builder_needs_required_arguments():
    c = ml_collections.ConfigDict({"num_steps": 10})
    s = common.method_section(c, "rigl", sparsity=0.5)
    assert s.end_step == 7 and s.sparsity == 0.5 and s.name == "rigl"
    with pytest.raises(ValueError, match=r"the config must choose \['sparsity'\]"):
        common.method_section(c, "static")
