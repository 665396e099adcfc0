"""Masks: rules, exact-count selection (sort and threshold), packing, dense-gradient forward."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from sparsejax import masks as M

PARAMS = {"layers": {0: {"kernel": jnp.ones((4, 6)), "bias": jnp.ones(6)}},
          "head": {"kernel": jnp.ones((6, 3)), "bias": jnp.ones(3)}, "scale": jnp.ones(())}


def reference_topk(scores: np.ndarray, k: int, eligible: np.ndarray | None) -> np.ndarray:
    """numpy: highest score first, NaN as -inf, ties to the lower flat index."""
    s = np.where(np.isnan(scores), -np.inf, scores).reshape(-1).astype(np.float64)
    el = np.ones(s.size, bool) if eligible is None else eligible.reshape(-1)
    idx = np.arange(s.size)
    order = np.lexsort((idx, -s))  # primary: -score, secondary: index
    order = [i for i in order if el[i]][:k]
    out = np.zeros(s.size, bool)
    out[order] = True
    return out.reshape(scores.shape)


score_arrays = st.tuples(st.integers(1, 7), st.integers(1, 9), st.integers(0, 2**31 - 1),
                         st.sampled_from([0, 1, 2]))


@settings(max_examples=30, deadline=None)
@given(score_arrays, st.floats(0, 1.2), st.booleans())
def test_topk_matches_reference_and_methods_agree(spec, frac, use_eligible):
    rows, cols, seed, levels = spec
    rng = np.random.default_rng(seed)
    # few distinct values -> many ties; some NaN and infinities
    s = rng.normal(size=(rows, cols))
    if levels:
        s = np.round(s * levels) / levels
    s[rng.random(s.shape) < 0.1] = np.nan
    s[rng.random(s.shape) < 0.05] = np.inf
    s = s.astype(np.float32)
    eligible = rng.random(s.shape) < 0.7 if use_eligible else None
    k = int(frac * s.size)
    want = reference_topk(s, k, eligible)
    el = None if eligible is None else jnp.asarray(eligible)
    for method in M.SELECTION_METHODS:
        got = np.asarray(M.topk_mask(jnp.asarray(s), k, el, method=method))
        np.testing.assert_array_equal(got, want, err_msg=method)
    n_el = s.size if eligible is None else int(eligible.sum())
    assert want.sum() == min(k, n_el)


def test_global_topk_matches_concatenated_reference():
    rng = np.random.default_rng(0)
    a, b = np.round(rng.normal(size=(5, 4)), 1), np.round(rng.normal(size=(7,)), 1)
    flat = np.concatenate([a.ravel(), b]).astype(np.float32)
    want = reference_topk(flat, 11, None)
    for method in M.SELECTION_METHODS:
        got = M.global_topk_masks({"a": jnp.asarray(a), "b": jnp.asarray(b), "c": None}, 11,
                                  method=method)
        assert got["c"] is None
        np.testing.assert_array_equal(np.concatenate([np.asarray(got["a"]).ravel(),
                                                      np.asarray(got["b"])]), want)


_TOPK = {m: jax.jit(lambda s, k, e, m=m: M.topk_mask(s, k, e, method=m))
         for m in M.SELECTION_METHODS}  # k traced: one compile per shape


def _both_methods(scores, k, eligible=None):
    """topk_mask by both methods, jitted with ``k`` traced: [sort, threshold]."""
    return [np.asarray(fn(jnp.asarray(scores), jnp.int32(k),
                          None if eligible is None else jnp.asarray(eligible)))
            for fn in _TOPK.values()]


def test_ties_straddling_the_threshold_every_k():
    # 3 distinct values over many rows: the cut falls inside a run of ties for most k
    rng = np.random.default_rng(1)
    s = rng.integers(0, 3, size=(37, 53)).astype(np.float32)
    for k in [0, 1, 2, 52, 53, 54, 600, 650, 651, 1000, 1300, s.size - 1, s.size, s.size + 5]:
        want = reference_topk(s, k, None)
        for method, got in zip(M.SELECTION_METHODS, _both_methods(s, k)):
            np.testing.assert_array_equal(got, want, err_msg=f"{method} k={k}")


@pytest.mark.parametrize("shape", [(), (1,), (7,), (4, 1), (1, 9), (3, 4, 5), (2, 0)])
def test_edge_shapes_and_k(shape):
    rng = np.random.default_rng(len(shape))
    s = rng.integers(-2, 2, size=shape).astype(np.float32)
    n = s.size
    for k in sorted({0, 1, n // 2, max(n - 1, 0), n, n + 3}):
        want = reference_topk(s, k, None)
        for got in _both_methods(s, k):
            assert got.shape == shape
            np.testing.assert_array_equal(got, want, err_msg=f"k={k}")


def test_nan_signed_zero_subnormal_and_infinity_order():
    tiny = np.float32(1e-45)  # the smallest subnormal
    s = np.array([np.nan, 0.0, -0.0, tiny, -tiny, -np.inf, np.inf, np.nan, -0.0, 0.0, tiny,
                  np.float32(1.2e-38), -np.inf, 3.0], np.float32)
    for k in range(s.size + 2):  # NaN ties with -inf; -0.0 ties with 0.0 (lower index wins)
        want = reference_topk(s, k, None)
        for got in _both_methods(s, k):
            np.testing.assert_array_equal(got, want, err_msg=f"k={k}")
    for k in (0, 3, 9, 20):  # all NaN: exactly the first k, ties by index
        for got in _both_methods(np.full((3, 3), np.nan, np.float32), k):
            np.testing.assert_array_equal(got.reshape(-1), np.arange(9) < k)


def test_ineligible_entries_are_never_chosen():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 4, size=(16, 40)).astype(np.float32)
    s[rng.random(s.shape) < 0.2] = np.nan
    eligible = rng.random(s.shape) < 0.5
    n_el = int(eligible.sum())
    for k in [0, 1, 77, n_el - 1, n_el, n_el + 1, s.size]:
        want = reference_topk(s, k, eligible)
        for got in _both_methods(s, k, eligible):
            np.testing.assert_array_equal(got, want, err_msg=f"k={k}")
            assert got.sum() == min(k, n_el) and not (got & ~eligible).any()
    for got in _both_methods(s, 5, np.zeros(s.shape, bool)):  # nothing eligible
        assert not got.any()


def test_global_selection_with_ties_across_leaves_and_shapes():
    rng = np.random.default_rng(3)
    leaves = {"a": rng.integers(0, 3, size=(5, 6)), "b": rng.integers(0, 3, size=(11,)),
              "c": np.array(1.0), "d": np.zeros((0, 4)), "e": rng.integers(0, 3, size=(2, 3, 4)),
              "f": None}
    leaves = {p: None if v is None else np.asarray(v, np.float32) for p, v in leaves.items()}
    live = [p for p in sorted(leaves) if leaves[p] is not None]
    flat = np.concatenate([leaves[p].reshape(-1) for p in live])
    eligible = {p: None if v is None else rng.random(v.shape) < 0.8 for p, v in leaves.items()}
    flat_el = np.concatenate([eligible[p].reshape(-1) for p in live])
    for el in (None, eligible):
        fns = {m: jax.jit(lambda s, k, e, m=m: M.global_topk_masks(s, k, e, method=m))
               for m in M.SELECTION_METHODS}
        for k in range(0, flat.size + 2, 3):
            want = reference_topk(flat, k, None if el is None else flat_el)
            for method, fn in fns.items():
                got = fn(leaves, jnp.int32(k), el)
                assert got["f"] is None
                got = np.concatenate([np.asarray(got[p]).reshape(-1) for p in live])
                np.testing.assert_array_equal(got, want, err_msg=f"{method} k={k} el={el is not None}")


def test_resolve_rules_first_match_and_errors():
    specs = M.resolve_rules(PARAMS, [(r"head/kernel", "dense"), (r".*kernel", "sparse"),
                                     (r"layers/0/bias", 0.5)])
    assert specs == {"head/bias": "dense", "head/kernel": "dense", "layers/0/bias": 0.5,
                     "layers/0/kernel": "sparse", "scale": "dense"}
    assert M.resolve_rules(PARAMS)["layers/0/kernel"] == "sparse"  # default: kernels
    with pytest.raises(ValueError, match=r"match no parameter: \['encoder/.*'\]"):
        M.resolve_rules(PARAMS, [(r"encoder/.*", "sparse")])
    with pytest.raises(ValueError, match="scalar parameter 'scale'"):
        M.resolve_rules(PARAMS, [(r"scale", "sparse")])
    with pytest.raises(ValueError, match="sparsity 1.5 for parameter 'head/kernel' is outside"):
        M.resolve_rules(PARAMS, [(r"head/kernel", 1.5)])
    with pytest.raises(ValueError, match="unknown spec 'sparce' for parameter 'head/kernel'"):
        M.resolve_rules(PARAMS, [(r"head/kernel", "sparce")])


def test_apply_pack_counts():
    m = {"w": jnp.array([[True, False, True], [False, False, True]]), "b": None}
    p = {"w": jnp.arange(6.0).reshape(2, 3) + 1, "b": jnp.ones(2)}
    out = M.apply_masks(p, m)
    np.testing.assert_array_equal(out["w"], [[1, 0, 3], [0, 0, 6]])
    assert out["b"] is p["b"]
    assert M.mask_counts(m) == {"w": (3, 6)} and M.global_sparsity(m) == 0.5
    packed = M.pack_masks(m)
    assert packed["w"].dtype == jnp.uint8 and packed["w"].size == 1
    np.testing.assert_array_equal(M.unpack_masks(packed, p)["w"], m["w"])


def test_forward_value_is_masked_and_gradient_is_dense():
    w = jax.random.normal(jax.random.PRNGKey(0), (5, 4))
    m = jax.random.uniform(jax.random.PRNGKey(1), (5, 4)) < 0.5
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 5))
    loss = lambda v: jnp.sum(jnp.tanh(x @ v) ** 2)  # noqa: E731
    fwd = M.masked_with_dense_grad({"w": w}, {"w": m})["w"]
    np.testing.assert_array_equal(fwd, jnp.where(m, w, 0))
    g = jax.grad(lambda p: loss(M.masked_with_dense_grad(p, {"w": m})["w"]))({"w": w})["w"]
    np.testing.assert_allclose(g, jax.grad(loss)(jnp.where(m, w, 0)), rtol=1e-6)
    assert bool(jnp.all(g[~m] != 0))  # the gradient reaches inactive weights too


def test_mask_param_state_finds_moments_by_structure():
    from sparsejax.dst import mask_param_state

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.inject_hyperparams(optax.adam)(1e-3))
    state = jax.tree.map(lambda x: x + 1, tx.init(PARAMS))
    keep = jax.tree.map(lambda _: None, PARAMS)
    keep["layers"][0]["kernel"] = jnp.ones((4, 6), bool).at[1, 2].set(False)
    out = mask_param_state(state, keep, PARAMS)
    for moment in (out[1].inner_state[0].mu, out[1].inner_state[0].nu):
        k = moment["layers"][0]["kernel"]
        assert float(k[1, 2]) == 0 and float(jnp.sum(k == 0)) == 1
        assert bool(jnp.all(moment["head"]["kernel"] == 1))
    assert float(out[1].hyperparams["learning_rate"]) == pytest.approx(1.001)
    assert int(out[1].inner_state[0].count) == 1  # not parameter-shaped: untouched


def test_tie_noise_is_standard_normal_deterministic_and_keyed():
    key = jax.random.PRNGKey(7)
    z = np.asarray(M.tie_noise(key, (400, 500)))
    assert z.dtype == np.float32 and np.isfinite(z).all()
    # moments and quantiles of N(0, 1) (200k draws: standard errors ~0.002-0.005)
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1.0) < 0.01
    for q, want in ((0.025, -1.959964), (0.5, 0.0), (0.975, 1.959964)):
        assert abs(np.quantile(z, q) - want) < 0.02, q
    np.testing.assert_array_equal(z, np.asarray(M.tie_noise(key, (400, 500))))
    np.testing.assert_array_equal(z, np.asarray(jax.jit(M.tie_noise, static_argnums=1)(
        jax.random.key(7), (400, 500))))  # typed keys give the same draws
    other = np.asarray(M.tie_noise(jax.random.PRNGKey(8), (400, 500)))
    assert abs(np.corrcoef(z.ravel(), other.ravel())[0, 1]) < 0.01
    # neighbours along either axis are uncorrelated (the index hash mixes every axis)
    assert abs(np.corrcoef(z[:, 1:].ravel(), z[:, :-1].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(z[1:].ravel(), z[:-1].ravel())[0, 1]) < 0.01
    assert len(np.unique(z)) > 0.99 * z.size  # 24-bit uniforms: ties are rare


def test_tie_noise_sharded_equals_one_device():
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    fn = jax.jit(M.tie_noise, static_argnums=1,
                 out_shardings=NamedSharding(mesh, P("x", None)))
    got = fn(jax.random.PRNGKey(3), (64, 24))
    assert got.sharding.spec == P("x", None)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(M.tie_noise(jax.random.PRNGKey(3),
                                                                          (64, 24))))

