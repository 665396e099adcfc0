"""Block-sparse self-attention as an NNX module, on ``sparsejax.kernels.block_sparse_attention``.

``SparseAttention`` is ``nn.layers.Attention`` (same q/k/v/o projections, so a dense
checkpoint loads into it) whose attention runs through the block-sparse kernel: only the
(query block, key block) pairs its mask selects are computed. The mask comes from one of
``PATTERNS``:

- ``'full'``: every block (causal rule when the model is causal): the dense baseline run
  through the kernel;
- ``'window'``: sliding window of ``window`` keys plus ``sinks`` sink tokens (StreamingLLM);
- ``'strided'``: Sparse Transformer "fixed" pattern, a local band plus summary columns every
  ``stride`` keys;
- ``'gated'``: a learned-gate style choice made on the fly from the data, the ``keep`` key
  blocks with the highest mean-pooled ``q·k`` score per query block (SeerAttention);
- ``'spark'``: Spark attention's key selection (You et al. 2025) at block granularity:
  statistical top-k (``θ = mean + std·Φ⁻¹(1 − k'/n)``, no sort) over scores of mean-pooled
  low-dimensional ``q[..., :d_low]·k[..., :d_low]`` blocks, about ``keys_per_query / block_size``
  key blocks per query block. Where token-level Spark attention
  (``SparkAttention``) picks single keys, this picks whole blocks, which is what lets the
  kernel skip work.

The mask indices carry no gradient (``stop_gradient``); q, k and v get theirs through the
attention. On CPU the kernel's XLA path runs (``implementation=None``); on GPU the Pallas
kernel.

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.nn import SparseAttention
    >>> attn = SparseAttention(64, 4, causal=True, pattern='window', window=32, block_size=16,
    ...                        rngs=nnx.Rngs(0))
    >>> attn(jnp.ones((2, 128, 64))).shape
    (2, 128, 64)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.kernels.block_sparse_attention import api as bsa
from sparsejax.kernels.block_sparse_attention import masks as bsm
from sparsejax.nn import spark
from sparsejax.nn.layers import Attention

PATTERNS = ("full", "window", "strided", "gated", "spark")


class SparseAttention(Attention):
    """Multi-head self-attention computed by the block-sparse kernel on a ``pattern`` mask.

    ``block_size`` is both the query and the key block (a power of two ≥ 16); ``window``,
    ``sinks`` (``'window'``), ``stride`` (``'strided'``), ``keep`` (``'gated'``) and ``keys_per_query``,
    ``d_low`` (``'spark'``) configure the patterns; ``implementation`` is passed to
    ``block_sparse_attention`` (None: Pallas on GPU, XLA elsewhere).

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn import SparseAttention
        >>> attn = SparseAttention(128, 4, causal=True, pattern='spark', keys_per_query=64,
        ...                        block_size=16, rngs=nnx.Rngs(0))
        >>> attn.head_dim, attn.d_low
        (32, 16)
        >>> attn(jax.random.normal(jax.random.key(0), (1, 128, 128))).shape
        (1, 128, 128)
    """

    def __init__(self, d_model: int, num_heads: int, *, causal: bool, pattern: str = "window",
                 block_size: int = 64, window: int = 256, sinks: int = 0, stride: int = 256,
                 keep: int = 4, keys_per_query: int = 256, d_low: int | None = None,
                 implementation: str | None = None, rngs: nnx.Rngs):
        super().__init__(d_model, num_heads, causal=causal, rngs=rngs)
        if pattern not in PATTERNS:
            raise ValueError(f"unknown sparse-attention pattern {pattern!r}; known: {PATTERNS}")
        bsm.check_block_sizes(block_size, block_size)
        d_low = self.head_dim // 2 if d_low is None else d_low
        if not 0 < d_low <= self.head_dim:
            raise ValueError(f"d_low={d_low} must be in (0, head_dim={self.head_dim}]")
        for name, value in (("window", window), ("stride", stride), ("keep", keep),
                            ("keys_per_query", keys_per_query)):
            if value <= 0:
                raise ValueError(f"sparse attention needs {name} > 0, got {value}")
        if sinks < 0:
            raise ValueError(f"sinks={sinks} must be >= 0")
        self.pattern, self.block_size, self.implementation = pattern, block_size, implementation
        self.window, self.sinks, self.stride, self.keep = window, sinks, stride, keep
        self.keys_per_query, self.d_low = keys_per_query, d_low

    def block_mask(self, q: jax.Array, key: jax.Array) -> bsm.BlockMask:
        """The ``BlockMask`` this layer uses for ``q: [B, T, H, D]``, ``key: [B, S, H, D]``.

        Example:

            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> from sparsejax.nn import SparseAttention
            >>> attn = SparseAttention(64, 4, causal=True, pattern='window', window=32,
            ...                        block_size=16, rngs=nnx.Rngs(0))
            >>> q = key = jnp.ones((1, 128, 4, 16))      # [B, T, H, D]
            >>> m = attn.block_mask(q, key); float(m.block_density)   # 1 + 2 + 6·3 of 8·8 pairs
            0.328125
        """
        t, s, bs = q.shape[1], key.shape[1], self.block_size
        blocks = dict(block_q=bs, block_k=bs)
        rule = bsm.ElementRule(causal=self.causal, offset=s - t if self.causal else 0)
        if self.pattern == "full":
            select = jnp.ones((1, 1, -(-t // bs), -(-s // bs)), bool)
            return bsm.from_selection(select, rule, seq_q=t, seq_k=s, **blocks)
        if self.pattern == "window":
            return bsm.sliding_window_mask(t, self.window, sinks=self.sinks,
                                           causal=self.causal, **blocks)
        if self.pattern == "strided":
            return bsm.strided_mask(t, self.stride, causal=self.causal, **blocks)
        if self.pattern == "gated":
            return bsm.gated_block_mask(q, key, self.keep, causal=self.causal, **blocks)
        # 'spark': statistical top-k over pooled low-dimensional block scores.
        pooled_q = bsm.block_mean(q[..., :self.d_low], bs)
        pooled_k = bsm.block_mean(key[..., :self.d_low], bs)
        select = spark.spark_key_mask(pooled_q, pooled_k, max(1, self.keys_per_query // bs),
                                self.causal)
        return bsm.from_selection(select, rule, seq_q=t, seq_k=s, **blocks)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, key, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        out = bsa.block_sparse_attention(q, key, v, self.block_mask(q, key),
                                         implementation=self.implementation)
        return self.o(out.reshape(x.shape))
