"""An NNX Linear layer whose kernel is stored N:M-compressed.

``NMLinear`` holds the ``values`` (an ``nnx.Param``, so it can be fine-tuned) and the
uint8 ``indices`` (an ``NMIndices`` variable, not a Param, so optimizers over
``nnx.Param`` leave it alone) of a ``[in, out]`` kernel compressed along its input axis
(``sparsejax.nm.compress_nm(kernel, n, m, axis=0)``), plus an optional bias. Its output
is that of ``nnx.Linear`` with the masked kernel, ``x @ (W ⊙ mask) + b``, computed by
``sparsejax.kernels.nm_matmul.nm_matmul`` (Pallas on a GPU where it applies, else XLA).

Example:

    >>> import jax.numpy as jnp
    >>> import sparsejax
    >>> from flax import nnx
    >>> from sparsejax.models import MLP
    >>> from sparsejax.nn.nm import NMLinear
    >>> model = MLP(8, (16,), 4, rngs=nnx.Rngs(0))
    >>> exported = sparsejax.export_nm(nnx.state(model, nnx.Param), [(r'layers/0/kernel', '2:4')])
    >>> fc1 = exported['layers'][0]
    >>> layer = NMLinear.from_export(fc1['kernel'], bias=fc1['bias'])
    >>> x = jnp.ones((2, 8))
    >>> k, b = model.layers[0].kernel[...], model.layers[0].bias[...]
    >>> y = layer(x)          # == model.layers[0] with its kernel masked 2:4
    >>> y.shape, bool(jnp.allclose(y, x @ (k * sparsejax.nm_mask(k, 2, 4)) + b, atol=1e-5))
    ((2, 16), True)
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

    Example:

        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from sparsejax.nm import compress_nm
        >>> from sparsejax.nn.nm import NMIndices, NMLinear
        >>> layer = NMLinear(compress_nm(jnp.ones((8, 4)), 2, 4, axis=0))
        >>> list(nnx.state(layer, NMIndices).keys()), list(nnx.state(layer, nnx.Param).keys())
        (['indices'], ['values'])
    """


class NMLinear(nnx.Module):
    """``x @ W + b`` with ``W [in, out]`` N:M-compressed along ``in`` (axis 0).

    ``n``, ``m``, ``in_features``, ``out_features`` and ``implementation`` (passed to
    ``nm_matmul``: ``None``, 'pallas', 'xla' or 'reference') are static attributes.
    The output dtype is ``x``'s.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.nm import compress_nm, nm_mask
        >>> from sparsejax.nn.nm import NMLinear
        >>> kernel = jax.random.normal(jax.random.key(0), (16, 8))
        >>> b, x = jnp.arange(8.), jnp.ones((3, 16))
        >>> layer = NMLinear(compress_nm(kernel, 2, 4, axis=0), bias=b)
        >>> (layer.n, layer.m, layer.in_features, layer.out_features), layer.values.shape
        ((2, 4, 16, 8), (4, 2, 8))
        >>> y = layer(x)   # == x @ (kernel ⊙ nm_mask(kernel, 2, 4, axis=0)) + b
        >>> bool(jnp.allclose(y, x @ (kernel * nm_mask(kernel, 2, 4, axis=0)) + b, atol=1e-5))
        True
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

        Example:

            >>> import numpy as np
            >>> import jax.numpy as jnp
            >>> from sparsejax.nm import export_nm
            >>> from sparsejax.nn.nm import NMLinear
            >>> params = {'fc1': {'kernel': jnp.ones((8, 4)), 'bias': jnp.zeros(4)}}
            >>> exported = export_nm(params, [(r'fc1/kernel', '2:4')])
            >>> restored = {'fc1': {k: np.asarray(v) if k == 'bias' else
            ...                     {kk: np.asarray(vv) for kk, vv in v.items()}
            ...                     for k, v in exported['fc1'].items()}}   # as restored
            >>> fc1 = NMLinear.from_export(restored['fc1']['kernel'], restored['fc1']['bias'])
            >>> fc1.n, fc1.m, fc1(jnp.ones((1, 8))).tolist()     # 4 of 8 inputs kept
            (2, 4, [[4.0, 4.0, 4.0, 4.0]])
        """
        return cls(NMCompressed.from_export(leaf), bias, implementation=implementation)

    def compressed(self) -> NMCompressed:
        """The current kernel as an ``NMCompressed`` (values as trained so far).

        Example:

            >>> import jax.numpy as jnp
            >>> from sparsejax.nm import compress_nm, decompress_nm
            >>> from sparsejax.nn.nm import NMLinear
            >>> kernel = jnp.arange(1., 33.).reshape(8, 4)
            >>> layer = NMLinear(compress_nm(kernel, 1, 4, axis=0))
            >>> dense_kernel = decompress_nm(layer.compressed())
            >>> dense_kernel.shape, dense_kernel[:, 0].tolist()   # the largest of each 4 kept
            ((8, 4), [0.0, 0.0, 0.0, 13.0, 0.0, 0.0, 0.0, 29.0])
        """
        return NMCompressed(self.values[...], self.indices[...], self.n, self.m,
                            (self.in_features, self.out_features), 0)

    def to_export(self) -> dict:
        """The kernel's export leaf (``NMCompressed.to_export``), e.g. after fine-tuning.

        Example:

            >>> import jax.numpy as jnp
            >>> from sparsejax.nm import compress_nm
            >>> from sparsejax.nn.nm import NMLinear
            >>> layer = NMLinear(compress_nm(jnp.ones((8, 4)), 2, 4, axis=0))
            >>> layer.values[...] = layer.values[...] * 2          # e.g. after fine-tuning
            >>> leaf = layer.to_export()
            >>> sorted(leaf), leaf['pattern'].tolist(), float(leaf['values'].max())
            (['indices', 'pattern', 'values'], [2, 4, 0], 2.0)
        """
        return self.compressed().to_export()

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return nm_linear_apply(x, self.compressed(), bias, implementation=self.implementation)


__all__ = ["NMIndices", "NMLinear"]
