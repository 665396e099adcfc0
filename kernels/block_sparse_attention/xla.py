"""XLA implementations of block-sparse attention (any device, differentiable by autodiff).

* ``attention_xla`` — dense masked attention with the BlockMask's element mask: does the
  full ``T x S`` work (no skipping); the fallback where the Pallas kernel does not apply.
* ``attention_xla_blocks`` — per query block, gathers only the key/value blocks it visits
  (its full list, then its partial list, padded to the lists' static lengths; padding and
  the partial blocks' element rule are masked) and attends over them: work and memory scale
  with the visited blocks, so it skips work on any device (the CPU speed-up of ``bench``).

Both follow the reference's definition (softmax over visible keys in f32 statistics; rows
with no visible key give 0 with zero gradients).

Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.kernels.block_sparse_attention import masks, reference, xla
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 128, 2, 16))
    >>> m = masks.causal_mask(128, block_q=32, block_k=32)
    >>> out = jax.jit(xla.attention_xla_blocks)(q, k, v, m)
    >>> want = reference.attention_reference(q, k, v, m.dense())
    >>> out.shape, float(jnp.abs(out - want).max()) < 1e-5
    ((1, 128, 2, 16), True)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .masks import BlockMask


def _safe_softmax_weights(logits: jax.Array, axis: int = -1) -> jax.Array:
    """softmax over ``axis`` of logits with -inf for masked entries; all-masked rows → 0."""
    row_max = jnp.max(logits, axis=axis, keepdims=True)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    p = jnp.exp(logits - row_max)
    denom = jnp.sum(p, axis=axis, keepdims=True)
    return p / jnp.where(denom == 0.0, 1.0, denom)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, dense_mask: jax.Array, *,
                  scale: float | None = None) -> jax.Array:
    """Dense masked attention, matmuls in the input dtype with f32 accumulation.

    ``q: [B, T, H, D]``, ``k, v: [B, S, Hkv, D]`` (GQA by grouping, no repeat of k/v),
    ``dense_mask: [Bm, Hm, T, S]`` bool (``Bm ∈ {1, B}``, ``Hm ∈ {1, H}``).

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention import masks, reference
        >>> from sparsejax.kernels.block_sparse_attention.xla import attention_xla
        >>> kq, kk, kv = jax.random.split(jax.random.key(0), 3)
        >>> q = jax.random.normal(kq, (1, 64, 4, 16))                    # H = 4
        >>> k, v = jax.random.normal(kk, (1, 64, 2, 16)), jax.random.normal(kv, (1, 64, 2, 16))
        >>> mask = masks.sliding_window_mask(64, 16, block_q=16, block_k=16)
        >>> out = attention_xla(q, k, v, mask.dense())                   # GQA, Hkv = 2
        >>> want = reference.attention_reference(q, k, v, mask.dense())
        >>> out.shape, float(jnp.abs(out - want).max()) < 1e-5
        ((1, 64, 4, 16), True)
    """
    b, t, h, d = q.shape
    s, h_kv = k.shape[1], k.shape[2]
    g = h // h_kv
    scale = d ** -0.5 if scale is None else scale
    qg = q.reshape(b, t, h_kv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k,
                        preferred_element_type=jnp.float32) * scale
    bm, hm = dense_mask.shape[:2]
    m = dense_mask.reshape(bm, h_kv, g, t, s) if hm > 1 else dense_mask[:, :, None]
    p = _safe_softmax_weights(jnp.where(m, logits, -jnp.inf))
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def attention_xla_blocks(q: jax.Array, k: jax.Array, v: jax.Array, mask: BlockMask, *,
                         scale: float | None = None) -> jax.Array:
    """Attention over only the visited key blocks of each query block (gather, then dense).

    Logits are ``[B, H, nQ, block_q, L·block_k]`` with ``L = Lfull + Lpartial`` the static
    lengths of the mask's forward lists — the cost is the visited fraction of dense
    attention (for concrete masks L is the largest per-row count).

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention import masks, reference
        >>> from sparsejax.kernels.block_sparse_attention.xla import attention_xla_blocks
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 256, 2, 16))
        >>> m = masks.sliding_window_mask(256, 32, block_q=32, block_k=32)
        >>> m.kv_index_full.shape[-1] + m.kv_index_partial.shape[-1]   # L: 3 of the 8 key blocks
        3
        >>> out = jax.jit(attention_xla_blocks)(q, k, v, m)
        >>> float(jnp.abs(out - reference.attention_reference(q, k, v, m.dense())).max()) < 1e-5
        True
    """
    b, t, h, d = q.shape
    s, h_kv = k.shape[1], k.shape[2]
    g = h // h_kv
    bq, bk = mask.block_q, mask.block_k
    n_q, n_k = mask.num_q_blocks, mask.num_k_blocks
    scale = d ** -0.5 if scale is None else scale
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0)))
    qb = pad(q, n_q * bq).reshape(b, n_q, bq, h, d)
    kb = pad(k, n_k * bk).reshape(b, n_k, bk, h_kv, d)
    vb = pad(v, n_k * bk).reshape(b, n_k, bk, h_kv, d)

    l_full = mask.kv_index_full.shape[-1]
    index = jnp.concatenate([mask.kv_index_full, mask.kv_index_partial], axis=-1)
    length = index.shape[-1]
    slot = jnp.arange(length)
    valid = jnp.where(slot < l_full, slot < mask.kv_count_full[..., None],
                      slot - l_full < mask.kv_count_partial[..., None])    # [Bm, Hm, nQ, L]
    index = jnp.broadcast_to(index, (b, h, n_q, length))
    valid = jnp.broadcast_to(valid, (b, h, n_q, length))

    bi = jnp.arange(b)[:, None, None, None]
    hi = (jnp.arange(h) // g)[None, :, None, None]
    kg = kb[bi, index, :, hi, :].reshape(b, h, n_q, length * bk, d)   # [B, H, nQ, L·bk, D]
    vg = vb[bi, index, :, hi, :].reshape(b, h, n_q, length * bk, d)

    logits = jnp.einsum("bqihd,bhqjd->bhqij", qb, kg,
                        preferred_element_type=jnp.float32) * scale   # [B, H, nQ, bq, L·bk]
    qpos = (jnp.arange(n_q)[:, None] * bq + jnp.arange(bq))[:, :, None]          # [nQ, bq, 1]
    kpos = (index[..., None] * bk + jnp.arange(bk)).reshape(b, h, n_q, 1, length * bk)
    partial = jnp.repeat(slot >= l_full, bk)                                      # [L·bk]
    rule_ok = mask.rule(qpos, kpos) & (kpos < s)
    keep = jnp.repeat(valid, bk, axis=-1)[:, :, :, None, :] & (~partial | rule_ok)
    p = _safe_softmax_weights(jnp.where(keep, logits, -jnp.inf))
    out = jnp.einsum("bhqij,bhqjd->bqihd", p.astype(v.dtype), vg,
                     preferred_element_type=jnp.float32)
    return out.reshape(b, n_q * bq, h, d)[:, :t].astype(q.dtype)
