"""experiments/bench_sparsity: its rows describe sparse training, or the run fails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_sparsity as bench


def test_dense_training_that_looks_sparse_fails_the_bench():
    params = bench.mlp_init([16, 32, 32, 4], jax.random.PRNGKey(0))
    with pytest.raises(AssertionError, match=r"rigl: the forward weights have density 1\.000 "
                                             r"over 1536 weights, expected 0\.100"):
        bench._check_forward("rigl", params, ["l0/kernel", "l1/kernel"], 0.1)
    half = jax.tree.map(lambda x: x.at[::2].set(0.0), params)
    assert bench._check_forward("sr_ste_2:4", half, ["l0/kernel", "l1/kernel"], 0.5) == 0.5


def test_expected_density_per_layer():
    shapes = {"l0/kernel": (784, 64), "l1/kernel": (64, 64)}
    assert bench._expected_density("rigl", shapes, 0.9) == pytest.approx(0.1)
    # the 784-wide first layer at 1:16, the other at 1:32
    want = (784 * 64 / 16 + 64 * 64 / 32) / (784 * 64 + 64 * 64)
    assert bench._expected_density("sr_ste_1:32", shapes, 0.9, 16) == pytest.approx(want)


def test_user_loop_rows_are_sparse_and_never_update():
    rows = bench.bench_steps("user", (32, 64, 64, 10), 16, 0.9, steps=1, update_steps=1,
                             rounds=1, wanted=("rigl", "sr_ste_2:4"))
    assert list(rows) == ["dense", "rigl", "sr_ste_2:4"]
    assert rows["dense"]["ratio"] == 1.0 and rows["dense"]["forward_density"] == 1.0
    assert rows["rigl"]["masks_changed"] is False
    assert abs(rows["rigl"]["forward_density"] - 0.1) < 0.01  # ERK keeps the total
    assert rows["sr_ste_2:4"]["forward_density"] == 0.5
    assert all(np.isfinite(r["step_ms"]) and r["step_ms"] > 0 for r in rows.values())


def test_user_step_passes_the_schedule_only_to_scheduled_transforms():
    """static has no schedule (one program, no flag); rigl's updates are never due here,
    so only its mask_update=False program is compiled."""
    runner = bench.UserRunner("static", (8, 16, 4), 4, 0.5)
    assert runner.tx.mask_update_due is None and runner.step._cache_size() == 1
    runner = bench.UserRunner("rigl", (8, 16, 4), 4, 0.5)
    assert not runner.tx.mask_update_due(runner.count)
    assert runner.step._cache_size() == 1  # never due: only the mask_update=False program
    w = runner.forward_params()["l0"]["kernel"]
    assert int(jnp.sum(w != 0)) == round(0.5 * w.size)


def test_paired_ratio_and_target_verdict():
    """Same-round ratios (a noisy round hits both alike), their quartiles, and the verdict
    against a target; by hand: ratios 0.9, 1.0, 1.1, 1.2, 1.5."""
    out = bench._paired([9, 20, 11, 12, 15], [10, 20, 10, 10, 10], 1.15)
    assert out["paired_ratio"] == pytest.approx(1.1) and out["meets"] is True
    assert out["paired_iqr"] == pytest.approx([1.0, 1.2])
    assert bench._paired([12, 13], [10, 10], 1.15)["meets"] is False
    assert "meets" not in bench._paired([12], [10], None)
    assert bench.TARGETS["trainer"]["rigl"] == bench.TARGETS["user"]["rigl"] == 1.03
    assert bench.TARGETS["user"]["sr_ste_1:32"] == 1.3


@pytest.mark.parametrize("method", ["threshold", "sort"])
def test_timed_mask_update_is_rigl_drop_and_grow(method):
    """Part 2's timed update against a numpy RigL reference: keep the largest active
    ``|w|``, grow the largest ``|g|`` among the rest (distinct values: no ties)."""
    rng = np.random.default_rng(0)
    w = rng.permutation(2000).reshape(40, 50).astype(np.float32) + 1
    g = rng.permutation(2000).reshape(40, 50).astype(np.float32)
    m = np.zeros(2000, bool)
    m[rng.choice(2000, 200, replace=False)] = True
    m = m.reshape(40, 50)
    kept, grown = bench.drop_and_grow(jnp.asarray(w), jnp.asarray(g), jnp.asarray(m),
                                      jax.random.PRNGKey(0), method=method,
                                      drop_fraction=0.3, noise_std=0.0)
    order = np.argsort(-np.where(m, np.abs(w), -1).ravel())[:140]   # 200 − 60 dropped
    want_kept = np.zeros(2000, bool)
    want_kept[order] = True
    # 60 grown among all not kept (a dropped weight may come back)
    order = np.argsort(-np.where(want_kept.reshape(m.shape), -1, np.abs(g)).ravel())[:60]
    want_grown = np.zeros(2000, bool)
    want_grown[order] = True
    np.testing.assert_array_equal(np.asarray(kept).ravel(), want_kept)
    np.testing.assert_array_equal(np.asarray(grown).ravel(), want_grown)
