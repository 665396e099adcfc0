"""Pure-jnp masked attention: the definition every implementation must match.

``out[b, i, h] = Σ_k softmax_k(scale · q_i·k_k | mask[i, k]) v_k`` over the allowed keys
only (masked logits are -inf), in f32; a query row with no allowed key outputs 0 (its
log-sum-exp is -inf; its gradients are 0).

Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.kernels.block_sparse_attention import reference, masks
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 128, 2, 16))
    >>> m = masks.causal_mask(128, block_q=32, block_k=32)
    >>> out = reference.attention_reference(q, k, v, m.dense())
    >>> out.shape, bool(jnp.allclose(out[:, 0], v[:, 0]))   # query 0 sees only key 0
    ((1, 128, 2, 16), True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, dense_mask: jax.Array, *,
                        scale: float | None = None) -> jax.Array:
    """Masked softmax attention in f32; rows with no visible key give 0.

    ``q: [B, T, H, D]``, ``k, v: [B, S, Hkv, D]`` (GQA: query head ``h`` reads kv head
    ``h // (H // Hkv)``), ``dense_mask: [Bm, Hm, T, S]`` bool with ``Bm ∈ {1, B}``,
    ``Hm ∈ {1, H}``. ``scale`` defaults to ``D ** -0.5``. Returns ``[B, T, H, D]`` in
    ``q.dtype``.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention.reference import attention_reference
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 4, 2, 8))
        >>> T = q.shape[1]
        >>> strict = jnp.tril(jnp.ones((T, T), bool), k=-1)[None, None]   # query 0 sees nothing
        >>> out = attention_reference(q, k, v, strict)
        >>> bool((out[:, 0] == 0).all()), bool(jnp.allclose(out[:, 1], v[:, 0]))
        (True, True)
    """
    h, h_kv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kr = jnp.repeat(k.astype(jnp.float32), h // h_kv, axis=2)
    vr = jnp.repeat(v.astype(jnp.float32), h // h_kv, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kr) * scale
    logits = jnp.where(dense_mask, logits, -jnp.inf)
    row_max = jnp.max(logits, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.exp(logits - jax.lax.stop_gradient(row_max))
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom == 0.0, 1.0, denom)
    return jnp.einsum("bhqk,bkhd->bqhd", p, vr).astype(q.dtype)


def logsumexp_reference(q: jax.Array, k: jax.Array, dense_mask: jax.Array, *,
                        scale: float | None = None) -> jax.Array:
    """``[B, H, T]`` f32 log-sum-exp of the masked logits (-inf for empty rows).

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention import masks
        >>> from sparsejax.kernels.block_sparse_attention.reference import logsumexp_reference
        >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 64, 2, 16))
        >>> m = masks.causal_mask(64, block_q=16, block_k=16)
        >>> lse = logsumexp_reference(q, k, m.dense())
        >>> lse.shape   # [B, H, T]
        (1, 2, 64)
        >>> bool(jnp.allclose(lse[:, :, 0], (q[:, 0] * k[:, 0]).sum(-1) / 4))   # 1 key: scale·q·k
        True
    """
    h, h_kv = q.shape[2], k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kr = jnp.repeat(k.astype(jnp.float32), h // h_kv, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), kr) * scale
    return jax.nn.logsumexp(jnp.where(dense_mask, logits, -jnp.inf), axis=-1)
