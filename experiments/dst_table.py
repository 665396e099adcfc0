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
and warns that it must be checked against the new numbers. The pieces shared with
``experiments/nm_table.py`` live in ``experiments/tables.py``.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from absl import app, flags

from experiments import tables
from experiments.tables import group, mean_std, pm

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


def run_one(method: str, sparsity: float | None, seed: int, num_steps: int) -> dict:
    """Trains one config in a temporary workdir; returns its numbers and final densities."""
    from configs import quickstart
    from sparsejax.train.sharding import named_leaves

    config = quickstart.get_config(method if method == "dense" else f"{method},{sparsity}")
    config.seed = seed
    config.sparsity.seed = seed
    if num_steps:
        config.num_steps = num_steps
    final = {}
    summary, _ = tables.run_config(
        config, hooks=[tables.final_state_hook(config.num_steps, final)], prefix="dst_table_")
    state = final["state"]
    final = {"masks": getattr(state.opt_state, "masks", None), "params": state.params}

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
    rows = []
    seeds = sorted({r["seed"] for r in runs})
    for s in sparsities:
        cells = [f"{s:g}"]
        for a, b in pairs:
            sa = None if a == "dense" else s
            sb = None if b == "dense" else s
            d = [by[(a, sa, k)] - by[(b, sb, k)] for k in seeds
                 if (a, sa, k) in by and (b, sb, k) in by]
            cells.append(pm(d, 100) if d else "—")
        rows.append(cells)
    return tables.md_table(["sparsity", *(f"{a} − {b}" for a, b in pairs)], rows)


def markdown(result: dict, reading: str | None) -> str:
    runs, cfg = result["runs"], result["config"]
    has_flops = result["flops"] is not None
    seeds = result["seeds"]
    lines = tables.header("Dense vs static vs SET vs RigL on the digits MLP", result) + [
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
    rows = []
    for (method, s), rs in group(runs, ("method", "sparsity")).items():
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
        rows.append(row)
    lines += tables.md_table(head, rows)
    densities = {}
    for r in runs:
        if r["layer_density"]:
            densities.setdefault((r["method"], r["sparsity"]), r["layer_density"])
    if densities:
        layers = sorted({p for d in densities.values() for p in d})
        lines += ["", "Per-layer density of the sparse kernels (ERK; identical across seeds "
                  "and methods at one sparsity):", ""]
        by_sparsity = {}
        for (m, s), d in densities.items():
            by_sparsity.setdefault(s, d)
        lines += tables.md_table(
            ["sparsity", *(f"`{p}`" for p in layers)],
            ([f"{s:g}", *(f"{d.get(p, 1.0):.4f}" for p in layers)]
             for s, d in by_sparsity.items()))
        all_k = {r["sparsity"]: r["sparsity_all_kernels"] for r in runs if r["layer_density"]}
        lines += ["", "Sparsity over all kernels, dense head included: "
                  + ", ".join(f"{v:.4f} at target {k:g}" for k, v in sorted(all_k.items()))
                  + "."]
    diff = _diff_rows(runs, result["sparsities"])
    if diff:
        lines += ["", "Paired accuracy differences (same seed: same init and data order), "
                  "in points, mean ± sample std over seeds:", "", *diff]
    lines += tables.reading_section(reading, "3–5")
    return "\n".join(lines)


def main(argv):
    tables.start(argv)
    if FLAGS.render_only:
        tables.render_only(Path(FLAGS.out_md), Path(FLAGS.out_json), markdown)
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
    plan = [(m, None if m == "dense" else s, k)
            for m in methods for s in ([None] if m == "dense" else sparsities) for k in seeds]
    runs, total_time = tables.run_plan(
        plan, lambda m, s, k: run_one(m, s, k, num_steps),
        lambda it: f"{it[0]:6s} s={'-' if it[1] is None else f'{it[1]:g}':5s} seed={it[2]}",
        lambda r: (f"acc={100 * r['eval_accuracy']:.2f} loss={r['eval_loss']:.4f} "
                   f"sparsity={r['sparsity_from_masks']:.4f} ({r['wall_time_s']:.1f} s)"))

    from configs import quickstart

    cfg = config_summary(num_steps)
    from sparsejax import flops

    f_dense = tables.dense_flops(quickstart.get_config())
    add_flops(runs, f_dense)
    f_info = {"dense_per_layer": f_dense, "dense_total": flops.total(f_dense),
              "per": "one example (batch 1), inference"}
    result = {
        "command": tables.command("experiments.dst_table"),
        "machine": tables.machine(), "config": cfg, "methods": methods, "sparsities": sparsities,
        "seeds": seeds, "std": "sample (ddof=1)", "tolerance": TOLERANCE,
        "total_time_s": total_time, "flops": f_info, "runs": runs,
        "summary": [
            {"method": m, "sparsity": s, "n": len(rs),
             **{f"{k}_mean": mean_std([r[k] for r in rs])[0] for k in
                ("eval_accuracy", "eval_loss", "sparsity_from_masks", "wall_time_s")},
             **{f"{k}_std": mean_std([r[k] for r in rs])[1] for k in
                ("eval_accuracy", "eval_loss", "wall_time_s")},
             "inference_flops_rel": rs[0]["inference_flops_rel"],
             "train_flops_rel": rs[0]["train_flops_rel"]}
            for (m, s), rs in group(runs, ("method", "sparsity")).items()],
    }
    tables.write_outputs(result, out_md, out_json, markdown)
    print(f"{len(runs)} runs in {total_time:.0f} s; wrote {out_md} and {out_json}")


if __name__ == "__main__":
    app.run(main)
