"""Sparsity on layer-stacked kernels (``nnx.scan`` over layers): every slice of a stacked
leaf is its own layer for counts, ERK, selection and RigL's drop/grow, so a scanned
model gets exactly the masks of the same model unscanned."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sparsejax
from configs import lm_recall
from sparsejax import masks as M
from sparsejax.dst import sparse_layer_counts
from sparsejax.paths import named_leaves
from sparsejax.nn.scan import stack_layers, unstack_layers
from sparsejax.train import build
from sparsejax.train.data import DataInfo


def reference_topk(x: np.ndarray, k: int, eligible=None) -> np.ndarray:
    """The k largest eligible entries (NaN lowest), ties to the lower flat index."""
    flat = np.nan_to_num(x.reshape(-1).astype(np.float64), nan=-np.inf)
    ok = np.ones(flat.size, bool) if eligible is None else eligible.reshape(-1)
    order = [i for i in np.argsort(-flat, kind="stable") if ok[i]][:k]
    out = np.zeros(flat.size, bool)
    out[order] = True
    return out.reshape(x.shape)


@pytest.mark.parametrize("method", ["threshold", "sort"])
def test_each_slice_keeps_its_own_k(method):
    """``layer_topk_masks`` over stacked leaves equals the per-slice reference, with
    ties (rounded scores), eligibility, k = 0 and k above the eligible count."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4, 12, 6)).round(1)           # 4 stacked layers, many ties
    b = rng.normal(size=(9, 5)).round(1)               # a plain leaf alongside
    el = rng.random(a.shape) < 0.7
    k_a = np.array([0, 7, 50, 72])                      # 72 > eligible: clipped
    got = M.layer_topk_masks({"a": jnp.asarray(a), "b": jnp.asarray(b), "c": None},
                             {"a": jnp.asarray(k_a), "b": 11, "c": None},
                             eligible={"a": jnp.asarray(el), "b": None, "c": None},
                             method=method, stacked={"a"})
    for layer in range(4):
        np.testing.assert_array_equal(np.asarray(got["a"][layer]),
                                      reference_topk(a[layer], k_a[layer], el[layer]))
    np.testing.assert_array_equal(np.asarray(got["b"]), reference_topk(b, 11))
    assert got["c"] is None


def test_stacked_selection_equals_selection_on_unstacked_leaves():
    rng = np.random.default_rng(1)
    layers = {i: {"w": jnp.asarray(rng.normal(size=(8, 16)).round(1))} for i in range(3)}
    ks = {i: {"w": 20 + 10 * i} for i in range(3)}
    unstacked = M.layer_topk_masks({"blocks": layers}, {"blocks": ks})
    stacked = M.layer_topk_masks(stack_layers({"blocks": layers})["blocks"],
                                 {"w": jnp.array([20, 30, 40])}, stacked={"w"})
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(stacked["w"][i]),
                                      np.asarray(unstacked["blocks"][i]["w"]))


def test_topk_mask_stacked_and_its_errors():
    x = jnp.array([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    assert M.topk_mask(x, jnp.array([1, 2]), stacked=True).tolist() == [
        [True, False, False], [False, True, True]]
    assert M.topk_mask(x, 3).sum() == 3                  # unstacked: one k over all
    with pytest.raises(ValueError, match="stacked leaf needs a leading layer axis"):
        M.topk_mask(jnp.float32(1.0), 1, stacked=True)
    with pytest.raises(ValueError, match=r"stacked paths \['nope'\] name no leaf"):
        M.layer_topk_masks({"a": x}, {"a": 1}, stacked={"nope"})


def unscanned_params(depth=3, seed=0):
    rng = np.random.default_rng(seed)
    return {"blocks": {i: {"up": {"kernel": jnp.asarray(rng.normal(size=(16, 32))),
                                  "bias": jnp.zeros(32)},
                           "down": {"kernel": jnp.asarray(rng.normal(size=(32, 16)))}}
                       for i in range(depth)},
            "head": {"kernel": jnp.asarray(rng.normal(size=(16, 10)))}}


def test_erk_counts_per_slice_equal_the_unscanned_layers():
    params = unscanned_params()
    flat = sparse_layer_counts(params, 0.9, sparsejax.erk(), [("head/kernel", "dense"),
                                                              (".*kernel", "sparse")])
    stacked = sparse_layer_counts(stack_layers(params), 0.9, sparsejax.erk(),
                                  [("head/kernel", "dense"), (".*kernel", "sparse")],
                                  stacked=r"blocks/.*")
    for name in ("up", "down"):
        assert stacked[f"blocks/{name}/kernel"].tolist() == [
            flat[f"blocks/{i}/{name}/kernel"] for i in range(3)]
    assert sum(int(np.sum(v)) for v in stacked.values()) == sum(flat.values())


def test_stacked_errors_name_the_problem():
    params = stack_layers(unscanned_params())
    with pytest.raises(ValueError, match=r"stacked-layer rules match no parameter: \['layers/.*'\]"):
        sparse_layer_counts(params, 0.9, sparsejax.erk(), stacked=r"layers/.*")
    bad = {"blocks": {"scale": jnp.ones(3)}}
    with pytest.raises(ValueError, match="'blocks/scale' of shape \\(3,\\) has no layer axis"):
        sparse_layer_counts(bad, 0.9, sparsejax.uniform(), [(".*", "sparse")],
                            stacked=r"blocks/.*")


@pytest.mark.parametrize("selection", ["threshold", "sort"])
def test_rigl_on_stacked_params_equals_the_unscanned_model(selection):
    """Same weights and gradients: init masks, then three drop/grow updates, slice for
    slice equal to the unscanned model's layer for layer (no drop noise: the noise keys
    follow leaf order, which differs between the layouts)."""
    rules = [("head/kernel", "dense"), (".*kernel", "sparse")]
    kw = dict(end_step=100, update_every=1, rules=rules, drop_noise_std=0.0,
              mask_init="magnitude", selection=selection, distribution=sparsejax.erk(),
              drop_fraction=0.5)
    flat_tx = sparsejax.rigl(optax.sgd(0.1), 0.8, **kw)
    stack_tx = sparsejax.rigl(optax.sgd(0.1), 0.8, stacked=r"blocks/.*", **kw)
    params = unscanned_params()
    flat_state, stack_state = flat_tx.init(params), stack_tx.init(stack_layers(params))
    flat_p, stack_p = params, stack_layers(params)
    first = np.asarray(flat_state.masks["blocks"][1]["up"]["kernel"])
    for step in range(3):
        g = jax.tree.map(lambda w: jnp.asarray(np.random.default_rng(step).normal(
            size=w.shape)), params)
        u, flat_state = jax.jit(flat_tx.update)(g, flat_state, flat_p)
        flat_p = optax.apply_updates(flat_p, u)
        u, stack_state = jax.jit(stack_tx.update)(stack_layers(g), stack_state, stack_p)
        stack_p = optax.apply_updates(stack_p, u)
        got = unstack_layers(stack_state.masks)
        for i in range(3):
            for name in ("up", "down"):
                want = np.asarray(flat_state.masks["blocks"][i][name]["kernel"])
                np.testing.assert_array_equal(np.asarray(got["blocks"][i][name]["kernel"]),
                                              want, err_msg=f"step {step} layer {i} {name}")
        for a, b in zip(jax.tree.leaves(unstack_layers(stack_p)), jax.tree.leaves(flat_p),
                        strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6)
    # the updates did drop and grow, and kept each layer's count
    last = np.asarray(flat_state.masks["blocks"][1]["up"]["kernel"])
    assert (first != last).any() and first.sum() == last.sum()


def test_scanned_lm_is_sparsified_slice_by_slice_through_build():
    """``build`` hands a scanned DecoderLM's stacked paths to RigL: each slice of a stacked
    kernel gets the count of the same layer of the unscanned model."""
    info = DataInfo("lm", (16,), 32)
    counts = {}
    for scan in (False, True):
        c = lm_recall.get_config("rigl,0.9")
        c.model.update(num_layers=3, scan_layers=scan, d_model=32, d_ff=64)
        c.data.seq_len = 16
        built = build(c, info)
        params = nnx.to_pure_dict(nnx.state(built.make_model(jax.random.key(0)), nnx.Param))
        state = built.tx.init(params)
        counts[scan] = {p: np.asarray(m).reshape(m.shape[0] if scan and p.startswith(
            "blocks") else 1, -1).sum(1).tolist() for p, m in named_leaves(state.masks)
            if m is not None}
    assert counts[True]["blocks/mlp/up/kernel"] == [
        counts[False][f"blocks/{i}/mlp/up/kernel"][0] for i in range(3)]
    assert counts[True]["blocks/attn/q/kernel"] == [
        counts[False][f"blocks/{i}/attn/q/kernel"][0] for i in range(3)]
