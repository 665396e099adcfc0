"""One command for a GPU machine: GPU tests, kernel tuning, one JSON and one page.

    python -m experiments.gpu_check                     # on one H100/H200: < 8 minutes
    python -m experiments.gpu_check --dry_run           # anywhere: print the plan only
    python -m experiments.gpu_check --dry_run --execute_on_cpu --kernels=nm_matmul

On a GPU it (a) runs the ``gpu``-marked tests with pytest in a subprocess and records
the pass/fail counts, (b) runs every kernel bench (``kernels/<name>/bench.py``) over a
handful of tile / ``num_warps`` / ``num_stages`` configurations, reads each run's JSON
back and keeps the fastest by the kernel's main time metric (geometric mean of the Pallas
variant's ms over the rows the options affect), and (c) writes one JSON
(``--out``, default ``experiments/results/gpu_check.json``) and a Markdown page
(``--md``, default ``docs/results/gpu.md``).

Every stage has a time budget on a fixed schedule (time a stage leaves unused passes to
the next ones), so the whole run ends within ``--total_s`` (480 s): a configuration is
not started when the stage's remaining time is below the longest one run so far, and a
run past the stage's end is killed; both are recorded. Progress is one line per stage;
the subprocesses' output goes to log files (their tails are kept in the JSON on failure).

Without a GPU it stops with a message and exit status 2 and writes nothing, unless
``--dry_run`` (print every command with its budget) or ``--execute_on_cpu`` (run the
test stage and each bench once, at tiny CPU sizes, through the same read-back, selection
and writers: proves the plumbing, says nothing about speed; outputs default to
``experiments/results/gpu_check_cpu.{json,md}``).

This module imports only the standard library: JAX runs in the subprocesses (the parent
must not take GPU memory from them).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
KERNELS_DIR = ROOT / "kernels"
DEFAULT_OUT = "experiments/results/gpu_check.json"
DEFAULT_MD = "docs/results/gpu.md"
CPU_OUT = "experiments/results/gpu_check_cpu.json"
CPU_MD = "experiments/results/gpu_check_cpu.md"
TOTAL_S = 480.0           # the whole run on one H100/H200
PROBE_S = 20.0            # allowance for the device probe before the first stage
MARGIN_S = 20.0           # left at the end for writing the results
MIN_START_S = 20.0        # a stage with less left starts no (further) subprocess
CPU_STAGE_S = 600.0       # --execute_on_cpu: generous, nothing is tuned there
RUNNING_ENV = "SPARSEJAX_GPU_CHECK"    # set in the children: no nested gpu_check
VERSION_PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "flax", "optax",
                    "triton", "jax-triton", "numpy")
PROBE = r"""
import json, sys
out = {}
try:
    import jax
    devs = jax.devices()
    out.update(platform=jax.default_backend(), device_kind=devs[0].device_kind,
               num_devices=len(devs))
    try:
        stats = devs[0].memory_stats() or {}
        out["memory_bytes"] = stats.get("bytes_limit")
    except Exception:
        pass
    import importlib.util
    out["kernels_importable"] = importlib.util.find_spec("sparsejax.kernels") is not None
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
print("GPU_CHECK_PROBE " + json.dumps(out))
"""


# ----------------------------------------------------------------------------- metrics

def geomean(values) -> float:
    """Geometric mean of positive numbers.

    Example:

        >>> from experiments.gpu_check import geomean
        >>> round(geomean([1.0, 4.0]), 6)
        2.0
    """
    values = list(values)
    if not values or min(values) <= 0:
        raise ValueError(f"geomean needs positive numbers, got {values}")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _pick_variant(prefs, groups: dict) -> str:
    """First preferred variant that every group (row) has; ``groups``: key -> variants."""
    if not groups:
        raise ValueError("the JSON holds no timed rows")
    for v in prefs:
        if all(v in have for have in groups.values()):
            return v
    missing = {v: sorted(str(k) for k, have in groups.items() if v not in have) for v in prefs}
    raise ValueError(f"no variant of {list(prefs)} was timed in every row: missing {missing}")


def summarize_block_sparse_attention(data: dict) -> dict:
    """Metric and headline numbers of one ``block_sparse_attention`` bench JSON.

    Metric: geometric mean of the variant's ms over every (seq, mode, mask) it is timed
    at. Headline: its speed-up over the dense baseline at the largest sequence for the
    90%-sparse, dense-mode (0%) and causal masks, forward and forward+backward.
    """
    rows = [r for r in data["results"] if not r["impl"].startswith("dense")]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["seq"], r["mode"], r["mask"]), set()).add(r["impl"])
    variant = _pick_variant(("pallas", "xla_blocks"), groups)
    mine = [r for r in rows if r["impl"] == variant]
    seq = max(r["seq"] for r in mine)
    labels = {"sparsity_90": "90%", "sparsity_0": "0%", "causal": "causal"}
    headline = {f"{r['mode']} {labels[r['mask']]}": r["speedup_vs_dense"]
                for mask in labels for r in mine if r["seq"] == seq and r["mask"] == mask}
    baseline = sorted({r["baseline"] for r in data["results"]})
    return {"variant": variant, "metric_ms": geomean(r["ms"] for r in mine),
            "rows": len(mine), "headline": headline,
            "baseline": f"{'/'.join(baseline)} at seq {seq}"}


def summarize_nm_matmul(data: dict) -> dict:
    """Metric and headline numbers of one ``nm_matmul`` bench JSON.

    Metric: geometric mean of the variant's ms over every (size, N:M pattern). Headline:
    per row count, the geometric mean over patterns of its speed-up vs the dense matmul.
    """
    rows = data["results"]
    groups = {(r["rows"], r["k"], r["out"], r["pattern"]): set(r["ms"]) for r in rows}
    variant = _pick_variant(("pallas", "xla"), groups)
    headline = {}
    for n_rows in sorted({r["rows"] for r in rows}):
        sel = [r for r in rows if r["rows"] == n_rows]
        k, out = sel[0]["k"], sel[0]["out"]
        headline[f"{n_rows}x{k}x{out}"] = geomean(r["speedup_vs_dense"][variant] for r in sel)
    patterns = sorted({r["pattern"] for r in rows})
    return {"variant": variant, "metric_ms": geomean(r["ms"][variant] for r in rows),
            "rows": len(rows), "headline": headline,
            "baseline": f"dense XLA matmul (geomean over {', '.join(patterns)})"}


def summarize_sparse_ffn(data: dict) -> dict:
    """Metric and headline numbers of one ``sparse_ffn`` bench JSON.

    Metric: geometric mean of the variant's ms in the ``gemv`` form (the one the options
    apply to) over the batch sizes. Headline: speed-ups vs each form's dense XLA formula:
    ``gemv``, ``spark`` (the faster selection) and ``topk`` per batch size.
    """
    rows = data["decode"]
    gemv = [r for r in rows if r["form"] == "gemv"]
    variant = _pick_variant(("pallas", "xla"), {r["batch"]: set(r["ms"]) for r in gemv})
    headline = {}
    for r in sorted(rows, key=lambda r: (r["batch"], r["form"])):
        names = ([f"{variant}/topk", f"{variant}/nonzero"] if r["form"] == "spark"
                 else [variant])
        got = [r["speedup"][n] for n in names if n in r["speedup"]]
        if got:
            headline[f"{r['form']} B={r['batch']}"] = max(got)
    return {"variant": variant, "metric_ms": geomean(r["ms"][variant] for r in gemv),
            "rows": len(gemv), "headline": headline,
            "baseline": f"dense XLA formulas, d_model {gemv[0]['d_model']}"}


# ----------------------------------------------------------------------------- the plan

@dataclass(frozen=True)
class KernelPlan:
    """How one kernel's bench is searched: the options tried (the first is the bench's
    defaults), the fixed arguments on GPU and for the CPU plumbing run, the stage budget
    and the function reading one run's JSON into ``summarize_*``'s dict."""

    name: str
    configs: tuple[dict, ...]
    gpu_args: tuple[str, ...]
    cpu_args: tuple[str, ...]
    budget_s: float
    summarize: Callable[[dict], dict]
    variants: tuple[str, ...]          # metric variants, preferred first
    metric: str = field(default="")

    @property
    def module(self) -> str:
        return f"sparsejax.kernels.{self.name}.bench"


PLANS: dict[str, KernelPlan] = {p.name: p for p in (
    KernelPlan(
        "block_sparse_attention",
        configs=({}, {"num_warps": 4}, {"num_stages": 3}, {"block_q": 64, "block_k": 64},
                 {"block_q": 128, "block_k": 128}, {"block_q": 64, "block_k": 64,
                                                    "num_warps": 4}),
        gpu_args=("--seqs=4096", "--repeats=3", "--pallas_only"),
        cpu_args=("--quick", "--seqs=256", "--heads=1", "--head_dim=64", "--repeats=1"),
        budget_s=125.0, summarize=summarize_block_sparse_attention,
        variants=("pallas", "xla_blocks"),
        metric="geomean ms of Pallas over 4 masks x (fwd, fwd+bwd), B=1, H=16, D=128, "
               "seq 4096, bf16"),
    KernelPlan(
        "nm_matmul",
        configs=({}, {"num_warps": 8}, {"num_stages": 4}, {"num_stages": 2},
                 {"block_n": 128, "block_k": 64}, {"block_n": 64, "block_k": 128}),
        gpu_args=("--repeats=3", "--gather_limit=0"),
        cpu_args=("--quick", "--patterns=2:4", "--repeats=1", "--gather_limit=0"),
        budget_s=90.0, summarize=summarize_nm_matmul, variants=("pallas", "xla"),
        metric="geomean ms of Pallas over 3 sizes (16/128/4096 rows, 4096x4096) x 3 N:M "
               "patterns, bf16; block_m stays per shape"),
    KernelPlan(
        "sparse_ffn",
        configs=({}, {"num_warps": 8}, {"units_per_step": 32}, {"block_cols": 512},
                 {"col_splits": 2}, {"units_per_step": 8, "num_warps": 2}),
        gpu_args=("--skip_train", "--repeats=3"),
        cpu_args=("--quick", "--d_model=256", "--skip_train", "--repeats=1"),
        budget_s=75.0, summarize=summarize_sparse_ffn, variants=("pallas", "xla"),
        metric="geomean ms of the Pallas gather-GEMV (gemv form) at B=1 and B=8, "
               "d_model 2048, 8% of 8192 units, bf16"),
)}
TESTS_BUDGET_S = 150.0


def discover_benches(kernels_dir: Path = KERNELS_DIR) -> list[str]:
    """Names of the kernel folders that hold a ``bench.py``.

    Example:

        >>> from experiments.gpu_check import PLANS, discover_benches
        >>> sorted(discover_benches()) == sorted(PLANS)     # every bench has a plan
        True
    """
    return sorted(p.parent.name for p in kernels_dir.glob("*/bench.py"))


def gpu_test_files(root: Path = ROOT) -> list[str]:
    """Test files (relative paths) that hold ``gpu``-marked tests, this module's own
    test file left out (its GPU test runs this command)."""
    out = []
    for p in sorted((root / "tests").rglob("test_*.py")):
        if p.name != "test_gpu_check.py" and "mark.gpu" in p.read_text(errors="replace"):
            out.append(p.relative_to(root).as_posix())
    return out


def config_args(options: dict) -> list[str]:
    """``{"block_q": 64}`` -> ``["--block_q=64"]``.

    Example:

        >>> from experiments.gpu_check import config_args
        >>> config_args({"block_q": 64, "num_warps": 4})
        ['--block_q=64', '--num_warps=4']
    """
    return [f"--{k}={v}" for k, v in options.items()]


def config_label(options: dict) -> str:
    return " ".join(config_args(options)) or "bench defaults"


@dataclass
class Stage:
    """One stage of the schedule: ``end_s`` is seconds after the start."""

    name: str
    budget_s: float
    end_s: float
    commands: list[list[str]]
    options: list[dict]
    metric: str = ""


def build_schedule(kernels: list[str], *, tests: bool, cpu: bool, total_s: float,
                   max_configs: int | None, raw_dir: str, python: str,
                   platforms: str) -> list[Stage]:
    """The stages with their budgets, end times and commands (argv lists).

    GPU budgets are scaled so that probe allowance + stages + margin = ``total_s``.
    """
    names = (["tests"] if tests else []) + kernels
    if cpu:
        budgets = {n: CPU_STAGE_S for n in names}
    else:
        base = {"tests": TESTS_BUDGET_S, **{k: PLANS[k].budget_s for k in PLANS}}
        room = total_s - PROBE_S - MARGIN_S
        full = sum(base[n] for n in names)
        if room < MIN_START_S * max(1, len(names)):
            raise ValueError(f"--total_s={total_s:g} leaves {room:g} s for {len(names)} "
                             f"stages; give at least "
                             f"{PROBE_S + MARGIN_S + MIN_START_S * len(names):g}")
        budgets = {n: base[n] * room / full for n in names}
    stages, end = [], PROBE_S
    for n in names:
        end += budgets[n]
        if n == "tests":
            junit = f"{raw_dir}/tests_junit.xml"
            cmd = [python, "-m", "pytest", "-v", "-m", "gpu", "-p", "no:cacheprovider",
                   f"--junitxml={junit}", *gpu_test_files()]
            stages.append(Stage(n, budgets[n], end, [cmd], [{}], "pytest counts"))
            continue
        plan = PLANS[n]
        configs = list(plan.configs[:1] if cpu else plan.configs)
        if max_configs is not None:
            configs = configs[:max_configs]
        fixed = list(plan.cpu_args if cpu else plan.gpu_args)
        cmds = [[python, "-m", plan.module, *fixed, *config_args(o),
                 f"--out={raw_dir}/{n}_{i}.json"] for i, o in enumerate(configs)]
        metric = ("CPU plumbing: geomean ms of the first timed variant of "
                  f"{list(plan.variants)} at tiny sizes (no tuning)" if cpu else plan.metric)
        stages.append(Stage(n, budgets[n], end, cmds, configs, metric))
    return stages


def show(cmd: list[str], platforms: str) -> str:
    """A command as one shell line, with the environment it runs under."""
    argv = [Path(cmd[0]).name if cmd[0] == sys.executable else cmd[0], *cmd[1:]]
    return f"JAX_PLATFORMS={platforms} " + shlex.join(argv)


def print_plan(stages: list[Stage], *, platforms: str, out: str, md: str | None,
               total_s: float, cpu: bool) -> None:
    where = "CPU plumbing run" if cpu else f"one GPU, total budget {total_s:g} s"
    print(f"gpu_check plan ({where}); device probe first (<= {PROBE_S:g} s of the budget):")
    for st in stages:
        extra = "" if st.name == "tests" else f", metric: {st.metric}"
        print(f"[{st.name}] budget {st.budget_s:.0f} s, ends by t+{st.end_s:.0f} s, "
              f"{len(st.commands)} command(s){extra}")
        for cmd in st.commands:
            print("  " + show(cmd, platforms))
    print(f"outputs: {out}" + (f", {md}" if md else ""))


# ----------------------------------------------------------------------------- running

def _run(cmd: list[str], log: Path, timeout_s: float, env: dict) -> tuple[int | None, float]:
    """Runs ``cmd`` in its own process group with output to ``log``; on timeout kills
    that group. Returns (exit status or None on timeout, seconds)."""
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            rc = None
    return rc, time.monotonic() - t0


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def probe_device(platforms: str, timeout_s: float = 60.0) -> dict:
    """What JAX sees under ``JAX_PLATFORMS=platforms``, asked in a subprocess (so this
    process never holds GPU memory). ``error`` is set when no such device is usable."""
    env = {**os.environ, "JAX_PLATFORMS": platforms}
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, text=True,
                              capture_output=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"the device probe took over {timeout_s:g} s"}
    line = [l for l in proc.stdout.splitlines() if l.startswith("GPU_CHECK_PROBE ")]
    if not line:
        return {"error": f"the device probe failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip()[-1500:]}"}
    info = json.loads(line[-1].split(" ", 1)[1])
    if "error" not in info and platforms != "cpu" and info.get("platform") == "cpu":
        info["error"] = f"JAX_PLATFORMS={platforms} gave a CPU backend"
    if "error" in info and platforms != "cpu":
        hints = []
        if not any(_installed(n) for n in ("jax-cuda12-plugin", "jax-cuda13-plugin",
                                           "jax-rocm60-plugin", "jax-rocm7-plugin")):
            hints.append("no GPU plugin for jax is installed (jax-cuda12-plugin)")
        if shutil.which("nvidia-smi") is None:
            hints.append("nvidia-smi is not on PATH (no NVIDIA driver?)")
        info["error"] = "; ".join([f"jax could not start a '{platforms}' backend "
                                   f"({info['error']})", *hints])
    smi = shutil.which("nvidia-smi")
    if smi and platforms != "cpu":
        try:
            q = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total",
                                "--format=csv,noheader"], capture_output=True, text=True,
                               timeout=30)
            info["nvidia_smi"] = q.stdout.strip().splitlines()
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def _installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def versions() -> dict:
    """Installed versions of the packages that matter here (None: not installed)."""
    out = {"python": platform.python_version()}
    for name in VERSION_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, text=True, capture_output=True,
                               timeout=10).stdout.strip()
        return {"commit": head or None, "dirty": bool(dirty)}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def parse_pytest(junit: Path, log: Path) -> dict:
    """Counts from pytest's JUnit XML, or from its ``-v`` lines when there is none (a
    killed run); ``failed_tests`` names the failures and errors."""
    if junit.exists():
        try:
            root = ET.parse(junit).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            failed_names = []
            for case in suite.iter("testcase"):
                if case.find("failure") is not None or case.find("error") is not None:
                    failed_names.append(f"{case.get('classname')}::{case.get('name')}")
            n = int(suite.get("tests", 0))
            failures, errors = int(suite.get("failures", 0)), int(suite.get("errors", 0))
            skipped = int(suite.get("skipped", 0))
            return {"passed": n - failures - errors - skipped, "failed": failures,
                    "errors": errors, "skipped": skipped, "total": n,
                    "failed_tests": failed_names, "source": "junit"}
        except (ET.ParseError, AttributeError, ValueError):
            pass
    counts = {"PASSED": 0, "FAILED": 0, "ERROR": 0, "SKIPPED": 0, "XFAIL": 0, "XPASS": 0}
    failed_names = []
    text = log.read_text(errors="replace") if log.exists() else ""
    for m in re.finditer(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", text,
                         flags=re.M):
        counts[m.group(2)] += 1
        if m.group(2) in ("FAILED", "ERROR"):
            failed_names.append(m.group(1))
    passed = counts["PASSED"] + counts["XFAIL"] + counts["XPASS"]
    return {"passed": passed, "failed": counts["FAILED"], "errors": counts["ERROR"],
            "skipped": counts["SKIPPED"], "total": passed + sum(
                counts[k] for k in ("FAILED", "ERROR", "SKIPPED")),
            "failed_tests": failed_names, "source": "log"}


def select_best(name: str, runs: list[dict]) -> dict | None:
    """The run with the lowest metric among those timed with the most preferred variant
    any run reached (a run whose Pallas variant is missing in some row is never compared
    with complete ones); ``None`` when no run succeeded. Ties go to the earlier run.

    Example:

        >>> from experiments.gpu_check import select_best
        >>> runs = [{"status": "ok", "summary": {"variant": "pallas", "metric_ms": 2.0}},
        ...         {"status": "ok", "summary": {"variant": "xla", "metric_ms": 0.5}},
        ...         {"status": "ok", "summary": {"variant": "pallas", "metric_ms": 1.5}},
        ...         {"status": "failed", "summary": None}]
        >>> select_best("nm_matmul", runs) is runs[2]
        True
    """
    prefs = PLANS[name].variants
    ok = [r for r in runs if r.get("status") == "ok" and r.get("summary")]
    if not ok:
        return None
    rank = min(prefs.index(r["summary"]["variant"]) for r in ok)
    pool = [r for r in ok if prefs.index(r["summary"]["variant"]) == rank]
    return min(pool, key=lambda r: r["summary"]["metric_ms"])


def run_tests_stage(stage: Stage, deadline: float, env: dict, raw: Path) -> dict:
    cmd = stage.commands[0]
    junit = Path(next(a for a in cmd if a.startswith("--junitxml=")).split("=", 1)[1])
    log = raw / "tests.log"
    files = [a for a in cmd[3:] if a.endswith(".py")]
    out = {"command": cmd, "files": files, "budget_s": round(stage.budget_s, 1)}
    left = deadline - time.monotonic()
    if not files:
        return {**out, "status": "no tests", "note": "no test file holds a gpu mark"}
    if left < MIN_START_S:
        return {**out, "status": "skipped", "note": f"only {left:.0f} s left"}
    junit.unlink(missing_ok=True)
    rc, dt = _run(cmd, log, left, env)
    res = parse_pytest(junit, log)
    status = ("timeout" if rc is None else "ok" if rc == 0 else
              "no tests" if rc == 5 else "failed")
    out.update(res, status=status, exit_code=rc, duration_s=round(dt, 1))
    if status != "ok":
        out["log_tail"] = _tail(log)
    return out


def run_kernel_stage(stage: Stage, deadline: float, env: dict, raw: Path) -> dict:
    plan = PLANS[stage.name]
    runs, longest = [], 0.0
    t_stage = time.monotonic()
    for i, (cmd, options) in enumerate(zip(stage.commands, stage.options)):
        run = {"index": i, "options": options, "label": config_label(options),
               "command": cmd, "summary": None}
        runs.append(run)
        left = deadline - time.monotonic()
        if left < max(MIN_START_S, longest):
            run.update(status="skipped", note=f"stage budget spent: {left:.0f} s left, "
                       f"longest config so far {longest:.0f} s")
            continue
        if any(r["status"] == "timeout" for r in runs[:-1]):
            run.update(status="skipped", note="an earlier config ran out of time")
            continue
        json_path = Path(cmd[-1].split("=", 1)[1])
        json_path.unlink(missing_ok=True)           # a kept --raw_dir: never read stale JSON
        log = raw / f"{stage.name}_{i}.log"
        rc, dt = _run(cmd, log, left, env)
        longest = max(longest, dt)
        run["duration_s"] = round(dt, 1)
        if rc is None:
            run.update(status="timeout", note=f"killed at the stage's end ({dt:.0f} s)",
                       log_tail=_tail(log))
            continue
        if rc != 0:
            tail = _tail(log)
            last = [l for l in tail.splitlines() if l.strip()][-1:] or [""]
            run.update(status="failed", exit_code=rc, note=f"exit {rc}: {last[0][:160]}",
                       log_tail=tail)
            continue
        try:
            data = json.loads(json_path.read_text())
            run["summary"] = plan.summarize(data)
            run["status"] = "ok"
            run["_data"] = data
        except (OSError, ValueError, KeyError, TypeError) as e:
            run.update(status="failed", note=f"reading {json_path.name}: "
                       f"{type(e).__name__}: {e}", log_tail=_tail(log))
    best = select_best(stage.name, runs)
    default = runs[0] if runs and runs[0]["status"] == "ok" else None
    out = {"budget_s": round(stage.budget_s, 1), "metric": stage.metric,
           "duration_s": round(time.monotonic() - t_stage, 1), "configs": runs,
           "best": None, "best_json": None}
    if best is not None:
        out["best"] = {"index": best["index"], "options": best["options"],
                       "label": best["label"], **best["summary"]}
        if default is not None and default["summary"]["variant"] == best["summary"][
                "variant"]:
            out["best"]["speedup_vs_defaults"] = (default["summary"]["metric_ms"]
                                                  / best["summary"]["metric_ms"])
        out["best_json"] = best["_data"]
    for r in runs:
        r.pop("_data", None)
    return out


# ----------------------------------------------------------------------------- writing

def _fmt_versions(v: dict) -> str:
    names = ["jax", "jaxlib", "jax-cuda12-plugin", "flax", "optax", "triton", "jax-triton"]
    return ", ".join(f"{n} {v.get(n) or 'not installed'}" for n in names)


def render_markdown(result: dict) -> str:
    """The results page for a ``gpu_check`` result dict (or a planned one).

    Example:

        >>> from experiments.gpu_check import render_markdown
        >>> page = render_markdown({"mode": "planned", "commands": ["python -m x"],
        ...                         "invocation": "python -m experiments.gpu_check"})
        >>> page.splitlines()[0]
        '# GPU check: GPU tests and kernel tuning'
    """
    lines = ["# GPU check: GPU tests and kernel tuning", "",
             "Made by (from the repository root, on a machine with one NVIDIA GPU):", "",
             "```bash", result.get("invocation", "python -m experiments.gpu_check"), "```",
             ""]
    mode = result.get("mode")
    if mode == "planned":
        lines += ["_Not run on a GPU yet._ `python -m experiments.gpu_check --dry_run` "
                  "prints the plan below with its time budgets; a GPU run replaces this "
                  "page with the test counts and the best configuration of every kernel. "
                  "`$RAW` is a temporary folder (`--raw_dir` keeps it).",
                  "", "## Commands it runs", "", "```bash", *result.get("commands", []),
                  "```", ""]
        return "\n".join(lines)
    dev, ver = result.get("device", {}), result.get("versions", {})
    git = result.get("git", {})
    smi = "; ".join(dev.get("nvidia_smi") or [])
    dirty = " (with uncommitted changes)" if git.get("dirty") else ""
    lines += [f"Machine: {dev.get('device_kind', '?')} ({dev.get('num_devices', '?')} "
              f"device(s), platform {dev.get('platform', '?')})"
              + (f", nvidia-smi: {smi}" if smi else "")
              + f"; Python {ver.get('python', '?')}; {_fmt_versions(ver)}; git "
              f"{git.get('commit') or '?'}{dirty}."
              f" Run on {result.get('started', '?')}: {result.get('wall_s', 0):.0f} s"
              + (" (CPU plumbing run: no GPU timings, nothing tuned)" if mode == "cpu" else
                 f" of the {result.get('total_budget_s', 0):.0f} s budget") + ".", ""]
    t = result.get("tests")
    lines += ["## Tests", ""]
    if t is None:
        lines += ["Not run (`--skip_tests`).", ""]
    else:
        counts = (f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                  f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped")
        lines += [f"`gpu`-marked tests ({len(t.get('files', []))} files): **{counts}** "
                  f"(status {t.get('status')}, {t.get('duration_s', 0):.0f} s of a "
                  f"{t.get('budget_s', 0):.0f} s budget).", ""]
        for name in t.get("failed_tests", []):
            lines.append(f"- failed: `{name}`")
        if t.get("failed_tests"):
            lines.append("")
    lines += ["## Best configuration per kernel", "",
              "Metric: geometric mean of the kernel variant's ms over the rows its options "
              "affect (below each kernel); lower is better. \"vs defaults\": the bench "
              "defaults' metric / the best's. Speed-ups: the best configuration's, "
              "over the dense baseline named.", "",
              "| kernel | best configuration | variant | metric (ms) | vs defaults | "
              "configs ok / run / planned | speed-ups vs dense |",
              "| --- | --- | --- | ---: | ---: | --- | --- |"]
    for name, k in result.get("kernels", {}).items():
        runs = k["configs"]
        n_ok = sum(r["status"] == "ok" for r in runs)
        n_run = sum(r["status"] != "skipped" for r in runs)
        b = k.get("best")
        if b is None:
            lines.append(f"| {name} | none succeeded | | | | {n_ok} / {n_run} / {len(runs)} "
                         f"| |")
            continue
        vs = f"{b['speedup_vs_defaults']:.2f}x" if "speedup_vs_defaults" in b else "n/a"
        heads = ", ".join(f"{lab} {v:.2f}x" for lab, v in b["headline"].items())
        lines.append(f"| {name} | `{b['label']}` | {b['variant']} | {b['metric_ms']:.4g} | "
                     f"{vs} | {n_ok} / {n_run} / {len(runs)} | {heads} (vs {b['baseline']}) |")
    lines += ["", "## Every configuration", ""]
    for name, k in result.get("kernels", {}).items():
        lines += [f"### {name}", "", f"Metric: {k['metric']}. Stage budget "
                  f"{k['budget_s']:.0f} s, used {k['duration_s']:.0f} s.", "",
                  "| # | options | status | time (s) | variant | metric (ms) | note |",
                  "| ---: | --- | --- | ---: | --- | ---: | --- |"]
        for r in k["configs"]:
            s = r.get("summary") or {}
            ms = f"{s['metric_ms']:.4g}" if s else ""
            note = (r.get("note") or (f"exit {r['exit_code']}" if "exit_code" in r else ""))
            note = note.replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['index']} | `{r['label']}` | {r['status']} | "
                         f"{r.get('duration_s', '')} | {s.get('variant', '')} | {ms} | "
                         f"{note} |")
        lines.append("")
    lines += ["## Commands run", "", "```bash", *result.get("commands", []), "```", ""]
    return "\n".join(lines)


def planned_page() -> str:
    """The page committed before any GPU run: the default GPU plan's commands, budgets.

    Example:

        >>> from experiments.gpu_check import planned_page
        >>> "_Not run on a GPU yet._" in planned_page()
        True
    """
    stages = build_schedule(list(PLANS), tests=True, cpu=False, total_s=TOTAL_S,
                            max_configs=None, raw_dir="$RAW", python="python",
                            platforms="cuda")
    commands = []
    for st in stages:
        commands.append(f"# {st.name}: budget {st.budget_s:.0f} s, ends by t+{st.end_s:.0f} s"
                        + (f"; metric: {st.metric}" if st.name != "tests" else ""))
        commands += [show(c, "cuda") for c in st.commands]
    return render_markdown({"mode": "planned", "commands": commands,
                            "invocation": "python -m experiments.gpu_check"})


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m experiments.gpu_check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dry_run", action="store_true",
                   help="print every command with its budget; run nothing")
    p.add_argument("--execute_on_cpu", action="store_true",
                   help="run the test stage and each bench once at tiny sizes on CPU "
                        "(plumbing only, no tuning)")
    p.add_argument("--out", default=None, help=f"result JSON ({DEFAULT_OUT}; CPU {CPU_OUT})")
    p.add_argument("--md", default=None, help=f"Markdown page ({DEFAULT_MD}; CPU {CPU_MD})")
    p.add_argument("--kernels", default=",".join(PLANS),
                   help="comma list of kernels to bench (default: all)")
    p.add_argument("--skip_tests", action="store_true", help="leave the GPU tests out")
    p.add_argument("--total_s", type=float, default=TOTAL_S,
                   help="time budget of the whole GPU run (stages scale with it)")
    p.add_argument("--max_configs", type=int, default=None,
                   help="try at most this many configurations per kernel")
    p.add_argument("--platform", default="cuda",
                   help="JAX_PLATFORMS for the GPU run's subprocesses (cuda; rocm)")
    p.add_argument("--raw_dir", default=None,
                   help="keep every run's JSON and log here (default: a temporary folder)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    t0 = time.monotonic()
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cpu = args.execute_on_cpu
    kernels = [k for k in args.kernels.split(",") if k]
    unknown = [k for k in kernels if k not in PLANS]
    if unknown:
        print(f"gpu_check: unknown kernel(s) {unknown}; planned: {list(PLANS)}",
              file=sys.stderr)
        return 2
    unplanned = sorted(set(discover_benches()) - set(PLANS))
    if unplanned:
        print(f"gpu_check: warning: kernel bench(es) without a plan (add them to "
              f"experiments/gpu_check.py PLANS): {unplanned}", file=sys.stderr)
    platforms = "cpu" if cpu else args.platform
    out = Path(args.out or (CPU_OUT if cpu else DEFAULT_OUT))
    md = Path(args.md or (CPU_MD if cpu else DEFAULT_MD))
    plan_only = args.dry_run and not cpu
    tmp = None if args.raw_dir or plan_only else tempfile.TemporaryDirectory(
        prefix="gpu_check_")
    raw = Path(args.raw_dir).resolve() if args.raw_dir else Path(tmp.name) if tmp else None
    try:
        try:
            stages = build_schedule(kernels, tests=not args.skip_tests, cpu=cpu,
                                    total_s=args.total_s, max_configs=args.max_configs,
                                    raw_dir=str(raw) if raw else "$RAW",
                                    python=sys.executable, platforms=platforms)
        except ValueError as e:
            print(f"gpu_check: {e}", file=sys.stderr)
            return 2
        if args.dry_run:
            print_plan(stages, platforms=platforms, out=str(out), md=str(md),
                       total_s=args.total_s, cpu=cpu)
        if plan_only:
            return 0
        return _execute(args, argv, stages, t0, started, cpu, platforms, out, md, raw)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _execute(args, argv, stages, t0, started, cpu, platforms, out, md, raw) -> int:
    device = probe_device(platforms)
    if "error" in device:
        print(f"gpu_check: no usable GPU (JAX_PLATFORMS={platforms}): {device['error']}\n"
              "gpu_check: run it on a machine with an NVIDIA GPU and CUDA jax "
              "(pip install -e \".[gpu,test]\"), or pass --dry_run to print the plan "
              "(--execute_on_cpu to run the plumbing on CPU). Nothing was written.",
              file=sys.stderr)
        return 2
    if not device.get("kernels_importable", True):
        print("gpu_check: sparsejax.kernels is not importable: install the checkout "
              "(pip install -e \".[gpu,test]\"). Nothing was written.", file=sys.stderr)
        return 2
    raw.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JAX_PLATFORMS": platforms, RUNNING_ENV: "1"}
    print(f"gpu_check: {device.get('device_kind')} x{device.get('num_devices')} "
          f"({device.get('platform')}); "
          + ("CPU plumbing run" if cpu else f"budget {args.total_s:g} s"), flush=True)
    result = {"schema": 1, "mode": "cpu" if cpu else "gpu", "started": started,
              "invocation": shlex.join(["python", "-m", "experiments.gpu_check", *argv]),
              "total_budget_s": None if cpu else args.total_s, "device": device,
              "versions": versions(),
              "host": platform.node(), "git": _git(), "env": {"JAX_PLATFORMS": platforms},
              "tests": None, "kernels": {}, "commands": []}
    n = len(stages)
    for i, st in enumerate(stages, 1):
        deadline = t0 + st.end_s
        print(f"[{i}/{n}] {st.name}: ", end="", flush=True)
        if st.name == "tests":
            t = run_tests_stage(st, deadline, env, raw)
            result["tests"] = t
            print(f"{t.get('passed', 0)} passed, {t.get('failed', 0)} failed, "
                  f"{t.get('errors', 0)} errors, {t.get('skipped', 0)} skipped "
                  f"({t['status']}, {t.get('duration_s', 0):.0f} s of {st.budget_s:.0f})",
                  flush=True)
            continue
        k = run_kernel_stage(st, deadline, env, raw)
        result["kernels"][st.name] = k
        counts = {}
        for r in k["configs"]:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        tally = ", ".join(f"{v} {s}" for s, v in counts.items())
        b = k["best"]
        best = ("no config succeeded" if b is None else
                f"best {b['label']}: {b['variant']} {b['metric_ms']:.4g} ms"
                + (f" ({b['speedup_vs_defaults']:.2f}x vs defaults)"
                   if "speedup_vs_defaults" in b else ""))
        print(f"{tally}; {best} ({k['duration_s']:.0f} s of {st.budget_s:.0f})", flush=True)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    ran = ([result["tests"]] if result["tests"] and "exit_code" in result["tests"] else [])
    ran += [r for k in result["kernels"].values() for r in k["configs"]
            if r["status"] != "skipped"]
    result["commands"] = [show(r["command"], platforms) for r in ran]
    tests_ok = result["tests"] is None or result["tests"]["status"] == "ok"
    # On GPU a kernel counts only if its best run timed the kernel itself (Pallas).
    kernels_ok = all(k["best"] is not None and (cpu or k["best"]["variant"]
                                                == PLANS[name].variants[0])
                     for name, k in result["kernels"].items())
    result["status"] = "ok" if tests_ok and kernels_ok else "failed"
    _write(out, json.dumps(result, indent=2) + "\n")
    _write(md, render_markdown(result))
    print(f"gpu_check: {result['status']} in {result['wall_s']:.0f} s; wrote {out} and {md}")
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
