"""experiments/jaxpruner_local.py: the patches for a local JaxPruner checkout, the import
guard, and (only where a patched checkout exists) the benchmark variants.

CI has no network and no checkout: the patches are tested on small hand-written
snippets, and ``test_real_variants`` skips with the reason when there is no checkout.
"""

from __future__ import annotations

import doctest
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import jaxpruner_local as jl

PATCH = {p.name: p for p in jl.PATCHES}

# JaxPruner's source spells the alias that current JAX removed; split so that this file
# itself names no removed API
OLD_MAP = "jax.tree" + "_map"
UTIL_MAP = "jax.tree_util.tree" + "_map"

# (patch name, snippet it must rewrite, text that must be in the result, substitutions)
CASES = [
    ("jax-tree-aliases", f"y = {OLD_MAP}(f, x)\n", "y = jax.tree.map(f, x)\n", 1),
    ("jax-tree-aliases", "n = len(jax.tree_leaves(t)); d = jax.tree_structure(t)\n",
     "n = len(jax.tree.leaves(t)); d = jax.tree.structure(t)\n", 2),
    ("optional-chex", "import chex\nimport jax\n", "try:\n  import chex\nexcept ImportError:", 1),
    ("set-none-masks", f"out = {OLD_MAP}(update_masks_fn, sparse_state.masks, drop_scores, "
     "grow_scores)\n", "is_leaf=lambda m: m is None", 1),
    ("set-none-masks", "out = jax.tree.map(\n    update_masks_fn,\n    sparse_state.masks, "
     "drop_scores, grow_scores\n)\n", "None if m is None else update_masks_fn(m, d, g)", 1),
]

# Nothing here is for any patch to touch.
UNTOUCHED = (
    "import jax\nfrom jax import tree_util\n"
    f"y = jax.tree.map(f, x)\nz = {UTIL_MAP}(f, x)\n"
    "w = jax.tree_util.tree_leaves(x)\nv = myjax.tree_mapper(x)\n"
    "  import chex\nimport chexlib\nfrom chex import Array\n# import chex is optional\n"
    "out = jax.tree.map(update_masks_fn, masks, drop_scores, grow_scores)\n"
)


def test_patch_names_unique_and_explained():
    assert len(PATCH) == len(jl.PATCHES) == 3
    for p in jl.PATCHES:
        assert len(p.why) > 40, p.name
        re.compile(p.pattern, p.flags)


@pytest.mark.parametrize("name,before,expected,count", CASES)
def test_patch_rewrites_and_is_idempotent(name, before, expected, count):
    p = PATCH[name]
    after, n = p.apply(before)
    assert n == count and expected in after and after != before
    assert p.apply(after) == (after, 0)  # applying twice changes nothing
    again, changes = jl.patch_text(after)
    assert jl.patch_text(again) == (again, [])


@pytest.mark.parametrize("name", sorted(PATCH))
def test_patch_leaves_unmatched_text_unchanged(name):
    assert PATCH[name].apply(UNTOUCHED) == (UNTOUCHED, 0)


def test_patch_text_reports_every_change():
    before = (f"import chex\nimport jax\n\ndef f(t):\n  return {OLD_MAP}(abs, t), "
              "jax.tree_leaves(t)\n")
    after, changes = jl.patch_text(before)
    assert changes == [("jax-tree-aliases", 2), ("optional-chex", 1)]
    assert jl.patch_text(after) == (after, [])
    assert jl.patch_text(UNTOUCHED) == (UNTOUCHED, [])
    compile(after, "<patched>", "exec")


def test_tree_aliases_patch_runs_on_this_jax():
    # jax.tree_map is gone from current JAX; the patched line runs.
    src, _ = PATCH["jax-tree-aliases"].apply(f"y = {OLD_MAP}(lambda a: a + 1, {{'a': 1}})")
    ns = {"jax": jax}
    exec(src, ns)  # noqa: S102
    assert ns["y"] == {"a": 2}


def test_set_none_masks_patch_keeps_none_masks():
    # The unpatched call fails on a masks tree with None leaves, the patched one maps
    # only the real masks and keeps None where a parameter is not pruned.
    before = ("out = jax.tree.map(update_masks_fn, sparse_state.masks, drop_scores, "
              "grow_scores)")
    after, n = PATCH["set-none-masks"].apply(before)
    assert n == 1
    state = types.SimpleNamespace(masks={"w": jnp.ones(3), "b": None})
    scores = {"w": jnp.arange(3.0), "b": jnp.zeros(2)}
    ns = {"jax": jax, "sparse_state": state, "drop_scores": scores, "grow_scores": scores,
          "update_masks_fn": lambda m, d, g: m * 0 + d + g}
    with pytest.raises(ValueError):
        exec(before, dict(ns))  # noqa: S102
    exec(after, ns)  # noqa: S102
    assert ns["out"]["b"] is None
    np.testing.assert_array_equal(ns["out"]["w"], [0.0, 2.0, 4.0])


def test_chex_lite_covers_what_jaxpruner_uses():
    mod = types.ModuleType("chex_lite_under_test")
    exec(jl.CHEX_LITE, mod.__dict__)  # noqa: S102
    assert isinstance(jnp.ones(2), mod.Array) and isinstance(np.ones(2), mod.ArrayNumpy)
    mod.assert_trees_all_close({"a": jnp.ones(2)}, {"a": np.ones(2)})
    with pytest.raises(AssertionError):
        mod.assert_trees_all_close(jnp.array(0), jnp.array(1))
    with pytest.raises(AssertionError):
        mod.assert_trees_all_close({"a": 1}, {"b": 1})


def _fake_checkout(root, text=f"import chex\nimport jax\nX = {OLD_MAP}(abs, [-1])\n"
                               "ARRAY = chex.Array\n"):
    pkg = root / "jaxpruner"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(text)
    return root


def test_patch_checkout_dry_run_then_idempotent(tmp_path):
    src = _fake_checkout(tmp_path / "jp")
    before = (src / "jaxpruner" / "__init__.py").read_text()
    planned = jl.patch_checkout(src, dry_run=True, log=None)
    assert (src / "jaxpruner" / "__init__.py").read_text() == before
    assert not (src / "jaxpruner" / jl.CHEX_LITE_NAME).exists()
    lines = []
    assert jl.patch_checkout(src, log=lines.append) == planned == [
        ("jaxpruner/__init__.py", "jax-tree-aliases", 1),
        ("jaxpruner/__init__.py", "optional-chex", 1),
        ("jaxpruner/_chex_lite.py", "write", 1)]
    assert len(lines) == 3
    assert jl.patch_checkout(src, log=None) == []


def test_patched_fake_checkout_imports_without_chex(tmp_path, monkeypatch):
    src = _fake_checkout(tmp_path / "jp")
    assert "not patched" in _reason(src)
    jl.patch_checkout(src, log=None)
    saved = {m: sys.modules.pop(m) for m in list(sys.modules)
             if m == "jaxpruner" or m.startswith("jaxpruner.")}
    monkeypatch.setitem(sys.modules, "chex", None)  # `import chex` raises ImportError
    try:
        jp = jl.import_jaxpruner(src)
        assert jp is not None, jl.import_failure_reason()
        assert jl.import_failure_reason() is None
        assert jp.X == [1] and jp.ARRAY is sys.modules["jaxpruner._chex_lite"].Array
    finally:
        for m in [m for m in sys.modules if m == "jaxpruner" or m.startswith("jaxpruner.")]:
            del sys.modules[m]
        sys.modules.update(saved)
        if str(src) in sys.path:
            sys.path.remove(str(src))


def _reason(path) -> str:
    assert jl.import_jaxpruner(path) is None
    reason = jl.import_failure_reason()
    assert isinstance(reason, str)
    return reason


def test_missing_checkout_gives_a_clear_reason(tmp_path):
    missing = tmp_path / "no_such_checkout"
    reason = _reason(missing)
    assert reason.startswith(f"no JaxPruner checkout at {missing}")
    assert jl.JAXPRUNER_URL in reason and "python -m experiments.jaxpruner_local" in reason
    (tmp_path / "empty").mkdir()
    assert "no JaxPruner checkout" in _reason(tmp_path / "empty")


def test_variants_return_empty_not_raise_without_checkout(tmp_path):
    params = {"w": jnp.ones((4, 4))}
    out = jl.jaxpruner_variants(params, lambda p, b: 0.0, lambda: None, 0.9, 10**9,
                                path=tmp_path / "none")
    assert out == {}
    assert "no JaxPruner checkout" in jl.import_failure_reason()
    assert jl.sanity_check(path=tmp_path / "none", log=None) == {}


@pytest.mark.parametrize("sparsity,never", [(1.0, 10), (-0.1, 10), (0.9, 0), (0.9, True),
                                            (0.9, 2**31), (0.9, 1.5)])
def test_variants_reject_bad_arguments(tmp_path, sparsity, never):
    with pytest.raises(ValueError):
        jl.jaxpruner_variants({}, None, None, sparsity, never, path=tmp_path)


def test_cli_without_checkout_exits_1(tmp_path, capsys):
    assert jl.main(["--src", str(tmp_path / "none")]) == 1
    assert "not a JaxPruner checkout" in capsys.readouterr().err


def test_module_examples_run():
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    tests = finder.find(jl, jl.__name__, globs={})
    assert sum(len(t.examples) for t in tests) >= 8
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).failed == 0


def test_real_variants():
    """Static and magnitude steps (update never fires), and RigL with its one update
    at step 1 (needs the set-none-masks patch): ~0.9 sparse, one compile each."""
    if jl.import_jaxpruner(jl.DEFAULT_PATH) is None:
        pytest.skip(jl.import_failure_reason())
    runs = ("jaxpruner_static", "jaxpruner_magnitude", "jaxpruner_rigl@1")
    reports = jl.sanity_check(0.9, hidden=(16,), steps=2, update_variants=True, names=runs,
                              log=None)
    assert tuple(reports) == runs
    for name, r in reports.items():
        assert abs(r["mask_sparsity"] - 0.9) < 0.01 and r["nonzeros_outside_mask"] == 0, name
        assert r["compiles"] == 1 and np.isfinite(r["loss"]), name
    assert not reports["jaxpruner_static"]["masks_changed"]
    assert reports["jaxpruner_rigl@1"]["masks_changed"]


def test_real_variants_prune_filter():
    """``prune`` keeps the head dense; ERK then puts the whole target on the rest."""
    jp = jl.import_jaxpruner(jl.DEFAULT_PATH)
    if jp is None:
        pytest.skip(jl.import_failure_reason())
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    params = {"l0": {"kernel": jax.random.normal(k[0], (32, 64)), "bias": jnp.zeros(64)},
              "head": {"kernel": jax.random.normal(k[1], (64, 10)), "bias": jnp.zeros(10)}}
    variants = jl.jaxpruner_variants(params, lambda p, b: 0.0, lambda: optax.sgd(0.1), 0.8,
                                     10**9, prune=lambda key, p: "/".join(key) == "l0/kernel")
    assert tuple(variants) == jl.VARIANT_NAMES
    carry = variants["jaxpruner_static"][0](params)  # init only: no step compile
    assert carry.opt_state.masks["head"]["kernel"] is None
    for tree in (carry.opt_state.masks, carry.params):
        assert np.mean(np.asarray(tree["l0"]["kernel"]) == 0) == pytest.approx(0.8, abs=1e-3)
    assert not np.any(np.asarray(carry.params["head"]["kernel"]) == 0)
    with pytest.raises(ValueError, match="ERK rejected params.*passes prune"):
        jl.jaxpruner_variants(params, None, None, 0.8, 10**9, prune=lambda key, p: False)
