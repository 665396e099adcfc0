"""Schedules of the sparse training step ``t`` (the number of updates applied so far).

Each is a pure function of ``t`` that works on Python ints and on traced arrays.

Example:

    >>> from sparsejax.schedules import cosine_drop_fraction
    >>> f = cosine_drop_fraction(0.3, end_step=7500)
    >>> [round(float(f(t)), 4) for t in (0, 3750, 7500)]
    [0.3, 0.15, 0.0]
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
import numpy as np

Schedule = Callable[[object], object]


def constant_drop_fraction(f0: float) -> Schedule:
    """``f_t = f_0``. Example: ``constant_drop_fraction(0.3)(10)``."""
    return lambda t: jnp.asarray(f0, jnp.float32) + 0.0 * jnp.asarray(t, jnp.float32)


def cosine_drop_fraction(f0: float, end_step: int) -> Schedule:
    """``f_t = f_0 · ½ (1 + cos(π t / T_end))`` (Evci et al. 2020, Eq. 1), 0 after ``T_end``.

    Example:

        >>> from sparsejax.schedules import cosine_drop_fraction
        >>> print(round(float(cosine_drop_fraction(0.3, 100)(50)), 4))
        0.15
    """
    def f(t):
        t = jnp.minimum(jnp.asarray(t, jnp.float32), end_step)
        return f0 * 0.5 * (1.0 + jnp.cos(jnp.pi * t / end_step))

    return f


def drop_fraction_schedule(f0: float, anneal: str, end_step: int) -> Schedule:
    """'cosine' or 'constant' drop fraction.

    Example:

        >>> from sparsejax.schedules import drop_fraction_schedule
        >>> f = drop_fraction_schedule(0.3, 'cosine', 7500)
        >>> print(round(float(f(3750)), 4))
        0.15
    """
    if anneal == "cosine":
        return cosine_drop_fraction(f0, end_step)
    if anneal == "constant":
        return constant_drop_fraction(f0)
    raise ValueError(f"unknown drop_fraction_anneal {anneal!r}; known: ['constant', 'cosine']")


def gradual_sparsity(final: float, begin_step: int, end_step: int,
                     initial: float = 0.0) -> Schedule:
    """Zhu & Gupta 2017, Eq. 1: ``s_t = s_f + (s_i − s_f)(1 − (t − t_0)/(T − t_0))³``,
    ``s_i`` before ``t_0 = begin_step``, exactly ``s_f`` from ``T = end_step`` on (also
    when ``t_0 = T``: one-shot pruning at ``T``).

    Example:

        >>> from sparsejax.schedules import gradual_sparsity
        >>> s = gradual_sparsity(0.9, 0, 100)
        >>> [round(float(s(t)), 4) for t in (50, 100)]      # 0.9 · (1 − 0.5³); s_f at T
        [0.7875, 0.9]
        >>> round(float(gradual_sparsity(0.9, 100, 100)(100)), 4)   # t_0 = T: s_f at T
        0.9
    """
    span = max(end_step - begin_step, 1)

    def s(t):
        t = jnp.asarray(t, jnp.float32)
        frac = jnp.where(t >= end_step, 1.0, jnp.clip((t - begin_step) / span, 0.0, 1.0))
        return final + (initial - final) * (1.0 - frac) ** 3

    return s


def is_update_step(t, every: int, begin_step: int, end_step: int, at_end: bool = False):
    """Mask updates at ``t = begin, begin + ΔT, …`` while ``t ≤ end_step``; with ``at_end``
    also at ``t = end_step`` itself, so that a schedule that reaches its target at
    ``end_step`` (gradual pruning) applies it even when ``end_step − begin`` is not a
    multiple of ``ΔT``. SET and RigL use the default (no extra update).

    Example:

        >>> from sparsejax.schedules import is_update_step
        >>> bool(is_update_step(200, 100, 0, 7500)), bool(is_update_step(250, 100, 0, 7500))
        (True, False)
        >>> [t for t in range(80) if is_update_step(t, 10, 0, 75, at_end=True)][-3:]
        [60, 70, 75]
        >>> is_update_step(200, 100, 0, 7500) is True   # a Python int gives a Python bool
        True

    A Python ``int`` step gives a Python ``bool`` (the host's schedule, no device work);
    an array step gives a boolean array (the same schedule inside ``jit``).
    """
    if isinstance(t, (int, np.integer)):
        t = int(t)
        due = begin_step <= t <= end_step and (t - begin_step) % every == 0
        return bool(due or (at_end and t == end_step))
    t = jnp.asarray(t)
    due = (t >= begin_step) & (t <= end_step) & ((t - begin_step) % every == 0)
    return (due | (t == end_step)) if at_end else due
