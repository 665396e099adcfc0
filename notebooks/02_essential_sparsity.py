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
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Essential sparsity: how much of a trained model can be pruned in one shot?
#
# Jaiswal et al. 2023 ("The Emergence of Essential Sparsity in Large Pre-trained Models:
# The Weights that Matter") prune trained models by weight magnitude in one shot, with no
# retraining, and find a sharp turning point: up to some sparsity, the *essential
# sparsity*, the performance barely moves; beyond it, it falls off a cliff. They find it
# for N:M patterns too, and report that during BERT's pre-training the essential sparsity
# jumps up abruptly after a certain number of iterations. We train the quickstart MLP
# densely, then sweep one-shot magnitude pruning over unstructured (global and layer-wise)
# and N:M patterns, locate the sharp drop, and repeat the sweep on earlier checkpoints.

# %%
# %matplotlib inline
import os
import shutil
import sys
from pathlib import Path

if not Path("configs").is_dir() and Path("../configs").is_dir():
    os.chdir("..")  # opened from notebooks/: work from the repository root
sys.path.insert(0, str(Path.cwd()))

TINY = os.environ.get("SPARSEJAX_TINY", "0") == "1"
RUNS = Path(os.environ.get("SPARSEJAX_RUNS", "runs/notebooks"))

import matplotlib.pyplot as plt
import numpy as np
import treescope

import sparsejax
from configs import quickstart
from sparsejax import analysis
from sparsejax.train import make_trainer, train_and_evaluate

NUM_STEPS = 150 if TINY else 1500
TOLERANCE = 0.01  # "within 1 point of dense accuracy" marks the essential sparsity
SPARSITIES = ([0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98] if TINY else
              [round(s, 2) for s in np.arange(0.05, 0.951, 0.05)] + [0.97, 0.98, 0.99])
PATTERNS = [(1, 2), (2, 4), (1, 4), (2, 8), (1, 8)]
print(f"TINY={TINY}: {NUM_STEPS} training steps, runs under {RUNS}")

# %% [markdown]
# ## Train the dense model
#
# The quickstart config: a ReLU MLP 64 → 256 → 256 → 10 on scikit-learn's 8×8 digits,
# trained densely with adamw. We keep three checkpoints along the way, so we can ask later
# how the essential sparsity changes with training.

# %%
config = quickstart.get_config()  # dense
config.num_steps = NUM_STEPS
config.eval_every = NUM_STEPS // 3
config.checkpoint_every = NUM_STEPS // 3
config.log_every = NUM_STEPS // 10
workdir = RUNS / "02_essential_sparsity" / "dense"
shutil.rmtree(workdir, ignore_errors=True)
summary = train_and_evaluate(config, workdir, progress=not TINY)
print(f"dense eval accuracy {summary['eval_accuracy']:.3f} after {summary['steps']} steps")

# %% [markdown]
# We read the final checkpoint back with the run's `Trainer` (which knows its shapes and
# shardings). The parameters are a plain nested dict; `treescope` shows them (expand a
# node to see an array's values and distribution).

# %%
trainer = make_trainer(config)
steps = analysis.checkpoint_steps(workdir)
ckpt = analysis.load_checkpoint(workdir, steps[-1], trainer)
treescope.show(ckpt.params)

# %% [markdown]
# ## The sweep
#
# `essential_sparsity_sweep` prunes a copy of the parameters for each point and calls our
# `evaluate` on it; here that is the eval-split loss and accuracy of the trained model
# with its kernels replaced by the pruned ones. The config's rules say which parameters
# may be pruned: both hidden kernels; the classifier head and the biases stay dense.
#
# - **global**: one magnitude threshold over all prunable weights (layers end up with
#   different sparsities);
# - **layer-wise**: every layer pruned to the same sparsity;
# - **N:M**: keep the `N` largest of every `M` consecutive weights along the input axis
#   (the pattern sparse tensor cores accelerate), sparsity `1 − N/M`.

# %%
RULES = quickstart.get_config("static").method.rules  # the quickstart's: head dense
print("prunable:", [p for p, spec in sparsejax.resolve_rules(ckpt.params, RULES).items()
                    if spec != "dense"])


def evaluate(params, state=ckpt.state):
    return trainer.evaluate(state._replace(params=params))  # {'loss', 'accuracy'}


sweeps = {
    "global": analysis.essential_sparsity_sweep(ckpt.params, evaluate, SPARSITIES,
                                                rules=RULES, scope="global"),
    "layer-wise": analysis.essential_sparsity_sweep(ckpt.params, evaluate, SPARSITIES,
                                                    rules=RULES, scope="layer"),
    "N:M": analysis.essential_sparsity_sweep(ckpt.params, evaluate, structure="n:m",
                                             patterns=PATTERNS, rules=RULES),
}
# Two N:M patterns share each sparsity (1:2 and 2:4): sharp_drop counts a sparsity level
# as its best pattern.
drops = {name: analysis.sharp_drop(t["sparsity"], t["accuracy"], TOLERANCE)
         for name, t in sweeps.items()}
sweeps["global"]

# %% [markdown]
# ## Accuracy against sparsity
#
# The flat part on the left is the sparsity the trained model does not need; the dotted
# vertical line marks each sweep's `sharp_drop`: the largest sparsity whose accuracy is
# within `TOLERANCE` of the dense model's (scanning up from dense and stopping at the first
# point outside it). On the right, every N:M pattern next to unstructured pruning to the
# same sparsity. N:M is applied to each layer alike, so layer-wise unstructured pruning is
# its like-for-like comparison. Patterns of equal sparsity (1:2 and 2:4, 1:4 and 2:8)
# differ in group size: a larger group lets the kept weights cluster, a smaller one
# spreads them evenly.

# %%
nm = sweeps["N:M"].where(structure="n:m")
same_sparsity = {  # unstructured pruning at exactly the N:M sparsities
    scope: analysis.essential_sparsity_sweep(ckpt.params, evaluate, sorted(set(nm["sparsity"])),
                                             rules=RULES, scope=scope, include_dense=False)
    for scope in ("global", "layer")}

fig, (ax, ax_nm) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
for name, color in [("global", "C0"), ("layer-wise", "C1")]:
    line, *marker = analysis.plot_sweep(ax, sweeps[name], y="accuracy", drop=drops[name])
    line.set_color(color)
    line.set_label(f"{name} magnitude")
    for artist in marker:
        artist.set_color(color)
        artist.set_label(f"{name}: essential sparsity {drops[name].sparsity:g}")
dense_accuracy = drops["global"].dense
for a in (ax, ax_nm):
    a.axhline(dense_accuracy - TOLERANCE, color="gray", linestyle=":", linewidth=1,
              label=f"dense − {TOLERANCE:g}")
ax.set_xlabel("sparsity of the prunable kernels")
ax.set_ylabel("eval accuracy (no retraining)")
ax.set_title("One-shot unstructured magnitude pruning")
ax.legend(fontsize=8)

x = np.arange(len(nm))
ax_nm.plot(x, nm["accuracy"], "o", color="C2", markersize=8, label="N:M")
for scope, color, label in [("layer", "C1", "layer-wise unstructured"),
                            ("global", "C0", "global unstructured")]:
    table = same_sparsity[scope]
    ax_nm.plot(x, [table.value("accuracy", sparsity=s) for s in nm["sparsity"]], "_",
               color=color, markersize=16, markeredgewidth=2, label=f"{label}, same sparsity")
ax_nm.set_xticks(x, [f"{p}\ns={s:g}" for p, s in zip(nm["pattern"], nm["sparsity"])])
ax_nm.set_xlabel("N:M pattern (sparsity 1 − N/M)")
ax_nm.set_ylabel("eval accuracy (no retraining)")
ax_nm.set_title("One-shot N:M magnitude pruning")
ax_nm.legend(fontsize=8)
plt.tight_layout()
plt.show()

for name, drop in drops.items():
    print(f"{name:>10}: essential sparsity {drop.sparsity} (dense accuracy {drop.dense:.3f})")
sweeps["N:M"]

# %% [markdown]
# Global pruning does not prune the two kernels equally. At the global essential
# sparsity, the per-layer sparsity shows where the small weights were:

# %%
masks = analysis.magnitude_masks(ckpt.params, drops["global"].sparsity or 0.0, rules=RULES,
                                 scope="global")
for path, (active, size) in sparsejax.mask_counts(masks).items():
    print(f"{path}: {size} weights, sparsity {1 - active / size:.3f}")

# %% [markdown]
# ## Does the essential sparsity grow with training?
#
# In the paper the sharp-drop point moves to higher sparsity during pre-training. We
# repeat the global sweep on the earlier checkpoints of the same run.

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for step, color in zip(steps, plt.cm.viridis(np.linspace(0.1, 0.9, len(steps)))):
    state = analysis.load_checkpoint(workdir, step, trainer).state
    sweep = analysis.essential_sparsity_sweep(
        state.params, lambda p, state=state: evaluate(p, state), SPARSITIES, rules=RULES)
    drop = analysis.sharp_drop(sweep["sparsity"], sweep["accuracy"], TOLERANCE)
    ax.plot(sweep["sparsity"], sweep["accuracy"], marker="o", color=color,
            label=f"step {step}: essential sparsity {drop.sparsity}")
ax.set_xlabel("global sparsity")
ax.set_ylabel("eval accuracy (no retraining)")
ax.set_title("One-shot pruning of checkpoints along training")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## What we saw
#
# A trained network holds many weights it does not need: removing the smallest-magnitude
# ones in one shot, with no retraining at all, leaves the accuracy within a point of the
# dense model up to a sizeable sparsity, and beyond it the accuracy collapses abruptly
# rather than gradually: the sharp drop of Jaiswal et al. Global pruning does not spread
# the sparsity evenly: it prunes the larger hidden-to-hidden kernel harder than the input
# kernel, and its curve and the layer-wise one part ways only after the plateau. N:M
# patterns, which fix how many zeros every small group must hold, lose accuracy at lower
# sparsity than global unstructured pruning does; against layer-wise pruning, which also
# treats every layer alike, the gap is smaller and can even reverse, since N:M leaves
# every output unit its share of inputs. On a model this small, which converges within a
# few hundred steps, the pruning curves of converged checkpoints nearly coincide; the
# paper's rise of essential sparsity during pre-training is a large-model observation
# that the last plot lets you check rather than assume.
