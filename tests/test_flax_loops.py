"""The Flax documentation's training loop, made sparse, on models written the Flax way.

``nnx.Optimizer`` + ``nnx.jit`` + ``sparsejax.value_and_grad`` (for ``nnx.value_and_grad``)
trains the MNIST-tutorial CNN (BatchNorm, Dropout rngs passed to the call) and a decoder
(multi-argument call, tied ``nnx.Embed`` head, ``nnx.Einsum`` projections) with RigL 90%
ERK, SR-STE 2:4 and MDGF. At every step the weights the model computes with are
captured inside the loss and checked against the definitions: ERK's closed-form counts
and ``where(m, w, 0)``; a numpy top-2-of-4 mask of the stored weights (with MDGF's
``β(t)``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from sklearn.datasets import load_digits

import sparsejax
from sparsejax import paths
from flax_models import CNN, Decoder
from test_compose import reference_nm

STEPS = 8


def digits(n=64):
    d = load_digits()
    x = (d.images[:n] / 16.0).astype(np.float32)[..., None]
    return jnp.asarray(x), jnp.asarray(d.target[:n])


def copy_task(n=16, t=8, vocab=32):
    toks = jax.random.randint(jax.random.PRNGKey(0), (n, t), 1, vocab)
    return toks, jnp.broadcast_to(jnp.arange(t), (n, t))


def erk_counts(shapes: dict, sparsity: float) -> dict:
    """Closed-form ERK (no layer dense): ε Σ p_l N_l = (1 − s) Σ N_l, p_l = Σ dims / Π dims."""
    p = {k: sum(s) / np.prod(s) for k, s in shapes.items()}
    n = {k: int(np.prod(s)) for k, s in shapes.items()}
    eps = (1 - sparsity) * sum(n.values()) / sum(p[k] * n[k] for k in shapes)
    assert all(eps * p[k] < 1 for k in shapes)
    return {k: eps * p[k] * n[k] for k in shapes}


def train(model, tx, call, targets, steps=STEPS, params_masked=False):
    """The Flax tutorial's loop with one sparsejax line; returns [(stored, seen, opt_state)].
    ``params_masked``: the model's parameters are masked once, then used as stored."""
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if params_masked:
        nnx.update(model, sparsejax.mask_params(nnx.state(model, nnx.Param), optimizer.opt_state))

    def loss_fn(model, *args):
        logits = call(model, *args)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return loss, nnx.to_pure_dict(nnx.state(model, nnx.Param))

    @nnx.jit
    def train_step(model, optimizer, *args):
        grad_fn = sparsejax.value_and_grad(loss_fn, optimizer, has_aux=True,
                                           params_masked=params_masked)
        (loss, seen), grads = grad_fn(model, *args)
        optimizer.update(model, grads)
        return loss, seen

    history, losses = [], []
    for _ in range(steps):
        stored = dict(paths.named_leaves(nnx.state(model, nnx.Param)))
        opt_state = jax.tree.map(lambda v: v, paths.unbox(optimizer.opt_state))
        loss, seen = train_step(model, optimizer, nnx.Rngs(dropout=len(losses)))
        history.append((stored, dict(paths.named_leaves(seen)), opt_state))
        losses.append(float(loss))
    return history, losses, optimizer


def cnn_call(x):
    return lambda model, rngs: model(x, rngs)


CNN_SPARSE = ("conv2/kernel", "linear1/kernel")
CNN_RULES = [(r"conv1/kernel", "dense"), (r"linear2/kernel", "dense"), (paths.is_kernel, "sparse")]


def test_cnn_rigl_erk_90_is_exactly_sparse_every_step():
    x, y = digits()
    model = CNN(rngs=nnx.Rngs(0))
    tx = sparsejax.rigl(optax.adam(1e-2), 0.9, distribution=sparsejax.erk(), rules=CNN_RULES,
                        update_every=3, end_step=STEPS)
    history, losses, _ = train(model, tx, cnn_call(x), y)
    want = erk_counts({"conv2/kernel": (3, 3, 16, 32), "linear1/kernel": (128, 64)}, 0.9)
    for t, (stored, seen, state) in enumerate(history):
        masks = dict(paths.named_leaves(state.masks))
        assert sorted(masks) == sorted(CNN_SPARSE)
        for path in CNN_SPARSE:
            m = np.asarray(masks[path])
            assert abs(m.sum() - want[path]) <= 1, (t, path, m.sum(), want[path])
            np.testing.assert_array_equal(seen[path], np.where(m, stored[path], 0))
        for path in ("conv1/kernel", "linear2/kernel", "batch_norm1/scale", "linear1/bias"):
            np.testing.assert_array_equal(seen[path], stored[path])  # dense stays dense
    assert sum(np.asarray(m).sum() for m in jax.tree.leaves(history[-1][2].masks)) == round(
        0.1 * (4608 + 8192))  # the total is exact
    assert losses[-1] < losses[0]


def test_cnn_rigl_with_masked_params_equals_the_masking_forward():
    """``value_and_grad(..., params_masked=True)`` after ``mask_params``: the weights the
    model sees are the stored ones, zero outside the masks at every step, and training
    gives the masking forward's params and masks bit for bit."""
    x, y = digits()
    runs = []
    for fast in (False, True):
        model = CNN(rngs=nnx.Rngs(0))
        tx = sparsejax.rigl(optax.adam(1e-2), 0.9, distribution=sparsejax.erk(),
                            rules=CNN_RULES, update_every=3, end_step=STEPS)
        history, _, optimizer = train(model, tx, cnn_call(x), y, params_masked=fast)
        runs.append((model, history, optimizer))
    (slow, _, slow_opt), (fast, history, fast_opt) = runs
    for stored, seen, state in history:
        for path, m in paths.named_leaves(state.masks):
            np.testing.assert_array_equal(seen[path], stored[path])  # used as stored
            assert not np.asarray(stored[path])[~np.asarray(m)].any()  # and masked
    for a, b in zip(jax.tree.leaves(nnx.state(fast, nnx.Param)),
                    jax.tree.leaves(nnx.state(slow, nnx.Param))):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(paths.unbox(fast_opt.opt_state).masks),
                    jax.tree.leaves(paths.unbox(slow_opt.opt_state).masks)):
        np.testing.assert_array_equal(a, b)
    assert int(sparsejax.count_unmasked(nnx.state(fast, nnx.Param), fast_opt.opt_state)) == 0


@pytest.mark.parametrize("method", ["sr_ste", "mdgf"])
def test_cnn_nm_is_exactly_2_of_4_every_step(method):
    x, y = digits()
    model = CNN(rngs=nnx.Rngs(0))
    rules = [(r"conv1/kernel", "dense"), (paths.is_kernel, "2:4")]  # conv1 has 1 input channel
    tx = (sparsejax.sr_ste(optax.adam(1e-2), rules) if method == "sr_ste" else
          sparsejax.mdgf(optax.adam(1e-2), rules, decay="linear", alpha=0.25))
    history, losses, optimizer = train(model, tx, cnn_call(x), y)
    for t, (stored, seen, _) in enumerate(history):
        beta = max(0.0, 1 - 0.25 * t) if method == "mdgf" else 0.0
        for path in ("conv2/kernel", "linear1/kernel", "linear2/kernel"):
            w = np.asarray(stored[path])
            m = reference_nm(w, 2, 4)
            np.testing.assert_allclose(seen[path], np.where(m, w, beta * w), rtol=1e-6)
        np.testing.assert_array_equal(seen["conv1/kernel"], stored["conv1/kernel"])
    # the model evaluated through sparse_model computes with exactly 2:4 weights
    evaluated = sparsejax.sparse_model(model, optimizer)
    k = np.asarray(nnx.state(evaluated, nnx.Param)["linear1"]["kernel"][...])
    assert (np.count_nonzero(k.reshape(-1, 4, 64), axis=1) <= 2).all()
    assert losses[-1] < losses[0]


def test_decoder_rigl_erk_90_with_default_rules():
    toks, pos = copy_task()
    model = Decoder(rngs=nnx.Rngs(0))
    tx = sparsejax.rigl(optax.adam(1e-2), 0.9, distribution=sparsejax.erk(), update_every=3,
                        end_step=STEPS)
    history, losses, _ = train(model, tx, lambda m, rngs: m(toks, pos), toks)
    kernels = [p for p, _ in paths.named_leaves(history[0][0]) if p.endswith("kernel")]
    assert len(kernels) == 8  # qkv, out (nnx.Einsum), up, down (nnx.Linear) × 2 blocks
    total = sum(int(np.prod(history[0][0][p].shape)) for p in kernels)
    for t, (stored, seen, state) in enumerate(history):
        masks = dict(paths.named_leaves(state.masks))
        assert sorted(masks) == sorted(kernels)  # embeddings (tied head) stay dense
        assert abs(sum(int(np.asarray(m).sum()) for m in masks.values()) - 0.1 * total) <= 1
        for path in kernels:
            np.testing.assert_array_equal(seen[path], np.where(masks[path], stored[path], 0))
        np.testing.assert_array_equal(seen["embed/embedding"], stored["embed/embedding"])
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("method", ["sr_ste", "mdgf"])
def test_decoder_nm_2_of_4_on_every_kernel(method):
    toks, pos = copy_task()
    model = Decoder(rngs=nnx.Rngs(0))
    tx = (sparsejax.sr_ste(optax.adam(1e-2)) if method == "sr_ste" else
          sparsejax.mdgf(optax.adam(1e-2), decay="linear", alpha=0.25))
    history, losses, _ = train(model, tx, lambda m, rngs: m(toks, pos), toks)
    for t, (stored, seen, _) in enumerate(history):
        beta = max(0.0, 1 - 0.25 * t) if method == "mdgf" else 0.0
        for path in [p for p in stored if p.endswith("kernel")]:
            w = np.asarray(stored[path])
            m = reference_nm(w, 2, 4)
            np.testing.assert_allclose(seen[path], np.where(m, w, beta * w), rtol=1e-6)
    assert losses[-1] < losses[0]


EXPORT_SCRIPT = r"""
import sys, json
import jax, jax.numpy as jnp, numpy as np
import orbax.checkpoint as ocp
from flax import nnx
sys.path.insert(0, sys.argv[1])
from flax_models import CNN

tree = ocp.StandardCheckpointer().restore(sys.argv[2])
model = CNN(rngs=nnx.Rngs(123))
params, stats = nnx.state(model, nnx.Param), nnx.state(model, nnx.BatchStat)
nnx.replace_by_pure_dict(params, tree["params"])
nnx.replace_by_pure_dict(stats, tree["batch_stats"])
nnx.update(model, params, stats)
model.eval()
x = jnp.asarray(np.load(sys.argv[3]))
np.save(sys.argv[4], np.asarray(model(x)))
print(json.dumps({"sparsejax_imported": any(m.startswith("sparsejax") for m in sys.modules)}))
"""


def test_materialized_weights_load_without_sparsejax(tmp_path, root):
    import json
    import subprocess
    import sys

    import orbax.checkpoint as ocp

    x, y = digits()
    model = CNN(rngs=nnx.Rngs(0))
    tx = sparsejax.sr_ste(optax.adam(1e-2), [(r"conv1/kernel", "dense"), (paths.is_kernel, "2:4")])
    _, _, optimizer = train(model, tx, cnn_call(x), y, steps=3)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    effective = sparsejax.materialize(params, optimizer.opt_state)
    k = np.asarray(effective["linear1"]["kernel"])
    assert (np.count_nonzero(k.reshape(-1, 4, 64), axis=1) == 2).all()
    tree = {"params": effective,
            "batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "ckpt", tree)
    ckptr.wait_until_finished()
    ckptr.close()
    np.save(tmp_path / "x.npy", np.asarray(x[:8]))
    script = tmp_path / "load.py"
    script.write_text(EXPORT_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(root / "tests"), str(tmp_path / "ckpt"),
                          str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                         capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"sparsejax_imported": False}
    evaluated = sparsejax.sparse_model(model, optimizer)
    evaluated.eval()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), evaluated(x[:8]), rtol=1e-5, atol=1e-6)
