"""Dense vs static vs SET vs RigL on the digits MLP: accuracy, loss, sparsity and FLOPs.

    python -m experiments.dst_table                      # 30 runs → docs/results/dst_digits.*
    python -m experiments.dst_table --quick              # smoke test: 1 seed, 0.9, 100 steps
    python -m experiments.dst_table --methods=static,rigl --sparsities=0.9 --seeds=0,1

Every (method, sparsity, seed) trains ``configs/quickstart.py:<method>,<sparsity>`` with
its defaults (ERK, head dense by rule, ΔT = 100, drop 0.3 cosine to 75% of training)
in a temporary workdir that is deleted afterwards; ``config.seed`` (init, data order)
and ``config.sparsity.seed`` (random masks, SET growth) are both set to the seed. Dense
runs once per seed, not per sparsity. Each run's realised sparsity is measured from its
final masks and from the loop's ``train_sparsity`` and must equal the target within
1e-3. Inference and training FLOPs relative to dense come from ``sparsejax.flops`` (the
RigL paper's Appendix-H accounting) when that module exists.

Writes JSON with every per-seed number and a Markdown table (mean ± sample std,
ddof = 1). The "Reading" section of the Markdown is prose written by a person: a rerun
keeps the one between the ``reading:begin``/``reading:end`` markers of the existing file
and warns that it must be checked against the new numbers.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags, logging

flags.DEFINE_list("methods", ["dense", "static", "set", "rigl"], "sparsity methods")
flags.DEFINE_list("sparsities", ["0.8", "0.9", "0.95"], "target sparsities (not for dense)")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (config.seed and config.sparsity.seed)")
flags.DEFINE_integer("num_steps", 0, "training steps (0: the config's, 1500)")
flags.DEFINE_string("out_md", "docs/results/dst_digits.md", "Markdown table")
flags.DEFINE_string("out_json", "docs/results/dst_digits.json", "per-seed JSON")
flags.DEFINE_bool("quick", False, "smoke test: seed 0, sparsity 0.9, 100 steps; unless "
                  "--out_md/--out_json are given, writes under runs/ instead of docs/")
flags.DEFINE_bool("render_only", False, "rewrite --out_md from the existing --out_json "
                  "(no training)")
FLAGS = flags.FLAGS

CONFIG = "configs/quickstart.py"
TOLERANCE = 1e-3  # |realised − target sparsity|
READING_BEGIN, READING_END = "<!-- reading:begin -->", "<!-- reading:end -->"


def run_one(method: str, sparsity: float | None, seed: int, num_steps: int) -> dict:
    """Trains one config in a temporary workdir; returns its numbers and final densities."""
    import jax

    from configs import quickstart
    from sparsejax.train import train_and_evaluate
    from sparsejax.train.sharding import named_leaves

    config = quickstart.get_config(method if method == "dense" else f"{method},{sparsity}")
    config.seed = seed
    config.sparsity.seed = seed
    if num_steps:
        config.num_steps = num_steps
    final = {}

    def keep_final_masks(step, state):
        if step == config.num_steps:
            final["masks"] = jax.device_get(getattr(state.opt_state, "masks", None))
            final["params"] = jax.device_get(state.params)

    workdir = tempfile.mkdtemp(prefix="dst_table_")
    try:
        summary = train_and_evaluate(config, workdir, hooks=[keep_final_masks], progress=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    masks = dict(named_leaves(final["masks"])) if final["masks"] is not None else {}
    masks = {p: m for p, m in masks.items() if m is not None}
    kernels = {p: w for p, w in named_leaves(final["params"]) if p.endswith("kernel")}
    nnz = {p: int(m.sum()) for p, m in masks.items()}
    size = {p: int(m.size) for p, m in masks.items()}
    measured = 1.0 - sum(nnz.values()) / sum(size.values()) if masks else 0.0
    all_kernels = sum(w.size for w in kernels.values())
    kernel_nnz = sum(nnz.get(p, w.size) for p, w in kernels.items())
    out = {
        "method": method, "sparsity": sparsity, "seed": seed, "steps": summary["steps"],
        "eval_accuracy": summary["eval_accuracy"], "eval_loss": summary["eval_loss"],
        "train_loss": summary.get("train_loss"),
        "train_sparsity": summary.get("train_sparsity", 0.0),
        "sparsity_from_masks": measured,
        "sparsity_all_kernels": 1.0 - kernel_nnz / all_kernels,
        "layer_density": {p: nnz[p] / size[p] for p in masks},
        "layer_nnz": nnz,
        "wall_time_s": summary["wall_time_s"],
        "update_every": config.sparsity.update_every,
    }
    target = sparsity if method != "dense" else 0.0
    for key in ("train_sparsity", "sparsity_from_masks"):
        if abs(out[key] - target) > TOLERANCE:
            raise RuntimeError(f"{method} s={sparsity} seed={seed}: {key}={out[key]:.6f} is "
                               f"not within {TOLERANCE} of the target {target}")
    out["sparsity_ok"] = True
    return out


def dense_flops(config) -> dict:
    """Per-example inference FLOPs of the config's model, by parameter path."""
    import jax.numpy as jnp
    from flax import nnx

    from sparsejax import flops
    from sparsejax.models import build_model
    from sparsejax.train.data import get_dataset

    info = get_dataset(config.data).info
    model = build_model(config.model, info, nnx.Rngs(params=0))
    return flops.model_flops(model, jnp.ones((1, *info.input_shape), jnp.float32))


def add_flops(runs: list[dict], f_dense: dict) -> None:
    """Adds inference and training FLOPs relative to dense to every run (in place)."""
    from sparsejax import flops

    fd = flops.total(f_dense)
    for r in runs:
        fs = flops.total(flops.sparse_flops(f_dense, r["layer_density"]))
        train = flops.training_flops_per_step(r["method"], fd, fs, r["update_every"])
        r["inference_flops"], r["inference_flops_rel"] = fs, fs / fd
        r["train_flops_per_step"] = train
        r["train_flops_rel"] = train / flops.training_flops_per_step("dense", fd, fd)


def _finite(x):
    """NaN (the std of one seed) → None, so the JSON is strict."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else math.nan)


def pm(xs: list[float], scale: float = 1.0, digits: int = 2) -> str:
    m, s = mean_std([x * scale for x in xs])
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def group(runs: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        out.setdefault((r["method"], r["sparsity"]), []).append(r)
    return out


def machine() -> dict:
    import flax
    import jax
    import optax

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True).stdout.strip())
        commit = head + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "num_devices": jax.device_count(),
            "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "python": platform.python_version(), "git_commit": commit}


def config_summary(num_steps: int) -> dict:
    from configs import quickstart

    c = quickstart.get_config("rigl,0.9")
    steps = num_steps or c.num_steps
    o, s = c.optimizer, c.sparsity
    end_step = s.end_step if s.end_step >= 0 else int(s.end_fraction * steps)
    widths = " → ".join(map(str, (64, *c.model.hidden, 10)))
    return {
        "config": CONFIG, "model": f"MLP {widths}, {c.model.activation}",
        "data": dict(c.data),
        "num_steps": steps, "batch_size": c.batch_size,
        "optimizer": (f"{o.name} lr={o.learning_rate} wd={o.weight_decay} {o.schedule} "
                      f"schedule, {o.warmup_steps} warm-up steps"),
        "distribution": f"{s.distribution} (power_scale {s.power_scale})",
        "rules": [list(r) for r in s.rules], "mask_init": s.mask_init,
        "update_every": s.update_every, "drop_fraction": s.drop_fraction,
        "drop_fraction_anneal": s.drop_fraction_anneal, "end_fraction": s.end_fraction,
        "end_step": end_step, "drop_noise_std": s.drop_noise_std,
    }


def _update_steps(cfg: dict) -> str:
    steps = list(range(0, cfg["end_step"] + 1, cfg["update_every"]))
    shown = ", ".join(map(str, steps)) if len(steps) <= 4 else (
        f"{steps[0]}, {steps[1]}, …, {steps[-1]}")
    return f"{shown} ({len(steps)} update{'s' * (len(steps) != 1)})"


def _diff_rows(runs: list[dict], sparsities: list[float]) -> list[str]:
    """Paired (same seed) accuracy differences, in points."""
    by = {(r["method"], r["sparsity"], r["seed"]): r["eval_accuracy"] for r in runs}
    pairs = [("static", "dense"), ("set", "dense"), ("rigl", "dense"), ("rigl", "static"),
             ("rigl", "set"), ("set", "static")]
    methods = {r["method"] for r in runs}
    pairs = [(a, b) for a, b in pairs if a in methods and b in methods]
    if not pairs:
        return []
    rows = ["| sparsity | " + " | ".join(f"{a} − {b}" for a, b in pairs) + " |",
            "|---|" + "---|" * len(pairs)]
    seeds = sorted({r["seed"] for r in runs})
    for s in sparsities:
        cells = []
        for a, b in pairs:
            sa = None if a == "dense" else s
            sb = None if b == "dense" else s
            d = [by[(a, sa, k)] - by[(b, sb, k)] for k in seeds
                 if (a, sa, k) in by and (b, sb, k) in by]
            cells.append(pm(d, 100) if d else "—")
        rows.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return rows


def markdown(result: dict, reading: str | None) -> str:
    runs, cfg, mach = result["runs"], result["config"], result["machine"]
    has_flops = result["flops"] is not None
    seeds = result["seeds"]
    lines = [
        "# Dense vs static vs SET vs RigL on the digits MLP",
        "",
        "Made by (from the repository root):",
        "",
        "```bash",
        result["command"],
        "```",
        "",
        f"Machine: {mach['cpu']} ({mach['cpu_count']} cores), {mach['platform']} "
        f"({mach['num_devices']} device), Python {mach['python']}, jax {mach['jax']}, flax "
        f"{mach['flax']}, optax {mach['optax']}; git {mach['git_commit']}. "
        f"{len(runs)} runs in {result['total_time_s'] / 60:.1f} min.",
        "",
        "## Setup",
        "",
        f"- Config: `{cfg['config']}:<method>,<sparsity>` with its defaults; "
        f"`config.seed` and `config.sparsity.seed` both set to the seed "
        f"(seeds {', '.join(map(str, seeds))}).",
        f"- Model: {cfg['model']} on scikit-learn digits (8×8, 1,437 train / "
        f"{cfg['data'].get('eval_size', 360)} eval examples, fixed split).",
        f"- Training: {cfg['num_steps']} steps, batch {cfg['batch_size']}, {cfg['optimizer']}.",
        f"- Sparsity: {cfg['distribution']} layer-wise densities over the sparse kernels; "
        f"rules {cfg['rules']} (the head stays dense, biases are never sparse); masks "
        f"initialised `{cfg['mask_init']}`. The target sparsity is over the sparse kernels "
        "only.",
        f"- SET/RigL: mask update every ΔT = {cfg['update_every']} steps, drop fraction "
        f"{cfg['drop_fraction']} annealed ({cfg['drop_fraction_anneal']}) to 0 at "
        f"T_end = {cfg['end_fraction']} × steps = step {cfg['end_step']}, so masks update at "
        f"steps {_update_steps(cfg)}; RigL skips the gradient step on update steps, SET "
        "does not (the library's defaults, as in the reference code).",
        "- Wall time is the whole `train_and_evaluate` call (compile, eval, orbax "
        "checkpoints included) on a shared machine with other work running, so it is "
        "noisy.",
        "- Train loss is the loop's mean over the last logging window (the final "
        "50 steps), on masked weights.",
        "- Accuracy and loss are on the eval split after the last step. "
        f"Each cell is mean ± sample std (ddof = 1) over {len(seeds)} seed(s); "
        "one eval example is 0.28 accuracy points.",
        f"- Realised sparsity: measured from each run's final masks and from the loop's "
        f"`train_sparsity`; every run was checked to equal the target within {TOLERANCE}.",
    ]
    if has_flops:
        f = result["flops"]
        lines.append(
            f"- FLOPs (`sparsejax.flops`): dense inference is {int(f['dense_total']):,} "
            "FLOPs per example (2 per multiply-add, kernels only). Inference = Σ layer "
            "FLOPs × layer density. Training per step after Evci et al. 2020, App. H: "
            "dense 3·f_D, static/SET 3·f_S, RigL (3·f_S·ΔT + 2·f_S + f_D)/(ΔT + 1). "
            "The RigL formula charges a dense gradient every ΔT steps for all of "
            "training, though updates stop at T_end, so it slightly overstates RigL. "
            "These are theoretical counts: this implementation multiplies masked dense "
            "matrices, so wall time does not fall with sparsity.")
    else:
        lines.append("- FLOPs: `sparsejax.flops` was not available when this was made.")
    lines += ["", "## Results", ""]
    head = ["method", "sparsity", "eval accuracy (%)", "eval loss", "train loss",
            "sparsity realised"]
    if has_flops:
        head += ["rel. inference FLOPs", "rel. training FLOPs / step"]
    head += ["wall time (s)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, s), rs in group(runs).items():
        realised = [r["sparsity_from_masks"] for r in rs]
        row = [method, "—" if s is None else f"{s:g}",
               pm([r["eval_accuracy"] for r in rs], 100),
               pm([r["eval_loss"] for r in rs], 1, 3),
               pm([r["train_loss"] for r in rs], 1, 4),
               f"{statistics.fmean(realised):.4f}"]
        if has_flops:
            row += [f"{statistics.fmean(r['inference_flops_rel'] for r in rs):.3f}",
                    f"{statistics.fmean(r['train_flops_rel'] for r in rs):.3f}"]
        row += [pm([r["wall_time_s"] for r in rs], 1, 1)]
        lines.append("| " + " | ".join(row) + " |")
    densities = {}
    for r in runs:
        if r["layer_density"]:
            densities.setdefault((r["method"], r["sparsity"]), r["layer_density"])
    if densities:
        layers = sorted({p for d in densities.values() for p in d})
        lines += ["", "Per-layer density of the sparse kernels (ERK; identical across seeds "
                  "and methods at one sparsity):", "",
                  "| sparsity | " + " | ".join(f"`{p}`" for p in layers) + " |",
                  "|---|" + "---|" * len(layers)]
        seen = set()
        for (m, s), d in densities.items():
            if s in seen:
                continue
            seen.add(s)
            lines.append(f"| {s:g} | " + " | ".join(f"{d.get(p, 1.0):.4f}" for p in layers)
                         + " |")
        all_k = {r["sparsity"]: r["sparsity_all_kernels"] for r in runs if r["layer_density"]}
        lines += ["", "Sparsity over all kernels, dense head included: "
                  + ", ".join(f"{v:.4f} at target {k:g}" for k, v in sorted(all_k.items()))
                  + "."]
    diff = _diff_rows(runs, result["sparsities"])
    if diff:
        lines += ["", "Paired accuracy differences (same seed: same init and data order), "
                  "in points, mean ± sample std over seeds:", "", *diff]
    lines += ["", "## Reading", "", READING_BEGIN,
              reading.strip() if reading else "_Not written yet: add a 3–5 sentence "
              "reading of the numbers above between these markers._",
              READING_END, ""]
    return "\n".join(lines)


def existing_reading(path: Path) -> str | None:
    if not path.exists():
        return None
    text = path.read_text()
    if READING_BEGIN not in text or READING_END not in text:
        return None
    body = text.split(READING_BEGIN, 1)[1].split(READING_END, 1)[0].strip()
    return None if body.startswith("_Not written yet") else body


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from tqdm.auto import tqdm

    if FLAGS.render_only:
        out_md, out_json = Path(FLAGS.out_md), Path(FLAGS.out_json)
        out_md.write_text(markdown(json.loads(out_json.read_text()), existing_reading(out_md)))
        print(f"wrote {out_md} from {out_json}")
        return
    methods = list(FLAGS.methods)
    sparsities = [float(s) for s in FLAGS.sparsities]
    seeds = [int(s) for s in FLAGS.seeds]
    num_steps = FLAGS.num_steps
    out_md, out_json = Path(FLAGS.out_md), Path(FLAGS.out_json)
    if FLAGS.quick:
        seeds, sparsities, num_steps = seeds[:1], [0.9], num_steps or 100
        if FLAGS["out_md"].using_default_value:
            out_md = Path("runs/dst_digits_quick.md")
        if FLAGS["out_json"].using_default_value:
            out_json = Path("runs/dst_digits_quick.json")
    from configs.common import SPARSITY_METHODS

    unknown = set(methods) - set(SPARSITY_METHODS)
    if unknown:
        raise app.UsageError(f"unknown methods {sorted(unknown)}; known: {SPARSITY_METHODS}")
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise app.UsageError(f"sparsity {s} is outside (0, 1)")
    try:
        from sparsejax import flops  # noqa: F401
        have_flops = True
    except ImportError:
        have_flops = False
        logging.warning("sparsejax.flops is not available: the table has no FLOPs columns")

    plan = [(m, None if m == "dense" else s, k)
            for m in methods for s in ([None] if m == "dense" else sparsities) for k in seeds]
    runs, t0 = [], time.time()
    bar = tqdm(plan, desc="runs", unit="run", dynamic_ncols=True)
    for method, s, seed in bar:
        bar.set_postfix_str(f"{method} s={s} seed={seed}")
        runs.append(r := run_one(method, s, seed, num_steps))
        bar.write(f"{method:6s} s={'-' if s is None else f'{s:g}':5s} seed={seed} "
                  f"acc={100 * r['eval_accuracy']:.2f} loss={r['eval_loss']:.4f} "
                  f"sparsity={r['sparsity_from_masks']:.4f} ({r['wall_time_s']:.1f} s)")
    total_time = time.time() - t0

    from configs import quickstart

    cfg = config_summary(num_steps)
    f_info = None
    if have_flops:
        f_dense = dense_flops(quickstart.get_config())
        add_flops(runs, f_dense)
        from sparsejax import flops

        f_info = {"dense_per_layer": f_dense, "dense_total": flops.total(f_dense),
                  "per": "one example (batch 1), inference"}
    result = {
        "command": " ".join(["python -m experiments.dst_table", shlex.join(sys.argv[1:])]),
        "machine": machine(), "config": cfg, "methods": methods, "sparsities": sparsities,
        "seeds": seeds, "std": "sample (ddof=1)", "tolerance": TOLERANCE,
        "total_time_s": total_time, "flops": f_info, "runs": runs,
        "summary": [
            {"method": m, "sparsity": s, "n": len(rs),
             **{f"{k}_mean": mean_std([r[k] for r in rs])[0] for k in
                ("eval_accuracy", "eval_loss", "sparsity_from_masks", "wall_time_s")},
             **{f"{k}_std": mean_std([r[k] for r in rs])[1] for k in
                ("eval_accuracy", "eval_loss", "wall_time_s")},
             **({"inference_flops_rel": rs[0]["inference_flops_rel"],
                 "train_flops_rel": rs[0]["train_flops_rel"]} if have_flops else {})}
            for (m, s), rs in group(runs).items()],
    }
    result["command"] = result["command"].rstrip()
    result = _finite(result)
    reading = existing_reading(out_md)
    if reading:
        logging.warning("kept the hand-written Reading of %s: check it against the new "
                        "numbers", out_md)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    out_md.write_text(markdown(result, reading))
    print(f"{len(runs)} runs in {total_time:.0f} s; wrote {out_md} and {out_json}")


if __name__ == "__main__":
    app.run(main)
