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

from typing import Any, Callable, Sequence

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from sparsejax.base import check_int
from sparsejax.models.blocks import ATTENTIONS, FFNS, block_factory
from sparsejax.nn.layers import block_stack
from sparsejax.nn.scan import check_remat, resolve_dtype, scan, with_remat


class DecoderLM(nnx.Module):
    """Token + learned position embeddings, causal pre-LN blocks, final LN, untied head.

    ``attention``/``ffn`` name an entry of ``models.blocks.ATTENTIONS``/``FFNS`` (or are a
    module class or factory); ``attention_options``/``ffn_options`` are its keywords.
    Every size argument is a positive integer.

    At scale: ``dtype`` is the compute dtype and ``param_dtype`` the stored one (names
    such as ``'bfloat16'`` or jnp dtypes; e.g. float32 params, bfloat16 compute: the
    logits come out in ``dtype``). ``scan_layers=True`` builds the blocks once under
    ``nnx.vmap`` (parameters ``blocks/...`` of shape ``[num_layers, ...]``) and runs them
    with ``nnx.scan``; ``stacked_paths`` then holds the regexes of the parameter paths
    whose leading axis is the layer axis (empty when unscanned), and
    ``nn.scan.stack_layers``/``unstack_layers`` convert parameters between the two
    layouts. ``remat`` names each block's rematerialisation policy
    (``nn.scan.REMAT_NAMES``; ``'none'``: keep every activation). ``activation_sharding``
    (mesh axes per dimension of the ``[batch, seq, d_model]`` residual stream, e.g.
    ``('data', None, None)``; empty: none) pins the stream's sharding at the embedding and
    after every block (``jax.lax.with_sharding_constraint`` under the ``jax.set_mesh``
    the loop runs in): with kernels sharded over the data axis (FSDP) it keeps the
    batch split instead of letting the partitioner split the model dimension and
    replicate the batch. ``hidden(tokens)`` is the
    final-LayerNorm output the ``head`` reads, for a loss that computes the logits in
    chunks (``train.loop.chunked_cross_entropy``).

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
        >>> big = DecoderLM(vocab_size=256, max_len=16, num_layers=3, attention='gqa',
        ...                 attention_options={'num_kv_heads': 2}, dtype='bfloat16',
        ...                 scan_layers=True, remat='full', rngs=nnx.Rngs(0))
        >>> big.blocks.attn.k.kernel.shape, big.stacked_paths       # [layer, d, kv heads, hd]
        ((3, 64, 2, 16), ('blocks/.*',))
        >>> big(jnp.zeros((1, 16), jnp.int32)).dtype
        dtype(bfloat16)
    """

    #: Regexes (full match) of the parameter paths whose leading axis is the layer axis.
    stacked_paths: tuple[str, ...] = ()

    def __init__(self, *, vocab_size: int, max_len: int, d_model: int = 64,
                 num_heads: int = 4, num_layers: int = 2, d_ff: int = 256,
                 activation: str = "gelu", attention: str | Callable = "dense",
                 attention_options: dict | None = None, ffn: str | Callable = "dense",
                 ffn_options: dict | None = None, dtype: Any = "float32",
                 param_dtype: Any = "float32", scan_layers: bool = False,
                 remat: str = "none", activation_sharding: Sequence = (), rngs: nnx.Rngs):
        check_int(vocab_size=vocab_size, max_len=max_len, d_model=d_model, num_heads=num_heads,
                  num_layers=num_layers, d_ff=d_ff)
        self.remat = check_remat(remat)
        dtype, param_dtype = resolve_dtype(dtype), resolve_dtype(param_dtype)
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.max_len, self.dtype, self.scan_layers = max_len, dtype, bool(scan_layers)
        if activation_sharding and len(activation_sharding) != 3:
            raise ValueError("activation_sharding names the mesh axes of [batch, seq, "
                             f"d_model]: 3 entries, got {tuple(activation_sharding)!r}")
        self.activation_sharding = tuple(activation_sharding)
        self.embed = nnx.Embed(vocab_size, d_model, **kw, rngs=rngs)
        self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, d_model),
                                                      param_dtype))
        self.blocks = block_stack(num_layers, d_model, num_heads, d_ff, activation=activation,
                                  causal=True, rngs=rngs, **kw, scan=self.scan_layers,
                                  attention=block_factory(ATTENTIONS, "attention", attention,
                                                          attention_options),
                                  ffn=block_factory(FFNS, "ffn", ffn, ffn_options))
        if self.scan_layers:
            self.stacked_paths = (r"blocks/.*",)
        self.ln = nnx.LayerNorm(d_model, **kw, rngs=rngs)
        self.head = nnx.Linear(d_model, vocab_size, **kw, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """The final LayerNorm's output ``[..., t, d_model]`` (in ``dtype``): what ``head``
        maps to the logits.

        Example:

            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> from sparsejax.models import DecoderLM
            >>> lm = DecoderLM(vocab_size=32, max_len=8, rngs=nnx.Rngs(0))
            >>> tokens = jnp.zeros((2, 8), jnp.int32)
            >>> h = lm.hidden(tokens); h.shape
            (2, 8, 64)
            >>> bool(jnp.allclose(lm.head(h), lm(tokens)))
            True
        """
        t = tokens.shape[-1]
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        x = self._pin(self.embed(tokens) + self.pos[:t].astype(self.dtype))
        call = lambda block, x: self._pin(block(x))  # noqa: E731
        if self.scan_layers:
            x = scan(call, self.blocks, x, remat=self.remat)
        else:
            call = with_remat(call, self.remat)
            for block in self.blocks:
                x = call(block, x)
        return self.ln(x)

    def _pin(self, x: jax.Array) -> jax.Array:
        if not self.activation_sharding:
            return x
        return jax.lax.with_sharding_constraint(x, P(*self.activation_sharding))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.head(self.hidden(tokens))
