"""Sparse-IFT layers (Thangarasa et al. 2024, "Sparse Iso-FLOP Transformations").

Each replaces one dense ``nnx.Linear`` or ``nnx.Conv`` ``W`` (``d_in → d_out``, ``c``
= kernel window size, 1 for Linear) and is built from it, keeping its kind and the
constructor arguments flax keeps (``layer_kwargs``: kernel size, strides, padding,
dtypes, precision, ``dot_general``, parameter sharding metadata); a call's keyword
arguments (``out_sharding``) reach the sublayers that make the layer's output. The
sparse parts are plain Linear/Conv layers whose masks come from a weight-sparsity
transform (RigL by default); ``sparsejax.ift`` sizes them.

- ``SparseParallel``: ``Σ_b norm_b(W_b x)`` over ``B`` sparse branches.
- ``SparseFactorized``: ``V σ(U x)``, ``U: d_in → d_sf`` (same kernel as ``W``),
  ``V: d_sf → d_out`` (1×1), both sparse; ``σ`` a normalisation plus ReLU by default.
- ``SparseDoped``: ``W_sparse x + V(U x)``, a sparse copy of ``W`` plus a dense rank-``r``
  path ``U: d_in → r`` (same kernel), ``V: r → d_out`` (1×1).

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.nn.ift import SparseDoped
    >>> layer = SparseDoped(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), rank=16, rngs=nnx.Rngs(1))
    >>> layer.sparse.kernel.shape, layer.low_u.kernel.shape, layer.low_v.kernel.shape
    ((64, 64), (64, 16), (16, 64))
    >>> layer(jnp.ones((2, 64))).shape
    (2, 64)
"""

from __future__ import annotations

import inspect

import jax
from flax import nnx

NORMS = ("batch", "layer", "none")


def _is_conv(layer) -> bool:
    return isinstance(layer, nnx.Conv)


def check_layer(layer, path: str = "") -> None:
    """Raises unless ``layer`` is a transformable ``nnx.Linear`` or ungrouped, unmasked
    ``nnx.Conv``."""
    where = f"module {path!r}: " if path else ""
    if not isinstance(layer, (nnx.Linear, nnx.Conv)):
        raise TypeError(f"{where}Sparse-IFT transforms nnx.Linear and nnx.Conv layers, not "
                        f"{type(layer).__name__}")
    if _is_conv(layer) and layer.feature_group_count != 1:
        raise TypeError(f"{where}grouped convolutions (feature_group_count="
                        f"{layer.feature_group_count}) are not supported")
    if _is_conv(layer) and getattr(layer, "mask", None) is not None:
        raise TypeError(f"{where}a Conv with a kernel mask is not supported (the mask fits "
                        "only its own kernel shape)")


# Set per sublayer by ``clone_layer`` (widths, geometry of a 1×1 conv) or not kept by flax.
_NOT_COPIED = frozenset({"self", "in_features", "out_features", "rngs", "mask",
                         "kernel_metadata", "bias_metadata", "feature_group_count"})


def layer_kwargs(layer) -> dict:
    """The constructor keyword arguments of ``layer`` (an ``nnx.Linear`` or ``nnx.Conv``)
    that flax keeps: every argument of the flax constructor stored as an attribute
    (``use_bias``, ``dtype``, ``param_dtype``, ``precision``, ``dot_general`` or
    ``conv_general_dilated``, ``promote_dtype``, ``preferred_element_type``; a Conv's
    ``kernel_size``, ``strides``, ``padding`` and dilations), plus ``kernel_metadata`` and
    ``bias_metadata`` from its parameters (sharding annotations). Flax does not keep
    ``kernel_init``/``bias_init``; pass them to the Sparse-IFT layer to set them.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.ift import layer_kwargs
        >>> kw = layer_kwargs(nnx.Linear(4, 8, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
        >>> kw['dtype'] == jnp.bfloat16, kw['use_bias']
        (True, True)
        >>> kw = layer_kwargs(nnx.Conv(16, 16, (3, 3), strides=2, rngs=nnx.Rngs(0)))
        >>> kw['kernel_size'], kw['strides'], kw['padding']
        ((3, 3), 2, 'SAME')
    """
    check_layer(layer)
    kind = nnx.Conv if _is_conv(layer) else nnx.Linear
    names = [n for n in inspect.signature(kind.__init__).parameters if n not in _NOT_COPIED]
    out = {n: getattr(layer, n) for n in names if n in vars(layer)}
    out["kernel_metadata"] = dict(layer.kernel.get_metadata())
    if getattr(layer, "bias", None) is not None:
        out["bias_metadata"] = dict(layer.bias.get_metadata())
    return out


def clone_layer(layer, *, rngs: nnx.Rngs, in_features: int | None = None,
                out_features: int | None = None, pointwise: bool = False,
                use_bias: bool | None = None, **overrides):
    """A fresh layer of ``layer``'s kind with its constructor arguments (``layer_kwargs``:
    dtypes, precision, geometry, ...) and other widths; ``pointwise`` gives a 1×1,
    stride-1, unpadded conv (a Linear stays a Linear). ``overrides`` (e.g.
    ``kernel_init``) replace or add constructor arguments.

    Example:

        >>> from flax import nnx
        >>> from sparsejax.nn.ift import clone_layer
        >>> conv = nnx.Conv(16, 16, (3, 3), strides=2, rngs=nnx.Rngs(0))
        >>> u = clone_layer(conv, out_features=4, rngs=nnx.Rngs(0))
        >>> type(u).__name__, u.kernel.shape, u.strides
        ('Conv', (3, 3, 16, 4), 2)
        >>> clone_layer(conv, pointwise=True, rngs=nnx.Rngs(0)).kernel.shape
        (1, 1, 16, 16)
    """
    kwargs = layer_kwargs(layer)
    d_in = layer.in_features if in_features is None else in_features
    d_out = layer.out_features if out_features is None else out_features
    if use_bias is not None:
        kwargs["use_bias"] = use_bias
    if not kwargs.get("use_bias", True):
        kwargs.pop("bias_metadata", None)
    if not _is_conv(layer):
        return nnx.Linear(d_in, d_out, **{**kwargs, **overrides}, rngs=rngs)
    if pointwise:
        kwargs.update(kernel_size=(1,) * len(layer.kernel_size), strides=1, padding="VALID",
                      input_dilation=1, kernel_dilation=1)
    return nnx.Conv(d_in, d_out, **{**kwargs, **overrides}, rngs=rngs)


def make_norm(kind: str, features: int, rngs: nnx.Rngs, **kwargs):
    """'batch' (BatchNorm), 'layer' (LayerNorm) or 'none'; ``kwargs`` (``dtype``,
    ``param_dtype``) go to the norm. Example: ``make_norm('layer', 64, rngs)``."""
    if kind == "batch":
        return nnx.BatchNorm(features, **kwargs, rngs=rngs)
    if kind == "layer":
        return nnx.LayerNorm(features, **kwargs, rngs=rngs)
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}; known: {NORMS}")


def _norm_kwargs(layer) -> dict:
    """The replaced layer's dtypes, so a norm computes and stores as the layer does."""
    return {"dtype": layer.dtype, "param_dtype": layer.param_dtype}


def default_norm(layer) -> str:
    """BatchNorm after convolutions, LayerNorm after Linear layers."""
    return "batch" if _is_conv(layer) else "layer"


class SparseParallel(nnx.Module):
    """``Σ_b norm_b(W_b x)``: ``num_branches`` copies of ``layer``, each normalised.

    With one branch there is nothing to balance and no norm: it is ``layer``'s kind.
    Branches are built with ``layer``'s constructor arguments (``layer_kwargs``) updated
    by ``layer_kwargs`` given here (e.g. ``kernel_init``); keyword arguments of a call
    (e.g. ``out_sharding``) go to every branch, as they would to ``layer``.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.ift import SparseParallel
        >>> layer = SparseParallel(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), 4, rngs=nnx.Rngs(1))
        >>> len(layer.branches), type(layer.norms[0]).__name__, layer(jnp.ones((2, 64))).shape
        (4, 'LayerNorm', (2, 64))
    """

    def __init__(self, layer, num_branches: int, *, norm: str | None = None, rngs: nnx.Rngs,
                 **layer_kwargs):
        check_layer(layer)
        if num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {num_branches}")
        kind = default_norm(layer) if norm is None else norm
        self.branches = nnx.List([clone_layer(layer, rngs=rngs, **layer_kwargs)
                                  for _ in range(num_branches)])
        self.norms = nnx.List([make_norm(kind, layer.out_features, rngs, **_norm_kwargs(layer))
                               for _ in range(num_branches)]) if num_branches > 1 else None

    def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
        outs = [b(x, **kwargs) for b in self.branches]
        if self.norms is not None:
            outs = [y if n is None else n(y) for n, y in zip(self.norms, outs)]
        return sum(outs[1:], outs[0])


class SparseFactorized(nnx.Module):
    """``V σ(U x)``: ``U`` has ``layer``'s kernel and ``d_sf`` outputs, ``V`` is 1×1.

    ``sigma``: 'norm_relu' (default: the layer-kind's norm, then ReLU), 'relu' or
    'identity'. ``U`` and ``V`` are built with ``layer``'s constructor arguments updated
    by ``layer_kwargs``; keyword arguments of a call (e.g. ``out_sharding``) go to ``V``,
    which makes the output ``layer`` would have made.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.ift import SparseFactorized
        >>> layer = SparseFactorized(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), d_sf=128,
        ...                          rngs=nnx.Rngs(1))
        >>> layer.u.kernel.shape, layer.u.bias, layer.v.kernel.shape, layer.sigma
        ((64, 128), None, (128, 64), 'norm_relu')
        >>> layer(jnp.ones((2, 64))).shape
        (2, 64)
    """

    def __init__(self, layer, d_sf: int, *, sigma: str = "norm_relu", rngs: nnx.Rngs,
                 **layer_kwargs):
        check_layer(layer)
        if sigma not in ("norm_relu", "relu", "identity"):
            raise ValueError(f"unknown sigma {sigma!r}; known: ['identity', 'norm_relu', 'relu']")
        self.sigma = sigma
        self.u = clone_layer(layer, out_features=d_sf, use_bias=False, rngs=rngs, **layer_kwargs)
        self.norm = (make_norm(default_norm(layer), d_sf, rngs, **_norm_kwargs(layer))
                     if sigma == "norm_relu" else None)
        self.v = clone_layer(layer, in_features=d_sf, pointwise=True, rngs=rngs, **layer_kwargs)

    def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
        h = self.u(x)
        if self.norm is not None:
            h = self.norm(h)
        if self.sigma != "identity":
            h = jax.nn.relu(h)
        return self.v(h, **kwargs)


class SparseDoped(nnx.Module):
    """``W_sparse x + V(U x)``: a sparse copy of ``layer`` plus a dense rank-``rank`` path.

    With ``rank == 0`` it is ``layer``'s kind. The parts are built with ``layer``'s
    constructor arguments updated by ``layer_kwargs``; keyword arguments of a call (e.g.
    ``out_sharding``) go to ``W_sparse`` and ``V``, which make the output ``layer`` would
    have made.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nn.ift import SparseDoped
        >>> layer = SparseDoped(nnx.Conv(16, 16, (3, 3), rngs=nnx.Rngs(0)), rank=4,
        ...                     rngs=nnx.Rngs(1))
        >>> layer.sparse.kernel.shape, layer.low_u.kernel.shape, layer.low_v.kernel.shape
        ((3, 3, 16, 16), (3, 3, 16, 4), (1, 1, 4, 16))
        >>> layer(jnp.ones((1, 8, 8, 16))).shape
        (1, 8, 8, 16)
    """

    def __init__(self, layer, rank: int, *, rngs: nnx.Rngs, **layer_kwargs):
        check_layer(layer)
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.sparse = clone_layer(layer, rngs=rngs, **layer_kwargs)
        self.low_u = (clone_layer(layer, out_features=rank, use_bias=False, rngs=rngs,
                                  **layer_kwargs) if rank else None)
        self.low_v = (clone_layer(layer, in_features=rank, pointwise=True, use_bias=False,
                                  rngs=rngs, **layer_kwargs) if rank else None)

    def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
        y = self.sparse(x, **kwargs)
        return y if self.low_u is None else y + self.low_v(self.low_u(x), **kwargs)
