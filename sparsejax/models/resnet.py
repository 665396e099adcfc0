"""A small CIFAR-style ResNet (He et al. 2016, the 6n+2 family) with BatchNorm.

Three stages of basic blocks with widths ``(16, 32, 64) × width``; ``depth = 6n+2``.
The stem (first conv) and the head are the layers sparse recipes keep dense.

Example:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from sparsejax.models import ResNet
    >>> model = ResNet(depth=8, width=1, num_classes=10, in_channels=3, rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 8, 8, 3))).shape
    (2, 10)
    >>> model.stem.kernel.shape, [b.conv2.kernel.shape[-1] for b in model.blocks]
    ((3, 3, 3, 16), [16, 32, 64])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sparsejax.base import check_int, check_number
from sparsejax.nn.layers import Activation


class BasicBlock(nnx.Module):
    """Two 3×3 convs with BatchNorm and a projection shortcut when the shape changes.

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.models.resnet import BasicBlock
        >>> BasicBlock(16, 32, stride=2, rngs=nnx.Rngs(0))(jnp.ones((1, 8, 8, 16))).shape
        (1, 4, 4, 32)
        >>> BasicBlock(16, 16, stride=1, rngs=nnx.Rngs(0)).proj is None   # identity shortcut
        True
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
    ``depth``, ``num_classes`` and ``in_channels`` are positive integers; ``width``, the
    channel multiplier, a finite number > 0 (channels round to at least 1).

    Example:

        >>> from flax import nnx
        >>> from sparsejax.models import ResNet
        >>> model = ResNet(depth=20, width=1, num_classes=10, rngs=nnx.Rngs(0))
        >>> len(model.blocks), model.head.kernel.shape     # 3 stages of n = 3 blocks
        (9, (64, 10))
        >>> wide = nnx.eval_shape(lambda: ResNet(depth=8, width=2, rngs=nnx.Rngs(0)))  # abstract
        >>> wide.stem.kernel.shape, wide.head.kernel.shape                  # widths × 2
        ((3, 3, 3, 32), (128, 10))
    """

    def __init__(self, depth: int = 20, width: float = 1, num_classes: int = 10, *,
                 in_channels: int = 3, activation: str = "relu", rngs: nnx.Rngs):
        check_int(depth=depth, num_classes=num_classes, in_channels=in_channels)
        check_number("width", width)
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
