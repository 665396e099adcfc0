"""FLOP accounting: hand-computed counts per layer, attribution through sparsity
transforms and sub-jaxprs, sparse scaling, and the RigL per-step formulas."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import sparsejax
from sparsejax import flops as F
from sparsejax.models import MLP
from sparsejax.nn.layers import Block

ACT = F.ACTIVATION_KEY


def _dense_linear_params(key, dims):
    keys = jax.random.split(key, len(dims) - 1)
    return {f"w{i}": jax.random.normal(k, (a, b)) for i, (k, a, b) in
            enumerate(zip(keys, dims[:-1], dims[1:]))}


def test_mlp_kernels_attributed_by_path():
    model = MLP(64, (32,), 10, rngs=nnx.Rngs(0))
    got = F.model_flops(model, lambda m: m(jnp.ones((4, 64))))
    assert got == {"layers/0/kernel": 2 * 4 * 64 * 32, "head/kernel": 2 * 4 * 32 * 10,
                   ACT: 0}
    assert all(type(v) is int for v in got.values())
    assert F.total(got) == 2 * 4 * 64 * 32 + 2 * 4 * 32 * 10


def test_conv_same_strided_and_grouped():
    call = lambda m: m(jnp.ones((2, 8, 8, 3)))  # noqa: E731
    same = nnx.Conv(3, 8, (3, 3), padding="SAME", rngs=nnx.Rngs(0))
    assert F.model_flops(same, call) == {"kernel": 2 * 2 * 8 * 8 * 8 * 3 * 3 * 3, ACT: 0}
    strided = nnx.Conv(3, 8, (3, 3), strides=2, padding="SAME", rngs=nnx.Rngs(0))
    assert F.model_flops(strided, call)["kernel"] == 2 * 2 * 4 * 4 * 8 * 3 * 3 * 3
    valid = nnx.Conv(3, 8, (3, 3), padding="VALID", rngs=nnx.Rngs(0))
    assert F.model_flops(valid, call)["kernel"] == 2 * 2 * 6 * 6 * 8 * 3 * 3 * 3
    # 2 groups of 2 input channels each: every output sees 3·3·2 inputs.
    grouped = nnx.Conv(4, 8, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    grouped_call = lambda m: m(jnp.ones((2, 8, 8, 4)))  # noqa: E731
    assert F.model_flops(grouped, grouped_call)["kernel"] == 2 * 2 * 8 * 8 * 8 * 3 * 3 * 2


def test_attention_block_projections_and_activation_matmuls():
    b, t, d, h, d_ff = 2, 6, 16, 2, 24
    dh = d // h
    block = Block(d, h, d_ff, activation="relu", causal=True, rngs=nnx.Rngs(0))
    got = F.model_flops(block, lambda m: m(jnp.ones((b, t, d))))
    proj = 2 * b * t * d * d
    assert got == {
        "attn/q/kernel": proj, "attn/k/kernel": proj, "attn/v/kernel": proj,
        "attn/o/kernel": proj,
        "mlp/up/kernel": 2 * b * t * d * d_ff, "mlp/down/kernel": 2 * b * t * d_ff * d,
        ACT: 2 * (2 * b * h * t * t * dh),  # q·kᵀ and probs·v
    }


def test_attribution_through_masking_expressions():
    params = _dense_linear_params(jax.random.key(0), (8, 16, 4))
    x = jnp.ones((3, 8))
    expected = {"w0": 2 * 3 * 8 * 16, "w1": 2 * 3 * 16 * 4, ACT: 0}

    def ste(p, x):  # what a straight-through sparsity transform feeds the model
        p = jax.tree.map(lambda w: w + jax.lax.stop_gradient(jnp.where(w > 0, w, 0) - w), p)
        return jax.nn.relu(x @ p["w0"]) @ p["w1"]

    def masked(p, masks, x):  # w * m with the masks passed in as an argument
        p = jax.tree.map(lambda w, m: w * m, p, masks)
        return jax.nn.relu(x @ p["w0"].astype(jnp.bfloat16).T.T) @ p["w1"]

    def frozen(p, x):
        return jax.nn.relu(x @ jax.lax.stop_gradient(p["w0"])) @ p["w1"]

    masks = jax.tree.map(lambda w: w > 0, params)
    assert F.layer_flops(ste, params, x) == expected
    assert F.layer_flops(frozen, params, x) == expected
    assert F.layer_flops(masked, params, masks, x) == expected


def test_activation_is_not_mistaken_for_the_bias_it_was_added_to():
    # Batch 1 with no nonlinearity: x@w0 + b0 has b0's shape, but it is an activation.
    params = {"w0": jnp.ones((8, 16)), "b0": jnp.ones((1, 16)), "w1": jnp.ones((4, 16))}

    def fn(p, x):
        h = x @ p["w0"] + p["b0"]          # [1, 16]
        return p["w1"] @ h.T               # kernel on the lhs, activation on the rhs

    got = F.layer_flops(fn, params, jnp.ones((1, 8)))
    assert got == {"w0": 2 * 8 * 16, "w1": 2 * 4 * 16, ACT: 0}


def test_parameter_broadcast_into_an_input_is_not_that_parameter():
    # x * g has x's shape, not g's: the rhs is an input scaled by g, the kernel is w.
    params = {"w": jnp.ones((4, 8)), "g": jnp.ones((8, 1))}
    got = F.layer_flops(lambda p, x: p["w"] @ (x * p["g"]), params, jnp.ones((8, 3)))
    assert got == {"w": 2 * 4 * 8 * 3, ACT: 0}


def test_contraction_of_two_parameters_goes_to_the_rhs():
    params = {"a": jnp.ones((4, 8)), "b": jnp.ones((8, 2))}
    got = F.layer_flops(lambda p, x: x @ (p["a"] @ p["b"]), params, jnp.ones((3, 4)))
    # a@b is attributed to b (the kernel position); x@(a@b) has an activation as kernel.
    assert got == {"b": 2 * 4 * 8 * 2, ACT: 2 * 3 * 4 * 2}


def test_sub_jaxprs_jit_remat_custom_vjp_scan_cond_while():
    @jax.custom_vjp
    def ste(w):
        return jnp.where(w > 0, w, 0.0)

    ste.defvjp(lambda w: (ste(w), None), lambda _, g: (g,))
    layers, dim, b = 5, 8, 3
    params = {"ws": jnp.ones((layers, dim, dim)), "w": jnp.ones((dim, dim))}

    def fn(p, x):
        y = jax.jit(jax.checkpoint(lambda w, x: x @ ste(w)))(p["w"], x)
        y, _ = jax.lax.scan(lambda c, w: (c @ w, None), y, p["ws"])
        y = jax.lax.cond(y.sum() > 0, lambda y: y @ p["w"] @ p["w"], lambda y: y, y)
        return jax.lax.while_loop(lambda c: c.sum() < 0, lambda c: c @ p["w"], y)

    one = 2 * b * dim * dim
    got = F.layer_flops(fn, params, jnp.ones((b, dim)))
    # jit+remat+custom_vjp: 1, cond's most expensive branch: 2, while body counted once: 1
    assert got == {"ws": layers * one, "w": (1 + 2 + 1) * one, ACT: 0}


def test_shard_map_counts_every_shard():
    mesh = jax.make_mesh((4, 2), ("data", "model"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    params = {"w": jnp.ones((8, 6))}
    x = jnp.ones((16, 8))
    with jax.set_mesh(mesh):
        fn = lambda p, x: jax.shard_map(lambda a, w: a @ w, in_specs=(P("data"), P()),
                                        out_specs=P("data"), axis_names={"data"})(x, p["w"])
        got = F.layer_flops(fn, params, x)
    assert got == {"w": 2 * 16 * 8 * 6, ACT: 0}


def test_pallas_call_uses_cost_estimate():
    from jax.experimental import pallas as pl

    def kernel(x_ref, w_ref, o_ref):
        o_ref[...] = x_ref[...] @ w_ref[...]

    def call(cost):
        return lambda p, x: pl.pallas_call(
            kernel, out_shape=jax.ShapeDtypeStruct((8, 8), jnp.float32), interpret=True,
            cost_estimate=cost)(x, p["w"])

    params, x = {"w": jnp.ones((8, 8))}, jnp.ones((8, 8))
    est = pl.CostEstimate(flops=1234, transcendentals=0, bytes_accessed=0)
    assert F.layer_flops(call(est), params, x) == {"w": 1234, ACT: 0}
    with pytest.warns(UserWarning, match="cost_estimate"):
        assert F.layer_flops(call(None), params, x) == {ACT: 0}


def test_dense_total_matches_xla_cost_analysis_for_matmuls():
    # XLA's CPU cost model counts 2·M·N·K per dot; with no elementwise ops the totals agree.
    params = _dense_linear_params(jax.random.key(1), (32, 48, 16, 8))
    x = jnp.ones((5, 32))
    fn = lambda p, x: x @ p["w0"] @ p["w1"] @ p["w2"]
    xla = jax.jit(fn).lower(params, x).compile().cost_analysis()["flops"]
    assert F.total(F.layer_flops(fn, params, x)) == xla == 2 * 5 * (32 * 48 + 48 * 16 + 16 * 8)


def test_sparse_flops_scales_by_density():
    dense = {"layers/0/kernel": 16384, "head/kernel": 2560, ACT: 100}
    got = F.sparse_flops(dense, {"layers/0/kernel": 0.5, "embed/embedding": 0.1})
    assert got == {"layers/0/kernel": 8192.0, "head/kernel": 2560.0, ACT: 100.0}
    assert F.sparse_flops(dense, {ACT: 0.5})[ACT] == 100.0  # activations are never scaled
    with pytest.raises(ValueError, match="head/kernel"):
        F.sparse_flops(dense, {"head/kernel": 1.5})


def test_densities_from_masks_feed_sparse_flops():
    model = MLP(64, (32,), 10, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    masks = jax.tree.map(lambda w: None, params)
    masks["layers"][0]["kernel"] = jnp.arange(64 * 32).reshape(64, 32) % 4 == 0
    dens = F.densities_from_masks(masks)
    assert dens == {"layers/0/kernel": 0.25}
    got = F.sparse_flops(F.model_flops(model, lambda m: m(jnp.ones((4, 64)))), dens)
    assert got == {"layers/0/kernel": 2 * 4 * 64 * 32 / 4, "head/kernel": 2 * 4 * 32 * 10, ACT: 0}


def test_flops_through_a_library_transform_forward():
    # The model sees tx.forward(params, state) = w + stop_gradient(where(m, w, 0) - w).
    model = MLP(64, (32,), 10, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
    tx = sparsejax.rigl(optax.sgd(0.1), 0.75, end_step=100)
    state = tx.init(params)
    fn = lambda p, x: nnx.merge(graphdef, tx.forward(p, state), rest)(x)
    dense = F.layer_flops(fn, params, jnp.ones((4, 64)))
    assert dense == {"layers/0/kernel": 2 * 4 * 64 * 32, "head/kernel": 2 * 4 * 32 * 10, ACT: 0}
    dens = F.densities_from_masks(state.masks)
    assert dens == {"layers/0/kernel": 0.25, "head/kernel": 0.25}
    assert F.total(F.sparse_flops(dense, dens)) == F.total(dense) / 4


def test_training_flops_per_step_formulas():
    f_d, f_s = 100, 10
    assert F.training_flops_per_step("dense", f_d, f_s) == 300
    assert F.training_flops_per_step("static", f_d, f_s) == 30
    assert F.training_flops_per_step("set", f_d, f_s) == 30
    assert F.training_flops_per_step("snfs", f_d, f_s) == 120
    assert F.training_flops_per_step("rigl", f_d, f_s, update_every=100) == pytest.approx(
        (3000 + 20 + 100) / 101)
    assert F.training_flops_per_step("rigl", f_d, f_s, update_every=1) == pytest.approx(
        (30 + 20 + 100) / 2)
    # per-layer dicts are summed
    assert F.training_flops_per_step("static", {"a": 60, ACT: 40}, {"a": 6, ACT: 4}) == 30


def test_training_flops_unknown_method():
    with pytest.raises(ValueError, match=r"'snip'.*rigl"):
        F.training_flops_per_step("snip", 100, 10)


def test_gradual_training_flops_is_mean_of_three_forwards():
    dense = {"w": 100, ACT: 20}
    steps = [{"w": 1.0}, {"w": 0.5}, {"w": 0.1}]
    assert F.gradual_training_flops(dense, steps) == pytest.approx(
        (3 * 120 + 3 * 70 + 3 * 30) / 3)
