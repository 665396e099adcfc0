"""Reference NNX models and ``build_model``, which makes one from a config and the data.

Example::

    info = DataInfo(task='classification', input_shape=(8, 8, 1), num_classes=10)
    model = build_model(ml_collections.ConfigDict({'name': 'mlp', 'hidden': (64,)}),
                        info, nnx.Rngs(0))
"""

from __future__ import annotations

from typing import NamedTuple

from flax import nnx

from sparsejax.models.layers import ACTIVATIONS, ATTENTIONS, FFNS, Activation, Attention, Block, FFN
from sparsejax.models.lm import DecoderLM
from sparsejax.models.mlp import MLP
from sparsejax.models.resnet import ResNet
from sparsejax.models.vit import ViT


class DataInfo(NamedTuple):
    """What a model needs to know about its data.

    ``task`` is 'classification' (inputs ``[B, *input_shape]``, integer labels) or 'lm'
    (token inputs ``[B, T]``, next-token targets); ``num_classes`` is the vocabulary
    size for 'lm'.

    Example::

        DataInfo(task='lm', input_shape=(64,), num_classes=256)
    """

    task: str
    input_shape: tuple
    num_classes: int


def _mlp(cfg, info, rngs):
    in_features = 1
    for d in info.input_shape:
        in_features *= d
    return MLP(in_features, tuple(cfg.get("hidden", (128, 128))), info.num_classes,
               activation=cfg.get("activation", "relu"), rngs=rngs)


def _resnet(cfg, info, rngs):
    return ResNet(depth=cfg.get("depth", 20), width=float(cfg.get("width", 1)),
                  num_classes=info.num_classes, in_channels=info.input_shape[-1],
                  activation=cfg.get("activation", "relu"), rngs=rngs)


# Model-config keys read by each attention (module keyword: config key).
_ATTENTION_KEYS = {
    "dense": {},
    "spark": {"k": "attn_k"},
    "sparse": {"pattern": "attn_pattern", "block_size": "attn_block", "window": "attn_window",
               "sinks": "attn_sinks", "stride": "attn_stride", "keep": "attn_keep",
               "k": "attn_k"},
}


def _transformer_kwargs(cfg):
    # ffn: 'dense', or activation-sparse 'topk' / 'stopk' / 'spark' (density ffn_density);
    # attention: 'dense', 'spark' (about attn_k keys per query) or block-sparse 'sparse'
    # (attn_pattern full|window|strided|gated|spark on attn_block-sized blocks).
    ffn, attention = cfg.get("ffn", "dense"), cfg.get("attention", "dense")
    keys = _ATTENTION_KEYS.get(attention, {})
    return dict(d_model=cfg.get("d_model", 64), num_heads=cfg.get("num_heads", 4),
                num_layers=cfg.get("num_layers", 2), d_ff=cfg.get("d_ff", 256),
                activation=cfg.get("activation", "gelu"), attention=attention, ffn=ffn,
                ffn_options={} if ffn == "dense" else {"density": cfg.get("ffn_density", 0.08)},
                attention_options={opt: cfg[key] for opt, key in keys.items() if key in cfg})


def _vit(cfg, info, rngs):
    h, w, c = info.input_shape
    if h != w:
        raise ValueError(f"ViT expects square images, got {h}x{w}")
    return ViT(image_size=h, patch_size=cfg.get("patch_size", 4), in_channels=c,
               num_classes=info.num_classes, rngs=rngs, **_transformer_kwargs(cfg))


def _lm(cfg, info, rngs):
    return DecoderLM(vocab_size=info.num_classes, max_len=info.input_shape[0], rngs=rngs,
                     **_transformer_kwargs(cfg))


def scale_width(cfg, multiplier: float):
    """A copy of a model config with every width × ``multiplier`` (Sparse Wide).

    MLP hidden widths; ResNet ``width``; ViT/LM ``d_ff`` and ``d_model`` (kept a multiple
    of ``num_heads``).

    Example::

        scale_width(ConfigDict({'name': 'mlp', 'hidden': (256, 256)}), 2.0).hidden  # (512, 512)
    """
    import ml_collections

    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)  # fresh types: width may turn float
    if d["name"] == "mlp":
        d["hidden"] = tuple(max(1, round(h * multiplier)) for h in d.get("hidden", (128, 128)))
    elif d["name"] == "resnet":
        d["width"] = float(d.get("width", 1)) * multiplier
    else:
        heads = d.get("num_heads", 4)
        d["d_model"] = max(heads, heads * round(d.get("d_model", 64) * multiplier / heads))
        d["d_ff"] = max(1, round(d.get("d_ff", 256) * multiplier))
    return ml_collections.ConfigDict(d)


MODELS = {"mlp": _mlp, "resnet": _resnet, "vit": _vit, "lm": _lm}
_TASKS = {"mlp": "classification", "resnet": "classification", "vit": "classification",
          "lm": "lm"}


def build_model(cfg, info: DataInfo, rngs: nnx.Rngs) -> nnx.Module:
    """Builds the reference model named ``cfg.name`` for data described by ``info``.

    Example::

        build_model(ConfigDict({'name': 'vit', 'patch_size': 2}),
                    DataInfo('classification', (8, 8, 1), 10), nnx.Rngs(0))
    """
    name = cfg.name
    if name not in MODELS:
        raise ValueError(f"config.model.name: unknown model {name!r}; known: {sorted(MODELS)}")
    if _TASKS[name] != info.task:
        raise ValueError(f"config.model.name={name!r} is a {_TASKS[name]} model, but the "
                         f"dataset is a {info.task!r} task")
    return MODELS[name](cfg, info, rngs)


# Activation-sparse FFNs, Spark and block-sparse attention register in FFNS and ATTENTIONS.
from sparsejax.nn import spark as _spark  # noqa: E402,F401
from sparsejax.nn import sparse_attention as _sparse_attention  # noqa: E402,F401

__all__ = ["ACTIVATIONS", "ATTENTIONS", "FFNS", "Activation", "Attention", "Block",
           "DataInfo", "DecoderLM", "FFN", "MLP", "MODELS", "ResNet", "ViT", "build_model",
           "scale_width"]
