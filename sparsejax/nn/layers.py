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

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.activations import ACTIVATIONS, activation_fn
from sparsejax.nn.scan import resolve_dtype, stacked

AttentionFactory = Callable[..., nnx.Module]  # (d_model, num_heads, *, causal, rngs)
FFNFactory = Callable[..., nnx.Module]        # (d_model, d_ff, activation, *, rngs)
Dtype = Any  # a jnp dtype or its name ('bfloat16'): nn.scan.resolve_dtype


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
    """Transformer feed-forward: ``down(act(up(x)))``, computed in ``dtype`` with
    parameters stored in ``param_dtype``.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.layers import FFN
        >>> ffn = FFN(32, 128, 'relu', rngs=nnx.Rngs(0)); ffn(jnp.ones((2, 5, 32))).shape
        (2, 5, 32)
        >>> ffn.up.kernel.shape, ffn.act.name, ffn.down.kernel.shape
        ((32, 128), 'relu', (128, 32))
        >>> FFN(32, 128, dtype='bfloat16', rngs=nnx.Rngs(0))(jnp.ones((1, 32))).dtype
        dtype(bfloat16)
    """

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu", *, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        kw = dict(dtype=resolve_dtype(dtype), param_dtype=resolve_dtype(param_dtype))
        self.up = nnx.Linear(d_model, d_ff, **kw, rngs=rngs)
        self.act = Activation(activation)
        self.down = nnx.Linear(d_ff, d_model, **kw, rngs=rngs)

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
    """Multi-head self-attention with separate ``[d_model, d_model]`` q/k/v/o projections,
    computed in ``dtype`` (softmax in float32) with parameters in ``param_dtype``.
    ``GroupedQueryAttention`` is the head-aligned form.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.layers import Attention
        >>> attn = Attention(64, 4, causal=True, rngs=nnx.Rngs(0))
        >>> attn(jnp.ones((2, 10, 64))).shape, attn.head_dim
        ((2, 10, 64), 16)
    """

    def __init__(self, d_model: int, num_heads: int, *, causal: bool, rngs: nnx.Rngs,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.causal = causal
        kw = dict(dtype=resolve_dtype(dtype), param_dtype=resolve_dtype(param_dtype))
        self.q = nnx.Linear(d_model, d_model, **kw, rngs=rngs)
        self.k = nnx.Linear(d_model, d_model, **kw, rngs=rngs)
        self.v = nnx.Linear(d_model, d_model, **kw, rngs=rngs)
        self.o = nnx.Linear(d_model, d_model, **kw, rngs=rngs)

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def __call__(self, x: jax.Array) -> jax.Array:
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        out = dot_product_attention(q, k, v, causal=self.causal)
        return self.o(out.reshape(x.shape))


#: ``jax.nn.dot_product_attention`` implementations ``GroupedQueryAttention`` accepts.
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn")


class GroupedQueryAttention(nnx.Module):
    """Head-aligned self-attention with grouped-query K/V (GQA), through
    ``jax.nn.dot_product_attention``.

    Kernels keep the head axis: q ``[d_model, num_heads, head_dim]``, k and v
    ``[d_model, num_kv_heads, head_dim]``, o ``[num_heads, head_dim, d_model]``
    (``nnx.LinearGeneral``; paths ``.../attn/q/kernel``), so a sharding rule can split
    heads over a mesh axis without that axis dividing a flattened 2-D kernel. Each group
    of ``num_heads // num_kv_heads`` query heads shares one K/V head
    (``num_kv_heads=num_heads``: multi-head attention, ``1``: multi-query).
    ``implementation`` is ``jax.nn.dot_product_attention``'s: ``None`` (XLA, or cuDNN
    where it applies), ``'xla'``, or ``'cudnn'`` (GPU only, float16/bfloat16 compute).
    Computed in ``dtype`` with parameters in ``param_dtype``.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.layers import GroupedQueryAttention
        >>> attn = GroupedQueryAttention(64, 8, num_kv_heads=2, causal=True, rngs=nnx.Rngs(0))
        >>> attn.q.kernel.shape, attn.k.kernel.shape, attn.o.kernel.shape
        ((64, 8, 8), (64, 2, 8), (8, 8, 64))
        >>> attn(jnp.ones((2, 10, 64))).shape
        (2, 10, 64)
    """

    def __init__(self, d_model: int, num_heads: int, *, causal: bool, rngs: nnx.Rngs,
                 num_kv_heads: int | None = None, head_dim: int | None = None,
                 implementation: str | None = None, use_bias: bool = True,
                 dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32):
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not divisible by "
                             f"num_kv_heads={num_kv_heads}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; "
                                 "set head_dim")
            head_dim = d_model // num_heads
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation {implementation!r}; known: "
                             f"{ATTENTION_IMPLEMENTATIONS}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.causal, self.implementation = causal, implementation
        kw = dict(use_bias=use_bias, dtype=resolve_dtype(dtype),
                  param_dtype=resolve_dtype(param_dtype), rngs=rngs)
        self.q = nnx.LinearGeneral(d_model, (num_heads, head_dim), **kw)
        self.k = nnx.LinearGeneral(d_model, (num_kv_heads, head_dim), **kw)
        self.v = nnx.LinearGeneral(d_model, (num_kv_heads, head_dim), **kw)
        self.o = nnx.LinearGeneral((num_heads, head_dim), d_model, axis=(-2, -1), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.implementation == "cudnn" and jax.default_backend() != "gpu":
            raise ValueError("implementation='cudnn' needs a GPU (the default backend is "
                             f"{jax.default_backend()!r}); use None or 'xla'")
        q, k, v = self.q(x), self.k(x), self.v(x)  # [b, t, heads, head_dim]
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal,
                                           implementation=self.implementation)
        return self.o(out)


def _dtype_kwargs(dtype, param_dtype) -> dict:
    """The dtype keywords a block passes its attention and FFN: none at the float32
    defaults, so a factory with the plain signature keeps working."""
    dtype, param_dtype = resolve_dtype(dtype), resolve_dtype(param_dtype)
    if dtype is jnp.float32 and param_dtype is jnp.float32:
        return {}
    return dict(dtype=dtype, param_dtype=param_dtype)


class Block(nnx.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``.

    ``attention`` is called as ``attention(d_model, num_heads, causal=..., rngs=...)`` and
    ``ffn`` as ``ffn(d_model, d_ff, activation, rngs=...)``: a module class or any factory
    with that signature (e.g. ``functools.partial(SparkFFN, density=0.08)``). A block
    whose ``dtype`` or ``param_dtype`` is not float32 also passes them both to the
    attention and the FFN, which must then take them (``FFN``, ``Attention`` and
    ``GroupedQueryAttention`` do). The residual stream keeps the input's dtype.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.layers import Block
        >>> block = Block(64, 4, 256, activation='relu', causal=False, rngs=nnx.Rngs(0))
        >>> block(jnp.ones((2, 10, 64))).shape, block.attn.causal, block.mlp.up.kernel.shape
        ((2, 10, 64), False, (64, 256))
        >>> half = Block(64, 4, 256, activation='relu', causal=True, dtype='bfloat16',
        ...              rngs=nnx.Rngs(0))
        >>> x = jnp.ones((2, 10, 64), jnp.bfloat16)
        >>> half(x).dtype, half.attn.q(x).dtype, half.attn.q.kernel.dtype   # f32 params
        (dtype(bfloat16), dtype(bfloat16), dtype('float32'))
    """

    def __init__(self, d_model: int, num_heads: int, d_ff: int, *, activation: str,
                 causal: bool, rngs: nnx.Rngs, attention: AttentionFactory = Attention,
                 ffn: FFNFactory = FFN, dtype: Dtype = jnp.float32,
                 param_dtype: Dtype = jnp.float32):
        dtypes = _dtype_kwargs(dtype, param_dtype)
        ln = dict(dtype=resolve_dtype(dtype), param_dtype=resolve_dtype(param_dtype))
        self.ln1 = nnx.LayerNorm(d_model, **ln, rngs=rngs)
        self.attn = attention(d_model, num_heads, causal=causal, **dtypes, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d_model, **ln, rngs=rngs)
        self.mlp = ffn(d_model, d_ff, activation, **dtypes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def block_stack(num_layers: int, d_model: int, num_heads: int, d_ff: int, *, activation: str,
                causal: bool, rngs: nnx.Rngs, attention: AttentionFactory = Attention,
                ffn: FFNFactory = FFN, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, scan: bool = False) -> nnx.Module:
    """``num_layers`` blocks as an ``nnx.List`` (parameter paths ``blocks/<i>/...``), or
    with ``scan=True`` as one ``Block`` whose parameters are stacked along a leading layer
    axis (paths ``blocks/...``, shapes ``[num_layers, ...]``; run it with
    ``nn.scan.scan``).

    Example:

        >>> from flax import nnx
        >>> from sparsejax.nn.layers import block_stack
        >>> blocks = block_stack(2, 64, 4, 256, activation='gelu', causal=True, rngs=nnx.Rngs(0))
        >>> type(blocks).__name__, len(blocks), type(blocks[1]).__name__
        ('List', 2, 'Block')
        >>> stack = block_stack(3, 64, 4, 256, activation='gelu', causal=True, scan=True,
        ...                     rngs=nnx.Rngs(0))
        >>> type(stack).__name__, stack.mlp.up.kernel.shape
        ('Block', (3, 64, 256))
    """
    def make(rngs):
        return Block(d_model, num_heads, d_ff, activation=activation, causal=causal,
                     attention=attention, ffn=ffn, dtype=dtype, param_dtype=param_dtype,
                     rngs=rngs)

    if scan:
        return stacked(make, num_layers, rngs)
    return nnx.List([make(rngs) for _ in range(num_layers)])
