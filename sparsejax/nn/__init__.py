"""Flax NNX modules: Sparse-IFT layers; top-k activation, Spark FFN and Spark attention;
block-sparse attention on the kernels.

Example::

    from sparsejax.nn import SparseParallel, SparkFFN
"""

from sparsejax.nn.ift import SparseDoped, SparseFactorized, SparseParallel, clone_layer
from sparsejax.nn.spark import (SparkAttention, SparkFFN, StatisticalTopKFFN, TopKActivation,
                                TopKFFN, spark_key_mask)
from sparsejax.nn.sparse_attention import SparseAttention

__all__ = ["SparkAttention", "SparkFFN", "SparseAttention", "SparseDoped", "SparseFactorized",
           "SparseParallel", "StatisticalTopKFFN", "TopKActivation", "TopKFFN", "clone_layer",
           "spark_key_mask"]
