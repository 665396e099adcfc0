"""An NNX Linear layer whose kernel is stored N:M-compressed.

``NMLinear`` holds the ``values`` (an ``nnx.Param``, so it can be fine-tuned) and the
uint8 ``indices`` (an ``NMIndices`` variable, not a Param, so optimizers over
``nnx.Param`` leave it alone) of a ``[in, out]`` kernel compressed along its input axis
(``sparsejax.nm.compress_nm(kernel, n, m, axis=0)``), plus an optional bias. Its output
is that of ``nnx.Linear`` with the masked kernel, ``x @ (W ⊙ mask) + b``, computed by
``sparsejax.kernels.nm_matmul.nm_matmul`` (Pallas on a GPU where it applies, else XLA).

Example::

    exported = sparsejax.export_nm(nnx.state(model, nnx.Param), [(r'fc1/kernel', '2:4')])
    layer = NMLinear.from_export(exported['fc1']['kernel'], bias=exported['fc1']['bias'])
    y = layer(x)          # == model.fc1 with its kernel masked 2:4
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.kernels.nm_matmul import IMPLEMENTATIONS, nm_linear_apply
from sparsejax.nm import NMCompressed


class NMIndices(nnx.Variable):
    """The uint8 offsets of the kept entries of an N:M-compressed kernel: state, but not
    an ``nnx.Param``, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` does not train it.

    Example::

        nnx.state(layer, NMIndices)   # {'indices': NMIndices(...)}
    """


class NMLinear(nnx.Module):
    """``x @ W + b`` with ``W [in, out]`` N:M-compressed along ``in`` (axis 0).

    ``n``, ``m``, ``in_features``, ``out_features`` and ``implementation`` (passed to
    ``nm_matmul``: ``None``, 'pallas', 'xla' or 'reference') are static attributes.
    The output dtype is ``x``'s.

    Example::

        layer = NMLinear(compress_nm(kernel, 2, 4, axis=0), bias=b)
        y = layer(x)   # == x @ (kernel ⊙ nm_mask(kernel, 2, 4, axis=0)) + b
    """

    def __init__(self, c: NMCompressed, bias: jax.Array | None = None, *,
                 implementation: str | None = None):
        shape = tuple(int(s) for s in c.shape)
        if len(shape) != 2 or c.axis % len(shape) != 0:
            raise ValueError(f"NMLinear needs a 2-D [in, out] kernel compressed along its input "
                             f"axis 0, got shape {shape} compressed along axis {c.axis}")
        in_features, out_features = shape
        expect = (in_features // c.m, c.n, out_features)
        if (in_features % c.m or tuple(c.values.shape) != expect
                or tuple(c.indices.shape) != expect):
            raise ValueError(f"NMLinear: a {c.n}:{c.m} kernel of shape {shape} needs values "
                             f"and indices of shape {expect}, got {tuple(c.values.shape)} and "
                             f"{tuple(c.indices.shape)}")
        if bias is not None and tuple(np.shape(bias)) != (out_features,):
            raise ValueError(f"NMLinear: bias must have shape ({out_features},), got "
                             f"{tuple(np.shape(bias))}")
        if implementation not in (None,) + IMPLEMENTATIONS:
            raise ValueError(f"unknown implementation {implementation!r}; known: "
                             f"{IMPLEMENTATIONS} or None")
        self.values = nnx.Param(jnp.asarray(c.values))
        self.indices = NMIndices(jnp.asarray(c.indices).astype(jnp.uint8))
        self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
        self.n, self.m = int(c.n), int(c.m)
        self.in_features, self.out_features = in_features, out_features
        self.implementation = implementation

    @classmethod
    def from_export(cls, leaf, bias: jax.Array | None = None, *,
                    implementation: str | None = None) -> NMLinear:
        """The layer for one ``export_nm`` leaf (``{'values', 'indices', 'pattern'}``, also
        as restored from a checkpoint without a target) and the bias of the Linear it
        replaces.

        Example::

            restored = ocp.StandardCheckpointer().restore(path)
            fc1 = NMLinear.from_export(restored['fc1']['kernel'], restored['fc1']['bias'])
        """
        return cls(NMCompressed.from_export(leaf), bias, implementation=implementation)

    def compressed(self) -> NMCompressed:
        """The current kernel as an ``NMCompressed`` (values as trained so far).

        Example::

            dense_kernel = decompress_nm(layer.compressed())
        """
        return NMCompressed(self.values[...], self.indices[...], self.n, self.m,
                            (self.in_features, self.out_features), 0)

    def to_export(self) -> dict:
        """The kernel's export leaf (``NMCompressed.to_export``), e.g. after fine-tuning.

        Example::

            exported['fc1']['kernel'] = layer.to_export()
        """
        return self.compressed().to_export()

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return nm_linear_apply(x, self.compressed(), bias, implementation=self.implementation)


__all__ = ["NMIndices", "NMLinear"]
