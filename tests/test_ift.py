"""Sparse-IFT: formulas, iso-FLOP (measured), s = 0, layer references, surgery, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax import ift, surgery
from sparsejax.models import MLP, ResNet
from sparsejax.nn import SparseDoped, SparseFactorized, SparseParallel

SPARSITIES = (0.5, 0.75, 0.9)


def test_worked_example_linear_512():
    assert [ift.num_branches(s) for s in SPARSITIES] == [2, 4, 10]
    assert [ift.factorized_dim(512, 512, s) for s in SPARSITIES] == [512, 1024, 2560]
    assert [ift.doped_rank(512, 512, s) for s in SPARSITIES] == [128, 192, 230]
    assert ift.width_multiplier(0.75) == pytest.approx(2.0)
    assert ift.factorized_dim(16, 32, 0.5, c=9) == -(-9 * 16 * 32 // (0.5 * (9 * 16 + 32)))


def _mlp(width=1.0):
    return MLP(64, (round(256 * width),) * 3, 10, rngs=nnx.Rngs(0))


def _resnet(width=1.0):  # 64–256 channels: the paper's floor/ceil cost < 1% at this size
    return ResNet(depth=8, width=4 * width, num_classes=10, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("build,x", [(_mlp, jnp.ones((1, 64))), (_resnet, jnp.ones((1, 16, 16, 3)))],
                         ids=["mlp", "resnet"])
@pytest.mark.parametrize("family", ift.FAMILIES)
def test_measured_flops_match_dense_within_one_percent(build, x, family):
    dense = ift.measured_flops(nnx.eval_shape(build), [], x)
    for s in SPARSITIES:
        if family == "wide":
            abstract = lambda w: nnx.eval_shape(lambda: build(w))  # noqa: E731
            mult, model, rules, rel = ift.wide_search(abstract, s, x)
            assert mult == pytest.approx(ift.width_multiplier(s))
            s_adj = rules[0][1]
            assert abs(s_adj - s) < 0.1  # s nudged to absorb integer widths, dense stem/head
        else:  # built abstractly: counting FLOPs needs shapes, not weights
            model = nnx.eval_shape(lambda: ift.transform(build(), family, s, example_input=x)[0])
            rules = ift.sparsity_rules(family, s, ift.select(nnx.eval_shape(build), None, x))
            rel = ift.measured_flops(model, rules, x) / dense
        assert abs(rel - 1) <= 0.01, (family, s, rel)
        assert rules and len({r[1] for r in rules}) == 1
        if family != "wide":
            assert rules[0][1] == s


@pytest.mark.parametrize("family", ift.FAMILIES)
def test_s_zero_is_the_dense_model(family):
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 64))
    ref = _mlp()(x)
    model, rules = ift.transform(_mlp(), family, 0.0, example_input=x)
    assert rules == []
    np.testing.assert_array_equal(model(x), ref)
    assert all(isinstance(m, (nnx.Linear, nnx.List, type(model.acts[0])))
               for _, m in surgery.named_modules(model))


def _ln(h, scale, bias, eps=1e-6):
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    return (h - mu) / jnp.sqrt(var + eps) * scale + bias


def test_linear_layers_equal_jnp_references():
    lin = nnx.Linear(12, 8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 12))
    par = SparseParallel(lin, 3, rngs=nnx.Rngs(1))
    want = sum(_ln(x @ b.kernel[...] + b.bias[...], n.scale[...], n.bias[...])
               for b, n in zip(par.branches, par.norms))
    np.testing.assert_allclose(par(x), want, rtol=1e-5, atol=1e-5)
    fac = SparseFactorized(lin, 20, rngs=nnx.Rngs(2))
    h = jax.nn.relu(_ln(x @ fac.u.kernel[...], fac.norm.scale[...], fac.norm.bias[...]))
    np.testing.assert_allclose(fac(x), h @ fac.v.kernel[...] + fac.v.bias[...], rtol=1e-5, atol=1e-5)
    assert fac.u.bias is None and fac.u.kernel.shape == (12, 20)
    dop = SparseDoped(lin, 4, rngs=nnx.Rngs(3))
    want = x @ dop.sparse.kernel[...] + dop.sparse.bias[...] + (x @ dop.low_u.kernel[...]) @ dop.low_v.kernel[...]
    np.testing.assert_allclose(dop(x), want, rtol=1e-5, atol=1e-5)


def test_conv_doped_equals_jnp_reference():
    conv = nnx.Conv(4, 6, (3, 3), strides=2, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 9, 9, 4))
    dop = SparseDoped(conv, 3, rngs=nnx.Rngs(1))
    conv_ref = lambda x, k, stride, pad: jax.lax.conv_general_dilated(  # noqa: E731
        x, k, (stride, stride), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    want = (conv_ref(x, dop.sparse.kernel[...], 2, "SAME") + dop.sparse.bias[...]
            + conv_ref(conv_ref(x, dop.low_u.kernel[...], 2, "SAME"), dop.low_v.kernel[...], 1, "VALID"))
    np.testing.assert_allclose(dop(x), want, rtol=1e-4, atol=1e-4)
    assert dop.low_v.kernel.shape == (1, 1, 3, 6)


class _Foreign(nnx.Module):
    """A model that knows nothing of sparsejax: odd names, a list, a conv and a dense."""

    def __init__(self, rngs):
        self.entry = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.trunk = nnx.List([nnx.Conv(8, 8, (3, 3), rngs=rngs) for _ in range(2)])
        self.readout = nnx.Linear(8, 5, rngs=rngs)

    def __call__(self, x):
        x = jax.nn.relu(self.entry(x))
        for layer in self.trunk:
            x = jax.nn.relu(layer(x))
        return self.readout(x.mean((1, 2)))


def test_surgery_on_a_model_defined_here():
    x = jnp.ones((2, 8, 8, 3))
    model = _Foreign(nnx.Rngs(0))
    assert surgery.call_order(model, x) == ["entry", "trunk/0", "trunk/1", "readout"]
    calls = surgery.trace_calls(model, x, kinds=(nnx.Conv,))      # eager: real arrays
    assert [c.path for c in calls] == ["entry", "trunk/0", "trunk/1"]
    np.testing.assert_array_equal(calls[1].args[0], jax.nn.relu(calls[0].out))
    np.testing.assert_array_equal(calls[2].out, model.trunk[1](calls[2].args[0]))
    shapes = surgery.trace_calls(model, x, kinds=(nnx.Linear,), abstract=True)
    assert [(c.path, c.args[0].shape, c.out.shape) for c in shapes] == [("readout", (2, 8), (2, 5))]
    model, rules = ift.transform(model, "parallel", 0.75, example_input=x)
    assert isinstance(model.trunk[0], SparseParallel) and len(model.trunk[1].branches) == 4
    assert isinstance(model.entry, nnx.Conv) and isinstance(model.readout, nnx.Linear)
    assert model(x).shape == (2, 5)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    from sparsejax.masks import resolve_rules

    specs = resolve_rules(params, rules)
    assert sorted(p for p, v in specs.items() if v == 0.75) == sorted(
        f"trunk/{i}/branches/{b}/kernel" for i in range(2) for b in range(4))
    with pytest.raises(ValueError, match=r"surgery rules match no module: \['decoder'\]"):
        surgery.replace(model, [("decoder", lambda p, m: m)])


def test_bad_input():
    x = jnp.ones((1, 64))
    with pytest.raises(ValueError, match="sparsity 1.0 is outside"):
        ift.transform(_mlp(), "doped", 1.0, example_input=x)
    with pytest.raises(ValueError, match="unknown Sparse-IFT family 'sparse_deep'"):
        ift.transform(_mlp(), "sparse_deep", 0.5, example_input=x)
    with pytest.raises(ValueError, match=r"match no Linear/Conv module: \['acts/0'\]"):
        ift.transform(_mlp(), "doped", 0.5, rules=["acts/0"])
    grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="grouped convolutions"):
        SparseParallel(grouped, 2, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="transforms nnx.Linear and nnx.Conv layers, not LayerNorm"):
        SparseDoped(nnx.LayerNorm(4, rngs=nnx.Rngs(0)), 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="needs rules, or example_input"):
        ift.transform(_mlp(), "doped", 0.5)


@pytest.mark.parametrize("family", ["doped", "wide"])
def test_config_trains_with_rigl_at_exact_layer_sparsity(family):
    from configs import quickstart
    from sparsejax.masks import mask_counts
    from sparsejax.train import make_trainer

    t = make_trainer(quickstart.get_config(f"{family},0.75,tiny"))
    with jax.set_mesh(t.mesh):
        state = t.init(jax.random.PRNGKey(0))
    counts = mask_counts(state.opt_state.masks)
    key = "layers/1/sparse/kernel" if family == "doped" else "layers/1/kernel"
    assert list(counts) == [key]  # only the transformed layer is sparse
    nnz, size = counts[key]
    if family == "doped":
        assert nnz == round(0.25 * size)
    else:  # Wide: widths ×2; the widened layer gets what the dense budget leaves:
        # (64·256 + 256·256 + 256·10) − (64·512 + 512·10) multiply-adds = 46,592 nonzeros
        assert (nnz, size) == (84480 - 37888, 512 * 512)
    if family == "wide":  # widths grew by about √(1/(1−s)) = 2
        assert state.params["layers"][1]["kernel"].shape[0] > 400
