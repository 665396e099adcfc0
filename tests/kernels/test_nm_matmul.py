"""kernels/nm_matmul: Pallas (interpreted here) == reference gather == x @ (W ⊙ N:M mask)."""

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.kernels._common import lower_for_gpu
from sparsejax.kernels.nm_matmul import (api, default_tiles, nm_linear_apply, nm_matmul,
                                         nm_matmul_pallas, nm_matmul_xla, reference)
from sparsejax.nm import NMCompressed, compress_nm, decompress_nm, nm_mask

TILES = dict(block_m=32, block_n=32, block_k=64)


def _problem(rows, k, out, n, m, dtype=jnp.float32, seed=0, lead=()):
    """x, the N:M-compressed kernel and the answer, all built in numpy (no compiles):
    keep the n largest |w| of each group of m along K, answer = x @ (W ⊙ mask) in f64."""
    rng = np.random.default_rng(seed)
    w = np.asarray(jnp.asarray(rng.standard_normal((k, out)), dtype), np.float64)
    x = np.asarray(jnp.asarray(rng.standard_normal((*lead, rows, k)), dtype), np.float64)
    groups = w.reshape(k // m, m, out)
    idx = np.sort(np.argsort(-np.abs(groups), axis=1, kind="stable")[:, :n], axis=1)
    vals = np.take_along_axis(groups, idx, axis=1)
    dense = np.zeros_like(groups)
    np.put_along_axis(dense, idx, vals, axis=1)
    want = (x @ dense.reshape(k, out)).astype(np.float32)
    c = NMCompressed(jnp.asarray(vals, dtype), jnp.asarray(idx, jnp.uint8), n, m, (k, out), 0)
    return jnp.asarray(x, dtype), c, want


def test_numpy_compression_matches_compress_nm():
    _, c, _ = _problem(16, 64, 32, 2, 4, seed=3)
    w = np.random.default_rng(3).standard_normal((64, 32))  # _problem's first draw
    ours = compress_nm(jnp.asarray(w, jnp.float32), 2, 4, axis=0)
    np.testing.assert_array_equal(ours.values, c.values)
    np.testing.assert_array_equal(ours.indices, c.indices)


def _close(got, want, dtype):
    got = np.asarray(got, np.float32)
    if dtype == jnp.float32:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    else:  # bf16 output: one rounding of a value of this size, plus f32-accumulation noise
        scale = float(jnp.max(jnp.abs(want)))
        np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.parametrize("n,m,dtype,rows", [
    (2, 4, jnp.float32, 64), (1, 8, jnp.float32, 64),
    (2, 8, jnp.float32, 128), (4, 8, jnp.float32, 64), (3, 8, jnp.float32, 32),
    (2, 4, jnp.bfloat16, 64), (1, 8, jnp.bfloat16, 32)])
def test_pallas_matches_reference_and_dense(n, m, dtype, rows):
    x, c, want = _problem(rows, 256, 128, n, m, dtype)
    got = nm_matmul_pallas(x, c, interpret=True, **TILES)
    assert got.shape == (rows, 128) and got.dtype == dtype
    _close(got, want, dtype)
    _close(jax.jit(lambda x: reference.nm_matmul_reference(x, c))(x), want, dtype)
    _close(jax.jit(lambda x: x.astype(jnp.float32) @ decompress_nm(c).astype(jnp.float32))(x),
           want, dtype)


def test_one_nm_matmul_and_one_compressed_format():
    import sparsejax
    import sparsejax.nm
    assert not hasattr(sparsejax.nm, "nm_matmul") and not hasattr(sparsejax, "nm_matmul")
    assert reference.__all__ == ["check_args", "nm_matmul_reference"]
    assert reference.NMCompressed is sparsejax.nm.NMCompressed  # consumed, not redefined


@pytest.mark.parametrize("impl", ["pallas", "xla", "reference"])
def test_api_leading_batch_dims(impl):
    x, c, want = _problem(5, 256, 128, 2, 4, lead=(2, 3))  # 30 rows: padded to 32
    got = nm_matmul(x, c, implementation=impl, interpret=True, block_m=16)
    assert got.shape == (2, 3, 5, 128)
    _close(got, want, jnp.float32)


def test_api_default_on_cpu_is_xla_and_correct(monkeypatch):
    x, c, want = _problem(16, 256, 128, 1, 4)
    monkeypatch.setattr(api, "nm_matmul_pallas", _forbidden)
    _close(nm_matmul(x, c), want, jnp.float32)


def _forbidden(*a, **k):
    raise AssertionError("the Pallas kernel must not run here")


def test_api_on_gpu_picks_pallas_when_it_applies(monkeypatch):
    x, c, want = _problem(16, 256, 128, 2, 4)
    calls = []
    real = api.nm_matmul_pallas
    monkeypatch.setattr(api, "on_gpu", lambda: True)
    monkeypatch.setattr(api, "nm_matmul_pallas", lambda *a, **k: calls.append(1) or real(*a, **k))
    _close(nm_matmul(x, c, interpret=True, block_n=32, block_k=64), want, jnp.float32)
    assert calls, "a kernel-shaped input on GPU must use Pallas"


@pytest.mark.parametrize("case", ["m_not_pow2", "out_not_tileable", "tile_not_pow2",
                                  "axis1"])
def test_api_falls_back_to_xla_where_the_kernel_does_not_apply(monkeypatch, case):
    monkeypatch.setattr(api, "on_gpu", lambda: True)  # so the default would pick Pallas
    monkeypatch.setattr(api, "nm_matmul_pallas", _forbidden)
    kwargs = {}
    if case == "m_not_pow2":
        x, c, want = _problem(16, 96, 64, 2, 6)
    elif case == "out_not_tileable":
        x, c, want = _problem(16, 64, 24, 2, 4)
    elif case == "tile_not_pow2":
        x, c, want = _problem(16, 256, 96, 2, 4)
        kwargs = dict(block_n=48)
    else:
        kx, kw = jax.random.split(jax.random.key(1))
        w, x = jax.random.normal(kw, (64, 32)), jax.random.normal(kx, (16, 64))
        c = compress_nm(w, 2, 4, axis=1)
        want = x @ jnp.where(nm_mask(w, 2, 4, axis=1), w, 0.0)
    _close(jax.jit(lambda x: nm_matmul(x, c, **kwargs))(x), want, jnp.float32)
    if case != "axis1":
        _close(jax.jit(lambda x: reference.nm_matmul_reference(x, c))(x), want, jnp.float32)


def _bad_k_kernel():
    """A hand-made 'compressed' kernel whose K=10 is not divisible by M=4."""
    v = jnp.ones((2, 2, 8))
    return NMCompressed(v, jnp.zeros((2, 2, 8), jnp.uint8), 2, 4, (10, 8), 0)


@pytest.mark.parametrize("impl", ["pallas", "xla", "reference", None])
def test_bad_inputs_raise_clear_errors(impl):
    x, c, _ = _problem(16, 256, 128, 2, 4)
    with pytest.raises(ValueError, match=r"x has 128 features .* expects K=256"):
        nm_matmul(x[:, :128], c, implementation=impl, interpret=True)
    with pytest.raises(ValueError, match=r"K=10 is not divisible by M=4"):
        nm_matmul(jnp.ones((16, 10)), _bad_k_kernel(), implementation=impl, interpret=True)
    bad = dataclasses.replace(c, values=c.values[:, :1])
    with pytest.raises(ValueError, match=r"needs values and indices of shape \(64, 2, 128\)"):
        nm_matmul(x, bad, implementation=impl, interpret=True)


def test_explicit_pallas_on_bad_input_raises():
    x, c, _ = _problem(16, 256, 96, 2, 4)
    with pytest.raises(ValueError, match=r"block_n=48 is not a power of two"):
        nm_matmul(x, c, implementation="pallas", interpret=True, block_n=48)
    with pytest.raises(ValueError, match=r"block_k=8 is below 16"):
        nm_matmul(x, c, implementation="pallas", interpret=True, block_k=8)
    x6, c6, _ = _problem(16, 96, 64, 2, 6)
    with pytest.raises(ValueError, match=r"M=6 is not a power of two|no power-of-two tiling"):
        nm_matmul(x6, c6, implementation="pallas", interpret=True)
    with pytest.raises(ValueError, match=r"M=6 is not a power of two"):
        nm_matmul(x6, c6, implementation="pallas", interpret=True, block_m=16, block_n=16,
                  block_k=16)
    xo, co, _ = _problem(16, 64, 24, 2, 4)
    with pytest.raises(ValueError, match=r"no power-of-two tiling"):
        nm_matmul(xo, co, implementation="pallas", interpret=True)
    w = jax.random.normal(jax.random.key(0), (64, 32))
    with pytest.raises(ValueError, match=r"compressed along axis 0"):
        nm_matmul(jnp.ones((16, 64)), compress_nm(w, 2, 4, axis=1), implementation="pallas",
                  interpret=True)
    conv = jax.random.normal(jax.random.key(0), (3, 3, 16, 8))
    with pytest.raises(ValueError, match=r"2-D"):
        nm_matmul(jnp.ones((4, 16)), compress_nm(conv, 2, 4), implementation="xla")
    with pytest.raises(ValueError, match=r"unknown implementation 'triton'"):
        nm_matmul(x, c, implementation="triton")
    with pytest.raises(ValueError, match=r"rows of x=20 is not divisible by block_m=16"):
        nm_matmul_pallas(x[:4].repeat(5, axis=0), c, interpret=True, block_m=16,
                         block_n=32, block_k=64)


def test_compressed_kernel_passes_through_jit_as_an_argument():
    x, c, want = _problem(16, 64, 32, 2, 4)
    assert jax.tree.leaves(c) == [c.values, c.indices]  # n, m, shape, axis are static
    _close(jax.jit(lambda x, c: nm_matmul(x, c))(x, c), want, jnp.float32)
    _close(jax.jit(lambda x: nm_matmul(x, c))(x), want, jnp.float32)


def test_gradient_of_pallas_path_matches_reference():
    x, c, _ = _problem(32, 128, 64, 1, 4, lead=(2,))

    def loss(impl):
        return lambda x, v: jnp.sum(jnp.sin(nm_matmul(x, dataclasses.replace(c, values=v),
                                                      implementation=impl, interpret=True,
                                                      block_m=16, block_n=32, block_k=32)))

    gx, gv = jax.grad(loss("pallas"), argnums=(0, 1))(x, c.values)
    rx, rv = jax.grad(loss("reference"), argnums=(0, 1))(x, c.values)
    assert gv.shape == c.values.shape
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(gv, rv, rtol=1e-4, atol=1e-4)
    # x-gradient = g @ Wᵀ with W decompressed (independent of both implementations)
    g = jnp.cos(nm_matmul_xla(x, c))
    np.testing.assert_allclose(gx, g @ decompress_nm(c).T, rtol=1e-4, atol=1e-4)


def test_nm_linear_apply_adds_bias():
    x, c, want = _problem(16, 64, 32, 1, 4)
    b = jnp.arange(32.0)
    _close(nm_linear_apply(x, c, b), want + b, jnp.float32)
    _close(nm_linear_apply(x, c), want, jnp.float32)


def test_default_tiles():
    assert default_tiles(16, 4096, 4096, 4)[:3] == (16, 64, 128)
    assert default_tiles(4096, 4096, 4096, 4)[:3] == (128, 128, 64)
    assert default_tiles(100, 4096, 4096, 8)[:3] == (128, 128, 64)
    assert default_tiles(16, 96, 64, 6) is None      # M not a power of two
    assert default_tiles(16, 64, 24, 4) is None      # out has no power-of-two tile >= 16


@pytest.mark.parametrize("rows,n,m,dtype", [(256, 2, 4, jnp.bfloat16), (64, 4, 8, jnp.float32),
                                            (16, 1, 8, jnp.bfloat16), (16, 3, 8, jnp.float32)])
def test_lowers_for_gpu(rows, n, m, dtype):
    x, c, _ = _problem(rows, 512, 256, n, m, dtype)
    text = lower_for_gpu(lambda x: nm_matmul(x, c, implementation="pallas", interpret=False), x)
    assert text.count("xla.gpu.triton") == 1


@pytest.mark.gpu
@pytest.mark.parametrize("rows,n,m", [(4096, 2, 4), (16, 2, 4), (128, 1, 8)])
def test_gpu_realistic_size(rows, n, m):
    x, c, _ = _problem(rows, 4096, 4096, n, m, jnp.bfloat16)
    got = jax.jit(lambda x: nm_matmul(x, c, implementation="pallas"))(x)
    dense = decompress_nm(c)
    want = jnp.matmul(x.astype(jnp.float32), dense.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST)
    _close(got, want, jnp.bfloat16)
