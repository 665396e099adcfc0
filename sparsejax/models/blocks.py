"""The attention and FFN modules a reference transformer can be built with, by name.

``ATTENTIONS`` and ``FFNS`` are plain tables written here (nothing registers itself at
import). ``block_factory`` turns a name, or a module class or factory, plus its keyword
arguments into what ``nn.layers.Block`` calls.

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.models.blocks import FFNS, block_factory
    >>> from sparsejax.nn.layers import Block
    >>> ffn = block_factory(FFNS, 'ffn', 'spark', {'density': 0.1})
    >>> block = Block(64, 4, 256, activation='gelu', causal=True, ffn=ffn, rngs=nnx.Rngs(0))
    >>> type(block.mlp).__name__, block.mlp.density, block(jnp.ones((1, 8, 64))).shape
    ('SparkFFN', 0.1, (1, 8, 64))
"""

from __future__ import annotations

import functools
import inspect
from typing import Callable, Mapping

from sparsejax.nn.layers import FFN, Attention, GroupedQueryAttention
from sparsejax.nn.sparse_attention import SparseAttention
from sparsejax.nn.spark import BlockSparseFFN, SparkAttention, SparkFFN, StatisticalTopKFFN, TopKFFN

ATTENTIONS: dict[str, type] = {"dense": Attention, "spark": SparkAttention,
                               "sparse": SparseAttention, "gqa": GroupedQueryAttention}
FFNS: dict[str, type] = {"dense": FFN, "topk": TopKFFN, "stopk": StatisticalTopKFFN,
                         "spark": SparkFFN, "block": BlockSparseFFN}


def init_parameters(cls) -> dict[str, inspect.Parameter]:
    """The constructor's parameters (``__init__``'s, without ``self``): NNX's metaclass
    hides them from ``inspect.signature(cls)``.

    Example:

        >>> from sparsejax.models.blocks import init_parameters
        >>> from sparsejax.nn.layers import FFN
        >>> list(init_parameters(FFN))
        ['d_model', 'd_ff', 'activation', 'rngs', 'dtype', 'param_dtype']
    """
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self", None)
    return params


# Arguments the block supplies itself (the dtypes: the model's); the rest of a module's
# keywords are its options.
_SUPPLIED = {"d_model", "num_heads", "d_ff", "activation", "causal", "rngs", "dtype",
             "param_dtype"}


def block_factory(table: Mapping[str, type], kind: str, choice: str | Callable,
                  options: Mapping | None) -> Callable:
    """``choice`` (a name in ``table`` or a module class/factory) with ``options`` bound.

    An unknown name, or an option the module does not take, is a ValueError naming what
    is accepted.

    Example:

        >>> from sparsejax.models.blocks import ATTENTIONS, block_factory
        >>> make = block_factory(ATTENTIONS, 'attention', 'sparse', {'pattern': 'window'})
        >>> make.func.__name__, make.keywords
        ('SparseAttention', {'pattern': 'window'})
        >>> block_factory(ATTENTIONS, 'attention', 'dense', None).__name__   # no options
        'Attention'
        >>> block_factory(ATTENTIONS, 'attention', 'sparse', {'windows': 8})
        Traceback (most recent call last):
        ...
        ValueError: attention 'sparse' takes no option(s) ['windows']; it accepts [...]
    """
    options = dict(options or {})
    if isinstance(choice, str):
        if choice not in table:
            raise ValueError(f"unknown {kind} {choice!r}; known: {sorted(table)}")
        cls = table[choice]
        accepted = sorted(p.name for p in init_parameters(cls).values()
                          if p.kind == p.KEYWORD_ONLY and p.name not in _SUPPLIED)
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(f"{kind} {choice!r} takes no option(s) {unknown}; it accepts "
                             f"{accepted}")
        choice = cls
    return functools.partial(choice, **options) if options else choice
