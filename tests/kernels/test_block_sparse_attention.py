"""Block-sparse attention: masks vs independent formulas, every implementation vs the
reference (outputs and q/k/v gradients), GQA, empty rows, fallbacks, errors, GPU lowering."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax.kernels._common import lower_for_gpu
from sparsejax.kernels.block_sparse_attention import (api, block_sparse_attention, masks,
                                                      pallas, reference)

TOL = {jnp.float32: dict(atol=2e-5, rtol=2e-5), jnp.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _qkv(b, t, h, h_kv, d, dtype, s=None, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    s = t if s is None else s
    q = jax.random.normal(ks[0], (b, t, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (b, s, h_kv, d), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (b, s, h_kv, d), jnp.float32).astype(dtype)
    do = jax.random.normal(ks[3], (b, t, h, d), jnp.float32).astype(dtype)
    return q, k, v, do


def _out_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


def _assert_close(got, want, dtype, what):
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                                   err_msg=f"{what}: {name}", **TOL[dtype])


def _reference_fn(mask):
    dense = mask.dense()
    return lambda q, k, v: reference.attention_reference(q, k, v, dense)


def _check_impls(m, impls, q, k, v, do, dtype, what, **kw):
    """Outputs and q/k/v grads of each implementation vs the reference, in one jit."""
    @jax.jit
    def run(q, k, v, do, m):
        ref = lambda q, k, v: reference.attention_reference(q, k, v, m.dense())
        got = [_out_and_grads(functools.partial(block_sparse_attention, mask=m,
                                                implementation=impl, **kw), q, k, v, do)
               for impl in impls]
        return got, _out_and_grads(ref, q, k, v, do)

    got, want = run(q, k, v, do, m)
    for impl, g in zip(impls, got):
        _assert_close(g, want, dtype, f"{what} [{impl}]")
    return got[0]


# ----------------------------------------------------------------------------- mask formulas

def _window_formula(t, window, sinks, causal):
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    band = (i - j < window) & (j - i < window)
    allowed = band | (j < sinks)
    return allowed & (j <= i) if causal else allowed


MASK_CASES = {
    "causal_square": (lambda: masks.causal_mask(96, block_q=32, block_k=16),
                      lambda: np.tril(np.ones((96, 96), bool))),
    "causal_rect": (lambda: masks.causal_mask(48, 80, block_q=16, block_k=16),
                    lambda: np.tril(np.ones((48, 80), bool), k=32)),
    "window_sinks": (lambda: masks.sliding_window_mask(128, 24, sinks=5, block_q=16,
                                                       block_k=32),
                     lambda: _window_formula(128, 24, 5, True)),
    "window_bidirectional": (lambda: masks.sliding_window_mask(64, 10, causal=False,
                                                               block_q=16, block_k=16),
                             lambda: _window_formula(64, 10, 0, False)),
    "strided": (lambda: masks.strided_mask(128, 32, local=12, summary=3, block_q=16,
                                           block_k=16),
                lambda: np.tril((np.abs(np.arange(128)[:, None] - np.arange(128)) < 12)
                                | (np.arange(128) % 32 >= 29)[None, :])),
    "ragged_causal": (lambda: masks.causal_mask(72, block_q=16, block_k=32),
                      lambda: np.tril(np.ones((72, 72), bool))),
}


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_dense_mask_matches_formula(case):
    build, formula = MASK_CASES[case]
    np.testing.assert_array_equal(np.asarray(build().dense()[0, 0]), formula())


def _check_structure(m):
    """Full blocks all-True, partial mixed, skipped all-False; lists sorted, transposed."""
    dense = np.asarray(m.dense())
    bq, bk, nq, nk = m.block_q, m.block_k, m.num_q_blocks, m.num_k_blocks
    full, partial = (np.asarray(x) for x in m.block_classes())
    assert not (full & partial).any()
    for bi, hi, i, j in np.ndindex(*full.shape):
        blk = dense[bi, hi, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
        if full[bi, hi, i, j]:
            assert blk.all(), (i, j)
        elif partial[bi, hi, i, j]:
            assert blk.any() and not blk.all(), (i, j)
        else:
            assert not blk.any(), (i, j)
    full_t = masks._lists_to_bool(m.q_count_full, m.q_index_full, nq)
    part_t = masks._lists_to_bool(m.q_count_partial, m.q_index_partial, nq)
    np.testing.assert_array_equal(np.asarray(full_t), full.transpose(0, 1, 3, 2))
    np.testing.assert_array_equal(np.asarray(part_t), partial.transpose(0, 1, 3, 2))
    for count, index in ((m.kv_count_full, m.kv_index_full), (m.q_count_partial,
                                                               m.q_index_partial)):
        count, index = np.asarray(count), np.asarray(index)
        for pos in np.ndindex(*count.shape):
            listed = index[pos][:count[pos]]
            assert (np.diff(listed) > 0).all()                  # ascending, no repeats
    np.testing.assert_allclose(float(m.block_density),
                               (full | partial).mean(axis=(2, 3)).mean(), rtol=1e-6)
    assert nk >= 1


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_block_classification(case):
    _check_structure(MASK_CASES[case][0]())


def test_causal_counts_and_density():
    m = masks.causal_mask(128, block_q=16, block_k=16)
    np.testing.assert_array_equal(np.asarray(m.kv_count_full[0, 0]), np.arange(8))
    np.testing.assert_array_equal(np.asarray(m.kv_count_partial[0, 0]), np.ones(8))
    np.testing.assert_array_equal(np.asarray(m.q_count_full[0, 0]), 7 - np.arange(8))
    assert float(m.block_density) == pytest.approx(36 / 64)


def test_from_block_mask_empty_rows_and_dense():
    rng = np.random.default_rng(0)
    blocks = rng.random((2, 3, 4, 4)) < 0.4
    blocks[0, 1, 2] = False                                    # an empty query block
    m = masks.from_block_mask(blocks, block_q=16, block_k=32)
    want = np.repeat(np.repeat(blocks, 16, axis=2), 32, axis=3)
    np.testing.assert_array_equal(np.asarray(m.dense()), want)
    assert int(m.kv_count_full[0, 1, 2]) == 0 and int(m.kv_count_partial.sum()) == 0
    _check_structure(m)
    dense = masks.from_block_mask(np.ones((1, 1, 4, 2), bool), block_q=16, block_k=16)
    assert float(dense.block_density) == 1.0 and dense.dense().all()


def test_gated_mask_selects_top_blocks():
    q, k, _, _ = _qkv(2, 64, 4, 2, 32, jnp.float32, s=128)
    m = masks.gated_block_mask(q, k, 3, block_q=16, block_k=32)
    assert m.mask_shape == (2, 4)
    pq = np.asarray(q).reshape(2, 4, 16, 4, 32).mean(axis=2)           # [B, nQ, H, D]
    pk = np.asarray(k).reshape(2, 4, 32, 2, 32).mean(axis=2)           # [B, nK, Hkv, D]
    pk = np.repeat(pk, 2, axis=2)                                      # GQA broadcast
    scores = np.einsum("bqhd,bkhd->bhqk", pq, pk)
    want = np.zeros_like(scores, bool)
    np.put_along_axis(want, np.argsort(-scores, axis=-1)[..., :3], True, axis=-1)
    full, partial = m.block_classes()
    np.testing.assert_array_equal(np.asarray(full), want)
    assert not np.asarray(partial).any()
    traced = jax.jit(lambda q, k: masks.gated_block_mask(q, k, 3, block_q=16, block_k=32))(q, k)
    np.testing.assert_array_equal(np.asarray(traced.dense()), np.asarray(m.dense()))


def test_gated_causal_keeps_diagonal_and_respects_causality():
    q, k, _, _ = _qkv(1, 128, 2, 2, 32, jnp.float32, seed=3)
    m = masks.gated_block_mask(q, k, 2, block_q=16, block_k=16, causal=True)
    dense = np.asarray(m.dense())
    assert not (dense & ~np.tril(np.ones((128, 128), bool))).any()
    np.testing.assert_array_equal(dense[..., np.arange(128), np.arange(128)], True)
    counts = np.asarray(m.kv_count_full + m.kv_count_partial)
    np.testing.assert_array_equal(counts, np.minimum(2, np.arange(1, 9))[None, None, :]
                                  .repeat(2, axis=1))
    _check_structure(m)


# ----------------------------------------------------------------------------- pallas vs ref

def _random_blocks_with_empty_rows(b, h, n_q, n_k):
    blocks = np.random.default_rng(1).random((b, h, n_q, n_k)) < 0.5
    blocks[0, 0, 1] = False                                # empty query block
    blocks[-1, -1, -1] = False
    return masks.from_block_mask(blocks, block_q=16, block_k=32)


# (mask builder given (q, k), batch, T, S, H, Hkv, D, dtype)
PALLAS_CASES = {
    # seq_k < seq_q: rows 0..15 see no key, inside a PARTIAL block (rows 16..31 do)
    "causal_rect_empty_rows_gqa_f32_d64": (lambda q, k: masks.causal_mask(
        64, 48, block_q=32, block_k=16), 1, 64, 48, 4, 2, 64, jnp.float32),
    "window_sinks_bf16_d128": (lambda q, k: masks.sliding_window_mask(
        96, 20, sinks=4, block_q=32, block_k=16), 1, 96, 96, 2, 2, 128, jnp.bfloat16),
    "strided_f32_d64": (lambda q, k: masks.strided_mask(128, 32, local=16, summary=2,
                                                        block_q=32, block_k=16),
                        1, 128, 128, 2, 1, 64, jnp.float32),
    # per-example, per-head block mask with whole empty query blocks
    "blocks_empty_rows_f32_d64": (lambda q, k: _random_blocks_with_empty_rows(2, 2, 4, 2),
                                  2, 64, 64, 2, 2, 64, jnp.float32),
    "fully_dense_bf16_d64": (lambda q, k: masks.from_block_mask(
        np.ones((1, 1, 2, 2), bool), block_q=32, block_k=32), 1, 64, 64, 2, 1, 64,
                             jnp.bfloat16),
    "gated_causal_gqa_f32_d128": (lambda q, k: masks.gated_block_mask(
        q, k, 2, block_q=16, block_k=16, causal=True), 1, 64, 64, 4, 1, 128, jnp.float32),
}


@pytest.mark.parametrize("case", sorted(PALLAS_CASES))
def test_pallas_matches_reference(case):
    build, b, t, s, h, h_kv, d, dtype = PALLAS_CASES[case]
    q, k, v, do = _qkv(b, t, h, h_kv, d, dtype, s=s)
    m = build(q, k)
    got = _check_impls(m, ["pallas"], q, k, v, do, dtype, case, interpret=True)
    assert got[0].dtype == dtype and got[2].dtype == dtype
    rows_empty = ~np.asarray(m.dense()).any(axis=-1)               # [Bm, Hm, T]
    if rows_empty.any():
        out = np.broadcast_to(np.asarray(got[0]).transpose(0, 2, 1, 3), (b, h, t, d))
        dq = np.broadcast_to(np.asarray(got[1]).transpose(0, 2, 1, 3), (b, h, t, d))
        empty = np.broadcast_to(rows_empty, (b, h, t))
        assert (out[empty] == 0).all() and (dq[empty] == 0).all()
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in got)


# ----------------------------------------------------------------------------- XLA paths

# (mask builder given (q, k), Hkv, dtype); q is [2, 96, 4, D=32]
XLA_CASES = {
    "causal_gqa_f32": (lambda q, k: masks.causal_mask(96, block_q=16, block_k=32), 2,
                       jnp.float32),
    "window_strided_bf16": (lambda q, k: masks.strided_mask(96, 24, local=10, summary=2,
                                                            block_q=32, block_k=16),
                            4, jnp.bfloat16),
    "gated_causal_f32": (lambda q, k: masks.gated_block_mask(q, k, 2, block_q=16, block_k=16,
                                                             causal=True), 1, jnp.float32),
    "blocks_per_head_f32": (lambda q, k: masks.from_block_mask(
        np.random.default_rng(2).random((2, 4, 6, 3)) < 0.5, block_q=16, block_k=32),
                            2, jnp.float32),
}


@pytest.mark.parametrize("case", sorted(XLA_CASES))
def test_xla_paths_match_reference(case):
    build, h_kv, dtype = XLA_CASES[case]
    q, k, v, do = _qkv(2, 96, 4, h_kv, 32, dtype)
    _check_impls(build(q, k), ["xla", "xla_blocks"], q, k, v, do, dtype, case)


def test_xla_blocks_ragged_and_traced_mask():
    q, k, v, do = _qkv(1, 72, 2, 1, 32, jnp.float32, seed=5)
    m = masks.causal_mask(72, block_q=16, block_k=32)
    _check_impls(m, ["xla_blocks"], q, k, v, do, jnp.float32, "ragged")

    @jax.jit
    def gated(q, k, v):
        gm = masks.gated_block_mask(q, k, 2, block_q=16, block_k=16, causal=True)
        return block_sparse_attention(q, k, v, gm, implementation="xla_blocks"), gm.dense()

    q, k, v, _ = _qkv(1, 64, 2, 1, 32, jnp.float32, seed=6)
    out, dense = gated(q, k, v)
    _assert_close((out,), (reference.attention_reference(q, k, v, dense),), jnp.float32, "jit")


# ----------------------------------------------------------------------------- api choice

def test_api_falls_back_where_kernel_does_not_apply():
    m = masks.causal_mask(64, block_q=16, block_k=16)
    q, k, v, _ = _qkv(1, 64, 2, 1, 32, jnp.float32)        # head dim 32: no kernel
    assert api.choose_implementation(q, k, v, m, interpret=True) == "xla"
    bsa = jax.jit(functools.partial(block_sparse_attention, interpret=True))
    np.testing.assert_allclose(np.asarray(bsa(q, k, v, m)),
                               np.asarray(_reference_fn(m)(q, k, v)), atol=2e-5)
    q64, k64, v64, _ = _qkv(1, 64, 2, 1, 64, jnp.float32)
    assert api.choose_implementation(q64, k64, v64, m, interpret=True) == "pallas"
    assert api.choose_implementation(q64, k64, v64, m) == ("pallas" if pallas.on_gpu()
                                                           else "xla")
    q16 = q64.astype(jnp.float16)
    assert api.choose_implementation(q16, k64.astype(jnp.float16), v64.astype(jnp.float16), m,
                                     interpret=True) == "xla"
    ragged = masks.causal_mask(72, block_q=16, block_k=16)
    qr, kr, vr, _ = _qkv(1, 72, 2, 1, 64, jnp.float32)
    assert api.choose_implementation(qr, kr, vr, ragged, interpret=True) == "xla"
    np.testing.assert_allclose(np.asarray(bsa(qr, kr, vr, ragged)),
                               np.asarray(_reference_fn(ragged)(qr, kr, vr)), atol=2e-5)


def test_api_under_jit_with_mask_argument():
    q, k, v, _ = _qkv(1, 64, 2, 1, 32, jnp.float32)
    m = masks.sliding_window_mask(64, 16, block_q=16, block_k=16)
    out = jax.jit(lambda q, k, v, m: block_sparse_attention(q, k, v, m))(q, k, v, m)
    np.testing.assert_allclose(np.asarray(out), np.asarray(_reference_fn(m)(q, k, v)),
                               atol=2e-5)


# ----------------------------------------------------------------------------- errors

def test_errors_name_the_problem():
    q, k, v, _ = _qkv(2, 64, 4, 2, 32, jnp.float32)
    m = masks.causal_mask(64, block_q=16, block_k=16)
    with pytest.raises(ValueError, match="head dim 32"):
        block_sparse_attention(q, k, v, m, implementation="pallas")
    with pytest.raises(ValueError, match="implementation='triton'"):
        block_sparse_attention(q, k, v, m, implementation="triton")
    q64, k64, v64, _ = _qkv(1, 72, 2, 1, 64, jnp.float32)
    with pytest.raises(ValueError, match="seq_q=72 is not a multiple of block_q=16"):
        block_sparse_attention(q64, k64, v64, masks.causal_mask(72, block_q=16, block_k=16),
                               implementation="pallas")
    with pytest.raises(ValueError, match="mask was built for seq_q=64"):
        block_sparse_attention(q, k, v, masks.causal_mask(64, 128, block_q=16, block_k=16))
    with pytest.raises(ValueError, match="mask batch 3"):
        block_sparse_attention(q, k, v, masks.from_block_mask(np.ones((3, 1, 4, 4), bool),
                                                              block_q=16, block_k=16))
    with pytest.raises(ValueError, match="mask heads 2"):
        block_sparse_attention(q, k, v, masks.from_block_mask(np.ones((1, 2, 4, 4), bool),
                                                              block_q=16, block_k=16))
    with pytest.raises(ValueError, match="H=4 is not divisible by num kv heads Hkv=3"):
        block_sparse_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), m)
    with pytest.raises(ValueError, match="block_q=24 must be a power of two"):
        masks.causal_mask(96, block_q=24, block_k=16)
    with pytest.raises(ValueError, match="block_k=8 must be a power of two >= 16"):
        masks.sliding_window_mask(64, 8, block_q=16, block_k=8)
    with pytest.raises(ValueError, match=r"block selection has shape \(1, 1, 3, 4\)"):
        masks.from_selection(np.ones((1, 1, 3, 4), bool), masks.ElementRule(), block_q=16,
                             block_k=16, seq_q=64, seq_k=64)
    with pytest.raises(ValueError, match="summary=40 must be <= stride=32"):
        masks.strided_mask(64, 32, summary=40, block_q=16, block_k=16)


# ----------------------------------------------------------------------------- GPU lowering

LOWERING_MASKS = {
    "window_sinks": lambda: masks.sliding_window_mask(64, 20, sinks=2, block_q=32, block_k=16),
    "strided": lambda: masks.strided_mask(64, 32, local=8, summary=3, block_q=16, block_k=32),
}


@pytest.mark.parametrize("dtype,d,case", [(jnp.float32, 64, "window_sinks"),
                                          (jnp.bfloat16, 128, "strided")])
def test_lowers_for_gpu_fwd_and_grad(dtype, d, case):
    q, k, v, _ = _qkv(1, 64, 4, 2, d, dtype)
    m = LOWERING_MASKS[case]()
    fwd = lambda q, k, v: pallas.block_sparse_attention_pallas(q, k, v, m, interpret=False)
    text = lower_for_gpu(fwd, q, k, v)
    assert text.count("xla.gpu.triton") == 1
    loss = lambda q, k, v: fwd(q, k, v).astype(jnp.float32).sum()
    text = lower_for_gpu(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    assert text.count("xla.gpu.triton") == 3                  # fwd, dK/dV, dQ


# ----------------------------------------------------------------------------- GPU, real sizes

GPU_MASKS = {
    "causal": lambda q, k: masks.causal_mask(4096, block_q=128, block_k=64),
    "window_sinks": lambda q, k: masks.sliding_window_mask(4096, 512, sinks=64,
                                                           block_q=128, block_k=64),
    "strided": lambda q, k: masks.strided_mask(4096, 512, local=256, summary=64,
                                               block_q=128, block_k=64),
    "random_90": lambda q, k: masks.from_block_mask(
        (np.random.default_rng(0).random((1, 8, 32, 64)) < 0.1) | np.eye(32, 64, dtype=bool),
        block_q=128, block_k=64),
    "gated_causal": lambda q, k: masks.gated_block_mask(q, k, 8, block_q=128, block_k=64,
                                                        causal=True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_MASKS))
def test_gpu_pallas_matches_xla(case):
    q, k, v, do = _qkv(2, 4096, 8, 2, 128, jnp.bfloat16)
    m = GPU_MASKS[case](q, k)
    run = lambda impl: jax.jit(lambda q, k, v, do: _out_and_grads(
        functools.partial(block_sparse_attention, mask=m, implementation=impl), q, k, v, do))
    _assert_close(run("pallas")(q, k, v, do), run("xla")(q, k, v, do), jnp.bfloat16, case)
