"""sparsejax.kernels: hot-path kernels, one folder per op.

Installed as ``sparsejax.kernels`` from the top-level ``kernels/`` folder. Each op has a
pure-jnp ``reference.py`` that defines the answer, a Pallas implementation written in the
portable ``pallas_call`` + BlockSpec form (Triton lowering on GPU; ``interpret=True`` on
CPU, which is how CI tests it), an ``api.py`` that picks one (falling back to XLA) and a
``bench.py`` that writes JSON:

- ``block_sparse_attention``: flash attention that skips masked-out blocks, forward and
  backward, with causal / sliding-window + sinks / strided / arbitrary / gated masks;
- ``sparse_ffn``: decode-time FFN reading only the selected units, and a block-granular
  training path;
- ``nm_matmul``: matmul on the compressed N:M format of ``sparsejax.nm``.

Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.kernels.block_sparse_attention import (attention_reference,
    ...                                                       block_sparse_attention, masks)
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 64, 2, 32))
    >>> m = masks.causal_mask(q.shape[1], block_q=16, block_k=16)
    >>> out = block_sparse_attention(q, k, v, m)
    >>> out.shape, float(jnp.abs(out - attention_reference(q, k, v, m.dense())).max()) < 1e-5
    ((1, 64, 2, 32), True)
"""
