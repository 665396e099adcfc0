"""Flash-style block-sparse attention in Pallas (Triton lowering), forward and backward.

Forward (FlashAttention-2, Dao 2023): grid ``(nQ, B, H)``; each program owns one query block
and loops (``lax.fori_loop`` with a dynamic trip count) over its FULL key blocks, then over
its PARTIAL key blocks with the element rule applied on (query, key) position iotas, keeping
the online-softmax state (running max ``m``, sum ``l``, accumulator) in f32. It writes the
output (0 for rows with no visible key) and the log-sum-exp ``lse = m + log l`` (-inf there).

Backward, with ``δ = rowsum(dO ⊙ O)`` and ``P = exp(S - lse)``::

    dV = Pᵀ dO    dP = dO Vᵀ    dS = P ⊙ (dP - δ)    dQ = scale·dS K    dK = scale·dSᵀ Q

one kernel gridded over key blocks ``(nK, B, H)`` loops over the TRANSPOSED lists (query
blocks visiting that key block) for dK, dV; one gridded over query blocks loops over the
forward lists for dQ. Rows with no visible key use ``lse = +inf`` there so ``P = 0`` (no NaN,
zero gradients). GQA: dK, dV are computed per query head and summed over each group outside.

The kernel tile is the mask block (``block_q x block_k``); index arrays are ordinary inputs
(scalar prefetch is TPU-only), loaded with scalar reads, and K/V/Q/dO blocks are read with
``ref[pl.ds(start, size), :]`` from whole-sequence BlockSpecs.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.kernels.block_sparse_attention import masks, reference
    >>> from sparsejax.kernels.block_sparse_attention.pallas import (
    ...     block_sparse_attention_pallas)
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 32, 1, 64))
    >>> mask = masks.causal_mask(32, block_q=16, block_k=16)
    >>> out = block_sparse_attention_pallas(q, k, v, mask, interpret=True)
    >>> float(jnp.abs(out - reference.attention_reference(q, k, v, mask.dense())).max()) < 1e-5
    True
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from .._common import on_gpu, triton_params
from .masks import BlockMask, ElementRule

HEAD_DIMS = (64, 128)
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    block_q: int
    block_k: int
    rule: ElementRule
    interpret: bool
    num_warps: int
    num_stages: int


# ----------------------------------------------------------------------------- helpers

def _pad_last(x: jax.Array) -> jax.Array:
    """Pads the last axis to a power of two (Triton tiles), with zeros."""
    n = x.shape[-1]
    target = pl.next_power_of_2(n)
    if target == n:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, target - n)])


def _dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a @ bᵀ`` with f32 accumulation."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a: jax.Array, b: jax.Array) -> jax.Array:
    """``aᵀ @ b`` with f32 accumulation."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _element_mask(rule: ElementRule, q_block, k_block, block_q: int, block_k: int):
    qpos = q_block * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
    kpos = k_block * block_k + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    return rule(qpos, kpos)


def _scores(q, k, qi, kj, masked: bool, cfg) -> jax.Array:
    """``scale · q kᵀ`` of one (query block, key block) pair, f32; with ``masked`` the
    element rule hides invisible entries (-inf)."""
    s = _dot_nt(q, k) * cfg.scale
    if masked:
        s = jnp.where(_element_mask(cfg.rule, qi, kj, cfg.block_q, cfg.block_k), s, -jnp.inf)
    return s


def _load_kv(k_ref, v_ref, kj, bk: int):
    start = pl.multiple_of(kj * bk, bk)
    return k_ref[pl.ds(start, bk), :], v_ref[pl.ds(start, bk), :]


def _mask_index_map(mask_shape: tuple[int, int], batch_pos: int, head_pos: int, grid_block):
    """Index map for a ``[Bm, Hm, n, ...]`` mask array broadcast over batch and heads."""
    bm, hm = mask_shape

    def index_map(*ids):
        b = ids[batch_pos] if bm > 1 else 0
        h = ids[head_pos] if hm > 1 else 0
        return grid_block(b, h, ids[0])
    return index_map


# ----------------------------------------------------------------------------- forward

def _fwd_kernel(cnt_f_ref, idx_f_ref, cnt_p_ref, idx_p_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *, cfg: _Config):
    qi = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]
    d = q.shape[-1]

    def step(masked, idx_ref):
        def body(t, carry):
            acc, m, l = carry
            kj = idx_ref[t]
            k, v = _load_kv(k_ref, v_ref, kj, bk)
            s = _scores(q, k, qi, kj, masked, cfg)
            m_new = jnp.maximum(m, jnp.max(s, axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
            alpha = jnp.exp(m - m_safe)
            p = jnp.exp(s - m_safe[:, None])
            l = alpha * l + jnp.sum(p, axis=1)
            acc = alpha[:, None] * acc + _dot(p.astype(v.dtype), v)
            return acc, m_new, l
        return body

    carry = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
             jnp.zeros((bq,), jnp.float32))
    carry = lax.fori_loop(0, cnt_f_ref[qi], step(False, idx_f_ref), carry)
    carry = lax.fori_loop(0, cnt_p_ref[qi], step(True, idx_p_ref), carry)
    acc, m, l = carry
    empty = l == 0.0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _forward(q, k, v, mask: BlockMask, cfg: _Config):
    b, t, h, d = q.shape
    s, h_kv = k.shape[1], k.shape[2]
    group = h // h_kv
    bq = cfg.block_q
    n_q = t // bq
    ms = mask.mask_shape
    cnt_spec = lambda x: pl.BlockSpec((None, None, x.shape[-1]),
                                      _mask_index_map(ms, 1, 2, lambda mb, mh, i: (mb, mh, 0)))
    idx_spec = lambda x: pl.BlockSpec((None, None, None, x.shape[-1]),
                                      _mask_index_map(ms, 1, 2, lambda mb, mh, i: (mb, mh, i, 0)))
    lists = [_pad_last(mask.kv_count_full), _pad_last(mask.kv_index_full),
             _pad_last(mask.kv_count_partial), _pad_last(mask.kv_index_partial)]
    q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0))
    kv_spec = pl.BlockSpec((None, s, None, d), lambda i, bb, hh: (bb, 0, hh // group, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(n_q, b, h),
        in_specs=[cnt_spec(lists[0]), idx_spec(lists[1]), cnt_spec(lists[2]),
                  idx_spec(lists[3]), q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=triton_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="block_sparse_attention_fwd",
    )(*lists, q, k, v)


# ----------------------------------------------------------------------------- backward

def _dkdv_kernel(cnt_f_ref, idx_f_ref, cnt_p_ref, idx_p_ref, q_ref, k_ref, v_ref, do_ref,
                 lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: _Config):
    kj = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_k
    k = k_ref[...]
    v = v_ref[...]
    d = k.shape[-1]

    def step(masked, idx_ref):
        def body(t, carry):
            dk, dv = carry
            qi = idx_ref[t]
            start = pl.multiple_of(qi * bq, bq)
            q = q_ref[pl.ds(start, bq), :]
            do = do_ref[pl.ds(start, bq), :]
            lse = lse_ref[pl.ds(start, bq)]
            delta = delta_ref[pl.ds(start, bq)]
            s = _scores(q, k, qi, kj, masked, cfg)
            p = jnp.exp(s - lse[:, None])
            dv = dv + _dot_tn(p.astype(do.dtype), do)
            dp = _dot_nt(do, v)
            ds = p * (dp - delta[:, None])
            dk = dk + _dot_tn(ds.astype(q.dtype), q)
            return dk, dv
        return body

    carry = (jnp.zeros((bk, d), jnp.float32), jnp.zeros((bk, d), jnp.float32))
    carry = lax.fori_loop(0, cnt_f_ref[kj], step(False, idx_f_ref), carry)
    carry = lax.fori_loop(0, cnt_p_ref[kj], step(True, idx_p_ref), carry)
    dk, dv = carry
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(cnt_f_ref, idx_f_ref, cnt_p_ref, idx_p_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, cfg: _Config):
    qi = pl.program_id(0)
    bq, bk = cfg.block_q, cfg.block_k
    q = q_ref[...]
    do = do_ref[...]
    lse = lse_ref[...]
    delta = delta_ref[...]
    d = q.shape[-1]

    def step(masked, idx_ref):
        def body(t, dq):
            kj = idx_ref[t]
            k, v = _load_kv(k_ref, v_ref, kj, bk)
            s = _scores(q, k, qi, kj, masked, cfg)
            p = jnp.exp(s - lse[:, None])
            dp = _dot_nt(do, v)
            ds = p * (dp - delta[:, None])
            return dq + _dot(ds.astype(k.dtype), k)
        return body

    dq = jnp.zeros((bq, d), jnp.float32)
    dq = lax.fori_loop(0, cnt_f_ref[qi], step(False, idx_f_ref), dq)
    dq = lax.fori_loop(0, cnt_p_ref[qi], step(True, idx_p_ref), dq)
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _backward(q, k, v, mask: BlockMask, o, lse, do, cfg: _Config):
    b, t, h, d = q.shape
    s, h_kv = k.shape[1], k.shape[2]
    group = h // h_kv
    bq, bk = cfg.block_q, cfg.block_k
    ms = mask.mask_shape
    do = do.astype(q.dtype)
    # Rows with no visible key: lse=-inf in the forward; +inf here makes P = exp(S - lse) = 0.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    cnt_spec = lambda x: pl.BlockSpec((None, None, x.shape[-1]),
                                      _mask_index_map(ms, 1, 2, lambda mb, mh, i: (mb, mh, 0)))
    idx_spec = lambda x: pl.BlockSpec((None, None, None, x.shape[-1]),
                                      _mask_index_map(ms, 1, 2, lambda mb, mh, i: (mb, mh, i, 0)))
    seq_q_spec = pl.BlockSpec((None, t, None, d), lambda i, bb, hh: (bb, 0, hh, 0))
    seq_k_spec = pl.BlockSpec((None, s, None, d), lambda i, bb, hh: (bb, 0, hh // group, 0))
    blk_q_spec = pl.BlockSpec((None, bq, None, d), lambda i, bb, hh: (bb, i, hh, 0))
    blk_kv_spec = pl.BlockSpec((None, bk, None, d), lambda i, bb, hh: (bb, i, hh // group, 0))
    blk_dkv_spec = pl.BlockSpec((None, bk, None, d), lambda i, bb, hh: (bb, i, hh, 0))
    row_spec = pl.BlockSpec((None, None, t), lambda i, bb, hh: (bb, hh, 0))
    blk_row_spec = pl.BlockSpec((None, None, bq), lambda i, bb, hh: (bb, hh, i))

    t_lists = [_pad_last(mask.q_count_full), _pad_last(mask.q_index_full),
               _pad_last(mask.q_count_partial), _pad_last(mask.q_index_partial)]
    dkv_dtype = k.dtype if group == 1 else jnp.float32
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, cfg=cfg),
        grid=(s // bk, b, h),
        in_specs=[cnt_spec(t_lists[0]), idx_spec(t_lists[1]), cnt_spec(t_lists[2]),
                  idx_spec(t_lists[3]), seq_q_spec, blk_kv_spec, blk_kv_spec, seq_q_spec,
                  row_spec, row_spec],
        out_specs=[blk_dkv_spec, blk_dkv_spec],
        out_shape=[jax.ShapeDtypeStruct((b, s, h, d), dkv_dtype)] * 2,
        compiler_params=triton_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="block_sparse_attention_dkdv",
    )(*t_lists, q, k, v, do, lse, delta)
    if group > 1:
        dk = dk.reshape(b, s, h_kv, group, d).sum(axis=3).astype(k.dtype)
        dv = dv.reshape(b, s, h_kv, group, d).sum(axis=3).astype(v.dtype)

    lists = [_pad_last(mask.kv_count_full), _pad_last(mask.kv_index_full),
             _pad_last(mask.kv_count_partial), _pad_last(mask.kv_index_partial)]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid=(t // bq, b, h),
        in_specs=[cnt_spec(lists[0]), idx_spec(lists[1]), cnt_spec(lists[2]),
                  idx_spec(lists[3]), blk_q_spec, seq_k_spec, seq_k_spec, blk_q_spec,
                  blk_row_spec, blk_row_spec],
        out_specs=blk_q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=triton_params(cfg.num_warps, cfg.num_stages),
        interpret=cfg.interpret,
        name="block_sparse_attention_dq",
    )(*lists, q, k, v, do, lse, delta)
    return dq, dk, dv


# ----------------------------------------------------------------------------- custom_vjp

@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, cfg):
    return _forward(q, k, v, mask, cfg)[0]


def _attention_fwd(q, k, v, mask, cfg):
    o, lse = _forward(q, k, v, mask, cfg)
    return o, (q, k, v, mask, o, lse)


def _attention_bwd(cfg, res, do):
    q, k, v, mask, o, lse = res
    dq, dk, dv = _backward(q, k, v, mask, o, lse, do, cfg)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)


# ----------------------------------------------------------------------------- public

def unsupported_reason(q: jax.Array, k: jax.Array, v: jax.Array, mask: BlockMask) -> str | None:
    """Why the Pallas kernel cannot run these inputs (``None`` if it can).

    Needs head dim in {64, 128}, q/k/v all bf16 or all f32, and sequence lengths that are
    multiples of the mask's blocks (shape agreement of q/k/v/mask is checked by the api).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention import masks
        >>> from sparsejax.kernels.block_sparse_attention.pallas import unsupported_reason
        >>> q, k, v = jnp.zeros((3, 1, 32, 1, 64))
        >>> mask = masks.causal_mask(32, block_q=16, block_k=16)
        >>> unsupported_reason(q, k, v, mask) is None
        True
        >>> unsupported_reason(q[..., :32], k[..., :32], v[..., :32], mask)
        'head dim 32 is not supported by the Pallas kernel (needs one of (64, 128))'
    """
    d = q.shape[-1]
    if d not in HEAD_DIMS:
        return f"head dim {d} is not supported by the Pallas kernel (needs one of {HEAD_DIMS})"
    dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
    if len(dtypes) != 1 or dtypes.pop() not in DTYPES:
        return (f"dtypes q={q.dtype}, k={k.dtype}, v={v.dtype} are not supported by the "
                "Pallas kernel (needs all bfloat16 or all float32)")
    if q.shape[1] % mask.block_q:
        return (f"seq_q={q.shape[1]} is not a multiple of block_q={mask.block_q} "
                "(the Pallas kernel needs whole blocks)")
    if k.shape[1] % mask.block_k:
        return (f"seq_k={k.shape[1]} is not a multiple of block_k={mask.block_k} "
                "(the Pallas kernel needs whole blocks)")
    return None


def block_sparse_attention_pallas(q: jax.Array, k: jax.Array, v: jax.Array, mask: BlockMask,
                                  *, scale: float | None = None, interpret: bool | None = None,
                                  num_warps: int | None = None,
                                  num_stages: int = 2) -> jax.Array:
    """Block-sparse flash attention (Pallas), differentiable in q, k, v (``custom_vjp``).

    ``q: [B, T, H, D]``, ``k, v: [B, S, Hkv, D]``, ``mask`` a ``BlockMask`` for (T, S); the
    kernel tile is the mask block. ``interpret=None`` means ``not on_gpu()``. ``num_warps``
    defaults to 4 for D=64 and 8 for D=128. Inputs are assumed validated (see ``api``).

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention import masks, reference
        >>> from sparsejax.kernels.block_sparse_attention.pallas import (
        ...     block_sparse_attention_pallas)
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 64, 1, 64))
        >>> m = masks.causal_mask(64, block_q=16, block_k=16)
        >>> loss = lambda q: block_sparse_attention_pallas(q, k, v, m, interpret=True).sum()
        >>> g = jax.jit(jax.grad(loss))(q)                      # through the backward kernels
        >>> g_ref = jax.jit(jax.grad(lambda q: reference.attention_reference(q, k, v,
        ...                                                                  m.dense()).sum()))(q)
        >>> float(jnp.abs(g - g_ref).max()) < 1e-4
        True
    """
    reason = unsupported_reason(q, k, v, mask)
    if reason is not None:
        raise ValueError(reason)
    d = q.shape[-1]
    cfg = _Config(scale=float(d ** -0.5 if scale is None else scale), block_q=mask.block_q,
                  block_k=mask.block_k, rule=mask.rule,
                  interpret=(not on_gpu()) if interpret is None else bool(interpret),
                  num_warps=num_warps or (4 if d <= 64 else 8), num_stages=num_stages)
    return _attention(q, k, v, mask, cfg)
