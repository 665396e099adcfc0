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
# # Mask dynamics: RigL vs SET vs static sparse training
#
# Dynamic sparse training keeps a network sparse for all of training but keeps changing
# *which* weights are active: every `ΔT` steps it drops the smallest active weights and
# grows as many new ones, at random (SET, Mocanu et al. 2018) or where the dense gradient
# is largest (RigL, Evci et al. 2020, "Rigging the Lottery"), with a drop fraction that
# is cosine-annealed to zero. Liu et al. 2021 ("Do We Actually Need Dense
# Over-Parameterization? In-Time Over-Parameterization in Sparse Training") argue that
# what makes this work is how many different weights the run gets to try over time (the
# ITOP rate). We train the quickstart MLP at 90% sparsity with a fixed random mask,
# SET and RigL, record the masks with `MaskRecorder`, and look at turnover, ITOP rate,
# accuracy, and the masks themselves.

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

import jax
import matplotlib.pyplot as plt
import numpy as np
import treescope

from configs import quickstart
from sparsejax import analysis
from sparsejax.analysis import TOTAL
from sparsejax.schedules import cosine_drop_fraction
from sparsejax.train import make_trainer, train_and_evaluate

# The three runs share the model, so they can share some compiled programs (init, eval).
jax.config.update("jax_compilation_cache_dir", str(RUNS / "jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

SPARSITY = 0.9
NUM_STEPS = 200 if TINY else 1500
UPDATE_EVERY = 20 if TINY else 100  # ΔT: steps between mask updates
METHODS = {"static": "static (random mask)", "set": "SET (random growth)",
           "rigl": "RigL (gradient growth)"}
LAYER = "layers/0/kernel"  # the first hidden layer: 64 input pixels × 256 units
print(f"TINY={TINY}: {NUM_STEPS} steps, mask update every {UPDATE_EVERY}, runs under {RUNS}")

# %% [markdown]
# ## The runs
#
# The `quickstart.py:<method>,0.9` config: the two hidden kernels are 90% sparse overall,
# distributed by ERK (larger layers sparser), the classifier head stays dense. Updates run
# from step 0 to `end_step` = 75% of training, with the drop fraction `0.3 · ½(1 + cos(π t
# / end_step))`.
#
# `MaskRecorder(every=ΔT)` snapshots the masks every `ΔT` steps. A hook sees the state
# *after* a step, so the snapshot at step `kΔT` holds the masks produced by the update
# at step `(k−1)ΔT`, and consecutive snapshots differ by exactly one update. We add the
# masks at initialisation as step 0, so the first update is counted too.

# %%
def run(method: str):
    config = quickstart.get_config(f"{method},{SPARSITY}")
    config.num_steps = NUM_STEPS
    if "update_every" in config.method:  # SET and RigL change masks; static does not
        config.method.update_every = UPDATE_EVERY
    config.eval_every = NUM_STEPS // 10
    config.log_every = NUM_STEPS // 10
    config.checkpoint_every = 0  # only the final state
    trainer = make_trainer(config)
    rec = analysis.MaskRecorder(every=UPDATE_EVERY)
    with jax.set_mesh(trainer.mesh):  # the masks at initialisation, as step 0
        rec.record(0, analysis.find_masks(trainer.init(jax.random.PRNGKey(config.seed))))
    workdir = RUNS / "03_mask_dynamics" / method
    shutil.rmtree(workdir, ignore_errors=True)
    summary = train_and_evaluate(config, workdir, hooks=[rec], progress=not TINY)
    print(f"{METHODS[method]}: eval accuracy {summary['eval_accuracy']:.3f}")
    return dict(config=config, trainer=trainer, rec=rec, summary=summary, workdir=workdir)


runs = {method: run(method) for method in METHODS}
for method, r in runs.items():  # active weights per snapshot: one value if counts are kept
    print(f"{METHODS[method]:>24}: active counts over all snapshots "
          f"{sorted(set(r['rec'].counts().where(layer=TOTAL)['active']))}")
runs["rigl"]["rec"].counts().where(step=0)

# %% [markdown]
# The counts above are the masks at step 0: ERK gives the 64 × 256 input layer a higher
# density than the 256 × 256 one, and the total is exactly 10% of the prunable weights.
# SET and RigL keep every layer's count through every update (printed above for the
# total: a single value per run over all snapshots).
#
# ## Turnover per update, ITOP rate, accuracy
#
# - **Turnover**: of the weights active before an update, the fraction no longer active
#   after it. The update drops a fraction `f(t)` of the active weights (dashed: the
#   cosine schedule) and grows as many; a weight it drops may be grown back in the same
#   update (it then restarts from zero), so turnover is at most `f(t)`, and lower when
#   the grow criterion picks dropped weights again.
# - **ITOP rate**: the fraction of all prunable weights that have been active at some
#   snapshot so far, `|∪ m_t| / N`. It starts at the density (10%) and only rises
#   through exploration.
# - **Accuracy** on the eval split, from the run's `metrics.jsonl`.

# %%
end_step = runs["rigl"]["config"].method.end_step  # follows config.num_steps
schedule = cosine_drop_fraction(runs["rigl"]["config"].method.drop_fraction, end_step)

fig, (ax_t, ax_i, ax_a) = plt.subplots(1, 3, figsize=(15, 4))
for method, r in runs.items():
    turnover = r["rec"].turnover().where(layer=TOTAL)
    update_steps = [s - UPDATE_EVERY for s in turnover["step"]]  # when the update ran
    ax_t.plot(update_steps, turnover["turnover"], marker="o", label=METHODS[method])
    (line,) = analysis.plot_mask_dynamics(ax_i, r["rec"].ever_active().where(layer=TOTAL),
                                          y="rate", by=None)
    line.set_label(METHODS[method])
    acc = analysis.read_metrics(r["workdir"]).where(split="eval", metric="accuracy")
    ax_a.plot(acc["step"], acc["value"], marker=".", label=METHODS[method])
t = np.arange(0, NUM_STEPS + 1, UPDATE_EVERY)
ax_t.plot(t, np.where(t <= end_step, np.asarray(schedule(t)), 0.0), "k--",
          label="drop fraction f(t)")
ax_t.set(xlabel="step of the mask update", ylabel="turnover", title="Turnover per update")
ax_i.set(xlabel="training step", ylabel="ever-active fraction",
         title="In-time over-parameterisation rate")
ax_a.set(xlabel="training step", ylabel="eval accuracy", title="Accuracy")
for ax in (ax_t, ax_i, ax_a):
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

for method, r in runs.items():
    itop = r["rec"].ever_active().where(layer=TOTAL)["rate"][-1]
    print(f"{METHODS[method]:>24}: final ITOP rate {itop:.3f}, "
          f"eval accuracy {r['summary']['eval_accuracy']:.3f}")

# %% [markdown]
# Per layer, the ITOP rate at the end of training (each layer's rate starts at its own
# density, which ERK made higher for the smaller input layer).

# %%
analysis.Table([{"method": m, **row} for m, r in runs.items()
                for row in r["rec"].ever_active().where(step=r["rec"].steps[-1])])

# %% [markdown]
# ## What the train state holds
#
# The masks live in the optimizer state: `SparseState(inner, masks, count, key)`, with
# the inner adamw state, a boolean mask per sparse kernel (`None` for dense leaves) and the
# update counter. `treescope` shows the RigL run's final state (expand nodes to browse).

# %%
r = runs["rigl"]
ckpt = analysis.load_checkpoint(r["workdir"], analysis.checkpoint_steps(r["workdir"])[-1],
                                r["trainer"])
treescope.show(ckpt.state.opt_state)

# %% [markdown]
# ## The masks as images
#
# The first hidden layer's mask (`LAYER`, 64 input pixels × 256 hidden units; white =
# active) at initialisation and at the end, and to their right the number of active
# connections leaving each of the 64 input pixels, drawn as the 8 × 8 image. The static
# mask never changes. SET moves connections at random; RigL grows them where the
# gradient is large, so it can move connections away from pixels that carry no signal
# (the digits' border pixels are nearly always blank).

# %%
fig, axes = plt.subplots(3, 4, figsize=(15, 9), layout="constrained",
                         gridspec_kw={"width_ratios": [3, 3, 1.2, 1.2]})
for row, (method, r) in zip(axes, runs.items()):
    rec = r["rec"]
    first, last = rec.masks[0][LAYER], rec.masks[-1][LAYER]
    for ax, mask, when in [(row[0], first, "init"), (row[1], last, f"step {rec.steps[-1]}")]:
        ax.imshow(mask, cmap="gray", aspect="auto", interpolation="nearest")
        ax.set(title=f"{METHODS[method]}, {when}", xlabel="hidden unit", ylabel="input pixel")
    vmax = max(first.sum(1).max(), last.sum(1).max())
    for ax, mask, when in [(row[2], first, "init"), (row[3], last, "end")]:
        im = ax.imshow(mask.sum(1).reshape(8, 8), cmap="viridis", vmin=0, vmax=vmax)
        ax.set(title=f"fan-out per pixel, {when}", xticks=[], yticks=[])
    fig.colorbar(im, ax=row[2:], shrink=0.8, label="active connections")
plt.show()

changed = {m: float((r["rec"].masks[0][LAYER] != r["rec"].masks[-1][LAYER]).mean())
           for m, r in runs.items()}
print("fraction of", LAYER, "mask entries that differ between init and end:", changed)

# %% [markdown]
# ## The recorded tables: a byte-level LM, where capacity matters
#
# The MLP above memorises its 1,437 training digits, so any mask that trains at all ends
# up near the same accuracy. The byte-level LM of `configs/lm_bytes.py` (2 layers,
# d_model 128, on the pinned standard-library corpus) underfits, so losing weights costs
# loss, and the methods separate. `docs/results/dst_lm.json` holds 3 seeds of static,
# SET and RigL at 90–99% (`python -m experiments.dst_table --task=lm --jobs=2`), and
# `docs/results/erk_lm.json` the same LM with ERK against uniform layer-wise sparsity
# (`--task=lm_erk`). Lower bits per byte is better; the pages beside them give a verdict
# per claim.

# %%
import json

LM_LABELS = {"static": "static", "set": "SET", "rigl": "RigL"}
recorded = {stem: Path(f"docs/results/{stem}.json") for stem in ("dst_lm", "erk_lm")}
if all(p.exists() for p in recorded.values()):
    dst = analysis.Table(json.loads(recorded["dst_lm"].read_text())["summary"])
    erk = analysis.Table(json.loads(recorded["erk_lm"].read_text())["summary"])
    bits = 1 / np.log(2)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    dense = dst.where(method="dense")[0]
    left.axhline(dense["eval_loss_mean"] * bits, color="black", label="dense")
    for i, (method, label) in enumerate(LM_LABELS.items()):
        g = dst.where(method=method).sort_by("sparsity")
        x = np.arange(len(g)) + 0.08 * (i - 1)
        left.errorbar(x, np.asarray(g["eval_loss_mean"]) * bits,
                      yerr=np.asarray(g["eval_loss_std"]) * bits, marker="o", capsize=3,
                      label=label)
    left.set(xticks=range(len(g)), xticklabels=[f"{s:g}" for s in g["sparsity"]],
             xlabel="sparsity", ylabel="eval bits per byte (lower is better)",
             title="Byte LM, ERK: static vs SET vs RigL (3 seeds)")
    left.legend(fontsize=8)
    cells = [(m, s) for m in ("static", "rigl") for s in sorted(set(erk["sparsity"]) - {None})]
    for j, dist in enumerate(("erk", "uniform")):
        ys = [erk.where(method=m, distribution=dist, sparsity=s)[0] for m, s in cells]
        right.bar(np.arange(len(cells)) + 0.4 * (j - 0.5), [r["eval_loss_mean"] * bits for r in ys],
                  0.4, yerr=[r["eval_loss_std"] * bits for r in ys], capsize=3,
                  label=dist.upper() if dist == "erk" else dist)
    right.axhline(dense["eval_loss_mean"] * bits, color="black", lw=1, label="dense")
    right.set(xticks=range(len(cells)),
              xticklabels=[f"{LM_LABELS[m]} {s:g}" for m, s in cells],
              ylim=(dense["eval_loss_mean"] * bits - 0.1, None),
              ylabel="eval bits per byte", title="ERK vs uniform at equal sparsity (3 seeds)")
    right.legend(fontsize=8)
    plt.tight_layout()
    plt.show()
else:
    print("run `python -m experiments.dst_table --task=lm` and `--task=lm_erk` to make",
          *recorded.values())

# %% [markdown]
# ## What we saw
#
# The static run keeps its random mask: zero turnover, and its ever-active fraction stays
# at the density. SET and RigL replace a share of their connections at every update that
# follows the annealed drop fraction and vanishes at `end_step`. RigL's turnover sits
# below the schedule because its gradient criterion often re-grows weights it has just
# dropped, while SET's random growth rarely does. So SET explores more of the network (a
# higher in-time over-parameterisation rate, as Liu et al. report), while RigL spends its
# budget where the gradient points: in the first layer it moves connections off the blank
# border pixels onto the informative centre of the digits, and gathers them on some
# hidden units (the vertical stripes of its final mask). Both dynamic methods try far
# more weights than the 10% a static mask ever sees; on a problem this easy their final
# accuracies are close to each other and to the static mask's, so compare the printed
# numbers rather than expect a large gap.
#
# The byte LM separates the methods where the MLP cannot (`docs/results/dst_lm.md`,
# `erk_lm.md`): every sparse run is clearly behind dense (3.02 bits per byte), SET beats
# the static mask at every sparsity, RigL beats SET only at 99%, and ERK beats uniform at
# 90% for both static and RigL at the same FLOPs.
