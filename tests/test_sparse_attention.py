"""SparseAttention: the block-sparse kernel as an NNX module, selectable from config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsejax.nn.layers import Attention, dot_product_attention
from sparsejax.nn import SparseAttention
from sparsejax.kernels.block_sparse_attention.masks import block_mean

D_MODEL, HEADS, T = 64, 4, 64


def _layer(pattern, causal=True, **kw):
    opts = dict(block_size=16, window=24, sinks=3, stride=32, keep=2, keys_per_query=32)
    return SparseAttention(D_MODEL, HEADS, causal=causal, pattern=pattern, rngs=nnx.Rngs(0),
                           **{**opts, **kw})


def _x(seed=1, t=T):
    return jax.random.normal(jax.random.key(seed), (2, t, D_MODEL))


def _qkv(layer, x):
    return layer._heads(layer.q(x)), layer._heads(layer.k(x)), layer._heads(layer.v(x))


def _masked_attention(layer, x, allowed):
    """Independent reference: softmax over the allowed keys with numpy-built masks."""
    q, k, v = (np.asarray(a, np.float64) for a in _qkv(layer, x))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(allowed, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape)
    return np.asarray(layer.o(jnp.asarray(out, jnp.float32)))


def _window_allowed(t, window, sinks):
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    return (j <= i) & ((i - j < window) | (j < sinks))


def _strided_allowed(t, stride):
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    return (j <= i) & ((i - j < stride) | (j % stride == stride - 1))


def test_full_pattern_equals_dense_attention_with_the_same_weights():
    for causal in (True, False):
        sparse = _layer("full", causal=causal)
        dense = Attention(D_MODEL, HEADS, causal=causal, rngs=nnx.Rngs(0))
        x = _x()
        np.testing.assert_allclose(sparse(x), dense(x), rtol=2e-5, atol=2e-5)
        q, k, v = _qkv(sparse, x)
        ref = dense.o(dot_product_attention(q, k, v, causal=causal).reshape(x.shape))
        np.testing.assert_allclose(sparse(x), ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("pattern,allowed", [
    ("window", _window_allowed(T, 24, 3)),
    ("strided", _strided_allowed(T, 32)),
])
def test_static_patterns_match_their_definitions(pattern, allowed):
    layer, x = _layer(pattern), _x()
    q, k, _ = _qkv(layer, x)
    np.testing.assert_array_equal(np.asarray(layer.block_mask(q, k).dense())[0, 0], allowed)
    np.testing.assert_allclose(layer(x), _masked_attention(layer, x, allowed),
                               rtol=1e-4, atol=1e-5)


def test_gated_pattern_keeps_the_top_pooled_blocks():
    layer, x = _layer("gated"), _x()
    q, k, _ = _qkv(layer, x)
    m = layer.block_mask(q, k)
    dense = np.asarray(m.dense())                              # [B, H, T, T]
    nb = T // 16
    blocks = dense.reshape(2, HEADS, nb, 16, nb, 16).any(axis=(3, 5))
    pq = np.asarray(q).reshape(2, nb, 16, HEADS, -1).mean(2)
    pk = np.asarray(k).reshape(2, nb, 16, HEADS, -1).mean(2)
    scores = np.einsum("bqhd,bkhd->bhqk", pq, pk)
    for b in range(2):
        for h in range(HEADS):
            for i in range(nb):
                causal_ok = np.arange(nb) <= i
                chosen = np.flatnonzero(blocks[b, h, i])
                assert i in chosen and set(chosen) <= set(np.flatnonzero(causal_ok))
                cand = np.where(causal_ok & (np.arange(nb) != i), scores[b, h, i], -np.inf)
                best = np.argsort(-cand)[:max(0, min(2, i + 1) - 1)]  # keep=2 incl. diagonal
                assert set(best) <= set(chosen)
    assert dense[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]].sum() == 0
    np.testing.assert_allclose(layer(x), _masked_attention(layer, x, dense),
                               rtol=1e-4, atol=1e-5)


def test_spark_pattern_selects_about_k_keys_per_query_by_statistical_top_k():
    layer, x = _layer("spark", keys_per_query=32, causal=False, d_low=8), _x()
    q, k, _ = _qkv(layer, x)
    dense = np.asarray(layer.block_mask(q, k).dense())
    nb = T // 16
    blocks = dense.reshape(2, HEADS, nb, 16, nb, 16).all(axis=(3, 5))
    # Independent block scores from the low-dimensional slice, and the Spark threshold.
    pq = np.asarray(q)[..., :8].reshape(2, nb, 16, HEADS, 8).mean(2)
    pk = np.asarray(k)[..., :8].reshape(2, nb, 16, HEADS, 8).mean(2)
    s = np.einsum("bqhd,bkhd->bhqk", pq, pk)
    from scipy.stats import norm
    theta = s.mean(-1, keepdims=True) + s.std(-1, keepdims=True) * norm.ppf(1 - 2 / nb)
    expect = (s > theta) | (s >= s.max(-1, keepdims=True))
    np.testing.assert_array_equal(blocks, expect)
    np.testing.assert_allclose(layer(x), _masked_attention(layer, x, dense),
                               rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_projection():
    for pattern in ("window", "gated", "spark"):
        layer, x = _layer(pattern), _x()
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
        for name in ("q", "k", "v", "o"):
            g = getattr(grads, name).kernel[...]
            assert np.isfinite(g).all() and np.abs(g).sum() > 0, (pattern, name)


def test_block_mean_averages_only_real_positions():
    x = jnp.arange(40.0).reshape(1, 40, 1, 1)
    np.testing.assert_allclose(block_mean(x, 16)[0, :, 0, 0], [7.5, 23.5, 35.5])


def test_selectable_from_config_in_lm_and_vit(root):
    from configs import lm_recall, vit_digits
    from sparsejax.train.build import build_model
    from sparsejax.train.data import DataInfo

    for mod, pattern, info in ((lm_recall, "spark", DataInfo("lm", (64,), 40)),
                               (vit_digits, "full", DataInfo("classification", (8, 8, 1), 10))):
        c = mod.get_config("tiny")
        c.model.attention = "sparse"
        c.model.attention_options = dict(pattern=pattern, block_size=16, window=32, sinks=4)
        model = build_model(c.model_name, c.model, info, nnx.Rngs(0))
        attn = model.blocks[0].attn
        assert isinstance(attn, SparseAttention) and attn.pattern == pattern
        assert (attn.block_size, attn.window, attn.sinks) == (16, 32, 4)
        dtype = jnp.int32 if info.task == "lm" else jnp.float32
        assert np.isfinite(nnx.jit(lambda m, x: m(x))(model, jnp.zeros((2, *info.input_shape),
                                                                       dtype))).all()


@pytest.mark.parametrize("kw,match", [
    (dict(pattern="banded"), "unknown sparse-attention pattern 'banded'"),
    (dict(pattern="window", block_size=24), "power of two"),
    (dict(pattern="window", window=0), "window > 0"),
    (dict(pattern="window", sinks=-1), "sinks=-1"),
    (dict(pattern="spark", d_low=99), "d_low=99"),
])
def test_bad_settings_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        _layer(**kw)
