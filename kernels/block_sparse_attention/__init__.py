"""Block-sparse (flash-style) attention that skips masked-out blocks, forward and backward.

Arrays are ``[batch, seq, heads, head_dim]``; k/v may have fewer heads (GQA). A
``BlockMask`` (``masks.py``) lists, per query block, the FULL key blocks (no element mask)
and the PARTIAL ones (a static element rule — causal, sliding window + sinks, strided — is
applied in-kernel), plus the transposed lists for the backward (FlexAttention-style).
``block_sparse_attention`` runs the Pallas kernel (``pallas.py``) where it applies and
falls back to XLA (``xla.py``) elsewhere; ``reference.attention_reference`` defines the
answer (rows with no visible key give 0).

Example:

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.kernels.block_sparse_attention import (attention_reference,
    ...                                                       block_sparse_attention, masks)
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 128, 2, 16))
    >>> m = masks.sliding_window_mask(128, 32, sinks=16, block_q=32, block_k=16)
    >>> out = block_sparse_attention(q, k, v, m)                       # [B, 128, H, D]
    >>> g = masks.gated_block_mask(q, k, keep=2, block_q=32, block_k=16, causal=True)
    >>> out_g = jax.jit(lambda q, k, v: block_sparse_attention(
    ...     q, k, v, g, implementation="xla_blocks"))(q, k, v)
    >>> err = lambda o, m: float(jnp.abs(o - attention_reference(q, k, v, m.dense())).max())
    >>> out.shape, err(out, m) < 1e-5, err(out_g, g) < 1e-5
    ((1, 128, 2, 16), True, True)

Not built here (no GPU was available to test them), and what each would need:

* Hopper fast path (Mosaic GPU, ``plgpu`` with ``pl.core_map`` / warpgroup MMA, TMA loads,
  the FA3 ping-pong and producer/consumer warp specialisation). It would need: jax >= 0.11
  on an sm90 device; K/V blocks fetched by TMA at dynamic block indices read from the
  ``kv_index_*`` lists (index arrays passed as ordinary GMEM inputs, read per program, as
  here; a ``plgpu.emit_pipeline`` over the list with a ``fetch_index`` from the list);
  block sizes that are multiples of 64 (wgmma M=64 per warpgroup; e.g. block_q 128 = 2
  consumer warpgroups, block_k 128 for D=128, bf16 only) so masks would have to be built
  with those blocks; a separate dK/dV and dQ kernel as here. Tests: the same reference
  comparisons, marked ``gpu`` (Mosaic GPU has no interpret mode on CPU).
* jax-triton backend (a Triton-language kernel called via ``jax_triton.triton_call``):
  jax-triton 0.4.1 declares ``Requires-Python >=3.12``, ``jax>=0.11.0``, ``triton>=3.7``,
  ``absl-py>=1.4.0`` (read from its wheel's METADATA), so it cannot be installed on the
  Python 3.11 / jax 0.10.2 CPU hosts at all and would be an optional GPU-only extra, with
  its tests marked ``gpu``.
"""

from .api import IMPLEMENTATIONS, block_sparse_attention, check_inputs, choose_implementation
from .masks import (BlockMask, ElementRule, causal_mask, from_block_mask, from_selection,
                    gated_block_mask, sliding_window_mask, strided_mask)
from .reference import attention_reference

__all__ = ["IMPLEMENTATIONS", "BlockMask", "ElementRule", "attention_reference",
           "block_sparse_attention", "causal_mask", "check_inputs", "choose_implementation",
           "from_block_mask", "from_selection", "gated_block_mask", "sliding_window_mask",
           "strided_mask"]
