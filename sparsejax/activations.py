"""Activation sparsity: exact/approximate top-k and Spark statistical top-k (functional ops).

Two ways to keep about ``k`` of the ``d`` entries along an axis (per token, for FFN
hidden units after the activation):

- ``topk`` (Li et al. 2023, "The Lazy Neuron Phenomenon"): keep the ``k`` largest
  entries, zero the rest. Exact selection uses ``lax.top_k`` (exactly ``k`` kept, ties to
  the lower index); approximate selection uses ``lax.approx_max_k`` (at most ``k`` kept,
  fast on TPU only; on CPU and GPU XLA runs its exact fallback).
- ``statistical_topk`` (You et al. 2025, "Spark Transformer"): no sort. Assume the
  entries of a row are roughly Gaussian and cut at the threshold
  ``θ = mean(x) + std(x)·Φ⁻¹(1 − density)`` (population std), about ``2d`` FLOPs. Soft
  form ``max(x − θ, 0)``, hard form ``x·[x > θ]``. The number kept is ``≈ density·d``
  on Gaussian rows, not exactly ``k``; ``realised_density`` measures it.

Gradients: ``topk`` passes the gradient to the kept entries only (the selection itself
is piecewise constant). ``statistical_topk`` has a choice, ``threshold_grad``:
``'stop'`` (default) treats θ as a data-dependent constant (``stop_gradient`` on the
mean and std), so the gradient is ``[x > θ]`` for both forms, as for any thresholded
activation; ``'through'`` differentiates through mean and std exactly, which adds
``−n_kept·∂θ/∂x_j = −n_kept·(1/d + Φ⁻¹(1−density)·(x_j − μ)/(d·σ))`` to the soft
form's gradient (n_kept: entries above θ in that row). The hard form's output does not
depend on θ except through the indicator, so both choices give the same hard gradient.

Example:

    >>> import jax
    >>> from sparsejax.activations import k_from_density, realised_density, statistical_topk, topk
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (4, 64))
    >>> w1 = jax.random.normal(jax.random.PRNGKey(1), (64, 256)) / 8
    >>> h = jax.nn.gelu(x @ w1)                           # (tokens, d_ff)
    >>> soft = statistical_topk(h, density=0.08)          # ~8% of units per token, soft form
    >>> print(round(float(realised_density(soft)), 2))   # GELU rows are not Gaussian
    0.11
    >>> k = k_from_density(h.shape[-1], 0.08)
    >>> exact = topk(h, k=k)                              # exactly k per token
    >>> k, realised_density(exact, axis=-1).tolist()      # per-token fraction of nonzeros
    (20, [0.078125, 0.078125, 0.078125, 0.078125])
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
}
STATISTICAL_MODES = ("soft", "hard")
THRESHOLD_GRADS = ("stop", "through")


# ----------------------------------------------------------------------------- checks


def _check_density(density) -> float:
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a Python number in (0, 1], got {density!r}")
    density = float(density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    return density


def _axis_size(x, axis: int) -> tuple[int, int]:
    ndim = jnp.ndim(x)
    if ndim == 0:
        raise ValueError("top-k activations need at least one dimension; got a scalar")
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an input of rank {ndim}")
    axis = axis % ndim
    return axis, int(jnp.shape(x)[axis])


def _check_k(k, d: int, axis: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be a Python int, got {k!r}")
    if k <= 0:
        raise ValueError(f"k must be positive, got k={k}")
    if k > d:
        raise ValueError(f"k={k} is larger than the size d={d} of axis {axis}")
    return k


# ----------------------------------------------------------------------------- helpers


def activation_fn(activation: str | Callable) -> Callable:
    """The activation as a function: a callable is returned as is, a name is looked up in
    ``ACTIVATIONS`` ('relu', 'gelu', 'silu', 'tanh').

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.activations import activation_fn
        >>> activation_fn('relu')(jnp.array([-1., 2.])).tolist()
        [0.0, 2.0]
        >>> activation_fn(jnp.tanh) is jnp.tanh
        True
    """
    if callable(activation):
        return activation
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; known: {sorted(ACTIVATIONS)} "
                         "or a callable")
    return ACTIVATIONS[activation]


def k_from_density(d: int, density: float) -> int:
    """Number of entries kept out of ``d`` at ``density``: ``max(1, ⌊density·d + ½⌋)``.

    Rounds half up (not Python's round-half-even) and never returns 0.

    Example:

        >>> from sparsejax.activations import k_from_density
        >>> k_from_density(16384, 0.08), k_from_density(10, 0.01), k_from_density(10, 0.25)
        (1311, 1, 3)
    """
    if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
        raise ValueError(f"d must be a positive int, got {d!r}")
    density = _check_density(density)
    return min(d, max(1, int(math.floor(density * d + 0.5))))


def normal_ppf(p: float) -> float:
    """Φ⁻¹(p), the standard normal quantile, as a Python float (static; no tracing).

    Uses ``statistics.NormalDist().inv_cdf`` (Wichura's AS241, double precision), so
    the threshold constant is exact to ~1e-16 and costs nothing at run time. The same
    value as ``jax.scipy.special.ndtri(p)`` up to float32 rounding.

    Example:

        >>> from sparsejax.activations import normal_ppf
        >>> normal_ppf(0.92)
        1.4050715603...
        >>> normal_ppf(0.95)
        1.6448536269...
    """
    p = float(p)
    if not 0.0 < p < 1.0:
        raise ValueError(f"normal_ppf needs p in (0, 1), got {p}")
    return statistics.NormalDist().inv_cdf(p)


def realised_density(x, axis: int | None = None):
    """Fraction of nonzero entries of ``x``: per row along ``axis``, or overall if None.

    Example:

        >>> import jax.numpy as jnp
        >>> from sparsejax.activations import realised_density
        >>> float(realised_density(jnp.array([[1., 0.], [0., 0.]])))
        0.25
        >>> realised_density(jnp.array([[1., 0.], [0., 0.]]), axis=-1).tolist()
        [0.5, 0.0]
    """
    return jnp.mean((jnp.asarray(x) != 0).astype(jnp.float32), axis=axis)


# ----------------------------------------------------------------------------- top-k


def topk(x, k: int, axis: int = -1, approximate: bool = False, recall_target: float = 0.95):
    """Keep the ``k`` largest entries of ``x`` along ``axis``; the others become 0.

    Li et al. 2023, "The Lazy Neuron Phenomenon" (top-k transformer: keep the k largest
    post-activation FFN units per token). Exact mode (default) selects with
    ``lax.top_k`` on ``x`` with ``axis`` moved last: exactly ``k`` entries are kept per
    row, ties go to the lower index. ``approximate=True`` selects with
    ``lax.approx_max_k(..., recall_target=recall_target)``: at most ``k`` kept, each
    true top-k entry kept with probability about ``recall_target``; this is only faster
    on TPU (XLA runs an exact fallback on CPU/GPU). The output is
    ``where(selected, x, 0)``: the gradient flows to the kept entries only.

    Example:

        >>> import jax
        >>> import jax.numpy as jnp
        >>> from sparsejax.activations import k_from_density, topk
        >>> topk(jnp.array([3., 1., 4., 1., 5.]), k=2).tolist()
        [0.0, 0.0, 4.0, 0.0, 5.0]
        >>> h = jax.random.normal(jax.random.PRNGKey(0), (4, 1024))
        >>> k = k_from_density(h.shape[-1], 0.08)
        >>> out = topk(h, k=k, approximate=True)
        >>> k, bool(((out != 0).sum(-1) <= k).all())   # at most k per row
        (82, True)
    """
    x = jnp.asarray(x)
    axis, d = _axis_size(x, axis)
    k = _check_k(k, d, axis)
    if not 0.0 < float(recall_target) <= 1.0:
        raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
    xl = jnp.moveaxis(x, axis, -1)
    if approximate:
        _, idx = lax.approx_max_k(xl, k, recall_target=float(recall_target))
    else:
        _, idx = lax.top_k(xl, k)
    keep = jnp.put_along_axis(jnp.zeros(xl.shape, bool), idx, True, axis=-1, inplace=False)
    return jnp.moveaxis(jnp.where(keep, xl, jnp.zeros((), xl.dtype)), -1, axis)


# ----------------------------------------------------------------------------- Spark


def _safe_std(var):
    # sqrt with a zero (not NaN) gradient at var == 0, so constant rows stay finite.
    pos = var > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)


def statistical_threshold(x, density: float, axis: int = -1, threshold_grad: str = "stop",
                          keepdims: bool = True):
    """Spark threshold ``θ = mean(x) + std(x)·Φ⁻¹(1 − density)`` along ``axis``.

    You et al. 2025, "Spark Transformer", statistical top-k: for rows that are roughly
    Gaussian a fraction ``density`` of the entries lies above θ. ``std`` is the
    population std (ddof 0). Statistics are computed in at least float32 and θ is
    returned in ``x``'s dtype, with the reduced axis kept (``keepdims``) so it
    broadcasts against ``x``. ``Φ⁻¹`` is evaluated in Python (``normal_ppf``); density 1
    gives θ = −inf (keep everything). ``threshold_grad='stop'`` wraps θ in
    ``stop_gradient``; ``'through'`` keeps the exact gradient (zero, not NaN, through a
    constant row's std).

    Non-finite entries (NaN, ±inf) are left out of a row's mean and std, as if absent: θ
    is that of the row's finite entries (up to the rounding of the sums, which run over
    zeros in their place), and +inf for a row with none. Rows with no non-finite entry
    give the plain formula's θ bit for bit; gradients stay finite.

    Example:

        >>> import jax
        >>> import jax.numpy as jnp
        >>> from sparsejax.activations import statistical_threshold
        >>> statistical_threshold(jnp.array([-1., 0., 1., 2.]), 0.5).tolist()   # Φ⁻¹(½) = 0: mean
        [0.5]
        >>> h = jax.random.normal(jax.random.PRNGKey(0), (4, 1024))
        >>> theta = statistical_threshold(h, 0.08)
        >>> theta.shape                              # (tokens, 1)
        (4, 1)
        >>> kept = h > theta                         # ~8% True per token
        >>> print(round(float(kept.mean()), 2))
        0.08
        >>> x = jnp.array([-1., 0., 1., 2., jnp.nan, jnp.inf])      # non-finite: left out
        >>> statistical_threshold(x, 0.5).tolist(), statistical_threshold(x[4:], 0.5).tolist()
        ([0.5], [inf])
    """
    x = jnp.asarray(x)
    axis, _ = _axis_size(x, axis)
    density = _check_density(density)
    if threshold_grad not in THRESHOLD_GRADS:
        raise ValueError(f"unknown threshold_grad {threshold_grad!r}; use one of "
                         f"{THRESHOLD_GRADS}")
    shape = tuple(1 if i == axis else n for i, n in enumerate(x.shape))
    if density == 1.0:
        theta = jnp.full(shape, -jnp.inf, x.dtype)
        return theta if keepdims else jnp.squeeze(theta, axis)
    z = normal_ppf(1.0 - density)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    finite = jnp.isfinite(xf)
    n = jnp.sum(finite, axis=axis, keepdims=True, dtype=xf.dtype)
    n_safe = jnp.maximum(n, 1.0)   # no finite entry: θ = +inf below, and no NaN gradient
    xs = jnp.where(finite, xf, 0.0)
    mu = jnp.sum(xs, axis=axis, keepdims=True) / n_safe
    dev = jnp.where(finite, xs - mu, 0.0)
    var = jnp.sum(jnp.square(dev), axis=axis, keepdims=True) / n_safe   # population variance
    theta = jnp.where(n > 0, mu + _safe_std(var) * z, jnp.inf).astype(x.dtype)
    if threshold_grad == "stop":
        theta = lax.stop_gradient(theta)
    return theta if keepdims else jnp.squeeze(theta, axis)


def statistical_topk(x, density: float, axis: int = -1, mode: str = "soft",
                     threshold_grad: str = "stop"):
    """Spark statistical top-k: keep the entries above ``θ = mean + std·Φ⁻¹(1 − density)``.

    You et al. 2025, "Spark Transformer". Soft form (``mode='soft'``, used by Gemma 3n):
    ``max(x − θ, 0)``; hard form (``mode='hard'``): ``x·[x > θ]``. No sort: two
    reductions and an elementwise pass. The kept fraction is ``density`` only for
    roughly Gaussian rows; measure it with ``realised_density``. ``density == 1``
    returns ``x`` unchanged (no sparsity) in both forms. See the module docstring for
    ``threshold_grad`` ('stop' default: θ is a constant for the gradient; 'through':
    exact gradient through mean and std).

    Non-finite entries: θ comes from the row's finite entries only
    (``statistical_threshold``), so every finite entry's output is what it would be
    without them (up to float rounding of the row sums); rows with none are bit for bit
    the plain formula's. +inf is kept (+inf in both forms), −inf is dropped (0), and NaN
    stays NaN at its own position (an upstream bug stays visible, never hidden as 0). A
    row with no finite entry has θ = +inf: 0 everywhere except its NaN positions.

    Example:

        >>> import jax
        >>> import jax.numpy as jnp
        >>> from sparsejax.activations import realised_density, statistical_topk
        >>> x = jnp.array([-1., 0., 1., 2.])               # θ = 0.5 at density 0.5
        >>> statistical_topk(x, 0.5).tolist(), statistical_topk(x, 0.5, mode='hard').tolist()
        ([0.0, 0.0, 0.5, 1.5], [0.0, 0.0, 1.0, 2.0])
        >>> h = jax.random.normal(jax.random.PRNGKey(0), (4, 1024))
        >>> soft = statistical_topk(h, 0.08)                      # soft, ~8% nonzero per row
        >>> hard = statistical_topk(h, 0.05, mode='hard', threshold_grad='through')
        >>> print(round(float(realised_density(soft)), 2), round(float(realised_density(hard)), 2))
        0.08 0.05
        >>> bad = jnp.array([-1., 0., 1., 2., jnp.nan, jnp.inf, -jnp.inf])   # θ still 0.5
        >>> statistical_topk(bad, 0.5).tolist(), statistical_topk(bad, 0.5, mode='hard').tolist()
        ([0.0, 0.0, 0.5, 1.5, nan, inf, 0.0], [0.0, 0.0, 1.0, 2.0, nan, inf, 0.0])
    """
    if mode not in STATISTICAL_MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {STATISTICAL_MODES}")
    theta = statistical_threshold(x, density, axis=axis, threshold_grad=threshold_grad)
    x = jnp.asarray(x)
    if _check_density(density) == 1.0:
        return x
    zero = jnp.zeros((), x.dtype)
    if mode == "soft":   # θ = +inf (no finite entry): 0 but NaN, not max(inf − inf, 0) = NaN
        return jnp.where(theta < jnp.inf, jnp.maximum(x - theta, zero),
                         jnp.where(jnp.isnan(x), x, zero))
    return jnp.where((x > theta) | jnp.isnan(x), x, zero)
