"""Multi-layer perceptron classifier.

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.models import MLP
    >>> model = MLP(64, (128, 128), 10, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((4, 8, 8, 1))).shape   # inputs are flattened
    (4, 10)
"""

from __future__ import annotations

from typing import Sequence

import jax
from flax import nnx

from sparsejax.base import check_int
from sparsejax.nn.layers import Activation


class MLP(nnx.Module):
    """``Linear → act`` repeated, then a linear head; the input is flattened.
    ``in_features``, ``num_classes`` and every entry of ``hidden`` are positive integers
    (``hidden=()`` is a linear classifier).

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.models import MLP
        >>> MLP(64, (32,), 10, activation='relu', rngs=nnx.Rngs(0))(jnp.ones((2, 64))).shape
        (2, 10)
        >>> model = MLP(64, (32, 16), 10, activation='gelu', rngs=nnx.Rngs(0))
        >>> [l.kernel.shape for l in model.layers], [a.name for a in model.acts]
        ([(64, 32), (32, 16)], ['gelu', 'gelu'])
        >>> MLP(64, (0,), 10, rngs=nnx.Rngs(0))
        Traceback (most recent call last):
            ...
        ValueError: hidden must be positive integers, got (0,)
    """

    def __init__(self, in_features: int, hidden: Sequence[int], num_classes: int, *,
                 activation: str = "relu", rngs: nnx.Rngs):
        check_int(in_features=in_features, hidden=hidden, num_classes=num_classes)
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
