"""N:M sparsity: masks, SR-STE/MDGF gradients, SDGF frames, compression, sharding, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sparsejax
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import PartitionSpec as P

from sparsejax import nm
from sparsejax.kernels.nm_matmul.reference import nm_matmul_reference
from sparsejax.train.checkpoint import Checkpointer
from sparsejax.train.sharding import make_mesh, param_shardings, shardings_like_params

PATTERNS = [(1, 2), (2, 4), (1, 4), (1, 8), (2, 8), (1, 16), (1, 32)]


def reference_nm(w: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """numpy: per group of m along axis keep the n largest |w|, ties to the lower index."""
    moved = np.moveaxis(np.abs(w), axis, -1)
    g = moved.reshape(-1, m)
    keep = np.zeros_like(g, bool)
    for r, row in enumerate(g):
        order = np.lexsort((np.arange(m), -row))[:n]
        keep[r, order] = True
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(PATTERNS), st.sampled_from([(64, 8), (32, 3, 2), (3, 3, 32, 4)]),
       st.integers(0, 3), st.integers(0, 10_000), st.booleans())
def test_every_group_keeps_exactly_n(pattern, shape, axis_pick, seed, ties):
    n, m = pattern
    axes = [a for a in range(len(shape)) if shape[a] % m == 0]
    if not axes:
        return
    axis = axes[axis_pick % len(axes)]
    rng = np.random.default_rng(seed)
    w = rng.normal(size=shape).astype(np.float32)
    if ties:
        w = np.round(w)  # many equal magnitudes
    got = np.asarray(nm.nm_mask(jnp.asarray(w), n, m, axis=axis))
    counts = np.moveaxis(got, axis, -1).reshape(-1, m).sum(-1)
    assert np.all(counts == n)
    np.testing.assert_array_equal(got, reference_nm(w, n, m, axis))


def _loss_grad(x):
    loss = lambda v: jnp.sum(jnp.tanh(x @ v) ** 2)  # noqa: E731
    return loss, jax.grad(loss)


def test_sr_ste_and_mdgf_gradients_equal_closed_forms():
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    w = jax.random.normal(k[0], (16, 6))
    x = jax.random.normal(k[1], (5, 16))
    m = nm.nm_mask(w, 2, 4)
    keep = m.astype(jnp.float32)
    loss, dloss = _loss_grad(x)
    lam, beta = 2e-4, 0.3
    # SR-STE: forward w⊙m, gradient dL/dŵ + λ (1−m) ⊙ w
    fwd = nm.nm_weights(w, m, 0.0, lam)
    np.testing.assert_array_equal(fwd, jnp.where(m, w, 0))
    g = jax.grad(lambda v: loss(nm.nm_weights(v, m, 0.0, lam)))(w)
    np.testing.assert_allclose(g, dloss(w * keep) + lam * (1 - keep) * w, rtol=1e-5, atol=1e-7)
    # MDGF: forward w⊙(m + (1−m)β); backward plain STE or β-scaled
    w_hat = w * (keep + (1 - keep) * beta)
    np.testing.assert_allclose(nm.nm_weights(w, m, beta), w_hat, rtol=1e-6)
    g_ste = jax.grad(lambda v: loss(nm.nm_weights(v, m, beta)))(w)
    np.testing.assert_allclose(g_ste, dloss(w_hat), rtol=1e-5, atol=1e-7)
    g_scaled = jax.grad(lambda v: loss(nm.nm_weights(v, m, beta, scaled_backward=True)))(w)
    np.testing.assert_allclose(g_scaled, dloss(w_hat) * (keep + (1 - keep) * beta),
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_scaled, jax.grad(lambda v: loss(v * (keep + (1 - keep) * beta)))(w),
                               rtol=1e-5, atol=1e-7)  # = the exact gradient of the forward


def test_beta_schedules():
    for t in (0, 100, 2500, 5000, 9000):
        assert float(nm.decay_beta(t, "linear", 2e-4)) == pytest.approx(max(0.0, 1 - 2e-4 * t), abs=1e-7)
        assert float(nm.decay_beta(t, "exp", 2e-4)) == pytest.approx(math.exp(-2e-4 * t), rel=1e-6)


def _states(tx, params, ts):
    """``{t: state}`` after ``t`` updates with zero gradients (params unchanged)."""
    state, out, zeros = tx.init(params), {}, jax.tree.map(jnp.zeros_like, params)
    step = jax.jit(lambda s: tx.update(zeros, s, params)[1])
    for t in range(max(ts) + 1):
        if t in ts:
            out[t] = state
        state = step(state)
    return out


def test_sdgf_frames_and_boundaries():
    assert nm.stepwise_frames(1, 8) == [(7, 8), (4, 8), (2, 8), (1, 8)]
    assert nm.stepwise_frames(2, 4) == [(3, 4), (2, 4)]
    assert nm.stepwise_frames(1, 32) == [(31, 32), (16, 32), (8, 32), (4, 32), (2, 32), (1, 32)]
    assert nm.geometric_frames(1, 4) == [(8, 32), (4, 16), (2, 8), (1, 4)]
    params = {"k": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (64, 4))}}
    tx = nm.sdgf(optax.sgd(0.0), [(r".*kernel", "1:8")], sparse_steps=100, dense_steps=10,
                 finetune_steps=20)
    groups = 64 // 8 * 4
    # dense warm-up, then 4 frames of 25 steps: 7:8, 4:8, 2:8, 1:8; fine-tune keeps 1:8
    expect = {0: 256, 9: 256, 10: 7 * groups, 34: 7 * groups, 35: 4 * groups, 59: 4 * groups,
              60: 2 * groups, 85: 1 * groups, 110: 1 * groups, 125: 1 * groups}
    states = _states(tx, params, set(expect))
    kept = lambda t: int(jnp.sum(sparsejax.forward(params, states[t])["k"]["kernel"] != 0))  # noqa: E731
    assert {t: kept(t) for t in expect} == expect
    geo = nm.sdgf(optax.sgd(0.0), [(r".*kernel", "1:4")], schedule="geometric", sparse_steps=40)
    states = _states(geo, params, {0, 10, 20, 30})
    for t, (n, m) in zip((0, 10, 20, 30), nm.geometric_frames(1, 4)):
        got = geo.forward(params, states[t])["k"]["kernel"]
        np.testing.assert_array_equal(got != 0, reference_nm(np.asarray(params["k"]["kernel"]), n, m, 0))


def test_mdgf_phases_dense_then_decay_then_binary():
    params = {"k": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (16, 4))}}
    tx = nm.mdgf(optax.sgd(0.0), [(r".*kernel", "2:4")], decay="linear", alpha=0.01,
                 dense_steps=5, sparse_steps=50, finetune_steps=10)
    w = params["k"]["kernel"]
    m = nm.nm_mask(w, 2, 4)
    states = _states(tx, params, {3, 25, 55})
    at = lambda t: sparsejax.forward(params, states[t])["k"]["kernel"]  # noqa: E731
    np.testing.assert_array_equal(at(3), w)  # dense warm-up
    np.testing.assert_allclose(at(5 + 20), jnp.where(m, w, w * (1 - 0.01 * 20)), rtol=1e-6)
    np.testing.assert_array_equal(at(5 + 50), jnp.where(m, w, 0))  # fine-tune: binary


def test_compressed_export_import_matmul():
    k = jax.random.split(jax.random.PRNGKey(2), 3)
    params = {"a": {"kernel": jax.random.normal(k[0], (32, 12))},
              "b": {"kernel": jax.random.normal(k[1], (12, 3))}}
    rules = [(r"a/kernel", "2:8")]
    exported = nm.export_nm(params, rules)
    c = nm.NMCompressed.from_export(exported["a"]["kernel"])
    assert c.values.shape == (4, 2, 12) and c.indices.dtype == jnp.uint8
    assert int(c.indices.max()) < 8
    assert exported["b"]["kernel"] is params["b"]["kernel"]  # not selected: kept as is
    w = params["a"]["kernel"]
    masked = jnp.where(nm.nm_mask(w, 2, 8, axis=0), w, 0)
    np.testing.assert_array_equal(nm.import_nm(exported)["a"]["kernel"], masked)
    np.testing.assert_array_equal(nm.import_nm(exported)["b"]["kernel"], params["b"]["kernel"])
    x = jax.random.normal(k[2], (7, 32))
    np.testing.assert_allclose(nm_matmul_reference(x, c), x @ masked, rtol=1e-5, atol=1e-5)
    conv = jax.random.normal(k[0], (3, 3, 16, 8))
    cc = nm.compress_nm(conv, 1, 4)  # input channels of a conv kernel
    np.testing.assert_array_equal(nm.decompress_nm(cc), jnp.where(nm.nm_mask(conv, 1, 4), conv, 0))
    with pytest.raises(ValueError, match="needs a 2-D"):
        nm_matmul_reference(x, cc)


def test_diagnostics_flip_rate_and_pruned_gradients():
    params = {"k": {"kernel": jax.random.normal(jax.random.PRNGKey(3), (16, 8))}}
    tx = nm.sr_ste(optax.sgd(0.5), [(r".*kernel", "1:4")], diagnostics_every=1)
    state = tx.init(params)
    grads = {"k": {"kernel": jax.random.normal(jax.random.PRNGKey(4), (16, 8))}}
    m0 = nm.nm_mask(params["k"]["kernel"], 1, 4)
    u, state = tx.update(grads, state, params)
    p1 = optax.apply_updates(params, u)
    g_pruned = np.asarray(grads["k"]["kernel"])[~np.asarray(m0)]
    assert float(state.diagnostics["pruned_grad_norm"]) == pytest.approx(np.linalg.norm(g_pruned), rel=1e-5)
    assert float(state.diagnostics["pruned_grad_var"]) == pytest.approx(np.var(g_pruned), rel=1e-4)
    # flips between the mask this step's forward used and the next one's (of p1)
    m1 = nm.nm_mask(p1["k"]["kernel"], 1, 4)
    assert float(jnp.mean(m1 != m0)) > 0
    assert float(state.diagnostics["flip_rate"]) == pytest.approx(float(jnp.mean(m1 != m0)))
    np.testing.assert_array_equal(state.masks["k"]["kernel"], m1)
    _, state = tx.update(jax.tree.map(jnp.zeros_like, grads), state, p1)  # p1 unchanged
    assert float(state.diagnostics["flip_rate"]) == 0.0


def test_sharded_equals_single_device_and_orbax_round_trip(tmp_path):
    params = {"a": {"kernel": jax.random.normal(jax.random.PRNGKey(5), (32, 16))},
              "b": {"kernel": jax.random.normal(jax.random.PRNGKey(6), (16, 8)), "bias": jnp.zeros(8)}}
    x = jax.random.normal(jax.random.PRNGKey(7), (4, 32))
    tx = nm.mdgf(optax.adam(1e-2), [(r"a/kernel", "1:8"), (r"b/kernel", 0.75)], alpha=0.05)

    def step(p, s):
        loss = lambda q: jnp.sum(jnp.tanh(x @ q["a"]["kernel"]) @ q["b"]["kernel"] + q["b"]["bias"]) ** 2  # noqa: E731
        g = jax.grad(lambda q: loss(tx.forward(q, s)))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def run(fn, p, s):
        for _ in range(4):
            p, s = fn(p, s)
        return p, s

    p1, s1 = run(jax.jit(step), params, tx.init(params))
    mesh = make_mesh((2, 4), ("data", "model"))
    p_sh = param_shardings(params, [(r".*kernel", (None, "model"))], mesh)
    s_sh = shardings_like_params(jax.eval_shape(tx.init, params), params, p_sh, mesh)
    with jax.set_mesh(mesh):
        fn = jax.jit(step, in_shardings=(p_sh, s_sh), out_shardings=(p_sh, s_sh))
        ps = jax.device_put(params, p_sh)
        p8, s8 = run(fn, ps, jax.jit(tx.init, out_shardings=s_sh)(ps))
    assert s8.masks["a"]["kernel"].sharding.spec == P(None, "model")
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(s1.masks), jax.tree.leaves(s8.masks), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt = Checkpointer(tmp_path)
    ckpt.save(4, s8, data_position=4)
    ckpt.wait()
    target = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                          jax.eval_shape(tx.init, params), s_sh)
    restored, _ = ckpt.restore(target)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(s8), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_input_names_the_path():
    params = {"enc": {"kernel": jnp.ones((12, 4))}, "b": jnp.ones(())}
    with pytest.raises(ValueError, match="'enc/kernel': N:M pattern 4:4 needs 0 < N < M"):
        nm.nm_ste(optax.sgd(0.1), [(r"enc/kernel", "4:4")]).init(params)
    with pytest.raises(ValueError, match="'enc/kernel': N:M pattern 5:4 needs"):
        nm.nm_ste(optax.sgd(0.1), [(r"enc/kernel", "5:4")]).init(params)
    with pytest.raises(ValueError, match="'enc/kernel': axis 0 of shape \\(12, 4\\) has size 12, "
                                         "not divisible by M=8"):
        nm.nm_ste(optax.sgd(0.1), [(r"enc/kernel", "1:8")]).init(params)
    with pytest.raises(ValueError, match="unknown decay 'cosine'"):
        nm.mdgf(optax.sgd(0.1), [(r"enc/kernel", "1:4")], decay="cosine")
    with pytest.raises(ValueError, match=r"N:M rules match no parameter: \['dec/.*'\]"):
        nm.nm_ste(optax.sgd(0.1), [(r"dec/.*", "2:4")]).init(params)
    with pytest.raises(ValueError, match="'enc/kernel': SDGF geometric frame 8:32 needs axis size 12"):
        nm.sdgf(optax.sgd(0.1), [(r"enc/kernel", "1:4")], schedule="geometric",
                sparse_steps=10).init(params)
    with pytest.raises(ValueError, match="needs sparse_steps"):
        nm.nm_sparse(optax.sgd(0.1), [(r"enc/kernel", "1:4")], schedule="stepwise")


def test_diagnostics_cadence_changes_nothing_but_the_diagnostics():
    """Every 3rd update measures (counts 0, 3, 6): between, the values of the last
    measurement are held; 0 measures nothing; updates and masks never change."""
    params = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (16, 8))}
    txs = {e: sparsejax.sr_ste(optax.adam(1e-2), [("kernel", "2:4")], diagnostics_every=e)
           for e in (1, 3, 0)}
    states = {e: tx.init(params) for e, tx in txs.items()}
    assert set(states[3].diagnostics) == {"flip_rate", "pruned_grad_norm", "pruned_grad_var"}
    assert states[0].diagnostics == {}
    p, every_step = params, []
    for i in range(7):
        g = jax.grad(lambda q: jnp.sum(jnp.sin(sparsejax.forward(q, states[1])["kernel"] * (i + 1))))(p)
        out = {e: jax.jit(tx.update)(g, states[e], p) for e, tx in txs.items()}
        for e in (3, 0):
            np.testing.assert_array_equal(out[e][0]["kernel"], out[1][0]["kernel"])
            np.testing.assert_array_equal(out[e][1].masks["kernel"], out[1][1].masks["kernel"])
        states = {e: o[1] for e, o in out.items()}
        every_step.append(states[1].diagnostics)
        measured = every_step[i - i % 3]  # the last update whose count was a multiple of 3
        for k, v in states[3].diagnostics.items():
            assert float(v) == float(measured[k]), (i, k)
        p = optax.apply_updates(p, out[1][0])
    assert states[0].diagnostics == {}
    assert len({float(d["pruned_grad_norm"]) for d in every_step}) == 7  # they do change
    for bad in ("no", -1, True, 1.5):
        with pytest.raises(TypeError, match=f"diagnostics_every must be an int >= 0 .*got {bad!r}"):
            sparsejax.sr_ste(optax.adam(1e-2), diagnostics_every=bad)
