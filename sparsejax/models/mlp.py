"""Multi-layer perceptron classifier.

Example::

    model = MLP(64, (128, 128), 10, rngs=nnx.Rngs(0))
    logits = model(jnp.ones((4, 8, 8, 1)))   # inputs are flattened
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from sparsejax.nn.layers import Activation


class MLP(nnx.Module):
    """``Linear → act`` repeated, then a linear head; the input is flattened.

    Example::

        MLP(64, (32,), 10, activation='relu', rngs=nnx.Rngs(0))(jnp.ones((2, 64))).shape
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, *,
                 activation: str = "relu", rngs: nnx.Rngs):
        widths = [in_features, *hidden]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(widths[:-1], widths[1:])]
        )
        # one activation module per layer, so per-layer activation sparsity can be measured
        self.acts = nnx.List([Activation(activation) for _ in hidden])
        self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer, act in zip(self.layers, self.acts):
            x = act(layer(x))
        return self.head(x)
