"""Vision Transformer (Dosovitskiy et al. 2021) with mean pooling and a selectable activation.

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.models import ViT
    >>> model = ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10, d_model=64,
    ...             num_heads=4, num_layers=2, d_ff=128, activation='relu', rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 8, 8, 1))).shape, model.pos.shape    # 16 patches of 2×2
    ((2, 10), (1, 16, 64))
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.base import check_int
from sparsejax.models.blocks import ATTENTIONS, FFNS, block_factory
from sparsejax.nn.layers import block_stack


class ViT(nnx.Module):
    """Patch embedding, learned positions, pre-LN blocks, final LN, mean pool, head.

    ``activation`` is the FFN activation ('relu' for the Lazy Neuron measurements,
    'gelu' as in the original ViT); ``attention``/``ffn`` name an entry of
    ``models.blocks.ATTENTIONS``/``FFNS`` (or are a module class or factory), and
    ``attention_options``/``ffn_options`` are its keywords. Every size argument is a
    positive integer.

    Example:

        >>> from flax import nnx
        >>> from sparsejax.models import ViT
        >>> model = ViT(image_size=32, patch_size=4, in_channels=3, num_classes=10,
        ...             attention='spark', attention_options={'keys_per_query': 16},
        ...             rngs=nnx.Rngs(0))
        >>> model.embed.kernel.shape, model.pos.shape, type(model.blocks[0].attn).__name__
        ((4, 4, 3, 64), (1, 64, 64), 'SparkAttention')
    """

    def __init__(self, *, image_size: int, patch_size: int, in_channels: int,
                 num_classes: int, d_model: int = 64, num_heads: int = 4,
                 num_layers: int = 2, d_ff: int = 256, activation: str = "gelu",
                 attention: str | Callable = "dense", attention_options: dict | None = None,
                 ffn: str | Callable = "dense", ffn_options: dict | None = None,
                 rngs: nnx.Rngs):
        check_int(image_size=image_size, patch_size=patch_size, in_channels=in_channels,
                  num_classes=num_classes, d_model=d_model, num_heads=num_heads,
                  num_layers=num_layers, d_ff=d_ff)
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
        num_patches = (image_size // patch_size) ** 2
        self.embed = nnx.Conv(in_channels, d_model, (patch_size, patch_size),
                              strides=patch_size, padding="VALID", rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, num_patches, d_model)))
        self.blocks = block_stack(num_layers, d_model, num_heads, d_ff, activation=activation,
                                  causal=False, rngs=rngs,
                                  attention=block_factory(ATTENTIONS, "attention", attention,
                                                          attention_options),
                                  ffn=block_factory(FFNS, "ffn", ffn, ffn_options))
        self.ln = nnx.LayerNorm(d_model, rngs=rngs)
        self.head = nnx.Linear(d_model, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.embed(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.pos[...]
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(self.ln(x), axis=1))
