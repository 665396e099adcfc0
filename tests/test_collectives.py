"""What crosses devices: the compiled steps' collectives on 8 fake devices, and the
selection's tie split (the one place it could gather) on sharded inputs.

The N:M step and the RigL mask-update step add no all-gather to the dense step's (only
scalar all-reduces of counts); both sum paths (``masks.variadic_sums``) agree.
"""

import re
from collections import Counter

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from configs import quickstart
from experiments import aot_scale
from sparsejax import masks, nm
from sparsejax.train import make_trainer


def collectives(hlo: str) -> dict[str, Counter]:
    """``{op: Counter(operand result shapes)}`` of the collectives in compiled HLO text
    (``experiments.aot_scale.collectives``: XLA combines reductions into one op with a
    tuple result, whose every element counts as one shape)."""
    return {op: Counter(v["shapes"]) for op, v in aot_scale.collectives(hlo).items()}


def ops(hlo: str, op: str) -> int:
    """How many ``op`` instructions compiled HLO text holds (a tuple op counts once)."""
    return aot_scale.collectives(hlo)[op]["ops"]


def compiled_steps(method: str, rules) -> dict[str, dict]:
    c = quickstart.get_config(method)
    c.model.hidden = (64, 64)
    c.batch_size = 16
    c.mesh.shape, c.sharding_rules = (2, 4), rules
    if "update_every" in c.method:
        c.method.update_every = 1
    t = make_trainer(c)
    with jax.set_mesh(t.mesh):
        batch = t.device_batch(t.dataset.train.get(np.arange(16)))
        # what the loop dispatches (False, 'due'), and the single program (True)
        flags = [False, "due", True] if t.tx.mask_update_due else [True]
        return {f"mask_update={f}": collectives(t.step.lower(t.abstract_state, batch, f)
                                                .compile().as_text()) for f in flags}


@pytest.mark.parametrize("spec", [(None, "model"), ("model", None)])
def test_nm_and_mask_update_steps_add_no_all_gather(spec):
    rules = ((r"layers/.*/kernel", spec),)
    dense = compiled_steps("dense", rules)["mask_update=True"]
    for method in ("sr_ste,2:4", "rigl,0.9"):
        for name, got in compiled_steps(method, rules).items():
            assert got["all-gather"] == dense["all-gather"], (method, name, got["all-gather"])
            # what a sparse step adds crosses as counts and sums only: scalars, or one
            # per layer (selection counts every layer at once)
            extra = got["all-reduce"] - dense["all-reduce"]
            assert all(re.fullmatch(r"(s32|f32|pred|u32)\[[0-9,]*\]", s) and _size(s) <= 64
                       for s in extra), (method, name, extra)


def _size(shape: str) -> int:
    dims = re.search(r"\[([0-9,]*)\]", shape).group(1)
    return int(np.prod([int(d) for d in dims.split(",") if d]))


def test_mask_update_all_reduces_do_not_grow_with_depth():
    """Selection runs for every layer at once: the RigL mask update adds the same
    number of all-reduce ops to the step at 2 and at 8 layers (at most 64), and no
    all-gather."""
    rules = ((r"layers/.*/kernel", (None, "model")),)
    added = {}
    for depth in (2, 8):
        c = quickstart.get_config("rigl,0.9")
        c.model.hidden, c.batch_size, c.method.update_every = (64,) * depth, 16, 1
        c.mesh.shape, c.sharding_rules = (2, 4), rules
        t = make_trainer(c)
        with jax.set_mesh(t.mesh):
            batch = t.device_batch(t.dataset.train.get(np.arange(16)))
            hlo = {f: t.step.lower(t.abstract_state, batch, f).compile().as_text()
                   for f in (False, True)}
        assert ops(hlo[True], "all-gather") == ops(hlo[False], "all-gather")
        added[depth] = ops(hlo[True], "all-reduce") - ops(hlo[False], "all-reduce")
    assert added[2] == added[8] and 0 < added[8] <= 64, added


def reference_topk(x: np.ndarray, k: int) -> np.ndarray:
    """The k largest entries, ties to the lower flat index."""
    order = np.argsort(-x.reshape(-1), kind="stable")[:k]
    out = np.zeros(x.size, bool)
    out[order] = True
    return out.reshape(x.shape)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("spec", [P("x", None), P(None, "x")])
def test_tie_split_on_sharded_scores_is_exact_and_gathers_nothing(axis_type, spec):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
    x = jax.random.normal(jax.random.PRNGKey(0), (128, 64)).round(1)  # many ties
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, spec))
        fn = jax.jit(lambda s: masks.topk_mask(s, 3001, method="threshold"))
        assert not collectives(fn.lower(xs).compile().as_text())["all-gather"]
        got = fn(xs)
    assert got.sharding.spec == spec  # the mask stays sharded like its scores
    np.testing.assert_array_equal(np.asarray(got), reference_topk(np.asarray(x), 3001))


def test_variadic_and_single_output_sums_agree(monkeypatch):
    """One CPU device reduces operands together (``variadic_sums``); more devices sum
    each alone. Selection, counts and N:M diagnostics agree between the two."""
    x = jax.random.normal(jax.random.PRNGKey(1), (96, 40)).round(1)
    m = x > 0.3
    params = {"kernel": jax.random.normal(jax.random.PRNGKey(2), (32, 8))}
    g = {"kernel": jax.random.normal(jax.random.PRNGKey(3), (32, 8))}
    tx = nm.sr_ste(optax.sgd(0.5), [("kernel", "1:4")], diagnostics_every=1)

    def run():
        _, s = jax.jit(tx.update)(g, tx.init(params), params)
        return (np.asarray(masks.topk_mask(x, 1777, method="threshold")),
                int(masks.count_true(m)), np.asarray(masks.row_counts(m)),
                {k: float(v) for k, v in s.diagnostics.items()})

    single = run()
    for mod in (masks, nm):
        monkeypatch.setattr(mod, "variadic_sums", lambda: True)
    jax.clear_caches()
    variadic = run()
    np.testing.assert_array_equal(single[0], variadic[0])
    np.testing.assert_array_equal(single[0], reference_topk(np.asarray(x), 1777))
    assert single[1] == variadic[1] == int(np.sum(np.asarray(m)))
    np.testing.assert_array_equal(single[2], variadic[2])
    assert single[3] == pytest.approx(variadic[3], rel=1e-5)


def _ranked_reference(scores: dict, k: dict, eligible: dict, stacked: set) -> dict:
    """``reference_topk`` per layer (each slice of a stacked leaf its own), eligible
    entries only: ineligible ones get -inf below every score and are never kept."""
    out = {}
    for p, s in scores.items():
        s = np.where(eligible[p], np.asarray(s, np.float64), -np.inf)
        rows = s if p in stacked else s[None]
        ks = np.broadcast_to(np.asarray(k[p]), (rows.shape[0],))
        kept = [reference_topk(r, min(int(kk), int(np.isfinite(r).sum())))
                for r, kk in zip(rows, ks)]
        out[p] = np.stack(kept) if p in stacked else kept[0]
    return out


@pytest.mark.parametrize("specs", [
    {"a": P(None, "data", "model"), "b": P(("data", "model")), "c": P("model"), "d": P(None, "data")},
    {"a": P("data", None, "model"), "b": P(None, "model"), "c": P(), "d": P("model", None)},
])
def test_selection_under_shard_map_equals_the_reference_and_moves_only_counts(specs):
    """Under ``selection_shardings`` every count is a local reduction plus a psum (the
    selection runs in ``jax.shard_map``): the masks equal a numpy argsort reference,
    layer by layer (a stacked leaf's slices too, with its layer axis split or not) and
    globally, with ties and ineligible entries; nothing is gathered unless the layer
    axis itself is split (then XLA gathers the per-layer counts, 3 x layers int32)."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    rng = np.random.default_rng(0)
    scores = {"a": rng.integers(0, 5, (4, 16, 8)).astype(np.float32),  # stacked, many ties
              "b": rng.normal(size=(8, 12)).astype(np.float32),
              "c": rng.integers(0, 3, (16,)).astype(np.float32),
              "d": rng.integers(0, 3, (8, 4)).astype(np.float32)}
    eligible = {p: s != 1 for p, s in scores.items()}
    k = {"a": np.array([10, 100, 0, 128]), "b": 37, "c": 5, "d": 9}
    shardings = {p: NamedSharding(mesh, s) for p, s in specs.items()}

    def layer(s, e):
        return masks.layer_topk_masks(s, k, eligible=e, stacked={"a"})

    def whole(s, e):
        return masks.global_topk_masks(s, 200, eligible=e, method="threshold")

    with masks.selection_shardings(shardings):
        fns = [jax.jit(f, in_shardings=(shardings, shardings)) for f in (layer, whole)]
        got = [f(scores, eligible) for f in fns]
        hlo = fns[0].lower(scores, eligible).compile().as_text()
    ref = _ranked_reference(scores, k, eligible, {"a"})
    for p in scores:
        np.testing.assert_array_equal(np.asarray(got[0][p]), ref[p], err_msg=p)
        assert got[0][p].sharding.is_equivalent_to(shardings[p], scores[p].ndim), p
    flat = np.concatenate([np.where(eligible[p], scores[p], -np.inf).reshape(-1) for p in scores])
    want = reference_topk(flat, 200)
    np.testing.assert_array_equal(
        np.concatenate([np.asarray(got[1][p]).reshape(-1) for p in scores]), want)
    gathers = collectives(hlo)["all-gather"]
    if specs["a"][0] is None:
        assert not gathers, gathers
    else:  # the layer axis split: its per-layer counts, never a key or a mask
        assert all(_size(s) <= 3 * 4 for s in gathers), gathers


def test_selection_shardings_that_do_not_cover_a_leaf_leave_the_partitioner_to_it():
    """A leaf without a sharding in the context (or one that does not divide it) is
    selected by the partitioner's sums: the same masks."""
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
    s = {"w": np.arange(48, dtype=np.float32).reshape(6, 8) % 7, "v": np.ones(8, np.float32)}
    k = {"w": 11, "v": 3}
    want = jax.jit(lambda s: masks.layer_topk_masks(s, k))(s)
    for sh in ({"w": NamedSharding(mesh, P(None, "x"))},            # 'v' not covered
               {"w": NamedSharding(mesh, P("x")), "v": NamedSharding(mesh, P("x"))}):  # 6 % 8
        with masks.selection_shardings(sh):
            got = jax.jit(lambda s: masks.layer_topk_masks(s, k))(s)
        for p in s:
            np.testing.assert_array_equal(np.asarray(got[p]), np.asarray(want[p]))
    np.testing.assert_array_equal(np.asarray(want["w"]), reference_topk(s["w"], 11))


def test_mask_update_waits_for_the_gradients():
    """The RigL update reads masks, weights and its key only through a flag computed
    from every gradient leaf, so XLA cannot start it during the backward pass (where
    its temporaries would add to the peak); the values are the same."""
    from sparsejax.dst import _after_gradients
    grads = {"a": np.array([1.0, np.nan]), "b": np.ones((2, 2), np.float32)}
    tree = ({"w": np.arange(3.0)}, {"m": np.array([True, False])}, np.array([7, 9], np.uint32))
    for g in (grads, {"a": np.array([1.0, 2.0]), "b": grads["b"]}):
        out = jax.jit(_after_gradients)(g, tree)
        for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(tree)):
            np.testing.assert_array_equal(np.asarray(x), y)
    jaxpr = str(jax.make_jaxpr(_after_gradients)(grads, tree))
    assert jaxpr.count("reduce_max") == 3 and jaxpr.count("select_n") == 3, jaxpr
