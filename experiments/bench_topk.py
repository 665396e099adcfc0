"""Statistical top-k vs lax.top_k vs lax.approx_max_k, side by side, written as JSON.

    python -m experiments.bench_topk                       # d = 1k..64k, 256 rows
    python -m experiments.bench_topk --quick               # d = 1k, 16k; fewer repeats
    python -m experiments.bench_topk --rows=1024 --out=experiments/results/bench_topk_cpu.json

At each row width d (k = round(density·d), default 8%) the float32 input of shape
(rows, d) goes through, each jitted on its own:

- ``stat_soft`` / ``stat_hard``: ``sparsejax.statistical_topk`` (Spark, no sort);
- ``lax_top_k``: ``lax.top_k(x, k)`` alone (values and indices, no dense output);
- ``approx_max_k``: ``lax.approx_max_k(x, k)`` alone (only optimised on TPU);
- ``topk_exact``: ``sparsejax.topk`` (lax.top_k plus the scatter back to a dense output,
  the same output as the statistical forms).

Compilation is excluded (one warm-up call each). Methods are interleaved: every repeat
times one window of each method in turn, and the median window (per call) is reported,
so drifts in machine load hit all methods alike. Ratios are method time / stat_soft time.
"""

from __future__ import annotations

import functools
import json
import platform
from pathlib import Path

import jax
from absl import app, flags, logging
from jax import lax

from sparsejax.activations import k_from_density, statistical_topk, topk
from sparsejax.kernels._common import interleaved_ms

flags.DEFINE_list("dims", ["1024", "4096", "16384", "65536"], "row widths d")
flags.DEFINE_integer("rows", 256, "rows (tokens) per call")
flags.DEFINE_float("density", 0.08, "kept fraction; k = round(density * d)")
flags.DEFINE_integer("repeats", 7, "timed windows per method (the median is reported)")
flags.DEFINE_float("window_s", 0.05, "target length of one timed window")
flags.DEFINE_bool("quick", False, "d = 1024, 16384 and 3 repeats")
flags.DEFINE_string("out", "runs/bench_topk.json", "where to write the JSON")
FLAGS = flags.FLAGS

METHODS = ("stat_soft", "stat_hard", "lax_top_k", "approx_max_k", "topk_exact")


def make_fns(k: int, density: float) -> dict:
    """The jitted function of each method at ``k`` / ``density`` (last axis)."""
    return {
        "stat_soft": jax.jit(functools.partial(statistical_topk, density=density, mode="soft")),
        "stat_hard": jax.jit(functools.partial(statistical_topk, density=density, mode="hard")),
        "lax_top_k": jax.jit(lambda x: lax.top_k(x, k)),
        "approx_max_k": jax.jit(lambda x: lax.approx_max_k(x, k)),
        "topk_exact": jax.jit(functools.partial(topk, k=k)),
    }


def time_dim(d: int, rows: int, density: float, repeats: int, window_s: float) -> dict:
    """Median ms per call of every method at width ``d``, interleaved, compile excluded."""
    k = k_from_density(d, density)
    x = jax.random.normal(jax.random.PRNGKey(0), (rows, d))
    fns = make_fns(k, density)
    t = interleaved_ms({name: functools.partial(fn, x) for name, fn in fns.items()},
                       repeats, window_s)
    ms = t["ms"]
    return {"d": d, "k": k, "rows": rows, "ms": ms, "ms_min": t["ms_min"],
            "calls_per_window": t["calls_per_window"], "first_call_s": t["first_call_s"],
            "ratio_top_k_over_stat": ms["lax_top_k"] / ms["stat_soft"],
            "ratio_approx_over_stat": ms["approx_max_k"] / ms["stat_soft"],
            "ratio_topk_exact_over_stat": ms["topk_exact"] / ms["stat_soft"]}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    dims = [1024, 16384] if FLAGS.quick else [int(d) for d in FLAGS.dims]
    repeats = 3 if FLAGS.quick else FLAGS.repeats
    print(f"device={jax.devices()[0].device_kind} rows={FLAGS.rows} density={FLAGS.density} "
          f"repeats={repeats} (median ms per call; ratios are x / stat_soft)")
    print(f"{'d':>6s} {'k':>5s} " + " ".join(f"{m:>12s}" for m in METHODS) +
          f" {'top_k/stat':>10s} {'approx/stat':>11s} {'topk/stat':>9s}")
    results = []
    for d in dims:
        r = time_dim(d, FLAGS.rows, FLAGS.density, repeats, FLAGS.window_s)
        results.append(r)
        print(f"{d:6d} {r['k']:5d} " + " ".join(f"{r['ms'][m]:12.3f}" for m in METHODS) +
              f" {r['ratio_top_k_over_stat']:10.1f} {r['ratio_approx_over_stat']:11.1f}"
              f" {r['ratio_topk_exact_over_stat']:9.1f}", flush=True)
    out = {"device": str(jax.devices()[0].device_kind), "platform": jax.default_backend(),
           "num_devices": jax.device_count(), "jax": jax.__version__,
           "host": platform.node(), "rows": FLAGS.rows, "density": FLAGS.density,
           "repeats": repeats, "window_s": FLAGS.window_s, "dtype": "float32",
           "methods": list(METHODS), "results": results}
    Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
    Path(FLAGS.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
