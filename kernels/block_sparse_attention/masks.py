"""Block-sparse attention masks: a compact, FlexAttention-style ``BlockMask`` and builders.

A mask is the AND of two parts:

* a **block selection** ``[Bm, Hm, nQ, nK]`` (which key blocks each query block may visit;
  arbitrary, per example / per head, possibly traced — e.g. the learned gate), and
* a static **element rule** (``ElementRule``: causal with offset, sliding window, sinks,
  strided summary columns), a small frozen description evaluated on (query position, key
  position) iotas inside the kernel.

Each selected block is classified, from the rule alone, as FULL (every element visible: no
element mask needed), PARTIAL (mixed: the kernel applies the rule inside the block) or empty
(skipped even if selected). ``BlockMask`` stores, per query block, the count and indices of
its full and of its partial key blocks (the forward and dQ lists), and the transposed lists
(per key block, the query blocks that visit it; the dK/dV lists). Index lists are padded to a
static length (the largest count when the mask is concrete, the gate's ``keep`` for a traced
gated mask, else the number of blocks); entries past the count are 0 and never read.

Positions past ``seq_q`` / ``seq_k`` (a ragged last block) are never visible.

Example:

    >>> from sparsejax.kernels.block_sparse_attention import masks
    >>> m = masks.sliding_window_mask(256, 64, sinks=16, block_q=32, block_k=32)
    >>> m.dense().shape        # element mask
    (1, 1, 256, 256)
    >>> float(m.block_density) # fraction of (query block, key block) pairs visited
    0.40625
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MIN_BLOCK = 16


# ----------------------------------------------------------------------------- element rule

@dataclasses.dataclass(frozen=True)
class ElementRule:
    """Static element-level visibility rule, evaluated on query/key position arrays.

    With ``d = (q + offset) - k`` (how far the key lies behind the query, the query aligned
    to the key axis), key ``k`` is visible to query ``q`` iff::

        allowed = True                                   if window is None and stride is None
                  (|d| < window  [d < window if causal]) if window is not None
                  or (k mod stride >= stride - summary)  if stride is not None
                  or (k < sinks)
        visible = allowed and (d >= 0 if causal)

    ``offset = seq_k - seq_q`` aligns a causal mask to the bottom-right, as
    ``jnp.tril(ones, k=seq_k - seq_q)`` does.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention.masks import ElementRule
        >>> rule = ElementRule(causal=True, window=3, sinks=1)
        >>> rule(jnp.arange(6)[:, None], jnp.arange(6)[None, :]).astype(int)   # [6, 6]
        Array([[1, 0, 0, 0, 0, 0],
               [1, 1, 0, 0, 0, 0],
               [1, 1, 1, 0, 0, 0],
               [1, 1, 1, 1, 0, 0],
               [1, 0, 1, 1, 1, 0],
               [1, 0, 0, 1, 1, 1]], dtype=int32)
    """

    causal: bool = False
    offset: int = 0
    window: int | None = None
    sinks: int = 0
    stride: int | None = None
    summary: int = 1

    @property
    def is_trivial(self) -> bool:
        """Whether every element is visible (block-granular masks: only full blocks).

        Example:

            >>> from sparsejax.kernels.block_sparse_attention.masks import ElementRule
            >>> ElementRule().is_trivial, ElementRule(causal=True).is_trivial
            (True, False)
        """
        return not self.causal and self.window is None and self.stride is None

    def __call__(self, qpos, kpos):
        """Boolean visibility for broadcastable int position arrays (numpy or jax).

        Example:

            >>> import numpy as np
            >>> from sparsejax.kernels.block_sparse_attention.masks import ElementRule
            >>> vis = ElementRule(causal=True)(np.arange(4)[:, None], np.arange(4)[None, :])
            >>> type(vis).__name__, vis.astype(int).tolist()
            ('ndarray', [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])
        """
        is_np = isinstance(qpos, np.ndarray) and isinstance(kpos, np.ndarray)
        d = (qpos + self.offset) - kpos
        shape = d.shape
        if self.window is None and self.stride is None:
            keep = np.ones(shape, bool) if is_np else jnp.ones(shape, bool)
        else:
            keep = np.zeros(shape, bool) if is_np else jnp.zeros(shape, bool)
            if self.window is not None:
                band = d < self.window
                if not self.causal:
                    band = band & (d > -self.window)
                keep = keep | band
            if self.stride is not None:
                rem = np.remainder(kpos, self.stride) if is_np else lax.rem(kpos, self.stride)
                keep = keep | (rem >= self.stride - self.summary)
            if self.sinks:
                keep = keep | (kpos < self.sinks)
        if self.causal:
            keep = keep & (d >= 0)
        return keep


# ----------------------------------------------------------------------------- BlockMask

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
    """Compact block-sparse attention mask (a pytree of int32 arrays + static metadata).

    Forward lists, per query block (``[Bm, Hm, nQ]`` counts, ``[Bm, Hm, nQ, L]`` indices):
    ``kv_count_full / kv_index_full`` (key blocks visited without an element mask) and
    ``kv_count_partial / kv_index_partial`` (key blocks where ``rule`` is applied).
    Transposed lists, per key block (``[Bm, Hm, nK]``, ``[Bm, Hm, nK, L]``):
    ``q_count_full / q_index_full`` and ``q_count_partial / q_index_partial``.
    ``Bm`` is 1 or the batch, ``Hm`` is 1 or the number of query heads (broadcast).

    Example:

        >>> from sparsejax.kernels.block_sparse_attention.masks import causal_mask
        >>> m = causal_mask(256, block_q=32, block_k=32)
        >>> m.kv_count_full[0, 0].tolist()      # blocks strictly below the diagonal
        [0, 1, 2, 3, 4, 5, 6, 7]
        >>> m.kv_count_partial[0, 0].tolist()   # the diagonal block
        [1, 1, 1, 1, 1, 1, 1, 1]
    """

    kv_count_full: jax.Array
    kv_index_full: jax.Array
    kv_count_partial: jax.Array
    kv_index_partial: jax.Array
    q_count_full: jax.Array
    q_index_full: jax.Array
    q_count_partial: jax.Array
    q_index_partial: jax.Array
    block_q: int = dataclasses.field(metadata=dict(static=True))
    block_k: int = dataclasses.field(metadata=dict(static=True))
    seq_q: int = dataclasses.field(metadata=dict(static=True))
    seq_k: int = dataclasses.field(metadata=dict(static=True))
    rule: ElementRule = dataclasses.field(metadata=dict(static=True))

    @property
    def num_q_blocks(self) -> int:
        """``ceil(seq_q / block_q)``.

        Example:

            >>> from sparsejax.kernels.block_sparse_attention.masks import causal_mask
            >>> causal_mask(100, block_q=32, block_k=32).num_q_blocks
            4
        """
        return -(-self.seq_q // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        """``ceil(seq_k / block_k)``.

        Example:

            >>> from sparsejax.kernels.block_sparse_attention.masks import causal_mask
            >>> causal_mask(64, 128, block_q=32, block_k=16).num_k_blocks
            8
        """
        return -(-self.seq_k // self.block_k)

    @property
    def mask_shape(self) -> tuple[int, int]:
        """``(Bm, Hm)``: the broadcast batch and head sizes of the mask.

        Example:

            >>> from sparsejax.kernels.block_sparse_attention.masks import causal_mask
            >>> causal_mask(64, block_q=16, block_k=16).mask_shape
            (1, 1)
        """
        return tuple(self.kv_count_full.shape[:2])

    def block_classes(self) -> tuple[jax.Array, jax.Array]:
        """``(full, partial)`` boolean ``[Bm, Hm, nQ, nK]`` block maps, from the forward lists.

        Example:

            >>> from sparsejax.kernels.block_sparse_attention.masks import causal_mask
            >>> full, partial = causal_mask(64, block_q=16, block_k=16).block_classes()
            >>> full[0, 0].astype(int).tolist()
            [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]
            >>> partial[0, 0].astype(int).tolist()
            [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
        """
        return _block_classes(self)

    @property
    def block_density(self) -> jax.Array:
        """Fraction of (query block, key block) pairs visited (full or partial), averaged
        over the mask's batch and heads.

        Example:

            >>> from sparsejax.kernels.block_sparse_attention.masks import causal_mask
            >>> float(causal_mask(1024, block_q=64, block_k=64).block_density)   # 136 / 256
            0.53125
        """
        visited = self.kv_count_full.sum(-1) + self.kv_count_partial.sum(-1)
        return jnp.mean(visited / (self.num_q_blocks * self.num_k_blocks))

    def dense(self) -> jax.Array:
        """The element-level boolean mask ``[Bm, Hm, seq_q, seq_k]`` this BlockMask encodes.

        Example:

            >>> import jax.numpy as jnp
            >>> from sparsejax.kernels.block_sparse_attention.masks import causal_mask
            >>> d = causal_mask(64, block_q=16, block_k=16).dense()
            >>> d.shape, bool((d[0, 0] == jnp.tril(jnp.ones((64, 64), bool))).all())
            ((1, 1, 64, 64), True)
        """
        return _dense(self)


@jax.jit
def _block_classes(m: BlockMask) -> tuple[jax.Array, jax.Array]:
    n_k = m.num_k_blocks
    return (_lists_to_bool(m.kv_count_full, m.kv_index_full, n_k),
            _lists_to_bool(m.kv_count_partial, m.kv_index_partial, n_k))


@jax.jit
def _dense(m: BlockMask) -> jax.Array:
    full, partial = _block_classes(m)
    expand = lambda b: jnp.repeat(jnp.repeat(b, m.block_q, axis=2), m.block_k,
                                  axis=3)[:, :, :m.seq_q, :m.seq_k]
    qpos = jnp.arange(m.seq_q, dtype=jnp.int32)[:, None]
    kpos = jnp.arange(m.seq_k, dtype=jnp.int32)[None, :]
    return expand(full) | (expand(partial) & m.rule(qpos, kpos))


def _lists_to_bool(count: jax.Array, index: jax.Array, n: int) -> jax.Array:
    """Scatters padded index lists back to a boolean ``[..., n]`` map."""
    valid = jnp.arange(index.shape[-1]) < count[..., None]
    hit = (index[..., None] == jnp.arange(n)) & valid[..., None]
    return hit.any(axis=-2)


def _bool_to_lists(b: Any, length: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Boolean ``[..., n]`` → (count ``[...]``, ascending indices padded with 0 ``[..., L]``).

    ``L`` is ``length`` if given, else the largest count when ``b`` is concrete (at least 1),
    else ``n``. Concrete masks are converted on the host (numpy), traced ones with jnp.
    """
    if not isinstance(b, jax.core.Tracer):
        b = np.asarray(b)
        count = b.sum(-1, dtype=np.int32)
        length = max(1, int(count.max(initial=0))) if length is None else length
        order = np.argsort(~b, axis=-1, kind="stable")[..., :length]
        index = np.where(np.arange(length) < count[..., None], order, 0).astype(np.int32)
        return jnp.asarray(count), jnp.asarray(index)
    length = b.shape[-1] if length is None else length
    count = b.sum(-1, dtype=jnp.int32)
    order = jnp.argsort(~b, axis=-1, stable=True)[..., :length].astype(jnp.int32)
    index = jnp.where(jnp.arange(length) < count[..., None], order, 0)
    return count, index


# ----------------------------------------------------------------------------- validation

def _is_pow2(n: int) -> bool:
    return isinstance(n, (int, np.integer)) and n > 0 and (n & (n - 1)) == 0


def check_block_sizes(block_q: int, block_k: int) -> None:
    """Raises ValueError unless both block sizes are powers of two and at least 16.

    Example:

        >>> from sparsejax.kernels.block_sparse_attention.masks import check_block_sizes
        >>> check_block_sizes(64, 32)   # ok
        >>> check_block_sizes(48, 32)
        Traceback (most recent call last):
            ...
        ValueError: block_q=48 must be a power of two >= 16 (Triton tiles are powers of two)
    """
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not _is_pow2(b) or b < MIN_BLOCK:
            raise ValueError(f"{name}={b} must be a power of two >= {MIN_BLOCK} "
                             "(Triton tiles are powers of two)")


def _check_positive(**kw) -> None:
    for name, value in kw.items():
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")


# ----------------------------------------------------------------------------- classification

@functools.lru_cache(maxsize=64)
def rule_block_classes(rule: ElementRule, seq_q: int, seq_k: int, block_q: int,
                       block_k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(any_visible, all_visible)`` numpy bool ``[nQ, nK]`` of a rule on the block grid.

    Evaluated exactly on every element (in chunks of query blocks, host side, cached).
    Query rows past ``seq_q`` are ignored; keys past ``seq_k`` are never visible.

    Example:

        >>> from sparsejax.kernels.block_sparse_attention.masks import (ElementRule,
        ...                                                             rule_block_classes)
        >>> anyv, allv = rule_block_classes(ElementRule(causal=True), 64, 64, 16, 16)
        >>> allv.astype(int)            # strictly-lower blocks
        array([[0, 0, 0, 0],
               [1, 0, 0, 0],
               [1, 1, 0, 0],
               [1, 1, 1, 0]])
        >>> (anyv & ~allv).astype(int)  # the diagonal blocks
        array([[1, 0, 0, 0],
               [0, 1, 0, 0],
               [0, 0, 1, 0],
               [0, 0, 0, 1]])
    """
    n_q, n_k = -(-seq_q // block_q), -(-seq_k // block_k)
    if rule.is_trivial and seq_q % block_q == 0 and seq_k % block_k == 0:
        ones = np.ones((n_q, n_k), bool)
        return ones, ones
    kpos = np.arange(n_k * block_k, dtype=np.int64)[None, :]
    any_v = np.zeros((n_q, n_k), bool)
    all_v = np.zeros((n_q, n_k), bool)
    chunk = max(1, (1 << 22) // (block_q * n_k * block_k))
    for start in range(0, n_q, chunk):
        stop = min(n_q, start + chunk)
        qpos = np.arange(start * block_q, stop * block_q, dtype=np.int64)[:, None]
        vis = np.asarray(rule(qpos, kpos)) & (kpos < seq_k)
        rows_ok = qpos < seq_q
        vis_any = (vis & rows_ok).reshape(stop - start, block_q, n_k, block_k)
        vis_all = (vis | ~rows_ok).reshape(stop - start, block_q, n_k, block_k)
        any_v[start:stop] = vis_any.any(axis=(1, 3))
        all_v[start:stop] = vis_all.all(axis=(1, 3))
    return any_v, all_v & any_v


def from_selection(select: Any, rule: ElementRule, *, block_q: int, block_k: int,
                   seq_q: int, seq_k: int, kv_length: int | None = None) -> BlockMask:
    """Builds a BlockMask from a block selection ``[Bm, Hm, nQ, nK]`` AND an element rule.

    Selected blocks whose elements are all visible under ``rule`` become FULL, mixed ones
    PARTIAL, and blocks with no visible element are dropped. ``kv_length`` fixes the padded
    length of the forward lists (e.g. the gate's ``keep``) when ``select`` is traced.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention.masks import (ElementRule, causal_mask,
        ...                                                             from_selection)
        >>> sel = jnp.ones((1, 1, 4, 4), bool)
        >>> m = from_selection(sel, ElementRule(causal=True), block_q=16, block_k=16,
        ...                    seq_q=64, seq_k=64)
        >>> m.kv_count_full[0, 0].tolist(), m.kv_count_partial[0, 0].tolist()
        ([0, 1, 2, 3], [1, 1, 1, 1])
        >>> bool((m.dense() == causal_mask(64, block_q=16, block_k=16).dense()).all())
        True
    """
    check_block_sizes(block_q, block_k)
    _check_positive(seq_q=seq_q, seq_k=seq_k)
    n_q, n_k = -(-seq_q // block_q), -(-seq_k // block_k)
    if not isinstance(select, jax.core.Tracer):
        select = np.asarray(select)
    if select.ndim != 4 or select.shape[2:] != (n_q, n_k):
        raise ValueError(f"block selection has shape {select.shape}; expected "
                         f"[Bm, Hm, {n_q}, {n_k}] for seq_q={seq_q}, seq_k={seq_k}, "
                         f"block_q={block_q}, block_k={block_k}")
    any_v, all_v = rule_block_classes(rule, seq_q, seq_k, block_q, block_k)
    concrete = not isinstance(select, jax.core.Tracer)
    xp = np if concrete else jnp
    select = (np.asarray(select) if concrete else select).astype(bool)
    full = select & all_v
    partial = select & any_v & ~all_v
    kv_len = None if concrete else min(kv_length or n_k, n_k)
    kvf = _bool_to_lists(full, kv_len)
    kvp = _bool_to_lists(partial, kv_len)
    qf = _bool_to_lists(xp.swapaxes(full, 2, 3))
    qp = _bool_to_lists(xp.swapaxes(partial, 2, 3))
    return BlockMask(*kvf, *kvp, *qf, *qp, block_q=block_q, block_k=block_k, seq_q=seq_q,
                     seq_k=seq_k, rule=rule)


def _all_blocks(seq_q: int, seq_k: int, block_q: int, block_k: int) -> np.ndarray:
    return np.ones((1, 1, -(-seq_q // block_q), -(-seq_k // block_k)), bool)


# ----------------------------------------------------------------------------- builders

def causal_mask(seq_q: int, seq_k: int | None = None, *, block_q: int = 128,
                block_k: int = 64) -> BlockMask:
    """Causal mask, bottom-right aligned: query ``i`` sees keys ``k <= i + seq_k - seq_q``.

    Blocks strictly below the diagonal are FULL, blocks crossing it PARTIAL, the rest
    skipped (density -> 1/2 for long sequences). Defaults 128x64 are the GPU tiles for D=128.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention.masks import causal_mask
        >>> m = causal_mask(1024, block_q=64, block_k=64)
        >>> bool((m.dense()[0, 0] == jnp.tril(jnp.ones((1024, 1024), bool))).all())
        True
    """
    seq_k = seq_q if seq_k is None else seq_k
    _check_positive(seq_q=seq_q, seq_k=seq_k)
    check_block_sizes(block_q, block_k)
    rule = ElementRule(causal=True, offset=seq_k - seq_q)
    return from_selection(_all_blocks(seq_q, seq_k, block_q, block_k), rule, block_q=block_q,
                          block_k=block_k, seq_q=seq_q, seq_k=seq_k)


def sliding_window_mask(seq: int, window: int, *, sinks: int = 0, causal: bool = True,
                        block_q: int = 128, block_k: int = 64) -> BlockMask:
    """Sliding-window (local) attention with attention sinks (StreamingLLM, Xiao et al. 2023).

    Causal: query ``i`` sees keys ``i - window < k <= i`` (the previous ``window`` keys,
    itself included) and the first ``sinks`` keys ``k < min(sinks, i + 1)``.
    Non-causal: ``|i - k| < window`` or ``k < sinks``.

    Example:

        >>> from sparsejax.kernels.block_sparse_attention.masks import sliding_window_mask
        >>> m = sliding_window_mask(4096, 512, sinks=64, block_q=128, block_k=64)
        >>> float(m.block_density)   # 11 of 64 key blocks per query block, fewer in the first 5
        0.15966796875
    """
    _check_positive(seq=seq, window=window)
    if not isinstance(sinks, (int, np.integer)) or sinks < 0:
        raise ValueError(f"sinks={sinks!r} must be a non-negative integer")
    check_block_sizes(block_q, block_k)
    rule = ElementRule(causal=causal, window=window, sinks=sinks)
    return from_selection(_all_blocks(seq, seq, block_q, block_k), rule, block_q=block_q,
                          block_k=block_k, seq_q=seq, seq_k=seq)


def strided_mask(seq: int, stride: int, *, local: int | None = None, summary: int = 1,
                 causal: bool = True, block_q: int = 128, block_k: int = 64) -> BlockMask:
    """Sparse-Transformer "fixed" pattern (Child et al. 2019): local band + summary columns.

    Query ``i`` sees key ``k`` iff (``causal`` ⇒ ``k <= i``) and either ``|i - k| < local``
    (the band; default ``local = stride``) or ``k mod stride >= stride - summary`` (the
    last ``summary`` keys of every stride-long chunk, which every query may read). Chosen at
    element level, as in the paper; with ``summary = block_k`` and ``stride`` a multiple of
    ``block_k`` the summary columns are whole key blocks (FULL, cheapest), otherwise they are
    PARTIAL blocks masked in-kernel.

    Example:

        >>> import numpy as np
        >>> from sparsejax.kernels.block_sparse_attention.masks import strided_mask
        >>> m = strided_mask(512, 128, summary=32, block_q=32, block_k=32)
        >>> i, k = np.arange(512)[:, None], np.arange(512)[None, :]
        >>> want = (k <= i) & ((i - k < 128) | (k % 128 >= 128 - 32))
        >>> bool((np.asarray(m.dense()[0, 0]) == want).all())
        True
        >>> int(m.kv_count_full.sum()), int(m.kv_count_partial.sum())   # full, partial blocks
        (57, 25)
    """
    local = stride if local is None else local
    _check_positive(seq=seq, stride=stride, local=local, summary=summary)
    if summary > stride:
        raise ValueError(f"summary={summary} must be <= stride={stride}")
    check_block_sizes(block_q, block_k)
    rule = ElementRule(causal=causal, window=local, stride=stride, summary=summary)
    return from_selection(_all_blocks(seq, seq, block_q, block_k), rule, block_q=block_q,
                          block_k=block_k, seq_q=seq, seq_k=seq)


def from_block_mask(block_bool: Any, *, block_q: int = 128, block_k: int = 64,
                    seq_q: int | None = None, seq_k: int | None = None) -> BlockMask:
    """Arbitrary block-granular mask from a boolean ``[Bm, Hm, nQ, nK]`` (True = visit).

    Every selected block is FULL (no element rule). Empty rows (a query block that visits
    nothing) give zero outputs and zero gradients. ``seq_q`` / ``seq_k`` default to
    ``nQ * block_q`` / ``nK * block_k``.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention.masks import from_block_mask
        >>> b = (jax.random.bernoulli(jax.random.key(0), 0.1, (1, 4, 32, 32))
        ...      | jnp.eye(32, dtype=bool))
        >>> m = from_block_mask(b, block_q=128, block_k=128)   # 4096 x 4096, per head
        >>> m.seq_q, m.seq_k, m.mask_shape
        (4096, 4096, (1, 4))
        >>> bool((m.block_classes()[0] == b).all()), int(m.kv_count_partial.sum())   # all FULL
        (True, 0)
    """
    shape = jnp.shape(block_bool)
    if len(shape) != 4:
        raise ValueError(f"block_bool must be [Bm, Hm, nQ, nK]; got shape {shape}")
    check_block_sizes(block_q, block_k)
    n_q, n_k = shape[2:]
    seq_q = n_q * block_q if seq_q is None else seq_q
    seq_k = n_k * block_k if seq_k is None else seq_k
    return from_selection(block_bool, ElementRule(), block_q=block_q, block_k=block_k,
                          seq_q=seq_q, seq_k=seq_k)


def gated_block_mask(q: jax.Array, k: jax.Array, keep: int, *, block_q: int = 128,
                     block_k: int = 64, causal: bool = False) -> BlockMask:
    """Learned block gate (SeerAttention-style, Gao et al. 2024): top-``keep`` key blocks.

    ``q: [B, T, H, D]``, ``k: [B, S, Hkv, D]``. Mean-pool q per query block and head, k per
    key block and kv head (broadcast to the ``H // Hkv`` query heads of its group); block
    scores ``pooled_q · pooled_kᵀ`` ``[B, H, nQ, nK]``; each query block keeps its
    ``keep`` highest-scoring key blocks. With ``causal`` only blocks with some visible
    element are candidates, the blocks crossing the diagonal are always kept (so no row is
    empty; ``keep`` is raised to their count if smaller) and the causal rule is applied in
    them. Returns a per-example, per-head mask (``Bm = B``, ``Hm = H``).

    The indices are not differentiable: gradients reach q and k only through the attention
    itself. As in SeerAttention, a gate with parameters would be trained by a separate
    distillation loss (not provided here).

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention import block_sparse_attention, masks
        >>> from sparsejax.kernels.block_sparse_attention.reference import attention_reference
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 64, 2, 16))
        >>> m = masks.gated_block_mask(q, k, keep=2, block_q=16, block_k=16, causal=True)
        >>> m.mask_shape, m.kv_count_partial[0, 0].tolist()   # per (example, head); diagonal kept
        ((2, 2), [1, 1, 1, 1])
        >>> (m.kv_count_full + m.kv_count_partial)[0, 0].tolist()   # at most keep=2 blocks
        [1, 2, 2, 2]
        >>> out = block_sparse_attention(q, k, v, m)
        >>> out.shape, float(jnp.abs(out - attention_reference(q, k, v, m.dense())).max()) < 1e-5
        ((2, 64, 2, 16), True)
    """
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be [B, T, H, D]; got {q.shape} and {k.shape}")
    b, t, h, _ = q.shape
    _, s, h_kv, _ = k.shape
    if h % h_kv:
        raise ValueError(f"num query heads H={h} is not divisible by num kv heads Hkv={h_kv}")
    _check_positive(keep=keep)
    check_block_sizes(block_q, block_k)
    n_k = -(-s // block_k)
    pooled_q = block_mean(q, block_q)                         # [B, nQ, H, D]
    pooled_k = jnp.repeat(block_mean(k, block_k), h // h_kv, axis=2)   # [B, nK, H, D]
    scores = jnp.einsum("bqhd,bkhd->bhqk", pooled_q, pooled_k)
    scores = lax.stop_gradient(scores)
    rule = ElementRule(causal=causal, offset=s - t if causal else 0)
    any_v, all_v = rule_block_classes(rule, t, s, block_q, block_k)
    if causal:
        diagonal = any_v & ~all_v
        keep = max(keep, int(diagonal.sum(-1).max(initial=0)))
        scores = jnp.where(any_v, scores, -jnp.inf)
        scores = jnp.where(diagonal, jnp.inf, scores)
    keep = min(keep, n_k)
    top_scores, top_idx = lax.top_k(scores, keep)
    chosen = (top_idx[..., None] == jnp.arange(n_k)) & (top_scores > -jnp.inf)[..., None]
    select = chosen.any(axis=-2)
    return from_selection(select, rule, block_q=block_q, block_k=block_k, seq_q=t, seq_k=s,
                          kv_length=keep)


def block_mean(x: jax.Array, block: int) -> jax.Array:
    """Mean over each block of ``block`` positions along axis 1 of ``[B, T, H, D]`` →
    ``[B, ⌈T/block⌉, H, D]`` in f32; a ragged last block averages only its real positions.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.kernels.block_sparse_attention.masks import block_mean
        >>> r = block_mean(jnp.ones((1, 40, 2, 8)), 16)
        >>> r.shape, bool((r == 1).all())     # the ragged last block (8 positions) averages to 1
        ((1, 3, 2, 8), True)
    """
    b, n, h, d = x.shape
    nb = -(-n // block)
    xp = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, nb * block - n), (0, 0), (0, 0)))
    sums = xp.reshape(b, nb, block, h, d).sum(axis=2)
    lengths = jnp.minimum(block, n - jnp.arange(nb) * block).astype(jnp.float32)
    return sums / lengths[None, :, None, None]
