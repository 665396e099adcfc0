"""Layers stacked under ``nnx.scan``, remat policies, and dtypes by name.

A model that scans its layers builds them once under ``nnx.vmap`` (``stacked``): one
module whose parameters carry a leading layer axis (``blocks/attn/q/kernel`` of shape
``[num_layers, ...]``), so XLA compiles one layer instead of ``num_layers`` copies.
``scan`` runs it with ``nnx.scan``, each step under ``nnx.remat`` with a named policy
(``REMAT_POLICIES``). ``stack_layers``/``unstack_layers`` convert a parameter tree
between the unscanned layout (``blocks/0/...``, ``blocks/1/...``) and the scanned one.

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.nn.scan import scan, stacked
    >>> layers = stacked(lambda rngs: nnx.Linear(4, 4, rngs=rngs), 3, nnx.Rngs(0))
    >>> layers.kernel.shape                                  # [num_layers, in, out]
    (3, 4, 4)
    >>> scan(lambda layer, x: jnp.tanh(layer(x)), layers, jnp.ones((2, 4)), remat='full').shape
    (2, 4)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

#: Remat (``jax.checkpoint``) policy of each layer by name: what the backward pass may
#: keep from the forward instead of recomputing. ``'none'``: no remat (keep everything);
#: ``'full'``/``'nothing_saveable'``: keep only each layer's input; ``'dots_saveable'``:
#: keep matmul outputs; ``'dots_with_no_batch_dims_saveable'``: keep matmul outputs
#: without batch dimensions (the projections, not attention's logits).
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable":
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
REMAT_NAMES = ("none", *REMAT_POLICIES)

#: The dtypes a config may name (ml_collections configs hold strings).
DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
                          "float16": jnp.float16}


def resolve_dtype(dtype) -> Any:
    """A dtype given by name (``'bfloat16'``) or as a dtype, checked: one of ``DTYPES``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nn.scan import resolve_dtype
        >>> resolve_dtype('bfloat16'), resolve_dtype(jnp.float32)
        (<class 'jax.numpy.bfloat16'>, <class 'jax.numpy.float32'>)
        >>> resolve_dtype('bf16')
        Traceback (most recent call last):
        ...
        ValueError: unknown dtype 'bf16'; known: ['bfloat16', 'float16', 'float32']
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
        return DTYPES[dtype]
    for known in DTYPES.values():
        try:
            if jnp.dtype(dtype) == jnp.dtype(known):
                return known
        except TypeError:
            break
    raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}")


def check_remat(remat: str) -> str:
    """``remat`` if it names a policy (``'none'`` or a key of ``REMAT_POLICIES``).

    Example:

        >>> from sparsejax.nn.scan import check_remat
        >>> check_remat('full')
        'full'
        >>> check_remat('dots')
        Traceback (most recent call last):
        ...
        ValueError: unknown remat policy 'dots'; known: ('none', 'full', 'nothing_saveable', ...)
    """
    if remat not in REMAT_NAMES:
        raise ValueError(f"unknown remat policy {remat!r}; known: {REMAT_NAMES}")
    return remat


def with_remat(fn: Callable, policy: str, *, prevent_cse: bool = True) -> Callable:
    """``fn(module, x)`` under ``nnx.remat`` with the named policy (``'none'``: ``fn``).
    ``prevent_cse=False`` is right inside ``scan`` only (jax.checkpoint's note).

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.scan import with_remat
        >>> layer = nnx.Linear(3, 3, rngs=nnx.Rngs(0))
        >>> apply = with_remat(lambda m, x: jnp.sin(m(x)), 'dots_saveable')
        >>> bool(jnp.allclose(apply(layer, jnp.ones(3)), jnp.sin(layer(jnp.ones(3)))))
        True
    """
    if check_remat(policy) == "none":
        return fn
    return nnx.remat(fn, policy=REMAT_POLICIES[policy], prevent_cse=prevent_cse)


def stacked(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int,
            rngs: nnx.Rngs) -> nnx.Module:
    """``make(rngs)`` built ``num_layers`` times as one module with stacked state (leading
    axis = layer), each layer from its own split of ``rngs``.

    Example:

        >>> from flax import nnx
        >>> from sparsejax.nn.scan import stacked
        >>> layers = stacked(lambda rngs: nnx.Linear(2, 5, rngs=rngs), 4, nnx.Rngs(0))
        >>> layers.kernel.shape, layers.bias.shape
        ((4, 2, 5), (4, 5))
        >>> bool((layers.kernel[0] != layers.kernel[1]).any())   # independent initialisations
        True
    """

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def build(rngs):
        return make(rngs)

    return build(rngs)


def scan(fn: Callable[[nnx.Module, jax.Array], jax.Array], layers: nnx.Module, x: jax.Array,
         *, remat: str = "none") -> jax.Array:
    """``x`` through every layer of ``stacked`` module ``layers`` in order, by
    ``nnx.scan``: ``x = fn(layer_i, x)``, each step under the named remat policy.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.scan import scan, stacked
        >>> layers = stacked(lambda rngs: nnx.Linear(2, 2, rngs=rngs), 2, nnx.Rngs(0))
        >>> y = scan(lambda layer, x: layer(x), layers, jnp.ones((1, 2)))
        >>> k, b = layers.kernel[...], layers.bias[...]
        >>> bool(jnp.allclose(y, (jnp.ones((1, 2)) @ k[0] + b[0]) @ k[1] + b[1]))
        True
    """
    step = with_remat(fn, remat, prevent_cse=False)

    def body(x, layer):
        return step(layer, x)

    return nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, layers)


def _layer_ids(layers: Mapping) -> list:
    keys = sorted(layers, key=int)
    if [int(k) for k in keys] != list(range(len(keys))):
        raise ValueError(f"layer keys must be 0..n-1, got {list(layers)}")
    return keys


def stack_layers(params: Mapping, key: str = "blocks") -> dict:
    """The unscanned parameter layout (``params[key][i]``, a mapping per layer ``i``) as
    the scanned one: ``params[key]`` one tree whose leaves carry a leading layer axis.
    Works on pure dicts (``nnx.to_pure_dict``) and any tree of the same shape (optimizer
    moments); ``unstack_layers`` is the inverse.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nn.scan import stack_layers, unstack_layers
        >>> params = {'blocks': {0: {'w': jnp.zeros(3)}, 1: {'w': jnp.ones(3)}}, 'head': 1.0}
        >>> s = stack_layers(params)
        >>> s['blocks']['w'].shape, s['head']
        ((2, 3), 1.0)
        >>> unstack_layers(s)['blocks'][1]['w'].tolist()
        [1.0, 1.0, 1.0]
    """
    layers = params[key]
    trees = [layers[k] for k in _layer_ids(layers)]
    return {**params, key: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)}


def unstack_layers(params: Mapping, key: str = "blocks") -> dict:
    """The scanned parameter layout as the unscanned one (``params[key][i]`` per layer,
    integer keys as ``nnx.to_pure_dict`` writes an ``nnx.List``): the inverse of
    ``stack_layers``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.nn.scan import unstack_layers
        >>> layers = unstack_layers({'blocks': {'w': jnp.arange(6.).reshape(3, 2)}})['blocks']
        >>> sorted(layers), layers[2]['w'].tolist()
        ([0, 1, 2], [4.0, 5.0])
    """
    leaves = jax.tree.leaves(params[key])
    sizes = {x.shape[0] for x in leaves}
    if len(sizes) != 1:
        raise ValueError(f"params[{key!r}] leaves disagree on the layer axis: {sorted(sizes)}")
    n = sizes.pop()
    return {**params, key: {i: jax.tree.map(lambda x: x[i], params[key]) for i in range(n)}}


__all__ = ["DTYPES", "REMAT_NAMES", "REMAT_POLICIES", "check_remat", "resolve_dtype", "scan",
           "stack_layers", "stacked", "unstack_layers", "with_remat"]
