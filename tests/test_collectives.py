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
