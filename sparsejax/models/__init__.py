"""Reference NNX models: MLP, CIFAR ResNet, ViT and a decoder-only LM.

``MODELS`` maps a config's ``model_name`` to the class; ``config.model`` holds exactly
that class's constructor arguments (``sparsejax.train.build.build_model`` adds the ones
the data decides and checks the rest).

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.models import MODELS
    >>> sorted(MODELS)
    ['lm', 'mlp', 'resnet', 'vit']
    >>> model = MODELS['mlp'](64, (32,), 10, rngs=nnx.Rngs(0))
    >>> type(model).__name__, model(jnp.ones((2, 64))).shape
    ('MLP', (2, 10))
"""

from sparsejax.models.blocks import ATTENTIONS, FFNS, block_factory
from sparsejax.models.lm import DecoderLM
from sparsejax.models.mlp import MLP
from sparsejax.models.resnet import ResNet
from sparsejax.models.vit import ViT

MODELS: dict[str, type] = {"mlp": MLP, "resnet": ResNet, "vit": ViT, "lm": DecoderLM}

__all__ = ["ATTENTIONS", "FFNS", "DecoderLM", "MLP", "MODELS", "ResNet", "ViT", "block_factory"]
