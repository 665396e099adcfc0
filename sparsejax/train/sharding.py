"""Meshes from config and parameter shardings from regex path rules.

A parameter's path is its dict keys joined by '/' (``blocks/0/mlp/up/kernel``). Rules
are ``(regex, spec)`` pairs, ``spec`` a tuple of mesh-axis names or ``None`` per
dimension; the first rule whose regex fully matches a path wins, unmatched parameters
are replicated, and a rule that matches no parameter is an error (it is almost always a
typo). Any other pytree whose leaves have a parameter's shape and path suffix (optimizer
moments, masks) is sharded like that parameter.

Example::

    mesh = make_mesh((-1, 2), ('data', 'model'))
    shardings = param_shardings(params, [(r'.*kernel', (None, 'model'))], mesh)
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

Rules = Sequence[tuple[str, Sequence[str | None] | None]]


def path_str(path) -> str:
    """'/'-joined key path of a pytree leaf, e.g. ``layers/0/kernel``.

    Example::

        [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({'a': {'b': 1}})[0]]
        # ['a/b']
    """
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def named_leaves(tree) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of a pytree, paths as in ``path_str``.

    Example::

        named_leaves({'w': 1, 'b': {'c': 2}})   # [('b/c', 2), ('w', 1)]
    """
    return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def make_mesh(shape: Sequence[int], axes: Sequence[str], devices=None) -> Mesh:
    """A mesh over all devices; one entry of ``shape`` may be -1 (fills the rest).

    Example::

        make_mesh((-1,), ('data',))           # data parallel over every device
        make_mesh((4, 2), ('data', 'model'))  # needs exactly 8 devices
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


def _spec_for(path: str, shape, rules: Rules, mesh: Mesh, used: set[int]) -> P:
    for i, (pattern, spec) in enumerate(rules):
        if re.fullmatch(pattern, path):
            used.add(i)
            spec = tuple(spec or ())
            if len(spec) > len(shape):
                raise ValueError(f"sharding rule {pattern!r} gives {len(spec)} axes to "
                                 f"parameter {path!r} of shape {tuple(shape)}")
            for dim, ax in zip(shape, spec):
                if ax is None:
                    continue
                if ax not in mesh.shape:
                    raise ValueError(f"sharding rule {pattern!r}: mesh has no axis {ax!r} "
                                     f"(axes: {tuple(mesh.shape)})")
                if dim % mesh.shape[ax]:
                    raise ValueError(f"sharding rule {pattern!r}: parameter {path!r} dimension "
                                     f"{dim} is not divisible by mesh axis {ax!r} of size "
                                     f"{mesh.shape[ax]}")
            return P(*spec)
    return P()


def param_shardings(params, rules: Rules, mesh: Mesh):
    """``NamedSharding`` per parameter from regex rules (first match wins, else replicated).

    Example::

        param_shardings({'w': jnp.ones((4, 8))}, [('w', (None, 'model'))], mesh)
    """
    used: set[int] = set()
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = [NamedSharding(mesh, _spec_for(path_str(p), x.shape, rules, mesh, used))
           for p, x in flat]
    unused = [rules[i][0] for i in range(len(rules)) if i not in used]
    if unused:
        raise ValueError(f"sharding rules match no parameter: {unused}; parameter paths "
                         f"look like {[path_str(p) for p, _ in flat[:4]]}")
    return jax.tree_util.tree_unflatten(treedef, out)


def shardings_like_params(tree, params, shardings, mesh: Mesh):
    """Shardings for any pytree: a leaf whose path ends with a parameter's path and has that
    parameter's shape gets the parameter's sharding; everything else is replicated.

    This is how optimizer moments and masks follow their parameters, with no knowledge
    of the optimizer's state types.

    Example::

        opt_shardings = shardings_like_params(jax.eval_shape(tx.init, params), params,
                                              param_shardings(params, rules, mesh), mesh)
    """
    by_path = {path_str(p): (x.shape, s) for (p, x), s in zip(
        jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(shardings))}
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        name = path_str(path)
        shape = getattr(leaf, "shape", ())
        parts = name.split("/")
        for i in range(len(parts)):  # longest suffix first
            hit = by_path.get("/".join(parts[i:]))
            if hit is not None and tuple(hit[0]) == tuple(shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh, data_axes: Sequence[str] = ("data",)) -> NamedSharding:
    """Leading (batch) dimension split over the data axes present in the mesh.

    Example::

        batch_sharding(make_mesh((-1,), ('data',)))   # P('data')
    """
    axes = tuple(a for a in data_axes if a in mesh.shape)
    return NamedSharding(mesh, P(axes if axes else None))
