"""Multi-process training with JAX's own runtime (``jax.distributed.initialize``).

Two worker processes on localhost CPU, each with 2 host devices (a 4-device global
mesh, each process feeding its half of every global batch), must train to the same
state as one process with 4 host devices. Both layouts run the real command line,
``python -m experiments.train``, and the final orbax checkpoints (which in the
2-process run both processes write together) are compared leaf by leaf.

CPU collectives across processes use gloo, jax's default
(``jax_cpu_collectives_implementation='gloo'`` in jax 0.10), so no flag is needed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TIMEOUT_S = 240
# Small and fast; the final step always evaluates and checkpoints (loop._every).
OVERRIDES = ["--config.num_steps=10", "--config.batch_size=32", "--config.log_every=5",
             "--config.eval_every=10", "--config.checkpoint_every=10"]
CONFIG = "configs/quickstart.py:tiny"
ABSL_NOISE = re.compile(r"^(?:[IW]\d{4} |\[Gloo\])")  # orbax INFO lines, gloo connects


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(local_devices: int) -> dict:
    """The test process's environment without its JAX settings (conftest asks for 8
    devices), with ``local_devices`` host CPU devices per worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local_devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _tail(path: Path, n: int = 3000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "<no output>"
    lines = [l for l in text.splitlines() if not ABSL_NOISE.match(l)]
    return "\n".join(lines)[-n:]


def _run_workers(root: Path, logs: Path, workdir: Path, num_processes: int,
                 local_devices: int, expect_exit: int = 0, overrides=OVERRIDES,
                 sigterm_when=None) -> list[Path]:
    """Runs ``experiments.train`` as ``num_processes`` cooperating processes (1 = no
    multi-host flags); fails with every worker's stderr tail if any worker hangs or exits
    with another code than ``expect_exit``. ``sigterm_when()`` becoming true sends
    SIGTERM to the last worker. Returns the stdout files, then the stderr files."""
    port = _free_port()
    procs, outs, errs = [], [], []
    for i in range(num_processes):
        cmd = [sys.executable, "-m", "experiments.train", f"--config={CONFIG}",
               f"--workdir={workdir}", *overrides]
        if num_processes > 1:
            cmd += [f"--coordinator_address=127.0.0.1:{port}",
                    f"--num_processes={num_processes}", f"--process_id={i}"]
        out, err = logs / f"{workdir.name}.{i}.out", logs / f"{workdir.name}.{i}.err"
        with open(out, "w") as fo, open(err, "w") as fe:  # files: no pipe can fill up
            procs.append(subprocess.Popen(cmd, cwd=root, env=_env(local_devices),
                                          stdout=fo, stderr=fe, stdin=subprocess.DEVNULL))
        outs.append(out)
        errs.append(err)

    deadline, failed = time.monotonic() + TIMEOUT_S, None
    while any(p.poll() is None for p in procs):
        if time.monotonic() > deadline:
            failed = f"timed out after {TIMEOUT_S}s"
            break
        if sigterm_when is not None and sigterm_when():
            procs[-1].send_signal(signal.SIGTERM)
            sigterm_when = None
        if not expect_exit and any(p.poll() not in (None, 0) for p in procs):
            # A dead peer leaves the others blocked in a collective: give them a moment.
            time.sleep(5)
            failed = "a worker failed"
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    codes = [p.returncode for p in procs]
    if failed or any(c != expect_exit for c in codes):
        report = "\n".join(f"--- worker {i} (exit {c}) stderr tail:\n{_tail(e)}"
                           for i, (c, e) in enumerate(zip(codes, errs)))
        pytest.fail(f"{num_processes}-process run in {workdir}: {failed or 'nonzero exit'}, "
                    f"exit codes {codes}\n{report}", pytrace=False)
    return outs + errs


def _final_state(workdir: Path, step: int):
    """The checkpointed ``TrainState`` at ``step`` as numpy arrays, plus its metadata."""
    import jax
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(step) / "state"
    ckpt = ocp.PyTreeCheckpointer()
    meta = ckpt.metadata(path).item_metadata.tree
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    return ckpt.restore(path, restore_args=args), meta


def _mesh_shape(meta) -> tuple:
    import jax

    leaf = jax.tree.leaves(meta["params"])[0]
    return tuple(int(d) for d in np.shape(leaf.sharding.device_mesh.mesh))


@pytest.mark.slow
def test_two_processes_match_one_process(root, tmp_path):
    import jax

    logs = tmp_path / "logs"
    logs.mkdir()
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run_workers(root, logs, single, num_processes=1, local_devices=4)
    outs = _run_workers(root, logs, multi, num_processes=2, local_devices=2)

    # Genuinely two processes: only process 0 prints the summary, both wrote shards of
    # the checkpoint (orbax keeps per-process metadata), over a 4-device mesh each time.
    assert "== summary ==" in outs[0].read_text()
    assert "== summary ==" not in outs[1].read_text()
    steps = json.loads((multi / "summary.json").read_text())["steps"]
    state_dir = multi / "checkpoints" / str(steps) / "state"
    assert sorted(p.name for p in (state_dir / "array_metadatas").iterdir()) == \
        ["process_0", "process_1"]

    ref, ref_meta = _final_state(single, steps)
    got, got_meta = _final_state(multi, steps)
    assert _mesh_shape(ref_meta) == _mesh_shape(got_meta) == (4, 1)

    ref_leaves = jax.tree_util.tree_flatten_with_path(ref)[0]
    got_leaves = jax.tree_util.tree_flatten_with_path(got)[0]
    assert [p for p, _ in ref_leaves] == [p for p, _ in got_leaves]
    assert any("params" in jax.tree_util.keystr(p) for p, _ in ref_leaves)
    assert int(got["step"]) == int(ref["step"]) == steps
    got_by_path = dict(got_leaves)
    # Parameters first, so a mismatch names a parameter rather than an optimizer moment.
    for path, a in sorted(ref_leaves, key=lambda kv: "params" not in jax.tree_util.keystr(kv[0])):
        b = got_by_path[path]
        # The gradient's sum over the batch is split differently across processes, so
        # float32 rounding differs slightly (~1e-7 here); a data or sharding bug moves
        # parameters by ~lr = 1e-3.
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6,
                                   err_msg=f"leaf {jax.tree_util.keystr(path)}")

    # Metrics are written once (by process 0) and agree.
    s_ref = json.loads((single / "summary.json").read_text())
    s_got = json.loads((multi / "summary.json").read_text())
    assert s_got["eval_loss"] == pytest.approx(s_ref["eval_loss"], rel=1e-5)
    # Accuracy is a count: allow one eval example to flip on a near-tie.
    assert abs(s_got["eval_accuracy"] - s_ref["eval_accuracy"]) <= 1 / 360 + 1e-9
    assert s_got["train_loss"] == pytest.approx(s_ref["train_loss"], rel=1e-5)

    def rows(d):
        return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l]

    r_ref, r_got = rows(single), rows(multi)
    assert [(r["step"], r["split"]) for r in r_got] == [(r["step"], r["split"]) for r in r_ref]
    for a, b in zip(r_ref, r_got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)


@pytest.mark.slow
def test_workdir_lock_stops_every_process(root, tmp_path):
    # This process holds the workdir: process 0 of the two-process run cannot take the
    # lock, and process 1, which never touches the lock file, fails with it.
    from sparsejax.train.workdir import WorkdirLock

    logs, workdir = tmp_path / "logs", tmp_path / "run"
    logs.mkdir()
    with WorkdirLock(workdir):
        files = _run_workers(root, logs, workdir, num_processes=2, local_devices=2,
                             expect_exit=1)
    for err in files[2:]:
        lines = [l for l in err.read_text().splitlines() if not ABSL_NOISE.match(l)]
        assert lines[-1].startswith(f"error: WorkdirLocked: {workdir} is in use by pid "
                                    f"{os.getpid()} on "), _tail(err)
    assert sorted(p.name for p in workdir.iterdir()) == [".lock"]


@pytest.mark.slow
def test_sigterm_to_one_process_checkpoints_all_at_one_step(root, tmp_path):
    # JAX's preemption notifier catches SIGTERM in worker 1; orbax's reached_preemption
    # gives both processes the same step to save at, and both exit resumable (143).
    logs, workdir = tmp_path / "logs", tmp_path / "run"
    logs.mkdir()
    files = _run_workers(root, logs, workdir, num_processes=2, local_devices=2,
                         expect_exit=143, overrides=OVERRIDES[1:] + ["--config.num_steps=100000"],
                         sigterm_when=lambda: (workdir / "metrics.jsonl").exists())
    lines = [[l for l in e.read_text().splitlines() if l.startswith("preempted")][-1]
             for e in files[2:]]
    step = int(re.match(r"preempted \(SIGTERM\) at step (\d+): checkpoint saved", lines[0])[1])
    assert lines[0] == lines[1] and step >= 5
    assert max(int(p.name) for p in (workdir / "checkpoints").iterdir()) == step
