"""Run integrity: a run's record is never silently wrong, overwritten or lost.

Each test reproduces one finding of the run-integrity issue on the old loop and checks
the fixed behaviour: the message, and that the workdir's files are unchanged (sha256 of
every file) wherever nothing should change.
"""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import quickstart
from sparsejax.train import Checkpointer, make_trainer, read_jsonl, train_and_evaluate
from sparsejax.train import loop
from sparsejax.train.checkpoint import abstract_like
from sparsejax.train.loop import NonFiniteError, all_finite
from sparsejax.train.workdir import RunMismatch, WorkdirLock, WorkdirLocked
from tests.test_train import assert_trees_equal, tree_digest


def config(arg="tiny", **overrides):
    cfg = quickstart.get_config(arg)
    with cfg.unlocked():
        for k, v in overrides.items():
            section, _, leaf = k.rpartition(".")
            (cfg[section] if section else cfg)[leaf] = v
    return cfg


def restore_all(workdir: Path, cfg) -> dict:
    """Every kept checkpoint of ``workdir``: ``{step: TrainState}``."""
    t = make_trainer(cfg)
    target = abstract_like(t.abstract_state, t.state_shardings)
    ckpt = Checkpointer(workdir / "checkpoints")
    with jax.set_mesh(t.mesh):
        steps = ckpt.manager.all_steps()
        out = {s: ckpt.restore(target, step=s)[0] for s in steps}
    ckpt.close()
    return out


def rows_without_timing(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_per_sec")} for r in read_jsonl(path)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished ``rigl,0.9,tiny`` run, copied afresh for each test that changes it."""
    workdir = tmp_path_factory.mktemp("finished") / "run"
    train_and_evaluate(config("rigl,0.9,tiny"), workdir, progress=False)
    return workdir


# 1. Divergence: NaN parameters were checkpointed and rotation deleted the good ones.
def test_divergence_stops_naming_the_step_and_every_checkpoint_is_finite(tmp_path):
    cfg = config("rigl,0.9,tiny", **{"optimizer.name": "sgd", "optimizer.learning_rate": 1e5,
                                     "checkpoint_every": 2, "max_checkpoints": 2})
    with pytest.raises(NonFiniteError, match=r"step \d+: the loss, gradients or parameters "
                       r"are not finite .* the last checkpoint \(step \d+\) is finite and kept"):
        train_and_evaluate(cfg, tmp_path, progress=False)
    states = restore_all(tmp_path, cfg)
    assert states and all(bool(all_finite(s)) for s in states.values())
    for s in states.values():  # RigL's pruned weights hold 0, as in a healthy run
        for i, layer in s.params["layers"].items():
            mask = np.asarray(s.opt_state.masks["layers"][i]["kernel"])
            assert mask.mean() < 0.5 and not np.asarray(layer["kernel"])[~mask].any()
    assert not (tmp_path / "summary.json").exists()


def _poisoned_digits(example: int):
    """``get_dataset`` whose training split has one non-finite input: the batch that
    holds it gives a NaN loss."""
    real = loop.get_dataset

    def get_dataset(cfg):
        ds = real(cfg)
        ds.train.arrays["inputs"] = ds.train.arrays["inputs"].copy()
        ds.train.arrays["inputs"][example] = np.nan
        return ds
    return get_dataset


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_policy(tmp_path, monkeypatch, policy):
    from sparsejax.train.data import batch_indices

    cfg = config("rigl,0.9,tiny", on_nonfinite=policy)
    bad_step = 7  # the 7th batch (position 6) holds the poisoned example
    example = int(batch_indices(1437, cfg.batch_size, cfg.seed, bad_step - 1)[0])
    monkeypatch.setattr(loop, "get_dataset", _poisoned_digits(example))
    if policy == "stop":
        with pytest.raises(NonFiniteError, match=f"step {bad_step}: .*loss_sum=nan"):
            train_and_evaluate(cfg, tmp_path, progress=False)
        assert sorted(restore_all(tmp_path, cfg)) == []  # the first checkpoint is at 10
        return
    summary = train_and_evaluate(cfg, tmp_path, progress=False)
    rows = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 0, 0]  # rows at 5, 10, 15, 20
    assert np.isfinite([r["loss"] for r in rows]).all()
    assert all(bool(all_finite(s)) for s in restore_all(tmp_path, cfg).values())
    assert np.isfinite(summary["eval_loss"])


def test_skipping_forever_stops(tmp_path):
    cfg = config("tiny", on_nonfinite="skip", max_consecutive_skips=3,
                 **{"optimizer.name": "sgd", "optimizer.learning_rate": 1e5})
    with pytest.raises(NonFiniteError, match=r"4 non-finite steps in a row "
                       r"\(config.max_consecutive_skips=3\)"):
        train_and_evaluate(cfg, tmp_path, progress=False)


# 2. A changed config on resume was silent, and overwrote config.json and summary.json.
@pytest.mark.parametrize("arg,overrides,listed", [
    ("rigl,0.5,tiny", {}, r"method.sparsity: 0.9 -> 0.5"),
    ("set,0.9,tiny", {}, r"method.name: 'rigl' -> 'set'; "
                         r"method.skip_gradient_on_update: True -> False"),
    ("rigl,0.9,tiny", {"batch_size": 16}, r"batch_size: 32 -> 16"),
    ("rigl,0.9,tiny", {"model.hidden": (128, 256)}, r"model.hidden: \[256, 256\] -> \[128, 256\]"),
])
def test_changed_config_on_resume_is_an_error_listing_the_keys(finished, arg, overrides,
                                                              listed):
    before = tree_digest(finished)
    with pytest.raises(RunMismatch, match=f"holds a run with another config: {listed}.*"
                                          "Nothing was written"):
        train_and_evaluate(config(arg, **overrides), finished, progress=False)
    assert tree_digest(finished) == before


def test_checkpoint_of_another_run_is_refused(finished, tmp_path):
    # config.json gone (say, copied checkpoints): the checkpoint's own fingerprint decides
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    (workdir / "config.json").unlink()
    (workdir / "summary.json").unlink()
    before = tree_digest(workdir)
    with pytest.raises(RunMismatch, match=r"checkpoint .*/20 belongs to a run with "
                                          r"fingerprint \w+, not this config's \w+"):
        train_and_evaluate(config("rigl,0.5,tiny"), workdir, progress=False)
    assert tree_digest(workdir) == before


def test_safe_keys_may_change_and_are_recorded(finished, tmp_path):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(finished, workdir)
    cfg = config("rigl,0.9,tiny", num_steps=25, log_every=1,
                 **{"method.end_step": 15, "optimizer.decay_steps": 20})
    summary = train_and_evaluate(cfg, workdir, progress=False)
    assert summary["resumed_from"] == 20 and summary["steps"] == 25
    run = json.loads((workdir / "run.json").read_text())
    assert [s["from_step"] for s in run["starts"]] == [0, 20]
    assert run["starts"][1]["changed"] == {"num_steps": [20, 25], "log_every": [5, 1]}


# 3. Rerunning a finished run wiped its summary; num_steps below the last checkpoint too.
def test_finished_run_rerun_is_a_no_op_returning_its_summary(finished):
    before = tree_digest(finished)
    recorded = json.loads((finished / "summary.json").read_text())
    assert train_and_evaluate(config("rigl,0.9,tiny"), finished, progress=False) == recorded
    assert tree_digest(finished) == before


def test_num_steps_below_the_last_checkpoint_is_an_error(finished):
    before = tree_digest(finished)
    with pytest.raises(ValueError, match=r"config.num_steps=10 is below the last checkpoint "
                                         r".* \(step 20\). Nothing was written"):
        train_and_evaluate(config("rigl,0.9,tiny", num_steps=10, **{
            "method.end_step": 15, "optimizer.decay_steps": 20}), finished, progress=False)
    assert tree_digest(finished) == before


# 4. No workdir lock: two runs interleaved their metrics and lost the first run's results.
SLOW_RUN = """
import sys, time
sys.path.insert(0, {root!r})
from configs import quickstart
from sparsejax.train import train_and_evaluate
started = {started!r}
def hook(step, state):
    if step == 1:
        open(started, 'w').close()
    time.sleep(0.2)
train_and_evaluate(quickstart.get_config('tiny'), {workdir!r}, hooks=[hook], progress=False)
"""


def test_second_run_on_a_workdir_fails_at_once_naming_the_holder(root, tmp_path):
    workdir, started = tmp_path / "run", tmp_path / "started"
    first = subprocess.Popen([sys.executable, "-c", SLOW_RUN.format(
        root=str(root), workdir=str(workdir), started=str(started))], cwd=root,
        stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not started.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert started.exists(), first.stderr.read()[-2000:]
    with pytest.raises(WorkdirLocked, match=f"{workdir} is in use by pid {first.pid} on .*"
                                            "Nothing was written"):
        train_and_evaluate(quickstart.get_config("tiny"), workdir, progress=False)
    assert first.wait(timeout=120) == 0, first.stderr.read()[-2000:]
    rows = read_jsonl(workdir / "metrics.jsonl")
    keys = [(r["step"], r["split"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6  # train at 5, 10, 15, 20; eval at 10, 20
    assert json.loads((workdir / "summary.json").read_text())["steps"] == 20


def test_a_dead_holder_leaves_no_stale_lock(tmp_path):
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "gone", "started": "-",
                                                "command": "killed"}))
    with WorkdirLock(tmp_path):  # flock died with its holder: the file alone blocks nothing
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert (tmp_path / ".lock").read_text() == ""


# 5. A bad config touched the workdir: it failed only after config.json was overwritten.
@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 100_000}, r"config.batch_size=100000 exceeds the 1437 examples of the "
                              r"training split of 'digits'"),
    ({"optimizer.learning_rate": -0.1}, r"learning_rate must be a finite number > 0, got -0.1"),
    ({"optimizer.learning_rate": float("nan")}, r"learning_rate must be a finite number > 0"),
    ({"optimizer.warmup_steps": -5}, r"warmup_steps"),
    ({"model.hidden": (0,)}, r"hidden must be positive integers, got \(0,\)"),
    ({"model.hidden": (-5,)}, r"hidden must be positive integers, got \(-5,\)"),
    ({"method.update_every": 0}, r"update_every must be a positive integer, got 0"),
    ({"on_nonfinite": "ignore"}, r"config.on_nonfinite must be one of \('stop', 'skip'\)"),
    ({"log_every": -1}, r"config.log_every must be a non-negative integer, got -1"),
])
def test_bad_config_writes_nothing(finished, overrides, message):
    before = tree_digest(finished)
    with pytest.raises(ValueError, match=message):
        train_and_evaluate(config("rigl,0.9,tiny", **overrides), finished, progress=False)
    assert tree_digest(finished) == before


def test_text_file_shorter_than_a_batch_writes_nothing(tmp_path):
    from configs import lm_recall

    text = tmp_path / "short.txt"
    text.write_bytes(b"to be or not to be " * 40)  # 760 bytes: 10 windows of 64
    cfg = lm_recall.get_config("tiny")
    with cfg.unlocked():
        cfg.data = quickstart.ml_collections.ConfigDict(
            {"name": "text", "path": str(text), "seq_len": 64})
    with pytest.raises(ValueError, match=r"config.batch_size=\d+ exceeds the 10 examples"):
        train_and_evaluate(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# 6. metrics.jsonl after a resume had two values per (step, split), and the first train
#    row after the resume averaged only part of its window.
def test_interrupted_run_resumes_with_one_row_per_step_equal_to_a_straight_run(tmp_path):
    cfg = config("rigl,0.9,tiny", log_every=3)  # rows at 3, 6, 9, 12, ...; checkpoint at 10

    def interrupt(step, state):
        if step == 13:  # row 12 is written, checkpoint 10 is the latest: Ctrl-C
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(cfg, tmp_path / "interrupted", hooks=[interrupt], progress=False)
    assert (12, "train") in {(r["step"], r["split"])
                             for r in read_jsonl(tmp_path / "interrupted" / "metrics.jsonl")}
    resumed = train_and_evaluate(cfg, tmp_path / "interrupted", progress=False)
    straight = train_and_evaluate(cfg, tmp_path / "straight", progress=False)
    assert resumed["resumed_from"] == 10
    assert (rows_without_timing(tmp_path / "interrupted" / "metrics.jsonl")
            == rows_without_timing(tmp_path / "straight" / "metrics.jsonl"))
    assert resumed["eval_loss"] == straight["eval_loss"]


# 7. SIGTERM killed the run at once and lost up to checkpoint_every steps.
PREEMPT_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from configs import quickstart
from sparsejax.train import train_and_evaluate
from sparsejax.train.loop import Preempted
def hook(step, state):
    if step == 13:
        os.kill(os.getpid(), signal.SIGTERM)
try:
    train_and_evaluate(quickstart.get_config('rigl,0.9,tiny'), {workdir!r}, hooks=[hook],
                       progress=False)
except Preempted as e:
    print(e.step, e)
    sys.exit(143)
"""


def test_sigterm_saves_a_checkpoint_and_the_resume_is_bit_identical(root, tmp_path, finished):
    workdir = tmp_path / "preempted"
    proc = subprocess.run([sys.executable, "-c", PREEMPT_SCRIPT.format(
        root=str(root), workdir=str(workdir))], cwd=root, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert proc.stdout.startswith("13 preempted (SIGTERM) at step 13: checkpoint saved")
    cfg = config("rigl,0.9,tiny")
    assert Checkpointer(workdir / "checkpoints").latest_step() == 13
    assert train_and_evaluate(cfg, workdir, progress=False)["resumed_from"] == 13
    a, b = restore_all(workdir, cfg), restore_all(finished, cfg)  # finished: straight through
    assert_trees_equal(a[20], b[20])


# 9. A full disk was buried in a 578-line log, and every run printed ~100 orbax lines.
def _cli(root, workdir, *args, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.train", "--config",
                           "configs/quickstart.py:tiny", "--workdir", str(workdir), *args],
                          cwd=root, capture_output=True, text=True, timeout=timeout)


def _log_lines(stderr: str) -> list[str]:
    """stderr without the progress bar."""
    return [l for l in stderr.replace("\r", "\n").splitlines()
            if l.strip() and not l.startswith("train:")]


def test_logs_are_quiet_and_a_full_disk_is_one_line(root, tmp_path):
    ok = _cli(root, tmp_path / "ok")
    assert ok.returncode == 0 and _log_lines(ok.stderr) == [], ok.stderr[-2000:]
    workdir = tmp_path / "full"
    workdir.mkdir()
    (workdir / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    proc = _cli(root, workdir)
    assert proc.returncode == 1
    assert _log_lines(proc.stderr) == [
        "error: no space left on device; free space and rerun the same command to resume "
        "from the last checkpoint"]
    verbose = _cli(root, tmp_path / "verbose", "--verbose", "--config.batch_size=100000")
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr


# 11. Eager multi-device ops on the host path raced orbax's save thread (rc 134 under load).
def _compiled_names(fn) -> set[str]:
    names, handler = set(), logging.Handler()
    handler.emit = lambda r: names.add(r.getMessage().split("(")[1].split(")")[0]) \
        if r.getMessage().startswith("Compiling jit(") and "SingleDevice" not in r.getMessage() \
        else None
    logger = logging.getLogger("jax._src.interpreters.pxla")
    logger.addHandler(handler)
    try:
        with jax.log_compiles():
            fn()
    finally:
        logger.removeHandler(handler)
    return names


def test_the_loop_runs_no_eager_multi_device_computation(tmp_path):
    cfg = config("rigl,0.9,tiny", checkpoint_every=1)
    jax.clear_caches()

    def init_only():
        t = make_trainer(cfg)
        with jax.set_mesh(t.mesh):
            t.init(jax.random.PRNGKey(0))

    baseline = _compiled_names(init_only)
    jax.clear_caches()
    names = _compiled_names(lambda: train_and_evaluate(cfg, tmp_path, progress=False))
    assert names - baseline == {"train_step", "eval_step", "unmasked"}


@pytest.mark.slow
def test_loop_survives_a_cpu_hog_on_8_devices(root, tmp_path):
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:  # every step checkpoints, so orbax's save thread always runs beside the loop
        run = _cli(root, tmp_path / "run", "--config.checkpoint_every=1")
    finally:
        hog.kill()
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == 6
