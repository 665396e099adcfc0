"""Models written the way the Flax documentation writes them, not the sparsejax way.

``CNN`` is the Flax MNIST tutorial's model (Conv + BatchNorm + Dropout, with the Dropout
rngs passed to ``__call__``), shrunk to 8×8 digits. ``Decoder`` is a small decoder LM with
a multi-argument ``__call__``, ``nnx.Embed`` tied to the output head (``embed.attend``),
``nnx.Einsum`` attention projections and ``nnx.Linear`` MLPs that call their activation
as a plain function. Neither knows about sparsejax.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


class CNN(nnx.Module):
    """The Flax MNIST tutorial CNN at 8×8×1 input, 10 classes."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(16, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=0.025)
        self.conv2 = nnx.Conv(16, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(32, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(2 * 2 * 32, 64, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=0.025)
        self.linear2 = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x, rngs: nnx.Rngs | None = None):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.dropout2(self.conv2(x), rngs=rngs))))
        x = x.reshape(x.shape[0], -1)
        x = nnx.relu(self.linear1(x))
        return self.linear2(x)


class Block(nnx.Module):
    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.qkv = nnx.Einsum("btd,dshk->sbthk", (d, 3, heads, d // heads), rngs=rngs)
        self.out = nnx.Einsum("bthk,hkd->btd", (heads, d // heads, d), rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x, mask):
        q, k, v = self.qkv(self.norm1(x))
        s = jnp.einsum("bqhk,bthk->bhqt", q, k) / jnp.sqrt(q.shape[-1])
        s = jnp.where(mask[:, None], s, -1e9)
        x = x + self.out(jnp.einsum("bhqt,bthk->bqhk", jax.nn.softmax(s, -1), v))
        return x + self.down(nnx.gelu(self.up(self.norm2(x))))


class Decoder(nnx.Module):
    """``Decoder(...)(tokens, positions, mask=None)``: tied embedding head."""

    def __init__(self, vocab: int = 32, d: int = 32, heads: int = 4, depth: int = 2,
                 max_len: int = 16, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(max_len, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, tokens, positions, mask=None):
        t = tokens.shape[1]
        if mask is None:
            mask = jnp.tril(jnp.ones((t, t), bool))[None]
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x, mask)
        return self.embed.attend(self.norm(x))
