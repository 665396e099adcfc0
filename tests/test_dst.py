"""Weight-sparsity transforms: hand-worked updates, invariants, sharding, bad input."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import PartitionSpec as P

import sparsejax
from sparsejax.masks import mask_counts
from sparsejax.train.sharding import make_mesh, param_shardings, shardings_like_params

W = jnp.array([[0.5, -0.1, 0.0], [0.0, 0.3, -0.05]])
M0 = jnp.array([[True, True, False], [False, True, True]])
G = jnp.array([[0.1, 0.2, -0.9], [0.4, 0.0, 0.05]])


def _hand_state(tx, params, mask):
    state = tx.init(params)
    ones = jax.tree.map(lambda x: x + 1.0, state.inner)  # nonzero moments everywhere
    return state._replace(masks={"kernel": mask}, inner=ones)


def test_rigl_hand_worked_update():
    # n_active=4, f=0.5 → n_drop=2. Keep the 2 largest |w| among active: (0,0)=.5, (1,1)=.3.
    # Grow 2 among the other 4 by |g|: (0,2)=.9 and (1,0)=.4. Gradient step skipped.
    tx = sparsejax.rigl(optax.sgd(0.1, momentum=0.9), 1 / 3, end_step=10, update_every=1,
                        drop_fraction=0.5, drop_fraction_anneal="constant", drop_noise_std=0.0)
    params = {"kernel": W}
    state = _hand_state(tx, params, M0)
    updates, new = tx.update({"kernel": G}, state, params)
    want_mask = np.array([[1, 0, 1], [1, 1, 0]], bool)
    np.testing.assert_array_equal(new.masks["kernel"], want_mask)
    kept = np.array([[1, 0, 0], [0, 1, 0]], bool)  # kept weights unchanged, the rest 0
    np.testing.assert_array_equal(optax.apply_updates(params, updates)["kernel"],
                                  np.where(kept, np.asarray(W), 0))
    # momentum: kept weights untouched; new connections and inactive weights hold 0
    trace = new.inner[0].trace["kernel"]
    np.testing.assert_array_equal(trace, np.where(kept, 1.0, 0.0))
    assert int(new.count) == 1


def test_set_applies_gradient_then_drops_and_regrows_at_zero():
    tx = sparsejax.set_(optax.sgd(0.1), 1 / 3, end_step=10, update_every=1, drop_fraction=0.5,
                        drop_fraction_anneal="constant", drop_noise_std=0.0)
    params = {"kernel": W}
    state = tx.init(params)._replace(masks={"kernel": M0})
    updates, new = tx.update({"kernel": G}, state, params)
    out = optax.apply_updates(params, updates)["kernel"]
    m = np.asarray(new.masks["kernel"])
    # after the step: .49 and .3 are the largest active; -.12 and -.055 are dropped
    assert m[0, 0] and m[1, 1] and m.sum() == 4
    np.testing.assert_allclose(out[0, 0], 0.49, rtol=1e-6)
    np.testing.assert_allclose(out[1, 1], 0.3, rtol=1e-6)
    o = np.asarray(out)
    new_connections = m & ~np.asarray(M0)
    assert np.all(o[new_connections] == 0)  # born at zero
    # a just-dropped weight that is regrown keeps its stepped value (reinit_when_same=False)
    for (i, j), stepped in {(0, 1): -0.12, (1, 2): -0.055}.items():
        assert o[i, j] == (pytest.approx(stepped, rel=1e-6) if m[i, j] else 0.0)
    assert np.all(o[~m] == 0)


@functools.lru_cache(maxsize=None)
def _jitted(method, shape, sparsity, selection, skip):
    factory = sparsejax.rigl if method == "rigl" else sparsejax.set_
    tx = factory(optax.adam(1e-2), sparsity, end_step=10_000, update_every=2,
                 distribution=sparsejax.erk(), selection=selection,
                 skip_gradient_on_update=skip)
    return tx, jax.jit(tx.update)


@settings(max_examples=12, deadline=None)
@given(st.sampled_from(["rigl", "set"]), st.sampled_from([(8, 16), (5, 7), (32, 3)]),
       st.sampled_from([0.5, 0.8, 0.95]), st.sampled_from(["sort", "threshold"]),
       st.booleans(), st.integers(0, 1000), st.sampled_from([0.0, 0.05, 0.3]))
def test_counts_are_exactly_preserved_even_with_nan_grads(method, shape, sparsity, selection,
                                                          skip, seed, bad_frac):
    tx, update = _jitted(method, shape, sparsity, selection, skip)
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = {"a": {"kernel": jax.random.normal(k[0], shape), "bias": jnp.zeros(shape[1])},
              "b": {"kernel": jax.random.normal(k[1], (shape[1], 4))}}
    state = tx.init(params)
    counts = mask_counts(state.masks)
    rng = np.random.default_rng(seed)
    for step in range(6):
        grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), params)
        if step % 2 == 0:  # NaN and inf in the gradient on update steps
            g = np.asarray(grads["a"]["kernel"]).copy()
            g[rng.random(g.shape) < bad_frac] = np.nan
            g[rng.random(g.shape) < bad_frac / 2] = np.inf
            grads["a"]["kernel"] = jnp.asarray(g)
        old = state.masks
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        assert mask_counts(state.masks) == counts
        seen = tx.forward(params, state)
        for name in ("a", "b"):
            w, m = np.asarray(params[name]["kernel"]), np.asarray(state.masks[name]["kernel"])
            assert np.all(np.asarray(seen[name]["kernel"])[~m] == 0)  # the model sees zeros
            if bad_frac == 0:  # and, while weights stay finite, they are stored as zeros
                assert np.all(w[~m] == 0)
        if step % 2 == 1:  # not an update step: masks unchanged
            for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(state.masks)):
                np.testing.assert_array_equal(a, b)


def test_moments_reset_for_any_optimizer_structure():
    inner = optax.chain(optax.clip_by_global_norm(1.0),
                        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3))
    tx = sparsejax.rigl(inner, 0.5, end_step=10, update_every=1, drop_fraction=0.5,
                        drop_fraction_anneal="constant")
    params = {"l": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (6, 8))}}
    state = tx.init(params)
    state = state._replace(inner=jax.tree.map(lambda x: x + 1, state.inner))
    grads = {"l": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (6, 8))}}
    _, new = tx.update(grads, state, params)
    born = np.asarray(new.masks["l"]["kernel"] & ~state.masks["l"]["kernel"])
    assert 0 < born.sum() <= math.floor(0.5 * 24)  # the rest regrew just-dropped weights
    adam = new.inner[1].inner_state[0]
    for moment in (adam.mu["l"]["kernel"], adam.nu["l"]["kernel"]):
        np.testing.assert_array_equal(np.asarray(moment)[born], 0)
        active = np.asarray(new.masks["l"]["kernel"])
        np.testing.assert_array_equal(np.asarray(moment)[active & ~born], 1)
        np.testing.assert_array_equal(np.asarray(moment)[~active], 0)


def test_gradual_follows_zhu_gupta():
    tx = sparsejax.gradual_magnitude(optax.sgd(0.01), 0.9, begin_step=0, end_step=10,
                                     update_every=2)
    params = {"kernel": jax.random.normal(jax.random.PRNGKey(0), (10, 10))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    seen = []
    for t in range(12):
        grads = {"kernel": jnp.ones((10, 10)) * 0.01}
        prev = np.asarray(state.masks["kernel"])
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        m = np.asarray(state.masks["kernel"])
        assert np.all(m <= prev)  # pruned weights stay pruned
        if t % 2 == 0 and t <= 10:
            s_t = 0.9 + (0.0 - 0.9) * (1 - t / 10) ** 3
            seen.append((int(m.sum()), round((1 - s_t) * 100)))
    assert [a for a, _ in seen] == [b for _, b in seen]
    assert seen[-1][0] == 10


def test_static_and_one_shot():
    params = {"a": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (20, 30))},
              "b": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (30, 5))}}
    tx = sparsejax.static_sparse(optax.sgd(0.1), 0.8, distribution=sparsejax.erk(), seed=3)
    state = tx.init(params)
    fwd = tx.forward(params, state)
    np.testing.assert_array_equal(fwd["a"]["kernel"],
                                  jnp.where(state.masks["a"]["kernel"], params["a"]["kernel"], 0))
    _, state2 = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    for a, b in zip(jax.tree.leaves(state.masks), jax.tree.leaves(state2.masks)):
        np.testing.assert_array_equal(a, b)
    one = sparsejax.one_shot_magnitude(optax.sgd(0.1), 0.8, scope="global").init(params)
    flat = np.concatenate([np.abs(params["a"]["kernel"]).ravel(),
                           np.abs(params["b"]["kernel"]).ravel()])
    thresh = np.sort(flat)[::-1][round(0.2 * flat.size) - 1]
    got = np.concatenate([np.asarray(one.masks["a"]["kernel"]).ravel(),
                          np.asarray(one.masks["b"]["kernel"]).ravel()])
    np.testing.assert_array_equal(got, flat >= thresh)


@pytest.mark.parametrize("selection", ["sort", "threshold"])
def test_sharded_mask_updates_equal_single_device(selection):
    params = {"l0": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (16, 32)),
                     "bias": jnp.zeros(32)},
              "l1": {"kernel": jax.random.normal(jax.random.PRNGKey(1), (32, 8))}}
    tx = sparsejax.rigl(optax.adam(1e-2), 0.8, end_step=100, update_every=2,
                        selection=selection, distribution=sparsejax.erk())
    grads = [jax.tree.map(lambda x, i=i: jax.random.normal(jax.random.PRNGKey(10 + i), x.shape),
                          params) for i in range(4)]

    def run(update, p, s):
        for g in grads:
            u, s = update(g, s, p)
            p = optax.apply_updates(p, u)
        return p, s

    p1, s1 = run(jax.jit(tx.update), params, tx.init(params))
    mesh = make_mesh((2, 4), ("data", "model"))
    p_sh = param_shardings(params, [(r".*kernel", (None, "model"))], mesh)
    s_abs = jax.eval_shape(tx.init, params)
    s_sh = shardings_like_params(s_abs, params, p_sh, mesh)
    with jax.set_mesh(mesh):
        init = jax.jit(tx.init, out_shardings=s_sh)
        update = jax.jit(tx.update, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
        ps = jax.device_put(params, p_sh)
        p8, s8 = run(update, ps, init(ps))
    assert s8.masks["l0"]["kernel"].sharding.spec == P(None, "model")
    for a, b in zip(jax.tree.leaves(s1.masks), jax.tree.leaves(s8.masks), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_bad_input_names_the_problem():
    params = {"enc": {"kernel": jnp.ones((4, 4))}, "scale": jnp.ones(())}
    with pytest.raises(ValueError, match="sparsity 1.0 is outside"):
        sparsejax.rigl(optax.sgd(0.1), 1.0, end_step=10)
    with pytest.raises(ValueError, match="sparsity -0.2 is outside"):
        sparsejax.static_sparse(optax.sgd(0.1), -0.2)
    with pytest.raises(ValueError, match="unknown distribution 'erkk'"):
        sparsejax.get_distribution("erkk")
    with pytest.raises(ValueError, match=r"rules match no parameter: \['dec/.*'\]"):
        sparsejax.rigl(optax.sgd(0.1), 0.5, end_step=10, rules=[("dec/.*", "sparse")]).init(params)
    with pytest.raises(ValueError, match="scalar parameter 'scale'"):
        sparsejax.static_sparse(optax.sgd(0.1), 0.5, rules=[("scale", "sparse")]).init(params)
    with pytest.raises(ValueError, match="sparsity 2.0 for parameter 'enc/kernel'"):
        sparsejax.static_sparse(optax.sgd(0.1), 0.5, rules=[("enc/kernel", 2.0)]).init(params)
    with pytest.raises(ValueError, match="drop_fraction 1.5"):
        sparsejax.set_(optax.sgd(0.1), 0.5, end_step=10, drop_fraction=1.5)
    with pytest.raises(ValueError, match="unknown selection method 'heap'"):
        sparsejax.rigl(optax.sgd(0.1), 0.5, end_step=10, selection="heap")
    with pytest.raises(ValueError, match="need params"):
        tx = sparsejax.static_sparse(optax.sgd(0.1), 0.5)
        tx.update({"enc": {"kernel": jnp.ones((4, 4))}, "scale": jnp.ones(())},
                  tx.init(params))
