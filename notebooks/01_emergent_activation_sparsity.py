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
# # Emergent activation sparsity in a ReLU ViT
#
# Li et al. 2023 ("The Lazy Neuron Phenomenon: On Emergence of Activation Sparsity in
# Transformers") found that the ReLU activations in the feed-forward (FFN) layers of
# trained Transformers are sparse (only a small fraction of hidden units fire for a given
# token), and that this sparsity is not designed in: it emerges during training, in every
# layer, and it emerges even when the labels are random. We train the small ViT on the
# embedded 8×8 digits twice, once with the true labels and once with random ones, and
# record the fraction of nonzero FFN activations per layer over training.

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

from configs import vit_digits
from sparsejax import analysis
from sparsejax.train import make_trainer, train_and_evaluate

# The two runs build the same model, so the second one can reuse the compiled programs.
jax.config.update("jax_compilation_cache_dir", str(RUNS / "jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

NUM_STEPS = 100 if TINY else 1200
RECORD_EVERY = 20 if TINY else 50   # activation-sparsity snapshot interval (steps)
NUM_LAYERS = 2 if TINY else 4       # Transformer blocks, so there is a depth axis to look at
print(f"TINY={TINY}: {NUM_STEPS} steps per run, {NUM_LAYERS} blocks, runs under {RUNS}")

# %% [markdown]
# ## The model and the measurement
#
# The `vit_digits` config is a ViT with patch size 2 (16 patch tokens per image, mean
# pooled before the head) and a ReLU FFN of width 256 in each block. We give it more
# blocks than the default two (in the full run) and a larger learning rate (3e-3 instead
# of 1e-3), so the effect shows within a few minutes on a CPU. The measurement is the
# Lazy Neuron fraction: for each FFN activation `a = ReLU(x W_up)`, the fraction of
# entries that are nonzero, averaged over every token of a fixed batch of held-out
# images. `ActivationSparsityRecorder` is a training hook that rebuilds the model from
# the train state every `RECORD_EVERY` steps and measures it; we also measure the model
# at initialisation (step 0), before any training.

# %%
def make_config(random_labels: bool):
    c = vit_digits.get_config("tiny" if TINY else None)
    c.num_steps = NUM_STEPS
    c.model.num_layers = NUM_LAYERS
    c.optimizer.learning_rate = 3e-3
    c.data.random_labels = random_labels
    c.log_every = RECORD_EVERY
    c.eval_every = NUM_STEPS // 4
    c.checkpoint_every = 0  # only the final state
    return c


print(make_config(False).model)

# %%
def train(name: str, random_labels: bool):
    """Trains one run in a fresh RUNS/name and returns (recorder, summary, trainer)."""
    config = make_config(random_labels)
    trainer = make_trainer(config)
    images = trainer.dataset.eval.get(np.arange(256))["inputs"]  # fixed held-out probe batch
    rec = analysis.ActivationSparsityRecorder(trainer, lambda m: m(images), every=RECORD_EVERY)
    with jax.set_mesh(trainer.mesh):  # step 0: the model at initialisation
        rec(0, trainer.init(jax.random.PRNGKey(config.seed)))
    workdir = RUNS / "01_activation_sparsity" / name
    shutil.rmtree(workdir, ignore_errors=True)
    summary = train_and_evaluate(config, workdir, hooks=[rec], progress=not TINY)
    print(f"{name}: train accuracy {summary['train_accuracy']:.3f}, "
          f"eval accuracy {summary['eval_accuracy']:.3f}")
    return rec, summary, trainer


runs = {"true labels": train("true_labels", False),
        "random labels": train("random_labels", True)}

# %% [markdown]
# With true labels the model learns the digits (high eval accuracy). With random labels
# it can only memorise the training set: its train accuracy climbs (in the full run), while
# its eval accuracy stays at chance (about 10%).
#
# ## Activation sparsity over training
#
# One line per block. At initialisation about half of the ReLU units fire (the
# pre-activations are roughly symmetric around 0); look at how the fraction moves away
# from that as training proceeds, with the true labels and with random labels.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
for ax, (name, (rec, _, _)) in zip(axes, runs.items()):
    analysis.plot_activation_sparsity(ax, rec.table())
    ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    ax.set_title(f"ViT on digits, {name}")
    ax.set_xlabel("training step")
    ax.set_ylabel("fraction of nonzero FFN activations")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Init against trained, by depth
#
# The same measurement at step 0 and at the end of training, against the block's depth.
# The paper reports sparsity in every layer of a trained model; here the gap between the
# dashed line (init, the same for both runs: same seed) and a solid line (trained) is the
# sparsity that training created.

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for i, ((name, (rec, _, _)), color) in enumerate(zip(runs.items(), ["C0", "C3"])):
    table = rec.table()
    last = max(table["step"])
    if i == 0:  # both runs start from the same initialisation (same seed)
        rows = table.where(step=0).sort_by("depth")
        ax.plot(rows["depth"], rows["fraction_nonzero"], "--", marker="o", color="gray",
                label="init (both runs)")
    rows = table.where(step=last).sort_by("depth")
    ax.plot(rows["depth"], rows["fraction_nonzero"], "-", marker="o", color=color,
            label=f"{name}, step {last}")
ax.set_xticks(range(NUM_LAYERS))
ax.set_xlabel("block (depth)")
ax.set_ylabel("fraction of nonzero FFN activations")
ax.set_title("Activation sparsity at init and after training")
ax.legend()
plt.show()

for name, (rec, _, _) in runs.items():
    table = rec.table()
    init = np.mean(table.where(step=0)["fraction_nonzero"])
    final = np.mean(table.where(step=max(table["step"]))["fraction_nonzero"])
    print(f"{name:>13}: mean fraction nonzero {init:.3f} at init -> {final:.3f} trained "
          f"({100 * (1 - final / init):.0f}% fewer active units)")

# %% [markdown]
# ## The trained model, and the recorded table
#
# `treescope` renders the rebuilt model (NNX modules, their parameters and the activation
# modules the measurement hooks into); expand the nodes to browse it. The recorder's rows
# are a plain `analysis.Table`, ready for pandas (`.to_pandas()`) if you have it.

# %%
rec, _, trainer = runs["true labels"]
workdir = RUNS / "01_activation_sparsity" / "true_labels"
ckpt = analysis.load_checkpoint(workdir, analysis.checkpoint_steps(workdir)[-1], trainer)
model = rec.build(ckpt.state)
treescope.show(model)

# %%
analysis.activation_sparsity_by_layer(model, rec.call)

# %% [markdown]
# ## The recorded table: a byte-level LM at two widths
#
# The Lazy Neuron paper reports that sparsity grows with model size. `docs/results/width_lm.json`
# holds the ReLU FFN density of the byte-level decoder LM (`configs/lm_bytes.py`) during
# 500 training steps, at d_model 128 / d_ff 512 and at twice both, with 3 seeds
# (`python -m experiments.width_table --jobs=2`), measured like `activation_sparsity` above
# on 64 eval windows; the same table has statistical top-k and random pruning against dense.

# %%
import json

recorded = Path("docs/results/width_lm.json")
if recorded.exists():
    table = json.loads(recorded.read_text())
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for (width, variant), color in ((("base", "dense"), "C0"), (("wide", "dense"), "C1"),
                                    (("base", "stopk"), "C2")):
        runs = [r for r in table["runs"] if r["width"] == width and r["variant"] == variant]
        if not runs:
            continue
        curves = np.array([r["density_curve"] for r in runs])
        d = table["config"]["widths"][width]
        name = "statistical top-k 8%" if variant == "stopk" else "ReLU"
        ax.errorbar(runs[0]["density_curve_steps"], 100 * curves.mean(0),
                    yerr=100 * curves.std(0, ddof=1), marker="o", capsize=3, color=color,
                    label=f"{name}, d_model {d[0]}, d_ff {d[1]}")
    ax.set(xlabel="training step", ylabel="FFN hidden units nonzero (%)", ylim=(0, None),
           title=f"Byte LM: FFN activation density, {len(table['seeds'])} seeds")
    ax.legend(fontsize=8)
    plt.show()
else:
    print(f"{recorded} not found; run `python -m experiments.width_table` to make it")

# %% [markdown]
# ## What we saw
#
# At initialisation a ReLU FFN fires about half of its units for each token. Training
# alone pushes this fraction down, in every block: no sparsity penalty, no top-k, nothing
# in the model asks for it, yet fewer units fire after training than before. The same
# happens when the labels are random and the network can only memorise them, so the
# sparsity comes from the training dynamics rather than from structure in the labels, as
# Li et al. observed for much larger Transformers; memorising random labels takes longer
# and can leave the network even sparser. The fraction falls while the training loss
# falls and levels off once the training set is fitted. On a model and dataset this small
# the effect is moderate (the paper's large models end with a few percent of units
# active); how it varies with depth differs between runs, so read it off the plots.
# - On the byte LM (`docs/results/width_lm.md`) the dense ReLU FFN falls from 50% to
#   37% of its units active in 500 steps at d_model 128, and to 33% at d_model 256: the
#   wider model is sparser, as the Lazy Neuron paper reports for larger models.
