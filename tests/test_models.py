"""Reference models: shapes, causality, attention against JAX's own, replaceable modules."""

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import pytest
from flax import nnx

from sparsejax.models import ATTENTIONS, FFNS, DecoderLM, ResNet, ViT
from sparsejax.nn.layers import FFN, dot_product_attention
from sparsejax.train.build import build_model
from sparsejax.train.data import DataInfo

IMG = DataInfo("classification", (8, 8, 1), 10)


@pytest.mark.parametrize("name,info,x,out", [
    ("mlp", IMG, jnp.ones((2, 8, 8, 1)), (2, 10)),
    ("resnet", DataInfo("classification", (16, 16, 3), 7), jnp.ones((2, 16, 16, 3)), (2, 7)),
    ("vit", IMG, jnp.ones((2, 8, 8, 1)), (2, 10)),
    ("lm", DataInfo("lm", (12,), 20), jnp.ones((2, 12), jnp.int32), (2, 12, 20)),
])
def test_build_model_shapes(name, info, x, out):
    cfg = {"mlp": {"hidden": (16,)}, "resnet": {"depth": 8},
           "vit": {"patch_size": 2, "d_model": 32, "num_heads": 2, "d_ff": 64},
           "lm": {"d_model": 32, "num_heads": 2, "d_ff": 64}}[name]
    model = build_model(name, mc.ConfigDict(cfg), info, nnx.Rngs(0))
    y = model(x)
    assert y.shape == out and bool(jnp.all(jnp.isfinite(y)))


def test_attention_matches_jax_reference():
    q, k, v = (jax.random.normal(key, (2, 7, 3, 8)) for key in jax.random.split(jax.random.PRNGKey(1), 3))
    for causal in (False, True):
        ours = dot_product_attention(q, k, v, causal=causal)
        ref = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_lm_is_causal():
    lm = DecoderLM(vocab_size=11, max_len=10, d_model=16, num_heads=2, num_layers=2, d_ff=32,
                   rngs=nnx.Rngs(0))
    a = jnp.arange(10)[None] % 11
    b = a.at[0, 6].set(3)
    la, lb = lm(a), lm(b)
    np.testing.assert_allclose(la[0, :6], lb[0, :6], atol=1e-6)
    assert not np.allclose(la[0, 6:], lb[0, 6:])


def test_vit_activation_is_selectable():
    kw = dict(image_size=8, patch_size=2, in_channels=1, num_classes=3, d_model=16,
              num_heads=2, num_layers=1, d_ff=32)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    relu = ViT(activation="relu", rngs=nnx.Rngs(0), **kw)
    gelu = ViT(activation="gelu", rngs=nnx.Rngs(0), **kw)
    assert relu.blocks[0].mlp.act.name == "relu"
    assert not np.allclose(relu(x), gelu(x))
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        ViT(activation="swishy", rngs=nnx.Rngs(0), **kw)


def test_ffn_is_replaceable_by_passing_the_class():
    class DoubledFFN(FFN):
        def __call__(self, x):
            return 2 * super().__call__(x)

    kw = dict(vocab_size=9, max_len=6, d_model=16, num_heads=2, num_layers=1, d_ff=32)
    base = DecoderLM(rngs=nnx.Rngs(0), **kw)
    swapped = DecoderLM(ffn=DoubledFFN, rngs=nnx.Rngs(0), **kw)
    assert isinstance(swapped.blocks[0].mlp, DoubledFFN)
    x = jnp.ones((1, 16))
    np.testing.assert_allclose(swapped.blocks[0].mlp(x), 2 * base.blocks[0].mlp(x), rtol=1e-6)
    # names come from fixed tables, and options are the module's own keywords
    assert set(ATTENTIONS) == {"dense", "spark", "sparse", "gqa"}
    assert set(FFNS) == {"dense", "topk", "stopk", "spark", "block"}
    spark = DecoderLM(ffn="spark", ffn_options={"density": 0.2}, rngs=nnx.Rngs(0), **kw)
    assert spark.blocks[0].mlp.density == 0.2


def test_model_errors_are_clear():
    with pytest.raises(ValueError, match="6n\\+2"):
        ResNet(depth=10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown model 'mpl'"):
        build_model("mpl", {}, IMG, nnx.Rngs(0))
    with pytest.raises(ValueError, match="is a lm model"):
        build_model("lm", {}, IMG, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"MLP takes no argument\(s\) \['hiden'\]; config.model "
                                         r"accepts \['activation', 'hidden'\]"):
        build_model("mlp", {"hiden": (8,)}, IMG, nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"takes no argument\(s\) \['num_classes'\]"):
        build_model("mlp", {"hidden": (8,), "num_classes": 3}, IMG, nnx.Rngs(0))  # the data's
    with pytest.raises(ValueError, match="unknown ffn"):
        DecoderLM(vocab_size=5, max_len=4, ffn="sparkle", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"ffn 'spark' takes no option\(s\) \['k'\]; it accepts "
                                         r"\['density', 'r'\]"):
        DecoderLM(vocab_size=5, max_len=4, ffn="spark", ffn_options={"k": 3}, rngs=nnx.Rngs(0))
