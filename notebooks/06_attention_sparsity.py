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
# # Attention is naturally sparse: measuring it, then computing only what matters
#
# A trained attention head puts most of its probability mass on a few keys per query, which
# is what lets sparse attention skip the rest: keep about `k` keys per query (Spark
# Transformer, You et al. 2025), or whole blocks of keys chosen by a fixed pattern (a
# window with attention sinks, StreamingLLM, Xiao et al. 2023; strided, Child et al. 2019)
# or by a gate on pooled queries and keys (SeerAttention, Gao et al. 2024). We train a
# small decoder LM on associative recall and measure how concentrated each head's attention
# is. Then we draw the block-sparse masks of `sparsejax.kernels.block_sparse_attention` on
# the trained model's queries and keys, check the kernel against the dense masked
# reference, and run the model with sparse attention to see which kinds keep the keys the
# task needs.

# %%
# %matplotlib inline
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

from configs import lm_recall
from sparsejax import analysis
from sparsejax.kernels.block_sparse_attention import (attention_reference, block_sparse_attention,
                                                      choose_implementation, masks)
from sparsejax.nn import SparseAttention
from sparsejax.train import build_model, make_trainer, train_and_evaluate
from sparsejax.train.checkpoint import Checkpointer

NUM_PAIRS = 8  # the model reads T = 2 * NUM_PAIRS + 2 = 18 tokens
NUM_STEPS = 30 if TINY else 1500
FINETUNE_STEPS = 10 if TINY else 300
BLOCK = 16  # query and key block of the block-sparse masks (the smallest the kernel takes)
WINDOW, SINKS, STRIDE = 8, 1, 4  # the fixed patterns on the model's short sequences
SPARK_KEYS = 4  # token-level Spark attention: about 4 keys per query
VARIANTS = [  # (label, config.model.attention, SparseAttention's pattern)
    ("blocks: window", "sparse", "window"), ("blocks: strided", "sparse", "strided"),
    ("blocks: spark", "sparse", "spark"), (f"tokens: spark, ~{SPARK_KEYS} keys", "spark", None)]
if TINY:
    VARIANTS = VARIANTS[2:3]
T = 2 * NUM_PAIRS + 2
print(f"TINY={TINY}: sequence length {T}, {NUM_STEPS} steps, blocks of {BLOCK}")

# %% [markdown]
# ## The task and the model
#
# Associative recall: a sequence `k₁ v₁ k₂ v₂ … SEP q` lists key–value pairs, then asks for
# the value bound to key `q`; only that answer is scored. Each sequence holds every key
# once (`num_keys = num_pairs`), in random order, which this small model learns within a
# thousand or so steps (with more keys than pairs, or more pairs, it takes far longer). To
# answer, the model must find the earlier copy of `q` and read the value after it: a
# two-layer "induction" circuit that attends to one specific position. The LM is the
# `lm_recall` config shrunk for CPU (`d_model` 64, 4 heads of 16 dims, 2 layers).


# %%
def make_config(attention="dense", pattern="window", num_steps=NUM_STEPS):
    """lm_recall, shrunk; attention 'dense', 'sparse' (the block-sparse kernel on the mask
    of `pattern`) or 'spark' (token-level Spark attention)."""
    config = lm_recall.get_config()
    config.data.num_pairs = config.data.num_keys = NUM_PAIRS
    config.data.train_size = 20_000 if TINY else 100_000
    config.model.d_model, config.model.d_ff = 64, 256
    # config.model.attention_options: the keyword arguments of the attention module
    config.model.attention = attention
    if attention == "sparse":  # SparseAttention
        config.model.attention_options = dict(
            pattern=pattern, block_size=BLOCK, window=WINDOW, sinks=SINKS,
            stride=STRIDE,  # a band of STRIDE keys + the last key of every STRIDE
            keep=1,  # gated: 1 key block per query block
            keys_per_query=BLOCK)  # spark: about BLOCK keys (1 block) per query block
    elif attention == "spark":  # SparkAttention: about SPARK_KEYS keys per query
        config.model.attention_options = dict(keys_per_query=SPARK_KEYS)
    config.batch_size = 64
    config.num_steps = num_steps
    config.log_every = max(num_steps // 30, 1)
    config.eval_every = max(num_steps // 10, 1)
    config.checkpoint_every = num_steps  # one checkpoint, at the end
    if TINY:
        config.optimizer.warmup_steps = 5
    return config


dense_dir = RUNS / "06_attention_sparsity" / "dense"
shutil.rmtree(dense_dir, ignore_errors=True)  # retrain, do not resume a finished run
dense_config = make_config()
summary = train_and_evaluate(dense_config, dense_dir, progress=not TINY)
print(f"dense attention: eval accuracy {summary['eval_accuracy']:.3f} on the answer token")

curve = analysis.read_metrics(dense_dir).where(split="eval", metric="accuracy")
fig, ax = plt.subplots(figsize=(6, 3))
ax.plot(curve["step"], curve["value"], marker="o")
ax.set(xlabel="step", ylabel="eval accuracy (answer token)", ylim=(0, 1.02),
       title="Associative recall, dense attention")
plt.show()

# %% [markdown]
# ## How concentrated is the attention?
#
# `attention_probs(model, lambda m: m(tokens), 'blocks/1/attn')` recomputes a layer's
# attention probabilities `[B, H, T, T]` from its own `q`/`k` projections during the
# forward pass that the call runs;
# `attention_concentration(probs, k)` is, per head, the mean over queries of the mass that
# each query's `k` largest keys hold. We compare the trained model with the same model at
# initialisation, and with uniform causal attention (query `i` spreading its mass evenly
# over its `i + 1` keys). Next to every query, we single out the answer query (the last
# position), the one the loss depends on.


# %%
trainer = make_trainer(dense_config)
trained_state = analysis.load_checkpoint(dense_dir, NUM_STEPS, trainer).state
model = nnx.merge(trainer.graphdef, trainer.tx.forward(trained_state.params,
                                                       trained_state.opt_state),
                  trained_state.rest)
init_model = build_model(dense_config.model_name, dense_config.model, trainer.dataset.info,
                         nnx.Rngs(params=1))
tokens = jnp.asarray(trainer.dataset.eval.get(np.arange(64))["inputs"])
LAYERS = ["blocks/0/attn", "blocks/1/attn"]
KS = [k for k in (1, 2, 4, 8, 16) if k <= T]
causal = jnp.tril(jnp.ones((T, T)))
uniform = jnp.broadcast_to(causal / causal.sum(-1, keepdims=True), (len(tokens), 4, T, T))

attention_probs = nnx.jit(  # compiled once per layer
    lambda m, tokens, layer: analysis.attention_probs(m, lambda mm: mm(tokens), layer),
    static_argnums=2)
probs = {(name, layer): attention_probs(m, tokens, layer)
         for name, m in (("trained", model), ("init", init_model)) for layer in LAYERS}
fig, axes = plt.subplots(1, 2 * len(LAYERS), figsize=(16, 3.6), sharey=True)
for i, layer in enumerate(LAYERS):
    for j, (rows, title) in enumerate(((slice(None), "all queries"),
                                       (slice(-1, None), "answer query"))):
        ax = axes[2 * i + j]
        mass = lambda p: np.stack([analysis.attention_concentration(p[:, :, rows], k)
                                   for k in KS])  # [len(KS), H]
        trained, init = mass(probs["trained", layer]), mass(probs["init", layer])
        for h in range(trained.shape[1]):
            ax.plot(KS, trained[:, h], marker="o", label=f"trained, head {h}")
        ax.plot(KS, init.mean(1), color="gray", linestyle="--", label="init (mean of heads)")
        ax.plot(KS, mass(uniform)[:, 0], color="black", linestyle=":", label="uniform causal")
        ax.set(xscale="log", xlabel="k (keys kept per query)", title=f"{layer}: {title}")
axes[0].set_ylabel("attention mass in the top-k keys")
axes[-1].legend(fontsize=7)
plt.show()
for layer in LAYERS:
    c = analysis.attention_concentration(probs["trained", layer][:, :, -1:], 1)
    print(f"{layer}: mass on the single largest key at the answer query, per head: "
          f"{np.round(c, 3)}")

# %% [markdown]
# The attention maps of one sequence show where that mass goes (rows are queries, columns
# keys; the last row is the answer query). In the last layer a cyan square marks the
# value bound to the queried key, in the answer query's row. In a trained model, look for
# layer-0 heads that attend to the previous token (the line just below the diagonal) and
# layer-1 heads whose answer row lights up the marked value: the two halves of the recall
# circuit.

# %%
example = 0
seq = np.asarray(tokens[example])
where_key = int(np.flatnonzero(seq[: 2 * NUM_PAIRS : 2] == seq[-1])[0]) * 2  # position of q
fig, axes = plt.subplots(len(LAYERS), 4, figsize=(13, 6.6))
for i, layer in enumerate(LAYERS):
    p = np.asarray(probs["trained", layer][example])
    for h in range(4):
        ax = axes[i, h]
        ax.imshow(p[h], cmap="magma", vmin=0, vmax=1)
        ax.set_title(f"{layer}, head {h}", fontsize=9)
        ax.set(xticks=[], yticks=[])
        if i == len(LAYERS) - 1:
            ax.add_patch(plt.Rectangle((where_key + 0.5, T - 1.5), 1, 1, fill=False,
                                       edgecolor="cyan", linewidth=1.5))
axes[-1, 0].set_xlabel("key position")
axes[0, 0].set_ylabel("query position")
plt.show()

# %% [markdown]
# ## Block-sparse masks
#
# A `BlockMask` lists, per block of queries, which blocks of keys to visit: whole blocks
# where every element is visible (FULL) and blocks where a static element rule (causal,
# window, sinks, strides) is applied inside the kernel (PARTIAL); the kernel skips the
# rest. `mask.dense()` expands a mask to the element level for drawing, and
# `block_density` is the fraction of (query block, key block) pairs visited. The grid lines
# below are block boundaries. First the fixed, position-only patterns on a 256-token
# sequence, where skipping blocks pays off.


# %%
def draw_masks(named, title):
    fig, axes = plt.subplots(1, len(named), figsize=(3.2 * len(named), 3.7))
    for ax, (name, mask) in zip(axes, named.items()):
        ax.imshow(np.asarray(mask.dense()[0, 0]), cmap="Blues", vmin=0, vmax=1.3,
                  interpolation="nearest")
        for edge in range(mask.block_q, mask.seq_q, mask.block_q):
            ax.axhline(edge - 0.5, color="gray", linewidth=0.5)
        for edge in range(mask.block_k, mask.seq_k, mask.block_k):
            ax.axvline(edge - 0.5, color="gray", linewidth=0.5)
        ax.set_title(f"{name}\nblock density {float(mask.block_density):.2f}", fontsize=9)
        ax.set(xticks=[], yticks=[])
    axes[0].set(xlabel="key", ylabel="query")
    fig.suptitle(title)
    plt.show()


blocks = dict(block_q=BLOCK, block_k=BLOCK)
draw_masks({"causal": masks.causal_mask(256, **blocks),
            "window 32 + 4 sinks": masks.sliding_window_mask(256, 32, sinks=4, **blocks),
            "strided 32": masks.strided_mask(256, 32, **blocks)},
           f"Fixed patterns, 256 tokens, blocks of {BLOCK}")

# %% [markdown]
# Now the masks on the trained model's own layer-1 queries and keys (18 tokens: one full
# block of 16 and a ragged one). The fixed patterns use a window of `WINDOW` keys plus
# `SINKS` sink and a stride of `STRIDE`. The gated mask (SeerAttention style) scores key
# blocks by mean-pooled `q·k` and keeps the best `keep` per query block, always including
# the diagonal block, so with `keep = 1` on two blocks it is block-local. The Spark mask,
# `SparseAttention(pattern='spark').block_mask(q, k)`, picks about `keys_per_query / BLOCK`
# key blocks by Spark's statistical top-k over pooled low-dimensional scores, with no sort and no
# forced diagonal. Gated and Spark masks differ per example and head (drawn: example 0,
# head 0).


# %%
def layer_qkv(m, tokens, layer):
    """The q, k, v [B, T, H, D] that block `layer` of the LM computes for `tokens`."""
    x = m.embed(tokens) + m.pos[: tokens.shape[1]]
    for block in m.blocks[:layer]:
        x = block(x)
    attn, h = m.blocks[layer].attn, m.blocks[layer].ln1(x)
    return attn._heads(attn.q(h)), attn._heads(attn.k(h)), attn._heads(attn.v(h))


q, k, v = nnx.jit(layer_qkv, static_argnums=2)(model, tokens, 1)
spark_attn = SparseAttention(64, 4, causal=True, pattern="spark", keys_per_query=BLOCK,
                             block_size=BLOCK,
                             rngs=nnx.Rngs(0))
block_masks = {
    "causal": masks.causal_mask(T, **blocks),
    f"window {WINDOW} + {SINKS} sink": masks.sliding_window_mask(T, WINDOW, sinks=SINKS,
                                                                 **blocks),
    f"strided {STRIDE}": masks.strided_mask(T, STRIDE, **blocks),
    "gated, keep 1": masks.gated_block_mask(q, k, 1, causal=True, **blocks),
    "spark, ~1 block": spark_attn.block_mask(q, k),
}
draw_masks(block_masks, f"Masks on the trained model's layer 1 ({T} tokens)")
for name, mask in block_masks.items():
    visible = float(mask.dense().mean())
    print(f"{name:>20}: mask (batch, heads) {mask.mask_shape}, block density "
          f"{float(mask.block_density):.3f}, visible (query, key) pairs {visible:.3f}")

# %% [markdown]
# A `BlockMask` is a pytree: the int32 counts and indices of the FULL and PARTIAL blocks
# per query block (and the transposed lists the backward pass uses), plus static metadata
# (block sizes, sequence lengths, the element rule). Here is the Spark one.

# %%
treescope.show(block_masks["spark, ~1 block"])

# %% [markdown]
# ## The kernel computes masked attention exactly
#
# `block_sparse_attention(q, k, v, mask)` must equal the pure-jnp
# `attention_reference(q, k, v, mask.dense())` (softmax over the visible keys only). On
# CPU the default implementation is XLA's dense masked attention; `"xla_blocks"` gathers
# only the visited key blocks; the Pallas kernel runs on GPU (its head dimension must be
# 64 or 128, so this small model would fall back to XLA there too).

# %%
@jax.jit
def kernel_errors(q, k, v, mask):
    """max |block_sparse_attention - reference| per implementation."""
    want = attention_reference(q, k, v, mask.dense())
    return {impl: jnp.max(jnp.abs(block_sparse_attention(q, k, v, mask, implementation=impl)
                                  - want)) for impl in ("xla", "xla_blocks")}


for name, mask in block_masks.items():
    errors = jax.device_get(kernel_errors(q, k, v, mask))
    print(f"{name:>20}: default implementation here {choose_implementation(q, k, v, mask)!r}; "
          "max |kernel - reference| " + ", ".join(f"{i}: {e:.1e}" for i, e in errors.items()))
    assert max(errors.values()) < 1e-5

# %% [markdown]
# ## Running the model with sparse attention
#
# `config.model.attention = 'sparse'` builds every layer's attention as a
# `SparseAttention` that runs the block-sparse kernel on its `pattern` mask (window,
# strided or Spark blocks as above; `config.model.attention_options` holds its keyword
# arguments); `'spark'` builds token-level Spark attention (`SparkAttention`), which
# keeps about `keys_per_query` single keys per query — the sparsity the
# concentration plot measured. All have the same `q`/`k`/`v`/`o` parameters as the dense
# attention, so the trained weights load unchanged. First we evaluate the trained weights
# under each kind of sparse attention as they are; then we fine-tune briefly with it in
# place, from the trained weights with a fresh optimizer (written as a step-0 checkpoint
# that `train_and_evaluate` resumes from).

# %%
rows = []
for label, attention, pattern in VARIANTS:
    config = make_config(attention, pattern, num_steps=FINETUNE_STEPS)
    sparse_trainer = make_trainer(config)
    with jax.set_mesh(sparse_trainer.mesh):
        as_trained = sparse_trainer.evaluate(trained_state)["accuracy"]
    start = trained_state._replace(step=jnp.zeros((), jnp.int32),  # fresh optimizer state
                                   opt_state=sparse_trainer.tx.init(trained_state.params))
    workdir = RUNS / "06_attention_sparsity" / f"{attention}_{pattern or 'tokens'}"
    shutil.rmtree(workdir, ignore_errors=True)  # retrain, do not resume a finished run
    checkpointer = Checkpointer(workdir / "checkpoints")
    checkpointer.save(0, start, 0)  # trained weights, fresh optimizer, data from the start
    checkpointer.close()
    tuned = train_and_evaluate(config, workdir, progress=not TINY)["eval_accuracy"]
    rows.append({"attention": label, "as trained": as_trained, "fine-tuned": tuned})
results = analysis.Table(rows)
print(f"dense attention: {summary['eval_accuracy']:.3f}")
print(results)

fig, ax = plt.subplots(figsize=(8, 3.6))
x = np.arange(len(results))
ax.bar(x - 0.2, results["as trained"], 0.4, label="dense-trained weights, as they are")
ax.bar(x + 0.2, results["fine-tuned"], 0.4,
       label=f"after {FINETUNE_STEPS} fine-tuning steps with it")
ax.axhline(summary["eval_accuracy"], color="black", linestyle="--", label="dense attention")
ax.set_xticks(x, results["attention"], fontsize=8)
ax.set(xlabel="sparse attention", ylabel="eval accuracy (answer token)", ylim=(0, 1.15),
       title="Associative recall with sparse attention")
ax.legend(fontsize=8, loc="upper left", ncol=3)
plt.show()

# %% [markdown]
# ## What we saw
#
# - After training, attention is far more concentrated than at initialisation or under
#   uniform attention, and at the answer query the recall heads put nearly all their mass
#   on one position, the value bound to the queried key (the tiny CI run is too short to
#   learn the task, so this does not show there).
# - Block-sparse masks turn sparsity into skipped work: fixed patterns (window with sinks,
#   strided) visit a fixed share of the blocks, while gated and Spark block masks choose
#   blocks per example and head from the model's own queries and keys. The kernel's output
#   equals dense masked attention on every mask.
# - Which keys are kept matters more than how many. Token-level Spark attention, keeping
#   only a few keys per query chosen from the model's own scores, runs the dense-trained
#   model at close to dense accuracy, as the concentration measurement predicts. Masks that
#   keep or drop whole 16-key blocks by position or by pooled scores lose keys the recall
#   circuit needs on these short sequences, and a short fine-tune recovers only part of
#   the accuracy. Block-sparse attention pays off on long sequences, where a block is a
#   small share of the keys.
