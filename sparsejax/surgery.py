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
from typing import Any, Callable, NamedTuple, Sequence

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


class Call(NamedTuple):
    """One call of a submodule during a forward pass: its path, inputs and output."""

    path: str
    args: tuple
    out: Any


def trace_calls(model: nnx.Module, *args, kinds: tuple, abstract: bool = False) -> list[Call]:
    """Every call of a submodule of one of ``kinds`` during ``model(*args)``, in call order.

    The model's code is untouched: the classes' ``__call__`` is wrapped for the duration.
    ``abstract=True`` evaluates a merged copy with ``jax.eval_shape`` (nothing is computed,
    stateful layers such as BatchNorm are not mutated) and records shapes
    (``jax.ShapeDtypeStruct``) instead of arrays.

    Example::

        [c.path for c in trace_calls(model, x, kinds=(nnx.Linear,), abstract=True)]
    """
    kinds = tuple(kinds)
    originals = {cls: cls.__call__ for cls in kinds}
    paths: dict[int, str] = {}
    calls: list[Call] = []
    shapes = lambda tree: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),  # noqa: E731
                                       tree)

    def recording(cls):
        def call(self, *a, **kw):
            out = originals[cls](self, *a, **kw)
            if id(self) in paths:
                calls.append(Call(paths[id(self)], shapes(a) if abstract else a,
                                  shapes(out) if abstract else out))
            return out
        return call

    def run(state, *args):
        copy = nnx.merge(graphdef, state)
        paths.update({id(m): p for p, m in named_modules(copy) if isinstance(m, kinds)})
        return copy(*args)

    try:
        for cls in kinds:
            cls.__call__ = recording(cls)
        if abstract:
            graphdef, state = nnx.split(model)
            jax.eval_shape(run, state, *args)
        else:
            paths.update({id(m): p for p, m in named_modules(model) if isinstance(m, kinds)})
            model(*args)
    finally:
        for cls, fn in originals.items():
            cls.__call__ = fn
    return calls


def call_order(model: nnx.Module, *example_args, kinds=(nnx.Linear, nnx.Conv)) -> list[str]:
    """Paths of the ``kinds`` modules in the order a forward pass calls them (abstractly
    evaluated, so nothing is computed). The first is the stem, the last the head.

    Example::

        call_order(model, jnp.ones((1, 32, 32, 3)))   # ['stem', 'blocks/0/conv1', …, 'head']
    """
    calls = trace_calls(model, *example_args, kinds=kinds, abstract=True)
    return list(dict.fromkeys(c.path for c in calls))


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
    if not any(isinstance(m, kinds) for _, m in named_modules(model)):
        raise ValueError(f"no activation module of kinds {[k.__name__ for k in kinds]} in the model")
    seen = {c.path: float(jax.numpy.mean(c.out != 0))
            for c in trace_calls(model, *args, kinds=kinds)}   # a module called twice: last call
    return dict(sorted(seen.items()))
