"""Activation-sparse modules: a top-k activation, Spark FFN and Spark attention.

``TopKActivation`` keeps the largest post-activation units of each token (Li et al.
2023, "The Lazy Neuron Phenomenon"): exact top-k, approximate top-k, or Spark's
statistical top-k. ``SparkFFN`` is the Spark Transformer FFN (You et al. 2025):

    y = Vᵀ (GELU(STopk(K1ᵀ q1)) ⊙ (K2ᵀ q2))

where ``q1`` is the first ``r`` input dims (the low-cost predictor, ``r ≈ d_model/2``),
``q2`` the rest, and ``K1``/``K2`` the matching row blocks of the first FFN matrix. Only
the units the predictor selects need ``K2``'s columns and ``V``'s rows (the decode
kernel in ``sparsejax.kernels`` exploits that); this module computes them densely.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.nn.spark import SparkFFN
    >>> ffn = SparkFFN(64, 256, 'gelu', density=0.08, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(0), (2, 10, 64))
    >>> ffn(x).shape
    (2, 10, 64)
    >>> round(float((ffn.gate(x) != 0).mean()), 2)    # about 8% of the 256 units per token
    0.08
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.scipy.special import ndtri

from sparsejax.activations import ACTIVATIONS, activation_fn, k_from_density, statistical_topk, topk
from sparsejax.nn.layers import FFN, Attention

TOPK_MODES = ("exact", "approx", "statistical")


class TopKActivation(nnx.Module):
    """``activation`` followed by top-k over the last axis (the FFN hidden units).

    ``mode``: 'exact' (``lax.top_k``, exactly k per token), 'approx'
    (``lax.approx_max_k``) or 'statistical' (Spark's threshold, hard form, no sort).

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.nn.spark import TopKActivation
        >>> x = jax.random.normal(jax.random.key(0), (4, 100))
        >>> (TopKActivation('relu', density=0.08)(x) != 0).sum(-1).tolist()   # exactly k = 8
        [8, 8, 8, 8]
        >>> act = TopKActivation('relu', density=0.08, mode='statistical')
        >>> (act(x) != 0).sum(-1).tolist()                   # about 8, no sort
        [9, 11, 12, 10]
    """

    def __init__(self, activation: str = "relu", *, density: float = 0.08, mode: str = "exact"):
        activation_fn(activation)  # a ValueError names the known activations
        if mode not in TOPK_MODES:
            raise ValueError(f"unknown top-k mode {mode!r}; known: {TOPK_MODES}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density {density} is outside (0, 1]")
        self.name, self.density, self.mode = activation, density, mode

    def __call__(self, x: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.name](x)
        if self.mode == "statistical":
            return statistical_topk(h, self.density, mode="hard")
        return topk(h, k_from_density(h.shape[-1], self.density),
                    approximate=self.mode == "approx")


class SparkFFN(nnx.Module):
    """Spark FFN: a low-cost predictor ``K1ᵀ q1`` picks the active units by statistical
    top-k (soft form), gated by ``K2ᵀ q2``, then ``V``.

    Example:

        >>> from flax import nnx
        >>> from sparsejax.nn.spark import SparkFFN
        >>> ffn = SparkFFN(128, 512, 'gelu', density=0.08, rngs=nnx.Rngs(0))
        >>> ffn.r, ffn.k1.kernel.shape, ffn.k2.kernel.shape, ffn.v.kernel.shape
        (64, (64, 512), (64, 512), (512, 128))
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", *,
                 density: float = 0.08, r: int | None = None, rngs: nnx.Rngs):
        r = d_model // 2 if r is None else r
        if not 0 < r < d_model:
            raise ValueError(f"predictor dims r={r} must be in (0, d_model={d_model})")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density {density} is outside (0, 1]")
        self.r, self.density = r, density
        self.k1 = nnx.Linear(r, d_ff, use_bias=False, rngs=rngs)
        self.k2 = nnx.Linear(d_model - r, d_ff, use_bias=False, rngs=rngs)
        activation_fn(activation)  # a ValueError names the known activations
        self.activation = activation
        self.v = nnx.Linear(d_ff, d_model, rngs=rngs)

    def gate(self, x: jax.Array) -> jax.Array:
        """``act(STopk(K1ᵀ q1))``: the predictor's sparse gate (exact zeros off the top-k)."""
        return ACTIVATIONS[self.activation](statistical_topk(self.k1(x[..., :self.r]),
                                                             self.density, mode="soft"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.v(self.gate(x) * self.k2(x[..., self.r:]))

    def decode(self, x: jax.Array, *, k_max: int | None = None, k2_unit_major=None,
               implementation: str | None = None) -> jax.Array:
        """The same output for a few tokens (decode, ≤ 8 rows), reading only the selected
        units' columns of ``K2`` and rows of ``V`` (``sparsejax.kernels.sparse_ffn``).

        ``k_max`` caps the units per token (default twice the expected count); if the
        threshold keeps more, the largest gates are kept. Pass ``k2_unit_major =
        unit_major(ffn.k2)`` once per generation to avoid a transpose per token.

        Example:

            >>> import jax, jax.numpy as jnp
            >>> from flax import nnx
            >>> from sparsejax.nn.spark import SparkFFN
            >>> ffn = SparkFFN(32, 128, 'gelu', density=0.1, rngs=nnx.Rngs(0))
            >>> x_token = jax.random.normal(jax.random.key(0), (2, 32))
            >>> y = ffn.decode(x_token)          # == ffn(x_token) when ≤ k_max units fire
            >>> y.shape, bool(jnp.allclose(y, ffn(x_token), atol=1e-5))
            ((2, 32), True)
        """
        from sparsejax.kernels.sparse_ffn import spark_ffn_decode, unit_major

        f = self.v.kernel.shape[0]
        k_max = min(f, 2 * k_from_density(f, self.density)) if k_max is None else k_max
        k2 = unit_major(self.k2) if k2_unit_major is None else k2_unit_major
        return spark_ffn_decode(x, self.k1.kernel[...], k2, self.v.kernel[...],
                                v_bias=self.v.bias[...], density=self.density, k_max=k_max,
                                activation=self.activation, implementation=implementation)


class TopKFFN(FFN):
    """The dense FFN with its activation followed by top-k (``TopKActivation``); the
    activation stays at ``mlp/act`` so the Lazy Neuron measurement finds it.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.spark import TopKFFN
        >>> ffn = TopKFFN(64, 256, 'relu', density=0.08, mode='statistical', rngs=nnx.Rngs(0))
        >>> type(ffn.act).__name__, ffn.act.density, ffn.act.mode, ffn(jnp.ones((2, 64))).shape
        ('TopKActivation', 0.08, 'statistical', (2, 64))
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", *,
                 density: float = 0.08, mode: str = "exact", rngs: nnx.Rngs):
        super().__init__(d_model, d_ff, activation, rngs=rngs)
        self.act = TopKActivation(activation, density=density, mode=mode)

    def decode(self, x: jax.Array, *, implementation: str | None = None) -> jax.Array:
        """The same output for a few tokens (decode), reading only the kept rows of
        ``W_down`` (``sparsejax.kernels.sparse_ffn``); 'approx' selects exactly.

        Example:

            >>> import jax, jax.numpy as jnp
            >>> from flax import nnx
            >>> from sparsejax.nn.spark import TopKFFN
            >>> ffn = TopKFFN(32, 128, 'relu', density=0.1, rngs=nnx.Rngs(0))
            >>> x_token = jax.random.normal(jax.random.key(0), (2, 32))
            >>> y = ffn.decode(x_token)          # == ffn(x_token)
            >>> y.shape, bool(jnp.allclose(y, ffn(x_token), atol=1e-5))
            ((2, 32), True)
        """
        from sparsejax.kernels.sparse_ffn import topk_ffn_decode

        f = self.down.kernel.shape[0]
        statistical = self.act.mode == "statistical"
        k = k_from_density(f, self.act.density)
        return topk_ffn_decode(x, self.up.kernel[...], self.up.bias[...], self.down.kernel[...],
                               self.down.bias[...], activation=self.act.name,
                               k=min(f, 2 * k) if statistical else k,
                               mode="statistical" if statistical else "exact",
                               density=self.act.density, implementation=implementation)


class StatisticalTopKFFN(TopKFFN):
    """``TopKFFN`` with Spark's statistical top-k.

    Example:

        >>> from flax import nnx
        >>> from sparsejax.nn.spark import StatisticalTopKFFN
        >>> ffn = StatisticalTopKFFN(32, 128, density=0.1, rngs=nnx.Rngs(0))
        >>> ffn.act.name, ffn.act.mode, ffn.act.density
        ('relu', 'statistical', 0.1)
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "relu", *,
                 density: float = 0.08, rngs: nnx.Rngs):
        super().__init__(d_model, d_ff, activation, density=density, mode="statistical",
                         rngs=rngs)


class BlockSparseFFN(FFN):
    """The dense FFN trained block-sparsely: each tile of ``tile_tokens`` tokens computes
    only its best ``density`` fraction of blocks of ``block_units`` hidden units, ranked by
    ``Σ_tile,block |act(x W_up + b)|`` (``sparsejax.kernels.sparse_ffn.block_sparse_ffn``).

    Token-level top-k cannot skip training matmuls (at 8% density a 128-token tile uses
    nearly every unit); sharing the selection across a tile can. Tokens are the flattened
    leading dims; their count must be a multiple of ``tile_tokens``.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.spark import BlockSparseFFN
        >>> ffn = BlockSparseFFN(64, 256, 'gelu', density=0.25, block_units=32, tile_tokens=32,
        ...                      rngs=nnx.Rngs(0))
        >>> ffn.keep_blocks                       # 2 of the 8 blocks of 32 units per tile
        2
        >>> ffn(jnp.ones((2, 32, 64))).shape      # 64 tokens: 2 tiles
        (2, 32, 64)
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", *,
                 density: float = 0.25, block_units: int = 64, tile_tokens: int = 64,
                 rngs: nnx.Rngs):
        super().__init__(d_model, d_ff, activation, rngs=rngs)
        if d_ff % block_units:
            raise ValueError(f"block_units={block_units} must divide d_ff={d_ff}")
        if not 0.0 < density <= 1.0:
            raise ValueError(f"density {density} is outside (0, 1]")
        self.block_units, self.tile_tokens = block_units, tile_tokens
        self.keep_blocks = max(1, round(density * d_ff / block_units))

    def __call__(self, x: jax.Array) -> jax.Array:
        from sparsejax.kernels.sparse_ffn import block_sparse_ffn

        return block_sparse_ffn(x, self.up.kernel[...], self.down.kernel[...],
                                b_up=self.up.bias[...], b_down=self.down.bias[...],
                                activation=self.act.name, block_units=self.block_units,
                                tile_tokens=self.tile_tokens, keep_blocks=self.keep_blocks)


def spark_key_mask(q_low: jax.Array, k_low: jax.Array, keys_per_query: int,
                   causal: bool) -> jax.Array:
    """Keys each query keeps, by statistical top-k on low-dimensional scores (Spark).

    ``s = q_low · k_lowᵀ`` per head; over each query's valid keys (all, or the causal
    prefix) ``θ = mean(s) + std(s)·Φ⁻¹(1 − k/n_valid)`` with ``k = keys_per_query`` (population std)
    and the keys with ``s > θ`` are kept, about ``k`` of them; with ``n_valid ≤ k`` every valid key is kept,
    and the best-scoring key always is. Shapes ``[B, T, H, d_low]`` → ``[B, H, Tq, Tk]``.

    Example:

        >>> import jax
        >>> from sparsejax.nn.spark import spark_key_mask
        >>> q, k = jax.random.normal(jax.random.key(0), (2, 1, 32, 2, 8))   # [B, T, H, d]
        >>> keep = spark_key_mask(q[..., :4], k[..., :4], keys_per_query=8, causal=True)
        >>> keep.shape, keep[0, 0, :6].sum(-1).tolist()    # the first queries keep every key
        ((1, 2, 32, 32), [1, 2, 3, 4, 5, 6])
        >>> round(float(keep[..., 16:, :].sum(-1).mean()), 1)   # later queries: about 8
        8.1
    """
    s = jnp.einsum("bqhd,bkhd->bhqk", q_low, k_low).astype(jnp.float32)
    t_q, t_k = s.shape[-2:]
    valid = (jnp.tril(jnp.ones((t_q, t_k), bool), k=t_k - t_q) if causal
             else jnp.ones((t_q, t_k), bool))
    n = jnp.sum(valid, axis=-1, keepdims=True).astype(jnp.float32)
    mean = jnp.sum(jnp.where(valid, s, 0.0), -1, keepdims=True) / n
    var = jnp.sum(jnp.where(valid, (s - mean) ** 2, 0.0), -1, keepdims=True) / n
    density = jnp.minimum(keys_per_query / n, 1.0)
    theta = jnp.where(density < 1.0, mean + jnp.sqrt(var) * ndtri(1.0 - jnp.minimum(density, 1 - 1e-6)),
                      -jnp.inf)
    best = s >= jnp.max(jnp.where(valid, s, -jnp.inf), axis=-1, keepdims=True)
    return jax.lax.stop_gradient(valid & ((s > theta) | best))


class SparkAttention(Attention):
    """Spark attention: each query attends to about ``keys_per_query`` keys, chosen by statistical
    top-k on scores from the first ``d_low`` dims of each head (default half), with a
    softmax over the kept keys only (the rest are −∞). Every score is computed densely;
    ``SparseAttention(pattern='spark')`` makes the same statistical choice over key blocks,
    so that the block-sparse kernel skips the rest.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.spark import SparkAttention
        >>> attn = SparkAttention(64, 4, causal=True, keys_per_query=32, rngs=nnx.Rngs(0))
        >>> attn.head_dim, attn.d_low, attn(jnp.ones((2, 10, 64))).shape
        (16, 8, (2, 10, 64))
    """

    def __init__(self, d_model: int, num_heads: int, *, causal: bool,
                 keys_per_query: int = 256, d_low: int | None = None, rngs: nnx.Rngs):
        super().__init__(d_model, num_heads, causal=causal, rngs=rngs)
        d_low = self.head_dim // 2 if d_low is None else d_low
        if keys_per_query <= 0:
            raise ValueError(f"Spark attention needs keys_per_query > 0, got {keys_per_query}")
        if not 0 < d_low <= self.head_dim:
            raise ValueError(f"d_low={d_low} must be in (0, head_dim={self.head_dim}]")
        self.keys_per_query, self.d_low = keys_per_query, d_low

    def __call__(self, x: jax.Array) -> jax.Array:
        q, key, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        keep = spark_key_mask(q[..., :self.d_low], key[..., :self.d_low], self.keys_per_query,
                              self.causal)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, key).astype(jnp.float32) * self.head_dim ** -0.5
        probs = jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1).astype(v.dtype)
        return self.o(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape))


