"""Layer-wise sparsity distributions: uniform, Erdős–Rényi (ER) and ER-Kernel (ERK).

Evci et al. 2020 (RigL), Sec. 3 and App. D; Mocanu et al. 2018 (ER). A layer's raw
score is ``p_l = (Σ dims / Π dims) ** power_scale`` over all kernel dimensions (ERK) or
the last two (ER: fan-in and fan-out, no spatial dims). Its density is ``ε·p_l``,
with ``ε`` solved so that ``Σ_l ε·p_l·N_l = (1 − S)·Σ_l N_l``. Any layer with
``ε·p_l > 1`` is made dense and ``ε`` is solved again. Layers with a custom sparsity
are left out of the solve.

Counts are integers that hit the target exactly: ``round((1 − S)·Σ N_l)`` nonzeros
over the solved layers, distributed by largest remainder.

Example:

    >>> from sparsejax.distributions import erk, layer_counts, layer_densities
    >>> shapes = {'l1': (784, 300), 'l2': (300, 10)}
    >>> counts = layer_counts(erk(), shapes, sparsity=0.9)
    >>> sorted(counts.items()), sum(counts.values()) == round(0.1 * (784 * 300 + 300 * 10))
    ([('l1', 20820), ('l2', 3000)], True)
    >>> densities = layer_densities(erk(), shapes, 0.9)
    >>> {k: round(v, 4) for k, v in densities.items()}   # the small layer is made dense
    {'l1': 0.0885, 'l2': 1.0}
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Distribution(NamedTuple):
    """How a global sparsity is split over layers: 'uniform', 'er' or 'erk'.

    Example:

        >>> from sparsejax.distributions import Distribution
        >>> Distribution('erk', power_scale=0.5)
        Distribution(name='erk', power_scale=0.5)
    """

    name: str
    power_scale: float = 1.0


def uniform() -> Distribution:
    """Every layer gets the global sparsity. Example: ``uniform()``."""
    return Distribution("uniform")


def er(power_scale: float = 1.0) -> Distribution:
    """Erdős–Rényi: ``p_l = (n_in + n_out) / (n_in · n_out)``. Example: ``er()``."""
    return Distribution("er", power_scale)


def erk(power_scale: float = 1.0) -> Distribution:
    """ER-Kernel: ``p_l = Σ dims / Π dims`` (spatial dims included). Example: ``erk()``."""
    return Distribution("erk", power_scale)


DISTRIBUTIONS = {"uniform": uniform, "er": er, "erk": erk}


def get_distribution(name: str, power_scale: float = 1.0) -> Distribution:
    """A distribution by name, for configs.

    Example:

        >>> from sparsejax.distributions import get_distribution
        >>> get_distribution('erk', 1.0)
        Distribution(name='erk', power_scale=1.0)
    """
    if name not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {name!r}; known: {sorted(DISTRIBUTIONS)}")
    return uniform() if name == "uniform" else DISTRIBUTIONS[name](power_scale)


def as_distribution(distribution: Distribution | str | None) -> Distribution:
    """A ``Distribution``, a name for ``get_distribution`` ('uniform', 'er', 'erk'), or
    None for uniform.

    Example:

        >>> from sparsejax.distributions import as_distribution, erk
        >>> as_distribution('erk') == erk(), as_distribution(None)
        (True, Distribution(name='uniform', power_scale=1.0))
    """
    if distribution is None:
        return uniform()
    if isinstance(distribution, str):
        return get_distribution(distribution)
    return distribution


def raw_score(dist: Distribution, shape) -> float:
    """The unnormalised density ``p_l`` of a layer with this kernel shape.

    Example:

        >>> from sparsejax.distributions import er, erk, raw_score
        >>> raw_score(erk(), (3, 3, 16, 32)) == (3 + 3 + 16 + 32) / (3 * 3 * 16 * 32)
        True
        >>> raw_score(er(), (3, 3, 16, 32)) == (16 + 32) / (16 * 32)   # no spatial dims
        True
    """
    shape = tuple(int(d) for d in shape)
    if dist.name == "uniform":
        return 1.0
    dims = shape[-2:] if dist.name == "er" else shape
    return (sum(dims) / math.prod(dims)) ** dist.power_scale


def _largest_remainder(ideal: dict[str, float], total: int, caps: dict[str, int]) -> dict[str, int]:
    counts = {k: min(math.floor(v), caps[k]) for k, v in ideal.items()}
    short = total - sum(counts.values())
    order = sorted(ideal, key=lambda k: -(ideal[k] - math.floor(ideal[k])))
    for k in order:
        if short <= 0:
            break
        if counts[k] < caps[k]:
            counts[k] += 1
            short -= 1
    return counts


def layer_counts(dist: Distribution, shapes: dict[str, tuple], sparsity: float,
                 custom: dict[str, float] | None = None) -> dict[str, int]:
    """Exact nonzero count per layer for a global ``sparsity`` over ``shapes``.

    ``custom`` maps a layer to its own sparsity (left out of the solve).

    Example:

        >>> from sparsejax.distributions import erk, layer_counts, uniform
        >>> layer_counts(uniform(), {'a': (10, 10)}, 0.9)
        {'a': 10}
        >>> counts = layer_counts(erk(), {'a': (64, 64), 'b': (64, 10)}, 0.9, custom={'b': 0.5})
        >>> counts['a'], counts['b']   # 'b' keeps half of its 640 weights
        (410, 320)
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} is outside [0, 1)")
    if dist.name not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {dist.name!r}; known: {sorted(DISTRIBUTIONS)}")
    custom = dict(custom or {})
    size = {k: math.prod(int(d) for d in s) for k, s in shapes.items()}
    counts = {k: round((1.0 - s) * size[k]) for k, s in custom.items()}
    free = [k for k in shapes if k not in custom]
    target = round((1.0 - sparsity) * sum(size[k] for k in free))
    raw = {k: raw_score(dist, shapes[k]) for k in free}
    dense: set[str] = set()
    while True:
        rest = [k for k in free if k not in dense]
        budget = target - sum(size[k] for k in dense)
        divisor = sum(raw[k] * size[k] for k in rest)
        eps = budget / divisor if divisor else 0.0
        worst = max(rest, key=lambda k: raw[k], default=None)
        if worst is not None and eps * raw[worst] > 1.0:
            dense.add(worst)  # made dense; solve ε again for the others
            continue
        break
    counts.update({k: size[k] for k in dense})
    counts.update(_largest_remainder({k: eps * raw[k] * size[k] for k in rest}, budget,
                                     {k: size[k] for k in rest}))
    return counts


def layer_densities(dist: Distribution, shapes: dict[str, tuple], sparsity: float,
                    custom: dict[str, float] | None = None) -> dict[str, float]:
    """``layer_counts`` divided by layer sizes.

    Example:

        >>> from sparsejax.distributions import erk, layer_densities
        >>> layer_densities(erk(), {'a': (64, 64), 'b': (64, 10)}, 0.9)
        {'a': 0.0732421875, 'b': 0.271875}
    """
    counts = layer_counts(dist, shapes, sparsity, custom)
    return {k: counts[k] / math.prod(int(d) for d in shapes[k]) for k in shapes}
