"""Attention concentration: how much of each query's attention mass its top-k keys hold.

For attention probabilities ``P[b, h, q, :]`` (rows summing to 1) the top-k mass of a
query is ``c_k(b, h, q) = Σ_{j ∈ topk(P[b,h,q,:])} P[b, h, q, j]``; a head's
concentration is its mean over batch and queries. A query with at most ``k`` keys of
nonzero probability (a causal row near the start) has mass 1. High concentration at
small ``k`` is what lets top-k / block-sparse attention drop the rest (Spark attention,
``sparsejax.nn.SparkAttention``).

Example:

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from sparsejax.analysis import attention_concentration, attention_probs
    >>> from sparsejax.models import DecoderLM
    >>> model = DecoderLM(vocab_size=16, max_len=8, d_model=8, num_heads=2, num_layers=2,
    ...                   d_ff=16, rngs=nnx.Rngs(0))
    >>> tokens = jnp.arange(8)[None]
    >>> probs = attention_probs(model, lambda m: m(tokens), 'blocks/0/attn')
    >>> probs.shape                                           # [B, H, T, T]
    (1, 2, 8, 8)
    >>> attention_concentration(probs, k=2).round(2)          # [H], each in (0, 1]
    array([0.75, 0.74], dtype=float32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.nn.layers import Attention
from sparsejax.nn.spark import SparkAttention, spark_key_mask
from sparsejax.nn.sparse_attention import SparseAttention
from sparsejax.surgery import ModelCall, named_modules, trace_calls


def attention_concentration(probs, k: int) -> np.ndarray:
    """Per head, the mean over batch and queries of the probability mass in each query's
    ``k`` largest keys; rows with at most ``k`` nonzero entries count as 1.

    ``probs``: ``[B, H, Tq, Tk]``. Returns a float array ``[H]``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.analysis import attention_concentration
        >>> p = jnp.array([[[[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]]]])   # B=1, H=1, Tq=2, Tk=3
        >>> attention_concentration(p, 1)                           # [(0.5 + 1.0) / 2]
        array([0.75], dtype=float32)
        >>> attention_concentration(p, 2)                           # [(0.8 + 1.0) / 2]
        array([0.9], dtype=float32)
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer >= 1 (keys per query), got {k!r}")
    probs = jnp.asarray(probs, jnp.float32)
    if probs.ndim != 4:
        raise ValueError(f"probs must be [batch, heads, queries, keys], got shape {probs.shape}")
    top = jax.lax.top_k(probs, min(int(k), probs.shape[-1]))[0]
    mass = jnp.sum(top, axis=-1)
    few = jnp.sum(probs != 0, axis=-1) <= k  # every key with mass is in the top k
    mass = jnp.where(few, 1.0, mass)
    return np.asarray(jnp.mean(mass, axis=(0, 2)))


def attention_probs(model: nnx.Module, call: ModelCall, layer: str) -> jax.Array:
    """Attention probabilities ``[B, H, Tq, Tk]`` of the attention module at path
    ``layer`` when ``call(model)`` runs (e.g. ``call=lambda m: m(tokens)``).

    The module's input is recorded by wrapping its class's ``__call__`` for one forward
    pass (as ``sparsejax.surgery`` does), then the probabilities are recomputed from its
    ``q``/``k`` projections: ``softmax(q kᵀ / √d_head)`` with the causal mask if the module
    is causal, and, for ``SparkAttention``, only the keys its statistical top-k keeps.
    Supports ``sparsejax.nn.layers.Attention`` and ``sparsejax.nn.SparkAttention``
    (other attention modules compute their own scores and are rejected).

    Example:

        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> from sparsejax.analysis import attention_probs
        >>> from sparsejax.models import DecoderLM
        >>> lm = DecoderLM(vocab_size=16, max_len=8, d_model=8, num_heads=2, num_layers=2,
        ...                d_ff=16, rngs=nnx.Rngs(0))
        >>> tokens = jnp.arange(8)[None]
        >>> probs = attention_probs(lm, lambda m: m(tokens), 'blocks/1/attn')
        >>> probs.shape, bool(jnp.allclose(probs.sum(-1), 1))   # all ones
        ((1, 2, 8, 8), True)
        >>> bool((jnp.triu(probs, 1) == 0).all())   # causal: no weight on later keys
        True
    """
    modules = dict(named_modules(model))
    if layer not in modules:
        attn = [p for p, m in modules.items() if isinstance(m, Attention)]
        raise ValueError(f"no module at path {layer!r}; attention modules: {attn}")
    module = modules[layer]
    if type(module) not in (Attention, SparkAttention, SparseAttention):
        raise ValueError(f"module {layer!r} is a {type(module).__name__}; attention_probs "
                         "supports sparsejax Attention, SparkAttention and SparseAttention")
    calls = [c for c in trace_calls(model, call, kinds=(type(module),)) if c.path == layer]
    h = calls[0].args[0] if calls else None
    if h is None:
        raise ValueError(f"attention module {layer!r} is not called by call(model)")
    q, k = module._heads(module.q(h)), module._heads(module.k(h))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * module.head_dim ** -0.5
    t_q, t_k = logits.shape[-2:]
    keep = (jnp.tril(jnp.ones((t_q, t_k), bool), k=t_k - t_q) if module.causal
            else jnp.ones((t_q, t_k), bool))
    if isinstance(module, SparkAttention):
        keep = keep & spark_key_mask(q[..., :module.d_low], k[..., :module.d_low],
                                     module.keys_per_query, module.causal)
    if isinstance(module, SparseAttention):  # the block mask carries the causal rule too
        keep = keep & module.block_mask(q, k).dense()
    return jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)
