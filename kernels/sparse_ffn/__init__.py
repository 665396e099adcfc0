"""Activation-sparse FFN kernels: decode gather-GEMV and block-granular training.

Decode (batch 1..8) reads only the selected FFN units (Spark FFN, You et al. 2025; top-k
FFN, Li et al. 2023):

    y[b] = Σ_{j ∈ S_b} coef[b,j] · (x2[b] · w_in[j] if gated else 1) · w_out[j]

Training keeps ``keep_blocks`` blocks of ``block_units`` units per tile of
``tile_tokens`` tokens and runs the FFN on those blocks only (token-level top-k does not
speed up training matmuls). ``reference.py`` defines the answers, ``pallas.py`` holds the
Pallas gather-GEMV, ``api.py`` picks an implementation and falls back to XLA.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.nn.spark import SparkFFN
    >>> from sparsejax.kernels.sparse_ffn import spark_ffn_decode, unit_major
    >>> ffn = SparkFFN(32, 128, 'gelu', density=0.08, rngs=nnx.Rngs(0))
    >>> x = jax.random.normal(jax.random.key(1), (2, 32))
    >>> y = spark_ffn_decode(x, ffn.k1.kernel[...], unit_major(ffn.k2), ffn.v.kernel[...],
    ...                      v_bias=ffn.v.bias[...], density=0.08, k_max=24)
    >>> y.shape, float(jnp.abs(y - ffn(x)).max()) < 1e-5
    ((2, 32), True)
"""

from .api import (DECODE_IMPLEMENTATIONS, TRAIN_IMPLEMENTATIONS, block_sparse_ffn,
                  block_sparse_ffn_gather, block_sparse_ffn_ragged, choose_decode,
                  spark_ffn_decode, sparse_ffn_decode, sparse_ffn_decode_dense,
                  sparse_ffn_decode_xla, topk_ffn_decode,
                  unit_major)
from .pallas import sparse_ffn_decode_pallas
from .reference import (block_mask, block_scores, block_sparse_ffn_reference, clean_indices,
                        dense_coefficients, dropped_units, nonzero_indices, select_blocks,
                        sparse_ffn_decode_reference, topk_indices)

__all__ = [
    "DECODE_IMPLEMENTATIONS", "TRAIN_IMPLEMENTATIONS", "block_mask", "block_scores",
    "block_sparse_ffn", "block_sparse_ffn_gather", "block_sparse_ffn_ragged",
    "block_sparse_ffn_reference", "choose_decode", "clean_indices", "dense_coefficients",
    "dropped_units", "nonzero_indices", "select_blocks", "spark_ffn_decode",
    "sparse_ffn_decode", "sparse_ffn_decode_dense", "sparse_ffn_decode_pallas",
    "sparse_ffn_decode_reference",
    "sparse_ffn_decode_xla", "topk_ffn_decode", "topk_indices", "unit_major",
]
