"""Dense vs static vs SET vs RigL: eval quality, sparsity and FLOPs, with a verdict on
"RigL ≥ SET ≥ static" (the RigL and SET papers) at every sparsity.

    python -m experiments.dst_table                      # digits MLP, 39 runs → docs/results/dst_digits.*
    python -m experiments.dst_table --task=lm --jobs=2   # byte LM, 39 runs → docs/results/dst_lm.*
    python -m experiments.dst_table --task=lm_erk --jobs=2  # ERK vs uniform, 27 runs → erk_lm.*
    python -m experiments.dst_table --quick              # smoke test: 1 seed, 0.9, 100 steps
    python -m experiments.dst_table --methods=static,rigl --sparsities=0.9 --seeds=0,1
    python -m experiments.dst_table --render_only        # Markdown from the JSON (--task=lm too)

``--task=digits`` trains ``configs/quickstart.py`` (a ReLU MLP on the embedded 8×8
digits, 1500 steps); ``--task=lm`` trains ``configs/lm_bytes.py`` (a byte-level decoder
LM on the pinned standard-library corpus, which underfits), shortened to ``TASKS['lm']``'s
steps and mask-update interval so that the 39 runs fit in an hour on 2 CPU cores.
``--task=lm_erk`` trains the same LM runs with a second axis, the layer-wise
distribution (``--distributions``: ERK, or uniform, every sparse kernel at the target),
for the RigL paper's "ERK ≥ uniform at equal sparsity"; its defaults are dense, static
and RigL at 90% and 98%.
Every (method, sparsity, seed) trains ``<config>:<method>,<sparsity>`` with its defaults
(ERK, head dense by rule, drop 0.3 cosine to 75% of training)
in a temporary workdir that is deleted afterwards; ``config.seed`` (init, data order)
and, for static/SET/RigL, ``config.method.seed`` (random masks, SET growth) are set to
the seed. Dense
runs once per seed, not per sparsity. Each run's realised sparsity is measured from its
final masks and from the loop's ``train_sparsity`` and must equal the target within
1e-3. Inference and training FLOPs relative to dense come from ``sparsejax.flops`` (the
RigL paper's Appendix-H accounting). Each claim's verdict (``tables.verdict``) compares
paired seeds on the task's metric (digits: eval accuracy; LM: eval loss).

Writes JSON with every per-seed number and a Markdown table (mean ± sample std,
ddof = 1). The "Reading" section of the Markdown is prose written by a person: a rerun
keeps the one between the ``reading:begin``/``reading:end`` markers of the existing file
and warns that it must be checked against the new numbers. The sweep runner and the
Markdown renderer are shared with the other tables (``experiments/tables.py``); this
file holds what is particular: one run, the JSON fields and the page's ``Table`` spec.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

from absl import app, flags

from configs import lm_bytes, quickstart
from configs.common import END_FRACTION, SPARSITY_METHODS
from experiments import tables
from experiments.tables import Column, If, Task, group, level, mean_of, mean_std, pm_of
from sparsejax import flops
from sparsejax.analysis import find_masks
from sparsejax.distributions import as_distribution
from sparsejax.paths import named_leaves


TASKS = {
    "digits": Task("configs/quickstart.py", quickstart, "dst_digits", "eval_accuracy", True),
    # 500 steps of batch 16 × 128 bytes (1 M bytes, a quarter of an epoch); ΔT = 50, so
    # masks update at steps 0, 50, …, 350 before T_end = 375; one eval, at the end
    "lm": Task("configs/lm_bytes.py", lm_bytes, "dst_lm", "eval_loss", False,
               {"num_steps": 500, "batch_size": 16, "update_every": 50, "eval_every": 0}),
}
TASKS["lm_erk"] = dataclasses.replace(TASKS["lm"], stem="erk_lm")
PLAN = {  # the task's default plan (flags given on the command line win)
    "lm_erk": {"methods": ["dense", "static", "rigl"], "distributions": ["erk", "uniform"],
               "sparsities": ["0.9", "0.98"]},
}

flags.DEFINE_enum("task", "digits", list(TASKS), "what to train: the digits MLP or the byte LM")
flags.DEFINE_list("methods", ["dense", "static", "set", "rigl"], "sparsity methods")
flags.DEFINE_list("sparsities", ["0.9", "0.95", "0.98", "0.99"], "target sparsities (not for dense)")
flags.DEFINE_list("distributions", ["erk"], "layer-wise distributions of the sparse methods "
                  "(erk, uniform, er; --task=lm_erk: erk,uniform)")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (config.seed, and config.method.seed where the method has one)")
flags.DEFINE_integer("num_steps", 0, "training steps (0: the task's: digits 1500, LM 500)")
flags.DEFINE_string("out_md", "docs/results/dst_digits.md", "Markdown table (default: the task's)")
flags.DEFINE_string("out_json", "docs/results/dst_digits.json", "per-seed JSON (default: the task's)")
flags.DEFINE_integer("jobs", 1, "runs at once, each in its own process (2 keeps both "
                     "cores of a 2-core CPU busy with the LM)")
flags.DEFINE_bool("quick", False, "smoke test: seed 0, sparsity 0.9, 100 steps; unless "
                  "--out_md/--out_json are given, writes under runs/ instead of docs/")
flags.DEFINE_bool("render_only", False, "rewrite --out_md from the existing --out_json "
                  "(no training)")
FLAGS = flags.FLAGS

TOLERANCE = 1e-3  # |realised − target sparsity|


# ----------------------------------------------------------------------------- one run


def run_one(task: str, num_steps: int, method: str, distribution: str | None,
            sparsity: float | None, seed: int) -> dict:
    """Trains one config of ``TASKS[task]`` (``distribution``: the sparse methods'
    layer-wise distribution; None for dense) in a temporary workdir; returns its
    numbers and final densities."""
    task = TASKS[task]
    config = tables.task_config(task, method if method == "dense" else f"{method},{sparsity}",
                                num_steps)
    if distribution is not None:
        config.method.distribution = distribution
    config.seed = seed
    if "seed" in config.method:  # random masks, SET growth (dense has no masks)
        config.method.seed = seed
    final = {}
    summary, _ = tables.run_config(
        config, hooks=[tables.final_state_hook(config.num_steps, final)], prefix="dst_table_")
    state = final["state"]
    final = {"masks": find_masks(state.opt_state), "params": state.params}

    masks = dict(named_leaves(final["masks"])) if final["masks"] is not None else {}
    masks = {p: m for p, m in masks.items() if m is not None}
    kernels = {p: w for p, w in named_leaves(final["params"]) if p.endswith("kernel")}
    nnz = {p: int(m.sum()) for p, m in masks.items()}
    size = {p: int(m.size) for p, m in masks.items()}
    measured = 1.0 - sum(nnz.values()) / sum(size.values()) if masks else 0.0
    all_kernels = sum(w.size for w in kernels.values())
    kernel_nnz = sum(nnz.get(p, w.size) for p, w in kernels.items())
    out = {
        "method": method, "distribution": distribution, "sparsity": sparsity, "seed": seed,
        "steps": summary["steps"],
        "eval_accuracy": summary["eval_accuracy"], "eval_loss": summary["eval_loss"],
        "eval_bits_per_byte": summary["eval_loss"] / math.log(2),
        "train_loss": summary.get("train_loss"),
        "train_sparsity": summary.get("train_sparsity", 0.0),
        "sparsity_from_masks": measured,
        "sparsity_all_kernels": 1.0 - kernel_nnz / all_kernels,
        "layer_density": {p: nnz[p] / size[p] for p in masks},
        "layer_nnz": nnz,
        "wall_time_s": summary["wall_time_s"],
        "update_every": config.method.get("update_every"),  # None: no mask updates
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
    fd = flops.total(f_dense)
    for r in runs:
        fs = flops.total(flops.sparse_flops(f_dense, r["layer_density"]))
        train = flops.training_flops_per_step(r["method"], fd, fs, r["update_every"])
        r["inference_flops"], r["inference_flops_rel"] = fs, fs / fd
        r["train_flops_per_step"] = train
        r["train_flops_rel"] = train / flops.training_flops_per_step("dense", fd, fd)


def config_summary(task: Task, num_steps: int, distributions: Sequence[str] = ("erk",)) -> dict:
    c = tables.task_config(task, "rigl,0.9", num_steps)
    o, s = c.optimizer, c.method
    return {
        "task": next(k for k, t in TASKS.items() if t is task),
        "config": task.config, "model": tables.model_summary(c), "data": dict(c.data),
        "num_steps": c.num_steps, "batch_size": c.batch_size,
        "optimizer": (f"{o.name} lr={o.learning_rate} wd={o.weight_decay} {o.schedule} "
                      f"schedule, {o.warmup_steps} warm-up steps"),
        "distribution": (f"{s.distribution} (power_scale "
                         f"{as_distribution(s.distribution).power_scale})"
                         if list(distributions) == ["erk"] else " or ".join(distributions)),
        "rules": [list(r) for r in s.rules], "mask_init": s.mask_init,
        "update_every": s.update_every, "drop_fraction": s.drop_fraction,
        "drop_fraction_anneal": s.drop_fraction_anneal, "end_fraction": END_FRACTION,
        "end_step": s.end_step, "drop_noise_std": s.drop_noise_std,
        "metric": task.metric, "higher_is_better": task.higher_is_better,
    }


# ----------------------------------------------------------------------------- the page


def _update_steps(cfg: dict) -> str:
    steps = list(range(0, cfg["end_step"] + 1, cfg["update_every"]))
    shown = ", ".join(map(str, steps)) if len(steps) <= 4 else (
        f"{steps[0]}, {steps[1]}, …, {steps[-1]}")
    return f"{shown} ({len(steps)} update{'s' * (len(steps) != 1)})"


def _layer_densities(result: dict, ctx: dict) -> list[str]:
    """Per-layer density of the sparse kernels by sparsity, and the all-kernel sparsity."""
    runs = result["runs"]
    if not any(r["layer_density"] for r in runs):
        return []
    layers = sorted({p for r in runs for p in r["layer_density"]})
    by_level = {}  # (distribution, sparsity) → densities; identical across methods, seeds
    for r in runs:
        if r["layer_density"]:
            by_level.setdefault((r.get("distribution", "erk"), r["sparsity"]),
                                (r["layer_density"], r["sparsity_all_kernels"]))
    if {d for d, _ in by_level} == {"erk"}:  # one distribution (and the older pages)
        return ["", "Per-layer density of the sparse kernels (ERK; identical across seeds "
                "and methods at one sparsity):", "",
                *tables.md_table(["sparsity", *(f"`{p}`" for p in layers)],
                                 ([f"{s:g}", *(f"{d.get(p, 1.0):.4f}" for p in layers)]
                                  for (_, s), (d, _) in by_level.items())),
                "", "Sparsity over all kernels, dense head included: "
                + ", ".join(f"{a:.4f} at target {s:g}"
                            for (_, s), (_, a) in sorted(by_level.items())) + "."]
    return ["", "Per-layer density of the sparse kernels (identical across seeds and "
            "methods at one distribution and sparsity), and the sparsity over all kernels "
            "(dense head included):", "",
            *tables.md_table(["sparsity", "distribution", *(f"`{p}`" for p in layers),
                              "all kernels"],
                             ([f"{s:g}", DIST_LABEL.get(dist, dist),
                               *(f"{d.get(p, 1.0):.4f}" for p in layers), f"{a:.4f}"]
                              for (dist, s), (d, a) in sorted(
                                  by_level.items(), key=lambda kv: kv[0][::-1])))]


CLAIMS = (("rigl", "set"), ("set", "static"), ("rigl", "static"))
""""RigL ≥ SET ≥ static" (Evci et al. 2020, Table 1 and Fig. 2; Mocanu et al. 2018), one
pair at a time."""
LABEL = {"dense": "dense", "static": "static", "set": "SET", "rigl": "RigL"}
DIST_LABEL = {"erk": "ERK", "uniform": "uniform", "er": "ER"}


def make_table(task: Task) -> tables.Table:
    """The page of one task's table."""
    lm, erk = task.lm, task is TASKS["lm_erk"]
    quality = ([Column("eval loss", pm_of("eval_loss", 1, 4)),
                Column("eval bits/byte", pm_of("eval_bits_per_byte", 1, 4)),
                Column("train loss", pm_of("train_loss", 1, 4))] if lm else
               [Column("eval accuracy (%)", pm_of("eval_accuracy", 100)),
                Column("eval loss", pm_of("eval_loss", 1, 3)),
                Column("train loss", pm_of("train_loss", 1, 4))])
    data = (tables.LM_DATA_NOTE if lm else
            "Model: {cfg[model]} on scikit-learn digits (8×8, 1,437 train / {eval_size} "
            "eval examples, fixed split).")
    return tables.Table(
        title=("ERK vs uniform layer-wise sparsity on the byte-level LM" if erk else
               "Dense vs static vs SET vs RigL on the byte-level LM" if lm else
               "Dense vs static vs SET vs RigL on the digits MLP"),
        context=lambda result: {"update_steps": _update_steps(result["config"]),
                                "tolerance": TOLERANCE},
        setup=[
            "Config: `{cfg[config]}:<method>,<sparsity>` with its defaults"
            + (" but {cfg[num_steps]} steps and ΔT = {cfg[update_every]}" if lm else "")
            + "; `config.seed` and (static, SET, RigL) `config.method.seed` both set to "
            "the seed (seeds {seeds}).",
            *(["Model: {cfg[model]}.", data] if lm else [data]),
            "Training: {cfg[num_steps]} steps, batch {cfg[batch_size]}, {cfg[optimizer]}.",
            "Sparsity: {cfg[distribution]} layer-wise densities over the sparse kernels; "
            "rules {cfg[rules]} (the head stays dense, biases are never sparse); masks "
            "initialised `{cfg[mask_init]}`. The target sparsity is over the sparse "
            "kernels only.",
            "SET/RigL: mask update every ΔT = {cfg[update_every]} steps, drop fraction "
            "{cfg[drop_fraction]} annealed ({cfg[drop_fraction_anneal]}) to 0 at "
            "T_end = {cfg[end_fraction]} × steps = step {cfg[end_step]}, so masks update at "
            "steps {update_steps}; RigL skips the gradient step on update steps, SET does "
            "not (the library's defaults, as in the reference code).",
            "Wall time is the whole `train_and_evaluate` call (compile, eval, orbax "
            "checkpoints included).",
            "Train loss is the loop's mean over the last logging window (the final 50 "
            "steps), on masked weights.",
            "Eval numbers are after the last step. Each cell is mean ± sample std (ddof = 1) "
            "over {n_seeds} seed(s)" + ("." if lm else "; one eval example is 0.28 "
                                        "accuracy points."),
            "Realised sparsity: measured from each run's final masks and from the loop's "
            "`train_sparsity`; every run was checked to equal the target within "
            "{tolerance}.",
            If("has_flops",
               "FLOPs (`sparsejax.flops`): dense inference is {dense_flops:,} FLOPs per "
               + ("sequence" if lm else "example") + " (2 per multiply-add, kernels only). "
               "Inference = Σ layer FLOPs × layer density. "
               "Training per step after Evci et al. 2020, App. H: dense 3·f_D, static/SET "
               "3·f_S, RigL (3·f_S·ΔT + 2·f_S + f_D)/(ΔT + 1). The RigL formula charges a "
               "dense gradient every ΔT steps for all of training, though updates stop at "
               "T_end, so it slightly overstates RigL. These are theoretical counts: this "
               "implementation multiplies masked dense matrices, so wall time does not "
               "fall with sparsity.",
               "FLOPs: `sparsejax.flops` was not available when this was made."),
        ],
        group_by=("method", "distribution", "sparsity") if erk else ("method", "sparsity"),
        columns=[
            Column("method", level(0)),
            *([Column("distribution", level(1, labels=DIST_LABEL))] if erk else []),
            Column("sparsity", level(1 + erk, "{:g}")),
            *quality,
            Column("sparsity realised", mean_of("sparsity_from_masks", ".4f")),
            Column("rel. inference FLOPs", mean_of("inference_flops_rel", ".3f"), "has_flops"),
            Column("rel. training FLOPs / step", mean_of("train_flops_rel", ".3f"), "has_flops"),
            Column("wall time (s)", pm_of("wall_time_s", 1, 1)),
        ],
        sections=[
            _layer_densities,
            *([] if lm else [tables.paired(
                "Paired accuracy differences (same seed: same init and data order), "
                "in points, mean ± sample std over seeds:",
                ("method", "sparsity"), "sparsity", "sparsities",
                [("static", "dense"), ("set", "dense"), ("rigl", "dense"),
                 ("rigl", "static"), ("rigl", "set"), ("set", "static")], fmt="{:g}")]),
            tables.claims((("erk", "uniform"),), {**LABEL, **DIST_LABEL},
                          ("distribution", "sparsity"), within="method") if erk else
            tables.claims(CLAIMS, LABEL),
        ],
        reading="3–5",
    )


# ----------------------------------------------------------------------------- the sweep


def sweep(out: tables.Outputs) -> tables.Sweep:
    """The plan of (method, sparsity, seed) runs from the flags, and the JSON."""
    task = TASKS[FLAGS.task]
    methods, distributions = list(FLAGS.methods), list(FLAGS.distributions)
    sparsities = [float(s) for s in FLAGS.sparsities]
    seeds = [int(s) for s in FLAGS.seeds]
    num_steps = FLAGS.num_steps
    if FLAGS.quick:
        seeds, sparsities, num_steps = seeds[:1], [0.9], num_steps or 100
    unknown = set(methods) - set(SPARSITY_METHODS)
    if unknown:
        raise app.UsageError(f"unknown methods {sorted(unknown)}; known: {SPARSITY_METHODS}")
    for d in distributions:
        try:
            as_distribution(d)
        except ValueError as e:
            raise app.UsageError(f"--distributions: {e}") from None
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise app.UsageError(f"sparsity {s} is outside (0, 1)")
    plan = [(m, None, None, k) if m == "dense" else (m, d, s, k)
            for m in methods for d in ([None] if m == "dense" else distributions)
            for s in ([None] if m == "dense" else sparsities)
            for k in seeds]
    keys = ("method", "distribution", "sparsity")

    def finish(runs: list[dict], total_time: float) -> dict:
        cfg = config_summary(task, num_steps, distributions)
        f_dense = tables.dense_flops(task.module.get_config())
        add_flops(runs, f_dense)
        f_info = {"dense_per_layer": f_dense, "dense_total": flops.total(f_dense),
                  "per": "one example (batch 1), inference"}
        return {
            "config": cfg, "methods": methods, "distributions": distributions,
            "sparsities": sparsities,
            "seeds": seeds, "std": "sample (ddof=1)", "tolerance": TOLERANCE,
            "total_time_s": total_time, "flops": f_info, "runs": runs,
            "summary": [
                {"method": m, "distribution": d, "sparsity": s, "n": len(rs),
                 **{f"{k}_mean": mean_std([r[k] for r in rs])[0] for k in
                    ("eval_accuracy", "eval_loss", "sparsity_from_masks", "wall_time_s")},
                 **{f"{k}_std": mean_std([r[k] for r in rs])[1] for k in
                    ("eval_accuracy", "eval_loss", "wall_time_s")},
                 "inference_flops_rel": rs[0]["inference_flops_rel"],
                 "train_flops_rel": rs[0]["train_flops_rel"]}
                for (m, d, s), rs in group(runs, keys).items()],
        }

    return tables.Sweep(
        plan, functools.partial(run_one, FLAGS.task, num_steps),
        lambda it: (f"{it[0]:6s} {it[1] or '-':7s} s={'-' if it[2] is None else f'{it[2]:g}':5s} "
                    f"seed={it[3]}"),
        lambda r: (f"acc={100 * r['eval_accuracy']:.2f} loss={r['eval_loss']:.4f} "
                   f"sparsity={r['sparsity_from_masks']:.4f} ({r['wall_time_s']:.1f} s)"),
        finish, FLAGS.jobs)


def main(argv):
    task = tables.select_task(TASKS)
    for name, value in PLAN.get(FLAGS.task, {}).items():
        FLAGS.set_default(name, value)
    tables.main(argv, tables.Script("experiments.dst_table", make_table(task)), sweep)


if __name__ == "__main__":
    app.run(main)
