"""Models at scale: dtypes from config, head-aligned GQA attention, layers under nnx.scan
with remat (same logits and gradients as the unscanned model, exact checkpoints), and the
chunked loss (same loss, statistics and gradients as the full one)."""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import lm_recall
from sparsejax.models import ATTENTIONS, DecoderLM
from sparsejax.nn.layers import Attention, Block, GroupedQueryAttention, dot_product_attention
from sparsejax.nn.scan import REMAT_POLICIES, resolve_dtype, stack_layers, unstack_layers
from sparsejax.paths import path_str
from sparsejax.train import Checkpointer, make_trainer, train_and_evaluate
from sparsejax.train.build import build_model
from sparsejax.train.checkpoint import abstract_like
from sparsejax.train.data import BatchIterator, DataInfo
from sparsejax.train.loop import chunked_cross_entropy, model_loss, weighted_cross_entropy

LM_INFO = DataInfo("lm", (18,), 33)  # what configs/lm_recall.py's data gives


def lm_model(**overrides):
    """The lm_recall config's model (d_model 128, 4 heads, 2 layers, d_ff 512)."""
    model = {k: v for k, v in lm_recall.get_config().model.items() if v is not None}
    return build_model("lm", {**model, **overrides}, LM_INFO, nnx.Rngs(0))


def params_of(model):
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def with_params(model, params):
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state, rest)


def tokens(shape=(3, 18), seed=0):
    return jax.random.randint(jax.random.key(seed), shape, 0, LM_INFO.num_classes)


def lm_batch(seed=0):
    x = tokens(seed=seed)
    w = jnp.ones(x.shape).at[:, :5].set(0.0)
    return {"inputs": x, "targets": jnp.roll(x, -1, axis=1), "weights": w}


def loss_and_grads(model, batch, loss_chunk=0):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return model_loss(nnx.merge(graphdef, p, rest), batch, loss_chunk)

    return jax.value_and_grad(loss, has_aux=True)(nnx.to_pure_dict(params))


def assert_close_trees(a, b, rtol=2e-5, atol=2e-6):
    for (pa, x), (pb, y) in zip(jax.tree_util.tree_leaves_with_path(a),
                                jax.tree_util.tree_leaves_with_path(b), strict=True):
        assert pa == pb
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol,
                                   err_msg=jax.tree_util.keystr(pa))


# ---- 1. dtypes -------------------------------------------------------------------------

def test_dtypes_by_name_thread_through_the_model():
    lm = lm_model(dtype="bfloat16", param_dtype="float32")
    assert lm(tokens()).dtype == jnp.bfloat16
    assert lm.hidden(tokens()).dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(params_of(lm))} == {jnp.dtype(jnp.float32)}
    assert lm.blocks[0].attn.q.dtype == jnp.bfloat16 and lm.blocks[0].ln1.dtype == jnp.bfloat16
    half = lm_model(dtype="bfloat16", param_dtype="bfloat16", scan_layers=True)
    assert {x.dtype for x in jax.tree.leaves(params_of(half))} == {jnp.dtype(jnp.bfloat16)}
    assert half(tokens()).dtype == jnp.bfloat16
    # bf16 compute stays close to f32 compute with the same f32 params
    f32 = lm_model()
    np.testing.assert_allclose(lm(tokens()).astype(jnp.float32), f32(tokens()), atol=0.15)


def test_default_dtypes_change_nothing():
    a = DecoderLM(vocab_size=33, max_len=18, rngs=nnx.Rngs(0))
    b = DecoderLM(vocab_size=33, max_len=18, dtype=jnp.float32, param_dtype="float32",
                  rngs=nnx.Rngs(0))
    assert_close_trees(params_of(a), params_of(b), rtol=0, atol=0)
    assert a(tokens()).dtype == jnp.float32
    assert sorted(path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params_of(a)))[:3] == [
        "blocks/0/attn/k/bias", "blocks/0/attn/k/kernel", "blocks/0/attn/o/bias"]


def test_unknown_dtype_and_remat_are_clear():
    with pytest.raises(ValueError, match=r"unknown dtype 'bf16'; known: \['bfloat16'"):
        lm_model(dtype="bf16")
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype(jnp.int8)
    with pytest.raises(ValueError, match=r"unknown remat policy 'dots'; known: \('none', 'full'"):
        lm_model(remat="dots")
    # the block's own keywords are not options of the attention
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['dtype'\]"):
        lm_model(attention="gqa", attention_options={"dtype": "bfloat16"})


# ---- 2. head-aligned GQA attention ---------------------------------------------------------

def test_gqa_with_all_heads_matches_the_2d_attention():
    d, h = 32, 4
    dense = Attention(d, h, causal=True, rngs=nnx.Rngs(0))
    gqa = GroupedQueryAttention(d, h, causal=True, rngs=nnx.Rngs(1))
    hd = d // h
    for name in "qkv":
        src, dst = getattr(dense, name), getattr(gqa, name)
        dst.kernel[...] = src.kernel[...].reshape(d, h, hd)
        dst.bias[...] = src.bias[...].reshape(h, hd)
    gqa.o.kernel[...] = dense.o.kernel[...].reshape(h, hd, d)
    gqa.o.bias[...] = dense.o.bias[...]
    x = jax.random.normal(jax.random.key(2), (2, 7, d))
    np.testing.assert_allclose(gqa(x), dense(x), rtol=1e-5, atol=1e-5)
    assert "gqa" in ATTENTIONS and ATTENTIONS["gqa"] is GroupedQueryAttention


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_matches_repeated_kv_heads(causal):
    d, h, kv = 48, 6, 2
    attn = GroupedQueryAttention(d, h, num_kv_heads=kv, causal=causal, rngs=nnx.Rngs(0))
    assert attn.q.kernel.shape == (d, h, 8) and attn.k.kernel.shape == (d, kv, 8)
    assert attn.o.kernel.shape == (h, 8, d)
    x = jax.random.normal(jax.random.key(3), (2, 9, d))
    q, k, v = attn.q(x), attn.k(x), attn.v(x)
    k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)  # head i → group i//3
    ref = attn.o(dot_product_attention(q, k, v, causal=causal))
    np.testing.assert_allclose(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_gqa_errors_are_clear():
    with pytest.raises(ValueError, match="num_heads=4 is not divisible by num_kv_heads=3"):
        GroupedQueryAttention(32, 4, num_kv_heads=3, causal=True, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        GroupedQueryAttention(32, 4, implementation="flash", causal=True, rngs=nnx.Rngs(0))
    if jax.default_backend() != "gpu":
        attn = GroupedQueryAttention(32, 4, implementation="cudnn", causal=True, rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
            attn(jnp.ones((1, 4, 32)))


def test_gqa_lm_in_bfloat16_with_xla_implementation():
    lm = lm_model(attention="gqa", attention_options={"num_kv_heads": 2, "implementation": "xla"},
                  dtype="bfloat16", scan_layers=True, remat="dots_saveable")
    assert params_of(lm)["blocks"]["attn"]["k"]["kernel"].shape == (2, 128, 2, 32)
    out = lm(tokens())
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


# ---- 3. scan over layers -------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["dense", "gqa"])
def test_scanned_and_unscanned_give_the_same_logits_and_gradients(attention):
    plain = lm_model(attention=attention)
    scanned = lm_model(attention=attention, scan_layers=True, remat="full")
    assert plain.stacked_paths == () and scanned.stacked_paths == ("blocks/.*",)
    p = params_of(plain)
    s = stack_layers(p)
    assert jax.tree.map(jnp.shape, s) == jax.tree.map(jnp.shape, params_of(scanned))
    scanned = with_params(scanned, s)
    np.testing.assert_allclose(scanned(tokens()), plain(tokens()), rtol=2e-5, atol=2e-5)
    batch = lm_batch()
    (loss_p, stats_p), g_p = loss_and_grads(plain, batch)
    (loss_s, stats_s), g_s = loss_and_grads(scanned, batch)
    np.testing.assert_allclose(loss_s, loss_p, rtol=1e-6)
    assert_close_trees(stats_s, stats_p)
    assert_close_trees(unstack_layers(g_s), g_p, rtol=1e-4, atol=1e-6)


# every policy under scan, and remat on the unscanned loop once ('none' is the reference)
@pytest.mark.parametrize("remat,scan", [(r, True) for r in REMAT_POLICIES] + [("full", False)])
def test_remat_policies_change_no_gradient(remat, scan):
    ref_model = lm_model(scan_layers=scan)
    model = with_params(lm_model(scan_layers=scan, remat=remat), params_of(ref_model))
    batch = lm_batch(1)
    (loss, _), grads = loss_and_grads(model, batch)
    (ref, _), ref_grads = loss_and_grads(ref_model, batch)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    assert_close_trees(grads, ref_grads, rtol=1e-5, atol=1e-6)


def test_stacked_paths_name_exactly_the_layer_stacked_params():
    model = lm_model(scan_layers=True)
    leaves = jax.tree_util.tree_leaves_with_path(params_of(model))
    stacked = {path_str(p) for p, _ in leaves
               if any(re.fullmatch(r, path_str(p)) for r in model.stacked_paths)}
    assert stacked == {path_str(p) for p, _ in leaves if path_str(p).startswith("blocks/")}
    assert "blocks/attn/q/kernel" in stacked and "head/kernel" not in stacked
    assert all(x.shape[0] == 2 for p, x in leaves if path_str(p) in stacked)


def test_stack_and_unstack_are_inverse():
    p = params_of(lm_model())
    back = unstack_layers(stack_layers(p))
    assert_close_trees(back, p, rtol=0, atol=0)
    assert jax.tree.structure(back) == jax.tree.structure(p)
    with pytest.raises(ValueError, match="layer keys must be 0..n-1"):
        stack_layers({"blocks": {0: {"w": jnp.zeros(1)}, 2: {"w": jnp.zeros(1)}}})


def test_scanned_lm_is_causal():
    lm = lm_model(scan_layers=True, remat="full")
    a = tokens((1, 18))
    b = a.at[0, 6].set((a[0, 6] + 1) % LM_INFO.num_classes)
    la, lb = lm(a), lm(b)
    np.testing.assert_allclose(la[0, :6], lb[0, :6], atol=1e-6)
    assert not np.allclose(la[0, 6:], lb[0, 6:])


def scan_config(arg="tiny", **overrides):
    cfg = lm_recall.get_config(arg)
    cfg.model.scan_layers, cfg.model.remat = True, "full"
    cfg.update_from_flattened_dict(overrides)  # dotted keys: 'model.num_layers'
    return cfg


def test_scanned_lm_checkpoint_restores_exactly(tmp_path):
    cfg = scan_config("rigl,0.8,tiny", **{"mesh.shape": (4, 2), "sharding_rules": (
        (r"blocks/mlp/up/kernel", (None, None, "model")),)})
    t = make_trainer(cfg)
    with jax.set_mesh(t.mesh):
        state = t.init(jax.random.PRNGKey(0))
        it = BatchIterator(t.dataset.train, cfg.batch_size, cfg.seed)
        for _ in range(3):
            state, stats = t.step(state, t.device_batch(next(it)))
    assert np.isfinite(float(stats["loss_sum"]))
    kernel = state.params["blocks"]["mlp"]["up"]["kernel"]
    assert kernel.shape == (2, 128, 512) and kernel.sharding.spec == P(None, None, "model")
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, state, data_position=3)
    ckpt.wait()
    restored, pos = ckpt.restore(abstract_like(t.abstract_state, t.state_shardings))
    ckpt.close()
    assert pos == 3
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.params["blocks"]["mlp"]["up"]["kernel"].sharding == kernel.sharding
    mask = restored.opt_state.masks["blocks"]["mlp"]["up"]["kernel"]  # rigl's masks too
    assert mask.dtype == bool and mask.shape == kernel.shape


@pytest.mark.slow
def test_scanned_lm_resumes_bit_identical(tmp_path):
    """A scanned, rematerialised, chunked-loss run stopped at step 10 and resumed ends
    where the straight run ends (the checkpoint restores exactly)."""
    def cfg(steps):
        c = scan_config(**{"loss_chunk": 8, "num_steps": steps, "optimizer.decay_steps": 20})
        c.eval_every = 0
        return c

    first = train_and_evaluate(cfg(10), tmp_path / "resumed", progress=False)
    assert first["resumed_from"] == 0
    resumed = train_and_evaluate(cfg(20), tmp_path / "resumed", progress=False)
    assert resumed["resumed_from"] == 10
    straight = train_and_evaluate(cfg(20), tmp_path / "straight", progress=False)
    t = make_trainer(cfg(20))
    target = abstract_like(t.abstract_state, t.state_shardings)
    with jax.set_mesh(t.mesh):
        a, _ = Checkpointer(tmp_path / "resumed" / "checkpoints").restore(target, step=20)
        b, _ = Checkpointer(tmp_path / "straight" / "checkpoints").restore(target, step=20)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert resumed["eval_loss"] == straight["eval_loss"]


# ---- 4. chunked loss ---------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 5, 6, 18, 64])
def test_chunked_loss_equals_the_full_loss(chunk):
    model = lm_model()
    batch = lm_batch(2)
    (loss, stats), grads = loss_and_grads(model, batch, loss_chunk=chunk)
    (ref, ref_stats), ref_grads = loss_and_grads(model, batch)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    assert_close_trees(stats, ref_stats, rtol=1e-6, atol=1e-5)
    assert_close_trees(grads, ref_grads, rtol=1e-5, atol=1e-6)


def test_chunked_loss_in_bfloat16_upcasts_per_chunk():
    model = lm_model(dtype="bfloat16", scan_layers=True, remat="full")
    batch = lm_batch(3)
    (loss, stats), grads = loss_and_grads(model, batch, loss_chunk=4)
    (ref, ref_stats), ref_grads = loss_and_grads(model, batch)
    np.testing.assert_allclose(loss, ref, rtol=1e-5)
    assert float(stats["correct"]) == float(ref_stats["correct"])
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        # bf16 matmuls: the chunks' head-gradient sums round differently
        assert float(jnp.linalg.norm(g - r)) <= 1e-2 * float(jnp.linalg.norm(r)) + 1e-6
    h = model.hidden(batch["inputs"])  # the chunks' logits come from the head in bf16
    _, direct = chunked_cross_entropy(h, model.head, batch, 4)
    assert_close_trees(direct, weighted_cross_entropy(model.head(h), batch)[1], rtol=1e-5,
                       atol=1e-4)


def test_chunked_loss_never_holds_full_logits():
    model = lm_model()
    batch = lm_batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def grad(chunk):
        def loss(p):
            return model_loss(nnx.merge(graphdef, p, rest), batch, chunk)[0]
        return jax.grad(loss)

    full, chunk = (3, 18, LM_INFO.num_classes), (3, 6, LM_INFO.num_classes)
    assert full in _inner_shapes(grad(0), nnx.to_pure_dict(params))
    shapes = _inner_shapes(grad(6), nnx.to_pure_dict(params))
    assert full not in shapes and chunk in shapes


def _inner_shapes(fn, *args) -> set:
    """Output shapes of every equation, sub-jaxprs (scan, checkpoint) included."""
    out = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            out.update(v.aval.shape for v in eqn.outvars)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return out


def test_loss_chunk_in_the_trainer_and_its_errors():
    base = lm_recall.get_config("tiny")
    chunked = lm_recall.get_config("tiny")
    chunked.loss_chunk = 5
    out = []
    for cfg in (base, chunked):
        t = make_trainer(cfg)
        with jax.set_mesh(t.mesh):
            state = t.init(jax.random.PRNGKey(0))
            it = BatchIterator(t.dataset.train, cfg.batch_size, cfg.seed)
            steps = []
            for _ in range(2):
                state, stats = t.step(state, t.device_batch(next(it)))
                steps.append(stats)
        # k's bias has a zero true gradient (softmax ignores a shift), so Adam moves it by
        # the sign of rounding noise; it changes no output
        params = {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(state.params)
                  if not path_str(p).endswith("attn/k/bias")}
        out.append((params, jax.device_get(steps)))
    assert_close_trees(out[1][0], out[0][0], rtol=1e-4, atol=1e-6)
    assert_close_trees(out[1][1], out[0][1], rtol=1e-4, atol=1e-5)
    bad = lm_recall.get_config("tiny")
    bad.loss_chunk = -1
    with pytest.raises(ValueError, match="config.loss_chunk must be a non-negative integer"):
        make_trainer(bad)
    from configs import quickstart
    mlp = quickstart.get_config("tiny")
    with mlp.unlocked():
        mlp.loss_chunk = 4
    with pytest.raises(ValueError, match="config.loss_chunk=4 needs a model with hidden"):
        make_trainer(mlp)


def test_block_passes_dtypes_only_when_asked():
    def plain_ffn(d_model, d_ff, activation, *, rngs):  # the documented signature
        return nnx.Linear(d_model, d_model, rngs=rngs)

    Block(16, 2, 32, activation="relu", causal=True, ffn=plain_ffn, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="dtype"):
        Block(16, 2, 32, activation="relu", causal=True, ffn=plain_ffn, dtype="bfloat16",
              rngs=nnx.Rngs(0))
