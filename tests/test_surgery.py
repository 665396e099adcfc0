"""Model-agnostic surgery on models written the Flax way (``flax_models``): calls instead
of example inputs, stem and head, default rules, attached activations and their
measurement. References are computed by hand with numpy from the layers' own weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_models import CNN, Decoder
from sparsejax import analysis, paths, surgery
from sparsejax.nn import TopKActivation

X = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 1))
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 32)
POSITIONS = jnp.broadcast_to(jnp.arange(8), (2, 8))


def cnn_call(m):
    return m(X, nnx.Rngs(0))  # train mode: Dropout needs rngs, BatchNorm uses batch stats


def decoder_call(m):
    return m(TOKENS, POSITIONS)


def _leaves(tree):
    """Every leaf of a state as a numpy array (RNG keys as their key data)."""
    def arr(x):
        x = x.get_value() if isinstance(x, nnx.Variable) else x
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    return [(paths.path_str(p), arr(x)) for p, x in
            jax.tree_util.tree_flatten_with_path(
                tree, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]]


def _assert_same_state(before, model):
    after = _leaves(nnx.state(model))
    assert [p for p, _ in after] == [p for p, _ in before]
    for (p, a), (_, b) in zip(before, after):
        np.testing.assert_array_equal(a, b, err_msg=p)


def _own_rngs_cnn():
    """The CNN with Dropouts that hold their own RNG streams (their counts are state)."""
    cnn = CNN(rngs=nnx.Rngs(0))
    cnn.dropout1 = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=3))
    cnn.dropout2 = nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=4))
    return cnn


# ----------------------------------------------------------------------------- calls


def test_tracing_the_cnn_in_train_mode_changes_nothing():
    cnn = CNN(rngs=nnx.Rngs(0))
    before = _leaves(nnx.state(cnn))
    shapes = surgery.trace_calls(cnn, cnn_call, kinds=(nnx.Conv, nnx.Linear), abstract=True)
    assert [(c.path, c.out.shape) for c in shapes] == [
        ("conv1", (4, 8, 8, 16)), ("conv2", (4, 4, 4, 32)), ("linear1", (4, 64)),
        ("linear2", (4, 10))]
    eager = surgery.trace_calls(cnn, cnn_call, kinds=(nnx.BatchNorm,))
    assert [c.path for c in eager] == ["batch_norm1", "batch_norm2"]
    surgery.activation_sparsity(cnn, cnn_call, after={"linear1": nnx.relu})
    from sparsejax.flops import model_flops

    model_flops(cnn, cnn_call)
    _assert_same_state(before, cnn)  # BatchNorm statistics untouched
    # a model whose Dropouts hold RNG streams: their counts do not move either
    own = _own_rngs_cnn()
    before = _leaves(nnx.state(own))
    surgery.trace_calls(own, lambda m: m(X), kinds=(nnx.Linear,), abstract=True)
    surgery.trace_calls(own, lambda m: m(X), kinds=(nnx.Linear,))
    surgery.stem_and_head(own, lambda m: m(X))
    _assert_same_state(before, own)
    own(X)  # the model itself does move them
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(before, _leaves(nnx.state(own))))


def test_an_rngs_made_outside_the_call_is_a_clear_error():
    cnn, rngs = CNN(rngs=nnx.Rngs(0)), nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"create it inside the call"):
        surgery.stem_and_head(cnn, lambda m: m(X, rngs))
    assert int(rngs.default.count[...]) == 0
    with pytest.raises(TypeError, match=r"call must be a function call\(model\)"):
        surgery.trace_calls(cnn, X, kinds=(nnx.Conv,))
    # the model's own error when the call does not give Dropout its rngs
    with pytest.raises(ValueError, match="no `rngs` argument was provided to Dropout"):
        surgery.stem_and_head(cnn, lambda m: m(X))


# ----------------------------------------------------------------------------- stem and head


class _Wrapper(nnx.Module):
    """A one-input wrapper around the multi-argument Decoder."""

    def __init__(self):
        self.model = Decoder(rngs=nnx.Rngs(0))

    def __call__(self, batch):
        return self.model(batch["tokens"], batch["positions"])


class _OwnKernel(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 5)))

    def __call__(self, x):
        return x @ self.w[...]


class _Foreign(nnx.Module):
    """Defined head first; the stem is a user module holding a plain weight matrix."""

    def __init__(self, rngs):
        self.head = nnx.Linear(7, 2, rngs=rngs)
        self.stem = _OwnKernel(rngs)
        self.norm = nnx.LayerNorm(5, rngs=rngs)
        self.mid = nnx.Linear(5, 7, rngs=rngs)

    def __call__(self, x):
        return self.head(self.mid(self.norm(self.stem(x))))


def test_stem_and_head_are_the_first_and_last_weight_layers_called():
    cnn, dec = CNN(rngs=nnx.Rngs(0)), Decoder(rngs=nnx.Rngs(0))
    assert surgery.stem_and_head(cnn, cnn_call) == ("conv1", "linear2")
    blocks = [f"blocks/{i}/{n}" for i in range(2) for n in ("qkv", "out", "up", "down")]
    assert surgery.layer_calls(dec, decoder_call) == ["embed", "pos", *blocks, "embed"]
    assert surgery.stem_and_head(dec, decoder_call) == ("embed", "embed")  # tied head
    wrapped = _Wrapper()
    batch = {"tokens": TOKENS, "positions": POSITIONS}
    assert surgery.stem_and_head(wrapped, lambda m: m(batch)) == ("model/embed", "model/embed")
    # so Sparse-IFT transforms every MLP Linear behind the wrapper, none of the Einsums
    from sparsejax import ift

    assert ift.select(wrapped, call=lambda m: m(batch)) == [
        f"model/blocks/{i}/{n}" for i in range(2) for n in ("up", "down")]
    foreign = _Foreign(nnx.Rngs(0))
    call = lambda m: m(jnp.ones((2, 3)))  # noqa: E731
    assert surgery.stem_and_head(foreign, call) == ("stem", "head")
    assert surgery.holds_weights(foreign.stem) and not surgery.holds_weights(foreign.norm)
    with pytest.raises(ValueError, match="calls no layer holding a parameter"):
        surgery.stem_and_head(nnx.Sequential(nnx.LayerNorm(3, rngs=nnx.Rngs(0))),
                              lambda m: m(jnp.ones((1, 3))))


def _specs(model, rules):
    params = nnx.state(model, nnx.Param)
    return {p: (spec if pattern is not None else "dense")
            for p, _, pattern, spec in paths.match_rules(params, rules, "sparsity")}


def test_default_rules_keep_stem_head_and_embeddings_dense():
    cnn = CNN(rngs=nnx.Rngs(0))
    want = [("conv1/kernel", "dense"), ("linear2/kernel", "dense"), *paths.DEFAULT_RULES]
    assert surgery.default_rules(cnn, cnn_call) == want
    assert surgery.default_rules(cnn) == want  # definition order agrees on this model
    specs = _specs(cnn, want)
    sparse = sorted(p for p, s in specs.items() if s == "sparse")
    assert sparse == ["conv2/kernel", "linear1/kernel"]
    assert specs["conv1/kernel"] == specs["linear2/kernel"] == specs["conv1/bias"] == "dense"

    dec = Decoder(rngs=nnx.Rngs(0))
    rules = surgery.default_rules(dec, decoder_call)
    assert rules == list(paths.DEFAULT_RULES)  # stem and head are the Embed: no kernel
    specs = _specs(dec, rules)
    kernels = [f"blocks/{i}/{n}/kernel" for i in range(2) for n in ("down", "out", "qkv", "up")]
    assert sorted(p for p, s in specs.items() if s == "sparse") == kernels
    assert specs["embed/embedding"] == specs["pos/embedding"] == "dense"
    # without a call the head is guessed from the definition order: the last Linear
    assert surgery.default_rules(dec)[0] == ("blocks/1/down/kernel", "dense")

    foreign = _Foreign(nnx.Rngs(0))  # user-kernel stem (not named 'kernel'), Linear head
    rules = surgery.default_rules(foreign, lambda m: m(jnp.ones((2, 3))))
    assert rules == [("head/kernel", "dense"), *paths.DEFAULT_RULES]
    assert surgery.default_rules(foreign)[0] == ("head/kernel", "dense")  # defined first
    two = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
    rules = surgery.default_rules(two, lambda m: m(jnp.ones((1, 3))))
    assert rules == [("layers/0/kernel", "dense"), ("layers/1/kernel", "dense")]  # no sparse rule
    assert set(_specs(two, rules).values()) == {"dense"}


# ----------------------------------------------------------------------------- activations


def _forward_to_linear1(cnn, x):
    """The CNN in eval mode up to linear1's input, step by step from its own layers."""
    h = cnn.avg_pool(nnx.relu(cnn.batch_norm1(cnn.conv1(x))))
    h = cnn.avg_pool(nnx.relu(cnn.batch_norm2(cnn.conv2(h))))
    return h.reshape(h.shape[0], -1)


def test_activation_after_a_module_equals_a_numpy_reference():
    cnn = CNN(rngs=nnx.Rngs(0))
    cnn.batch_norm2.mean[...] = jnp.linspace(-1, 1, 32)  # so ReLU after BN is not ~1/2
    cnn.eval()
    h = np.asarray(_forward_to_linear1(cnn, X))
    pre = h @ np.asarray(cnn.linear1.kernel[...]) + np.asarray(cnn.linear1.bias[...])
    conv2_in = cnn.avg_pool(nnx.relu(cnn.batch_norm1(cnn.conv1(X))))
    bn2 = np.asarray(cnn.batch_norm2(cnn.conv2(conv2_in)))
    got = surgery.activation_sparsity(cnn, lambda m: m(X), after={
        "linear1": nnx.relu, "conv2": lambda y: nnx.relu(cnn.batch_norm2(y))})
    assert got == {"conv2": pytest.approx(float(np.mean(bn2 > 0))),
                   "linear1": pytest.approx(float(np.mean(pre > 0)))}
    assert 0.05 < got["linear1"] < 0.95 and got["conv2"] != got["linear1"]
    table = analysis.activation_sparsity_by_layer(cnn, lambda m: m(X), after={"linear1": nnx.relu})
    assert table.records() == [{"layer": "linear1", "depth": 0, "width": 64,
                                "fraction_nonzero": got["linear1"]}]
    rec = analysis.ActivationSparsityRecorder(lambda state: cnn, lambda m: m(X),
                                              after={"linear1": nnx.relu})
    rec(0, None)
    assert rec.table()["fraction_nonzero"] == [got["linear1"]]
    with pytest.raises(ValueError, match=r"after: no module at \['linear3'\]"):
        surgery.activation_sparsity(cnn, lambda m: m(X), after={"linear3": nnx.relu})
    with pytest.raises(ValueError, match=r"does not call the modules at \['linear2'\]"):
        surgery.activation_sparsity(cnn, lambda m: m.conv1(X), after={"linear2": nnx.relu})


def test_activation_after_in_the_decoder_matches_the_layer_input():
    dec = Decoder(rngs=nnx.Rngs(0))
    (up,) = [c for c in surgery.trace_calls(dec, decoder_call, kinds=(nnx.Linear,))
             if c.path == "blocks/1/up"]
    lin = dec.blocks[1].up
    pre = np.asarray(up.args[0]) @ np.asarray(lin.kernel[...]) + np.asarray(lin.bias[...])
    got = surgery.activation_sparsity(dec, decoder_call, after={"blocks/1/up": nnx.relu})
    assert got == {"blocks/1/up": pytest.approx(float(np.mean(pre > 0)))}


def _topk_rows(h, k):
    """numpy: relu, then keep the k largest entries of every row."""
    h = np.maximum(h, 0)
    keep = np.argsort(-h, axis=-1)[..., :k]
    out = np.zeros_like(h)
    np.put_along_axis(out, keep, np.take_along_axis(h, keep, -1), -1)
    return out


def test_attach_topk_keeps_k_per_token_and_parameter_paths():
    dec = Decoder(rngs=nnx.Rngs(0))
    ref_out = dec(TOKENS, POSITIONS)
    before = _leaves(nnx.state(dec, nnx.Param))
    surgery.attach(dec, [(r"blocks/0/up", lambda p, m: TopKActivation("relu", density=0.125))])
    after = _leaves(nnx.state(dec, nnx.Param))
    assert [p for p, _ in after] == [p for p, _ in before]  # no parameter path changed
    for (p, a), (_, b) in zip(before, after):
        np.testing.assert_array_equal(a, b, err_msg=p)
    up = dec.blocks[0].up
    assert isinstance(up, nnx.Linear) and type(up).__name__ == "LinearWithActivation"
    # the layer's output as the model sees it: top-16 of relu(x W + b) per token
    (c,) = [c for c in surgery.trace_calls(dec, decoder_call, kinds=(nnx.Linear,))
            if c.path == "blocks/0/up"]
    pre = np.asarray(c.args[0]) @ np.asarray(up.kernel[...]) + np.asarray(up.bias[...])
    np.testing.assert_allclose(c.out, _topk_rows(pre, 16), rtol=1e-5, atol=1e-6)
    assert (np.count_nonzero(np.asarray(c.out), axis=-1) == 16).all()
    assert (np.count_nonzero(np.asarray(nnx.gelu(c.out)), axis=-1) == 16).all()
    got = surgery.activation_sparsity(dec, decoder_call, after={"blocks/0/up": nnx.gelu})
    assert got == {"blocks/0/up": 16 / 128, "blocks/0/up/attached": 16 / 128}
    # split / merge / jit see the attached module; the output changed
    out = dec(TOKENS, POSITIONS)
    assert not np.allclose(out, ref_out)
    graphdef, state = nnx.split(dec)
    merged = nnx.merge(graphdef, state)
    assert type(merged.blocks[0].up) is type(up)
    np.testing.assert_allclose(merged(TOKENS, POSITIONS), out, rtol=1e-5, atol=1e-5)
    jitted = nnx.jit(lambda m, t, p: m(t, p))
    np.testing.assert_allclose(jitted(dec, TOKENS, POSITIONS), out, rtol=1e-4, atol=1e-4)
    # one cached class; attaching again replaces the activation
    surgery.attach(dec, [(r"blocks/\d+/up", lambda p, m: TopKActivation("relu", density=0.25))])
    assert type(dec.blocks[0].up) is type(dec.blocks[1].up)
    assert surgery.activation_sparsity(dec, decoder_call) == {
        "blocks/0/up/attached": 32 / 128, "blocks/1/up/attached": 32 / 128}
    with pytest.raises(ValueError, match=r"attach rules match no module: \['blocks/9/up'\]"):
        surgery.attach(dec, [(r"blocks/9/up", lambda p, m: TopKActivation("relu"))])


def test_attach_relu_topk_on_the_cnn_equals_topk_after_relu():
    cnn = CNN(rngs=nnx.Rngs(0))
    cnn.eval()
    h = np.asarray(_forward_to_linear1(cnn, X))
    pre = h @ np.asarray(cnn.linear1.kernel[...]) + np.asarray(cnn.linear1.bias[...])
    surgery.attach(cnn, [("linear1", lambda p, m: TopKActivation("relu", density=0.125))])
    # the model's own nnx.relu follows: relu(topk(relu(h))) == topk(relu(h))
    w2, b2 = np.asarray(cnn.linear2.kernel[...]), np.asarray(cnn.linear2.bias[...])
    want = _topk_rows(pre, 8) @ w2 + b2
    np.testing.assert_allclose(cnn(X), want, rtol=1e-4, atol=1e-5)
    assert surgery.activation_sparsity(cnn, lambda m: m(X), after={"linear1": nnx.relu}) == {
        "linear1": 8 / 64, "linear1/attached": 8 / 64}
