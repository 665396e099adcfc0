# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sparse-IFT: spending the FLOPs that sparsity saves
#
# Sparse training usually makes a model cheaper; Sparse Iso-FLOP Transformations
# (Thangarasa et al. 2024, "Sparse-IFT: Sparse Iso-FLOP Transformations for Maximizing
# Training Efficiency") instead make a layer `s` sparse and spend the saved FLOPs on a
# bigger layer — wider (**Wide**), several summed branches (**Parallel**), a factorisation
# through a wide middle (**Factorized**), or a dense low-rank path beside the sparse matrix
# (**Doped**) — so the model costs what the dense one costs. Does the extra capacity buy
# accuracy at equal FLOPs? We train each family on the quickstart MLP (digits), measure
# FLOPs per example from the traced computation and the trained masks, and place every run
# on a FLOPs–accuracy Pareto plot beside cheaper dense and plain-RigL models.

# %%
# %matplotlib inline
import json
import os
import shutil
from pathlib import Path

TINY = os.environ.get("SPARSEJAX_TINY", "0") == "1"
RUNS = Path(os.environ.get("SPARSEJAX_RUNS", "runs/notebooks"))

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import treescope
from flax import nnx

from configs import quickstart
from sparsejax import analysis, flops
from sparsejax.train import make_trainer, train_and_evaluate
from sparsejax.train.build import sparse_ift_plan

NUM_STEPS = 40 if TINY else 1500
SPARSITIES = [0.75] if TINY else [0.5, 0.75]
FAMILIES = ["doped"] if TINY else ["wide", "parallel", "factorized", "doped"]
NARROW = [] if TINY else [(128, 128), (64, 64)]  # cheaper dense baselines (full mode)
print(f"TINY={TINY}: {NUM_STEPS} steps, s in {SPARSITIES}, families {FAMILIES}")

# %% [markdown]
# ## The grid
#
# Each run is the quickstart config with one argument string: `"dense"`, `"rigl,0.75"`
# (plain RigL: the same MLP made 75 % sparse, so cheaper) or `"doped,0.75"` (a Sparse-IFT
# family at `s = 0.75`, trained with RigL as the paper does). `sparse_ift_plan` shows what
# the trainer will build: which layers are rewritten and the sparsity rules of the new
# kernels. The stem and the head stay dense, so on this two-hidden-layer MLP the
# transformation rewrites the 256 → 256 layer; Wide widens every hidden layer and solves
# the sparsity `s′` of the widened one so the total FLOPs match. In full mode, dense MLPs
# of width 128 and 64 add two cheaper dense points.


# %%
def make_config(arg, hidden=None):
    config = quickstart.get_config(arg)
    config.num_steps = NUM_STEPS
    config.eval_every = NUM_STEPS
    config.checkpoint_every = NUM_STEPS  # one checkpoint, at the end: the trained masks
    if hidden is not None:
        config.model.hidden = hidden
    if TINY:
        config.log_every = 10
        config.optimizer.warmup_steps = 5
        if "update_every" in config.method:  # RigL (dense has no masks)
            config.method.update_every = 10
    return config


grid = [("dense", "dense", None, None)]
grid += [("dense (narrower)", "dense", None, h) for h in NARROW]
grid += [("RigL (no IFT)", f"rigl,{s}", s, None) for s in SPARSITIES]
grid += [(family, f"{family},{s}", s, None) for family in FAMILIES for s in SPARSITIES]

info = make_trainer(make_config("dense")).dataset.info
for _, arg, _, _ in grid:
    if arg.split(",")[0] in ("wide", "parallel", "factorized", "doped"):
        plan = sparse_ift_plan(make_config(arg), info)
        print(f"{arg:>16}: hidden {tuple(plan.model['hidden'])}, rewrites {plan.paths}, "
              f"rules {plan.rules}")

# %% [markdown]
# ## Train, then count FLOPs
#
# FLOPs per example come from `sparsejax.flops`: `model_flops` traces one forward pass of
# the model the trainer builds (2 FLOPs per multiply-add, kernels only) and
# `sparse_flops` scales each kernel by the density of its **trained** RigL mask
# (`densities_from_masks` on the final checkpoint's masks). `summary.json` holds the eval
# metrics but no FLOPs, so the notebook computes them.


# %%
def run_flops(config, workdir):
    """FLOPs per example at the trained masks' densities, parameter counts, and the model."""
    trainer = make_trainer(config)
    abstract = trainer.abstract_state
    model = nnx.merge(trainer.graphdef, abstract.params, abstract.rest)  # shapes only
    x = jnp.zeros((1, *trainer.dataset.info.input_shape))
    dense = flops.model_flops(model, lambda m: m(x))
    ckpt = analysis.load_checkpoint(workdir, NUM_STEPS, trainer)
    densities = {} if ckpt.masks is None else flops.densities_from_masks(ckpt.masks)
    masks = {} if ckpt.masks is None else analysis.mask_dict(ckpt.masks)
    n_params = sum(np.size(x) for x in jax.tree.leaves(ckpt.params))
    nonzero = n_params - sum(m.size - int(m.sum()) for m in masks.values())
    return flops.total(flops.sparse_flops(dense, densities)), n_params, nonzero, model


rows, models = [], {}
for kind, arg, s, hidden in grid:
    name = arg + ("" if hidden is None else f"-{hidden[0]}")
    workdir = RUNS / "05_sparse_ift_frontier" / name
    shutil.rmtree(workdir, ignore_errors=True)  # retrain, do not resume a finished run
    config = make_config(arg, hidden)
    summary = train_and_evaluate(config, workdir, progress=not TINY)
    f, n_params, nonzero, models[name] = run_flops(config, workdir)
    rows.append({"run": name, "kind": kind, "s": s, "flops": f, "params": n_params,
                 "nonzero_params": nonzero, "eval_accuracy": summary["eval_accuracy"],
                 "eval_loss": summary["eval_loss"]})
dense_flops = rows[0]["flops"]
runs = analysis.Table([{**r, "flops_vs_dense": r["flops"] / dense_flops} for r in rows])
print(runs)

# %% [markdown]
# Every Sparse-IFT run sits at (almost exactly) the dense model's FLOPs while holding more
# parameters than it, up to several times as many (most of them pruned); plain RigL and
# the narrower dense models cost less.
# The treescope view shows what the Doped transformation made of the MLP: the rewritten
# layer is a `SparseDoped` module with a sparse 256 × 256 kernel and a dense low-rank pair
# `low_u`, `low_v` beside it.

# %%
treescope.show(models[f"doped,{SPARSITIES[-1]}"])

# %% [markdown]
# ## The FLOPs–accuracy frontier
#
# `pareto_frontier` keeps the runs that no other run beats on both axes (fewer FLOPs and
# higher accuracy); `plot_frontier` draws every run and that frontier. All Sparse-IFT runs
# sit on the dotted line at the dense FLOPs, where they overlap; the right panel spreads
# the same runs out by parameter count: Sparse-IFT buys capacity with parameters, not
# FLOPs.

# %%
fig, (ax, ax_p) = plt.subplots(1, 2, figsize=(13, 4.4))
analysis.plot_frontier(ax, runs, x="flops", y="eval_accuracy", label="kind")
ax.set(xlabel="inference FLOPs per example", ylabel="eval accuracy",
       title="Sparse-IFT vs dense and plain RigL")
ax.axvline(dense_flops, color="gray", linestyle=":", linewidth=1)
ax.legend(fontsize=8, loc="lower right")
for kind in dict.fromkeys(runs["kind"]):
    group = runs.where(kind=kind)
    ax_p.scatter(group["params"], group["eval_accuracy"], label=kind)
for r in runs.where(lambda r: r["s"] is not None and r["kind"] != "RigL (no IFT)"):
    ax_p.annotate(f"s={r['s']:g}", (r["params"], r["eval_accuracy"]), fontsize=7,
                  xytext=(3, 3), textcoords="offset points")
ax_p.set(xscale="log", xlabel="parameters, pruned ones included (log scale)",
         ylabel="eval accuracy", title="The same runs by parameter count")
ax_p.legend(fontsize=8, loc="lower right")
plt.show()

front = analysis.pareto_frontier(runs, x="flops", y="eval_accuracy")
print("Pareto frontier:")
for r in front:
    print(f"  {r['run']:>18}: {r['flops_vs_dense']:.3f}x dense FLOPs, "
          f"eval accuracy {r['eval_accuracy']:.4f}")

# %% [markdown]
# ## The recorded 3-seed table
#
# One seed per run and 360 eval examples (one example is 0.28 accuracy points) cannot
# separate methods that differ by a few examples. `docs/results/ift_digits.json` holds a
# 3-seed run of every family at `s = 0.5, 0.75, 0.9` on a three-hidden-layer version of
# this MLP (`python -m experiments.ift_table`), with FLOPs measured the same way.

# %%
recorded = Path("docs/results/ift_digits.json")
if recorded.exists():
    table = json.loads(recorded.read_text())
    summary = analysis.Table(table["summary"])
    dense = summary.where(method="dense")[0]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.axhspan(dense["eval_accuracy_mean"] - dense["eval_accuracy_std"],
               dense["eval_accuracy_mean"] + dense["eval_accuracy_std"], color="black",
               alpha=0.1)
    ax.axhline(dense["eval_accuracy_mean"], color="black", label="dense (mean ± std)")
    families = [m for m in dict.fromkeys(summary["method"]) if m != "dense"]
    for i, family in enumerate(families):
        g = summary.where(method=family).sort_by("sparsity")
        x = np.asarray(g["sparsity"]) + 0.006 * (i - 1.5)  # small offsets for legibility
        ax.errorbar(x, g["eval_accuracy_mean"], yerr=g["eval_accuracy_std"], marker="o",
                    capsize=3, label=f"Sparse {family}")
    ax.set(xlabel="Sparse-IFT sparsity s", ylabel="eval accuracy",
           title=f"Recorded: {len(table['seeds'])} seeds, all at dense FLOPs")
    ax.legend(fontsize=8)
    plt.show()
    print(f"{'method':>11} {'s':>5} {'FLOPs/dense':>11} {'accuracy (%)':>15}")
    for r in summary:
        s = "—" if r["sparsity"] is None else f"{r['sparsity']:g}"
        print(f"{r['method']:>11} {s:>5} {r['flops_rel']:>11.4f} "
              f"{100 * r['eval_accuracy_mean']:>7.2f} ± {100 * r['eval_accuracy_std']:.2f}")
else:
    print(f"{recorded} not found; run `python -m experiments.ift_table` to make it")

# %% [markdown]
# ## The recorded table on a byte-level LM
#
# The digits MLP has more capacity than its task needs, so no transformation can show a
# gain there. `docs/results/ift_lm.json` holds Sparse Wide and Sparse Doped at
# s = 0.5 and 0.75 on the byte-level decoder LM of `configs/lm_bytes.py`, which
# underfits, with every block kernel transformed and the FLOPs measured the same way
# (`python -m experiments.ift_table --task=lm --jobs=2`, 3 seeds). Lower bits per byte is
# better; `docs/results/ift_lm.md` gives a verdict per family and s.

# %%
recorded = Path("docs/results/ift_lm.json")
if recorded.exists():
    table = json.loads(recorded.read_text())
    summary = analysis.Table(table["summary"])
    bits = 1 / np.log(2)
    dense = summary.where(method="dense")[0]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.axhspan((dense["eval_loss_mean"] - dense["eval_loss_std"]) * bits,
               (dense["eval_loss_mean"] + dense["eval_loss_std"]) * bits, color="black",
               alpha=0.1)
    ax.axhline(dense["eval_loss_mean"] * bits, color="black", label="dense (mean ± std)")
    for i, family in enumerate(m for m in dict.fromkeys(summary["method"]) if m != "dense"):
        g = summary.where(method=family).sort_by("sparsity")
        ax.errorbar(np.asarray(g["sparsity"]) + 0.006 * (i - 0.5),
                    np.asarray(g["eval_loss_mean"]) * bits,
                    yerr=np.asarray(g["eval_loss_std"]) * bits, marker="o", capsize=3,
                    label=f"Sparse {family}")
    ax.set(xlabel="Sparse-IFT sparsity s", ylabel="eval bits per byte (lower is better)",
           title=f"Byte LM: {len(table['seeds'])} seeds, all at dense FLOPs")
    ax.legend(fontsize=8)
    plt.show()
else:
    print(f"{recorded} not found; run `python -m experiments.ift_table --task=lm` to make it")

# %% [markdown]
# ## What we saw
#
# - The four Sparse-IFT families are iso-FLOP by measurement: counted from the traced
#   forward pass and the trained masks, each costs what the dense model costs, while
#   holding several times the parameters (most of them pruned).
# - Making the model sparse without transforming it (plain RigL) or narrower saves FLOPs
#   and, on this small task, costs little accuracy, so those runs anchor the cheap end of
#   the frontier; the Sparse-IFT runs compete with dense at the expensive end.
# - On the digits MLP the families land within noise of dense: this task does not need
#   the extra capacity (the dense model already fits its training set), so the paper's
#   gains, shown on CIFAR and ImageNet models that underfit, do not show here. The
#   recorded 3-seed table says the same with error bars. Testing the claim needs a task
#   where the dense model underfits, longer training and more seeds.
# - The byte LM is such a task (`docs/results/ift_lm.md`): at dense FLOPs Sparse Wide is
#   0.12 and 0.15 bits per byte better than dense at s = 0.5 and 0.75 (reproduced; its
#   attention scores, not in the kernel count, make it about 1.05× and 1.12× dense),
#   while Sparse Doped is about 0.1 bits per byte worse.
