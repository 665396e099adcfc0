"""N:M export: a params-shaped tree of plain arrays that plain orbax round-trips (no target),
read back as dense params or as an NNX layer equal to the masked Linear."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from sparsejax import nm
from sparsejax.nn.nm import NMIndices, NMLinear


def np_nm_mask(w, n: int, m: int, axis: int) -> np.ndarray:
    """numpy: keep the n largest |w| of every m consecutive entries along axis (ties to the
    lower index, by a stable sort)."""
    moved = np.moveaxis(np.abs(np.asarray(w, np.float32)), axis, -1)
    groups = moved.reshape(-1, m)
    keep = np.zeros(groups.shape, bool)
    np.put_along_axis(keep, np.argsort(-groups, axis=1, kind="stable")[:, :n], True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def save_and_restore_plain(path, tree):
    """What anyone with plain orbax gets back: save, then restore with no target."""
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path, tree)
    ckpt.wait_until_finished()
    return ckpt.restore(path)


def _params():
    k = jax.random.split(jax.random.key(0), 6)
    return {
        "fc": {"kernel": jax.random.normal(k[0], (32, 12)), "bias": jax.random.normal(k[1], (12,))},
        "proj": {"kernel": jax.random.normal(k[2], (16, 4, 6)).astype(jnp.bfloat16)},  # 3-D
        "head": {"kernel": jax.random.normal(k[3], (12, 5))},     # unstructured: stays dense
        "norm": {"scale": jax.random.normal(k[4], (12,))},        # no rule: kept
    }


def test_export_round_trips_through_plain_orbax(tmp_path):
    params = _params()
    rules = [(r"fc/kernel", "2:4"), (r"proj/kernel", "1:8"), (r"head/kernel", 0.5)]
    exported = nm.export_nm(params, rules, axis=0)
    conv = jax.random.normal(jax.random.key(1), (3, 3, 8, 4))      # [h, w, in, out]
    conv_exported = nm.export_nm({"conv": {"kernel": conv}}, [(r".*kernel", "1:4")])  # axis -2
    tree = {"model": exported, "stem": conv_exported}

    restored = save_and_restore_plain(tmp_path / "ckpt", tree)

    model = restored["model"]
    for name, want in (("fc", [2, 4, 0]), ("proj", [1, 8, 0])):
        leaf = model[name]["kernel"]
        assert type(leaf) is dict and set(leaf) == {"values", "indices", "pattern"}
        assert np.asarray(leaf["pattern"]).tolist() == want
        assert np.asarray(leaf["pattern"]).dtype == np.int32
        assert np.asarray(leaf["indices"]).dtype == np.uint8
    # the conv's axis -2 was normalised to 2 and survives the round trip
    assert np.asarray(restored["stem"]["conv"]["kernel"]["pattern"]).tolist() == [1, 4, 2]
    assert all(isinstance(x, (np.ndarray, jax.Array)) for x in jax.tree.leaves(restored))
    assert model["proj"]["kernel"]["values"].shape == (2, 1, 4, 6)   # [G, N, *rest]

    dense = nm.import_nm(model)
    assert jax.tree.structure(dense) == jax.tree.structure(params)
    for name, n, m in (("fc", 2, 4), ("proj", 1, 8)):
        w = params[name]["kernel"]
        got = dense[name]["kernel"]
        assert got.dtype == w.dtype and got.shape == w.shape
        want = np.where(np_nm_mask(w, n, m, 0), np.asarray(w, np.float32), 0)
        np.testing.assert_array_equal(np.asarray(got, np.float32), want)       # bit-exact
        np.testing.assert_array_equal(got, w * nm.nm_mask(w, n, m, axis=0))
    for path in (("fc", "bias"), ("head", "kernel"), ("norm", "scale")):
        np.testing.assert_array_equal(dense[path[0]][path[1]], params[path[0]][path[1]])

    conv_back = nm.NMCompressed.from_export(restored["stem"]["conv"]["kernel"])
    assert (conv_back.n, conv_back.m, conv_back.axis, conv_back.shape) == (1, 4, 2, (3, 3, 8, 4))
    negative = nm.NMCompressed(conv_back.values, conv_back.indices, 1, 4, (3, 3, 8, 4), -2)
    assert negative.to_export()["pattern"].tolist() == [1, 4, 2]   # written non-negative
    np.testing.assert_array_equal(nm.import_nm(restored["stem"])["conv"]["kernel"],
                                  np.where(np_nm_mask(conv, 1, 4, 2), conv, 0))


class TwoLayers(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(32, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 4, rngs=rngs)


def test_nm_linear_from_restored_leaf_equals_masked_linear(tmp_path):
    model = TwoLayers(nnx.Rngs(0))
    model.fc1.bias[...] = jax.random.normal(jax.random.key(3), (16,))
    state = nnx.state(model, nnx.Param)
    exported = nm.export_nm(state, [(r"fc1/kernel", "2:4")])       # axis -2: the inputs
    assert type(exported) is dict and type(exported["fc2"]) is dict  # nnx.State -> dicts
    restored = save_and_restore_plain(tmp_path / "ckpt", exported)
    np.testing.assert_array_equal(restored["fc2"]["kernel"], model.fc2.kernel[...])

    layer = NMLinear.from_export(restored["fc1"]["kernel"], bias=restored["fc1"]["bias"])
    assert (layer.n, layer.m, layer.in_features, layer.out_features) == (2, 4, 32, 16)
    w = np.asarray(model.fc1.kernel[...], np.float64)
    b = np.asarray(model.fc1.bias[...], np.float64)
    mask = np_nm_mask(w, 2, 4, 0)
    x = np.asarray(jax.random.normal(jax.random.key(4), (2, 5, 32)))
    want = x.astype(np.float64) @ (w * mask) + b
    got = layer(jnp.asarray(x))
    assert got.shape == (2, 5, 16)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(nnx.jit(lambda l, x: l(x))(layer, jnp.asarray(x)), want,
                               rtol=1e-5, atol=1e-5)
    model.fc1.kernel[...] = jnp.asarray(w * mask, jnp.float32)    # nnx.Linear, masked kernel
    np.testing.assert_allclose(got, model.fc1(jnp.asarray(x)), rtol=1e-6, atol=1e-6)

    # values (and bias) are Params to fine-tune; indices are not
    assert set(nnx.state(layer, nnx.Param).keys()) == {"values", "bias"}
    assert set(nnx.state(layer, NMIndices).keys()) == {"indices"}
    g_out = np.asarray(jax.random.normal(jax.random.key(5), (2, 5, 16)))
    grads = nnx.grad(lambda l: jnp.sum(l(jnp.asarray(x)) * g_out))(layer)
    dw = x.reshape(-1, 32).astype(np.float64).T @ g_out.reshape(-1, 16)   # dense dL/dW
    idx = np.asarray(layer.indices[...], np.int64)                       # [8, 2, 16]
    want_dv = np.take_along_axis(dw.reshape(8, 4, 16), idx, axis=1)
    np.testing.assert_allclose(grads["values"][...], want_dv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["bias"][...], g_out.reshape(-1, 16).sum(0), rtol=1e-5,
                               atol=1e-5)
    # the layer's leaf exports back to the same arrays
    again = layer.to_export()
    np.testing.assert_array_equal(again["indices"], restored["fc1"]["kernel"]["indices"])
    np.testing.assert_array_equal(again["pattern"], [2, 4, 0])


def test_nm_linear_needs_a_2d_kernel_along_its_inputs():
    conv = nm.compress_nm(jnp.ones((3, 3, 8, 4)), 1, 4).to_export()
    with pytest.raises(ValueError, match=r"2-D \[in, out\] kernel compressed along its input "
                                         r"axis 0, got shape \(3, 3, 8, 4\) compressed along axis 2"):
        NMLinear.from_export(conv)
    outputs = nm.compress_nm(jnp.ones((8, 16)), 2, 4, axis=1).to_export()
    with pytest.raises(ValueError, match="along axis 1"):
        NMLinear.from_export(outputs)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\), got \(8,\)"):
        NMLinear.from_export(nm.compress_nm(jnp.ones((8, 16)), 2, 4, axis=0).to_export(),
                             bias=jnp.ones(8))


def test_bad_export_leaf_names_the_problem():
    good = nm.compress_nm(jax.random.normal(jax.random.key(6), (16, 6)), 2, 4, axis=0).to_export()

    def bad(**change):
        leaf = {**good, **change}
        return {"enc": {"kernel": {k: v for k, v in leaf.items() if v is not None}}}

    cases = [
        (bad(pattern=None), r"'enc/kernel': needs exactly the keys .*missing \['pattern'\]"),
        (bad(indices=None), r"'enc/kernel': .*missing \['indices'\]"),
        (bad(pattern=np.array([1, 4, 0], np.int32)),
         r"'enc/kernel': 'values' \(4, 2, 6\) keep 2 entries per group \(axis 1\) but "
         r"pattern says N=1"),
        (bad(indices=good["indices"][:, :1]), r"'values' \(4, 2, 6\) and 'indices' \(4, 1, 6\)"),
        (bad(pattern=np.array([2, 4, 2], np.int32)),
         r"pattern axis 2 is not an axis of the 2-D weight"),
        (bad(pattern=np.array([2, 512, 0], np.int32)), r"M=512 does not fit uint8 indices"),
        (bad(pattern=np.array([2, 4], np.int32)), r"'pattern' must be 3 integers \[n, m, axis\]"),
        (bad(pattern=np.array([2.0, 4.0, 0.0])), r"'pattern' must be 3 integers"),
        (bad(pattern=np.array([4, 4, 0], np.int32)), r"N:M pattern 4:4 needs 0 < N < M"),
        (bad(indices=jnp.full((4, 2, 6), 4, jnp.uint8)), r"indices must lie in \[0, M=4\)"),
        (bad(indices=jnp.zeros((4, 2, 6), jnp.uint8)), r"distinct and increasing"),
    ]
    for tree, message in cases:
        with pytest.raises(ValueError, match=message):
            nm.import_nm(tree)
    with pytest.raises(ValueError, match="'pattern' is traced"):
        jax.jit(lambda leaf: nm.NMCompressed.from_export(leaf).values)(good)
    with pytest.raises(ValueError, match="M=512 does not fit uint8 indices"):
        nm.compress_nm(jnp.ones((512, 2)), 1, 512, axis=0)
    inconsistent = nm.NMCompressed(good["values"], good["indices"], 2, 4, (16, 5), 0)
    with pytest.raises(ValueError, match=r"needs values and indices of shape \(4, 2, 5\)"):
        inconsistent.to_export()
    # a params dict that only looks partly like an export is left alone
    lone = {"attn": {"values": jnp.ones(3)}}
    assert nm.import_nm(lone)["attn"]["values"] is lone["attn"]["values"]
