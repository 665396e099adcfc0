"""Sparsity that composes: every transform under every optax wrapper and nnx.Optimizer.

The matrix: each transform × {plain, chain(clip, tx), multi_transform, masked,
MultiSteps(tx), inner inject_hyperparams, schedule-free inner, nnx.Optimizer}. At every
step the weights the model computes with are checked against an independent definition:
for DST, ``where(m, w, 0)`` with exactly the configured count of ``m``; for N:M, a numpy
top-N-of-M mask of the stored weights, the MDGF β schedule and the SDGF frames. Then the
placements that would lose sparsity, which must be errors when the optimizer is built.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax
from sparsejax import paths


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.a = nnx.Linear(16, 8, rngs=rngs)
        self.b = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


X = jax.random.normal(jax.random.PRNGKey(1), (32, 16))
Y = jax.random.normal(jax.random.PRNGKey(2), (32, 4))
SPARSITY = 0.75
K = {"a/kernel": round(0.25 * 128), "b/kernel": round(0.25 * 32)}  # uniform: each layer 25%
STEPS = 4


def reference_nm(w, n, m, axis=-2):
    """Keep the n largest |w| of each m consecutive entries along axis (ties: lower index)."""
    w = np.moveaxis(np.abs(np.asarray(w, np.float64)), axis, -1)
    g = w.reshape(*w.shape[:-1], -1, m)
    order = np.argsort(-g, axis=-1, kind="stable")
    keep = np.zeros(g.shape, bool)
    np.put_along_axis(keep, order[..., :n], True, axis=-1)
    return np.moveaxis(keep.reshape(w.shape), -1, axis)


def make_tx(name, inner):
    return {
        "static": lambda: sparsejax.static_sparse(inner, SPARSITY),
        "one_shot": lambda: sparsejax.one_shot_magnitude(inner, SPARSITY),
        "gradual": lambda: sparsejax.gradual_magnitude(inner, SPARSITY, begin_step=0, end_step=2,
                                                       update_every=1),
        "set": lambda: sparsejax.set_(inner, SPARSITY, end_step=8, update_every=1),
        "rigl": lambda: sparsejax.rigl(inner, SPARSITY, end_step=8, update_every=1),
        "nm_ste": lambda: sparsejax.nm_ste(inner),
        "sr_ste": lambda: sparsejax.sr_ste(inner),
        "mdgf": lambda: sparsejax.mdgf(inner, decay="linear", alpha=0.5),
        "sdgf": lambda: sparsejax.sdgf(inner, sparse_steps=4),
    }[name]()


ADAM = lambda: optax.adam(1e-2)  # noqa: E731
LABELS = {"a": {"kernel": "s", "bias": "d"}, "b": {"kernel": "s", "bias": "d"}}
KERNELS = {"a": {"kernel": True, "bias": False}, "b": {"kernel": True, "bias": False}}
WRAPPERS = {
    "plain": lambda mk: mk(ADAM()),
    "chain": lambda mk: optax.chain(optax.clip_by_global_norm(1.0), mk(ADAM())),
    "multi_transform": lambda mk: optax.multi_transform({"s": mk(ADAM()), "d": ADAM()}, LABELS),
    "masked": lambda mk: optax.masked(mk(ADAM()), KERNELS),
    "multisteps": lambda mk: optax.MultiSteps(mk(ADAM()), every_k_schedule=2),
    "inject_inner": lambda mk: mk(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)),
    "schedule_free": lambda mk: mk(optax.contrib.schedule_free_adamw(1e-2, warmup_steps=0)),
    "nnx_optimizer": lambda mk: mk(ADAM()),
}
METHODS = ["static", "one_shot", "gradual", "set", "rigl", "nm_ste", "sr_ste", "mdgf", "sdgf"]


def check_seen(name, seen, stored, state, t):
    """The model's weights at optimizer step t, against the method's definition."""
    (_, s), = sparsejax.sparsity_states(state)
    masks = dict(paths.named_leaves(s.masks))
    for path in ("a/kernel", "b/kernel"):
        w, got, m = np.asarray(stored[path]), np.asarray(seen[path]), np.asarray(masks[path])
        if name in ("static", "one_shot", "set", "rigl", "gradual"):
            want = K[path] if name != "gradual" or t >= 3 else None
            if want is not None:
                assert m.sum() == want, (path, t)
            else:
                assert K[path] <= m.sum() <= m.size
            np.testing.assert_array_equal(got, np.where(m, w, 0))
            if t > 0:  # the stored weights are exactly sparse after an update
                assert np.count_nonzero(w[~m]) == 0
        else:
            n, mm = (3, 4) if name == "sdgf" and t < 2 else (2, 4)
            np.testing.assert_array_equal(m, reference_nm(w, n, mm))
            beta = max(0.0, 1 - 0.5 * t) if name == "mdgf" else 0.0
            np.testing.assert_allclose(got, np.where(m, w, beta * w), rtol=1e-6, atol=0)
    for path in ("a/bias", "b/bias"):
        np.testing.assert_array_equal(seen[path], stored[path])  # dense leaves untouched


def run_optax(name, wrapper):
    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(params)
    tx = WRAPPERS[wrapper](lambda inner: make_tx(name, inner))
    state = tx.init(params)

    @jax.jit
    def step(p, s):
        def loss(q):
            seen = sparsejax.forward(q, s)
            return jnp.mean((nnx.merge(graphdef, seen)(X) - Y) ** 2), seen
        (_, seen), g = jax.value_and_grad(loss, has_aux=True)(p)
        u, s_new = tx.update(g, s, p)
        return optax.apply_updates(p, u), s_new, seen

    for i in range(STEPS):
        t = i // 2 if wrapper == "multisteps" else i
        new_params, new_state, seen = step(params, state)
        check_seen(name, dict(paths.named_leaves(seen)), dict(paths.named_leaves(params)), state, t)
        params, state = new_params, new_state


def run_nnx(name):
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_tx(name, ADAM()), wrt=nnx.Param)

    def loss_fn(model, x, y):
        return jnp.mean((model(x) - y) ** 2), nnx.to_pure_dict(nnx.state(model, nnx.Param))

    @nnx.jit
    def train_step(model, optimizer, x, y):
        (_, seen), grads = sparsejax.value_and_grad(loss_fn, optimizer, has_aux=True)(model, x, y)
        optimizer.update(model, grads)
        return seen

    for t in range(STEPS):
        stored = dict(paths.named_leaves(nnx.state(model, nnx.Param)))
        state = jax.tree.map(lambda v: v, optimizer.opt_state)
        seen = train_step(model, optimizer, X, Y)
        check_seen(name, dict(paths.named_leaves(seen)), stored, state, t)
    # after the loop the model object holds the stored weights, not the sparse view
    after = dict(paths.named_leaves(nnx.state(model, nnx.Param)))
    assert after["a/bias"].shape == (8,)


@pytest.mark.parametrize("wrapper", list(WRAPPERS))
@pytest.mark.parametrize("name", METHODS)
def test_every_transform_under_every_wrapper_is_exactly_sparse(name, wrapper):
    if wrapper == "nnx_optimizer":
        run_nnx(name)
    else:
        run_optax(name, wrapper)


# ----------------------------------------------------------------------------- errors


def _params():
    return nnx.to_pure_dict(nnx.state(MLP(nnx.Rngs(0)), nnx.Param))


def test_transform_after_a_sparse_one_in_chain_is_an_error_at_init():
    params = _params()
    for sparse in (sparsejax.rigl(ADAM(), 0.9, end_step=10), sparsejax.sr_ste(ADAM())):
        tx = sparsejax.as_sparse_transformation(optax.chain(sparse, optax.scale(0.5)))
        with pytest.raises(ValueError, match=r"followed by 1 more transformation\(s\) in "
                                             r"optax.chain.*Put them inside"):
            tx.init(params)
        raw = optax.chain(optax.chain(optax.clip(1.0), sparse), optax.scale(0.5))
        with pytest.raises(ValueError, match="followed by 1 more"):
            sparsejax.forward(params, raw.init(params))
    # before it is fine, and the forward is the transform's
    ok = sparsejax.as_sparse_transformation(
        optax.chain(optax.clip_by_global_norm(1.0), sparsejax.sr_ste(ADAM())))
    seen = ok.forward(params, ok.init(params))
    np.testing.assert_array_equal(np.asarray(seen["a"]["kernel"]) != 0,
                                  reference_nm(params["a"]["kernel"], 2, 4))


def test_multisteps_inside_a_sparse_transform_is_an_error_at_init():
    params = _params()
    for make in (lambda inner: sparsejax.rigl(inner, 0.9, end_step=10),
                 lambda inner: sparsejax.mdgf(inner)):
        tx = make(optax.MultiSteps(ADAM(), every_k_schedule=4))
        with pytest.raises(ValueError, match=r"MultiSteps inside a .* would count micro-steps"
                                             r".*optax.MultiSteps\(sparsejax.rigl"):
            tx.init(params)


def test_inject_hyperparams_of_a_sparse_factory_names_what_to_do():
    params = _params()
    tx = optax.inject_hyperparams(sparsejax.rigl)(ADAM(), sparsity=0.9, end_step=10)
    with pytest.raises(TypeError, match=r"sparsity, update_every, .*end_step.*: JAX array.*"
                                        r"inject the inner optimizer's hyperparameters instead"):
        tx.init(params)
    # injecting the inner optimizer's hyperparameters works, and the rate can be changed
    tx = sparsejax.static_sparse(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), 0.9)
    state = tx.init(params)
    state.inner.hyperparams["learning_rate"] = jnp.float32(0.0)
    u, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    active = np.asarray(state.masks["a"]["kernel"])
    assert np.all(np.asarray(u["a"]["kernel"])[active] == 0)  # lr 0: active weights stay


def test_two_transforms_owning_one_parameter_is_an_error():
    params = _params()
    inner = sparsejax.sr_ste(ADAM(), [(r"a/kernel", "2:4")])
    tx = sparsejax.rigl(inner, 0.5, end_step=10, rules=[(r"a/kernel", "sparse")])
    state = tx.init(params)
    with pytest.raises(ValueError, match="'a/kernel' is made sparse by two sparsity transforms"):
        sparsejax.forward(params, state)
    # disjoint ownership composes: each applies to its own parameter
    tx = sparsejax.rigl(sparsejax.sr_ste(ADAM(), [(r"b/kernel", "2:4")]), 0.5, end_step=10,
                        rules=[(r"a/kernel", "sparse")])
    seen = sparsejax.forward(params, tx.init(params))
    assert int(np.count_nonzero(seen["a"]["kernel"])) == 64
    np.testing.assert_array_equal(np.asarray(seen["b"]["kernel"]) != 0,
                                  reference_nm(params["b"]["kernel"], 2, 4))


def test_masks_for_other_parameters_are_an_error():
    params = _params()
    state = sparsejax.rigl(ADAM(), 0.9, end_step=10).init(params)
    with pytest.raises(ValueError, match=r"masks for \['b/kernel'\] have no parameter"):
        sparsejax.forward({"a": params["a"]}, state)
    other = jax.tree.map(lambda x: x, params)
    other["a"]["kernel"] = jnp.ones((16, 4))
    with pytest.raises(ValueError, match="'a/kernel' has shape \\(16, 4\\), its mask \\(16, 8\\)"):
        sparsejax.forward(other, state)


# ----------------------------------------------------------------------------- regressions


def test_schedule_free_eval_params_are_sparse():
    # was: eval params nonzero outside the mask (z kept the dense initial weights)
    params = _params()
    tx = sparsejax.rigl(optax.contrib.schedule_free_adamw(1e-2, warmup_steps=0), 0.75,
                        end_step=8, update_every=2)
    state = tx.init(params)
    for i in range(5):
        g = jax.grad(lambda q: jnp.sum(jnp.sin(sparsejax.forward(q, state)["a"]["kernel"])))(params)
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
    ev = optax.contrib.schedule_free_eval_params(state.inner, params)
    m = np.asarray(state.masks["a"]["kernel"])
    assert np.count_nonzero(np.asarray(ev["a"]["kernel"])[~m]) == 0
    assert np.count_nonzero(np.asarray(ev["a"]["kernel"])[m]) > 0


def test_multi_transform_masks_hold_masked_nodes_and_apply():
    params = _params()
    tx = optax.multi_transform({"s": sparsejax.rigl(ADAM(), 0.75, end_step=8), "d": ADAM()},
                               LABELS)
    state = tx.init(params)
    (_, s), = sparsejax.sparsity_states(state)
    assert isinstance(s.masks["a"]["bias"], optax.MaskedNode)
    seen = sparsejax.materialize(params, state)
    assert int(np.count_nonzero(seen["a"]["kernel"])) == K["a/kernel"]
    np.testing.assert_array_equal(seen["a"]["bias"], params["a"]["bias"])
    assert sparsejax.mask_counts(s.masks) == {"a/kernel": (32, 128), "b/kernel": (8, 32)}


def test_nnx_optimizer_paths_have_no_value_suffix():
    # was: init saw 'a/kernel/value', update saw 'a/kernel', so no rule matched both
    model = MLP(nnx.Rngs(0))
    opt = nnx.Optimizer(model, sparsejax.rigl(ADAM(), 0.5, end_step=4,
                                              rules=[(r"a/kernel", "sparse")]), wrt=nnx.Param)
    masks = dict(paths.named_leaves(sparsejax.paths.unbox(opt.opt_state.masks)))
    assert list(masks) == ["a/kernel"]
    assert [p for p, _ in paths.named_leaves(nnx.state(model, nnx.Param))][0] == "a/bias"
    with pytest.raises(ValueError, match=r"sparsity rules match no parameter: \['a/kernel/value'\]"):
        nnx.Optimizer(model, sparsejax.rigl(ADAM(), 0.5, end_step=4,
                                            rules=[(r"a/kernel/value", "sparse")]), wrt=nnx.Param)


def test_rules_accept_predicates():
    params = _params()
    big = lambda path, leaf: leaf.ndim == 2 and leaf.size > 64  # noqa: E731
    state = sparsejax.static_sparse(ADAM(), 0.5, rules=[(big, "sparse")]).init(params)
    assert sparsejax.mask_counts(state.masks) == {"a/kernel": (64, 128)}
    with pytest.raises(ValueError, match=r"rules match no parameter: \['<lambda>'\]"):
        sparsejax.static_sparse(ADAM(), 0.5, rules=[(lambda p, x: False, "sparse")]).init(params)


def test_sharded_forward_equals_single_device():
    from jax.sharding import NamedSharding, PartitionSpec as P

    params = _params()
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.multi_transform({"s": sparsejax.rigl(ADAM(), 0.75, end_step=8,
                                                                update_every=1),
                                            "d": ADAM()}, LABELS))
    mesh = jax.make_mesh((8,), ("model",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, "model") if x.ndim == 2 and x.shape[1] % 8 == 0 else P()))  # noqa: E731

    def run(p):
        s = tx.init(p)

        @jax.jit
        def step(p, s):
            g = jax.grad(lambda q: jnp.sum(jnp.tanh(X @ sparsejax.forward(q, s)["a"]["kernel"])))(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s
        for _ in range(3):
            p, s = step(p, s)
        return sparsejax.materialize(p, s), s

    single, _ = run(params)
    sharded, s = run(jax.tree.map(shard, params))
    (_, sp), = sparsejax.sparsity_states(s)
    assert sp.masks["a"]["kernel"].sharding.spec == P(None, "model")  # masks sharded like params
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert sparsejax.mask_counts(sp.masks)["a/kernel"] == (32, 128)
    assert np.count_nonzero(np.asarray(sharded["a"]["kernel"])[~np.asarray(sp.masks["a"]["kernel"])]) == 0


def test_explicit_sharding_mesh_masks_follow_params():
    # jax.make_mesh's default axes are Explicit: a replicated mask against a sharded kernel
    # does not type-check in where(m, w, 0), so masks take their parameter's sharding.
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((2, 4), ("data", "model"))

    class Sharded(nnx.Module):
        def __init__(self, rngs):
            init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "model"))
            self.a = nnx.Linear(16, 32, kernel_init=init, rngs=rngs)
            self.b = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.b(nnx.relu(self.a(x)))

    with jax.set_mesh(mesh):
        model = Sharded(nnx.Rngs(0))
        nnx.update(model, jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)),
                                       nnx.state(model), nnx.get_partition_spec(nnx.state(model))))
        tx = sparsejax.rigl(ADAM(), 0.75, end_step=8, update_every=2, rules=[(r"a/kernel", "sparse")])
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        x = jax.device_put(X, NamedSharding(mesh, P("data")))

        @nnx.jit
        def step(model, optimizer, x):
            loss, g = sparsejax.value_and_grad(lambda m: jnp.mean(m(x) ** 2), optimizer)(model)
            optimizer.update(model, g)
            return loss

        for _ in range(3):
            step(model, optimizer, x)
        (_, s), = sparsejax.sparsity_states(optimizer.opt_state)
        mask = s.masks["a"]["kernel"]
        assert mask.sharding.spec == model.a.kernel.get_value().sharding.spec == P(None, "model")
        seen = sparsejax.materialize(nnx.to_pure_dict(nnx.state(model, nnx.Param)), optimizer.opt_state)
    assert int(np.sum(np.asarray(mask))) == 128
    assert np.count_nonzero(np.asarray(seen["a"]["kernel"])[~np.asarray(mask)]) == 0


def test_default_rules_that_match_nothing_say_what_to_do():
    params = {"linear1": {"w": jnp.ones((4, 8)), "b": jnp.zeros(8)}}  # array-leaf modules
    for tx in (sparsejax.rigl(ADAM(), 0.5, end_step=4), sparsejax.sr_ste(ADAM())):
        with pytest.raises(ValueError, match=r"no (sparsity|N:M) rules were given, and the "
                                             r"default .* matches no parameter.*linear1/w.*"
                                             r"pass rules="):
            tx.init(params)
    state = sparsejax.rigl(ADAM(), 0.5, end_step=4, rules=[(r".*/w", "sparse")]).init(params)
    assert sparsejax.mask_counts(state.masks) == {"linear1/w": (16, 32)}
