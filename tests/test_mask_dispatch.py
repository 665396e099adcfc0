"""Two compiled steps: non-update steps leave the mask-update code out, with the same result.

A transform with a mask schedule (SET, RigL, gradual) exposes it on the host
(``tx.mask_update_due``); a loop passes ``mask_update`` as a static argument. The
reference for every check here is the single-program behaviour (``mask_update=True``
on every step, the update decided by ``lax.cond`` on the device).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sparsejax
from sparsejax.schedules import is_update_step
from sparsejax.train import loop, make_trainer, train_and_evaluate
from sparsejax.train.loop import MaskDispatch
from tests.test_integrity import _poisoned_digits, config, restore_all


def assert_same_run(a, b):
    """Masks, counts and keys equal; floats equal up to the rounding of a differently
    fused program (the two compiled steps are not the same XLA program)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("every,begin,end,at_end", [(10, 0, 75, True), (3, 5, 40, False),
                                                    (7, 2, 2, True), (100, 0, 7500, False)])
def test_host_schedule_equals_the_device_schedule(every, begin, end, at_end):
    ts = np.arange(0, 120)
    device = np.asarray(is_update_step(jnp.asarray(ts), every, begin, end, at_end))
    host = [is_update_step(int(t), every, begin, end, at_end) for t in ts]
    assert all(type(h) is bool for h in host)
    np.testing.assert_array_equal(device, np.array(host))


def _transforms():
    inner = optax.adamw(1e-2)
    kw = dict(rules=[(".*bias", "dense"), (".*", "sparse")])
    return {
        "rigl": sparsejax.rigl(inner, 0.75, end_step=12, update_every=3, **kw),
        "set": sparsejax.set_(inner, 0.75, end_step=12, update_every=4, begin_step=2, **kw),
        "gradual": sparsejax.gradual_magnitude(inner, 0.75, begin_step=1, end_step=10,
                                               update_every=3, **kw),
    }


def _params():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    return {"w1": {"kernel": jax.random.normal(k1, (16, 32)), "bias": jnp.zeros(32)},
            "w2": {"kernel": jax.random.normal(k2, (32, 8)), "bias": jnp.zeros(8)}}


def _run(tx, steps: int, dispatch: bool):
    params = _params()
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 16))

    def step(params, state, mask_update):
        def loss(p):
            p = tx.forward(p, state)
            return jnp.mean((jnp.tanh(x @ p["w1"]["kernel"] + p["w1"]["bias"])
                             @ p["w2"]["kernel"] + p["w2"]["bias"]) ** 2)
        g = jax.grad(loss)(params)
        updates, state = tx.update(g, state, params, mask_update=mask_update)
        return optax.apply_updates(params, updates), state

    step = jax.jit(step, static_argnums=2)
    state = tx.init(params)
    for count in range(steps):
        params, state = step(params, state, tx.mask_update_due(count) if dispatch else True)
    return params, state, step


@pytest.mark.parametrize("name", ["rigl", "set", "gradual"])
def test_dispatched_steps_equal_the_single_program(name):
    tx = _transforms()[name]
    assert [c for c in range(14) if tx.mask_update_due(c)] != []
    p_ref, s_ref, one = _run(tx, 14, dispatch=False)
    p, s, two = _run(tx, 14, dispatch=True)
    assert_same_run((p, s), (p_ref, s_ref))
    assert one._cache_size() == 1 and two._cache_size() == 2
    changed = any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(tx.init(_params()).masks), jax.tree.leaves(s.masks)))
    assert changed  # the masks really moved: the comparison covers update steps


def test_mask_update_false_when_due_gives_nan_never_the_old_masks():
    tx = _transforms()["rigl"]  # due at count 0, 3, 6, ...
    params = _params()
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, mask_update=False))
    grads = jax.tree.map(jnp.ones_like, params)
    due, _ = update(grads, state, params)  # count 0: due
    assert all(np.isnan(np.asarray(u)).all() for u in jax.tree.leaves(due))
    _, s1 = tx.update(grads, state, params)
    fine, _ = update(grads, s1, params)  # count 1: not due, the plain masked step
    ref, _ = tx.update(grads, s1, params)
    assert_same_run(fine, ref)


def test_mask_update_due_when_not_due_gives_nan_never_an_off_schedule_update():
    """'due' (no cond around the update) on a step whose count is not due: NaN, not masks
    changed off the schedule; on a due step, the cond program's result."""
    tx = _transforms()["rigl"]  # due at count 0, 3, 6, ...
    params = _params()
    grads = jax.tree.map(lambda p: jnp.linspace(-1.0, 1.0, p.size).reshape(p.shape), params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, mask_update="due"))
    state = tx.init(params)
    got, s_got = update(grads, state, params)  # count 0: due
    ref, s_ref = tx.update(grads, state, params)
    assert_same_run((got, s_got), (ref, s_ref))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.masks),
                                                        jax.tree.leaves(s_got.masks)))
    off, _ = update(grads, s_ref, params)  # count 1: not due
    assert all(np.isnan(np.asarray(u)).all() for u in jax.tree.leaves(off))


@pytest.mark.parametrize("bad", [jnp.bool_(True), "yes", 1])
def test_mask_update_must_be_a_python_bool_or_due(bad):
    tx, params = _transforms()["rigl"], _params()
    state = tx.init(params)
    with pytest.raises(TypeError, match=r"mask_update must be a Python bool or 'due', got "
                                        r".*static argument"):
        jax.jit(lambda s: tx.update(params, s, params, mask_update=bad))(state)
    assert state.count == 0  # nothing applied
    assert sparsejax.static_sparse(optax.sgd(0.1), 0.5).mask_update_due is None


def test_mask_dispatch_by_hand():
    due = lambda c: c % 5 == 0  # noqa: E731
    d = MaskDispatch(due)
    assert [s for s in range(1, 17) if d.mask_update(s)] == [1, 6, 11, 16]
    # step 6 finds count 5 if no step before it was skipped, 4 if one was: with 2 unread
    # steps the host cannot know, so it must read them first
    assert d.needs_sync(6, unread=2) and d.needs_sync(7, unread=2)
    assert d.needs_sync(8, unread=2) and not d.needs_sync(9, unread=2)
    assert not d.needs_sync(6, unread=0)
    d.skipped = 2
    assert [s for s in range(1, 17) if d.mask_update(s)] == [3, 8, 13]
    assert not MaskDispatch(None).needs_sync(6, unread=3) and MaskDispatch(None).mask_update(6)


def _capture_trainers(monkeypatch) -> list:
    made = []

    def capture(*a, **k):
        made.append(make_trainer(*a, **k))
        return made[-1]
    monkeypatch.setattr(loop, "make_trainer", capture)
    return made


def _rarely_read_config():
    """rigl,tiny (masks every 5 counts) whose loop reads the step statistics only at step
    20: only ``MaskDispatch.needs_sync`` makes it read the skipped step 7 before step 12."""
    return config("rigl,0.9,tiny", on_nonfinite="skip", log_every=20, eval_every=20,
                  checkpoint_every=20)


def test_the_loop_compiles_two_steps_and_skips_shift_the_updates(tmp_path, monkeypatch):
    """rigl,tiny updates masks every 5 counts; step 7 is skipped (NaN input), so the
    updates after it come one step later. The dispatched run equals the single-program
    run (every step mask_update=True): same masks, floats to rounding."""
    from sparsejax.train.data import batch_indices

    cfg = _rarely_read_config()
    example = int(batch_indices(1437, cfg.batch_size, cfg.seed, 6)[0])  # step 7's batch
    monkeypatch.setattr(loop, "get_dataset", _poisoned_digits(example))
    made = _capture_trainers(monkeypatch)
    train_and_evaluate(cfg, tmp_path / "two", progress=False)
    assert made[-1].step._cache_size() == 2
    with monkeypatch.context() as m:
        m.setattr(MaskDispatch, "mask_update", lambda self, step: True)
        train_and_evaluate(cfg, tmp_path / "one", progress=False)
    assert made[-1].step._cache_size() == 1
    two, one = restore_all(tmp_path / "two", cfg), restore_all(tmp_path / "one", cfg)
    assert sorted(two) == sorted(one) == [20]
    assert_same_run(two[20], one[20])
    assert int(two[20].opt_state.count) == 19  # one skipped step


def test_a_wrong_dispatch_in_the_loop_stops_the_run(tmp_path, monkeypatch):
    """A loop that passed mask_update=False on a due step would train with stale masks;
    instead that step is non-finite and the run stops naming it (rigl,tiny: due at 0)."""
    from sparsejax.train.loop import NonFiniteError

    monkeypatch.setattr(MaskDispatch, "mask_update", lambda self, step: False)
    with pytest.raises(NonFiniteError, match=r"step 1: the loss, gradients or parameters"):
        train_and_evaluate(config("rigl,0.9,tiny"), tmp_path, progress=False)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (0,), (2048, 10), (4, 1, 3)])
def test_count_true_equals_numpy(shape):
    from sparsejax.masks import count_true

    m = np.random.default_rng(0).random(shape) < 0.3
    assert int(count_true(jnp.asarray(m))) == int(m.sum())
    assert int(jax.jit(count_true)(jnp.asarray(m, jnp.uint8))) == int(m.sum())


def test_count_true_of_a_sharded_mask():
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sparsejax.masks import count_true

    m = np.random.default_rng(1).random((16, 24)) < 0.5
    mesh = jax.make_mesh((8,), ("model",))
    for spec in (P("model", None), P(None, "model")):
        x = jax.device_put(jnp.asarray(m), NamedSharding(mesh, spec))
        assert int(jax.jit(count_true)(x)) == int(m.sum())
