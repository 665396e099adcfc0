"""``forward(..., params_masked=True)``: weight-sparsity transforms keep the params masked,
so a step may compute with them as stored; ``mask_params`` and ``count_unmasked``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from configs import quickstart
from sparsejax.train import MaskViolation, train_and_evaluate


def _params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"a": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jnp.zeros(8)},
            "b": {"kernel": jax.random.normal(k2, (8, 4))},
            "c": {"kernel": jax.random.normal(k3, (8, 4))}}


TRANSFORMS = {
    "static": lambda inner: sparsejax.static_sparse(inner, 0.75),
    "one_shot": lambda inner: sparsejax.one_shot_magnitude(inner, 0.75),
    "gradual": lambda inner: sparsejax.gradual_magnitude(inner, 0.75, begin_step=0,
                                                        end_step=4, update_every=2),
    "set": lambda inner: sparsejax.set_(inner, 0.75, update_every=2, end_step=6),
    "rigl": lambda inner: sparsejax.rigl(inner, 0.75, update_every=2, end_step=6),
}


def _loss(p, x):
    h = jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"])
    return jnp.sum((h @ p["b"]["kernel"]) ** 2) + jnp.sum((h @ p["c"]["kernel"]) ** 2)


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_params_stay_masked_and_the_step_is_bit_identical(name):
    """From ``mask_params`` on, every update keeps the params exactly 0 outside the masks
    (mask-update steps included), and gradients and params equal those of the default
    masked forward bit for bit."""
    tx = TRANSFORMS[name](optax.adamw(1e-2))
    x = jax.random.normal(jax.random.PRNGKey(5), (6, 16))
    params = _params()
    state = tx.init(params)
    pruned = sum(int((~m).sum()) for m in jax.tree.leaves(state.masks))  # gradual: 0 at t=0
    assert int(sparsejax.count_unmasked(params, state)) == pruned  # dense init: not masked
    fast = sparsejax.mask_params(params, state)
    assert int(sparsejax.count_unmasked(fast, state)) == 0
    slow, s_fast, s_slow = params, state, state
    for _ in range(7):
        g_fast = jax.grad(lambda p: _loss(sparsejax.forward(p, s_fast, params_masked=True), x))(fast)
        g_slow = jax.grad(lambda p: _loss(sparsejax.forward(p, s_slow), x))(slow)
        for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_slow)):
            np.testing.assert_array_equal(a, b)
        u, s_fast = tx.update(g_fast, s_fast, fast)
        fast = optax.apply_updates(fast, u)
        u, s_slow = tx.update(g_slow, s_slow, slow)
        slow = optax.apply_updates(slow, u)
        assert int(sparsejax.count_unmasked(fast, s_fast)) == 0
        assert int(sparsejax.count_unmasked(slow, s_slow)) == 0  # one update masks them too
        for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(slow)):
            np.testing.assert_array_equal(a, b)


def test_nm_states_still_apply_their_forward_and_keep_dense_weights():
    rigl = sparsejax.rigl(optax.sgd(0.1), 0.5, rules=[("a/kernel", "sparse"), (".*", "dense")],
                          end_step=4)
    nm = sparsejax.sr_ste(optax.sgd(0.1), [("b/kernel|c/kernel", "2:4")])
    tx = optax.multi_transform({"r": rigl, "n": nm}, {"a": {"kernel": "r", "bias": "r"},
                                                       "b": {"kernel": "n"}, "c": {"kernel": "n"}})
    params = _params()
    state = tx.init(params)
    masked = sparsejax.mask_params(params, state)
    a = np.asarray(masked["a"]["kernel"])
    assert (a == 0).sum() == a.size // 2  # rigl's leaf masked
    np.testing.assert_array_equal(masked["b"]["kernel"], params["b"]["kernel"])  # N:M: dense
    fwd = sparsejax.forward(masked, state, params_masked=True)
    assert fwd["a"]["kernel"] is masked["a"]["kernel"]  # passed through
    b = np.asarray(fwd["b"]["kernel"]).reshape(2, 4, 4)
    assert (np.count_nonzero(b, axis=1) == 2).all()  # N:M forward still applied
    for u, v in zip(jax.tree.leaves(fwd), jax.tree.leaves(sparsejax.forward(masked, state))):
        np.testing.assert_array_equal(u, v)


def test_count_unmasked_counts_by_hand_nan_included():
    params = {"kernel": jnp.array([[1.0, 0.0], [2.0, 3.0]])}
    state = sparsejax.static_sparse(optax.sgd(0.1), 0.5, mask_init="magnitude").init(params)
    # kept: 3 and 2; pruned: 1 (nonzero) and 0 (zero) -> 1 entry unmasked
    assert np.asarray(state.masks["kernel"]).tolist() == [[False, False], [True, True]]
    assert int(sparsejax.count_unmasked(params, state)) == 1
    nan = {"kernel": jnp.array([[jnp.nan, -0.0], [2.0, 3.0]])}
    assert int(sparsejax.count_unmasked(nan, state)) == 1  # NaN counts, -0.0 does not
    assert int(jax.jit(sparsejax.count_unmasked)(sparsejax.mask_params(nan, state), state)) == 0


def _leaky(tx):
    """``tx`` whose updates also move every weight by 1e-3: it breaks the masks."""
    def update(grads, state, params=None, **kw):
        u, state = tx.update(grads, state, params, **kw)
        return jax.tree.map(lambda x: x + 1e-3, u), state
    return sparsejax.SparseTransformation(tx.init, update, tx.forward, tx.mask_update_due)


def test_the_loop_stops_when_params_leave_their_masks(tmp_path):
    cfg = quickstart.get_config("tiny")
    cfg.log_every = 5
    tx = _leaky(sparsejax.static_sparse(optax.sgd(0.1), 0.9))
    with pytest.raises(MaskViolation, match=r"step 5: \d+ parameter entries are nonzero where "
                                            r"their sparsity masks are 0"):
        train_and_evaluate(cfg, tmp_path, tx=tx, progress=False)
    assert not (tmp_path / "checkpoints" / "5").exists()  # nothing after the violation saved
    # the honest transform trains through with its params masked at every log step
    summary = train_and_evaluate(quickstart.get_config("tiny"), tmp_path / "ok",
                                 tx=sparsejax.static_sparse(optax.sgd(0.1), 0.9),
                                 progress=False)
    assert summary["train_sparsity"] == pytest.approx(0.9, abs=0.01)
