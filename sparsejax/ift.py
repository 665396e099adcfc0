"""Sparse Iso-FLOP Transformations (Thangarasa et al. 2024): one knob ``s``, four families.

With keep density ``1 − s`` and ``c`` the kernel window (9 for a 3×3 conv, 1 for Linear),
a dense ``d_in → d_out`` layer costs ``c·d_in·d_out`` multiply-adds per position, and
each family spends the same on sparse weights:

- Wide: every width × ``√(1/(1 − s))``; the stem and head stay dense, so the total is
  matched by adjusting ``s`` on the widened layers (``wide_search``), as the reference
  searches ``s`` for a fixed integer width.
- Parallel: ``B = round(1/(1 − s))`` sparse branches, each normalised, summed.
- Factorized: ``V σ(U x)`` with ``d_sf = ⌈c·d_in·d_out / ((1 − s)(c·d_in + d_out))⌉``.
- Doped: ``W_sparse x + V(U x)``, dense low rank ``r = ⌊s·c·d_in·d_out / (c·d_in + d_out)⌋``.

The rounding in ``d_sf`` (ceil) and ``r`` (floor) is the paper's; on very narrow layers
it shows (ResNet-8 with 16–64 channels: Doped at 0.96–0.99 of the dense FLOPs), from 64
channels up every family is within 1%.

``transform`` rewrites the selected layers of any NNX model by surgery (by default every
Linear/Conv that ``call(model)`` calls between the stem and the head, the first and last
layers holding weights, ``nnx.Embed`` and tied heads included) and returns the
path rules that make the new sparse kernels exactly ``s`` sparse; train with
``sparsejax.rigl(..., rules=rules)`` (the reference recipe) or ``static_sparse``. At
``s = 0`` every family is the dense model itself.

Example:

    >>> import jax.numpy as jnp
    >>> import optax, sparsejax
    >>> from flax import nnx
    >>> from sparsejax import ift
    >>> from sparsejax.models import MLP
    >>> model, x = MLP(16, (32, 32), 4, rngs=nnx.Rngs(0)), jnp.ones((1, 16))
    >>> model, rules = ift.transform(model, 'doped', 0.75, call=lambda m: m(x))
    >>> rules, type(model.layers[1]).__name__          # stem layers/0 and head stay dense
    ([('layers/1/sparse/kernel', 0.75)], 'SparseDoped')
    >>> tx = sparsejax.rigl(optax.sgd(0.1, 0.9), 0.75, rules=rules, end_step=7500)
    >>> state = tx.init(nnx.state(model, nnx.Param))
    >>> sparsejax.mask_counts(state.masks)
    {'layers/1/sparse/kernel': (256, 1024)}
"""

from __future__ import annotations

import math
import re
from typing import Callable, Sequence

from flax import nnx

from sparsejax import surgery
from sparsejax.flops import model_flops, sparse_flops, total
from sparsejax.paths import LayerPattern, SparsityRule, match_rules, matches, pattern_name
from sparsejax.nn.ift import SparseDoped, SparseFactorized, SparseParallel, check_layer

FAMILIES = ("wide", "parallel", "factorized", "doped")


def check(family: str, sparsity: float) -> None:
    """Raises a clear error for an unknown family or ``s`` outside [0, 1)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown Sparse-IFT family {family!r}; known: {FAMILIES}")
    if not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity < 1.0):
        raise ValueError(f"Sparse-IFT sparsity {sparsity!r} is outside [0, 1)")


def num_branches(s: float) -> int:
    """``B = round(1/(1 − s))``. Example: ``num_branches(0.75)`` → 4."""
    return max(1, round(1.0 / (1.0 - s)))


def width_multiplier(s: float) -> float:
    """``√(1/(1 − s))``. Example: ``width_multiplier(0.75)`` → 2.0."""
    return math.sqrt(1.0 / (1.0 - s))


def factorized_dim(d_in: int, d_out: int, s: float, c: int = 1) -> int:
    """``d_sf = ⌈c·d_in·d_out / ((1 − s)(c·d_in + d_out))⌉``. Example: ``(512, 512, 0.75)`` → 1024."""
    return math.ceil(c * d_in * d_out / ((1.0 - s) * (c * d_in + d_out)) - 1e-9)


def doped_rank(d_in: int, d_out: int, s: float, c: int = 1) -> int:
    """``r = ⌊s·c·d_in·d_out / (c·d_in + d_out)⌋``. Example: ``(512, 512, 0.75)`` → 192."""
    return math.floor(s * c * d_in * d_out / (c * d_in + d_out) + 1e-9)


def window(layer) -> int:
    """``c``: the kernel window size of a conv, 1 for a Linear."""
    return math.prod(layer.kernel_size) if isinstance(layer, nnx.Conv) else 1


def select(model: nnx.Module, layers: Sequence[LayerPattern] | None = None,
           call: surgery.ModelCall | None = None) -> list[str]:
    """Module paths to transform: those matching a pattern of ``layers``
    (``sparsejax.paths`` patterns over module paths, each of which must match an
    ``nnx.Linear``/``nnx.Conv``), or by default every Linear/Conv that
    ``call(model)`` calls strictly between the stem and the head.

    The stem and head are the first and last layers holding a parameter with two or more
    dims that the call calls (``surgery.stem_and_head``: Linear, Conv, Einsum, Embed, a
    tied ``embed.attend`` head, any module holding a kernel); they stay dense. Other
    kinds of layer (``nnx.Einsum``, ``nnx.Embed``) are left alone; a rule selecting one
    is an error.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.ift import select
        >>> from sparsejax.models import DecoderLM
        >>> model = DecoderLM(vocab_size=16, max_len=8, d_model=8, num_heads=2, num_layers=1,
        ...                   d_ff=16, rngs=nnx.Rngs(0))
        >>> select(model, call=lambda m: m(jnp.zeros((1, 8), jnp.int32)))  # between embed and head
        ['blocks/0/attn/q', 'blocks/0/attn/k', 'blocks/0/attn/v', 'blocks/0/attn/o',
         'blocks/0/mlp/up', 'blocks/0/mlp/down']
        >>> select(model, layers=[r'blocks/0/mlp/.*'])
        ['blocks/0/mlp/down', 'blocks/0/mlp/up']
    """
    modules = dict(surgery.named_modules(model))
    kinds = (nnx.Linear, nnx.Conv)
    if layers:
        chosen, unused = [], []
        for pattern in layers:
            hits = [p for p in modules if matches(pattern, p, modules[p])]
            for p in hits:
                if not isinstance(modules[p], kinds) and surgery.holds_weights(modules[p]):
                    raise TypeError(f"Sparse-IFT layers pattern {pattern_name(pattern)} selects "
                                    f"module {p!r} "
                                    f"({type(modules[p]).__name__}); Sparse-IFT transforms "
                                    "nnx.Linear and nnx.Conv layers only")
            layers = [p for p in hits if isinstance(modules[p], kinds)]
            chosen.extend(p for p in layers if p not in chosen)
            if not layers:
                unused.append(pattern if isinstance(pattern, str) else pattern_name(pattern))
        if unused:
            names = sorted(p for p, m in modules.items() if isinstance(m, kinds))
            raise ValueError(f"Sparse-IFT layers match no Linear/Conv module: {unused}; layers "
                             f"are {names[:6]}")
    else:
        if call is None:
            raise ValueError("Sparse-IFT needs layers, or call (call=lambda m: m(x)) to find "
                             "the stem and head")
        order = surgery.layer_calls(model, call)
        if not order:
            raise ValueError("call(model) calls no layer holding a parameter with 2 or more "
                             "dims; there is nothing to transform")
        edges = {order[0], order[-1]}
        chosen = [p for p in dict.fromkeys(order[1:-1])
                  if p not in edges and isinstance(modules[p], kinds)]
    for p in chosen:
        check_layer(modules[p], p)
    return chosen


def sparse_kernel_patterns(family: str, path: str) -> list[str]:
    """Regexes of the sparse kernels a family puts at module ``path``."""
    p = re.escape(path)
    return {"wide": [f"{p}/kernel"], "parallel": [f"{p}/branches/\\d+/kernel"],
            "factorized": [f"{p}/(u|v)/kernel"], "doped": [f"{p}/sparse/kernel"]}[family]


def sparsity_rules(family: str, sparsity: float, paths: Sequence[str]) -> list[tuple[str, float]]:
    """Path rules giving every sparse kernel of the transformed ``paths`` sparsity ``s``
    (a per-layer value, so a distribution leaves them at exactly ``s``).

    Example:

        >>> from sparsejax.ift import sparsity_rules
        >>> sparsity_rules('doped', 0.9, ['layers/1'])
        [('layers/1/sparse/kernel', 0.9)]
        >>> sparsity_rules('parallel', 0.75, ['layers/1']), sparsity_rules('wide', 0.0, ['a'])
        ([('layers/1/branches/\\\\d+/kernel', 0.75)], [])
    """
    check(family, sparsity)
    if sparsity == 0:
        return []
    return [(pattern, float(sparsity)) for path in paths
            for pattern in sparse_kernel_patterns(family, path)]


def _replacement(family: str, s: float, norm: str | None, sigma: str, rngs: nnx.Rngs,
                 layer_kwargs: dict):
    def make(path, layer):
        c, d_in, d_out = window(layer), layer.in_features, layer.out_features
        if family == "parallel":
            return SparseParallel(layer, num_branches(s), norm=norm, rngs=rngs, **layer_kwargs)
        if family == "factorized":
            return SparseFactorized(layer, factorized_dim(d_in, d_out, s, c), sigma=sigma,
                                    rngs=rngs, **layer_kwargs)
        return SparseDoped(layer, doped_rank(d_in, d_out, s, c), rngs=rngs, **layer_kwargs)
    return make


def transform(model: nnx.Module, family: str, sparsity: float,
              layers: Sequence[LayerPattern] | None = None,
              *, call: surgery.ModelCall | None = None, norm: str | None = None,
              sigma: str = "norm_relu", rngs: nnx.Rngs | None = None,
              layer_kwargs: dict | None = None) -> tuple[nnx.Module, list[tuple[str, float]]]:
    """Rewrites the selected layers (``select``: ``layers``, or every Linear/Conv that
    ``call(model)`` calls between the stem and the head) into ``family`` at sparsity
    ``s``; returns ``(model, sparsity_rules)``. The model is edited in place.

    The new layers keep each replaced layer's constructor arguments
    (``sparsejax.nn.ift.layer_kwargs``: dtypes, precision, geometry, parameter sharding)
    and accept its call's keyword arguments (``out_sharding``); ``layer_kwargs`` adds
    constructor arguments flax does not keep, e.g. ``{'kernel_init': init}``.
    'wide' changes no layer here: build the model wider (``wide_search``) and use the
    returned rules to make its selected layers ``s`` sparse.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.ift import transform
        >>> from sparsejax.models import MLP
        >>> model, x = MLP(16, (32, 32), 4, rngs=nnx.Rngs(0)), jnp.ones((2, 16))
        >>> model, rules = transform(model, 'parallel', 0.75, call=lambda m: m(x))
        >>> len(model.layers[1].branches), type(model.layers[1].norms[0]).__name__
        (4, 'LayerNorm')
        >>> rules, model(x).shape
        ([('layers/1/branches/\\\\d+/kernel', 0.75)], (2, 4))
    """
    check(family, sparsity)
    paths = select(model, layers, call)
    if family != "wide" and sparsity > 0:
        rngs = rngs or nnx.Rngs(0)
        make = _replacement(family, sparsity, norm, sigma, rngs, dict(layer_kwargs or {}))
        surgery.replace(model, [(re.escape(p), make) for p in paths])
    return model, sparsity_rules(family, sparsity, paths)


def _density(pattern, spec) -> float:
    if spec is None or spec == "dense":
        return 1.0
    if isinstance(spec, (int, float)) and not isinstance(spec, bool) and 0.0 <= spec < 1.0:
        return 1.0 - float(spec)
    raise ValueError(f"measured_flops: rule {pattern_name(pattern)} has spec {spec!r}; give "
                     "a sparsity in [0, 1) or 'dense'")


def measured_flops(model: nnx.Module, rules: Sequence[SparsityRule],
                   call: surgery.ModelCall) -> float:
    """Multiply-add FLOPs of one forward pass ``call(model)``, each rule-matched kernel
    scaled by its density ``1 − s`` (``sparsejax.flops``, counted from the traced
    computation): ``Σ_layers f_D(layer)·(1 − s_layer)``.

    ``rules`` are ``sparsejax.paths`` rules ``(pattern, s)`` (first match wins; one that
    matches no parameter is an error).

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.ift import measured_flops
        >>> from sparsejax.models import MLP
        >>> model = MLP(64, (32,), 10, rngs=nnx.Rngs(0))
        >>> call = lambda m: m(jnp.ones((1, 8, 8, 1)))
        >>> measured_flops(model, [], call)         # 2 · (64·32 + 32·10): 2 per multiply-add
        4736.0
        >>> measured_flops(model, [(r'layers/0/kernel', 0.75)], call)   # 2 · (64·32/4 + 32·10)
        1664.0
    """
    dense = model_flops(model, call)
    params = nnx.state(model, nnx.Param)
    densities = {path: _density(pattern, spec)
                 for path, _, pattern, spec in match_rules(params, rules, "FLOPs")
                 if pattern is not None}
    return total(sparse_flops(dense, densities))


def wide_search(build: Callable[[float], nnx.Module], sparsity: float, call: surgery.ModelCall,
                layers: Sequence[LayerPattern] | None = None, tol: float = 0.01):
    """Sparse Wide: widths × ``√(1/(1 − s))``, then the sparsity ``s'`` of the widened
    layers solved so the model costs exactly the dense model's FLOPs.

    Integer widths make FLOPs a step function of the width, so, as the reference does,
    the width is fixed and ``s`` is adjusted: FLOPs are linear in density, so
    ``s' = 1 − (F_dense − F_fixed) / F_widened`` with ``F_fixed`` the layers that stay
    dense (stem, head) and ``F_widened`` the selected layers at full density.
    ``build(multiplier)`` makes the model at a width (1.0 = dense; abstract models from
    ``nnx.eval_shape`` are fine); ``call(model)`` runs either. Returns
    ``(multiplier, model, rules, relative_flops)``.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.ift import wide_search
        >>> from sparsejax.models import MLP
        >>> x = jnp.ones((1, 64))
        >>> mult, model, rules, rel = wide_search(lambda w: nnx.eval_shape(
        ...     lambda: MLP(64, (round(256 * w),) * 2, 10, rngs=nnx.Rngs(0))), 0.9, lambda m: m(x))
        >>> round(mult, 4), model.layers[1].kernel.shape, round(rel, 6)
        (3.1623, (810, 810), 1.0)
        >>> [(path, round(s, 4)) for path, s in rules]   # above 0.9: stem and head are wider too
        [('layers/1/kernel', 0.9626)]
    """
    check("wide", sparsity)
    target = measured_flops(build(1.0), [], call)
    mult = width_multiplier(sparsity)
    model = build(mult)
    paths = select(model, layers, call)
    full = sparsity_rules("wide", 1e-12, paths) if paths else []  # matches, density ~1
    per_layer = model_flops(model, call)
    widened = sum(v for k, v in per_layer.items()
                  if any(matches(p, k, None) for p, _ in full))
    fixed = total(per_layer) - widened
    if widened <= 0:
        raise ValueError("Sparse Wide: no selected layer has FLOPs to make sparse")
    adjusted = 1.0 - (target - fixed) / widened
    if not 0.0 <= adjusted < 1.0:
        raise ValueError(f"Sparse Wide at s={sparsity}: matching the dense FLOPs needs "
                         f"sparsity {adjusted:.4f} on the widened layers, outside [0, 1)")
    out_rules = sparsity_rules("wide", adjusted, paths)
    rel = measured_flops(model, out_rules, call) / target
    if abs(rel - 1) > tol:
        raise ValueError(f"Sparse Wide at s={sparsity}: FLOPs {rel:.4f}× dense after solving")
    return mult, model, out_rules, rel


__all__ = ["FAMILIES", "check", "doped_rank", "factorized_dim", "measured_flops",
           "num_branches", "select", "sparsity_rules", "transform", "wide_search",
           "width_multiplier", "window"]
