"""Model surgery: find, replace and wrap submodules of any NNX model by path rules.

A module's path is its attribute names and list indices joined by '/', as in the
parameter paths (``blocks/0/mlp/up``). Rules are ``(regex, fn)`` pairs; the first rule
whose regex fully matches a module's path wins, ``fn(path, module)`` returns the
replacement, and a rule that matches no module is an error. The model is edited in
place (NNX modules are mutable) and returned.

Example::

    model = surgery.replace(model, [(r'blocks/\\d+/mlp/act', lambda p, m: TopK(0.08))])
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import jax
from flax import nnx

Rule = tuple[str, Callable[[str, nnx.Module], nnx.Module]]


def module_path(path: tuple) -> str:
    """'/'-joined module path. Example: ``module_path(('blocks', 0, 'mlp'))`` → 'blocks/0/mlp'."""
    return "/".join(str(p) for p in path)


def named_modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``(path, module)`` for every submodule (the root excluded), outer modules first.

    Example::

        [p for p, m in named_modules(model) if isinstance(m, nnx.Linear)]
    """
    found = [(module_path(p), m) for p, m in nnx.iter_modules(model) if p]
    return sorted(found, key=lambda pm: (pm[0].count("/"), pm[0]))


def _set(model: nnx.Module, path: str, new: nnx.Module) -> None:
    parent: object = model
    parts = path.split("/")
    for part in parts[:-1]:
        parent = parent[int(part)] if isinstance(parent, nnx.List) else getattr(parent, part)
    last = parts[-1]
    if isinstance(parent, nnx.List):
        parent[int(last)] = new
    else:
        setattr(parent, last, new)


def replace(model: nnx.Module, rules: Sequence[Rule]) -> nnx.Module:
    """Replaces every module matched by a rule with ``fn(path, module)``; returns ``model``.

    Outer modules are matched first; modules inside a replaced one are not visited.

    Example::

        replace(model, [(r'layers/1', lambda path, lin: MyLayer(lin.in_features, rngs=...))])
    """
    used, todo = set(), []
    modules = named_modules(model)
    for path, module in modules:
        if any(path.startswith(done + "/") for done, _, _ in todo):
            continue
        for i, (pattern, fn) in enumerate(rules):
            if re.fullmatch(pattern, path):
                used.add(i)
                todo.append((path, module, fn))
                break
    unused = [rules[i][0] for i in range(len(rules)) if i not in used]
    if unused:
        raise ValueError(f"surgery rules match no module: {unused}; module paths look like "
                         f"{[p for p, _ in modules[:6]]}")
    for path, module, fn in todo:
        _set(model, path, fn(path, module))
    return model


def call_order(model: nnx.Module, *example_args, kinds=(nnx.Linear, nnx.Conv)) -> list[str]:
    """Paths of the ``kinds`` modules in the order a forward pass calls them (abstractly
    evaluated, so nothing is computed). The first is the stem, the last the head.

    Example::

        call_order(model, jnp.ones((1, 32, 32, 3)))   # ['stem', 'blocks/0/conv1', …, 'head']
    """
    order: list[str] = []
    ids: dict[int, str] = {}
    originals = {cls: cls.__call__ for cls in kinds}

    def recording(cls):
        def call(self, *args, **kwargs):
            if id(self) in ids and ids[id(self)] not in order:
                order.append(ids[id(self)])
            return originals[cls](self, *args, **kwargs)
        return call

    graphdef, state = nnx.split(model)

    def run(state, *args):  # a merged copy, so stateful layers (BatchNorm) can trace
        copy = nnx.merge(graphdef, state)
        ids.update({id(m): p for p, m in named_modules(copy) if isinstance(m, kinds)})
        return copy(*args)

    try:
        for cls in kinds:
            cls.__call__ = recording(cls)
        jax.eval_shape(run, state, *example_args)
    finally:
        for cls, fn in originals.items():
            cls.__call__ = fn
    return order


def activation_sparsity(model: nnx.Module, *args, kinds=None) -> dict[str, float]:
    """Fraction of nonzero outputs of every activation module in one forward pass (the
    Lazy Neuron measurement), by module path; no change to the model's code.

    ``kinds`` defaults to sparsejax's activation modules; pass e.g. ``(MyAct,)`` for a
    foreign model. Runs the model eagerly on ``args``.

    Example::

        activation_sparsity(model, batch)   # {'blocks/0/mlp/act': 0.12, ...}
    """
    if kinds is None:
        from sparsejax.models.layers import Activation

        kinds = (Activation,)
        try:
            from sparsejax.nn.spark import TopKActivation

            kinds = kinds + (TopKActivation,)
        except ImportError:
            pass
    paths = {id(m): p for p, m in named_modules(model) if isinstance(m, kinds)}
    if not paths:
        raise ValueError(f"no activation module of kinds {[k.__name__ for k in kinds]} in the model")
    seen: dict[str, float] = {}
    originals = {cls: cls.__call__ for cls in kinds}

    def recording(cls):
        def call(self, *a, **kw):
            out = originals[cls](self, *a, **kw)
            if id(self) in paths:
                seen[paths[id(self)]] = float(jax.numpy.mean(out != 0))
            return out
        return call

    try:
        for cls in kinds:
            cls.__call__ = recording(cls)
        model(*args)
    finally:
        for cls, fn in originals.items():
            cls.__call__ = fn
    return dict(sorted(seen.items()))
