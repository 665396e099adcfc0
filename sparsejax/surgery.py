"""Model surgery: find, replace and wrap submodules of any NNX model by path rules.

A module's path is its attribute names and list indices joined by '/', as in the
parameter paths (``blocks/0/mlp/up``). Rules are ``(regex, fn)`` pairs; the first rule
whose regex fully matches a module's path wins, ``fn(path, module)`` returns the
replacement, and a rule that matches no module is an error. The model is edited in
place (NNX modules are mutable) and returned.

Everything that runs the model takes a *call*, ``call(model) -> output``, instead of an
example input, so any signature works: ``call=lambda m: m(tokens, positions)``,
``call=lambda m: m(x, nnx.Rngs(0))`` (Dropout in train mode). The call runs on a copy
(``nnx.split`` then ``nnx.merge``), so the model itself is never changed: BatchNorm
statistics and the model's own RNG counts stay as they are. Create per-call objects such
as ``nnx.Rngs`` inside the call: an abstract evaluation (``jax.eval_shape``) cannot
update an object made outside it.

Example:

    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from sparsejax import surgery
    >>> from sparsejax.models import DecoderLM
    >>> from sparsejax.nn import TopKActivation
    >>> model = DecoderLM(vocab_size=16, max_len=8, d_model=8, num_heads=2, num_layers=2,
    ...                   d_ff=16, rngs=nnx.Rngs(0))
    >>> model = surgery.replace(model, [(r'blocks/\\d+/mlp/act',
    ...                                  lambda p, m: TopKActivation('relu', density=0.25))])
    >>> type(model.blocks[1].mlp.act).__name__
    'TopKActivation'
    >>> surgery.stem_and_head(model, lambda m: m(jnp.zeros((1, 8), jnp.int32)))
    ('embed', 'head')
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import errors as flax_errors
from flax import nnx

from sparsejax import paths as P
from sparsejax.nn.layers import Activation
from sparsejax.nn.spark import TopKActivation

Rule = tuple[str, Callable[[str, nnx.Module], nnx.Module]]
"""``(regex over module paths, fn(path, module) -> module)``."""

ModelCall = Callable[[nnx.Module], Any]
"""``call(model) -> output``: how to run a model, e.g. ``lambda m: m(x)``."""

OUTSIDE_OBJECT_HINT = (
    "call(model) changed an NNX object created outside the call (an nnx.Rngs, most often) "
    "while the model was evaluated abstractly; create it inside the call, e.g. "
    "call=lambda m: m(x, rngs=nnx.Rngs(0))")
"""The message for a call that mutates an object from outside an abstract evaluation."""

_MISSING = object()


def module_path(path: tuple) -> str:
    """'/'-joined module path. Example: ``module_path(('blocks', 0, 'mlp'))`` → 'blocks/0/mlp'."""
    return "/".join(str(p) for p in path)


def named_modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
    """``(path, module)`` for every submodule (the root excluded), outer modules first.

    Example:

        >>> from flax import nnx
        >>> from sparsejax.models import MLP
        >>> from sparsejax.surgery import named_modules
        >>> model = MLP(8, (16, 16), 4, rngs=nnx.Rngs(0))
        >>> [p for p, m in named_modules(model) if isinstance(m, nnx.Linear)]
        ['head', 'layers/0', 'layers/1']
    """
    found = [(module_path(p), m) for p, m in nnx.iter_modules(model) if p]
    return sorted(found, key=lambda pm: (pm[0].count("/"), pm[0]))


def _child(parent, part: str):
    if isinstance(parent, (nnx.List, list, tuple)):
        return parent[int(part)]
    if isinstance(parent, (nnx.Dict, dict)):
        return parent[part]
    return getattr(parent, part)


def _set(model: nnx.Module, path: str, new: nnx.Module) -> None:
    parent: object = model
    parts = path.split("/")
    for part in parts[:-1]:
        parent = _child(parent, part)
    last = parts[-1]
    if isinstance(parent, (nnx.List, list)):
        parent[int(last)] = new
    elif isinstance(parent, (nnx.Dict, dict)):
        parent[last] = new
    else:
        setattr(parent, last, new)


def _matches(model: nnx.Module, rules: Sequence[Rule], what: str, *,
             skip_inside: bool) -> list[tuple[str, nnx.Module, Callable]]:
    """``(path, module, fn)`` of the first rule matching each module; ``skip_inside``
    leaves out modules inside an already matched one. A rule matching nothing raises."""
    used, todo = set(), []
    modules = named_modules(model)
    for path, module in modules:
        if skip_inside and any(path.startswith(done + "/") for done, _, _ in todo):
            continue
        for i, (pattern, fn) in enumerate(rules):
            if re.fullmatch(pattern, path):
                used.add(i)
                todo.append((path, module, fn))
                break
    unused = [rules[i][0] for i in range(len(rules)) if i not in used]
    if unused:
        raise ValueError(f"{what} rules match no module: {unused}; module paths look like "
                         f"{[p for p, _ in modules[:6]]}")
    return todo


def replace(model: nnx.Module, rules: Sequence[Rule]) -> nnx.Module:
    """Replaces every module matched by a rule with ``fn(path, module)``; returns ``model``.

    Outer modules are matched first; modules inside a replaced one are not visited.

    Example:

        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> from sparsejax.models import MLP
        >>> from sparsejax.surgery import replace
        >>> model = MLP(8, (16, 16), 4, rngs=nnx.Rngs(0))
        >>> model = replace(model, [(r'layers/1', lambda path, lin: nnx.Linear(
        ...     lin.in_features, 32, rngs=nnx.Rngs(1)))])
        >>> model.layers[1].kernel.shape
        (16, 32)
    """
    for path, module, fn in _matches(model, rules, "surgery", skip_inside=True):
        _set(model, path, fn(path, module))
    return model


# ----------------------------------------------------------------------------- tracing


class Call(NamedTuple):
    """One call of a submodule during a forward pass: its path, positional inputs and output."""

    path: str
    args: tuple
    out: Any


def check_call(call) -> None:
    """Raises a clear TypeError unless ``call`` is a function ``call(model) -> output``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.surgery import check_call
        >>> x = jnp.ones((2, 8))
        >>> check_call(lambda m: m(x))   # fine
        >>> check_call(x)
        Traceback (most recent call last):
        ...
        TypeError: call must be a function call(model) -> output, e.g. call=lambda m: m(x); got ...
    """
    if not callable(call) or isinstance(call, (jax.Array, np.ndarray)):
        raise TypeError(f"call must be a function call(model) -> output, e.g. "
                        f"call=lambda m: m(x); got {type(call).__name__}")


def _shapes(tree):
    def shape(a):
        if hasattr(a, "shape") and hasattr(a, "dtype"):
            return jax.ShapeDtypeStruct(a.shape, a.dtype)
        return a
    return jax.tree.map(shape, tree)


def _record(model: nnx.Module, call: ModelCall, targets, select, abstract: bool) -> list[Call]:
    """Calls of the methods ``targets`` (``(class, method name)`` pairs) on the modules
    ``select(path, module)`` picks, while ``call`` runs a copy of ``model``; in order of
    entry. A module's calls from inside its own recorded call are not recorded again, so
    a module with an attached activation (``attach``) records the activation's output."""
    check_call(call)
    # a module with an attached activation returns the activation's output
    targets = list(dict.fromkeys([*targets, *[(sub, name) for cls, name in targets
                                              for sub in _ATTACHED.values()
                                              if name == "__call__" and issubclass(sub, cls)]]))
    originals = {t: getattr(*t) for t in targets}
    saved = {t: t[0].__dict__.get(t[1], _MISSING) for t in targets}
    paths: dict[int, str] = {}
    active: set[int] = set()
    entries: list[list] = []

    def recording(target):
        fn = originals[target]

        @functools.wraps(fn)
        def method(self, *a, **kw):
            path = paths.get(id(self))
            if path is None or id(self) in active:
                return fn(self, *a, **kw)
            entry = [path, _shapes(a) if abstract else a, None]
            entries.append(entry)
            active.add(id(self))
            try:
                out = fn(self, *a, **kw)
            finally:
                active.discard(id(self))
            entry[2] = _shapes(out) if abstract else out
            return out
        return method

    graphdef, state = nnx.split(model)

    def run(state):
        copy = nnx.merge(graphdef, state, copy=True)
        paths.update({id(m): p for p, m in named_modules(copy) if select(p, m)})
        call(copy)

    try:
        for target in targets:
            setattr(*target, recording(target))
        if abstract:
            try:
                jax.eval_shape(run, state)
            except flax_errors.TraceContextError as e:
                raise ValueError(OUTSIDE_OBJECT_HINT) from e
        else:
            run(state)
    finally:
        for (cls, name), old in saved.items():
            if old is _MISSING:
                delattr(cls, name)
            else:
                setattr(cls, name, old)
    return [Call(*e) for e in entries]


def trace_calls(model: nnx.Module, call: ModelCall, *, kinds: tuple,
                abstract: bool = False) -> list[Call]:
    """Every call of a submodule of one of ``kinds`` while ``call(model)`` runs, in call
    order (a module called from inside its own call is recorded once).

    The model's code is untouched: the classes' ``__call__`` is wrapped for the duration,
    and ``call`` runs on a merged copy, so the model is not mutated. A module with an
    attached activation (``attach``) records its output after the activation. ``abstract=True``
    evaluates with ``jax.eval_shape`` (nothing is computed) and records shapes
    (``jax.ShapeDtypeStruct``) instead of arrays.

    Example:

        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> from sparsejax.models import MLP
        >>> from sparsejax.surgery import trace_calls
        >>> model, x = MLP(8, (16,), 4, rngs=nnx.Rngs(0)), jnp.ones((2, 8))
        >>> calls = trace_calls(model, lambda m: m(x), kinds=(nnx.Linear,), abstract=True)
        >>> [(c.path, c.out.shape) for c in calls]
        [('layers/0', (2, 16)), ('head', (2, 4))]
    """
    kinds = tuple(kinds)
    return _record(model, call, [(k, "__call__") for k in kinds],
                   lambda p, m: isinstance(m, kinds), abstract)


def call_order(model: nnx.Module, call: ModelCall, *,
               kinds: tuple = (nnx.Linear, nnx.Conv)) -> list[str]:
    """Paths of the ``kinds`` modules in the order ``call(model)`` first calls them
    (abstractly evaluated, so nothing is computed).

    Example:

        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> from sparsejax.models import MLP
        >>> from sparsejax.surgery import call_order
        >>> model = MLP(8, (16, 16), 4, rngs=nnx.Rngs(0))
        >>> call_order(model, lambda m: m(jnp.ones((2, 8))))
        ['layers/0', 'layers/1', 'head']
    """
    calls = trace_calls(model, call, kinds=kinds, abstract=True)
    return list(dict.fromkeys(c.path for c in calls))


# ----------------------------------------------------------------------------- stem and head


def _ndim(variable) -> int:
    return len(getattr(variable.get_value(), "shape", ()))


def holds_weights(module: nnx.Module) -> bool:
    """Whether ``module`` itself (not a submodule) holds an ``nnx.Param`` with two or more
    dims: ``nnx.Linear``, ``nnx.Conv``, ``nnx.Einsum``, ``nnx.Embed``, or a user module
    holding a kernel.

    Example:

        >>> from flax import nnx
        >>> from sparsejax.nn.layers import Activation
        >>> from sparsejax.surgery import holds_weights
        >>> holds_weights(nnx.Embed(10, 4, rngs=nnx.Rngs(0))), holds_weights(Activation('relu'))
        (True, False)
    """
    return any(isinstance(v, nnx.Param) and _ndim(v) >= 2 for v in vars(module).values())


def layer_calls(model: nnx.Module, call: ModelCall) -> list[str]:
    """Paths of the layers that hold weights (``holds_weights``), one entry per call, in
    call order; a call of ``nnx.Embed.attend`` (a tied output head) counts as a call of
    its ``nnx.Embed``. Abstractly evaluated on a copy: nothing is computed or changed.

    Example:

        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> from sparsejax.models import DecoderLM
        >>> from sparsejax.surgery import layer_calls
        >>> decoder = DecoderLM(vocab_size=16, max_len=8, d_model=8, num_heads=2, num_layers=1,
        ...                     d_ff=16, rngs=nnx.Rngs(0))
        >>> layer_calls(decoder, lambda m: m(jnp.zeros((1, 8), jnp.int32)))
        ['embed', 'blocks/0/attn/q', 'blocks/0/attn/k', 'blocks/0/attn/v', 'blocks/0/attn/o',
         'blocks/0/mlp/up', 'blocks/0/mlp/down', 'head']
    """
    layers = {p: m for p, m in named_modules(model) if holds_weights(m)}
    targets = [(type(m), "__call__") for m in layers.values()]
    if any(isinstance(m, nnx.Embed) for m in layers.values()):
        targets.append((nnx.Embed, "attend"))
    calls = _record(model, call, targets, lambda p, m: p in layers, abstract=True)
    return [c.path for c in calls]


def stem_and_head(model: nnx.Module, call: ModelCall) -> tuple[str, str]:
    """``(stem, head)``: module paths of the first and the last weight-holding layer
    (``holds_weights``) that ``call(model)`` calls, ``nnx.Embed`` included; a tied head
    (``embed.attend``) is its ``nnx.Embed``, so stem and head may be the same module.

    Example:

        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> from sparsejax.models import MLP
        >>> from sparsejax.surgery import stem_and_head
        >>> stem_and_head(MLP(8, (16, 16), 4, rngs=nnx.Rngs(0)), lambda m: m(jnp.ones((2, 8))))
        ('layers/0', 'head')
        >>> class Tied(nnx.Module):   # the head is the embedding table
        ...     def __init__(self, rngs):
        ...         self.embed = nnx.Embed(10, 4, rngs=rngs)
        ...         self.mid = nnx.Linear(4, 4, rngs=rngs)
        ...     def __call__(self, tokens):
        ...         return self.embed.attend(self.mid(self.embed(tokens)))
        >>> stem_and_head(Tied(nnx.Rngs(0)), lambda m: m(jnp.zeros((1, 3), jnp.int32)))
        ('embed', 'embed')
    """
    order = layer_calls(model, call)
    if not order:
        raise ValueError("call(model) calls no layer holding a parameter with 2 or more dims; "
                         "there is no stem or head")
    return order[0], order[-1]


def _definition_order(model: nnx.Module) -> list[nnx.Module]:
    """Submodules in the order their attributes were assigned (``vars()``), depth first,
    through ``nnx.List``/``nnx.Dict``/list/tuple/dict; each module once."""
    seen, out = set(), []

    def walk(x):
        if isinstance(x, nnx.Module):
            if id(x) in seen:
                return
            seen.add(id(x))
            out.append(x)
            for name, v in vars(x).items():
                if not name.startswith("_pytree__"):
                    walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(model)
    return out[1:]


def _defined_stem_and_head(model: nnx.Module) -> tuple[str, str]:
    where = {id(m): p for p, m in reversed(named_modules(model))}
    layers = [where[id(m)] for m in _definition_order(model) if id(m) in where and holds_weights(m)]
    if not layers:
        raise ValueError("the model has no layer holding a parameter with 2 or more dims")
    return layers[0], layers[-1]


def default_rules(model: nnx.Module, call: ModelCall | None = None) -> list[P.Rule]:
    """The default sparsity rules, as ``sparsejax.paths`` ``(pattern, spec)`` rules: every
    kernel with two or more dims sparse (``paths.is_kernel``), embedding tables dense, and
    the stem's and the head's kernels dense (RigL keeps the first layer dense; RigL and
    JaxPruner keep the output head dense).

    The stem and head are the first and last weight-holding layers (``stem_and_head``)
    that ``call(model)`` calls. Without a call they are guessed from the definition order:
    the first and last such layer in the order attributes were assigned in ``__init__``
    (``vars()`` of each module, through ``nnx.List``/``nnx.Dict``/lists/dicts). That guess
    cannot see a tied head (``embed.attend``) nor a layer defined out of call order; pass
    a call for those. Returns ``[(re.escape(kernel path), 'dense'), …]`` for the stem's and
    head's kernels (none for an ``nnx.Embed``, whose table is not a kernel), then
    ``paths.DEFAULT_RULES`` when a kernel is left to make sparse.

    Example:

        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> from sparsejax.models import MLP
        >>> from sparsejax.surgery import default_rules
        >>> model = MLP(8, (16, 16), 4, rngs=nnx.Rngs(0))
        >>> default_rules(model, lambda m: m(jnp.ones((2, 8))))
        [('layers/0/kernel', 'dense'), ('head/kernel', 'dense'),
         (<function is_kernel at ...>, 'sparse')]
    """
    stem, head = _defined_stem_and_head(model) if call is None else stem_and_head(model, call)
    leaves = P.named_leaves(nnx.state(model, nnx.Param))
    dense = [path for layer in dict.fromkeys((stem, head)) for path, leaf in leaves
             if path.rsplit("/", 1)[0] == layer and P.is_kernel(path, leaf)]
    rules: list[P.Rule] = [(re.escape(path), "dense") for path in dense]
    if any(P.is_kernel(path, leaf) and path not in dense for path, leaf in leaves):
        rules += list(P.DEFAULT_RULES)
    return rules


# ----------------------------------------------------------------------------- activations

_ATTACHED: dict[type, type] = {}
ATTACHED_NAME = "attached"
"""The attribute that holds a module's attached activation (``surgery.attach``)."""


def _with_activation(cls: type) -> type:
    """The cached subclass of ``cls`` whose ``__call__`` returns
    ``self.attached(cls.__call__(self, ...))``."""
    if cls in _ATTACHED.values():
        return cls
    if cls not in _ATTACHED:
        def __call__(self, *args, **kwargs):
            return getattr(self, ATTACHED_NAME)(super(sub, self).__call__(*args, **kwargs))

        sub = type(cls)(f"{cls.__name__}WithActivation", (cls,), {
            "__call__": __call__, "__module__": __name__,
            "__qualname__": f"{cls.__name__}WithActivation",
            "__doc__": f"{cls.__name__} whose output goes through its ``attached`` module "
                       "(``sparsejax.surgery.attach``)."})
        _ATTACHED[cls] = sub
    return _ATTACHED[cls]


def attach(model: nnx.Module, rules: Sequence[Rule]) -> nnx.Module:
    """Applies an activation module to the output of every module a rule matches, without
    changing any parameter path; returns ``model`` (edited in place).

    For activations a model computes with a plain function (``nnx.relu(self.up(x))``):
    ``fn(path, module)`` returns the activation module, stored as the module's
    ``attached`` attribute, and the module's class becomes a cached subclass whose
    ``__call__`` is ``attached(original __call__(...))``. Every rule must match a module;
    each module takes its first matching rule; attaching again replaces the activation.
    Existing parameter paths are unchanged (an attached module with parameters adds
    its own under ``<path>/attached/``), and ``nnx.split``/``nnx.merge``/``nnx.jit``
    work as before.

    The model's own activation still follows. For ReLU, top-k before it equals top-k
    after it (``relu(topk(h)) = topk(relu(h))``, ReLU is monotone and keeps zeros), so
    ``TopKActivation('relu')`` attached to ``up`` in ``nnx.relu(self.up(x))`` is exactly
    top-k ReLU; a GELU following it maps the dropped units to ``gelu(0) = 0``.

    Example:

        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> from sparsejax.models import MLP
        >>> from sparsejax.nn import TopKActivation
        >>> from sparsejax.surgery import activation_sparsity, attach
        >>> model = MLP(8, (16, 16), 4, rngs=nnx.Rngs(0))
        >>> model = attach(model, [(r'layers/\\d+',
        ...                         lambda p, m: TopKActivation('relu', density=0.25))])
        >>> type(model.layers[0]).__name__, model.layers[0].kernel.shape
        ('LinearWithActivation', (8, 16))
        >>> activation_sparsity(model, lambda m: m(jnp.ones((2, 8))))
        {'acts/0': 0.25, 'acts/1': 0.25, 'layers/0/attached': 0.25, 'layers/1/attached': 0.25}
    """
    for path, module, fn in _matches(model, rules, "attach", skip_inside=False):
        cls = type(module)
        if ATTACHED_NAME in vars(module) and cls not in _ATTACHED.values():
            raise ValueError(f"module {path!r} ({cls.__name__}) already has an attribute "
                             f"{ATTACHED_NAME!r}; attach cannot add an activation to it")
        act = fn(path, module)
        if not callable(act):
            raise TypeError(f"attach rule for {path!r} returned {type(act).__name__}, not a "
                            "callable activation module")
        object.__setattr__(module, "__class__", _with_activation(cls))
        setattr(module, ATTACHED_NAME, act)
    return model


def activation_kinds() -> tuple[type, ...]:
    """sparsejax's activation modules: ``nn.layers.Activation`` and ``nn.TopKActivation``.

    Example:

        >>> from sparsejax.surgery import activation_kinds
        >>> [k.__name__ for k in activation_kinds()]
        ['Activation', 'TopKActivation']
    """
    return (Activation, TopKActivation)


def activation_sparsity(model: nnx.Module, call: ModelCall, *, kinds=None,
                        after: dict[str, Callable] | None = None) -> dict[str, float]:
    """Fraction of nonzero outputs ``mean(a ≠ 0)`` of every activation in one forward pass
    (the Lazy Neuron measurement), by module path; no change to the model or its code.

    ``kinds``: activation module classes (default ``activation_kinds()``, sparsejax's);
    pass e.g. ``(MyAct,)`` for a foreign model. ``after={path: fn}`` measures activations
    computed by plain functions: ``mean(fn(y) ≠ 0)`` with ``y`` the output of the module
    at ``path`` (e.g. ``after={'linear1': nnx.relu}`` for ``nnx.relu(self.linear1(x))``).
    Runs ``call`` eagerly on a copy of the model; a module called more than once reports
    its last call.

    Example:

        >>> from flax import nnx
        >>> import jax.numpy as jnp
        >>> from sparsejax.models import MLP
        >>> from sparsejax.surgery import activation_sparsity
        >>> x = jnp.ones((2, 8))
        >>> activation_sparsity(MLP(8, (16,), 4, rngs=nnx.Rngs(0)), lambda m: m(x))
        {'acts/0': 0.625}
        >>> class Net(nnx.Module):   # relu by a plain function
        ...     def __init__(self, rngs):
        ...         self.up = nnx.Linear(8, 32, rngs=rngs)
        ...         self.down = nnx.Linear(32, 2, rngs=rngs)
        ...     def __call__(self, x):
        ...         return self.down(nnx.relu(self.up(x)))
        >>> activation_sparsity(Net(nnx.Rngs(0)), lambda m: m(x), after={'up': nnx.relu})
        {'up': 0.5}
    """
    kinds = activation_kinds() if kinds is None else tuple(kinds)
    after = dict(after or {})
    modules = dict(named_modules(model))
    missing = [p for p in after if p not in modules]
    if missing:
        raise ValueError(f"after: no module at {missing}; module paths look like "
                         f"{list(modules)[:6]}")
    if not after and not any(isinstance(m, kinds) for m in modules.values()):
        raise ValueError(f"no activation module of kinds {[k.__name__ for k in kinds]} in the "
                         "model; pass after={path: fn} to measure an activation computed by a "
                         "plain function after the module at path")
    targets = [(k, "__call__") for k in kinds] + [(type(modules[p]), "__call__") for p in after]
    calls = _record(model, call, targets,
                    lambda p, m: p in after or isinstance(m, kinds), abstract=False)
    seen = {}
    for c in calls:
        a = after[c.path](c.out) if c.path in after else c.out
        seen[c.path] = float(jnp.mean(a != 0))
    uncalled = [p for p in after if p not in seen]
    if uncalled:
        raise ValueError(f"after: call(model) does not call the modules at {uncalled}")
    return dict(sorted(seen.items()))


__all__ = ["ATTACHED_NAME", "Call", "ModelCall", "OUTSIDE_OBJECT_HINT", "Rule",
           "activation_kinds", "activation_sparsity", "attach", "call_order", "check_call",
           "default_rules", "holds_weights", "layer_calls", "module_path", "named_modules",
           "replace", "stem_and_head", "trace_calls"]
