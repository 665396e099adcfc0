"""``python -m experiments.gpu_check``: the plan, the no-GPU error, read-back, selection,
budgets and the page, on CPU in seconds; the real run is the one ``gpu`` test."""

from __future__ import annotations

import doctest
import importlib
import json
import os
import subprocess
import sys

import pytest

from experiments import gpu_check as gc


def _nm_json(pallas_ms, xla_ms=(5.0, 6.0), skip_pallas_at=None) -> dict:
    """A hand-written nm_matmul bench JSON: two sizes, one pattern, dense at 4 and 8 ms."""
    rows = []
    for i, (n_rows, dense) in enumerate([(16, 4.0), (4096, 8.0)]):
        ms = {"dense": dense, "xla": xla_ms[i]}
        if i != skip_pallas_at:
            ms["pallas"] = pallas_ms[i]
        rows.append({"rows": n_rows, "k": 4096, "out": 4096, "pattern": "2:4", "ms": ms,
                     "speedup_vs_dense": {v: dense / t for v, t in ms.items()}})
    return {"device": "NVIDIA H100 80GB HBM3", "results": rows}


def _ok(index, data, name="nm_matmul"):
    return {"index": index, "status": "ok", "summary": gc.PLANS[name].summarize(data)}


# ----------------------------------------------------------------------------- the plan

def test_every_kernel_bench_has_a_plan_and_nothing_else(root):
    benches = sorted(p.parent.name for p in (root / "kernels").glob("*/bench.py"))
    assert len(benches) >= 3
    assert sorted(gc.PLANS) == benches, "add the new kernel's search to gpu_check.PLANS"
    assert gc.discover_benches() == benches


@pytest.mark.parametrize("name", sorted(gc.PLANS))
def test_plan_starts_from_the_defaults_and_its_flags_exist_in_the_bench(name, capsys):
    plan = gc.PLANS[name]
    assert plan.configs[0] == {} and 3 <= len(plan.configs) <= 8
    assert len({json.dumps(c, sort_keys=True) for c in plan.configs}) == len(plan.configs)
    bench = importlib.import_module(plan.module)
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    help_text = capsys.readouterr().out
    flags = {a.split("=")[0] for a in plan.gpu_args + plan.cpu_args}
    flags |= {f"--{k}" for c in plan.configs for k in c}
    missing = sorted(f for f in flags if f not in help_text)
    assert not missing, f"{plan.module} has no {missing}"


def test_budgets_fit_the_total_and_scale_with_it():
    for total in (480.0, 300.0):
        stages = gc.build_schedule(list(gc.PLANS), tests=True, cpu=False, total_s=total,
                                   max_configs=None, raw_dir="/r", python="python",
                                   platforms="cuda")
        assert [s.name for s in stages] == ["tests", *gc.PLANS]
        assert stages[-1].end_s + gc.MARGIN_S == pytest.approx(total)
        assert all(s.budget_s >= gc.MIN_START_S for s in stages)
    with pytest.raises(ValueError, match="total_s"):
        gc.build_schedule(list(gc.PLANS), tests=True, cpu=False, total_s=60.0,
                          max_configs=None, raw_dir="/r", python="python", platforms="cuda")


def test_dry_run_exits_0_and_lists_every_command(root):
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--dry_run"],
                          cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    test_cmds = [l for l in lines if " -m pytest " in l]
    assert len(test_cmds) == 1 and "-m gpu" in test_cmds[0]
    assert "test_gpu_check.py" not in test_cmds[0]       # its gpu test runs this command
    assert "tests/kernels/test_nm_matmul.py" in test_cmds[0]
    for name, plan in gc.PLANS.items():
        cmds = [l for l in lines if f"-m {plan.module} " in l]
        assert len(cmds) == len(plan.configs), name
        assert all(l.startswith("  JAX_PLATFORMS=cuda ") for l in cmds)
        assert any(l.startswith(f"[{name}] budget ") for l in lines)
    assert "total budget 480 s" in lines[0]


def test_the_module_imports_no_jax(root):
    probe = ("import sys, experiments.gpu_check; print(sorted(m for m in sys.modules "
             "if m.split('.')[0] in ('jax', 'jaxlib', 'sparsejax', 'flax', 'triton')))")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_no_gpu_fails_clearly_and_writes_nothing(tmp_path, capsys):
    if "error" not in gc.probe_device("cuda"):
        pytest.skip("this machine has a GPU")
    out = tmp_path / "out"
    rc = gc.main([f"--out={out}/r.json", f"--md={out}/r.md", f"--raw_dir={out}/raw"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "no usable GPU" in err and "--dry_run" in err and "Nothing was written" in err
    assert not out.exists()


def test_committed_page_is_the_plan_or_a_gpu_result(root):
    page = (root / "docs" / "results" / "gpu.md").read_text()
    if "_Not run on a GPU yet._" in page:
        assert page == gc.planned_page(), ("regenerate: python -c 'from experiments."
                                           "gpu_check import planned_page; ...'")
    else:
        assert "## Best configuration per kernel" in page and "cpu (" not in page


def test_module_examples_run():
    result = doctest.testmod(gc, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 5 and result.failed == 0


# ----------------------------------------------------------------------------- read-back

def test_best_config_is_the_fastest_complete_one():
    runs = [_ok(0, _nm_json((2.0, 8.0))),                      # defaults: geomean 4 ms
            _ok(1, _nm_json((1.0, 4.0))),                      # best: geomean 2 ms
            _ok(2, _nm_json((0.5, 1.0), (0.1, 0.2), skip_pallas_at=1)),  # faster, no pallas
            {"index": 3, "status": "failed", "summary": None},
            _ok(4, _nm_json((1.0, 5.0)))]
    assert runs[2]["summary"]["variant"] == "xla"           # fell back: not comparable
    best = gc.select_best("nm_matmul", runs)
    assert best["index"] == 1
    assert best["summary"]["metric_ms"] == pytest.approx(2.0)
    assert best["summary"]["headline"] == {"16x4096x4096": pytest.approx(4.0),
                                           "4096x4096x4096": pytest.approx(2.0)}
    assert gc.select_best("nm_matmul", [runs[3]]) is None


def test_summaries_of_attention_and_ffn_jsons():
    def bsa_row(seq, mode, impl, mask, ms):
        return {"seq": seq, "mode": mode, "impl": impl, "mask": mask, "ms": ms,
                "baseline": "dense_cudnn", "speedup_vs_dense": 10.0 / ms}
    rows = [bsa_row(4096, m, "dense_cudnn", "dense", 10.0) for m in ("fwd", "fwd+bwd")]
    for mode in ("fwd", "fwd+bwd"):
        for mask, ms in (("sparsity_0", 8.0), ("sparsity_90", 2.0), ("causal", 4.0)):
            rows.append(bsa_row(4096, mode, "pallas", mask, ms))
            rows.append(bsa_row(4096, mode, "xla_blocks", mask, 100.0))
    s = gc.summarize_block_sparse_attention({"results": rows})
    assert s["variant"] == "pallas" and s["rows"] == 6
    assert s["metric_ms"] == pytest.approx(4.0)              # geomean of 8, 2, 4
    assert s["headline"]["fwd 90%"] == pytest.approx(5.0)
    assert s["headline"]["fwd+bwd 0%"] == pytest.approx(1.25)

    def ffn_row(form, b, ms):
        names = ["pallas/topk", "pallas/nonzero"] if form == "spark" else ["pallas"]
        ms = {"dense": 1.0, **{n: ms for n in names}}
        return {"form": form, "batch": b, "d_model": 2048, "ms": ms,
                "speedup": {n: 1.0 / t for n, t in ms.items()}}
    ffn = {"decode": [ffn_row("gemv", 1, 0.25), ffn_row("spark", 1, 0.5),
                      ffn_row("gemv", 8, 1.0)]}
    s = gc.summarize_sparse_ffn(ffn)
    assert s["variant"] == "pallas" and s["metric_ms"] == pytest.approx(0.5)
    assert s["headline"] == {"gemv B=1": pytest.approx(4.0), "spark B=1": pytest.approx(2.0),
                             "gemv B=8": pytest.approx(1.0)}


def _fake_stage(tmp_path, name, scripts, end_in_s):
    """A kernel stage whose 'bench' commands are tiny Python scripts writing fake JSON."""
    cmds = [[sys.executable, "-c", code, f"--out={tmp_path}/{name}_{i}.json"]
            for i, code in enumerate(scripts)]
    stage = gc.Stage(name, end_in_s, end_in_s, cmds, [{}] + [{"num_warps": 8}] *
                     (len(cmds) - 1), "fake")
    return stage


def _writer(pallas_ms, sleep=0.0):
    data = json.dumps(_nm_json(pallas_ms))
    return (f"import json, sys, time; time.sleep({sleep}); "
            f"open(sys.argv[1].split('=', 1)[1], 'w').write({data!r})")


def test_stage_reads_each_json_back_and_skips_configs_past_its_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "MIN_START_S", 0.05)
    import time
    scripts = [_writer((2.0, 8.0)), "import sys; sys.exit(3)", _writer((1.0, 4.0), 2.0),
               _writer((0.1, 0.1))]
    stage = _fake_stage(tmp_path, "nm_matmul", scripts, 3.0)
    k = gc.run_kernel_stage(stage, time.monotonic() + 3.0, dict(os.environ), tmp_path)
    status = [r["status"] for r in k["configs"]]
    assert status == ["ok", "failed", "ok", "skipped"], k["configs"]
    assert k["configs"][1]["note"].startswith("exit 3")
    assert "stage budget spent" in k["configs"][3]["note"]
    assert k["best"]["index"] == 2 and k["best"]["speedup_vs_defaults"] == pytest.approx(2.0)
    assert k["best_json"]["results"][0]["ms"]["pallas"] == 1.0


def test_a_config_past_the_stage_end_is_killed(tmp_path, monkeypatch):
    monkeypatch.setattr(gc, "MIN_START_S", 0.05)
    import time
    stage = _fake_stage(tmp_path, "nm_matmul", [_writer((1.0, 1.0), 30), _writer((1, 1))], 1)
    t0 = time.monotonic()
    k = gc.run_kernel_stage(stage, t0 + 1.0, dict(os.environ), tmp_path)
    assert time.monotonic() - t0 < 10
    assert [r["status"] for r in k["configs"]] == ["timeout", "skipped"]
    assert k["best"] is None


def test_pytest_counts_from_a_killed_runs_log(tmp_path):
    log = tmp_path / "tests.log"
    log.write_text("tests/kernels/test_a.py::test_x[1] PASSED  [ 10%]\n"
                   "tests/kernels/test_a.py::test_x[2] FAILED  [ 20%]\n"
                   "tests/kernels/test_b.py::test_y SKIPPED (needs a GPU) [ 30%]\n"
                   "tests/kernels/test_b.py::test_z PASSED  [ 40%]\n")
    res = gc.parse_pytest(tmp_path / "missing.xml", log)
    assert (res["passed"], res["failed"], res["skipped"], res["total"]) == (2, 1, 1, 4)
    assert res["failed_tests"] == ["tests/kernels/test_a.py::test_x[2]"]


# ----------------------------------------------------------------------------- bench options
# The options gpu_check searches over reach the kernels (interpreted here: gpu=True on CPU
# runs the Pallas paths in interpret mode), and bad ones are refused up front.

def test_nm_bench_tile_overrides_reach_the_kernel():
    import jax
    from sparsejax.kernels.nm_matmul import bench
    from sparsejax.nm import compress_nm, decompress_nm
    w = jax.random.normal(jax.random.key(0), (128, 64))
    x = jax.random.normal(jax.random.key(1), (10, 128))            # rows padded to block_m
    c = compress_nm(w, 2, 4, axis=0)
    dense = decompress_nm(c)
    fns, skipped, used = bench._variants(x, c, dense, 0, True,
                                         {"block_n": 16, "block_k": 32, "num_warps": 8})
    assert tuple(used) == (16, 16, 32, 8, 3) and "pallas" not in skipped
    assert float(abs(fns["pallas"]() - x @ dense).max()) < 1e-4
    fns, skipped, used = bench._variants(x, c, dense, 0, True, {"block_k": 24})
    assert used is None and "pallas" not in fns and "power of two" in skipped["pallas"]


def test_sparse_ffn_bench_refuses_bad_pallas_options_before_timing():
    import jax.numpy as jnp
    from sparsejax.kernels.sparse_ffn import bench
    with pytest.raises(ValueError, match="unknown Pallas options"):
        bench.decode_rows(64, (1,), jnp.float32, True, repeats=1,
                          pallas_options={"warps": 4})
    with pytest.raises(ValueError, match="must be powers of two"):
        bench.decode_rows(64, (1,), jnp.float32, True, repeats=1,
                          pallas_options={"block_cols": 24})


# ----------------------------------------------------------------------------- the page

def test_markdown_has_device_versions_tests_and_the_best_table():
    best = {"index": 1, "options": {"num_warps": 8}, "label": "--num_warps=8",
            "variant": "pallas", "metric_ms": 0.125, "rows": 9, "speedup_vs_defaults": 1.5,
            "headline": {"16x4096x4096": 1.75}, "baseline": "dense XLA matmul"}
    result = {
        "mode": "gpu", "invocation": "python -m experiments.gpu_check", "started": "today",
        "wall_s": 400.0, "total_budget_s": 480.0,
        "device": {"device_kind": "NVIDIA H200", "num_devices": 1, "platform": "gpu",
                   "nvidia_smi": ["NVIDIA H200, 550.54, 143771 MiB"]},
        "versions": {"python": "3.11.9", "jax": "0.10.2", "jaxlib": "0.10.2",
                     "flax": "0.12.8", "optax": "0.2.8", "triton": None},
        "git": {"commit": "abc1234", "dirty": False},
        "tests": {"passed": 20, "failed": 1, "errors": 0, "skipped": 2, "status": "failed",
                  "files": ["a", "b"], "duration_s": 99.0, "budget_s": 150.0,
                  "failed_tests": ["tests/kernels/test_a.py::test_x"]},
        "kernels": {"nm_matmul": {
            "budget_s": 90.0, "duration_s": 80.0, "metric": "geomean ms", "best": best,
            "configs": [{"index": 0, "label": "bench defaults", "status": "ok",
                         "duration_s": 20.0, "summary": {"variant": "pallas",
                                                          "metric_ms": 0.1875}},
                        {"index": 1, "label": "--num_warps=8", "status": "ok",
                         "duration_s": 21.0, "summary": best},
                        {"index": 2, "label": "--num_stages=4", "status": "skipped",
                         "note": "stage budget spent: 5 s left", "summary": None}]}},
        "commands": ["JAX_PLATFORMS=cuda python -m sparsejax.kernels.nm_matmul.bench "
                     "--num_warps=8"]}
    page = gc.render_markdown(result)
    assert "NVIDIA H200" in page and "550.54" in page
    assert "Python 3.11.9" in page and "jax 0.10.2" in page and "flax 0.12.8" in page
    assert "optax 0.2.8" in page and "triton not installed" in page
    assert "**20 passed, 1 failed, 0 errors, 2 skipped**" in page
    assert "- failed: `tests/kernels/test_a.py::test_x`" in page
    row = [l for l in page.splitlines() if l.startswith("| nm_matmul |")]
    assert row == ["| nm_matmul | `--num_warps=8` | pallas | 0.125 | 1.50x | 2 / 2 / 3 | "
                   "16x4096x4096 1.75x (vs dense XLA matmul) |"]
    assert "| 2 | `--num_stages=4` | skipped |" in page and "stage budget spent" in page
    assert "--num_warps=8\n```" in page                   # the commands block


# ----------------------------------------------------------------------------- end to end

@pytest.mark.slow
def test_cpu_plumbing_run_writes_json_and_page(tmp_path, capsys):
    out, md = tmp_path / "r.json", tmp_path / "r.md"
    rc = gc.main(["--execute_on_cpu", "--skip_tests", "--kernels=nm_matmul", f"--out={out}",
                  f"--md={md}", f"--raw_dir={tmp_path / 'raw'}"])
    printed = capsys.readouterr().out.splitlines()
    assert rc == 0, printed
    assert len(printed) == 3 and printed[1].startswith("[1/1] nm_matmul: 1 ok; best ")
    result = json.loads(out.read_text())
    best = result["kernels"]["nm_matmul"]["best"]
    assert result["status"] == "ok" and result["mode"] == "cpu"
    assert best["variant"] == "xla" and best["metric_ms"] > 0
    assert set(best["headline"]) == {"16x1024x1024", "256x1024x1024"}
    assert result["kernels"]["nm_matmul"]["best_json"]["platform"] == "cpu"
    assert "| nm_matmul | `bench defaults` | xla |" in md.read_text()


@pytest.mark.gpu
def test_gpu_check_runs_on_the_gpu(root, tmp_path):
    if os.environ.get(gc.RUNNING_ENV):
        pytest.skip("inside gpu_check's own test stage")
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--skip_tests",
                           "--total_s=300", f"--out={out}", f"--md={md}"], cwd=root,
                          capture_output=True, text=True, timeout=360)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["wall_s"] < 300
    for name in gc.PLANS:
        assert result["kernels"][name]["best"]["variant"] == "pallas", name
    assert "| block_sparse_attention |" in md.read_text()
