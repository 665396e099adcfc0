"""Activation-sparse modules: top-k activation, Spark FFN, surgery insertion and measurement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.scipy.special import ndtri

from sparsejax import surgery
from sparsejax.nn.spark import SparkFFN, StatisticalTopKFFN, TopKActivation, TopKFFN


def test_topk_activation_keeps_exactly_k_per_token():
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 7, 200))
    out = TopKActivation("gelu", density=0.1, mode="exact")(x)
    assert np.all(np.asarray(jnp.sum(out != 0, axis=-1)) == 20)
    h = jax.nn.gelu(x)
    kth = jnp.sort(h, axis=-1)[..., -20][..., None]
    np.testing.assert_array_equal(out, jnp.where(h >= kth, h, 0))


def test_spark_ffn_equals_hand_written_reference():
    ffn = SparkFFN(32, 400, "gelu", density=0.08, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 32))
    pre = x[..., :16] @ ffn.k1.kernel[...]
    theta = pre.mean(-1, keepdims=True) + pre.std(-1, keepdims=True) * ndtri(1 - 0.08)
    gate = jax.nn.gelu(jnp.maximum(pre - theta, 0.0))
    want = (gate * (x[..., 16:] @ ffn.k2.kernel[...])) @ ffn.v.kernel[...] + ffn.v.bias[...]
    np.testing.assert_allclose(ffn(x), want, rtol=1e-5, atol=1e-5)
    density = float(jnp.mean(ffn.gate(x) != 0))
    assert 0.03 < density < 0.15  # statistical: about 8% of 400 units
    g = jax.grad(lambda m: jnp.sum(m(x) ** 2))(ffn)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in jax.tree.leaves(nnx.state(g)))


class _Foreign(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 300, rngs=rngs)
        self.relu = _Relu()
        self.down = nnx.Linear(300, 4, rngs=rngs)

    def __call__(self, x):
        return self.down(self.relu(self.up(x)))


class _Relu(nnx.Module):
    def __call__(self, x):
        return jax.nn.relu(x)


def test_surgery_inserts_topk_and_measures_lazy_neurons():
    model = _Foreign(nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(2), (8, 16))
    call = lambda m: m(x)  # noqa: E731
    before = surgery.activation_sparsity(model, call, kinds=(_Relu,))
    assert 0.3 < before["relu"] < 0.7  # ReLU of a random projection: about half active
    surgery.replace(model, [(r"relu", lambda path, m: TopKActivation("relu", density=0.05))])
    after = surgery.activation_sparsity(model, call)
    assert after["relu"] == pytest.approx(15 / 300)  # exactly k = 15 of 300 per token
    with pytest.raises(ValueError, match="no activation module"):
        surgery.activation_sparsity(nnx.Linear(2, 2, rngs=nnx.Rngs(0)),
                                    lambda m: m(jnp.ones((1, 2))))


@pytest.mark.parametrize("ffn", ["topk", "stopk", "spark", "block"])
def test_transformers_select_activation_sparse_ffn_from_config(ffn):
    from configs import lm_recall, vit_digits
    from sparsejax.train import make_trainer
    from sparsejax.train.data import BatchIterator

    cfg = (vit_digits if ffn != "spark" else lm_recall).get_config("tiny")
    with cfg.unlocked():
        cfg.model.ffn, cfg.model.ffn_options = ffn, {"density": 0.08}
        cfg.model.activation = "relu"
        if ffn == "spark":  # Spark FFN + Spark attention in the decoder LM
            cfg.model.attention, cfg.model.attention_options = "spark", {"keys_per_query": 4}
    t = make_trainer(cfg)
    with jax.set_mesh(t.mesh):
        state = t.init(jax.random.PRNGKey(0))
        it = BatchIterator(t.dataset.train, cfg.batch_size, 0)
        for _ in range(2):
            state, stats = t.step(state, t.device_batch(next(it)))
    assert np.isfinite(float(stats["loss_sum"]))
    if ffn == "block":  # block-sparse training path of the FFN kernel
        from sparsejax.nn import BlockSparseFFN
        from sparsejax.train.build import build_model

        mlp = build_model(cfg.model_name, cfg.model, t.dataset.info, nnx.Rngs(0)).blocks[0].mlp
        assert isinstance(mlp, BlockSparseFFN) and mlp.keep_blocks == 1
    if ffn == "spark":
        assert "k1" in state.params["blocks"][0]["mlp"]
        assert type(t.graphdef).__name__ and t.dataset.info.input_shape[0] > 4  # k < keys


def test_bad_input():
    with pytest.raises(ValueError, match="density 0.0 is outside"):
        TopKActivation("relu", density=0.0)
    with pytest.raises(ValueError, match="unknown top-k mode 'fuzzy'"):
        TopKActivation("relu", mode="fuzzy")
    with pytest.raises(ValueError, match="predictor dims r=64"):
        SparkFFN(64, 128, r=64, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="density 1.5 is outside"):
        SparkFFN(64, 128, density=1.5, rngs=nnx.Rngs(0))


def test_spark_attention_equals_dense_reference_with_the_same_mask():
    from sparsejax.nn.spark import SparkAttention, spark_key_mask

    attn = SparkAttention(32, 2, causal=True, keys_per_query=6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 40, 32))
    heads = lambda lin: lin(x).reshape(2, 40, 2, 16)  # noqa: E731
    q, k, v = heads(attn.q), heads(attn.k), heads(attn.v)
    keep = spark_key_mask(q[..., :8], k[..., :8], 6, causal=True)
    # independent reference: scores and threshold written out with numpy
    s = np.einsum("bqhd,bkhd->bhqk", np.asarray(q[..., :8]), np.asarray(k[..., :8]))
    valid = np.tril(np.ones((40, 40), bool))
    ref = np.zeros_like(valid, shape=s.shape)
    for b, h, i in np.ndindex(2, 2, 40):
        row = s[b, h, i, : i + 1]
        if row.size <= 6:
            ref[b, h, i, : i + 1] = True
            continue
        theta = row.mean() + row.std() * float(ndtri(1 - 6 / row.size))
        ref[b, h, i, : i + 1] = (row > theta) | (row == row.max())
    np.testing.assert_array_equal(np.asarray(keep), ref)
    assert not np.any(np.asarray(keep) & ~valid)  # never a future key
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / 4.0
    probs = jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)
    want = attn.o(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(2, 40, 32))
    np.testing.assert_allclose(attn(x), want, rtol=1e-5, atol=1e-5)
    kept = np.asarray(keep).sum(-1)[..., 20:]  # rows with more than k valid keys
    assert 2 <= kept.mean() <= 12  # about k = 6 keys per query
    with pytest.raises(ValueError, match="keys_per_query > 0"):
        SparkAttention(32, 2, causal=True, keys_per_query=0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("cls", [SparkFFN, TopKFFN, StatisticalTopKFFN])
def test_decode_reading_selected_units_equals_the_module(cls):
    ffn = cls(64, 512, "gelu" if cls is SparkFFN else "relu", density=0.08, rngs=nnx.Rngs(0))
    if cls is not SparkFFN:  # nonzero biases, so their handling is checked too
        ffn.up.bias[...] = 0.1 * jax.random.normal(jax.random.PRNGKey(5), (512,))
        ffn.down.bias[...] = jax.random.normal(jax.random.PRNGKey(6), (64,))
    for rows in (1, 8):
        x = jax.random.normal(jax.random.PRNGKey(rows), (rows, 64))
        np.testing.assert_allclose(ffn.decode(x), ffn(x), rtol=1e-5, atol=1e-5)


def test_block_sparse_ffn_computes_the_best_blocks_of_each_tile():
    from sparsejax.nn.layers import FFN
    from sparsejax.nn import BlockSparseFFN

    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 64))           # 64 tokens, 2 tiles
    ffn = BlockSparseFFN(64, 256, "gelu", density=0.25, block_units=32, tile_tokens=32,
                         rngs=nnx.Rngs(0))
    assert ffn.keep_blocks == 2
    # independent reference in numpy: score blocks per tile, keep the top 2, mask, project
    xs, wu, bu = (np.asarray(a, np.float64) for a in (x.reshape(64, 64), ffn.up.kernel[...],
                                                     ffn.up.bias[...]))
    h = np.asarray(jax.nn.gelu(jnp.asarray(xs @ wu + bu)))
    mask = np.zeros_like(h)
    for tile in range(2):
        rows = slice(32 * tile, 32 * tile + 32)
        score = np.abs(h[rows]).reshape(32, 8, 32).sum(axis=(0, 2))
        for blk in np.argsort(-score)[:2]:
            mask[rows, 32 * blk: 32 * blk + 32] = 1
    want = (h * mask) @ np.asarray(ffn.down.kernel[...]) + np.asarray(ffn.down.bias[...])
    np.testing.assert_allclose(ffn(x).reshape(64, 64), want, rtol=1e-4, atol=1e-4)
    full = BlockSparseFFN(64, 256, "gelu", density=1.0, block_units=32, tile_tokens=32,
                          rngs=nnx.Rngs(0))
    np.testing.assert_allclose(full(x), FFN(64, 256, "gelu", rngs=nnx.Rngs(0))(x),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="block_units=48 must divide d_ff=256"):
        BlockSparseFFN(64, 256, block_units=48, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tile_tokens=32 must divide the token count T=40"):
        ffn(jnp.ones((40, 64)))
