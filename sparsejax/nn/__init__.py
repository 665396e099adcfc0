"""Flax NNX modules: Sparse-IFT layers; top-k activation, Spark FFN, Spark attention, and
the kernel-backed block-sparse attention and block-sparse FFN.

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.nn import SparkFFN, SparseParallel
    >>> layer = SparseParallel(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(1))
    >>> ffn = SparkFFN(8, 32, density=0.25, rngs=nnx.Rngs(0))
    >>> layer(jnp.ones((2, 8))).shape, ffn(jnp.ones((2, 3, 8))).shape
    ((2, 8), (2, 3, 8))
"""

from sparsejax.nn.ift import (SparseDoped, SparseFactorized, SparseParallel, clone_layer,
                              layer_kwargs)
from sparsejax.nn.spark import (BlockSparseFFN, SparkAttention, SparkFFN, StatisticalTopKFFN,
                                TopKActivation, TopKFFN, spark_key_mask)
from sparsejax.nn.sparse_attention import SparseAttention

__all__ = ["BlockSparseFFN", "SparkAttention", "SparkFFN", "SparseAttention", "SparseDoped",
           "SparseFactorized", "SparseParallel", "StatisticalTopKFFN", "TopKActivation",
           "TopKFFN", "clone_layer", "layer_kwargs", "spark_key_mask"]
