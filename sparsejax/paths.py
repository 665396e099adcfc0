"""Parameter paths and path rules: the one place where a leaf gets its name.

A parameter's path is its pytree key path joined by '/': dict keys, sequence indices
and attribute names (``layers/0/kernel``). Paths are NNX-aware: the ``value`` child of
an ``nnx.Variable`` is not part of the name, so ``nnx.state(model, nnx.Param)`` (which
``nnx.Optimizer`` gives to ``init``) and its pure arrays (which it gives to ``update``)
name every parameter the same way, as does ``nnx.to_pure_dict``.

A rule is ``(pattern, spec)``. ``pattern`` is a regex that must match the whole path, or
a predicate ``pattern(path, leaf) -> bool``. The first matching rule decides a leaf's
``spec``; a rule that matches no leaf is an error, since it is almost always a typo. What
``spec`` means belongs to the caller (a sparsity, an N:M pattern, a sharding).

Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax.paths import match_rules
    >>> params = {'conv1': {'kernel': jnp.ones((3, 3, 3, 8))},
    ...           'conv2': {'kernel': jnp.ones((3, 3, 8, 8)), 'bias': jnp.zeros(8)}}
    >>> rules = [(r'conv1/kernel', 'dense'), (lambda path, w: w.ndim >= 2, 'sparse')]
    >>> [(p, spec) for p, _, _, spec in match_rules(params, rules, 'sparsity')]
    [('conv1/kernel', 'dense'), ('conv2/bias', None), ('conv2/kernel', 'sparse')]
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Union

import jax
import numpy as np
from flax import nnx

Pattern = Union[str, Callable[[str, Any], bool]]
"""A rule's pattern: a full-match regex over paths, or a predicate ``(path, leaf) -> bool``."""

Rule = tuple[Pattern, Any]
"""``(pattern, spec)``, matched by ``match_rules``; each purpose names its own kind:"""

SparsityRule = tuple[Pattern, Union[str, float]]
"""Which leaves a sparsity transform prunes: ``(pattern, 'sparse' | 'dense' | s | 'N:M')``."""

ShardingRule = tuple[Pattern, tuple]
"""How a parameter lies on the mesh: ``(pattern, per-dimension mesh axes)``."""

LayerPattern = Pattern
"""Which modules a rewrite selects (Sparse-IFT's ``layers``): a pattern over module paths."""


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def unbox(tree):
    """``tree`` with every ``nnx.Variable`` replaced by its value (other leaves unchanged).

    Example:

        >>> from flax import nnx
        >>> from sparsejax.paths import unbox
        >>> boxed = nnx.state(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), nnx.Param)
        >>> type(boxed['kernel']).__name__, isinstance(unbox(boxed)['kernel'], nnx.Variable)
        ('Param', False)
        >>> unbox(boxed)['kernel'].shape   # same paths, plain arrays
        (4, 2)
    """
    return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x, tree,
                        is_leaf=_is_variable)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    """'/'-joined key path, without an ``nnx.Variable``'s trailing ``value``.

    Example:

        >>> import jax
        >>> from sparsejax.paths import path_str
        >>> [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path({'a': {'b': 1}})[0]]
        ['a/b']
    """
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        path = path[:-1]  # the child of an nnx.Variable
    return "/".join(_key_name(k) for k in path)


def named_leaves(tree) -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of a pytree (``nnx.Variable``s unboxed), paths as in ``path_str``.

    Example:

        >>> from sparsejax.paths import named_leaves
        >>> named_leaves({'w': 1, 'b': {'c': 2}})
        [('b/c', 2), ('w', 1)]
    """
    return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(unbox(tree))[0]]


def pattern_name(pattern: Pattern) -> str:
    """How a pattern is shown in messages: the regex itself, or the predicate's name."""
    if isinstance(pattern, str):
        return repr(pattern)
    return getattr(pattern, "__name__", repr(pattern))


def matches(pattern: Pattern, path: str, leaf) -> bool:
    """Whether ``pattern`` (regex, full match; or predicate) selects ``(path, leaf)``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.paths import matches
        >>> w = jnp.ones((4, 4))
        >>> matches(r'.*kernel', 'layers/0/kernel', w), matches(r'kernel', 'layers/0/kernel', w)
        (True, False)
    """
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    if callable(pattern):
        return bool(pattern(path, leaf))
    raise TypeError(f"a rule's pattern is a regex string or a predicate (path, leaf) -> bool, "
                    f"got {type(pattern).__name__}")


def match_rules(tree, rules: Sequence[Rule], kind: str) -> list[tuple[str, Any, Pattern | None, Any]]:
    """``(path, leaf, pattern, spec)`` for every leaf, from the first rule that matches it
    (``pattern`` and ``spec`` are None when none does).

    The one implementation of path rules (sparsity, N:M, sharding). A rule that matches no
    leaf is an error naming the rule and showing what the paths look like; ``kind`` names
    the rules in that error.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.paths import match_rules
        >>> params = {'a': {'kernel': jnp.ones((4, 4)), 'bias': jnp.zeros(4)}}
        >>> [(p, w.shape, pattern, spec)
        ...  for p, w, pattern, spec in match_rules(params, [(r'.*kernel', 'sparse')], 'sparsity')]
        [('a/bias', (4,), None, None), ('a/kernel', (4, 4), '.*kernel', 'sparse')]
    """
    rules = [tuple(r) for r in rules]
    for r in rules:
        if len(r) != 2:
            raise ValueError(f"{kind} rule {r!r} is not a (pattern, spec) pair")
    used, out = set(), []
    leaves = named_leaves(tree)
    for path, leaf in leaves:
        hit = next((i for i, (pattern, _) in enumerate(rules) if matches(pattern, path, leaf)),
                   None)
        if hit is not None:
            used.add(hit)
        out.append((path, leaf) + ((None, None) if hit is None else rules[hit]))
    unused = [r[0] if isinstance(r[0], str) else pattern_name(r[0])
              for i, r in enumerate(rules) if i not in used]
    if unused:
        raise ValueError(f"{kind} rules match no parameter: {unused}; parameter "
                         f"paths look like {[p for p, _ in leaves[:6]]}")
    return out


def is_embedding(path: str, leaf) -> bool:
    """An ``nnx.Embed`` table: the leaf is named ``embedding``.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.paths import is_embedding
        >>> table = jnp.ones((100, 16))
        >>> is_embedding('embed/embedding', table), is_embedding('head/kernel', table)
        (True, False)
    """
    return path.rsplit("/", 1)[-1] == "embedding"


def is_kernel(path: str, leaf) -> bool:
    """A weight matrix or conv/einsum kernel: a leaf named ``kernel`` with two or more dims.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.paths import is_kernel
        >>> is_kernel('linear1/kernel', jnp.ones((64, 32))), is_kernel('linear1/bias', jnp.ones(32))
        (True, False)
    """
    return path.rsplit("/", 1)[-1] == "kernel" and np.ndim(leaf) >= 2


DEFAULT_RULES: tuple[Rule, ...] = ((is_kernel, "sparse"),)
"""What a transform makes sparse when given no rules: every kernel with two or more
dimensions (``nnx.Linear``, ``nnx.Conv``, ``nnx.Einsum``); embedding tables (named
``embedding``), biases and norms stay dense. Parameters alone cannot show which layer is the input stem or the
output head; ``sparsejax.surgery.default_rules(model, call)`` finds them from the model
and keeps them dense too."""


def rules_or_default(rules: Sequence[Rule] | None, tree, kind: str) -> Sequence[Rule]:
    """``rules``, or ``DEFAULT_RULES`` when None; an error naming what to do when the
    default would match nothing (no leaf named ``kernel`` with two or more dims).

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.paths import DEFAULT_RULES, rules_or_default
        >>> params = {'linear': {'kernel': jnp.ones((8, 4)), 'bias': jnp.zeros(4)}}
        >>> rules_or_default(None, params, 'sparsity') is DEFAULT_RULES
        True
    """
    if rules is not None:
        return rules
    leaves = named_leaves(tree)
    if not any(is_kernel(p, x) for p, x in leaves):
        raise ValueError(f"no {kind} rules were given, and the default (every 'kernel' with two "
                         f"or more dims) matches no parameter; parameter paths look like "
                         f"{[p for p, _ in leaves[:6]]}: pass rules=[(regex or predicate "
                         "(path, leaf) -> bool, spec), ...]")
    return DEFAULT_RULES


__all__ = ["DEFAULT_RULES", "Pattern", "Rule", "is_embedding", "is_kernel", "match_rules",
           "LayerPattern", "ShardingRule", "SparsityRule", "matches", "named_leaves", "path_str",
           "pattern_name", "rules_or_default", "unbox"]
