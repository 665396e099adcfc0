"""sparse_ffn kernels: decode gather-GEMV (Pallas interpret / XLA / reference / modules)
and the block-granular training path (outputs and gradients vs the dense masked FFN)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.kernels import sparse_ffn as sf
from sparsejax.kernels._common import lower_for_gpu
from sparsejax.kernels.sparse_ffn import api
from sparsejax.nn.spark import SparkFFN, StatisticalTopKFFN, TopKFFN


def _normal(seed, *shape, scale=1.0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def _sparse_rows(seed, b, f, density):
    """Dense [b, f] activations with about density·f nonzeros per row (varying counts)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((b, f)) * (rng.random((b, f)) < density), jnp.float32)


def _decode_inputs(seed, b, f, d2, d_out, dtype):
    x2 = _normal(seed, b, d2).astype(dtype)
    w_in = _normal(seed + 1, f, d2, scale=d2 ** -0.5).astype(dtype)
    w_out = _normal(seed + 2, f, d_out, scale=f ** -0.5).astype(dtype)
    return x2, w_in, w_out, _sparse_rows(seed + 3, b, f, 0.06).astype(dtype)


def _scaled_close(got, want, tol):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))


# ----------------------------------------------------------------------------- decode


@pytest.mark.parametrize("b,dtype", [(1, jnp.float32), (3, jnp.bfloat16), (8, jnp.float32),
                                     (8, jnp.bfloat16)])
def test_decode_pallas_xla_reference_agree(b, dtype):
    f, d2, d_out = 512, 64, 128
    k = 40                                              # ~8% of F, capacity above the ~6% used
    x2, w_in, w_out, a = _decode_inputs(b, b, f, d2, d_out, dtype)
    idx, coef = sf.topk_indices(a, k)
    assert int(jnp.sum(idx < 0)) > 0                    # padding entries are exercised
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    for gated in (True, False):
        args = (x2, w_in) if gated else (None, None)
        # Independent formula: the dense FFN on the dense activation, in float64.
        a64 = np.asarray(a, np.float64)
        if gated:
            a64 = a64 * (np.asarray(x2, np.float64) @ np.asarray(w_in, np.float64).T)
        want = a64 @ np.asarray(w_out, np.float64)
        ref = sf.sparse_ffn_decode_reference(*args, w_out, idx, coef)
        assert ref.dtype == dtype
        _scaled_close(ref, want, tol)
        for impl in ("xla", "pallas"):
            got = sf.sparse_ffn_decode(*args, w_out, idx, coef, implementation=impl,
                                       interpret=True)
            assert got.shape == (b, d_out) and got.dtype == dtype, impl
            _scaled_close(got, want, tol)


def test_pallas_tuning_knobs_and_duplicates():
    x2, w_in, w_out, a = _decode_inputs(7, 2, 256, 48, 96, jnp.float32)
    idx = jnp.array([[5, 5, -1, 200, 17], [0, 255, 3, -1, -1]], jnp.int32)  # unit 5 twice
    coef = jnp.arange(10, dtype=jnp.float32).reshape(2, 5) - 3.0
    want = sf.sparse_ffn_decode_reference(x2, w_in, w_out, idx, coef)
    dense = sf.dense_coefficients(idx, coef, 256)
    assert float(dense[0, 5]) == pytest.approx(-3.0 + -2.0)
    for kw in (dict(units_per_step=2, block_cols=16, col_splits=3), dict(units_per_step=8)):
        got = sf.sparse_ffn_decode_pallas(x2, w_in, w_out, idx, coef, interpret=True, **kw)
        _scaled_close(got, want, 1e-5)


def test_pallas_lowers_for_gpu():
    x2, w_in, w_out, a = _decode_inputs(3, 2, 512, 64, 128, jnp.bfloat16)
    idx, coef = sf.topk_indices(a, 40)
    for args in ((x2, w_in), (None, None)):
        fn = functools.partial(sf.sparse_ffn_decode_pallas, interpret=False)
        text = lower_for_gpu(lambda *t: fn(*args, *t), w_out, idx, coef)
        assert text.count("xla.gpu.triton") >= 1


def test_selection_helpers_against_numpy():
    a = jnp.array([[0.0, 3.0, -5.0, 0.0, 1.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0, 4.0]])
    idx, coef = sf.topk_indices(a, 3)
    np.testing.assert_array_equal(idx, [[2, 1, 5], [5, -1, -1]])
    np.testing.assert_array_equal(coef, [[-5.0, 3.0, 2.0], [4.0, 0.0, 0.0]])
    idx, coef = sf.nonzero_indices(a, 3)
    np.testing.assert_array_equal(idx, [[1, 2, 4], [5, -1, -1]])      # lowest-index on overflow
    np.testing.assert_array_equal(coef, [[3.0, -5.0, 1.0], [4.0, 0.0, 0.0]])
    np.testing.assert_array_equal(sf.dropped_units(a, 3), [1, 0])
    big = _sparse_rows(0, 4, 300, 0.1)
    cap = int(jnp.max(jnp.sum(big != 0, -1)))
    for fn in (sf.topk_indices, sf.nonzero_indices):                  # no overflow: lossless
        np.testing.assert_array_equal(sf.dense_coefficients(*fn(big, cap), 300), big)


def _spark(f, density, seed=0):
    ffn = SparkFFN(128, f, "gelu", density=density, rngs=nnx.Rngs(seed))
    ffn.v.bias[...] = _normal(seed + 1, 128)
    return ffn


@pytest.mark.parametrize("impl,selection", [("xla", "topk"), ("pallas", "nonzero")])
def test_spark_ffn_decode_equals_module(impl, selection):
    ffn = _spark(1024, 0.08)
    x = _normal(5, 2, 3, 128)
    k_max = 160                                          # ~2x the ~82 expected units
    gate = ffn.gate(x).reshape(6, -1)
    assert int(jnp.max(sf.dropped_units(gate, k_max))) == 0
    got = sf.spark_ffn_decode(x, ffn.k1.kernel[...], sf.unit_major(ffn.k2), ffn.v.kernel[...],
                              v_bias=ffn.v.bias[...], density=0.08, k_max=k_max,
                              selection=selection, implementation=impl, interpret=True)
    assert got.shape == x.shape
    np.testing.assert_allclose(got, ffn(x), rtol=1e-4, atol=1e-4)


def test_spark_overflow_keeps_largest_gates():
    ffn = _spark(512, 0.08)
    x = _normal(6, 1, 128)
    gate = ffn.gate(x)
    n = int(jnp.sum(gate != 0))
    k_max = n - 5
    got = sf.spark_ffn_decode(x, ffn.k1.kernel[...], sf.unit_major(ffn.k2), ffn.v.kernel[...],
                              v_bias=ffn.v.bias[...], density=0.08, k_max=k_max)
    kth = jnp.sort(gate, axis=-1)[:, -k_max][:, None]
    want = ffn.v(jnp.where(gate >= kth, gate, 0) * ffn.k2(x[:, 64:]))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert not np.allclose(got, ffn(x), atol=1e-4)     # the dropped units did matter


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_topk_ffn_decode_equals_modules(impl):
    x = _normal(8, 5, 128)
    for cls, kw in ((TopKFFN, dict(mode="exact")), (StatisticalTopKFFN, {})):
        ffn = cls(128, 512, "relu", density=0.08, rngs=nnx.Rngs(2), **kw)
        ffn.up.bias[...] = _normal(9, 512, scale=0.1)
        ffn.down.bias[...] = _normal(10, 128)
        mode = "exact" if cls is TopKFFN else "statistical"
        k = 41 if mode == "exact" else 100                # capacity for the statistical count
        got = sf.topk_ffn_decode(x, ffn.up.kernel[...], ffn.up.bias[...], ffn.down.kernel[...],
                                 ffn.down.bias[...], activation="relu", k=k, mode=mode,
                                 density=0.08, implementation=impl, interpret=True)
        np.testing.assert_allclose(got, ffn(x), rtol=1e-4, atol=1e-4, err_msg=mode)


def test_decode_errors_name_the_problem():
    x2, w_in, w_out, a = _decode_inputs(1, 2, 64, 32, 32, jnp.float32)
    idx, coef = sf.topk_indices(a, 8)
    with pytest.raises(ValueError, match=r"idx values .* \[0, F=64\)"):
        sf.sparse_ffn_decode(None, None, w_out, idx.at[0, 0].set(64), coef)
    with pytest.raises(ValueError, match="coef shape"):
        sf.sparse_ffn_decode(None, None, w_out, idx, coef[:, :4])
    with pytest.raises(ValueError, match=r"k=65 .* F=64"):
        sf.sparse_ffn_decode(None, None, w_out, jnp.zeros((2, 65), jnp.int32),
                             jnp.zeros((2, 65)))
    with pytest.raises(ValueError, match="unit-major"):
        sf.sparse_ffn_decode(x2, w_in.T, w_out, idx, coef)
    with pytest.raises(ValueError, match="x2 shape"):
        sf.sparse_ffn_decode(x2[:1], w_in, w_out, idx, coef)
    with pytest.raises(ValueError, match="together"):
        sf.sparse_ffn_decode(x2, None, w_out, idx, coef)
    with pytest.raises(ValueError, match="unknown implementation"):
        sf.sparse_ffn_decode(None, None, w_out, idx, coef, implementation="cuda")
    with pytest.raises(ValueError, match="multiple of 16"):
        sf.sparse_ffn_decode(None, None, w_out[:, :24], idx, coef, implementation="pallas")
    with pytest.raises(ValueError, match="dtype int32"):
        sf.sparse_ffn_decode(None, None, w_out.astype(jnp.int32), idx, coef,
                             implementation="pallas")
    with pytest.raises(ValueError, match="unit_major"):
        sf.spark_ffn_decode(jnp.ones((1, 64)), jnp.ones((32, 64)), jnp.ones((32, 64)),
                            w_out, density=0.1, k_max=8)
    with pytest.raises(ValueError, match="statistical' needs density"):
        sf.topk_ffn_decode(jnp.ones((1, 32)), w_in.T, None, w_out, None, activation="relu",
                           k=8, mode="statistical")


def test_decode_fallbacks(monkeypatch):
    _, _, w_out, a = _decode_inputs(2, 16, 512, 32, 32, jnp.float32)
    idx, coef = sf.topk_indices(a, 8)
    choose = functools.partial(sf.choose_decode, None, None)
    assert choose(w_out, idx, coef, None) == "xla"                       # CPU
    assert choose(w_out[:64], idx % 64, coef, None) == "dense"            # 16·8 > F = 64
    _scaled_close(sf.sparse_ffn_decode(None, None, w_out[:64], idx % 64, coef),
                  sf.sparse_ffn_decode_reference(None, None, w_out[:64], idx % 64, coef), 1e-5)
    monkeypatch.setattr(api, "on_gpu", lambda: True)
    assert choose(w_out, idx[:8], coef[:8], None) == "pallas"
    assert choose(w_out, idx, coef, None) == "xla"                        # batch 16 > 8
    assert choose(w_out[:, :24], idx[:2], coef[:2], None) == "xla"        # 24 columns
    assert choose(w_out.astype(jnp.int8), idx[:2], coef[:2], None) == "xla"   # dtype
    y = sf.sparse_ffn_decode(None, None, w_out[:, :24], idx[:2], coef[:2])   # runs, XLA
    _scaled_close(y, sf.sparse_ffn_decode_reference(None, None, w_out[:, :24], idx[:2],
                                                    coef[:2]), 1e-5)


def test_out_of_range_under_jit_poisons_only_that_row():
    _, _, w_out, a = _decode_inputs(4, 2, 64, 32, 32, jnp.float32)
    idx, coef = sf.topk_indices(a, 8)
    idx = idx.at[1, 0].set(64)
    for impl in ("xla", "pallas", "dense", "reference"):
        fn = jax.jit(functools.partial(sf.sparse_ffn_decode, None, None,
                                       implementation=impl, interpret=True))
        y = np.asarray(fn(w_out, idx, coef))
        assert np.isfinite(y[0]).all() and np.isnan(y[1]).all(), impl


# ----------------------------------------------------------------------------- training


def _train_inputs(seed, t=64, d=32, f=256, d_out=24):
    return (_normal(seed, 2, t // 2, d), _normal(seed + 1, d, f, scale=d ** -0.5),
            _normal(seed + 2, f, d_out, scale=f ** -0.5), _normal(seed + 3, f, scale=0.1),
            _normal(seed + 4, d_out))


def test_block_sparse_ffn_output_and_grads_equal_masked_reference():
    keep = 3
    x, wu, wd, bu, bd = _train_inputs(3)
    cfg = dict(activation="gelu", block_units=32, tile_tokens=16)
    sel = sf.select_blocks(sf.block_scores(x.reshape(64, 32), wu, bu, **cfg), keep)

    def loss_ref(x, wu, wd, bu, bd):
        y = sf.block_sparse_ffn_reference(x.reshape(64, 32), wu, wd, sel, b_up=bu, b_down=bd,
                                          **cfg)
        return jnp.sum(jnp.sin(y))

    want_y = sf.block_sparse_ffn_reference(x.reshape(64, 32), wu, wd, sel, b_up=bu,
                                           b_down=bd, **cfg).reshape(2, 32, 24)
    want_g = jax.jit(jax.grad(loss_ref, argnums=range(5)))(x, wu, wd, bu, bd)
    for impl in ("gather", "ragged"):
        def loss(x, wu, wd, bu, bd):
            y = sf.block_sparse_ffn(x, wu, wd, keep_blocks=keep, b_up=bu, b_down=bd,
                                    implementation=impl, **cfg)
            return jnp.sum(jnp.sin(y)), y
        (_, y), g = jax.jit(jax.value_and_grad(loss, argnums=range(5), has_aux=True))(
            x, wu, wd, bu, bd)
        np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5, err_msg=str(impl))
        for gi, wi, name in zip(g, want_g, ("x", "w_up", "w_down", "b_up", "b_down")):
            np.testing.assert_allclose(gi, wi, rtol=1e-4, atol=1e-5, err_msg=f"{impl} {name}")
    # The mask really is block-granular and drops units: the dense output differs.
    dense = jax.nn.gelu(x @ wu + bu) @ wd + bd
    assert not np.allclose(want_y, dense, atol=1e-3)


def test_block_sparse_keep_all_is_the_dense_ffn():
    x, wu, wd, bu, bd = _train_inputs(11)
    dense = jax.nn.relu(x @ wu + bu) @ wd + bd
    for impl in ("gather", "ragged", "masked", None):
        y = sf.block_sparse_ffn(x, wu, wd, activation="relu", block_units=64, tile_tokens=32,
                                keep_blocks=4, b_up=bu, b_down=bd, implementation=impl)
        np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5, err_msg=impl)


def test_block_selection_follows_scores():
    x, wu, wd, _, _ = _train_inputs(12)
    xf = x.reshape(64, 32)
    z = jax.nn.relu(xf @ wu)
    s = sf.block_scores(xf, wu, activation="relu", block_units=32, tile_tokens=16)
    np.testing.assert_allclose(s, np.abs(np.asarray(z)).reshape(4, 16, 8, 32).sum((1, 3)),
                               rtol=1e-5)
    s_half = sf.block_scores(xf, wu, activation="relu", block_units=32, tile_tokens=16, dims=16)
    np.testing.assert_allclose(
        s_half, np.asarray(jax.nn.relu(xf[:, :16] @ wu[:16])).reshape(4, 16, 8, 32).sum((1, 3)),
        rtol=1e-5)
    scores = jnp.tile(jnp.arange(8.0), (4, 1)).at[0, 0].set(100.0)   # tile 0 prefers block 0
    sel = sf.select_blocks(scores, 2)
    np.testing.assert_array_equal(sel, [[0, 7], [7, 6], [7, 6], [7, 6]])
    y = sf.block_sparse_ffn(x, wu, wd, activation="relu", block_units=32, tile_tokens=16,
                            keep_blocks=2, scores=scores)
    m = sf.block_mask(sel, 8, 32, 16)
    assert m.shape == (64, 256) and int(m.sum()) == 64 * 64
    np.testing.assert_allclose(y.reshape(64, -1), (jnp.where(m, z, 0)) @ wd, rtol=1e-5,
                               atol=1e-5)


def test_block_sparse_errors_name_the_problem():
    x, wu, wd, _, _ = _train_inputs(13)
    cfg = dict(activation="relu")
    with pytest.raises(ValueError, match=r"block_units=48 must divide .* F=256"):
        sf.block_sparse_ffn(x, wu, wd, block_units=48, tile_tokens=16, keep_blocks=1, **cfg)
    with pytest.raises(ValueError, match=r"tile_tokens=24 must divide .* T=64"):
        sf.block_sparse_ffn(x, wu, wd, block_units=32, tile_tokens=24, keep_blocks=1, **cfg)
    with pytest.raises(ValueError, match=r"keep_blocks=9"):
        sf.block_sparse_ffn(x, wu, wd, block_units=32, tile_tokens=16, keep_blocks=9, **cfg)
    with pytest.raises(ValueError, match="scores must be"):
        sf.block_sparse_ffn(x, wu, wd, block_units=32, tile_tokens=16, keep_blocks=1,
                            scores=jnp.ones((4, 4)), **cfg)
    with pytest.raises(ValueError, match="shapes disagree"):
        sf.block_sparse_ffn(x, wu.T, wd, block_units=32, tile_tokens=16, keep_blocks=1, **cfg)
    with pytest.raises(ValueError, match="unknown activation"):
        sf.block_sparse_ffn(x, wu, wd, block_units=32, tile_tokens=16, keep_blocks=1,
                            activation="swish")


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 2, 4, 8])
def test_decode_pallas_on_gpu_realistic(b):
    d, f = 2048, 8192
    x2, w_in, w_out, a = _decode_inputs(b, b, f, d // 2, d, jnp.bfloat16)
    idx, coef = sf.topk_indices(a, 656)                  # 8% of F
    for args in ((x2, w_in), (None, None)):
        want = sf.sparse_ffn_decode_reference(*args, w_out, idx, coef)
        for impl in ("pallas", "xla"):
            got = sf.sparse_ffn_decode(*args, w_out, idx, coef, implementation=impl)
            _scaled_close(got, want, 2e-2)
    assert sf.choose_decode(x2, w_in, w_out, idx, coef, None) == "pallas"


@pytest.mark.gpu
def test_spark_decode_on_gpu_equals_module():
    ffn = SparkFFN(2048, 8192, "gelu", density=0.08, rngs=nnx.Rngs(0))
    x = _normal(1, 4, 2048)
    with jax.default_matmul_precision("highest"):                    # no TF32 on either side
        got = sf.spark_ffn_decode(x, ffn.k1.kernel[...], sf.unit_major(ffn.k2),
                                  ffn.v.kernel[...], v_bias=ffn.v.bias[...], density=0.08,
                                  k_max=1024)
        want = ffn(x)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)
