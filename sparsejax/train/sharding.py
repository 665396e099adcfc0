"""Meshes from config and parameter shardings from regex path rules.

A parameter's path is its dict keys joined by '/' (``blocks/0/mlp/up/kernel``). Rules
are ``(regex, spec)`` pairs, ``spec`` a tuple of mesh-axis names or ``None`` per
dimension; the first rule whose regex fully matches a path wins, unmatched parameters
are replicated, and a rule that matches no parameter is an error (it is almost always a
typo). Any other pytree whose leaves have a parameter's shape and path suffix (optimizer
moments, masks) is sharded like that parameter.

Example (on one device here, so the mesh is ``(1, 1)``; ``devices`` defaults to all):

    >>> import jax, jax.numpy as jnp
    >>> from sparsejax.train.sharding import make_mesh, param_shardings
    >>> params = {'dense': {'kernel': jnp.ones((4, 8)), 'bias': jnp.zeros(8)}}
    >>> mesh = make_mesh((-1, 1), ('data', 'model'), devices=jax.devices()[:1])
    >>> shardings = param_shardings(params, [(r'.*kernel', (None, 'model'))], mesh)
    >>> shardings['dense']['kernel'].spec, shardings['dense']['bias'].spec   # bias replicated
    (P(None, 'model'), P())
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sparsejax.masks import param_like_paths
from sparsejax.paths import ShardingRule, match_rules, named_leaves, path_str

__all__ = ["Rules", "batch_sharding", "make_mesh", "named_leaves", "param_shardings",
           "path_str", "shardings_like_params"]

Rules = Sequence[ShardingRule]


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
    """A mesh over all devices; one entry of ``shape`` may be -1 (fills the rest).

    Example:

        >>> import jax
        >>> from sparsejax.train.sharding import make_mesh
        >>> mesh = make_mesh((-1,), ('data',))           # data parallel over every device
        >>> mesh.shape['data'] == jax.device_count()
        True
        >>> make_mesh((4, 2), ('data', 'model'), devices=jax.devices()[:1])  # needs 8 devices
        Traceback (most recent call last):
        ...
        ValueError: config.mesh.shape (4, 2) needs 8 devices, but 1 are available
    """
    devices = list(jax.devices() if devices is None else devices)
    shape, axes = tuple(int(s) for s in shape), tuple(axes)
    if len(shape) != len(axes):
        raise ValueError(f"config.mesh: shape {shape} and axes {axes} differ in length")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"config.mesh.shape {shape}: sizes must be positive, with at most "
                         "one -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"config.mesh.shape {shape}: {len(devices)} devices are not "
                             f"divisible by {known}")
        shape = tuple(len(devices) // known if s == -1 else s for s in shape)
    if math.prod(shape) != len(devices):
        raise ValueError(f"config.mesh.shape {shape} needs {math.prod(shape)} devices, but "
                         f"{len(devices)} are available")
    auto = (jax.sharding.AxisType.Auto,) * len(axes)
    return jax.make_mesh(shape, axes, axis_types=auto, devices=devices)


def _spec(path: str, shape, pattern: str, spec, mesh: Mesh) -> P:
    spec = tuple(spec or ())
    if len(spec) > len(shape):
        raise ValueError(f"sharding rule {pattern!r} gives {len(spec)} axes to parameter "
                         f"{path!r} of shape {tuple(shape)}")
    for dim, ax in zip(shape, spec):
        if ax is None:
            continue
        if ax not in mesh.shape:
            raise ValueError(f"sharding rule {pattern!r}: mesh has no axis {ax!r} "
                             f"(axes: {tuple(mesh.shape)})")
        if dim % mesh.shape[ax]:
            raise ValueError(f"sharding rule {pattern!r}: parameter {path!r} dimension {dim} "
                             f"is not divisible by mesh axis {ax!r} of size {mesh.shape[ax]}")
    return P(*spec)


def param_shardings(params, rules: Rules, mesh: Mesh):
    """``NamedSharding`` per parameter from regex rules (first match wins, else replicated).

    Example:

        >>> import jax, jax.numpy as jnp
        >>> from sparsejax.train.sharding import make_mesh, param_shardings
        >>> mesh = make_mesh((1, 1), ('data', 'model'), devices=jax.devices()[:1])
        >>> param_shardings({'w': jnp.ones((4, 8))}, [('w', (None, 'model'))], mesh)['w'].spec
        P(None, 'model')
        >>> param_shardings({'w': jnp.ones((4, 8))}, [('v', (None, 'model'))], mesh)  # a typo
        Traceback (most recent call last):
        ...
        ValueError: sharding rules match no parameter: ['v']; parameter paths look like ['w']
    """
    specs = [P() if pattern is None else _spec(path, np.shape(x), pattern, spec, mesh)
             for path, x, pattern, spec in match_rules(params, rules, "sharding")]
    return jax.tree_util.tree_unflatten(jax.tree.structure(params),
                                        [NamedSharding(mesh, s) for s in specs])


def shardings_like_params(tree, params, shardings, mesh: Mesh):
    """Shardings for any pytree: a leaf whose path ends with a parameter's path and has that
    parameter's shape gets the parameter's sharding; everything else is replicated.

    This is how optimizer moments and masks follow their parameters, with no knowledge
    of the optimizer's state types.

    Example:

        >>> import jax, jax.numpy as jnp
        >>> import optax
        >>> from sparsejax.train.sharding import make_mesh, param_shardings, shardings_like_params
        >>> params, tx = {'w': jnp.ones((4, 8))}, optax.adam(1e-3)
        >>> mesh = make_mesh((1, 1), ('data', 'model'), devices=jax.devices()[:1])
        >>> rules = [('w', (None, 'model'))]
        >>> opt_shardings = shardings_like_params(jax.eval_shape(tx.init, params), params,
        ...                                       param_shardings(params, rules, mesh), mesh)
        >>> [s.spec for s in jax.tree.leaves(opt_shardings)]   # count; mu and nu like w
        [P(), P(None, 'model'), P(None, 'model')]
    """
    by_path = {path: sh for (path, _), sh in zip(named_leaves(params), jax.tree.leaves(shardings))}
    replicated = NamedSharding(mesh, P())
    return jax.tree.map(lambda p: by_path.get(p, replicated), param_like_paths(tree, params))


def batch_sharding(mesh: Mesh, data_axes: Sequence[str] = ("data",)) -> NamedSharding:
    """Leading (batch) dimension split over the data axes present in the mesh.

    Example:

        >>> from sparsejax.train.sharding import batch_sharding, make_mesh
        >>> batch_sharding(make_mesh((-1,), ('data',))).spec
        P('data',)
        >>> batch_sharding(make_mesh((-1,), ('model',))).spec   # no data axis: replicated
        P(None,)
    """
    axes = tuple(a for a in data_axes if a in mesh.shape)
    return NamedSharding(mesh, P(axes if axes else None))
