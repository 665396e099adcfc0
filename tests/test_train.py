"""The training loop: end to end, sharding, compilation, checkpoints, kill/resume, errors."""

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import lm_recall, quickstart, vit_digits
from sparsejax.train import (CheckpointError, Checkpointer, make_trainer, read_jsonl,
                             train_and_evaluate)
from sparsejax.train.checkpoint import abstract_like
from sparsejax.train.data import BatchIterator


def tiny(method="", **overrides):
    cfg = quickstart.get_config(f"{method},tiny")
    with cfg.unlocked():
        cfg.model.hidden = (64, 64)
        cfg.update_from_flattened_dict(overrides)  # dotted keys: 'method.sparsity'
    return cfg


def run_steps(cfg, n):
    t = make_trainer(cfg)
    with jax.set_mesh(t.mesh):
        state = t.init(jax.random.PRNGKey(cfg.seed))
        it = BatchIterator(t.dataset.train, cfg.batch_size, cfg.seed)
        for _ in range(n):
            state, stats = t.step(state, t.device_batch(next(it)))
    return t, state, stats


def tree_digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_quickstart_tiny_end_to_end(tmp_path):
    summary = train_and_evaluate(quickstart.get_config("tiny"), tmp_path, progress=False)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    train = [r["loss"] for r in rows if r["split"] == "train"]
    assert [r["step"] for r in rows if r["split"] == "eval"] == [10, 20]
    assert len(train) == 4 and train[-1] < train[0]
    assert summary["eval_accuracy"] > 0.3  # ten classes: chance is 0.1
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["10", "20"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "summary.json").exists() and (tmp_path / "config.json").exists()


def test_sharded_training_equals_single_device():
    rules = ((r"layers/.*/kernel", (None, "model")), (r"head/kernel", ("model", None)))
    sharded = tiny(**{"mesh.shape": (4, 2), "sharding_rules": rules})
    single = tiny(**{"mesh.shape": (1, 1), "mesh.num_devices": 1})
    t8, s8, _ = run_steps(sharded, 6)
    t1, s1, _ = run_steps(single, 6)
    assert t8.mesh.size == 8 and t1.mesh.size == 1
    k = s8.params["layers"][0]["kernel"]
    assert k.sharding.spec == P(None, "model") and len(k.addressable_shards) == 8
    mu = s8.opt_state[0].mu["layers"][0]["kernel"]  # adamw moments follow their params
    assert mu.sharding.spec == P(None, "model")
    for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("method", ["dense", "rigl"])
def test_step_compiles_once(method):
    t, state, _ = run_steps(tiny(method), 1)  # tiny: masks update every 5
    with jax.set_mesh(t.mesh):
        it = BatchIterator(t.dataset.train, 32, 0, position=1)
        for _ in range(7):  # crosses the mask update at t=5
            state, _ = t.step(state, t.device_batch(next(it)))
    assert t.step._cache_size() == 1


@pytest.mark.parametrize("make_cfg", [
    lambda: vit_digits.get_config("tiny"),
    lambda: lm_recall.get_config("tiny"),
    lambda: tiny(**{"model_name": "resnet", "model": {"depth": 8}}),
], ids=["vit", "lm", "resnet"])
def test_reference_models_train(make_cfg):
    cfg = make_cfg()
    t, state, stats = run_steps(cfg, 3)
    assert np.isfinite(float(stats["loss_sum"]))
    init = jax.jit(t.init)(jax.random.PRNGKey(cfg.seed))
    changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                     jax.tree.leaves(init.params))]
    assert all(changed)
    if cfg.model_name == "resnet":  # BatchNorm running statistics move in train mode
        assert jax.tree.leaves(state.rest)
        assert not np.allclose(state.rest["stem_bn"]["mean"], init.rest["stem_bn"]["mean"])
    assert int(state.step) == 3


@pytest.mark.parametrize("arg", ["mdgf,1:8,tiny", "sdgf,2:4,tiny"])
def test_nm_transformers_train_and_log_diagnostics(arg, tmp_path):
    cfg = vit_digits.get_config(arg) if arg.startswith("mdgf") else lm_recall.get_config(arg)
    summary = train_and_evaluate(cfg, tmp_path, progress=False)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert all({"flip_rate", "pruned_grad_norm", "pruned_grad_var"} <= set(r) for r in rows)
    assert any(r["flip_rate"] > 0 for r in rows) and all(0 <= r["flip_rate"] <= 1 for r in rows)
    assert np.isfinite(summary["eval_loss"])


@pytest.mark.parametrize("method", ["dense", "rigl"])
def test_checkpoint_round_trip_is_exact(tmp_path, method):
    t, state, _ = run_steps(tiny(method, **{"mesh.shape": (4, 2),
                                    "sharding_rules": ((r"layers/.*/kernel", (None, "model")),)}), 7)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(2, state, data_position=2)
    ckpt.wait()
    restored, pos = ckpt.restore(abstract_like(t.abstract_state, t.state_shardings))
    assert pos == 2
    assert_trees_equal(restored, state)
    assert restored.params["layers"][0]["kernel"].sharding == state.params["layers"][0]["kernel"].sharding
    if method == "rigl":  # masks are sharded like their params and come back exactly
        m = restored.opt_state.masks["layers"][0]["kernel"]
        assert m.dtype == bool and m.sharding.spec == P(None, "model")
        assert restored.opt_state.masks["head"]["kernel"] is None


KILL_SCRIPT = """
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from configs import quickstart
from sparsejax.train import train_and_evaluate
cfg = quickstart.get_config({arg!r})
done = Path({workdir!r}) / 'checkpoints' / '10' / '_CHECKPOINT_METADATA'
def hook(step, state):
    if step == 13:  # checkpoint 10 is committed; steps 11-13 are about to be lost
        t0 = time.time()
        while not done.exists() and time.time() - t0 < 60:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
train_and_evaluate(cfg, {workdir!r}, hooks=[hook], progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["tiny", "rigl,0.9,tiny"])
def test_killed_run_resumes_bit_identical(tmp_path, root, arg):
    killed, straight = tmp_path / "killed", tmp_path / "straight"
    script = KILL_SCRIPT.format(root=str(root), workdir=str(killed), arg=arg)
    proc = subprocess.run([sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) == ["10"]
    cfg = quickstart.get_config(arg)
    resumed = train_and_evaluate(cfg, killed, progress=False)
    assert resumed["resumed_from"] == 10
    baseline = train_and_evaluate(cfg, straight, progress=False)
    t = make_trainer(cfg)
    target = abstract_like(t.abstract_state, t.state_shardings)
    with jax.set_mesh(t.mesh):
        a, pos_a = Checkpointer(killed / "checkpoints").restore(target, step=20)
        b, pos_b = Checkpointer(straight / "checkpoints").restore(target, step=20)
    assert pos_a == pos_b == 20
    assert_trees_equal(a, b)
    assert resumed["eval_loss"] == baseline["eval_loss"]


@pytest.fixture
def trained_workdir(tmp_path):
    train_and_evaluate(quickstart.get_config("tiny"), tmp_path, progress=False)
    return tmp_path


@pytest.mark.parametrize("override,message", [
    ({"mesh.shape": (3, 1)}, "needs 3 devices, but 8 are available"),
    ({"data.name": "tfds"}, "config.data.tfds_name must name"),
    ({"data.name": "cifar11"}, "unknown dataset 'cifar11'"),
    ({"data.name": "tfds", "data.tfds_name": "mnist", "data.data_dir": "/nonexistent/tfds"},
     "tfds dataset 'mnist' is not prepared"),
    ({"model_name": "lm"}, "is a lm model"),
    ({"model.hiden": (8,)}, r"MLP takes no argument\(s\) \['hiden'\]"),
    ({"method.name": "magic"}, "unknown sparsity method 'magic'"),
    ({"method.name": "rigl"}, r"config.method \(name='rigl'\) must set \['end_step', 'sparsity'\]"),
    ({"rigl.method.sparsity": 1.0}, "sparsity 1.0 is outside"),
    ({"rigl.method.distribution": "erx"}, "unknown distribution 'erx'"),
    ({"static.method.rules": (("encoder/.*", "sparse"),)}, "rules match no parameter"),
    ({"nm_ste.method.pattern": "4:4"}, "N:M pattern 4:4 needs 0 < N < M"),
    ({"nm_ste.method.pattern": "1:128"}, "not divisible by M=128"),
    ({"mdgf.method.decay": "cosine"}, "unknown decay 'cosine'"),
    ({"rigl.method.pattern": "2:4"}, r"unknown key\(s\) \['pattern'\]"),
    ({"batch_size": 12}, "batch_size=12 is not divisible by the 8 data shards"),
    ({"num_steps": 0}, "config.num_steps must be a positive integer, got 0"),
])
def test_bad_config_is_clear_and_leaves_checkpoints_intact(trained_workdir, override, message):
    """Keys ``<method>.section.leaf`` start from ``get_config("<method>,tiny")``."""
    before = tree_digest(trained_workdir)
    (key,) = [k for k in override if k.count(".") == 2] or [None]
    cfg = quickstart.get_config(f"{key.split('.')[0]},tiny" if key else "tiny")
    override = {(k.split(".", 1)[1] if k == key else k): v for k, v in override.items()}
    with cfg.unlocked():
        for k, v in override.items():
            section, _, leaf = k.rpartition(".")
            (cfg[section] if section else cfg)[leaf] = v
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        train_and_evaluate(cfg, trained_workdir, progress=False)
    assert tree_digest(trained_workdir) == before


def test_plain_optax_transformation_trains(tmp_path):
    import optax

    cfg = quickstart.get_config("tiny")
    summary = train_and_evaluate(cfg, tmp_path, tx=optax.sgd(0.5, momentum=0.9),
                                 progress=False)
    assert summary["eval_accuracy"] > 0.5


def test_locked_config_rejects_unknown_keys(root, tmp_path):
    cfg = quickstart.get_config("tiny")
    with pytest.raises(AttributeError, match="num_stepz"):
        cfg.num_stepz = 5
    out = subprocess.run([sys.executable, "-m", "experiments.train", "--config",
                          "configs/quickstart.py:tiny", "--workdir", str(tmp_path / "w"),
                          "--config.optimizer.lerning_rate=0.1"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "lerning_rate" in out.stderr
    assert not (tmp_path / "w").exists()


def test_corrupt_checkpoint_is_a_clear_error_and_kept(trained_workdir):
    step_dir = trained_workdir / "checkpoints" / "20"
    victims = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 64]
    assert victims
    for v in victims:
        v.write_bytes(b"\x00garbage" * 8)
    before = tree_digest(trained_workdir)
    cfg = quickstart.get_config("tiny")  # extended, so the finished run resumes
    cfg.num_steps, cfg.optimizer.decay_steps = 30, 20
    with pytest.raises(CheckpointError, match=f"checkpoint {step_dir} could not be restored"):
        train_and_evaluate(cfg, trained_workdir, progress=False)
    assert tree_digest(trained_workdir) == before


def test_wrapped_sparse_transform_trains_sparse_in_the_loop(tmp_path):
    # was: chain(clip, sr_ste) lost `forward`, so the loop trained N:M dense with no error
    import optax

    import sparsejax
    from sparsejax.train.checkpoint import Checkpointer, abstract_like
    from sparsejax.train.loop import make_trainer

    cfg = quickstart.get_config("tiny")
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     sparsejax.sr_ste(optax.adam(1e-2), [(r"layers/.*/kernel", "2:4")]))
    summary = train_and_evaluate(cfg, tmp_path, tx=tx, progress=False)
    assert summary["train_sparsity"] == pytest.approx(0.5)  # the loop found the N:M state
    assert "train_flip_rate" in summary
    trainer = make_trainer(cfg, tx)
    ckpt = Checkpointer(tmp_path / "checkpoints")
    state, _ = ckpt.restore(abstract_like(trainer.abstract_state, trainer.state_shardings))
    ckpt.close()
    seen = sparsejax.materialize(state.params, state.opt_state)
    k = np.asarray(seen["layers"][0]["kernel"])
    assert (np.count_nonzero(k.reshape(-1, 4, k.shape[-1]), axis=1) == 2).all()
    with pytest.raises(ValueError, match="followed by 1 more transformation"):
        make_trainer(cfg, optax.chain(sparsejax.rigl(optax.adam(1e-2), 0.9, end_step=10),
                                      optax.scale(0.5)))
