"""Sparse-IFT layers (Thangarasa et al. 2024, "Sparse Iso-FLOP Transformations").

Each replaces one dense ``nnx.Linear`` or ``nnx.Conv`` ``W`` (``d_in → d_out``, ``c``
= kernel window size, 1 for Linear) and is built from it, keeping its kind, kernel
size, strides and padding. The sparse parts are plain Linear/Conv layers whose masks
come from a weight-sparsity transform (RigL by default); ``sparsejax.ift`` sizes them.

- ``SparseParallel``: ``Σ_b norm_b(W_b x)`` over ``B`` sparse branches.
- ``SparseFactorized``: ``V σ(U x)``, ``U: d_in → d_sf`` (same kernel as ``W``),
  ``V: d_sf → d_out`` (1×1), both sparse; ``σ`` a normalisation plus ReLU by default.
- ``SparseDoped``: ``W_sparse x + V(U x)``, a sparse copy of ``W`` plus a dense rank-``r``
  path ``U: d_in → r`` (same kernel), ``V: r → d_out`` (1×1).

Example::

    layer = SparseDoped(nnx.Linear(512, 512, rngs=nnx.Rngs(0)), rank=128, rngs=nnx.Rngs(1))
"""

from __future__ import annotations

import jax
from flax import nnx

NORMS = ("batch", "layer", "none")


def _is_conv(layer) -> bool:
    return isinstance(layer, nnx.Conv)


def check_layer(layer, path: str = "") -> None:
    """Raises unless ``layer`` is a transformable ``nnx.Linear`` or ungrouped ``nnx.Conv``."""
    where = f"module {path!r}: " if path else ""
    if not isinstance(layer, (nnx.Linear, nnx.Conv)):
        raise TypeError(f"{where}Sparse-IFT transforms nnx.Linear and nnx.Conv layers, not "
                        f"{type(layer).__name__}")
    if _is_conv(layer) and layer.feature_group_count != 1:
        raise TypeError(f"{where}grouped convolutions (feature_group_count="
                        f"{layer.feature_group_count}) are not supported")


def clone_layer(layer, *, rngs: nnx.Rngs, in_features: int | None = None,
                out_features: int | None = None, pointwise: bool = False,
                use_bias: bool | None = None):
    """A fresh layer of ``layer``'s kind and geometry with other widths; ``pointwise``
    gives a 1×1, stride-1 conv (a Linear stays a Linear).

    Example::

        u = clone_layer(conv, in_features=64, out_features=32, rngs=nnx.Rngs(0))
    """
    check_layer(layer)
    d_in = layer.in_features if in_features is None else in_features
    d_out = layer.out_features if out_features is None else out_features
    bias = layer.use_bias if use_bias is None else use_bias
    if not _is_conv(layer):
        return nnx.Linear(d_in, d_out, use_bias=bias, rngs=rngs)
    if pointwise:
        ones = (1,) * len(layer.kernel_size)
        return nnx.Conv(d_in, d_out, ones, strides=1, padding="VALID", use_bias=bias, rngs=rngs)
    return nnx.Conv(d_in, d_out, layer.kernel_size, strides=layer.strides,
                    padding=layer.padding, input_dilation=layer.input_dilation,
                    kernel_dilation=layer.kernel_dilation, use_bias=bias, rngs=rngs)


def make_norm(kind: str, features: int, rngs: nnx.Rngs):
    """'batch' (BatchNorm), 'layer' (LayerNorm) or 'none'. Example: ``make_norm('layer', 64, rngs)``."""
    if kind == "batch":
        return nnx.BatchNorm(features, rngs=rngs)
    if kind == "layer":
        return nnx.LayerNorm(features, rngs=rngs)
    if kind == "none":
        return None
    raise ValueError(f"unknown norm {kind!r}; known: {NORMS}")


def default_norm(layer) -> str:
    """BatchNorm after convolutions, LayerNorm after Linear layers."""
    return "batch" if _is_conv(layer) else "layer"


class SparseParallel(nnx.Module):
    """``Σ_b norm_b(W_b x)``: ``num_branches`` copies of ``layer``, each normalised.

    With one branch there is nothing to balance and no norm: it is ``layer``'s kind.

    Example::

        SparseParallel(nnx.Linear(64, 64, rngs=nnx.Rngs(0)), 4, rngs=nnx.Rngs(1))
    """

    def __init__(self, layer, num_branches: int, *, norm: str | None = None, rngs: nnx.Rngs):
        check_layer(layer)
        if num_branches < 1:
            raise ValueError(f"num_branches must be >= 1, got {num_branches}")
        kind = default_norm(layer) if norm is None else norm
        self.branches = nnx.List([clone_layer(layer, rngs=rngs) for _ in range(num_branches)])
        self.norms = nnx.List([make_norm(kind, layer.out_features, rngs)
                               for _ in range(num_branches)]) if num_branches > 1 else None

    def __call__(self, x: jax.Array) -> jax.Array:
        outs = [b(x) for b in self.branches]
        if self.norms is not None:
            outs = [y if n is None else n(y) for n, y in zip(self.norms, outs)]
        return sum(outs[1:], outs[0])


class SparseFactorized(nnx.Module):
    """``V σ(U x)``: ``U`` has ``layer``'s kernel and ``d_sf`` outputs, ``V`` is 1×1.

    ``sigma``: 'norm_relu' (default: the layer-kind's norm, then ReLU), 'relu' or
    'identity'.

    Example::

        SparseFactorized(nnx.Linear(512, 512, rngs=nnx.Rngs(0)), d_sf=1024, rngs=nnx.Rngs(1))
    """

    def __init__(self, layer, d_sf: int, *, sigma: str = "norm_relu", rngs: nnx.Rngs):
        check_layer(layer)
        if sigma not in ("norm_relu", "relu", "identity"):
            raise ValueError(f"unknown sigma {sigma!r}; known: ['identity', 'norm_relu', 'relu']")
        self.sigma = sigma
        self.u = clone_layer(layer, out_features=d_sf, use_bias=False, rngs=rngs)
        self.norm = make_norm(default_norm(layer), d_sf, rngs) if sigma == "norm_relu" else None
        self.v = clone_layer(layer, in_features=d_sf, pointwise=True, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.u(x)
        if self.norm is not None:
            h = self.norm(h)
        if self.sigma != "identity":
            h = jax.nn.relu(h)
        return self.v(h)


class SparseDoped(nnx.Module):
    """``W_sparse x + V(U x)``: a sparse copy of ``layer`` plus a dense rank-``rank`` path.

    With ``rank == 0`` it is ``layer``'s kind.

    Example::

        SparseDoped(nnx.Conv(64, 64, (3, 3), rngs=nnx.Rngs(0)), rank=32, rngs=nnx.Rngs(1))
    """

    def __init__(self, layer, rank: int, *, rngs: nnx.Rngs):
        check_layer(layer)
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        self.sparse = clone_layer(layer, rngs=rngs)
        self.low_u = clone_layer(layer, out_features=rank, use_bias=False, rngs=rngs) if rank else None
        self.low_v = (clone_layer(layer, in_features=rank, pointwise=True, use_bias=False,
                                  rngs=rngs) if rank else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.sparse(x)
        return y if self.low_u is None else y + self.low_v(self.low_u(x))
