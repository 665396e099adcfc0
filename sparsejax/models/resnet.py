"""A small CIFAR-style ResNet (He et al. 2016, the 6n+2 family) with BatchNorm.

Three stages of basic blocks with widths ``(16, 32, 64) × width``; ``depth = 6n+2``.
The stem (first conv) and the head are the layers sparse recipes keep dense.

Example::

    model = ResNet(depth=8, width=1, num_classes=10, in_channels=3, rngs=nnx.Rngs(0))
    logits = model(jnp.ones((2, 32, 32, 3)))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.nn.layers import Activation


class BasicBlock(nnx.Module):
    """Two 3×3 convs with BatchNorm and a projection shortcut when the shape changes.

    Example::

        BasicBlock(16, 32, stride=2, rngs=nnx.Rngs(0))(jnp.ones((1, 8, 8, 16))).shape
    """

    def __init__(self, c_in: int, c_out: int, *, stride: int, activation: str = "relu",
                 rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), strides=stride, use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c_out, rngs=rngs)
        self.act = Activation(activation)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c_out, rngs=rngs)
        if stride != 1 or c_in != c_out:
            self.proj = nnx.Conv(c_in, c_out, (1, 1), strides=stride, use_bias=False, rngs=rngs)
            self.proj_bn = nnx.BatchNorm(c_out, rngs=rngs)
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.act(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = x if self.proj is None else self.proj_bn(self.proj(x))
        return self.act(y + shortcut)


class ResNet(nnx.Module):
    """CIFAR ResNet-(6n+2): stem conv, three stages of n basic blocks, pool, head.

    Example::

        ResNet(depth=20, width=1, num_classes=10, rngs=nnx.Rngs(0))
    """

    def __init__(self, depth: int = 20, width: float = 1, num_classes: int = 10, *,
                 in_channels: int = 3, activation: str = "relu", rngs: nnx.Rngs):
        if (depth - 2) % 6 or depth < 8:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        widths = [max(1, round(c * width)) for c in (16, 32, 64)]  # float width: Sparse Wide
        self.stem = nnx.Conv(in_channels, widths[0], (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(widths[0], rngs=rngs)
        self.act = Activation(activation)
        blocks, c_in = [], widths[0]
        for stage, c_out in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(c_in, c_out, stride=stride, activation=activation,
                                         rngs=rngs))
                c_in = c_out
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(c_in, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.act(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(jnp.mean(x, axis=(1, 2)))
