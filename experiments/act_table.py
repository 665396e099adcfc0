"""Activation sparsity on the digits ViT: dense ReLU FFN vs top-k vs statistical top-k vs
Spark FFN (± Spark attention): accuracy, loss, realised FFN activation density, FFN FLOPs.

    python -m experiments.act_table --num_steps=1000        # → docs/results/act_vit_digits.*
    python -m experiments.act_table --quick                 # smoke test: seed 0, 100 steps
    python -m experiments.act_table --variants=dense,spark --seeds=0,1
    python -m experiments.act_table --render_only           # Markdown from the JSON

Every (variant, seed) trains ``configs/vit_digits.py`` (ReLU FFN, d_ff 256, 2 blocks,
16 patch tokens) with ``model.ffn``/``model.attention`` set by the variant and
``config.seed`` set to the seed, in a temporary workdir that is deleted afterwards. No
weight sparsity: the sparsity here is in the activations.

After training, the final parameters are merged into the model (eval mode) and the FFN
activation density is measured on the whole eval split: the fraction of nonzero hidden
units per token, over all eval tokens, per block and averaged over blocks. For the
FFN variants (dense, topk, stopk) the hidden units are ``mlp.act(mlp.up(ln2(x)))``; for
``SparkFFN`` they are the predictor's gate ``mlp.gate(ln2(x))`` (the units whose ``K2``
columns and ``V`` rows are needed). A hand-written forward pass over the blocks gives
``ln2``'s input; it is checked against ``model(x)``, and for the FFN variants the
densities are checked against ``sparsejax.surgery.activation_sparsity``.

FFN FLOPs per token come from ``sparsejax.flops.model_flops`` on one image (16 tokens)
divided by 16, summed over the blocks: dense = Σ over FFN kernels; "ideal sparse" scales
the layers that only touch active units by the block's realised density ρ: FFN
``up + ρ·down``, Spark ``K1 + ρ·(K2 + V)`` (the K1 predictor stays dense).

Writes JSON with every per-seed number and a Markdown table (mean ± sample std,
ddof = 1). The "Reading" is prose written by a person, kept between the
``reading:begin``/``reading:end`` markers across reruns. The sweep runner and the
Markdown renderer are shared with the other tables (``experiments/tables.py``); this
file holds one run, the JSON fields and the page's ``TABLE`` spec.
"""

from __future__ import annotations

import statistics

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from configs import vit_digits
from experiments import tables
from experiments.tables import Column, group, level, mean_of, mean_std, pm, pm_of
from sparsejax import flops, surgery
from sparsejax.activations import k_from_density
from sparsejax.nn.spark import SparkFFN
from sparsejax.train import build_model
from sparsejax.train.data import get_dataset

# variant → (model.ffn, model.attention)
VARIANTS = {
    "dense": ("dense", "dense"),
    "topk": ("topk", "dense"),
    "stopk": ("stopk", "dense"),
    "spark": ("spark", "dense"),
    "spark+attn": ("spark", "spark"),
}
LABELS = {
    "dense": "dense ReLU FFN",
    "topk": "top-k (exact) FFN",
    "stopk": "statistical top-k FFN",
    "spark": "Spark FFN",
    "spark+attn": "Spark FFN + Spark attention",
}

flags.DEFINE_list("variants", list(VARIANTS), f"variants, from {list(VARIANTS)}")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds (config.seed)")
flags.DEFINE_integer("num_steps", 0, "training steps (0: the config's, 2000)")
flags.DEFINE_float("ffn_density", 0.08, "target FFN activation density (top-k, Spark)")
flags.DEFINE_integer("attn_k", 4, "keys per query for Spark attention (of 16 tokens)")
flags.DEFINE_string("out_md", "docs/results/act_vit_digits.md", "Markdown table")
flags.DEFINE_string("out_json", "docs/results/act_vit_digits.json", "per-seed JSON")
flags.DEFINE_bool("quick", False, "smoke test: seed 0, 100 steps; unless --out_md/--out_json "
                  "are given, writes under runs/ instead of docs/")
flags.DEFINE_bool("render_only", False, "rewrite --out_md from the existing --out_json "
                  "(no training)")
FLAGS = flags.FLAGS

CONFIG = "configs/vit_digits.py"


# ----------------------------------------------------------------------------- one run


def make_config(variant: str, seed: int, num_steps: int, ffn_density: float, attn_k: int):
    config = vit_digits.get_config()
    config.model.ffn, config.model.attention = VARIANTS[variant]
    if config.model.ffn != "dense":  # the FFN's and attention's keyword arguments
        config.model.ffn_options = {"density": ffn_density}
    if config.model.attention == "spark":
        config.model.attention_options = {"keys_per_query": attn_k}
    config.seed = seed
    if num_steps:
        config.num_steps = num_steps
    return config


def _hidden(mlp, h):
    """The FFN's hidden units (the ones the second matmul needs) for input ``h``."""
    return mlp.gate(h) if isinstance(mlp, SparkFFN) else mlp.act(mlp.up(h))


def activation_density(model, inputs) -> list[float]:
    """Fraction of nonzero FFN hidden units over all tokens of ``inputs``, per block.

    Re-runs the ViT forward block by block (checked against ``model(inputs)``)."""
    x = model.embed(inputs)
    x = x.reshape(x.shape[0], -1, x.shape[-1]) + model.pos[...]
    dens = []
    for block in model.blocks:
        y = x + block.attn(block.ln1(x))
        dens.append(float(jnp.mean(_hidden(block.mlp, block.ln2(y)) != 0)))
        x = block(x)
    logits = model.head(jnp.mean(model.ln(x), axis=1))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(model(inputs)), rtol=1e-5,
                               atol=1e-5)
    return dens


def build(config, params=None, rest=None):
    """The config's model, with ``params``/``rest`` (pure dicts) merged in if given."""
    ds = get_dataset(config.data)
    model = build_model(config.model_name, config.model, ds.info, nnx.Rngs(params=config.seed))
    if params is not None:
        graphdef, _, r0 = nnx.split(model, nnx.Param, ...)
        model = nnx.merge(graphdef, params, nnx.to_pure_dict(r0) if rest is None else rest)
    model.eval()
    return model, ds


def ffn_flops(model) -> dict:
    """Per-token FLOPs of every FFN kernel, from ``model_flops`` on one image."""
    f = flops.model_flops(model, lambda m: m(jnp.ones((1, 8, 8, 1), jnp.float32)))
    tokens = model.pos.shape[1]
    return {"all_per_token": flops.total(f) / tokens,
            "ffn": {p: v / tokens for p, v in f.items() if "/mlp/" in p}}


def ideal_sparse(ffn: dict, density: list[float]) -> float:
    """FFN FLOPs per token when the layers after the selection touch only active units:
    FFN ``up + ρ·down``, Spark ``K1 + ρ·(K2 + V)``, with the block's ρ."""
    total = 0.0
    for path, v in ffn.items():
        block = int(path.split("blocks/")[1].split("/")[0])
        layer = path.split("/mlp/")[1].split("/")[0]
        total += v * (density[block] if layer in ("down", "k2", "v") else 1.0)
    return total


def run_one(variant: str, seed: int, num_steps: int, ffn_density: float, attn_k: int) -> dict:
    config = make_config(variant, seed, num_steps, ffn_density, attn_k)
    final = {}
    summary, _ = tables.run_config(
        config, hooks=[tables.final_state_hook(config.num_steps, final)], prefix="act_table_")
    state = final["state"]
    model, ds = build(config, state.params, state.rest)
    inputs = ds.eval.get(np.arange(len(ds.eval)))["inputs"]
    dens = activation_density(model, inputs)
    if VARIANTS[variant][0] != "spark":  # cross-check with the library's measurement
        lib = surgery.activation_sparsity(model, lambda m: m(inputs))
        lib = [lib[f"blocks/{i}/mlp/act"] for i in range(len(dens))]
        if max(abs(a - b) for a, b in zip(lib, dens)) > 1e-6:
            raise RuntimeError(f"{variant}: densities {dens} != activation_sparsity {lib}")
    init_model, _ = build(config)
    dens_init = activation_density(init_model, inputs)
    f = ffn_flops(model)
    dense_ffn = sum(f["ffn"].values())
    return {
        "variant": variant, "seed": seed, "steps": summary["steps"],
        "eval_accuracy": summary["eval_accuracy"], "eval_loss": summary["eval_loss"],
        "train_loss": summary.get("train_loss"),
        "ffn_density_per_block": dens, "ffn_density": statistics.fmean(dens),
        "ffn_density_at_init": statistics.fmean(dens_init),
        "ffn_flops_per_token_dense": dense_ffn,
        "ffn_flops_per_token_ideal": ideal_sparse(f["ffn"], dens),
        "ffn_flops_per_layer_per_token": f["ffn"],
        "model_flops_per_token_dense": f["all_per_token"],
        "wall_time_s": summary["wall_time_s"],
    }


def config_summary(num_steps: int, ffn_density: float, attn_k: int) -> dict:
    c = make_config("dense", 0, num_steps, ffn_density, attn_k)
    o, m = c.optimizer, c.model
    return {
        "config": CONFIG,
        "model": (f"ViT, patch {m.patch_size} (16 tokens), d_model {m.d_model}, "
                  f"{m.num_heads} heads, {m.num_layers} blocks, d_ff {m.d_ff}, "
                  f"{m.activation} FFN, mean pool"),
        "data": dict(c.data), "num_steps": c.num_steps, "batch_size": c.batch_size,
        "optimizer": (f"{o.name} lr={o.learning_rate} wd={o.weight_decay} {o.schedule} "
                      f"schedule, {o.warmup_steps} warm-up steps"),
        "activation": m.activation, "ffn_density": ffn_density, "attn_k": attn_k,
        "d_ff": m.d_ff,
    }


# ----------------------------------------------------------------------------- the page


def _ideal_over_dense(key: tuple, runs: list[dict]) -> str:
    fd = statistics.fmean(r["ffn_flops_per_token_dense"] for r in runs)
    return pm([r["ffn_flops_per_token_ideal"] / fd for r in runs], 1, 3)


def _per_block(result: dict, ctx: dict) -> list[str]:
    """FFN density per block, one row per variant."""
    runs = result["runs"]
    nb = len(runs[0]["ffn_density_per_block"])
    return ["", "FFN density per block (%), mean ± sample std over seeds:", "",
            *tables.md_table(
                ["variant", *(f"block {i}" for i in range(nb))],
                ([v, *(pm([r["ffn_density_per_block"][i] for r in rs], 100)
                       for i in range(nb))]
                 for (v,), rs in group(runs, ("variant",)).items()))]


TABLE = tables.Table(
    title="Activation sparsity on the digits ViT: top-k, statistical top-k, Spark",
    context=lambda result: {"k": k_from_density(result["config"]["d_ff"],
                                                result["config"]["ffn_density"])},
    setup=[
        "Config: `{cfg[config]}` with `model.ffn`/`model.attention` set per variant, "
        "`model.ffn_options = {{'density': {cfg[ffn_density]}}}`, "
        "`model.attention_options = {{'keys_per_query': {cfg[attn_k]}}}` (Spark attention); "
        "`config.seed` set to the seed (seeds {seeds}). No weight sparsity.",
        "Model: {cfg[model]}; scikit-learn digits (8×8, 1,437 train / {eval_size} eval "
        "examples, fixed split).",
        "Training: {cfg[num_steps]} steps (the config's default is 2000; reduced to fit the "
        "time budget), batch {cfg[batch_size]}, {cfg[optimizer]}.",
        "Variants: `dense` is the plain ReLU FFN `down(relu(up(x)))`; `topk` keeps the "
        "k = {k} largest post-ReLU units per token (`lax.top_k`, {cfg[ffn_density]:.0%} of "
        "{cfg[d_ff]}); `stopk` uses Spark's statistical top-k (hard form, threshold "
        "mean + std·Φ⁻¹(1 − 0.08) per token, no sort) after the ReLU; `spark` is the Spark "
        "FFN `V(act(STopk_soft(K1 q1)) ⊙ K2 q2)` with r = d_model/2 = 32 predictor dims and "
        "act = {cfg[activation]} (the paper uses GELU; with the soft form max(x − θ, 0) the "
        "ReLU changes nothing); `spark+attn` adds Spark attention, each query keeping about "
        "k_attn = {cfg[attn_k]} of the 16 patch tokens (25%), chosen by statistical top-k "
        "on scores from the first half of each head's dims (the paper's k_attn = 256 would "
        "keep every token here).",
        "FFN density: the fraction of nonzero FFN hidden units per token over all eval "
        "tokens (360 × 16), measured on the final model in eval mode, averaged over the 2 "
        "blocks. FFN variants: `mlp.act(mlp.up(ln2(x)))`, cross-checked against "
        "`sparsejax.surgery.activation_sparsity`. Spark: the predictor's gate "
        "`mlp.gate(ln2(x))` (SparkFFN has no activation module for `activation_sparsity` to "
        "hook); a unit whose gate is zero needs neither its K2 column nor its V row. "
        "`ln2`'s input comes from re-running the blocks one by one, checked against "
        "`model(x)`. For the dense ReLU model this is the Lazy Neuron natural sparsity; the "
        "column \"at init\" is the same measurement on the untrained model.",
        "FFN FLOPs per token, summed over both blocks: `sparsejax.flops.model_flops` on one "
        "image (16 tokens) ÷ 16, FFN kernels only (2 FLOPs per multiply-add). Dense = Σ FFN "
        "kernels. Ideal sparse = Σ_blocks [F(up) + ρ_b·F(down)] for the FFN variants and "
        "Σ_blocks [F(K1) + ρ_b·(F(K2) + F(V))] for Spark, with ρ_b the block's realised "
        "density; the predictor K1 (and `up`, which the top-k needs in full) stays dense; "
        "the top-k/threshold cost (≈ 2·d_ff per token) is not counted. These are "
        "theoretical counts: this code computes every unit densely.",
        "Accuracy and loss are on the eval split after the last step; train loss is the "
        "loop's mean over the final 50 steps. Each cell is mean ± sample std (ddof = 1) "
        "over {n_seeds} seed(s); one eval example is 0.28 accuracy points.",
        "Wall time is the whole `train_and_evaluate` call (compile, eval, orbax checkpoints "
        "included) on a shared 2-core machine, so it is noisy.",
    ],
    group_by=("variant",),
    columns=[
        Column("variant", level(0, "{} (`{}`)", LABELS)),
        Column("eval accuracy (%)", pm_of("eval_accuracy", 100)),
        Column("eval loss", pm_of("eval_loss", 1, 3)),
        Column("train loss", pm_of("train_loss", 1, 4)),
        Column("FFN density (%)", pm_of("ffn_density", 100)),
        Column("FFN density at init (%)", pm_of("ffn_density_at_init", 100, 1)),
        Column("FFN FLOPs / token, dense", mean_of("ffn_flops_per_token_dense", ",.0f")),
        Column("FFN FLOPs / token, ideal sparse",
               pm_of("ffn_flops_per_token_ideal", 1, 0, thousands=True)),
        Column("ideal / dense", _ideal_over_dense),
        Column("wall time (s)", pm_of("wall_time_s", 1, 1)),
    ],
    sections=[_per_block],
    reading="3–4",
)
SCRIPT = tables.Script("experiments.act_table", TABLE)


# ----------------------------------------------------------------------------- the sweep


def sweep(out: tables.Outputs) -> tables.Sweep:
    """The plan of (variant, seed) runs from the flags, and the JSON."""
    variants = list(FLAGS.variants)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise app.UsageError(f"unknown variants {sorted(unknown)}; known: {list(VARIANTS)}")
    seeds = [int(s) for s in FLAGS.seeds]
    num_steps = FLAGS.num_steps
    if FLAGS.quick:
        seeds, num_steps = seeds[:1], num_steps or 100
    fd, ak = FLAGS.ffn_density, FLAGS.attn_k
    plan = [(v, s) for v in variants for s in seeds]

    def finish(runs: list[dict], total_time: float) -> dict:
        keys = ("eval_accuracy", "eval_loss", "train_loss", "ffn_density",
                "ffn_density_at_init", "ffn_flops_per_token_ideal", "wall_time_s")
        return {
            "config": config_summary(num_steps, fd, ak),
            "variants": {v: {"ffn": VARIANTS[v][0], "attention": VARIANTS[v][1]}
                         for v in variants},
            "seeds": seeds, "std": "sample (ddof=1)", "total_time_s": total_time,
            "flops_note": ("per token, summed over blocks; dense = sum of FFN kernel FLOPs "
                           "from model_flops on one image / 16 tokens; ideal = up + rho*down "
                           "(FFN) or K1 + rho*(K2 + V) (Spark), rho the block's realised "
                           "density"),
            "runs": runs,
            "summary": [
                {"variant": v, "n": len(rs),
                 "ffn_flops_per_token_dense": rs[0]["ffn_flops_per_token_dense"],
                 **{f"{k}_mean": mean_std([r[k] for r in rs])[0] for k in keys},
                 **{f"{k}_std": mean_std([r[k] for r in rs])[1] for k in keys}}
                for (v,), rs in group(runs, ("variant",)).items()],
        }

    return tables.Sweep(
        plan, lambda v, s: run_one(v, s, num_steps, fd, ak),
        lambda it: f"{it[0]:10s} seed={it[1]}",
        lambda r: (f"acc={100 * r['eval_accuracy']:.2f} loss={r['eval_loss']:.4f} "
                   f"ffn_density={100 * r['ffn_density']:.2f}% "
                   f"({r['wall_time_s']:.1f} s)"),
        finish)


def main(argv):
    tables.main(argv, SCRIPT, sweep)


if __name__ == "__main__":
    app.run(main)
