"""The byte LM at two widths: ReLU FFN activation density during training (Lazy Neuron),
statistical top-k at 8% against dense (Spark) and random pruning with ERK against dense
(random pruning), each with a verdict.

    python -m experiments.width_table --jobs=2     # 15 runs → docs/results/width_lm.*
    python -m experiments.width_table --quick      # smoke test: seed 0, 100 steps
    python -m experiments.width_table --widths=base --variants=dense,stopk --seeds=0,1
    python -m experiments.width_table --render_only

Every (width, variant, seed) trains ``configs/lm_bytes.py`` shortened as ``dst_table``'s
LM (500 steps of batch 16, one eval at the end) with ``config.seed`` (and the static
masks' seed) set to the seed, in a temporary workdir that is deleted afterwards. Widths:
``base`` is the config (d_model 128, d_ff 512), ``wide`` doubles both (d_model 256,
d_ff 1024, the same 4 heads and 2 layers: about 4× the block parameters). Variants:

- ``dense``: the ReLU FFN;
- ``stopk``: statistical top-k (Spark's, ``model.ffn = 'stopk'``) keeping 8% of the FFN
  hidden units per token (``--ffn_density``);
- ``static``: random pruning, ERK, ``--static_sparsity`` (50%) of the block kernels
  (``configs/lm_bytes.py:static,<s>``), masks fixed at init.

The FFN activation density is the fraction of nonzero FFN hidden units
(``sparsejax.surgery.activation_sparsity``: the output of each block's ``mlp/act``; for
``stopk`` that is after the top-k) on the forward weights (masked for ``static``) in
eval mode, over all tokens of the first ``EVAL_WINDOWS`` eval windows: at initialisation
and after steps ``CURVE_STEPS`` (a hook reads the live state), averaged over the blocks.

Claims (``tables.verdict``, paired by seed; the two widths share seeds, not models):

- Lazy Neuron (Li et al. 2023): the dense ReLU FFN's final density is below 50%, and
  the wide model's is lower than the base model's;
- Spark (You et al. 2025): statistical top-k at 8% matches dense eval loss within
  ``MARGIN_BITS`` bits per byte (and, without a margin, whether it is at least as good);
- random pruning (Liu et al. 2022): static ERK at 50% matches dense within the same
  margin, at each width.
"""

from __future__ import annotations

import functools
import math
import statistics
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import lm_bytes
from experiments import tables
from experiments.tables import Column, Task, group, level, mean_of, mean_std, pm_of, rank
from sparsejax import surgery
from sparsejax.train import build_model
from sparsejax.train.data import get_dataset
from sparsejax.train.optim import make_transform

TASK = Task("configs/lm_bytes.py", lm_bytes, "width_lm", "eval_loss", False,
            {"num_steps": 500, "batch_size": 16, "eval_every": 0})
WIDTHS = {"base": (128, 512), "wide": (256, 1024)}  # (d_model, d_ff)
VARIANTS = ("dense", "stopk", "static")
LABEL = {"dense": "dense ReLU", "stopk": "statistical top-k", "static": "static ERK"}
EVAL_WINDOWS = 64  # eval windows (of 128 bytes) the densities are measured on
CURVE_STEPS = (50, 100, 200, 300, 400, 500)  # and the last step
MARGIN_BITS = 0.02  # "matches dense": within this many bits per byte

flags.DEFINE_list("widths", list(WIDTHS), f"widths, from {list(WIDTHS)}")
flags.DEFINE_list("variants", list(VARIANTS), f"variants, from {list(VARIANTS)}")
flags.DEFINE_list("wide_variants", ["dense", "static"], "the variants also run at the wide "
                  "width (the Spark claim is judged at the base width)")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (config.seed, and the static masks' seed)")
flags.DEFINE_integer("num_steps", 0, "training steps (0: 500)")
flags.DEFINE_float("ffn_density", 0.08, "stopk: the FFN hidden units kept per token")
flags.DEFINE_float("static_sparsity", 0.5, "static: the sparsity of the block kernels")
flags.DEFINE_integer("jobs", 1, "runs at once, each in its own process")
flags.DEFINE_string("out_md", "docs/results/width_lm.md", "Markdown table")
flags.DEFINE_string("out_json", "docs/results/width_lm.json", "per-seed JSON")
flags.DEFINE_string("out_png", "docs/results/width_lm.png", "density-curve plot")
flags.DEFINE_bool("quick", False, "smoke test: seed 0, 100 steps; unless --out_md/--out_json "
                  "are given, writes under runs/ instead of docs/")
flags.DEFINE_bool("render_only", False, "rewrite --out_md and --out_png from the existing "
                  "--out_json (no training)")
FLAGS = flags.FLAGS


# ----------------------------------------------------------------------------- one run


def make_config(width: str, variant: str, seed: int, num_steps: int, ffn_density: float,
                static_sparsity: float):
    config = tables.task_config(TASK, f"static,{static_sparsity}" if variant == "static"
                                else None, num_steps)
    config.model.d_model, config.model.d_ff = WIDTHS[width]
    if variant == "stopk":
        with config.unlocked():  # lm_bytes leaves the FFN at the model's default
            config.model.ffn, config.model.ffn_options = "stopk", {"density": ffn_density}
    config.seed = seed
    if "seed" in config.method:
        config.method.seed = seed
    return config


def ffn_density(config, params=None, opt_state=None, rest=None) -> list[float]:
    """Per block, the fraction of nonzero FFN hidden units over the first
    ``EVAL_WINDOWS`` eval windows, on the forward weights of ``params`` (masked by
    ``opt_state``'s masks; the config's initialisation if None), in eval mode."""
    ds = get_dataset(config.data)
    model = build_model(config.model_name, config.model, ds.info, nnx.Rngs(params=config.seed))
    if params is not None:
        forward = make_transform(config).forward(params, opt_state)
        graphdef, _, r0 = nnx.split(model, nnx.Param, ...)
        model = nnx.merge(graphdef, forward, nnx.to_pure_dict(r0) if rest is None else rest)
    model.eval()
    tokens = jnp.asarray(ds.eval.get(np.arange(EVAL_WINDOWS))["inputs"])
    dens = surgery.activation_sparsity(model, lambda m: m(tokens))
    layers = config.model.num_layers
    return [float(dens[f"blocks/{i}/mlp/act"]) for i in range(layers)]


def run_one(num_steps: int, ffn_density_target: float, static_sparsity: float, width: str,
            variant: str, seed: int) -> dict:
    """Trains one (width, variant, seed) in a temporary workdir; returns its numbers and
    its FFN activation density curve."""
    config = make_config(width, variant, seed, num_steps, ffn_density_target, static_sparsity)
    curve = {0: ffn_density(config)}

    def read_density(step, state):
        if step in CURVE_STEPS or step == config.num_steps:
            curve[step] = ffn_density(config, state.params, state.opt_state, state.rest)

    summary, _ = tables.run_config(config, hooks=[read_density], prefix="width_table_")
    final = curve[config.num_steps]
    m = config.model
    return {
        "width": width, "variant": variant, "seed": seed, "steps": summary["steps"],
        "d_model": m.d_model, "d_ff": m.d_ff,
        "eval_loss": summary["eval_loss"],
        "eval_bits_per_byte": summary["eval_loss"] / math.log(2),
        "train_loss": summary.get("train_loss"),
        "train_sparsity": summary.get("train_sparsity", 0.0),
        "ffn_density_per_block": final, "ffn_density": statistics.fmean(final),
        "ffn_density_at_init": statistics.fmean(curve[0]),
        "density_curve_steps": sorted(curve),
        "density_curve": [statistics.fmean(curve[k]) for k in sorted(curve)],
        "wall_time_s": summary["wall_time_s"],
    }


def config_summary(num_steps: int) -> dict:
    c = tables.task_config(TASK, None, num_steps)
    o, m = c.optimizer, c.model
    return {
        "task": "lm", "metric": TASK.metric, "higher_is_better": TASK.higher_is_better,
        "config": TASK.config, "data": dict(c.data),
        "model": (f"decoder LM, {m.num_layers} layers, {m.num_heads} heads, {m.activation}, "
                  f"bytes (vocabulary 256), context {c.data.seq_len}"),
        "num_steps": c.num_steps, "batch_size": c.batch_size,
        "optimizer": (f"{o.name} lr={o.learning_rate} wd={o.weight_decay} {o.schedule} "
                      f"schedule, {o.warmup_steps} warm-up steps"),
        "widths": {k: list(v) for k, v in WIDTHS.items()},
        "eval_windows": EVAL_WINDOWS, "margin_bits": MARGIN_BITS,
    }


# ----------------------------------------------------------------------------- the page


def _order(key: tuple, result: dict):
    width, variant = key
    return rank(result["widths"], width), rank(result["variants"], variant)


def _curve(result: dict, ctx: dict) -> list[str]:
    """The FFN activation density after each read step, mean ± std over seeds."""
    g = group(result["runs"], ("width", "variant"), lambda k: _order(k, result))
    if not g:
        return []
    steps = next(iter(g.values()))[0]["density_curve_steps"]
    rows = [[f"{LABEL[v]} ({w})", *(tables.pm([r["density_curve"][i] for r in rs], 100, 1)
                                    for i in range(len(steps)))]
            for (w, v), rs in g.items()]
    return ["", "FFN activation density (% of hidden units nonzero) during training, mean ± "
            "std over seeds (step 0: at initialisation):", "",
            *tables.md_table(["run", *(f"step {s}" for s in steps)], rows)]


def _claims(result: dict, ctx: dict) -> list[str]:
    """The verdicts: density below 50% and lower when wide; stopk and static against
    dense, within the margin and without."""
    runs, seeds = result["runs"], result["seeds"]
    by = {(r["width"], r["variant"], r["seed"]): r for r in runs}
    bits, margin = 1 / math.log(2), result["config"]["margin_bits"] * math.log(2)

    def values(width, variant, key):
        return [by[(width, variant, k)][key] for k in seeds if (width, variant, k) in by]

    lines = []
    for w in result["widths"]:
        d = values(w, "dense", "ffn_density")
        if d:
            v = tables.verdict([0.5] * len(d), d, higher_is_better=True)
            lines.append(tables.verdict_line(
                f"dense ReLU FFN density < 50% ({w}: {100 * statistics.fmean(d):.1f}%)", v,
                " points of density", 100, 1))
    base, wide = values("base", "dense", "ffn_density"), values("wide", "dense", "ffn_density")
    if base and len(base) == len(wide):
        lines.append(tables.verdict_line("the wide model's FFN density ≤ the base model's",
                                         tables.verdict(wide, base, higher_is_better=False),
                                         " points of density", 100, 1))
    for variant in ("stopk", "static"):
        for w in result["widths"]:
            a, b = values(w, variant, "eval_loss"), values(w, "dense", "eval_loss")
            if not a or len(a) != len(b):
                continue
            for m, what in ((margin, f"matches dense within {MARGIN_BITS:g} bits/byte"),
                            (0.0, "≥ dense")):
                v = tables.verdict(a, b, higher_is_better=False, margin=m)
                lines.append(tables.verdict_line(f"{LABEL[variant]} {what} ({w})", v,
                                                 " bits per byte", bits, 4))
    if not lines:
        return []
    return ["", "## Claims", "",
            "Verdicts from per-seed pairs (same seed: same data order and, at one width, "
            "the same init; `experiments.tables.verdict`). The effect is the mean paired "
            "difference in the claim's favour; *reproduced* when its one-sided 95% "
            "Student-t bound is above 0 (above −margin for \"matches\"), *not reproduced* "
            "when the bound on the other side is below it, else *inconclusive*.", "", *lines]


TABLE = tables.Table(
    title="The byte LM at two widths: activation density, statistical top-k, random pruning",
    context=lambda result: {"widths_text": "; ".join(
        f"{k}: d_model {v[0]}, d_ff {v[1]}" for k, v in result["config"]["widths"].items()),
        "curve_steps": ", ".join(map(str, result["runs"][0]["density_curve_steps"][1:]))},
    setup=[
        "Config: `{cfg[config]}` with its defaults but {cfg[num_steps]} steps and batch "
        "{cfg[batch_size]}, one eval at the end; `config.seed` (and the static masks' seed) "
        "set to the seed (seeds {seeds}).",
        "Model: {cfg[model]}; widths {widths_text}.",
        tables.LM_DATA_NOTE,
        "Training: {cfg[num_steps]} steps, batch {cfg[batch_size]}, {cfg[optimizer]}.",
        "Variants: dense ReLU FFN; statistical top-k FFN (`model.ffn = 'stopk'`, "
        "density {result[ffn_density]:g}: the threshold is the per-token mean + z·std of "
        "the pre-activations, z for the target density under a Gaussian, as Spark); "
        "static ERK random pruning at {result[static_sparsity]:g} of the block kernels "
        "(embedding, positions and head dense).",
        "FFN activation density: the fraction of nonzero FFN hidden units "
        "(`sparsejax.surgery.activation_sparsity`, each block's `mlp/act` output) on the "
        "forward weights in eval mode, over all {cfg[eval_windows]} × 128 tokens of the "
        "first {cfg[eval_windows]} eval windows, mean over the 2 blocks; read at "
        "initialisation and after steps {curve_steps}.",
        "\"Matches dense\": the claim holds within {cfg[margin_bits]:g} bits per byte "
        "(`verdict(margin=...)`).",
        "Train loss is the loop's mean over the last logging window (the final 50 steps). "
        "Each cell is mean ± sample std (ddof = 1) over {n_seeds} seed(s). Wall time is "
        "the whole `train_and_evaluate` call plus the density reads, two runs at a time on "
        "a 2-core machine.",
    ],
    group_by=("width", "variant"),
    order=_order,
    columns=[
        Column("width", level(0)),
        Column("variant", level(1, labels=LABEL)),
        Column("d_model / d_ff", lambda key, rs: f"{rs[0]['d_model']} / {rs[0]['d_ff']}"),
        Column("eval loss", pm_of("eval_loss", 1, 4)),
        Column("eval bits/byte", pm_of("eval_bits_per_byte", 1, 4)),
        Column("train loss", pm_of("train_loss", 1, 4)),
        Column("FFN density (%)", pm_of("ffn_density", 100, 1)),
        Column("FFN density at init (%)", pm_of("ffn_density_at_init", 100, 1)),
        Column("weight sparsity", mean_of("train_sparsity", ".3f")),
        Column("wall time (s)", pm_of("wall_time_s", 1, 1)),
    ],
    sections=[_curve,
              tables.image("FFN activation density during training",
                           "`{png}`: FFN activation density against training step, mean ± "
                           "sample std over seeds (left), and eval bits per byte by width "
                           "and variant (right)."),
              _claims],
    reading="4–6",
)


def plot(result: dict, path: Path) -> None:
    """Left: the FFN activation density curves, one line per (width, variant); right:
    eval bits per byte per (width, variant), mean ± sample std over seeds."""
    import matplotlib  # optional (the notebooks extra): only the plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = group(result["runs"], ("width", "variant"), lambda k: _order(k, result))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, ((w, v), rs) in enumerate(g.items()):
        curves = 100 * np.array([r["density_curve"] for r in rs])
        sd = curves.std(0, ddof=1) if len(rs) > 1 else np.zeros(curves.shape[1])
        d_model, d_ff = result["config"]["widths"][w]
        label = f"{LABEL[v]}, d_model {d_model}, d_ff {d_ff}"
        left.errorbar(rs[0]["density_curve_steps"], curves.mean(0), yerr=sd, marker="o",
                      ms=3, capsize=3, label=label, color=f"C{i}")
        bits = [r["eval_bits_per_byte"] for r in rs]
        m, s = mean_std(bits)
        right.bar(i, m, yerr=0.0 if s != s else s, capsize=3, color=f"C{i}", label=label)
    left.axhline(50, color="gray", lw=0.8, ls="--")
    left.set(xlabel="training step", ylabel="FFN hidden units nonzero (%)", ylim=(0, None),
             title="FFN activation density (eval windows)")
    left.legend(fontsize=7)
    lo = min(r["eval_bits_per_byte"] for r in result["runs"])
    right.set(xticks=range(len(g)), xticklabels=[f"{w}\n{v}" for w, v in g],
              ylim=(lo - 0.1, None), ylabel="eval bits per byte (lower is better)",
              title="Eval bits per byte")
    n = len(result["seeds"])
    fig.suptitle(f"Byte LM, {result['config']['num_steps']} steps, {n} seed{'s' * (n != 1)}",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- the sweep


def sweep(out: tables.Outputs) -> tables.Sweep:
    """The plan of (width, variant, seed) runs from the flags, and the JSON."""
    widths, variants = list(FLAGS.widths), list(FLAGS.variants)
    seeds = [int(s) for s in FLAGS.seeds]
    num_steps = FLAGS.num_steps
    if FLAGS.quick:
        seeds, num_steps = seeds[:1], num_steps or 100
    for name, given, known in (("widths", widths, WIDTHS), ("variants", variants, VARIANTS),
                               ("wide_variants", FLAGS.wide_variants, VARIANTS)):
        if set(given) - set(known):
            raise app.UsageError(f"unknown --{name} {sorted(set(given) - set(known))}; "
                                 f"known: {list(known)}")
    if not 0.0 < FLAGS.ffn_density <= 1.0:
        raise app.UsageError(f"--ffn_density={FLAGS.ffn_density} is outside (0, 1]")
    if not 0.0 < FLAGS.static_sparsity < 1.0:
        raise app.UsageError(f"--static_sparsity={FLAGS.static_sparsity} is outside (0, 1)")
    plan = [(w, v, k) for w in widths for v in variants
            if w == "base" or v in FLAGS.wide_variants for k in seeds]

    def finish(runs: list[dict], total_time: float) -> dict:
        summary = []
        for (w, v), rs in group(runs, ("width", "variant")).items():
            row = {"width": w, "variant": v, "n": len(rs)}
            for k in ("eval_loss", "train_loss", "ffn_density", "wall_time_s"):
                row[f"{k}_mean"], row[f"{k}_std"] = mean_std([r[k] for r in rs])
            summary.append(row)
        return {
            "config": config_summary(num_steps), "widths": widths, "variants": variants,
            "seeds": seeds, "ffn_density": FLAGS.ffn_density,
            "static_sparsity": FLAGS.static_sparsity, "std": "sample (ddof=1)",
            "plot": str(out.png), "out_md": str(out.md),
            "total_time_s": total_time, "summary": summary, "runs": runs,
        }

    return tables.Sweep(
        plan, functools.partial(run_one, num_steps, FLAGS.ffn_density, FLAGS.static_sparsity),
        lambda it: f"{it[0]:4s} {it[1]:6s} seed={it[2]}",
        lambda r: (f"loss={r['eval_loss']:.4f} density={100 * r['ffn_density']:.1f}% "
                   f"({r['wall_time_s']:.1f} s)"),
        finish, FLAGS.jobs)


def main(argv):
    tables.main(argv, tables.Script("experiments.width_table", TABLE, plot=plot), sweep)


if __name__ == "__main__":
    app.run(main)
