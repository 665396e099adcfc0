"""STE vs SR-STE vs MDGF vs SDGF at N:M on the digits MLP or the byte LM, with a verdict
on "SR-STE ≥ STE" (Zhou et al. 2021) and "MDGF/SDGF ≥ SR-STE" (Bambhaniya et al. 2024,
whose claim is for transformers at high sparsity) at every pattern.

    python -m experiments.nm_table                       # 51 runs → docs/results/nm_digits.*
    python -m experiments.nm_table --task=lm --jobs=2    # 39 runs → docs/results/nm_lm.*
    python -m experiments.nm_table --quick               # smoke test: 1 seed, 1:8, 100 steps
    python -m experiments.nm_table --methods=nm_ste,mdgf --patterns=1:16 --seeds=0,1
    python -m experiments.nm_table --render_only         # Markdown + plot from the JSON

``--task=digits`` (patterns 2:4, 1:8, 1:16, 1:32) trains ``configs/quickstart.py``: the
head stays dense by rule, so the pattern applies to the two hidden kernels.
``--task=lm`` (patterns 2:4, 1:16, 1:32) trains ``configs/lm_bytes.py`` shortened to
``TASKS['lm']``'s steps, as ``dst_table``: the pattern applies to every block kernel
(attention q/k/v/o, FFN up/down), embedding and head dense. Groups of M run along each
kernel's input axis. Every (method, pattern, seed) trains ``<config>:<method>,<N:M>``
in a temporary workdir that is deleted afterwards;
``config.seed`` is set to the seed (N:M masks follow ``|w|``: no mask seed), and
``config.log_every`` to ``--log_every`` (10) for finer flip-rate curves. Dense runs once
per seed. Knobs are the library's defaults (SR-STE λ = 2e-4, MDGF exponential decay
with the straight-through backward, SDGF stepwise frames over the whole run, no dense
warm-up or fine-tune phase) except MDGF's α, which is scaled to the run:
``α = --alpha_total / (sparse-phase steps)`` (digits: 6/1500 = 4e-3, so β falls to e⁻⁶ by
the end), because the paper's α = 2e-4 leaves β(1500) = e^-0.3 = 0.74.

Recorded per run: eval accuracy/loss, the train loss over the final 50 steps, the mask
flip rate (``sparsejax.nm`` diagnostics) per step (read by a hook) with its mean over
the run and over the last 25 % of steps, the per-logging-step curves from
``metrics.jsonl`` (flip rate, pruned-weight gradient norm, train loss), and the realised
density of the forward kernels at the final state (what eval computes with; checked to
be exactly N:M). SDGF's frame-boundary steps, where the pattern tightens by design, are
left out of its flip-rate means and listed separately. Relative inference FLOPs come
from ``sparsejax.flops``.

Writes JSON with every per-seed number, a Markdown table (mean ± sample std, ddof = 1)
and a plot of the flip-rate curves. The "Reading" section of the Markdown is prose
written by a person, kept across reruns between the ``reading:begin``/``reading:end``
markers. The sweep runner and the Markdown renderer are shared with the other tables
(``experiments/tables.py``); this file holds one run, the JSON fields, the plot and the
page's ``TABLE`` spec.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np
from absl import app, flags, logging
from flax import nnx

import functools

from configs import lm_bytes, quickstart
from experiments import tables
from experiments.tables import Column, If, Task, group, level, mean_of, mean_std, pm_of, rank
from sparsejax.train import build_model
from sparsejax.train.data import get_dataset
from sparsejax import flops, nm
from sparsejax.train.optim import make_schedule, make_transform
from sparsejax.base import sparsity_states
from sparsejax.paths import named_leaves

TASKS = {
    "digits": Task("configs/quickstart.py", quickstart, "nm_digits", "eval_accuracy", True),
    # as dst_table's LM: 500 steps of batch 16 × 128 bytes, one eval at the end
    "lm": Task("configs/lm_bytes.py", lm_bytes, "nm_lm", "eval_loss", False,
               {"num_steps": 500, "batch_size": 16, "eval_every": 0}),
}
PATTERNS = {"digits": ["2:4", "1:8", "1:16", "1:32"], "lm": ["2:4", "1:16", "1:32"]}

flags.DEFINE_enum("task", "digits", list(TASKS), "what to train: the digits MLP or the byte LM")
flags.DEFINE_list("methods", ["dense", "nm_ste", "sr_ste", "mdgf", "sdgf"], "N:M methods")
flags.DEFINE_list("patterns", [], "N:M patterns, not for dense (default: the task's, "
                  "digits 2:4,1:8,1:16,1:32, LM 2:4,1:16,1:32)")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (config.seed; N:M masks follow |w| and take no seed)")
flags.DEFINE_integer("num_steps", 0, "training steps (0: the task's: digits 1500, LM 500)")
flags.DEFINE_integer("jobs", 1, "runs at once, each in its own process")
flags.DEFINE_integer("log_every", 10, "logging interval of the curves (config.log_every)")
flags.DEFINE_float("alpha_total", 6.0, "MDGF: α = alpha_total / sparse-phase steps, so "
                   "β(end) = exp(-alpha_total)")
flags.DEFINE_string("out_md", "docs/results/nm_digits.md", "Markdown table")
flags.DEFINE_string("out_json", "docs/results/nm_digits.json", "per-seed JSON")
flags.DEFINE_string("out_png", "docs/results/nm_digits_flip_rate.png", "flip-rate plot")
flags.DEFINE_bool("quick", False, "smoke test: seed 0, pattern 1:8, 100 steps; unless "
                  "--out_* are given, writes under runs/ instead of docs/")
flags.DEFINE_bool("render_only", False, "rewrite --out_md and --out_png from the existing "
                  "--out_json (no training)")
FLAGS = flags.FLAGS

NM_METHODS = ("nm_ste", "sr_ste", "mdgf", "sdgf")
LABEL = {"dense": "dense", "nm_ste": "STE", "sr_ste": "SR-STE", "mdgf": "MDGF-exp",
         "sdgf": "SDGF-stepwise"}
TOLERANCE = 1e-6  # |realised density − N/M|
TRAIN_LOSS_STEPS = 50  # train loss: mean over the final 50 steps (as the DST table)


def _nm(pattern: str) -> tuple[int, int]:
    n, m = (int(x) for x in pattern.split(":"))
    return n, m


def _frames(pattern: str) -> list[tuple[int, int]]:
    return nm.stepwise_frames(*_nm(pattern))


def frame_boundaries(pattern: str, sparse_steps: int) -> list[int]:
    """Optimizer counts at which SDGF (stepwise) switches frame: ``k · length``, length =
    sparse_steps // frames (as ``sparsejax.nm``). The flip of count c is logged at step c+1."""
    frames = _frames(pattern)
    length = nm.frame_length(sparse_steps, len(frames))
    return [k * length for k in range(1, len(frames))]


def _sig(x: float, digits: int = 6) -> float:
    return float(f"{x:.{digits}g}")


# ----------------------------------------------------------------------------- one run


def realised_density(config, state) -> dict:
    """Density of the forward kernels at the final state (what eval multiplies with), per
    N:M parameter, with a check that no group of M holds more than N nonzeros."""
    tx = make_transform(config)
    fwd = dict(named_leaves(tx.forward(state.params, state.opt_state)))
    sp = config.method
    specs = nm.resolve_nm_rules(state.params, sp.rules, sp.axis, pattern=sp.pattern)
    out, max_per_group = {}, {}
    for path, spec in specs.items():
        w = np.asarray(fwd[path])
        moved = np.moveaxis(w != 0, spec.axis, -1)
        groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // spec.m, spec.m)
        out[path] = float(moved.mean())
        max_per_group[path] = int(groups.sum(-1).max())
        if max_per_group[path] > spec.n:
            raise RuntimeError(f"{path}: a group of {spec.m} holds {max_per_group[path]} "
                               f"nonzeros, more than N={spec.n}")
    return {"layer_density": out, "max_nonzeros_per_group": max_per_group}


def run_one(task: str, num_steps: int, log_every: int, alpha_total: float, method: str,
            pattern: str | None, seed: int) -> dict:
    """Trains one config of ``TASKS[task]`` in a temporary workdir; returns its numbers
    and curves."""
    config = tables.task_config(TASKS[task], method if method == "dense" else
                                f"{method},{pattern}", num_steps)
    config.seed = seed  # N:M masks follow |w|: no mask seed
    config.log_every = log_every
    steps = config.num_steps
    sp = config.method
    if method != "dense":
        sp.diagnostics_every = 1  # the per-step flip-rate curves
    sparse_steps = sp.get("sparse_steps", steps)
    if method == "mdgf":
        sp.alpha = alpha_total / sparse_steps
    final, flips = {}, []

    def record_flip(step, state):
        for _, s in sparsity_states(state.opt_state):
            flips.append(float(s.diagnostics["flip_rate"]))

    summary, rows = tables.run_config(
        config, hooks=[tables.final_state_hook(steps, final), record_flip],
        prefix="nm_table_")
    train = [r for r in rows if r["split"] == "train"]
    out = {
        "method": method, "pattern": pattern, "seed": seed, "steps": summary["steps"],
        "eval_accuracy": summary["eval_accuracy"], "eval_loss": summary["eval_loss"],
        "eval_bits_per_byte": summary["eval_loss"] / math.log(2),
        "train_loss": statistics.fmean(r["loss"] for r in train
                                       if r["step"] > steps - TRAIN_LOSS_STEPS),
        "wall_time_s": summary["wall_time_s"],
        "curve_steps": [r["step"] for r in train],
        "curves": {"train_loss": [_sig(r["loss"]) for r in train]},
    }
    if method == "dense":
        return {**out, "density": 1.0, "layer_density": {}}
    n, m = _nm(pattern)
    out.update(n=n, m=m, sparse_steps=sparse_steps, dense_steps=sp.dense_steps,
               finetune_steps=sp.finetune_steps)
    if method == "sr_ste":
        out["sr_ste_lambda"] = sp.sr_ste_lambda
    if method == "mdgf":
        out.update(alpha=sp.alpha, decay=sp.decay, backward=sp.backward,
                   beta_last_train_step=math.exp(-sp.alpha * (sparse_steps - 1)))
    boundaries = []
    if method == "sdgf":
        out["frames"] = [f"{a}:{b}" for a, b in nm.stepwise_frames(n, m)]
        boundaries = [c for c in frame_boundaries(pattern, sparse_steps) if c < len(flips)]
        out["frame_boundary_flips"] = [{"step": c + 1, "flip_rate": flips[c]}
                                       for c in boundaries]
    if len(flips) != steps:
        raise RuntimeError(f"recorded {len(flips)} flip rates for {steps} steps")
    skip = set(boundaries)
    kept = [f for c, f in enumerate(flips) if c not in skip]
    last = [f for c, f in enumerate(flips) if c + 1 > 0.75 * steps and c not in skip]
    out["flip_rate_mean"] = statistics.fmean(kept)
    out["flip_rate_last25"] = statistics.fmean(last)
    # Cross-check against metrics.jsonl: the rows average equal windows of all steps.
    out["flip_rate_mean_all_steps"] = statistics.fmean(flips)
    out["flip_rate_mean_from_rows"] = statistics.fmean(r["flip_rate"] for r in train)
    if abs(out["flip_rate_mean_all_steps"] - out["flip_rate_mean_from_rows"]) > 1e-6 + 1e-4 * \
            out["flip_rate_mean_all_steps"] and steps % log_every == 0:
        logging.warning("%s %s seed %d: flip rate from the hook %.3g differs from the rows "
                        "%.3g", method, pattern, seed, out["flip_rate_mean_all_steps"],
                        out["flip_rate_mean_from_rows"])
    out["curves"].update(
        flip_rate=[_sig(r["flip_rate"]) for r in train],
        pruned_grad_norm=[_sig(r["pruned_grad_norm"]) for r in train])
    dens = realised_density(config, final["state"])
    out.update(dens)
    sizes = _kernel_sizes(final["state"].params, dens["layer_density"])
    out["density"] = (sum(dens["layer_density"][p] * sizes[p] for p in sizes)
                      / sum(sizes.values()))
    if abs(out["density"] - n / m) > TOLERANCE:
        raise RuntimeError(f"{method} {pattern} seed {seed}: realised density "
                           f"{out['density']:.6f} is not N/M = {n / m:.6f}")
    return out


def _kernel_sizes(params, paths) -> dict[str, int]:
    leaves = dict(named_leaves(params))
    return {p: int(leaves[p].size) for p in paths}


def add_flops(runs: list[dict], f_dense: dict) -> None:
    """Inference FLOPs relative to dense, from each run's realised layer densities."""
    fd = flops.total(f_dense)
    for r in runs:
        fs = flops.total(flops.sparse_flops(f_dense, r["layer_density"]))
        r["inference_flops"], r["inference_flops_rel"] = fs, fs / fd


def config_summary(task: Task, num_steps: int, alpha_total: float) -> dict:
    c = tables.task_config(task, "mdgf,1:8", num_steps)  # sparse_steps follows num_steps
    o, s = c.optimizer, c.method
    sparse_steps = s.sparse_steps
    return {
        "task": next(k for k, t in TASKS.items() if t is task), "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "config": task.config, "model": tables.model_summary(c),
        "data": dict(c.data), "num_steps": c.num_steps, "batch_size": c.batch_size,
        "optimizer": (f"{o.name} lr={o.learning_rate} wd={o.weight_decay} {o.schedule} "
                      f"schedule, {o.warmup_steps} warm-up steps"),
        "rules": [list(r) for r in s.rules], "axis": s.axis,
        "sr_ste_lambda": task.module.get_config("sr_ste").method.sr_ste_lambda,
        "mdgf_decay": s.decay,
        "mdgf_backward": s.backward, "mdgf_alpha": alpha_total / sparse_steps,
        "mdgf_alpha_total": alpha_total, "mdgf_alpha_paper": s.alpha,
        "sdgf_schedule": task.module.get_config("sdgf").method.schedule,
        "dense_steps": s.dense_steps,
        "finetune_steps": s.finetune_steps, "sparse_steps": sparse_steps,
    }


# ----------------------------------------------------------------------------- the page


def _order(key: tuple, result: dict):
    """(method, pattern) rows: dense first, then by pattern, methods in run order."""
    method, pattern = key
    return method != "dense", rank(result["patterns"], pattern)


def _last_frame_lr(pattern: str, length: int, cfg: dict) -> tuple[int, float, float]:
    """(step where SDGF's final frame starts, the learning rate there as a share of the
    peak, the share of the run's learning-rate sum that the frame receives)."""
    steps = cfg["num_steps"]
    o = TASKS[cfg.get("task", "digits")].module.get_config().optimizer
    schedule = make_schedule(steps, o.learning_rate, o.schedule, o.warmup_steps)
    lr = [float(schedule(c)) for c in range(steps)]
    start = cfg["dense_steps"] + (len(_frames(pattern)) - 1) * length
    return start + 1, lr[start] / max(lr), sum(lr[start:]) / sum(lr)


def _context(result: dict) -> dict:
    """The derived numbers of the setup notes: MDGF's β, SDGF's frames and last frame."""
    cfg, patterns = result["config"], result["patterns"]
    frames = {p: " → ".join(f"{a}:{b}" for a, b in _frames(p)) for p in patterns}
    lengths = {p: nm.frame_length(cfg["sparse_steps"], len(_frames(p))) for p in patterns}
    last = [_last_frame_lr(p, lengths[p], cfg) for p in patterns]
    return {
        "beta_end": math.exp(-cfg["mdgf_alpha_total"]),
        "beta_paper": math.exp(-cfg["mdgf_alpha_paper"] * cfg["sparse_steps"]),
        "beta_last": math.exp(-cfg["mdgf_alpha"] * (cfg["sparse_steps"] - 1)),
        "sdgf_frames": "; ".join(f"{p}: {frames[p]} ({lengths[p]} steps each)"
                                 for p in patterns),
        "last_start": " / ".join(str(x[0]) for x in last),
        "last_patterns": " / ".join(patterns),
        "last_lr": " / ".join(f"{x[1]:.0%}" for x in last),
        "last_share": " / ".join(f"{x[2]:.1%}" for x in last),
        "train_loss_steps": TRAIN_LOSS_STEPS,
    }


def _sdgf_boundaries(result: dict, ctx: dict) -> list[str]:
    """SDGF's frame-boundary flip rates, one bullet per pattern."""
    sd = [r for r in result["runs"] if r["method"] == "sdgf"]
    if not sd:
        return []
    lines = ["", "SDGF frame-boundary flips (fraction of entries that flip at the step the "
             "pattern tightens, mean over seeds; left out of the means above):", ""]
    for p in result["patterns"]:
        rs = [r for r in sd if r["pattern"] == p]
        if not rs:
            continue
        cells = []
        for i, b in enumerate(rs[0]["frame_boundary_flips"]):
            f = statistics.fmean(r["frame_boundary_flips"][i]["flip_rate"] for r in rs)
            cells.append(f"step {b['step']} ({rs[0]['frames'][i]} → "
                         f"{rs[0]['frames'][i + 1]}): {f:.4f}")
        lines.append(f"- {p}: " + "; ".join(cells) + ".")
    return lines


CLAIMS = (("sr_ste", "nm_ste"), ("mdgf", "sr_ste"), ("sdgf", "sr_ste"))
""""SR-STE ≥ STE" (Zhou et al. 2021, Table 1) and "MDGF/SDGF ≥ SR-STE" (Bambhaniya et al.
2024, at high sparsity), one pair at a time."""


def make_table(task: Task) -> tables.Table:
    """The page of one task's table."""
    lm = task.lm
    quality = ([Column("eval loss", pm_of("eval_loss", 1, 4)),
                Column("eval bits/byte", pm_of("eval_bits_per_byte", 1, 4)),
                Column("train loss", pm_of("train_loss", 1, 4))] if lm else
               [Column("eval accuracy (%)", pm_of("eval_accuracy", 100)),
                Column("eval loss", pm_of("eval_loss", 1, 3)),
                Column("train loss", pm_of("train_loss", 1, 4))])
    return tables.Table(
        title=("N:M on the byte-level LM: STE vs SR-STE vs MDGF vs SDGF" if lm else
               "N:M on the digits MLP: STE vs SR-STE vs MDGF vs SDGF"),
        context=_context,
        setup=[
            "Config: `{cfg[config]}:<method>,<N:M>` with its defaults; `config.seed` set to "
            "the seed (seeds {seeds}; N:M masks follow |w| and take no seed); "
            "`config.log_every = {cfg[log_every]}` for the curves.",
            *(["Model: {cfg[model]}.", tables.LM_DATA_NOTE] if lm else
              ["Model: {cfg[model]} on scikit-learn digits (8×8, 1,437 train / {eval_size} "
               "eval examples, fixed split)."]),
            "Training: {cfg[num_steps]} steps, batch {cfg[batch_size]}, {cfg[optimizer]}.",
            ("N:M: rules {cfg[rules]}, so the pattern applies to every block kernel (attention "
             "q, k, v, o; FFN up, down), in groups of M consecutive inputs (axis {cfg[axis]}, "
             "the input axis); the embedding, the head, the LayerNorms and the biases stay "
             "dense." if lm else
             "N:M: rules {cfg[rules]}, so the pattern applies to the two hidden kernels "
             "`layers/0/kernel` (64×256) and `layers/1/kernel` (256×256), in groups of M "
             "consecutive inputs (axis {cfg[axis]}, the input axis); the head and the biases "
             "stay dense.") + " The mask is recomputed from |w| at every forward pass.",
            "STE: forward w⊙m, backward g. SR-STE: backward g + λ_w(1−m)⊙w with "
            "λ_w = {cfg[sr_ste_lambda]:g} (the paper's value).",
            "MDGF-exp: forward w⊙(m + (1−m)β(t)), β(t) = exp(−αt), straight-through backward "
            "(`backward = '{cfg[mdgf_backward]}'`) as in the authors' code, "
            "**α = {cfg[mdgf_alpha]:.3g}** = {cfg[mdgf_alpha_total]:g} / {cfg[sparse_steps]} "
            "steps, so β falls to e^−{cfg[mdgf_alpha_total]:g} = {beta_end:.4f} by the end. The "
            "paper's α = {cfg[mdgf_alpha_paper]:g} is sized for runs of tens of thousands of "
            "steps; over {cfg[sparse_steps]} steps it would leave β = {beta_paper:.2f} at the "
            "end, so the pruned weights would still carry {beta_paper:.0%} of their value at "
            "the last training step and the switch to the binary mask would happen only at "
            "eval. Scaling α to the run keeps the paper's shape (β decays from 1 to ≈ 0 over "
            "the sparse phase).",
            "SDGF-stepwise: the run is split into equal frames and the pattern tightens at each "
            "boundary: {sdgf_frames}. The final N:M frame starts at step {last_start} "
            "({last_patterns}), where the cosine learning rate is {last_lr} of its peak, and "
            "receives {last_share} of the run's learning-rate sum.",
            "Phases: no dense warm-up and no binary fine-tune (`dense_steps = "
            "{cfg[dense_steps]}`, `finetune_steps = {cfg[finetune_steps]}`, the library's "
            "defaults), so every method gets the same budget of sparse-phase steps and the "
            "same schedule. The cost of that choice: the methods whose final pattern arrives "
            "late (SDGF, and MDGF as β → 0) have little learning rate left to fit it, which a "
            "binary fine-tune phase would give them. Eval after the last step uses the binary "
            "N:M mask for every method (MDGF's β is 0 once the sparse phase is over).",
            "Density: nonzeros of the forward kernels at the final state (what eval multiplies "
            "with), measured, and checked to be exactly N/M with no group of M holding more "
            "than N nonzeros.",
            "Flip rate: the fraction of N:M-kernel mask entries whose kept/pruned status changes "
            "between consecutive optimizer steps (`flip_rate` of `sparsejax.nm`), read every "
            "step, in units of 10⁻⁴ per step; mean over the run and over its last 25 % of "
            "steps. For MDGF it is the top-N mask that β decays. SDGF's frame-boundary steps, "
            "where the pattern tightens by design and a fixed share of the entries flips, are "
            "left out of its means (listed below) and show as spikes in the plot.",
            "Train loss: mean over the final {train_loss_steps} steps, on the forward weights "
            "(for MDGF these still carry β = {beta_last:.4f} of the pruned weights at the last "
            "step).",
            "Eval numbers are on the eval split after the last step. Each cell is mean ± "
            "sample std (ddof = 1) over {n_seeds} seed(s)" + ("." if lm else "; one eval "
                                                              "example is 0.28 accuracy points."),
            If("has_flops",
               "Inference FLOPs (`sparsejax.flops`): dense is {dense_flops:,} per "
               + ("sequence" if lm else "example") + " (2 per "
               "multiply-add, kernels only); sparse = Σ layer FLOPs × realised layer density, "
               "head dense. These are theoretical counts: this implementation multiplies masked "
               "dense matrices. Training FLOPs are not given: MDGF's forward stays dense while "
               "β > 0 (the whole sparse phase) and every method here computes the dense weight "
               "gradient."),
            "Wall time is the whole `train_and_evaluate` call (compile, eval, orbax checkpoints, "
            "the per-step flip-rate read included) on a shared 2-core machine with other jobs "
            "running, so it is noisy.",
        ],
        group_by=("method", "pattern"),
        order=_order,
        columns=[
            Column("method", level(0, labels=LABEL)),
            Column("N:M", level(1)),
            Column("density", mean_of("density", ".4f")),
            Column("rel. inference FLOPs", mean_of("inference_flops_rel", ".3f"), "has_flops"),
            *quality,
            Column("flip rate ×10⁻⁴ (run)", pm_of("flip_rate_mean", 1e4)),  # dense: "—"
            Column("flip rate ×10⁻⁴ (last 25 %)", pm_of("flip_rate_last25", 1e4)),
            Column("wall time (s)", pm_of("wall_time_s", 1, 1)),
        ],
        sections=[
            *([] if lm else [tables.paired(
                "Paired accuracy differences (same seed: same init and data order), in points, "
                "mean ± sample std over seeds:", ("method", "pattern"), "pattern", "patterns",
                [("nm_ste", "dense"), ("sr_ste", "nm_ste"), ("mdgf", "nm_ste"),
                 ("sdgf", "nm_ste"), ("mdgf", "sr_ste"), ("sdgf", "mdgf")], LABEL)]),
            _sdgf_boundaries,
            tables.image("Mask flip rate per logging window, by pattern and method",
                         "`{png}`: flip rate per {cfg[log_every]}-step window, mean over seeds, "
                         "log scale (windows with no flips are not drawn)."),
            tables.claims(CLAIMS, LABEL, ("method", "pattern"), "patterns", "{}"),
        ],
        reading="4–6",
    )


def plot(result: dict, path: Path) -> None:
    """One subplot per pattern, one line per method: the flip rate per logging window,
    mean over seeds, log y."""
    import matplotlib  # optional (the notebooks extra): only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    patterns = result["patterns"]
    methods = [m for m in result["methods"] if m != "dense"]
    ncol = min(len(patterns), 2)
    nrow = math.ceil(len(patterns) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(6 * ncol, 3.8 * nrow), squeeze=False,
                             sharex=True, sharey=True)
    g = group(result["runs"], ("method", "pattern"))
    floor = None
    for ax, p in zip(axes.flat, patterns):
        for method in methods:
            rs = g.get((method, p))
            if not rs:
                continue
            steps = np.asarray(rs[0]["curve_steps"])
            y = np.mean([r["curves"]["flip_rate"] for r in rs], axis=0)
            pos = y[y > 0]
            if pos.size:
                floor = pos.min() if floor is None else min(floor, pos.min())
            ax.plot(steps, np.where(y > 0, y, np.nan), label=LABEL[method], lw=1.2)
        ax.set_yscale("log")
        ax.set_title(f"N:M = {p}")
        ax.grid(True, which="major", alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("training step")
    for ax in axes[:, 0]:
        ax.set_ylabel(f"mask flip rate\n(mean over {result['config']['log_every']}-step windows)")
    for ax in list(axes.flat)[len(patterns):]:
        ax.set_visible(False)
    axes.flat[0].legend(loc="upper right", fontsize=8)
    seeds = len(result["seeds"])
    what = "byte LM" if result["config"].get("task") == "lm" else "digits MLP"
    fig.suptitle(f"N:M mask flip rate, {what}: fraction of mask entries that change per "
                 f"step,\nmean over {seeds} seed{'s' * (seeds != 1)} (SDGF spikes: its frame "
                 "boundaries; windows without flips not drawn)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)




# ----------------------------------------------------------------------------- the sweep


def check_patterns(task: Task, patterns: list[str]) -> None:
    """Every pattern parses, and its M divides the input axis of every N:M kernel of the
    task's model (``resolve_nm_rules`` names the kernel otherwise); else a usage error."""
    config = tables.task_config(task, "nm_ste")
    model = build_model(config.model_name, config.model, get_dataset(config.data).info,
                        nnx.Rngs(params=0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for p in patterns:
        try:
            _frames(p)
            nm.resolve_nm_rules(params, config.method.rules, config.method.axis, pattern=p)
        except ValueError as e:
            raise app.UsageError(f"bad N:M pattern {p!r} for --task={FLAGS.task}: {e}") from None


def sweep(out: tables.Outputs) -> tables.Sweep:
    """The plan of (method, pattern, seed) runs from the flags, and the JSON."""
    task = TASKS[FLAGS.task]
    methods = list(FLAGS.methods)
    patterns = list(FLAGS.patterns) or PATTERNS[FLAGS.task]
    seeds = [int(s) for s in FLAGS.seeds]
    num_steps = FLAGS.num_steps
    if FLAGS.quick:
        seeds, patterns, num_steps = seeds[:1], ["1:8"], num_steps or 100
    unknown = set(methods) - {"dense", *NM_METHODS}
    if unknown:
        raise app.UsageError(f"unknown methods {sorted(unknown)}; known: "
                             f"{['dense', *NM_METHODS]}")
    check_patterns(task, patterns)
    plan = [(m, None if m == "dense" else p, k)
            for m in methods for p in ([None] if m == "dense" else patterns) for k in seeds]

    def finish(runs: list[dict], total_time: float) -> dict:
        cfg = config_summary(task, num_steps, FLAGS.alpha_total)
        cfg["log_every"] = FLAGS.log_every
        f_dense = tables.dense_flops(task.module.get_config())
        add_flops(runs, f_dense)
        f_info = {"dense_per_layer": f_dense, "dense_total": flops.total(f_dense),
                  "per": f"one {'sequence' if task.lm else 'example'} (batch 1), inference"}
        keys = ("eval_accuracy", "eval_loss", "train_loss", "wall_time_s", "flip_rate_mean",
                "flip_rate_last25")
        summary = []
        order = lambda key: _order(key, {"patterns": patterns})  # noqa: E731
        for (m, p), rs in group(runs, ("method", "pattern"), order).items():
            row = {"method": m, "pattern": p, "n": len(rs), "density": rs[0]["density"],
                   "inference_flops_rel": rs[0]["inference_flops_rel"]}
            for k in keys:
                if k in rs[0]:
                    row[f"{k}_mean"], row[f"{k}_std"] = mean_std([r[k] for r in rs])
            if "flip_rate" in rs[0]["curves"]:
                row["flip_rate_curve_mean"] = [
                    _sig(statistics.fmean(v))
                    for v in zip(*(r["curves"]["flip_rate"] for r in rs))]
            summary.append(row)
        return {
            "config": cfg, "methods": methods, "patterns": patterns, "seeds": seeds,
            "std": "sample (ddof=1)",
            "flip_rate_unit": "fraction of N:M-kernel mask entries changed per optimizer step",
            "total_time_s": total_time, "flops": f_info, "plot": str(out.png),
            "out_md": str(out.md), "summary": summary, "runs": runs,
        }

    return tables.Sweep(
        plan, functools.partial(run_one, FLAGS.task, num_steps, FLAGS.log_every,
                                FLAGS.alpha_total),
        lambda it: f"{it[0]:6s} {it[1] or '-':5s} seed={it[2]}",
        lambda r: (f"acc={100 * r['eval_accuracy']:.2f} loss={r['eval_loss']:.4f} "
                   f"density={r['density']:.4f} "
                   + (f"flip={r['flip_rate_mean']:.2e}/{r['flip_rate_last25']:.2e} "
                      if r["method"] != "dense" else "")
                   + f"({r['wall_time_s']:.1f} s)"),
        finish, FLAGS.jobs)


def main(argv):
    task = tables.select_task(TASKS)
    tables.main(argv, tables.Script("experiments.nm_table", make_table(task), plot=plot,
                                    compact_number_lists=True), sweep)


if __name__ == "__main__":
    app.run(main)
