"""Decoder-only language model whose attention and FFN are replaceable modules.

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.models import DecoderLM
    >>> lm = DecoderLM(vocab_size=64, max_len=32, d_model=64, num_heads=4, num_layers=2,
    ...                d_ff=256, rngs=nnx.Rngs(0))
    >>> lm(jnp.zeros((2, 32), jnp.int32)).shape      # [batch, seq, vocab]
    (2, 32, 64)
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

from sparsejax.base import check_int
from sparsejax.models.blocks import ATTENTIONS, FFNS, block_factory
from sparsejax.nn.layers import block_stack


class DecoderLM(nnx.Module):
    """Token + learned position embeddings, causal pre-LN blocks, final LN, untied head.

    ``attention``/``ffn`` name an entry of ``models.blocks.ATTENTIONS``/``FFNS`` (or are a
    module class or factory); ``attention_options``/``ffn_options`` are its keywords.
    Every size argument is a positive integer.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.models import DecoderLM
        >>> lm = DecoderLM(vocab_size=256, max_len=128, activation='relu', ffn='topk',
        ...                ffn_options={'density': 0.1}, rngs=nnx.Rngs(0))
        >>> len(lm.blocks), type(lm.blocks[0].mlp).__name__, lm.head.kernel.shape
        (2, 'TopKFFN', (64, 256))
        >>> lm(jnp.zeros((1, 16), jnp.int32)).shape
        (1, 16, 256)
    """

    def __init__(self, *, vocab_size: int, max_len: int, d_model: int = 64,
                 num_heads: int = 4, num_layers: int = 2, d_ff: int = 256,
                 activation: str = "gelu", attention: str | Callable = "dense",
                 attention_options: dict | None = None, ffn: str | Callable = "dense",
                 ffn_options: dict | None = None, rngs: nnx.Rngs):
        check_int(vocab_size=vocab_size, max_len=max_len, d_model=d_model, num_heads=num_heads,
                  num_layers=num_layers, d_ff=d_ff)
        self.max_len = max_len
        self.embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model)))
        self.blocks = block_stack(num_layers, d_model, num_heads, d_ff, activation=activation,
                                  causal=True, rngs=rngs,
                                  attention=block_factory(ATTENTIONS, "attention", attention,
                                                          attention_options),
                                  ffn=block_factory(FFNS, "ffn", ffn, ffn_options))
        self.ln = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        x = self.embed(tokens) + self.pos[:t]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))
