"""Run integrity: bad arguments are errors naming them, and the fixed numeric behaviour.

Optimizer hyperparameters, model sizes, step arguments of the sparsity transforms,
gradual pruning landing on its target, Spark statistical top-k on non-finite entries, and
gradients that do not match the parameters.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

import sparsejax
from sparsejax.activations import normal_ppf, statistical_threshold, statistical_topk
from sparsejax.masks import mask_counts
from sparsejax.models import MLP, DecoderLM, ResNet, ViT
from sparsejax.schedules import is_update_step
from sparsejax.train.optim import make_optimizer, make_schedule

# ----------------------------------------------------------------------------- 1. optimizer


@pytest.mark.parametrize("kwargs, message", [
    ({"learning_rate": -0.1}, r"config\.optimizer\.learning_rate must be a finite number > 0, "
                              r"got -0\.1"),
    ({"learning_rate": float("nan")}, r"learning_rate must be a finite number > 0, got nan"),
    ({"learning_rate": 0.0}, r"learning_rate must be a finite number > 0, got 0\.0"),
    ({"learning_rate": True}, r"learning_rate must be a finite number > 0, got True"),
    ({"warmup_steps": -5}, r"config\.optimizer\.warmup_steps must be a non-negative integer, "
                           r"got -5"),
    ({"warmup_steps": 2.5}, r"warmup_steps must be a non-negative integer, got 2\.5"),
    ({"warmup_steps": 100}, r"warmup_steps must be < decay_steps=100 with the cosine schedule"),
    ({"warmup_steps": 150}, r"warmup_steps must be < decay_steps=100 .*got 150"),
    ({"weight_decay": -1e-4}, r"config\.optimizer\.weight_decay must be a finite number >= 0, "
                              r"got -0\.0001"),
    ({"weight_decay": float("inf")}, r"weight_decay must be a finite number >= 0, got inf"),
    ({"momentum": -0.9}, r"config\.optimizer\.momentum must be a finite number >= 0, got -0\.9"),
    ({"momentum": float("nan")}, r"momentum must be a finite number >= 0, got nan"),
    ({"momentum": 1.0}, r"config\.optimizer\.momentum must be < 1, got 1\.0"),
    ({"grad_clip": -1.0}, r"config\.optimizer\.grad_clip must be a finite number > 0, got -1\.0"),
    ({"grad_clip": float("nan")}, r"grad_clip must be a finite number > 0, got nan"),
])
def test_make_optimizer_rejects_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_optimizer(decay_steps=100, **{"name": "sgd", **kwargs})


def test_make_schedule_rejects_bad_values_directly():
    with pytest.raises(ValueError, match=r"learning_rate must be a finite number > 0, got -0\.1"):
        make_schedule(100, -0.1)
    with pytest.raises(ValueError, match=r"warmup_steps must be a non-negative integer, got -1"):
        make_schedule(100, 0.1, "constant", warmup_steps=-1)
    with pytest.raises(ValueError, match=r"config.optimizer.decay_steps must be a positive "
                                         r"integer, got 0"):
        make_schedule(0, 0.1)


def test_schedule_values_at_the_warmup_limits():
    # cosine, warm-up 99 of 100 steps: linear 0 → 1e-3 over 99 steps, then one decay step.
    lr = make_schedule(100, 1e-3, "cosine", warmup_steps=99)
    assert [float(lr(t)) for t in (0, 99, 100)] == pytest.approx([0.0, 1e-3, 0.0], abs=1e-9)
    assert float(lr(33)) == pytest.approx(1e-3 * 33 / 99, rel=1e-5)
    # 'constant' has no warm-up: any non-negative warmup_steps is accepted and unused.
    lr = make_schedule(10, 0.1, "constant", warmup_steps=50)
    assert [float(lr(t)) for t in (0, 9)] == pytest.approx([0.1, 0.1])


@pytest.mark.parametrize("grad_clip", [0, 0.0, None])
def test_grad_clip_zero_or_none_disables_clipping(grad_clip):
    opt = make_optimizer(decay_steps=100, name="sgd", learning_rate=0.1, schedule="constant",
                         weight_decay=0.0, momentum=0.0, grad_clip=grad_clip)
    params = {"w": jnp.zeros(2)}
    updates, _ = opt.update({"w": jnp.array([3.0, 4.0])}, opt.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.3, -0.4], rtol=1e-6)   # −0.1·g, unclipped


# ----------------------------------------------------------------------------- 2. models


@pytest.mark.parametrize("build, message", [
    (lambda: MLP(8, (0,), 2, rngs=nnx.Rngs(0)), r"hidden must be positive integers, got \(0,\)"),
    (lambda: MLP(8, (-5,), 2, rngs=nnx.Rngs(0)), r"hidden must be positive integers, got \(-5,\)"),
    (lambda: MLP(8, [16, 2.5], 2, rngs=nnx.Rngs(0)),
     r"hidden must be positive integers, got \[16, 2\.5\]"),
    (lambda: MLP(0, (4,), 2, rngs=nnx.Rngs(0)), r"in_features must be a positive integer, got 0"),
    (lambda: MLP(8, (4,), True, rngs=nnx.Rngs(0)),
     r"num_classes must be a positive integer, got True"),
    (lambda: ViT(image_size=8, patch_size=0, in_channels=1, num_classes=10, rngs=nnx.Rngs(0)),
     r"patch_size must be a positive integer, got 0"),
    (lambda: ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10, d_model=-64,
                 rngs=nnx.Rngs(0)), r"d_model must be a positive integer, got -64"),
    (lambda: ViT(image_size=8, patch_size=2, in_channels=1, num_classes=10, num_heads=0,
                 rngs=nnx.Rngs(0)), r"num_heads must be a positive integer, got 0"),
    (lambda: DecoderLM(vocab_size=0, max_len=8, rngs=nnx.Rngs(0)),
     r"vocab_size must be a positive integer, got 0"),
    (lambda: DecoderLM(vocab_size=16, max_len=8, num_layers=1.5, rngs=nnx.Rngs(0)),
     r"num_layers must be a positive integer, got 1\.5"),
    (lambda: DecoderLM(vocab_size=16, max_len=8, d_ff=0, rngs=nnx.Rngs(0)),
     r"d_ff must be a positive integer, got 0"),
    (lambda: ResNet(depth=8.0, rngs=nnx.Rngs(0)), r"depth must be a positive integer, got 8\.0"),
    (lambda: ResNet(depth=8, width=0, rngs=nnx.Rngs(0)),
     r"width must be a finite number > 0, got 0"),
    (lambda: ResNet(depth=8, width=float("nan"), rngs=nnx.Rngs(0)),
     r"width must be a finite number > 0, got nan"),
    (lambda: ResNet(depth=8, num_classes=0, rngs=nnx.Rngs(0)),
     r"num_classes must be a positive integer, got 0"),
])
def test_models_reject_sizes_that_are_not_positive_integers(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_models_accept_numpy_integer_sizes():
    model = MLP(np.int64(8), [np.int32(16)], 3, rngs=nnx.Rngs(0))
    assert [layer.kernel.shape for layer in model.layers] == [(8, 16)]
    assert model(jnp.ones((2, 8))).shape == (2, 3)
    assert MLP(8, (), 3, rngs=nnx.Rngs(0))(jnp.ones((2, 8))).shape == (2, 3)   # linear


# ----------------------------------------------------------------------------- 3. steps

_SGD = optax.sgd(0.1)


@pytest.mark.parametrize("build, message", [
    (lambda: sparsejax.rigl(_SGD, 0.9, end_step=100, update_every=1.5),
     r"update_every must be a positive integer, got 1\.5"),
    (lambda: sparsejax.set_(_SGD, 0.9, end_step=100, update_every=0),
     r"update_every must be a positive integer, got 0"),
    (lambda: sparsejax.rigl(_SGD, 0.9, end_step=100, update_every=True),
     r"update_every must be a positive integer, got True"),
    (lambda: sparsejax.rigl(_SGD, 0.9, end_step=100, begin_step=-10),
     r"begin_step must be a non-negative integer, got -10"),
    (lambda: sparsejax.set_(_SGD, 0.9, end_step=75.5),
     r"end_step must be a non-negative integer, got 75\.5"),
    (lambda: sparsejax.gradual_magnitude(_SGD, 0.9, begin_step=0, end_step=100,
                                         update_every=2.5),
     r"update_every must be a positive integer, got 2\.5"),
    (lambda: sparsejax.gradual_magnitude(_SGD, 0.9, begin_step=1.0, end_step=100),
     r"begin_step must be a non-negative integer, got 1\.0"),
    (lambda: sparsejax.gradual_magnitude(_SGD, 0.9, begin_step=50, end_step=10),
     r"need 0 <= begin_step <= end_step, got 50, 10"),
    (lambda: sparsejax.mdgf(_SGD, dense_steps=1.5),
     r"dense_steps must be a non-negative integer, got 1\.5"),
    (lambda: sparsejax.mdgf(_SGD, sparse_steps=-3),
     r"sparse_steps must be a non-negative integer, got -3"),
    (lambda: sparsejax.sdgf(_SGD, [(".*", "1:8")], sparse_steps=100.0),
     r"sparse_steps must be a non-negative integer, got 100\.0"),
    (lambda: sparsejax.sr_ste(_SGD, finetune_steps=-1),
     r"finetune_steps must be a non-negative integer, got -1"),
])
def test_step_arguments_must_be_integers(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_numpy_integer_steps_give_the_same_masks_as_python_ints():
    params = {"dense": {"kernel": jax.random.normal(jax.random.PRNGKey(0), (16, 8))}}
    grads = jax.tree.map(lambda w: jnp.cos(w), params)
    masks = []
    for every, end in ((2, 10), (np.int64(2), np.int32(10))):
        tx = sparsejax.rigl(optax.sgd(0.1), 0.75, update_every=every, end_step=end)
        state = tx.init(params)
        for _ in range(3):
            _, state = tx.update(grads, state, params)
        masks.append(np.asarray(state.masks["dense"]["kernel"]))
    np.testing.assert_array_equal(*masks)
    assert masks[0].sum() == 32   # 25% of 128 kept


# ----------------------------------------------------------------------------- 4. gradual

LR = 0.01


def _gradual_params():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"a": {"kernel": jax.random.normal(k[0], (64, 64)), "bias": jnp.zeros(64)},
              "b": {"kernel": jax.random.normal(k[1], (9, 7))}}
    grads = {"a": {"kernel": jax.random.normal(k[2], (64, 64)), "bias": jnp.ones(64)},
             "b": {"kernel": jax.random.normal(k[3], (9, 7))}}
    return params, grads


def _run_gradual(end_step: int, steps: int):
    """Masks after every step of gradual_magnitude(sgd(LR)) under a constant gradient."""
    params, grads = _gradual_params()
    tx = sparsejax.gradual_magnitude(optax.sgd(LR), 0.9, begin_step=0, end_step=end_step,
                                     update_every=10)
    state, update = tx.init(params), jax.jit(tx.update)
    history = []
    for _ in range(steps):
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        history.append({p: np.asarray(m) for p, m in
                        (("a/kernel", state.masks["a"]["kernel"]),
                         ("b/kernel", state.masks["b"]["kernel"]))})
    return history, params


def _reference_gradual(end_step: int, steps: int, update_at_end: bool):
    """Zhu & Gupta by hand in numpy: SGD step on active weights, then at update steps keep
    the largest |w| among the active ones, ``max(round((1 − s_t)·n), final)`` of them
    (exactly ``final`` at an update at ``end_step``); ties to the lower flat index."""
    params, grads = _gradual_params()
    out = {}
    for name in ("a", "b"):
        w, g = np.asarray(params[name]["kernel"]), np.asarray(grads[name]["kernel"])
        n = w.size
        final = round(0.1 * n)   # the count rule of layer_counts for one layer, 0.9 sparse
        m = np.ones(w.shape, bool)
        history = []
        for t in range(steps):
            w = np.where(m, w + np.float32(-LR) * g, 0).astype(np.float32)
            due = (t <= end_step and t % 10 == 0) or (update_at_end and t == end_step)
            if due:
                s_final = 1.0 - final / n
                s_t = s_final * (1.0 - (1.0 - min(t / end_step, 1.0)) ** 3)
                keep = final if t == end_step else max(round((1.0 - s_t) * n), final)
                score = np.where(m, np.abs(w), -1.0).ravel()
                order = np.lexsort((np.arange(n), -score))   # largest first, lower index
                m = np.zeros(n, bool)
                m[order[:keep]] = True
                m = m.reshape(w.shape)
                w = np.where(m, w, 0).astype(np.float32)
            history.append(m)
        out[f"{name}/kernel"] = history
    return out


def test_gradual_lands_exactly_on_its_target_when_end_step_is_off_the_grid():
    history, params = _run_gradual(end_step=75, steps=80)
    final = {"a/kernel": 410, "b/kernel": 6}   # round(0.1·4096), round(0.1·63)
    assert final == {p: round(0.1 * m.size) for p, m in history[-1].items()}
    # the update at 70 leaves the big layer one weight short of its target ...
    assert {p: int(m.sum()) for p, m in history[70].items()} == {"a/kernel": 411, "b/kernel": 6}
    # ... the one at end_step = 75 lands on it, and it stays there
    for t in (75, 79):
        assert {p: int(m.sum()) for p, m in history[t].items()} == final
    assert mask_counts({"a": {"kernel": jnp.asarray(history[-1]["a/kernel"])}}) == {
        "a/kernel": (410, 4096)}
    assert int((params["a"]["kernel"] != 0).sum()) == 410   # pruned weights are exact zeros
    # every step's masks are the hand reference's
    ref = _reference_gradual(75, 80, update_at_end=True)
    for t in range(80):
        for p in final:
            np.testing.assert_array_equal(history[t][p], ref[p][t], err_msg=f"{p} step {t}")
    # without the update at end_step (the old schedule) the target is missed
    old = _reference_gradual(75, 80, update_at_end=False)
    assert int(old["a/kernel"][-1].sum()) == 411


def test_gradual_masks_unchanged_when_end_step_is_on_the_grid():
    history, _ = _run_gradual(end_step=80, steps=85)
    old = _reference_gradual(80, 85, update_at_end=False)   # the schedule before the fix
    for t in range(85):
        for p in ("a/kernel", "b/kernel"):
            np.testing.assert_array_equal(history[t][p], old[p][t], err_msg=f"{p} step {t}")
    assert int(history[-1]["a/kernel"].sum()) == 410


def test_rigl_and_set_keep_no_update_at_end_step():
    steps = [t for t in range(100) if is_update_step(t, 10, 0, 75)]
    assert steps == [0, 10, 20, 30, 40, 50, 60, 70]            # unchanged default
    assert [t for t in range(100) if is_update_step(t, 10, 0, 75, at_end=True)] == steps + [75]
    params, grads = _gradual_params()
    for factory in (sparsejax.rigl, sparsejax.set_):
        tx = factory(optax.sgd(LR), 0.8, end_step=75, update_every=10, drop_fraction=0.5,
                     drop_fraction_anneal="constant")
        state, update, p = tx.init(params), jax.jit(tx.update), params
        masks = []
        for _ in range(80):
            updates, state = update(grads, state, p)
            p = optax.apply_updates(p, updates)
            masks.append(np.asarray(state.masks["a"]["kernel"]))
        assert not np.array_equal(masks[69], masks[70])     # the update at 70 happened
        for t in range(71, 80):                             # and none at 75
            np.testing.assert_array_equal(masks[t], masks[70])


# ----------------------------------------------------------------------------- 5. Spark


def _old_statistical_topk(x, density, mode, threshold_grad="stop"):
    """The formula before non-finite handling (the reference for finite rows)."""
    z = normal_ppf(1.0 - density)
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mu = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
    pos = var > 0
    std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)
    theta = (mu + std * z).astype(x.dtype)
    if threshold_grad == "stop":
        theta = lax.stop_gradient(theta)
    if mode == "soft":
        return jnp.maximum(x - theta, jnp.zeros((), x.dtype))
    return jnp.where(x > theta, x, jnp.zeros((), x.dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("threshold_grad", ["stop", "through"])
def test_finite_rows_are_bit_identical_to_the_plain_formula(dtype, mode, threshold_grad):
    x = (3 * jax.random.normal(jax.random.PRNGKey(1), (8, 257))).astype(dtype)
    for density in (0.05, 0.5):
        new = statistical_topk(x, density, mode=mode, threshold_grad=threshold_grad)
        old = _old_statistical_topk(x, density, mode, threshold_grad)
        assert new.dtype == old.dtype
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
        def grad(f):
            return np.asarray(jax.grad(lambda v: f(v).astype(jnp.float32).sum())(x), np.float32)
        g_new = grad(lambda v: statistical_topk(v, density, mode=mode,
                                                threshold_grad=threshold_grad))
        g_old = grad(lambda v: _old_statistical_topk(v, density, mode, threshold_grad))
        if threshold_grad == "stop":
            np.testing.assert_array_equal(g_new, g_old)
        else:   # same formula, summed in another order: equal up to float32 rounding
            np.testing.assert_allclose(g_new, g_old, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["soft", "hard"])
@pytest.mark.parametrize("threshold_grad", ["stop", "through"])
def test_non_finite_entries_are_left_out_and_stay_visible(mode, threshold_grad):
    finite = jax.random.normal(jax.random.PRNGKey(2), (3, 16))
    x = finite.at[0, 3].set(jnp.nan).at[1, 5].set(jnp.inf).at[2, 7].set(-jnp.inf)
    x = x.at[1, 9].set(jnp.nan)
    out = np.asarray(statistical_topk(x, 0.25, mode=mode, threshold_grad=threshold_grad))
    theta = np.asarray(statistical_threshold(x, 0.25))
    for row, bad in ((0, [3]), (1, [5, 9]), (2, [7])):
        keep = np.array([j for j in range(16) if j not in bad])
        # as if the rest were absent (the sums run over zeros in their place: same terms,
        # another summation order, so equal up to float32 rounding)
        ref_row = np.asarray(_old_statistical_topk(x[row, keep], 0.25, mode))
        np.testing.assert_allclose(out[row, keep], ref_row, rtol=1e-6, atol=1e-7)
        ref_theta = np.asarray(statistical_threshold(x[row, keep], 0.25))
        np.testing.assert_allclose(theta[row], ref_theta, rtol=1e-6)
    assert np.isnan(out[0, 3]) and np.isnan(out[1, 9])          # NaN stays where it was
    assert out[1, 5] == np.inf and out[2, 7] == 0.0             # +inf kept, −inf dropped
    assert np.isnan(out).sum() == 2                             # and nowhere else
    # gradients: finite at finite entries, the plain formula's on the finite entries
    g = np.asarray(jax.grad(lambda v: jnp.nansum(jnp.where(jnp.isfinite(v), statistical_topk(
        v, 0.25, mode=mode, threshold_grad=threshold_grad), 0.0)))(x))
    fin = np.isfinite(np.asarray(x))
    assert np.all(np.isfinite(g[fin]))
    keep = np.array([j for j in range(16) if j != 3])
    g_ref = np.asarray(jax.grad(lambda v: _old_statistical_topk(
        v, 0.25, mode, threshold_grad).sum())(x[0, keep]))
    np.testing.assert_allclose(g[0, keep], g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_a_row_without_finite_entries_has_threshold_inf(mode):
    x = jnp.array([[jnp.nan, jnp.inf, -jnp.inf, jnp.inf], [1.0, 2.0, 3.0, 4.0]])
    theta = np.asarray(statistical_threshold(x, 0.5))
    assert theta[0, 0] == np.inf and theta[1, 0] == 2.5
    out = np.asarray(statistical_topk(x, 0.5, mode=mode))
    np.testing.assert_array_equal(out[0], [np.nan, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(out[1], [0.0, 0.0, 0.5, 1.5] if mode == "soft"
                                  else [0.0, 0.0, 3.0, 4.0])
    for tg in ("stop", "through"):
        g = np.asarray(jax.grad(lambda v: statistical_topk(
            v, 0.5, mode=mode, threshold_grad=tg)[1].sum())(x))
        assert np.all(np.isfinite(g[1]))


# ----------------------------------------------------------------------------- 6. grads


def _layers():
    return {"layers": [{"kernel": jnp.arange(32.).reshape(8, 4) - 16, "bias": jnp.zeros(4)}]}


TRANSFORMS = {
    "rigl": lambda: sparsejax.rigl(optax.adam(1e-3), 0.5, end_step=10, update_every=1),
    "static_sparse": lambda: sparsejax.static_sparse(optax.sgd(0.1), 0.5),
    "sr_ste": lambda: sparsejax.sr_ste(optax.sgd(0.1), [(r".*kernel", "2:4")]),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("jit", [False, True])
def test_gradient_dtype_mismatch_names_the_parameter(name, jit):
    params = _layers()
    tx = TRANSFORMS[name]()
    state = tx.init(params)
    grads = jax.tree.map(lambda w: jnp.ones_like(w, jnp.float16), params)
    update = jax.jit(tx.update) if jit else tx.update
    with pytest.raises(ValueError, match=r"gradient of parameter 'layers/0/bias' is float16 "
                                         r"\(4,\), the parameter float32 \(4,\): cast the "
                                         r"gradients to the parameter dtype"):
        update(grads, state, params)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_gradient_shape_or_structure_mismatch_names_the_parameter(name):
    params = _layers()
    tx = TRANSFORMS[name]()
    state = tx.init(params)
    grads = {"layers": [{"kernel": jnp.ones((4, 8)), "bias": jnp.ones(4)}]}
    with pytest.raises(ValueError, match=r"gradient of parameter 'layers/0/kernel' is float32 "
                                         r"\(4, 8\), the parameter float32 \(8, 4\): pass the "
                                         r"gradients of the parameters given to update"):
        tx.update(grads, state, params)
    with pytest.raises(ValueError, match=r"grads and params differ in structure: parameters "
                                         r"without a gradient \['layers/0/bias'\]"):
        tx.update({"layers": [{"kernel": jnp.ones((8, 4))}]}, state, params)
    with pytest.raises(ValueError, match="need params"):
        tx.update(jax.tree.map(jnp.ones_like, params), state)


def test_matching_gradients_still_update_as_before():
    # static_sparse with SGD: active weights move by −0.1·g, inactive ones become 0.
    params = _layers()
    tx = sparsejax.static_sparse(optax.sgd(0.1), 0.5, mask_init="random")
    state = tx.init(params)
    m = np.asarray(state.masks["layers"][0]["kernel"])
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, state, params)
    new = optax.apply_updates(params, updates)
    w = np.asarray(params["layers"][0]["kernel"])
    np.testing.assert_allclose(new["layers"][0]["kernel"], np.where(m, w - 0.1, 0.0), rtol=1e-6)
    np.testing.assert_allclose(new["layers"][0]["bias"], -0.1 * np.ones(4), rtol=1e-6)
    assert math.isclose(m.mean(), 0.5)
