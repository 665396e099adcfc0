"""The builder step: config + data → model maker and sparsity transform, before the loop.

Everything that rewrites a model (Sparse-IFT's Wide width, its Parallel / Factorized /
Doped layers) happens here, once, so the loop only sees ``make_model(key)`` and a
transform. ``config.model_name`` picks a class from ``sparsejax.models.MODELS`` and
``config.model`` holds exactly that class's constructor arguments, except the ones the
data decides (``data_kwargs``). See docs/architecture.md, "The builder step".

Example:

    >>> import jax
    >>> import sparsejax
    >>> from flax import nnx
    >>> from configs import quickstart
    >>> from sparsejax.train.build import build
    >>> from sparsejax.train.data import DataInfo
    >>> info = DataInfo('classification', (8, 8, 1), 10)        # the digits data
    >>> built = build(quickstart.get_config('doped,0.75,tiny'), info)
    >>> model = built.make_model(jax.random.key(0))     # the Sparse Doped MLP
    >>> type(model.layers[1]).__name__, model.layers[1].low_u.kernel.shape
    ('SparseDoped', (256, 96))
    >>> state = built.tx.init(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    >>> sparsejax.mask_counts(state.masks)              # 25% of the sparse copy kept
    {'layers/1/sparse/kernel': (16384, 65536)}
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sparsejax import ift
from sparsejax.base import SparseTransformation, as_sparse_transformation
from sparsejax.models import MODELS
from sparsejax.models.blocks import init_parameters
from sparsejax.train.data import DataInfo
from sparsejax.train.optim import make_transform

_TASKS = {"mlp": "classification", "resnet": "classification", "vit": "classification",
          "lm": "lm"}


def data_kwargs(model_name: str, info: DataInfo) -> dict:
    """The constructor arguments of ``MODELS[model_name]`` that the data decides.

    Example:

        >>> from sparsejax.train.build import data_kwargs
        >>> from sparsejax.train.data import DataInfo
        >>> data_kwargs('mlp', DataInfo('classification', (8, 8, 1), 10))
        {'in_features': 64, 'num_classes': 10}
        >>> data_kwargs('lm', DataInfo('lm', (64,), 256))
        {'vocab_size': 256, 'max_len': 64}
    """
    if model_name not in MODELS:
        raise ValueError(f"config.model_name: unknown model {model_name!r}; known: "
                         f"{sorted(MODELS)}")
    if _TASKS[model_name] != info.task:
        raise ValueError(f"config.model_name={model_name!r} is a {_TASKS[model_name]} model, "
                         f"but the dataset is a {info.task!r} task")
    shape = tuple(info.input_shape)
    if model_name == "mlp":
        return dict(in_features=math.prod(shape), num_classes=info.num_classes)
    if model_name == "resnet":
        return dict(in_channels=shape[-1], num_classes=info.num_classes)
    if model_name == "vit":
        h, w, c = shape
        if h != w:
            raise ValueError(f"ViT expects square images, got {h}x{w}")
        return dict(image_size=h, in_channels=c, num_classes=info.num_classes)
    return dict(vocab_size=info.num_classes, max_len=shape[0])


def _plain(value):
    if isinstance(value, ml_collections.ConfigDict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def model_kwargs(model_name: str, model: Mapping, info: DataInfo) -> dict:
    """``config.model`` checked against the constructor, plus the data's arguments.

    A key the constructor does not take, or one the data decides, is a ValueError naming
    the accepted keys.

    Example:

        >>> from sparsejax.train.build import model_kwargs
        >>> from sparsejax.train.data import DataInfo
        >>> info = DataInfo('classification', (8, 8, 1), 10)
        >>> model_kwargs('mlp', {'hidden': (64,)}, info)
        {'hidden': (64,), 'in_features': 64, 'num_classes': 10}
        >>> model_kwargs('mlp', {'hidden': (64,), 'num_classes': 3}, info)
        Traceback (most recent call last):
        ...
        ValueError: config.model: MLP takes no argument(s) ['num_classes']; config.model ...
    """
    from_data = data_kwargs(model_name, info)
    params = init_parameters(MODELS[model_name])
    accepted = sorted(set(params) - set(from_data) - {"rngs"})
    given = {k: _plain(v) for k, v in dict(model).items()}
    unknown = sorted(set(given) - set(accepted))
    if unknown:
        raise ValueError(f"config.model: {MODELS[model_name].__name__} takes no argument(s) "
                         f"{unknown}; config.model accepts {accepted}")
    return {**given, **from_data}


def build_model(model_name: str, model: Mapping, info: DataInfo, rngs: nnx.Rngs) -> nnx.Module:
    """``MODELS[model_name](**config.model, <data arguments>, rngs=rngs)``.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.train.build import build_model
        >>> from sparsejax.train.data import DataInfo
        >>> model = build_model('vit', {'patch_size': 2}, DataInfo('classification', (8, 8, 1), 10),
        ...                     nnx.Rngs(0))
        >>> type(model).__name__, model.pos.shape, model(jnp.ones((2, 8, 8, 1))).shape
        ('ViT', (1, 16, 64), (2, 10))
    """
    kwargs = model_kwargs(model_name, model, info)  # checks the name first
    return MODELS[model_name](**kwargs, rngs=rngs)


def _default(model_name: str, key: str):
    return init_parameters(MODELS[model_name])[key].default


def scale_width(model_name: str, model: Mapping, multiplier: float) -> dict:
    """``config.model`` with every width × ``multiplier`` (Sparse Wide): MLP ``hidden``;
    ResNet ``width``; ViT/LM ``d_ff`` and ``d_model`` (kept a multiple of ``num_heads``).
    Missing keys take the constructor's default.

    Example:

        >>> from sparsejax.train.build import scale_width
        >>> scale_width('mlp', {'hidden': (256, 256)}, 2.0)['hidden']
        (512, 512)
        >>> scale_width('vit', {'num_heads': 4}, 1.5)      # defaults d_model=64, d_ff=256
        {'num_heads': 4, 'd_model': 96, 'd_ff': 384}
    """
    d = {k: _plain(v) for k, v in dict(model).items()}
    get = lambda key: d[key] if key in d else _default(model_name, key)  # noqa: E731
    if model_name == "mlp":
        d["hidden"] = tuple(max(1, round(h * multiplier)) for h in get("hidden"))
    elif model_name == "resnet":
        d["width"] = float(get("width")) * multiplier
    else:
        heads = get("num_heads")
        d["d_model"] = max(heads, heads * round(get("d_model") * multiplier / heads))
        d["d_ff"] = max(1, round(get("d_ff") * multiplier))
    return d


def example_call(info: DataInfo) -> Callable[[nnx.Module], Any]:
    """``call(model)`` on one all-zeros example of the data's input shape (int32 tokens for
    language models), for the tools that trace a forward pass.

    Example:

        >>> from flax import nnx
        >>> from sparsejax.models import MLP
        >>> from sparsejax.train.build import example_call
        >>> from sparsejax.train.data import DataInfo
        >>> info = DataInfo('classification', (8, 8, 1), 10)
        >>> example_call(info)(MLP(64, (16,), 10, rngs=nnx.Rngs(0))).shape   # (1, num_classes)
        (1, 10)
    """
    dtype = jnp.int32 if info.task == "lm" else jnp.float32
    x = jnp.zeros((1, *info.input_shape), dtype)
    return lambda model: model(x)


class IFTPlan(NamedTuple):
    """What Sparse-IFT does to a run: the model arguments (Wide: widened), the module
    paths to rewrite (Parallel / Factorized / Doped) and the sparsity rules it brings
    (None when Sparse-IFT is off)."""

    model: dict
    paths: list
    rules: list | None


def sparse_ift_plan(config, info: DataInfo) -> IFTPlan:
    """The ``IFTPlan`` of ``config.ift`` (keys: ``ift.transform``'s arguments). Wide sizes
    the width on abstract models.

    Example:

        >>> from configs import quickstart
        >>> from sparsejax.train.build import sparse_ift_plan
        >>> from sparsejax.train.data import DataInfo
        >>> info = DataInfo('classification', (8, 8, 1), 10)
        >>> plan = sparse_ift_plan(quickstart.get_config('doped,0.75'), info)
        >>> plan.paths, plan.rules
        (['layers/1'], [('layers/1/sparse/kernel', 0.75)])
        >>> sparse_ift_plan(quickstart.get_config('rigl'), info).rules is None   # IFT off
        True
    """
    c, name = config.ift, config.model_name
    base = {k: _plain(v) for k, v in config.model.items()}
    if c.family == "none":
        return IFTPlan(base, [], None)
    ift.check(c.family, c.sparsity)
    layers = tuple(c.layers) if c.layers else None
    call = example_call(info)
    if c.family == "wide" and c.sparsity > 0:
        abstract = lambda w: nnx.eval_shape(  # noqa: E731
            lambda: build_model(name, scale_width(name, base, w), info, nnx.Rngs(0)))
        mult, _, rules, _ = ift.wide_search(abstract, c.sparsity, call, layers)
        return IFTPlan(scale_width(name, base, mult), [], rules)
    abstract = nnx.eval_shape(lambda: build_model(name, base, info, nnx.Rngs(0)))
    paths = ift.select(abstract, layers, call)
    rewrite = paths if c.sparsity > 0 and c.family != "wide" else []
    return IFTPlan(base, rewrite, ift.sparsity_rules(c.family, c.sparsity, paths))


class Built(NamedTuple):
    """The builder's output: ``make_model(key)`` (every rewrite applied) and ``tx``."""

    make_model: Callable[[jax.Array], nnx.Module]
    tx: SparseTransformation
    plan: IFTPlan


def build(config, info: DataInfo, tx=None) -> Built:
    """Model maker and sparsity transform for ``config``: the one place a model is rewritten.

    ``tx`` overrides the configured transform (a ``SparseTransformation`` or any plain
    optax transformation, wrapped in ``sparsejax.dense``); otherwise Sparse-IFT's rules,
    when it is on, replace ``config.method.rules``. A model with ``stacked_paths`` (a
    scanned ``DecoderLM``) hands them to the transform, so that each layer slice of a
    stacked kernel is sparsified as its own layer (``make_transform``).

    Example:

        >>> import jax
        >>> from configs import quickstart
        >>> from sparsejax.train.build import build
        >>> from sparsejax.train.data import DataInfo
        >>> config = quickstart.get_config('rigl,0.9,tiny')
        >>> config.model.hidden = (32,)                 # config.model: MLP's arguments
        >>> built = build(config, DataInfo('classification', (8, 8, 1), 10))
        >>> model = built.make_model(jax.random.key(0))
        >>> [l.kernel.shape for l in model.layers], model.head.kernel.shape, built.plan.rules
        ([(64, 32)], (32, 10), None)
    """
    plan = sparse_ift_plan(config, info)
    model_kwargs(config.model_name, plan.model, info)  # a bad key fails here, not in the loop
    c = config.ift

    def make_model(key) -> nnx.Module:
        model = build_model(config.model_name, plan.model, info, nnx.Rngs(params=key))
        if plan.paths:  # Sparse Parallel / Factorized / Doped: rewrite the selected layers
            ift.transform(model, c.family, c.sparsity, [re.escape(p) for p in plan.paths],
                          norm=c.norm or None, sigma=c.sigma,
                          rngs=nnx.Rngs(params=jax.random.fold_in(key, 1)))
        return model

    if tx is None:  # a scanned model's stacked layers are selected slice by slice
        stacked = getattr(nnx.eval_shape(lambda: make_model(jax.random.key(0))),
                          "stacked_paths", ())
        tx = make_transform(config, plan.rules, stacked)
    return Built(make_model, as_sparse_transformation(tx), plan)


__all__ = ["Built", "IFTPlan", "build", "build_model", "data_kwargs", "example_call",
           "model_kwargs", "scale_width", "sparse_ift_plan"]
