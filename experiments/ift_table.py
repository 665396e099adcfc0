"""Dense vs the Sparse-IFT families at equal FLOPs, on the digits MLP (all four families
at s = 0.5, 0.75, 0.9) or the byte LM (Wide and Doped at s = 0.5, 0.75), with a verdict
on "Sparse-IFT ≥ dense at equal FLOPs" (Thangarasa et al. 2023) for each family and s.

    python -m experiments.ift_table                      # 39 runs → docs/results/ift_digits.*
    python -m experiments.ift_table --task=lm --jobs=2   # 15 runs → docs/results/ift_lm.*
    python -m experiments.ift_table --quick              # smoke test: 1 seed, s = 0.75, 100 steps
    python -m experiments.ift_table --methods=dense,doped --sparsities=0.9 --seeds=0,1
    python -m experiments.ift_table --render_only        # Markdown + plot from the JSON

Every (family, s, seed) trains ``configs/quickstart.py:<family>,<s>`` (Sparse-IFT at
``s``, trained with RigL, uniform distribution: every sparse kernel exactly ``s``; Sparse
Wide solves ``s'`` for its widened layers so the FLOPs match) with the MLP given
``--hidden`` (default three hidden layers of 256, ``config.model.hidden = (256, 256,
256)``): the default ``config.ift.layers`` transforms every Linear but the stem and the
head, so ``layers/1`` and ``layers/2`` are transformed while ``layers/0`` (the stem) and
``head`` stay dense. With the quickstart's two hidden layers only one layer would be.
``--task=lm`` trains ``configs/lm_bytes.py:<family>,<s>`` shortened to ``TASKS['lm']``'s
steps and mask-update interval, as ``dst_table``: every block kernel (attention q/k/v/o,
FFN up/down) is transformed; the embedding and the head stay dense (Wide widens them).
Each run is in a temporary workdir that is deleted afterwards; ``config.seed`` (init,
data order) and, for RigL, ``config.method.seed`` (random masks) are set to the seed. Dense
runs once per seed.

FLOPs are measured, not assumed: the model of each run is built as the trainer builds it
(``sparse_ift_plan`` → ``build_model`` → ``ift.transform``), its parameter shapes are checked
against the trained state, and ``ift.measured_flops`` prices its traced forward pass with
each rule-matched kernel at density ``1 − s``. The same count is redone from the realised
densities of the run's final RigL masks (which must equal ``1 − s`` per kernel within
1e-3, and cover exactly the rule-matched kernels). Both must be within 1% of the dense
model's FLOPs, or the script stops with an error; the check is done for every planned
config before any training, and again after each run.

Writes JSON with every per-seed number, a Markdown table (mean ± sample std, ddof = 1)
and a plot of accuracy against ``s``. The "Reading" section of the Markdown is prose
written by a person, kept across reruns between the ``reading:begin``/``reading:end``
markers. The sweep runner and the Markdown renderer are shared with the other tables
(``experiments/tables.py``); this file holds one run, the FLOPs checks, the JSON fields,
the plot and the page's ``TABLE`` spec.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags, logging
from flax import nnx

import functools
import math

from configs import lm_bytes, quickstart
from experiments import tables
from experiments.tables import (Column, Task, first_of, group, level, mean_of, mean_std, pm_of,
                                rank)
from sparsejax import flops, ift, surgery
from configs.common import END_FRACTION
from sparsejax.analysis import find_masks
from sparsejax.paths import match_rules, named_leaves
from sparsejax.train import build, build_model
from sparsejax.train.data import get_dataset

TASKS = {
    "digits": Task("configs/quickstart.py", quickstart, "ift_digits", "eval_accuracy", True),
    # as dst_table's LM: 500 steps of batch 16 × 128 bytes, ΔT = 50, one eval at the end
    "lm": Task("configs/lm_bytes.py", lm_bytes, "ift_lm", "eval_loss", False,
               {"num_steps": 500, "batch_size": 16, "update_every": 50, "eval_every": 0}),
}
PLAN = {  # the task's default plan (flags given on the command line win)
    "lm": {"methods": ["dense", "wide", "doped"], "sparsities": ["0.5", "0.75"]},
}

flags.DEFINE_enum("task", "digits", list(TASKS), "what to train: the digits MLP or the byte LM")
flags.DEFINE_list("methods", ["dense", "wide", "parallel", "factorized", "doped"],
                  "dense and Sparse-IFT families (--task=lm: dense,wide,doped)")
flags.DEFINE_list("sparsities", ["0.5", "0.75", "0.9"], "Sparse-IFT s, not for dense "
                  "(--task=lm: 0.5,0.75)")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (config.seed, and config.method.seed where the method has one)")
flags.DEFINE_list("hidden", ["256", "256", "256"], "digits: MLP hidden widths "
                  "(config.model.hidden)")
flags.DEFINE_integer("num_steps", 0, "training steps (0: the task's: digits 1500, LM 500)")
flags.DEFINE_integer("jobs", 1, "runs at once, each in its own process")
flags.DEFINE_string("out_md", "docs/results/ift_digits.md", "Markdown table")
flags.DEFINE_string("out_json", "docs/results/ift_digits.json", "per-seed JSON")
flags.DEFINE_string("out_png", "docs/results/ift_digits.png", "accuracy-vs-s plot")
flags.DEFINE_bool("quick", False, "smoke test: seed 0, s = 0.75, 100 steps; unless --out_* "
                  "are given, writes under runs/ instead of docs/")
flags.DEFINE_bool("render_only", False, "rewrite --out_md and --out_png from the existing "
                  "--out_json (no training)")
FLAGS = flags.FLAGS

FAMILIES = ("wide", "parallel", "factorized", "doped")
LABEL = {"dense": "dense", "wide": "Sparse Wide", "parallel": "Sparse Parallel",
         "factorized": "Sparse Factorized", "doped": "Sparse Doped"}
FLOPS_TOLERANCE = 0.01  # |relative FLOPs − 1|
DENSITY_TOLERANCE = 1e-3  # |realised kernel density − (1 − s)|


# ----------------------------------------------------------------------------- one run


def make_config(task: str, method: str, s: float | None, seed: int, num_steps: int,
                hidden: tuple):
    config = tables.task_config(TASKS[task], "dense" if method == "dense" else f"{method},{s}",
                                num_steps)
    if task == "digits":
        config.model.hidden = tuple(hidden)
    config.seed = seed
    if "seed" in config.method:  # random masks (dense has none)
        config.method.seed = seed
    return config


def _widths(model: dict) -> list[int]:
    """The widths Sparse Wide scales: the MLP's hidden widths, or the LM's d_model, d_ff."""
    return list(model["hidden"]) if "hidden" in model else [model["d_model"], model["d_ff"]]


def architecture(config) -> dict:
    """The model of ``config`` built as ``make_trainer`` builds it, its sparsity rules and
    its measured FLOPs (``ift.measured_flops``), plus the family's shape parameters."""
    info = get_dataset(config.data).info
    x = jnp.zeros((1, *info.input_shape), jnp.int32 if info.task == "lm" else jnp.float32)
    call = lambda m: m(x)  # noqa: E731
    built = build(config, info)  # the builder step make_trainer runs
    rules = list(built.plan.rules or [])
    c = config.ift
    transformed, geometry = [], {}
    if c.family != "none":  # the layers Sparse-IFT selects, before any rewrite
        before = build_model(config.model_name, built.plan.model, info, nnx.Rngs(params=0))
        transformed = ift.select(before, c.layers, call)
        modules = dict(surgery.named_modules(before))
        geometry = {p: (modules[p].in_features, modules[p].out_features) for p in transformed}
    model = built.make_model(jax.random.key(0))
    shapes = {p: tuple(v.shape) for p, v in
              named_leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
    out = {"model_hidden": _widths(built.plan.model), "rules": [list(r) for r in rules],
           "transformed": transformed, "geometry": {p: list(g) for p, g in geometry.items()},
           "flops": ift.measured_flops(model, rules, call),
           "flops_dense_model": flops.model_flops(model, call), "param_shapes": shapes}
    if c.family != "none":
        s = float(c.sparsity)
        shapes = list(dict.fromkeys(geometry.values()))  # (d_in, d_out) of the layers

        def per_shape(f):  # one number when every layer has one shape (the MLP)
            v = {f"{i}→{o}": f(i, o, s) for i, o in shapes}
            return next(iter(v.values())) if len(v) == 1 else v

        out["family"] = c.family
        if c.family == "wide":
            out["width_multiplier"] = ift.width_multiplier(s)
            out["solved_sparsity"] = rules[0][1]
        elif c.family == "parallel":
            out["num_branches"] = ift.num_branches(s)
        elif c.family == "factorized":
            out["d_sf"] = per_shape(ift.factorized_dim)
        elif c.family == "doped":
            out["rank"] = per_shape(ift.doped_rank)
    return out


def _check_flops(what: str, rel: float) -> None:
    if abs(rel - 1.0) > FLOPS_TOLERANCE:
        raise RuntimeError(f"{what}: FLOPs are {rel:.4f}× dense, not within "
                           f"{FLOPS_TOLERANCE:.0%} of the dense model")


def preflight(task: str, plan, num_steps: int, hidden: tuple) -> dict:
    """Builds every planned (method, s) model and checks its measured FLOPs against dense
    before any training; returns the dense FLOPs (total and per layer)."""
    dense = architecture(make_config(task, "dense", None, 0, num_steps, hidden))
    for m, s in dict.fromkeys((m, s) for m, s, _ in plan):
        if m == "dense":
            continue
        a = architecture(make_config(task, m, s, 0, num_steps, hidden))
        _check_flops(f"{m} s={s} (before training)", a["flops"] / dense["flops"])
        logging.info("%s s=%g: %.4f× dense FLOPs", m, s, a["flops"] / dense["flops"])
    per = "sequence" if task == "lm" else "example"
    return {"dense_total": dense["flops"], "dense_per_layer": dense["flops_dense_model"],
            "per": f"one {per} (batch 1), inference, 2 FLOPs per multiply-add, kernels only"}


def run_one(task: str, num_steps: int, hidden: tuple, dense_flops: float, method: str,
            s: float | None, seed: int) -> dict:
    """Trains one config of ``TASKS[task]`` in a temporary workdir; returns its numbers,
    checked FLOPs and parameter counts."""
    config = make_config(task, method, s, seed, num_steps, hidden)
    final = {}
    summary, _ = tables.run_config(
        config, hooks=[tables.final_state_hook(config.num_steps, final)], prefix="ift_table_")
    state = final["state"]
    arch = architecture(config)
    params = dict(named_leaves(state.params))
    trained_shapes = {p: tuple(v.shape) for p, v in params.items()}
    if trained_shapes != arch["param_shapes"]:
        raise RuntimeError(f"{method} s={s}: the rebuilt model's parameters differ from the "
                           "trained state's; FLOPs would be measured on the wrong model")
    masks = {p: m for p, m in named_leaves(find_masks(state.opt_state) or {}) if m is not None}
    rule_s = {p: s for p, _, pattern, s in match_rules(state.params, arch["rules"], "sparsity")
              if pattern is not None} if arch["rules"] else {}
    matched = sorted(rule_s)
    if sorted(masks) != matched:
        raise RuntimeError(f"{method} s={s}: masked leaves {sorted(masks)} are not the "
                           f"rule-matched kernels {matched}")
    layer_density = {p: float(m.sum()) / m.size for p, m in masks.items()}
    for p, d in layer_density.items():
        if abs(d - (1.0 - rule_s[p])) > DENSITY_TOLERANCE:
            raise RuntimeError(f"{method} s={s} seed={seed}: {p} has density {d:.6f}, not "
                               f"1 − {rule_s[p]:.6f}")
    realised = flops.total(flops.sparse_flops(arch["flops_dense_model"], layer_density))
    out = {
        "method": method, "sparsity": s, "seed": seed, "steps": summary["steps"],
        "eval_accuracy": summary["eval_accuracy"], "eval_loss": summary["eval_loss"],
        "eval_bits_per_byte": summary["eval_loss"] / math.log(2),
        "train_loss": summary.get("train_loss"),
        "hidden": arch["model_hidden"], "transformed": arch["transformed"],
        "rules": arch["rules"],
        "flops": arch["flops"], "flops_rel": arch["flops"] / dense_flops,
        "flops_from_masks": realised, "flops_from_masks_rel": realised / dense_flops,
        "params": int(sum(v.size for v in params.values())),
        "nonzero_params": int(sum(v.size for v in params.values())
                              - sum(m.size - int(m.sum()) for m in masks.values())),
        "sparse_kernel_params": int(sum(m.size for m in masks.values())),
        "layer_density": layer_density,
        "wall_time_s": summary["wall_time_s"],
    }
    if method != "dense":  # RigL's dense gradient every ΔT steps is on the transformed model
        f_model = flops.total(arch["flops_dense_model"])
        out["train_flops_rel"] = flops.training_flops_per_step(
            config.method.name, f_model, realised, config.method.update_every) / (3 * dense_flops)
    else:
        out["train_flops_rel"] = 1.0
    for k in ("width_multiplier", "solved_sparsity", "num_branches", "d_sf", "rank"):
        if k in arch:
            out[k] = arch[k]
    _check_flops(f"{method} s={s} seed={seed} (measured_flops)", out["flops_rel"])
    _check_flops(f"{method} s={s} seed={seed} (from the final masks)",
                 out["flops_from_masks_rel"])
    return out


def config_summary(task: Task, num_steps: int, hidden: tuple) -> dict:
    c = tables.task_config(task, "rigl,0.9", num_steps)  # end_step follows num_steps
    o, s, m = c.optimizer, c.method, c.model
    if task.lm:
        hidden = (m.d_model, m.d_ff)
    else:
        m.hidden = tuple(hidden)
    return {
        "task": next(k for k, t in TASKS.items() if t is task), "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "config": task.config, "model": tables.model_summary(c),
        "hidden": list(hidden), "data": dict(c.data),
        "num_steps": c.num_steps, "batch_size": c.batch_size,
        "optimizer": (f"{o.name} lr={o.learning_rate} wd={o.weight_decay} {o.schedule} "
                      f"schedule, {o.warmup_steps} warm-up steps"),
        "mask_init": s.mask_init, "update_every": s.update_every,
        "drop_fraction": s.drop_fraction, "drop_fraction_anneal": s.drop_fraction_anneal,
        "end_fraction": END_FRACTION, "end_step": s.end_step,
        "ift_norm": c.ift.norm or "default (LayerNorm after Linear)", "ift_sigma": c.ift.sigma,
        "ift_rules": list(c.ift.layers or ()) or "default: every Linear/Conv but the stem and head",
    }


# ----------------------------------------------------------------------------- the page


def _order(key: tuple, result: dict):
    """(method, s) rows: dense first, then families and s in flag order."""
    method, s = key
    return method != "dense", rank(result["methods"], method), rank(result["sparsities"], s)


def _shape(r: dict) -> str:
    m = r["method"]
    lm = any(p.startswith("blocks/") for p in r["transformed"])  # the LM's [d_model, d_ff]
    if m == "wide":
        wide = (f"d_model {r['hidden'][0]}, d_ff {r['hidden'][1]}" if lm else
                f"{r['hidden'][0]} wide")
        return f"×{r['width_multiplier']:.3f} → {wide}, s′ = {r['solved_sparsity']:.4f}"
    if m == "parallel":
        return f"B = {r['num_branches']}"

    def knob(v):  # one value, or one per layer shape
        return str(v) if not isinstance(v, dict) else ", ".join(
            f"{x} ({k})" for k, x in v.items())

    if m == "factorized":
        return f"d_sf = {knob(r['d_sf'])}"
    if m == "doped":
        return f"r = {knob(r['rank'])}"
    return "—"


def make_table(task: Task) -> tables.Table:
    """The page of one task's table."""
    return LM_TABLE if task.lm else TABLE


TABLE = tables.Table(
    title="Sparse-IFT families vs dense on the digits MLP, at equal FLOPs",
    context=lambda result: {"hidden": tuple(result["config"]["hidden"]),
                            "n_hidden": len(result["config"]["hidden"]),
                            "flops_tolerance": FLOPS_TOLERANCE},
    setup=[
        "Config: `{cfg[config]}:<family>,<s>` (`dense` for the baseline) with "
        "`config.model.hidden = {hidden}`; `config.seed` and (RigL) `config.method.seed` "
        "both set to the seed (seeds {seeds}).",
        "Model: {cfg[model]} on scikit-learn digits (8×8, 1,437 train / {eval_size} eval "
        "examples, fixed split). The quickstart MLP has two hidden layers; this table uses "
        "{n_hidden}, so that with the default `config.ift.layers` (every Linear but the stem "
        "and the head) **two layers, `layers/1` and `layers/2`, are transformed, while the "
        "stem `layers/0` and the `head` stay dense** (in Sparse Wide they are widened but "
        "stay dense).",
        "Training: {cfg[num_steps]} steps, batch {cfg[batch_size]}, {cfg[optimizer]}.",
        "Sparsity: RigL (`config.ift` sets it), uniform distribution; the Sparse-IFT rules "
        "give every sparse kernel exactly s (Wide: the solved s′); masks initialised "
        "`{cfg[mask_init]}`, updated every ΔT = {cfg[update_every]} steps, drop fraction "
        "{cfg[drop_fraction]} annealed ({cfg[drop_fraction_anneal]}) to 0 at step "
        "{cfg[end_step]} ({cfg[end_fraction]} × steps). Biases, norms, the dense low-rank "
        "path of Doped, the stem and the head are never sparse.",
        "Families (`sparsejax.ift`, per transformed 256 → 256 layer): Wide multiplies every "
        "hidden width by √(1/(1−s)) and solves the sparsity s′ of the widened layers so the "
        "model's FLOPs equal dense (stem and head stay dense and grow with the width); "
        "Parallel sums B = round(1/(1−s)) sparse branches, each followed by a LayerNorm; "
        "Factorized is V·σ(U·x) with d_sf = ⌈d_in·d_out / ((1−s)(d_in + d_out))⌉ and σ = "
        "LayerNorm + ReLU, U and V sparse; Doped is W_sparse·x + V(U·x) with a dense rank "
        "r = ⌊s·d_in·d_out / (d_in + d_out)⌋.",
        "FLOPs (`sparsejax.ift.measured_flops`): each run's model is rebuilt as the trainer "
        "builds it (`sparsejax.train.build`: `sparse_ift_plan` → `build_model` → "
        "`ift.transform`, parameter shapes "
        "checked against the trained state) and its traced forward pass is priced with "
        "every sparse kernel at density 1 − s. Dense inference is {dense_flops:,} FLOPs per "
        "example (2 per multiply-add, kernels only; biases, norms and activations are not "
        "counted, which slightly flatters Parallel and Factorized, whose LayerNorms are "
        "extra elementwise work). The count redone from each run's final RigL masks agrees, "
        "and every run was checked to be within {flops_tolerance:.0%} of dense by both "
        "counts (the script stops otherwise). These are theoretical counts: masked dense "
        "matrices are multiplied, so wall time grows with the transformed model's dense "
        "size.",
        "Parameters: all trainable parameters of the transformed model (biases and norm "
        "scales included), and those left after the RigL masks (pruned kernel entries "
        "removed).",
        "Train loss is the loop's mean over the last logging window (the final 50 steps), "
        "on masked weights. Accuracy and loss are on the eval split after the last step. "
        "Each cell is mean ± sample std (ddof = 1) over {n_seeds} seed(s); one eval example "
        "is 0.28 accuracy points.",
        "Wall time is the whole `train_and_evaluate` call (compile, eval, orbax checkpoints "
        "included) on a shared 2-core machine, so it is noisy.",
    ],
    group_by=("method", "sparsity"),
    order=_order,
    columns=[
        Column("method", level(0, labels=LABEL)),
        Column("s", level(1, "{:g}")),
        Column("shape", lambda key, rs: _shape(rs[0])),
        Column("eval accuracy (%)", pm_of("eval_accuracy", 100)),
        Column("FLOPs / dense", mean_of("flops_rel", ".4f")),
        Column("eval loss", pm_of("eval_loss", 1, 3)),
        Column("train loss", pm_of("train_loss", 1, 1, "e")),
        Column("params", first_of("params", ",")),
        Column("nonzero params", first_of("nonzero_params", ",")),
        Column("wall time (s)", pm_of("wall_time_s", 1, 1)),
    ],
    sections=[
        tables.text("FLOPs / dense is measured per run (identical across seeds); \"shape\" "
                    "is the family's knob per transformed layer (Wide: width multiplier, "
                    "resulting hidden width and solved sparsity s′ of `layers/1` and "
                    "`layers/2`)."),
        tables.paired("Paired accuracy differences to dense (same seed: same data order; "
                      "the models, hence their initialisations, differ), in points, mean ± "
                      "sample std over seeds:", ("method", "sparsity"), "s", "sparsities",
                      lambda result: [(f, "dense") for f in result["methods"] if f != "dense"],
                      LABEL, "{:g}"),
        tables.claims(lambda result: [(f, "dense") for f in result["methods"] if f != "dense"],
                      LABEL, pairing="same seed: same data order; the models, hence their "
                      "initialisations, differ"),
        tables.image("Eval accuracy and loss against s, by family",
                     "`{png}`: eval accuracy and loss against s, mean ± sample std over seeds "
                     "(points offset slightly in s for legibility); black line and band: "
                     "dense."),
    ],
    reading="3–5",
)


LM_TABLE = tables.Table(
    title="Sparse Wide and Sparse Doped vs dense on the byte-level LM, at equal FLOPs",
    context=lambda result: {"flops_tolerance": FLOPS_TOLERANCE},
    setup=[
        "Config: `{cfg[config]}:<family>,<s>` (`dense` for the baseline) with its defaults "
        "but {cfg[num_steps]} steps and ΔT = {cfg[update_every]}; `config.seed` and (RigL) "
        "`config.method.seed` both set to the seed (seeds {seeds}).",
        "Model: {cfg[model]}.",
        tables.LM_DATA_NOTE,
        "Training: {cfg[num_steps]} steps, batch {cfg[batch_size]}, {cfg[optimizer]}.",
        "Sparse-IFT (`config.ift`, default layers): every block kernel is transformed "
        "(attention q, k, v, o: 128 → 128; FFN up 128 → 512, down 512 → 128); the "
        "embedding, the positions and the head stay dense (Wide widens them).",
        "Sparsity: RigL, uniform distribution; the Sparse-IFT rules give every sparse kernel "
        "exactly s (Wide: the solved s′); masks initialised `{cfg[mask_init]}`, updated "
        "every ΔT = {cfg[update_every]} steps, drop fraction {cfg[drop_fraction]} annealed "
        "({cfg[drop_fraction_anneal]}) to 0 at step {cfg[end_step]} ({cfg[end_fraction]} × "
        "steps). Biases, norms and the dense low-rank path of Doped are never sparse.",
        "Families (`sparsejax.ift`): Wide multiplies d_model and d_ff by √(1/(1−s)) and "
        "solves the sparsity s′ of the widened block kernels so the model's FLOPs equal "
        "dense (embedding and head stay dense and grow with d_model); Doped is "
        "W_sparse·x + V(U·x) with a dense rank r = ⌊s·d_in·d_out / (d_in + d_out)⌋ per "
        "layer shape.",
        "FLOPs (`sparsejax.ift.measured_flops`): each run's model is rebuilt as the trainer "
        "builds it and its traced forward pass is priced with every sparse kernel at "
        "density 1 − s; the count redone from each run's final RigL masks agrees, and "
        "every run was checked to be within {flops_tolerance:.0%} of dense by both counts. "
        "Dense inference is {dense_flops:,} FLOPs per sequence (2 per multiply-add, "
        "kernels only). **Not counted: the attention scores and their weighted sum "
        "(q·kᵀ and p·v, 4·T·d_model FLOPs per token per layer with T = 128, 13% of the "
        "kernel FLOPs of dense here), which grow with Wide's d_model**: counted in, Wide's "
        "forward costs about 1.05× dense at s = 0.5 (d_model 180) and 1.12× at s = 0.75 "
        "(d_model 256).",
        "Training FLOPs / dense: `sparsejax.flops.training_flops_per_step` (RigL: "
        "(3·f_S·ΔT + 2·f_S + f_D)/(ΔT + 1), with f_D the transformed model's dense "
        "forward) over dense's 3·f_D. These are theoretical counts: masked dense "
        "matrices are multiplied, so wall time grows with the transformed model's dense "
        "size.",
        "Parameters: all trainable parameters of the transformed model (biases and norm "
        "scales included), and those left after the RigL masks.",
        "Train loss is the loop's mean over the last logging window (the final 50 steps), "
        "on masked weights. Eval numbers are after the last step. Each cell is mean ± "
        "sample std (ddof = 1) over {n_seeds} seed(s).",
        "Wall time is the whole `train_and_evaluate` call (compile, eval, orbax checkpoints "
        "included), two runs at a time on a 2-core machine, so it is noisy.",
    ],
    group_by=("method", "sparsity"),
    order=_order,
    columns=[
        Column("method", level(0, labels=LABEL)),
        Column("s", level(1, "{:g}")),
        Column("shape", lambda key, rs: _shape(rs[0])),
        Column("eval loss", pm_of("eval_loss", 1, 4)),
        Column("eval bits/byte", pm_of("eval_bits_per_byte", 1, 4)),
        Column("train loss", pm_of("train_loss", 1, 4)),
        Column("FLOPs / dense", mean_of("flops_rel", ".4f")),
        Column("training FLOPs / dense", mean_of("train_flops_rel", ".4f")),
        Column("params", first_of("params", ",")),
        Column("nonzero params", first_of("nonzero_params", ",")),
        Column("wall time (s)", pm_of("wall_time_s", 1, 1)),
    ],
    sections=[
        tables.claims(lambda result: [(f, "dense") for f in result["methods"] if f != "dense"],
                      LABEL, pairing="same seed: same data order; the models, hence their "
                      "initialisations, differ"),
        tables.image("Eval bits per byte against s, by family",
                     "`{png}`: eval bits per byte and train loss against s, mean ± sample std "
                     "over seeds (points offset slightly in s for legibility); black line and "
                     "band: dense."),
    ],
    reading="3–5",
)


def plot(result: dict, path: Path) -> None:
    """Eval accuracy (left) and eval loss (right) against s, one line per family with
    sample-std error bars, dense as a line with a ±std band."""
    import matplotlib  # optional (the notebooks extra): only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, sparsities = result["runs"], result["sparsities"]
    fams = [m for m in result["methods"] if m != "dense"]
    g = group(runs, ("method", "sparsity"))
    lm = result["config"].get("task") == "lm"
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = ((("eval_bits_per_byte", 1, "eval bits per byte"), ("train_loss", 1, "train loss"))
              if lm else (("eval_accuracy", 100, "eval accuracy (%)"),
                          ("eval_loss", 1, "eval loss")))
    for ax, (key, scale, name) in zip(axes, panels):
        if ("dense", None) in g:
            m, sd = mean_std([r[key] * scale for r in g[("dense", None)]])
            sd = 0.0 if sd != sd else sd
            ax.axhline(m, color="k", lw=1.2, label="dense")
            ax.axhspan(m - sd, m + sd, color="k", alpha=0.1)
        for i, f in enumerate(fams):
            xs, ys, es = [], [], []
            for s in sparsities:
                if (f, s) in g:
                    mu, sd = mean_std([r[key] * scale for r in g[(f, s)]])
                    xs.append(s + (i - (len(fams) - 1) / 2) * 0.006)
                    ys.append(mu)
                    es.append(0.0 if sd != sd else sd)
            ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=3, lw=1.2, label=LABEL[f])
        ax.set_xticks(sparsities)
        ax.set_xlim(min(sparsities) - 0.05, max(sparsities) + 0.05)
        ax.set_xlabel("Sparse-IFT sparsity s (equal FLOPs to dense)")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    n = len(result["seeds"])
    widths = " → ".join(map(str, (64, *result["config"]["hidden"], 10)))
    what = "the byte LM" if lm else f"the digits MLP {widths}"
    fig.suptitle(f"Sparse-IFT on {what}, RigL, "
                 f"{result['config']['num_steps']} steps: mean ± sample std over "
                 f"{n} seed{'s' * (n != 1)}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)




# ----------------------------------------------------------------------------- the sweep


def sweep(out: tables.Outputs) -> tables.Sweep:
    """The plan of (method, s, seed) runs from the flags, checked for equal FLOPs before
    any training, and the JSON."""
    task = TASKS[FLAGS.task]
    methods = list(FLAGS.methods)
    sparsities = [float(s) for s in FLAGS.sparsities]
    seeds = [int(s) for s in FLAGS.seeds]
    hidden = tuple(int(h) for h in FLAGS.hidden)
    num_steps = FLAGS.num_steps
    if FLAGS.quick:
        seeds, sparsities, num_steps = seeds[:1], [0.75], num_steps or 100
    unknown = set(methods) - {"dense", *FAMILIES}
    if unknown:
        raise app.UsageError(f"unknown methods {sorted(unknown)}; known: "
                             f"{['dense', *FAMILIES]}")
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise app.UsageError(f"sparsity {s} is outside (0, 1)")
    if task is TASKS["digits"] and len(hidden) < 3:
        logging.warning("with %d hidden layers only %d layer(s) are transformed", len(hidden),
                        max(len(hidden) - 1, 0))
    plan = [(m, None if m == "dense" else s, k)
            for m in methods for s in ([None] if m == "dense" else sparsities) for k in seeds]
    f_info = preflight(FLAGS.task, plan, num_steps, hidden)

    def finish(runs: list[dict], total_time: float) -> dict:
        keys = ("eval_accuracy", "eval_loss", "eval_bits_per_byte", "train_loss",
                "wall_time_s")
        summary = []
        order = lambda key: _order(key, {"methods": methods, "sparsities": sparsities})  # noqa
        for (m, s), rs in group(runs, ("method", "sparsity"), order).items():
            row = {"method": m, "sparsity": s, "n": len(rs), "shape": _shape(rs[0]),
                   "flops_rel": rs[0]["flops_rel"], "train_flops_rel": rs[0]["train_flops_rel"],
                   "params": rs[0]["params"],
                   "nonzero_params": rs[0]["nonzero_params"]}
            for k in keys:
                row[f"{k}_mean"], row[f"{k}_std"] = mean_std([r[k] for r in rs])
            summary.append(row)
        return {
            "config": config_summary(task, num_steps, hidden),
            "methods": methods, "sparsities": sparsities, "seeds": seeds,
            "std": "sample (ddof=1)", "flops_tolerance": FLOPS_TOLERANCE,
            "density_tolerance": DENSITY_TOLERANCE, "total_time_s": total_time,
            "flops": f_info, "plot": str(out.png), "out_md": str(out.md),
            "summary": summary, "runs": runs,
        }

    return tables.Sweep(
        plan, functools.partial(run_one, FLAGS.task, num_steps, hidden, f_info["dense_total"]),
        lambda it: f"{it[0]:10s} s={'-' if it[1] is None else f'{it[1]:g}':4s} seed={it[2]}",
        lambda r: (f"acc={100 * r['eval_accuracy']:.2f} loss={r['eval_loss']:.4f} "
                   f"flops={r['flops_rel']:.4f}× nnz={r['nonzero_params']} "
                   f"({r['wall_time_s']:.1f} s)"),
        finish, FLAGS.jobs)


def main(argv):
    task = tables.select_task(TASKS)
    for name, value in PLAN.get(FLAGS.task, {}).items():
        FLAGS.set_default(name, value)
    tables.main(argv, tables.Script("experiments.ift_table", make_table(task), plot=plot),
                sweep)


if __name__ == "__main__":
    app.run(main)
