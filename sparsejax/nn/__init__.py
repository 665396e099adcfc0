"""Flax NNX modules: Sparse-IFT layers; top-k activation, Spark FFN, Spark attention, and
the kernel-backed block-sparse attention and block-sparse FFN.

Example::

    from sparsejax.nn import SparseParallel, SparkFFN
"""

from sparsejax.nn.ift import (SparseDoped, SparseFactorized, SparseParallel, clone_layer,
                              layer_kwargs)
from sparsejax.nn.spark import (BlockSparseFFN, SparkAttention, SparkFFN, StatisticalTopKFFN,
                                TopKActivation, TopKFFN, spark_key_mask)
from sparsejax.nn.sparse_attention import SparseAttention

__all__ = ["BlockSparseFFN", "SparkAttention", "SparkFFN", "SparseAttention", "SparseDoped",
           "SparseFactorized", "SparseParallel", "StatisticalTopKFFN", "TopKActivation",
           "TopKFFN", "clone_layer", "layer_kwargs", "spark_key_mask"]
