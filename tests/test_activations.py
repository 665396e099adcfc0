"""Top-k and Spark statistical top-k activations against independent numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.activations import (k_from_density, normal_ppf, realised_density,
                                   statistical_threshold, statistical_topk, topk)

try:
    from scipy.stats import norm as _norm
except ImportError:  # pragma: no cover - scipy is optional
    _norm = None

# Φ⁻¹ values quoted in REFERENCES.md (Spark statistical top-k).
KNOWN_PPF = {0.92: 1.4051, 0.95: 1.6449}


def ppf_ref(p):
    return float(_norm.ppf(p)) if _norm is not None else KNOWN_PPF[p]


def gaussian(shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def np_threshold(x, density, axis=-1):
    x = np.asarray(x, np.float64)
    return x.mean(axis, keepdims=True) + x.std(axis, keepdims=True) * ppf_ref(1 - density)


# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize("p", [0.92, 0.95])
def test_normal_ppf_matches_reference_values(p):
    assert normal_ppf(p) == pytest.approx(KNOWN_PPF[p], abs=1e-4)
    assert normal_ppf(p) == pytest.approx(ppf_ref(p), abs=1e-4 if _norm is None else 1e-12)
    assert normal_ppf(p) == pytest.approx(float(jax.scipy.special.ndtri(p)), abs=1e-5)


def test_k_from_density():
    assert k_from_density(16384, 0.08) == 1311       # 1310.72 rounds to 1311
    assert k_from_density(1000, 0.0805) == 81         # 80.5 rounds half up
    assert k_from_density(10, 0.01) == 1              # at least one
    assert k_from_density(7, 1.0) == 7


def test_realised_density():
    x = jnp.array([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, -3.0]])
    assert float(realised_density(x)) == pytest.approx(3 / 8)
    np.testing.assert_allclose(realised_density(x, axis=-1), [0.5, 0.25])
    np.testing.assert_allclose(realised_density(x, axis=0), [0.5, 0.0, 0.5, 0.5])


# ----------------------------------------------------------------------------- statistical


def test_statistical_topk_realised_density_on_gaussian_rows():
    density, x = 0.08, gaussian((64, 16384), seed=1)
    for mode in ("soft", "hard"):
        per_row = np.asarray(realised_density(statistical_topk(x, density, mode=mode), axis=-1))
        assert abs(per_row.mean() - density) < 0.005, (mode, per_row.mean())
        # One row: binomial noise plus the noise of estimating mean and std, ~0.3 pp s.d.
        assert np.max(np.abs(per_row - density)) < 0.015, (mode, per_row)


@pytest.mark.parametrize("density", [0.08, 0.05])
@pytest.mark.parametrize("axis", [-1, 0])
def test_threshold_equals_formula(density, axis):
    x = gaussian((48, 40), seed=2) * 3.0 + 0.7
    theta = np.asarray(statistical_threshold(x, density, axis=axis))
    want = np_threshold(x, density, axis=axis)
    assert theta.shape == want.shape
    np.testing.assert_allclose(theta, want, rtol=1e-5, atol=1e-5)
    squeezed = statistical_threshold(x, density, axis=axis, keepdims=False)
    np.testing.assert_allclose(squeezed, np.squeeze(want, axis), rtol=1e-5, atol=1e-5)


def test_threshold_uses_population_std():
    x = np.array([[0.0, 2.0]], np.float32)          # mean 1, population std 1 (ddof 1: √2)
    theta = float(statistical_threshold(x, 0.08)[0, 0])
    assert theta == pytest.approx(1.0 + ppf_ref(0.92), abs=1e-5)


def test_bfloat16_input():
    x = gaussian((4, 4096), seed=3) + 50.0           # large mean: bf16 resolution 0.25
    theta = statistical_threshold(jnp.asarray(x, jnp.bfloat16), 0.08)
    assert theta.dtype == jnp.bfloat16
    want = np_threshold(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float64), 0.08)
    np.testing.assert_allclose(np.asarray(theta, np.float32), want, atol=0.25)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_statistical_topk_matches_numpy(mode):
    x = gaussian((16, 256), seed=4)
    out = np.asarray(statistical_topk(x, 0.05, mode=mode))
    theta = np_threshold(x, 0.05)
    want = np.maximum(x - theta, 0) if mode == "soft" else x * (x > theta)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    # Along a leading axis too.
    out0 = np.asarray(statistical_topk(x.T, 0.05, axis=0, mode=mode))
    np.testing.assert_allclose(out0, want.T, rtol=1e-5, atol=1e-5)


def test_density_one_is_identity():
    x = gaussian((3, 17), seed=5)
    for mode in ("soft", "hard"):
        np.testing.assert_array_equal(statistical_topk(x, 1.0, mode=mode), x)
    assert np.all(np.isneginf(statistical_threshold(x, 1.0)))


def soft_grad_through_ref(x, density):
    """Closed form of d/dx_j Σ_i max(x_i − θ, 0) with θ = μ + zσ differentiated (numpy)."""
    x = np.asarray(x, np.float64)
    d, z = x.shape[-1], ppf_ref(1 - density)
    mu, sd = x.mean(-1, keepdims=True), x.std(-1, keepdims=True)
    kept = x > mu + z * sd
    dtheta = 1.0 / d + z * (x - mu) / (d * sd)
    return kept - kept.sum(-1, keepdims=True) * dtheta


def np_soft_sum(x, density):
    theta = x.mean(-1, keepdims=True) + ppf_ref(1 - density) * x.std(-1, keepdims=True)
    return np.maximum(x - theta, 0).sum()


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_gradients(mode):
    density, x = 0.1, gaussian((8, 64), seed=6)
    grad = {tg: np.asarray(jax.grad(lambda v: statistical_topk(
        v, density, mode=mode, threshold_grad=tg).sum())(jnp.asarray(x)))
        for tg in ("stop", "through")}
    kept = x > np_threshold(x, density)
    for g in grad.values():
        assert np.all(np.isfinite(g))
    # 'stop': θ is a constant, so the gradient is the indicator for both forms.
    np.testing.assert_allclose(grad["stop"], kept.astype(np.float32), atol=1e-6)
    if mode == "hard":   # x·[x > θ] depends on θ only through a step: same gradient
        np.testing.assert_allclose(grad["through"], grad["stop"], atol=1e-6)
        return
    assert np.max(np.abs(grad["through"] - grad["stop"])) > 1e-2
    np.testing.assert_allclose(grad["through"], soft_grad_through_ref(x, density),
                               rtol=1e-4, atol=1e-5)
    # Central finite differences of the float64 numpy formula on a few coordinates.
    xd = x.astype(np.float64)
    for i, j in [(0, 0), (1, 5), (3, 17), (7, 63)]:
        e = np.zeros_like(xd)
        e[i, j] = 1e-6
        fd = (np_soft_sum(xd + e, density) - np_soft_sum(xd - e, density)) / 2e-6
        assert grad["through"][i, j] == pytest.approx(fd, abs=1e-4)


def test_through_gradient_finite_on_constant_rows():
    x = jnp.ones((2, 8))
    for mode in ("soft", "hard"):
        g = jax.grad(lambda v: statistical_topk(v, 0.25, mode=mode,
                                                threshold_grad="through").sum())(x)
        assert np.all(np.isfinite(np.asarray(g)))


def test_statistical_topk_jits_once():
    f = jax.jit(statistical_topk, static_argnames=("density", "axis", "mode", "threshold_grad"))
    x = gaussian((4, 128), seed=7)
    np.testing.assert_allclose(f(x, density=0.08), statistical_topk(x, 0.08), atol=1e-6)


# ----------------------------------------------------------------------------- top-k


def np_topk(x, k):
    """Reference: stable argsort of −x along the last axis keeps the lower index on ties."""
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    keep = np.zeros(x.shape, bool)
    np.put_along_axis(keep, idx, True, axis=-1)
    return np.where(keep, x, 0), keep


@pytest.mark.parametrize("shape,k", [((32, 1000), 80), ((5, 7), 7), ((3, 9), 1)])
def test_topk_keeps_exactly_k_and_matches_numpy(shape, k):
    x = gaussian(shape, seed=8)
    assert np.all(x != 0)
    out = np.asarray(topk(x, k))
    assert np.all((out != 0).sum(-1) == k)
    want, _ = np_topk(x, k)
    np.testing.assert_array_equal(out, want)


def test_topk_ties_go_to_lower_index():
    x = np.array([[1.0, 2.0, 2.0, 2.0, 0.5, 2.0],
                  [3.0, 3.0, 3.0, 3.0, 3.0, 3.0]], np.float32)
    out = np.asarray(topk(x, 2))
    np.testing.assert_array_equal(out, [[0, 2, 2, 0, 0, 0], [3, 3, 0, 0, 0, 0]])
    xi = np.random.default_rng(9).integers(1, 5, size=(64, 50)).astype(np.float32)
    np.testing.assert_array_equal(topk(xi, 13), np_topk(xi, 13)[0])


def test_topk_other_axis():
    x = gaussian((40, 6, 3), seed=10)
    out = np.asarray(topk(x, 5, axis=0))
    want = np.moveaxis(np_topk(np.moveaxis(x, 0, -1), 5)[0], -1, 0)
    np.testing.assert_array_equal(out, want)


def test_topk_gradient_to_kept_entries_only():
    x = gaussian((6, 50), seed=11)
    g = np.asarray(jax.grad(lambda v: (topk(v, 4) * jnp.arange(50.0)).sum())(jnp.asarray(x)))
    _, keep = np_topk(x, 4)
    np.testing.assert_array_equal(g, np.where(keep, np.arange(50.0), 0.0))


def test_topk_approximate():
    k, x = 100, gaussian((64, 4096), seed=12)
    out = np.asarray(topk(x, k, approximate=True, recall_target=0.95))
    kept = out != 0
    assert np.all(kept.sum(-1) <= k)
    np.testing.assert_array_equal(out[kept], x[kept])       # kept values are unchanged
    _, exact = np_topk(x, k)
    recall = (kept & exact).sum(-1) / k
    assert recall.mean() >= 0.95 - 0.02, recall.mean()
    if jax.default_backend() == "cpu":
        # On CPU XLA runs approx_max_k's exact fallback (custom call is_fallback=true).
        np.testing.assert_array_equal(kept, exact)


# ----------------------------------------------------------------------------- errors


def test_errors():
    x = jnp.ones((4, 10))
    with pytest.raises(ValueError, match="k must be positive, got k=0"):
        topk(x, 0)
    with pytest.raises(ValueError, match="k=11 is larger than .* d=10"):
        topk(x, 11)
    with pytest.raises(ValueError, match="k=5 is larger than .* d=4"):
        topk(x, 5, axis=0)
    with pytest.raises(TypeError, match="k must be a Python int"):
        topk(x, 2.0)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        topk(x, 2, axis=2)
    with pytest.raises(ValueError, match="recall_target"):
        topk(x, 2, approximate=True, recall_target=0.0)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            statistical_topk(x, bad)
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            k_from_density(10, bad)
    with pytest.raises(ValueError, match="unknown mode 'medium'"):
        statistical_topk(x, 0.1, mode="medium")
    with pytest.raises(ValueError, match="unknown threshold_grad 'both'"):
        statistical_topk(x, 0.1, threshold_grad="both")
    with pytest.raises(ValueError, match="scalar"):
        statistical_topk(jnp.float32(1.0), 0.1)
    with pytest.raises(ValueError, match="d must be a positive int"):
        k_from_density(0, 0.1)
