"""Dense building blocks: activation, FFN, attention and the pre-LN transformer block.

A ``Block`` takes the attention and FFN it builds as module classes or factories, so a
sparse one (``SparkFFN``, ``SparseAttention``, ``functools.partial(TopKFFN, density=0.1)``)
goes in without a registry. The activation is a submodule (``.../mlp/act``) so surgery
rules can replace it.

Example:

    >>> import functools
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.nn import TopKFFN
    >>> from sparsejax.nn.layers import Block
    >>> block = Block(16, 4, 32, activation='gelu', causal=True, rngs=nnx.Rngs(0))
    >>> block(jnp.ones((2, 5, 16))).shape
    (2, 5, 16)
    >>> sparse = Block(16, 4, 32, activation='relu', causal=True, rngs=nnx.Rngs(0),
    ...                ffn=functools.partial(TopKFFN, density=0.25))
    >>> type(sparse.mlp).__name__, type(sparse.mlp.act).__name__
    ('TopKFFN', 'TopKActivation')
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.activations import ACTIVATIONS, activation_fn

AttentionFactory = Callable[..., nnx.Module]  # (d_model, num_heads, *, causal, rngs)
FFNFactory = Callable[..., nnx.Module]        # (d_model, d_ff, activation, *, rngs)


class Activation(nnx.Module):
    """A named elementwise activation as a module, so surgery can swap it by path.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nn.layers import Activation
        >>> act = Activation('relu'); act(jnp.array([-1.0, 2.0])).tolist()
        [0.0, 2.0]
    """

    def __init__(self, name: str = "relu"):
        activation_fn(name)  # a ValueError names the known activations
        self.name = name

    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.name](x)


class FFN(nnx.Module):
    """Transformer feed-forward: ``down(act(up(x)))``.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.layers import FFN
        >>> ffn = FFN(32, 128, 'relu', rngs=nnx.Rngs(0)); ffn(jnp.ones((2, 5, 32))).shape
        (2, 5, 32)
        >>> ffn.up.kernel.shape, ffn.act.name, ffn.down.kernel.shape
        ((32, 128), 'relu', (128, 32))
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", *, rngs: nnx.Rngs):
        self.up = nnx.Linear(d_model, d_ff, rngs=rngs)
        self.act = Activation(activation)
        self.down = nnx.Linear(d_ff, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.act(self.up(x)))


def dot_product_attention(q, k, v, *, causal: bool) -> jax.Array:
    """Reference softmax attention on ``[batch, seq, heads, head_dim]`` arrays.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.nn.layers import dot_product_attention
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 5, 4, 8))  # [b, t, h, d]
        >>> o = dot_product_attention(q, k, v, causal=True)
        >>> o.shape                                        # same shape as q
        (2, 5, 4, 8)
        >>> bool(jnp.allclose(o[:, 0], v[:, 0]))             # query 0 sees only key 0
        True
    """
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if causal:
        t_q, t_k = q.shape[1], k.shape[1]
        keep = jnp.tril(jnp.ones((t_q, t_k), bool), k=t_k - t_q)
        logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q/k/v/o projections.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.layers import Attention
        >>> attn = Attention(64, 4, causal=True, rngs=nnx.Rngs(0))
        >>> attn(jnp.ones((2, 10, 64))).shape, attn.head_dim
        ((2, 10, 64), 16)
    """

    def __init__(self, d_model: int, num_heads: int, *, causal: bool, rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.causal = causal
        self.q = nnx.Linear(d_model, d_model, rngs=rngs)
        self.k = nnx.Linear(d_model, d_model, rngs=rngs)
        self.v = nnx.Linear(d_model, d_model, rngs=rngs)
        self.o = nnx.Linear(d_model, d_model, rngs=rngs)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        out = dot_product_attention(q, k, v, causal=self.causal)
        return self.o(out.reshape(x.shape))


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    ``attention`` is called as ``attention(d_model, num_heads, causal=..., rngs=...)`` and
    ``ffn`` as ``ffn(d_model, d_ff, activation, rngs=...)``: a module class or any factory
    with that signature (e.g. ``functools.partial(SparkFFN, density=0.08)``).

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.layers import Block
        >>> block = Block(64, 4, 256, activation='relu', causal=False, rngs=nnx.Rngs(0))
        >>> block(jnp.ones((2, 10, 64))).shape, block.attn.causal, block.mlp.up.kernel.shape
        ((2, 10, 64), False, (64, 256))
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, activation: str,
                 causal: bool, rngs: nnx.Rngs, attention: AttentionFactory = Attention,
                 ffn: FFNFactory = FFN):
        self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
        self.attn = attention(d_model, num_heads, causal=causal, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
        self.mlp = ffn(d_model, d_ff, activation, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def block_stack(num_layers: int, d_model: int, num_heads: int, d_ff: int, *, activation: str,
                causal: bool, rngs: nnx.Rngs, attention: AttentionFactory = Attention,
                ffn: FFNFactory = FFN) -> nnx.List:
    """``num_layers`` blocks as an ``nnx.List`` (parameter paths ``blocks/<i>/...``).

    Example:

        >>> from flax import nnx
        >>> from sparsejax.nn.layers import block_stack
        >>> blocks = block_stack(2, 64, 4, 256, activation='gelu', causal=True, rngs=nnx.Rngs(0))
        >>> type(blocks).__name__, len(blocks), type(blocks[1]).__name__
        ('List', 2, 'Block')
    """
    return nnx.List([Block(d_model, num_heads, d_ff, activation=activation, causal=causal,
                           attention=attention, ffn=ffn, rngs=rngs)
                     for _ in range(num_layers)])
