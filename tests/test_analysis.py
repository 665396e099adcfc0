"""sparsejax.analysis: every measurement against numbers worked out by hand on tiny inputs,
plus one short RigL run read back from its workdir."""

import hashlib
import importlib.util
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest
from flax import nnx

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from configs import quickstart  # noqa: E402
from sparsejax import analysis as A  # noqa: E402
from sparsejax import dst, global_sparsity, mask_counts  # noqa: E402
from sparsejax.nn.layers import Activation, Attention  # noqa: E402
from sparsejax.nn.spark import SparkAttention  # noqa: E402
from sparsejax.train import CheckpointError, make_trainer, train_and_evaluate  # noqa: E402

TOTAL = A.TOTAL


def digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- Table


def test_table_columns_filter_value_and_lazy_pandas():
    t = A.Table([{"a": 1, "b": "x"}, {"a": 2, "c": 0.5}])
    assert t.columns == ["a", "b", "c"] and len(t) == 2
    assert t["a"] == [1, 2] and t["c"] == [None, 0.5]
    assert t.where(a=2).records() == [{"a": 2, "b": None, "c": 0.5}]
    assert t.sort_by("a", reverse=True)["a"] == [2, 1]
    assert t.value("b", a=1) == "x"
    with pytest.raises(ValueError, match="2 rows match"):
        A.Table([{"a": 1}, {"a": 1}]).value("a", a=1)
    with pytest.raises(KeyError, match="no column 'z'"):
        t["z"]
    if importlib.util.find_spec("pandas") is None:  # not a dependency: only to_pandas needs it
        with pytest.raises(ImportError, match="pip install pandas"):
            t.to_pandas()
    else:
        assert list(t.to_pandas().columns) == ["a", "b", "c"]


# ----------------------------------------------------------------------------- mask dynamics

PREV = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], bool)
NEXT = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], bool)


def test_mask_turnover_by_hand():
    # w: prev∧¬next at (0,1),(1,0): dropped 2 of 4 active; ¬prev∧next at (0,2),(1,3): grown 2.
    # b: unchanged, 1 active. Total: dropped 2 of 5 active.
    prev = {"w": PREV, "b": {"kernel": np.array([True, False, False])}, "c": None}
    nxt = {"w": NEXT, "b": {"kernel": np.array([True, False, False])}, "c": None}
    t = A.mask_turnover(prev, nxt)
    assert t["layer"] == ["b/kernel", "w", TOTAL]
    w = t.where(layer="w")[0]
    counts = (w["size"], w["prev_active"], w["next_active"], w["dropped"], w["grown"])
    assert counts == (8, 4, 4, 2, 2)
    assert w["turnover"] == 0.5
    assert t.value("turnover", layer="b/kernel") == 0.0
    total = t.where(layer=TOTAL)[0]
    assert (total["size"], total["prev_active"], total["dropped"], total["grown"]) == (11, 5, 2, 2)
    assert total["turnover"] == pytest.approx(0.4)


def test_flip_rate_by_hand():
    # 4 of the 8 entries of w differ; b (3 entries) none: total 4/11.
    t = A.flip_rate({"w": PREV, "b": np.ones(3, bool)}, {"w": NEXT, "b": np.ones(3, bool)})
    assert t.value("flips", layer="w") == 4 and t.value("flip_rate", layer="w") == 0.5
    assert t.value("flip_rate", layer="b") == 0.0
    assert t.value("flip_rate", layer=TOTAL) == pytest.approx(4 / 11)
    assert A.flip_rate(jnp.asarray(PREV), jnp.asarray(PREV)).value("flip_rate", layer=TOTAL) == 0.0


def test_ever_active_and_itop_by_hand():
    m0 = np.array([1, 1, 0, 0, 0, 0], bool)  # union {0,1}      → 2/6
    m1 = np.array([0, 1, 1, 0, 0, 0], bool)  # union {0,1,2}    → 3/6
    m2 = np.array([1, 0, 0, 1, 0, 0], bool)  # union {0,1,2,3}  → 4/6
    t = A.ever_active([{"w": m0}, {"w": m1}, {"w": m2}], steps=[10, 20, 30]).where(layer=TOTAL)
    assert t["step"] == [10, 20, 30] and t["ever_active"] == [2, 3, 4]
    assert t["rate"] == pytest.approx([1 / 3, 1 / 2, 2 / 3])
    itop = A.InTimeOverParam().update({"w": m0, "v": np.array([1, 0], bool)})
    itop.update({"w": m2, "v": np.array([1, 0], bool)})
    assert itop.layer_rates == pytest.approx({"w": 3 / 6, "v": 1 / 2})
    assert itop.rate == pytest.approx(4 / 8)


def test_nm_masks_from_params_and_nm_flip_rate_by_hand():
    # 1:2 along axis 0: column 0 groups (4, 2) (0, 5) keep rows 0, 3; column 1 (1, 3) (9, 5)
    # keep rows 1, 2.
    w = jnp.array([[4.0, 1.0], [2.0, 3.0], [0.0, 9.0], [5.0, 5.0]])
    params = {"layer": {"kernel": w, "bias": jnp.ones(2)}}
    m = A.nm_masks_from_params(params, [(r".*kernel", "1:2")])
    assert m["layer"]["bias"] is None
    np.testing.assert_array_equal(m["layer"]["kernel"],
                                  [[True, False], [False, True], [False, True], [True, False]])
    # Swap rows 0 and 1: column 0 keeps row 1, column 1 keeps row 0 → 4 of 8 entries flip.
    w2 = w.at[jnp.array([0, 1])].set(w[jnp.array([1, 0])])
    m2 = A.nm_masks_from_params({"layer": {"kernel": w2, "bias": jnp.ones(2)}},
                                [(r".*kernel", "1:2")])
    assert A.flip_rate(m, m2).value("flip_rate", layer=TOTAL) == 0.5
    # a float rule: unstructured magnitude, keep round(0.25·8) = 2 → the 9 and the first 5.
    m3 = A.nm_masks_from_params(params, [(r".*kernel", 0.75)])
    np.testing.assert_array_equal(np.argwhere(np.asarray(m3["layer"]["kernel"])), [[2, 1], [3, 0]])


def test_find_masks_in_nested_optimizer_state():
    state = dst.SparseState(inner=(), masks={"w": jnp.ones(2, bool)}, count=jnp.int32(0),
                            key=jax.random.PRNGKey(0))
    assert A.find_masks(({"a": 1}, [state]))["w"].shape == (2,)
    assert A.find_masks((jnp.zeros(2), {"mu": jnp.zeros(2)})) is None


def test_mask_dynamics_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="shape mismatch for layer 'w'"):
        A.mask_turnover({"w": PREV}, {"w": PREV.reshape(4, 2)})
    with pytest.raises(ValueError, match="different layers"):
        A.flip_rate({"w": PREV}, {"v": PREV})
    with pytest.raises(ValueError, match="dense run has no masks"):
        A.mask_turnover(None, {"w": PREV})
    with pytest.raises(ValueError, match="at least one mask snapshot"):
        A.ever_active([])
    with pytest.raises(ValueError, match="every must be >= 1"):
        A.MaskRecorder(every=0)
    rec = A.MaskRecorder()
    with pytest.raises(ValueError, match="holds no masks"):
        rec(1, (jnp.zeros(2),))
    rec.record(1, {"w": PREV})
    with pytest.raises(ValueError, match="at least two"):
        rec.turnover()


# ----------------------------------------------------------------------------- activations


class TwoActs(nnx.Module):
    """``b`` is called first, then ``a``: depth follows the call, not the name."""

    def __init__(self):
        self.b = Activation("relu")
        self.lin = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        self.lin.kernel[...] = jnp.array([[1.0, -1, 0], [0, 0, 0], [1, 1, -1], [0, 0, 1]])
        self.lin.bias[...] = jnp.zeros(3)
        self.a = Activation("relu")

    def __call__(self, x):
        return self.a(self.lin(self.b(x)))


X = jnp.array([[1.0, -1, 2, -3], [-1, -1, 0, 5]])


def test_activation_sparsity_by_layer_by_hand():
    # relu(X) = [[1,0,2,0],[0,0,0,5]]: 3 of 8 nonzero. Times the kernel: [[3,1,-2],[0,0,5]],
    # relu → [[3,1,0],[0,0,5]]: 3 of 6 nonzero.
    t = A.activation_sparsity_by_layer(TwoActs(), lambda m: m(X))
    assert t.records() == [
        {"layer": "b", "depth": 0, "width": 4, "fraction_nonzero": 0.375},
        {"layer": "a", "depth": 1, "width": 3, "fraction_nonzero": 0.5}]


def test_activation_recorder_every_n_steps():
    model = TwoActs()
    rec = A.ActivationSparsityRecorder(lambda state: model, lambda m: m(X), every=2)
    for step in range(1, 5):
        rec(step, None)
    t = rec.table()
    assert t["step"] == [2, 2, 4, 4] and t["fraction_nonzero"] == [0.375, 0.5, 0.375, 0.5]
    with pytest.raises(TypeError, match="GraphDef"):
        A.ActivationSparsityRecorder(3, lambda m: m(X))
    with pytest.raises(TypeError, match="call must be a function"):
        A.ActivationSparsityRecorder(lambda state: model, X)


# ----------------------------------------------------------------------------- essential sparsity

PARAMS = {"a": {"kernel": jnp.array([[1.0, -4.0], [3.0, 2.0]])},
          "b": {"kernel": jnp.array([[0.5], [5.0], [-6.0], [0.1]]), "bias": jnp.ones(1)}}


def abs_sum(params):
    return sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(params))


def test_essential_sweep_global_and_layer_by_hand():
    # Kernel magnitudes 1 4 3 2 | 0.5 5 6 0.1, bias 1 (dense): the dense sum is 22.6.
    # Global: s=.25 keeps 6 (drops 0.1, 0.5) → 22.0; s=.5 keeps 6 5 4 3 → 19;
    # s=.75 keeps 6 5 → 12.
    t = A.essential_sparsity_sweep(PARAMS, abs_sum, [0.75, 0.25, 0.5])
    assert t["sparsity"] == [0.0, 0.25, 0.5, 0.75]
    assert t["structure"] == ["dense", "unstructured", "unstructured", "unstructured"]
    assert t["metric"] == pytest.approx([22.6, 22.0, 19.0, 12.0])
    assert t["realised_sparsity"] == pytest.approx([0.0, 0.25, 0.5, 0.75])
    # Layer-wise: s=.25 keeps 4 3 2 | 6 5 0.5 → 21.5; s=.75 keeps 4 | 6 → 11.
    t = A.essential_sparsity_sweep(PARAMS, lambda p: {"sum": abs_sum(p)}, [0.25, 0.75],
                                   scope="layer", include_dense=False)
    assert t["sum"] == pytest.approx([21.5, 11.0])


def test_essential_sweep_nm_by_hand():
    # 1:2 along axis 0: a keeps 3 and 4; b keeps 5 and 6 → 7 + 11 + bias 1 = 19.
    t = A.essential_sparsity_sweep(PARAMS, abs_sum, structure="n:m", patterns=[(1, 2)])
    assert t.records()[1] == {"sparsity": 0.5, "structure": "n:m", "pattern": "1:2",
                              "realised_sparsity": 0.5, "metric": pytest.approx(19.0)}
    # 1:4 on b only (a stays dense): b keeps 6 → 10 + 6 + 1 = 17; 3 of 4 masked entries zero.
    t = A.essential_sparsity_sweep(PARAMS, abs_sum, structure="n:m", patterns=[(1, 4)],
                                   rules=[(r"b/kernel", "sparse")], include_dense=False)
    assert t["metric"] == pytest.approx([17.0]) and t["realised_sparsity"] == [0.75]


def test_sharp_drop_by_hand():
    assert A.sharp_drop([0, 0.25, 0.5, 0.75], [22.6, 22.0, 19.0, 12.0], 1.0) == (0.25, 1, 22.6)
    # order of the input does not matter; the index points into it
    assert A.sharp_drop([0.5, 0.0, 0.25], [19.0, 22.6, 22.0], 1.0)[:2] == (0.25, 2)
    # a noisy recovery after the drop counts only with contiguous=False
    s, acc = [0, 0.1, 0.2, 0.3, 0.4], [0.9, 0.9, 0.85, 0.895, 0.5]
    assert A.sharp_drop(s, acc, 0.01)[:2] == (0.1, 1)
    assert A.sharp_drop(s, acc, 0.01, contiguous=False)[:2] == (0.3, 3)
    # exactly at the tolerance (0.9 − 0.89 = 0.01 up to rounding) qualifies
    assert A.sharp_drop([0, 0.5], [0.9, 0.89], 0.01).sparsity == 0.5
    # lower is better (a loss)
    assert A.sharp_drop([0, 0.1, 0.2], [1.0, 1.005, 1.02], 0.01,
                        higher_is_better=False)[:2] == (0.1, 1)
    # an explicit dense metric no point reaches
    assert A.sharp_drop([0.5], [0.5], 0.01, dense=0.9) == (None, None, 0.9)
    # two patterns at one sparsity (1:2 fails, 2:4 holds): the level counts as its best,
    # whatever the order, and the index points at the best one
    nm_s, nm_acc = [0, 0.5, 0.5, 0.75], [0.9, 0.80, 0.895, 0.6]
    assert A.sharp_drop(nm_s, nm_acc, 0.01)[:2] == (0.5, 2)
    assert A.sharp_drop(nm_s[::-1], nm_acc[::-1], 0.01)[:2] == (0.5, 1)


def test_essential_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="no dense point"):
        A.sharp_drop([0.5, 0.9], [0.8, 0.7])
    with pytest.raises(ValueError, match="3 sparsities but 2 metric"):
        A.sharp_drop([0, 0.5, 0.9], [0.8, 0.7])
    with pytest.raises(ValueError, match="outside"):
        A.essential_sparsity_sweep(PARAMS, abs_sum, [1.0])
    with pytest.raises(ValueError, match="needs patterns"):
        A.essential_sparsity_sweep(PARAMS, abs_sum, structure="n:m")
    with pytest.raises(ValueError, match="unknown structure"):
        A.essential_sparsity_sweep(PARAMS, abs_sum, [0.5], structure="2:4")
    with pytest.raises(ValueError, match="not divisible by M=4"):  # a's axis 0 has size 2
        A.essential_sparsity_sweep(PARAMS, abs_sum, structure="n:m", patterns=[(1, 4)])


# ----------------------------------------------------------------------------- attention


def test_attention_concentration_by_hand():
    # head 0: rows (.5 .3 .2) and a causal row (1 0 0); head 1: (.2 .2 .6) and (.1 .7 .2).
    p = jnp.array([[[[0.5, 0.3, 0.2], [1.0, 0.0, 0.0]],
                    [[0.2, 0.2, 0.6], [0.1, 0.7, 0.2]]]])
    np.testing.assert_allclose(A.attention_concentration(p, 1), [(0.5 + 1) / 2, (0.6 + 0.7) / 2])
    np.testing.assert_allclose(A.attention_concentration(p, 2), [(0.8 + 1) / 2, (0.8 + 0.9) / 2])
    np.testing.assert_allclose(A.attention_concentration(p, 5), [1.0, 1.0])
    # a softmax row with at most k keys counts exactly 1, although its float32 sum is an ulp off
    logits = jax.random.normal(jax.random.PRNGKey(0), (1, 2, 4, 4))
    last = jax.nn.softmax(logits, -1)[:, 1:, 3:]  # head 1, last query: sums to 1 − 6e-8
    assert float(last.sum()) != 1.0
    np.testing.assert_array_equal(A.attention_concentration(last, 4), [1.0])
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        A.attention_concentration(p, 0)
    with pytest.raises(ValueError, match=r"\[batch, heads, queries, keys\]"):
        A.attention_concentration(p[0], 1)


class Wrap(nnx.Module):
    def __init__(self, attn):
        self.ln = nnx.LayerNorm(8, rngs=nnx.Rngs(0))
        self.attn = attn

    def __call__(self, x):
        return self.attn(self.ln(x))


@pytest.mark.parametrize("spark", [False, True, "block"])
def test_attention_probs_reproduce_the_module_output(spark):
    from sparsejax.nn import SparseAttention

    t = 5
    if spark == "block":  # block-sparse: window of 16 keys on 16-token blocks, 48 tokens
        attn, t = SparseAttention(8, 2, causal=True, pattern="window", window=16,
                                  block_size=16, rngs=nnx.Rngs(1)), 48
    elif spark:
        attn = SparkAttention(8, 2, causal=True, keys_per_query=2, rngs=nnx.Rngs(1))
    else:
        attn = Attention(8, 2, causal=True, rngs=nnx.Rngs(1))
    model = Wrap(attn)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, t, 8))
    call = lambda m: m(x)  # noqa: E731
    probs = A.attention_probs(model, call, "attn")
    assert probs.shape == (2, 2, t, t)
    if spark == "block":  # nothing outside the window: keys i-15..i only
        i, j = np.indices((t, t))
        assert float(jnp.abs(jnp.where((i - j >= 16), probs, 0)).max()) == 0.0
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    assert float(jnp.abs(jnp.triu(probs, 1)).max()) == 0.0  # causal
    h = model.ln(x)
    v = attn._heads(attn.v(h))
    out = attn.o(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(x.shape))
    np.testing.assert_allclose(out, model(x), rtol=1e-5, atol=1e-6)
    if spark is True:  # the first query has one valid key: its row is all mass
        assert float(probs[:, :, 0, 0].min()) == 1.0
    with pytest.raises(ValueError, match="no module at path 'blocks/0/attn'"):
        A.attention_probs(model, call, "blocks/0/attn")
    with pytest.raises(ValueError, match="LayerNorm"):
        A.attention_probs(model, call, "ln")


# ----------------------------------------------------------------------------- frontier, plots

POINTS = [{"name": n, "flops": f, "accuracy": a} for n, f, a in [
    ("A", 1.0, 0.80), ("B", 2.0, 0.70), ("C", 3.0, 0.90), ("D", 3.0, 0.85), ("E", 4.0, 0.90),
    ("F", 0.5, 0.50), ("G", 3.0, 0.90)]]


def test_pareto_frontier_by_hand():
    # B is dominated by A, D and E by C, G duplicates C: F, A, C remain, sorted by flops.
    assert A.pareto_frontier(POINTS)["name"] == ["F", "A", "C"]
    loss = [{"flops": 1, "loss": 0.3}, {"flops": 2, "loss": 0.2}, {"flops": 3, "loss": 0.25}]
    assert A.pareto_frontier(loss, y="loss", y_higher_is_better=False)["flops"] == [1, 2]
    with pytest.raises(KeyError, match="no column 'acc'"):
        A.pareto_frontier(POINTS, y="acc")


def test_plot_helpers_draw_the_data():
    fig, axes = plt.subplots(1, 4)
    scatters, line = A.plot_frontier(axes[0], POINTS, label="name")
    assert len(scatters) == 7
    assert list(line.get_xdata()) == [0.5, 1.0, 3.0] and list(line.get_ydata()) == [0.5, 0.8, 0.9]
    sweep = A.Table([{"sparsity": 0.5, "metric": 19.0}, {"sparsity": 0.0, "metric": 22.6}])
    artists = A.plot_sweep(axes[1], sweep, drop=A.SharpDrop(0.5, 0, 22.6))
    assert list(artists[0].get_xdata()) == [0.0, 0.5] and list(artists[1].get_xdata()) == [0.5, 0.5]
    rows = [{"step": s, "layer": l, "turnover": v}
            for s, l, v in [(2, "w", 0.5), (1, "w", 0.25), (1, TOTAL, 0.2), (2, TOTAL, 0.4)]]
    lines = A.plot_mask_dynamics(axes[2], rows)
    assert [ln.get_label() for ln in lines] == ["w", TOTAL]
    assert list(lines[0].get_ydata()) == [0.25, 0.5]
    lines = A.plot_activation_sparsity(axes[3],
                                       [{"step": 1, "layer": "a", "fraction_nonzero": 0.3}])
    assert list(lines[0].get_ydata()) == [0.3]
    plt.close(fig)


# ----------------------------------------------------------------------------- runs


def test_read_metrics_summary_config_runs_by_hand(tmp_path):
    run, unfinished = tmp_path / "run", tmp_path / "unfinished"
    run.mkdir(), unfinished.mkdir()
    (run / "metrics.jsonl").write_text(
        '{"step": 5, "split": "train", "loss": 2.0, "accuracy": 0.25}\n\n'
        '{"step": 5, "split": "eval", "accuracy": 0.5}\n')
    (run / "summary.json").write_text(json.dumps({"eval_accuracy": 0.5, "workdir": "x"}))
    config = {"seed": 1, "method": {"name": "rigl", "sparsity": 0.9}}
    (run / "config.json").write_text(json.dumps(config))
    (unfinished / "config.json").write_text(json.dumps({"seed": 2}))
    assert A.read_metrics(run).records() == [
        {"step": 5, "split": "train", "metric": "loss", "value": 2.0},
        {"step": 5, "split": "train", "metric": "accuracy", "value": 0.25},
        {"step": 5, "split": "eval", "metric": "accuracy", "value": 0.5}]
    assert A.read_summary(run)["eval_accuracy"] == 0.5 and A.read_config(run) == config
    assert A.config_value(config, "method.name") == "rigl"
    assert A.config_value(config, "ift.family", "none") == "none"
    runs = A.read_runs([run, unfinished], keys=("seed", "method.sparsity"))
    assert runs.records() == [
        {"workdir": str(run), "seed": 1, "method.sparsity": 0.9, "finished": True,
         "eval_accuracy": 0.5},
        {"workdir": str(unfinished), "seed": 2, "method.sparsity": None, "finished": False,
         "eval_accuracy": None}]
    assert A.checkpoint_steps(run) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        A.read_metrics(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no summary.json"):
        A.read_summary(unfinished)
    with pytest.raises(TypeError, match="list of workdirs"):
        A.read_runs(str(run))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def rigl_run(tmp_path_factory):
    """20 RigL steps at sparsity 0.5, masks updated every 2 steps, checkpoints every 5."""
    workdir = tmp_path_factory.mktemp("rigl")
    cfg = quickstart.get_config("rigl,0.5,tiny")
    with cfg.unlocked():
        cfg.model.hidden = (64, 64)
        cfg.method.update_every = 2
        cfg.checkpoint_every = 5
        cfg.max_checkpoints = 10
    trainer = make_trainer(cfg)
    x = trainer.dataset.eval.get(np.arange(16))["inputs"]
    masks = A.MaskRecorder(every=1)
    acts = A.ActivationSparsityRecorder(trainer, lambda m: m(x), every=5)
    train_and_evaluate(cfg, workdir, hooks=[masks, acts], progress=False)
    return dict(workdir=workdir, cfg=cfg, trainer=trainer, x=x, masks=masks, acts=acts)


def test_end_to_end_workdir_reads_back(rigl_run):
    workdir, cfg = rigl_run["workdir"], rigl_run["cfg"]
    m = A.read_metrics(workdir)
    assert sorted(set(m.where(split="train")["step"])) == [5, 10, 15, 20]  # log_every=5
    assert sorted(set(m.where(split="eval")["step"])) == [10, 20]  # eval_every=10
    assert m.where(split="train", metric="sparsity")["value"] == [0.5] * 4
    assert len(m.where(split="eval")) == 2 * 2  # loss and accuracy
    assert A.checkpoint_steps(workdir) == [5, 10, 15, 20]
    run = A.read_runs([workdir]).records()[0]
    assert run["method.name"] == "rigl" and run["method.sparsity"] == 0.5
    assert run["finished"] and run["steps"] == 20

    before = digest(workdir)
    ckpt = A.load_checkpoint(workdir, 10, rigl_run["trainer"])
    # ERK over two equal 64×64 kernels at 0.5 (head dense by rule): 2048 of 4096 each
    assert mask_counts(ckpt.masks) == {"layers/0/kernel": (2048, 4096),
                                       "layers/1/kernel": (2048, 4096)}
    assert global_sparsity(ckpt.masks) == cfg.method.sparsity
    assert ckpt.step == 10 and int(ckpt.state.step) == 10
    assert ckpt.data_position == 10  # batches consumed
    recorded = rigl_run["masks"].masks[rigl_run["masks"].steps.index(10)]
    for path, m in A.mask_dict(ckpt.masks).items():
        np.testing.assert_array_equal(m, recorded[path])
    # an abstract state without shardings restores too (to one device)
    again = A.load_checkpoint(workdir, 20, rigl_run["trainer"].abstract_state)
    sharded = A.load_checkpoint(workdir, 20, rigl_run["trainer"])
    np.testing.assert_array_equal(again.params["head"]["kernel"], sharded.params["head"]["kernel"])
    with pytest.raises(ValueError, match=r"no checkpoint for step 7 .* steps: \[5, 10, 15, 20\]"):
        A.load_checkpoint(workdir, 7, rigl_run["trainer"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        A.load_checkpoint(workdir / "nope", 10, rigl_run["trainer"])
    # a model that does not fit (no head): the Checkpointer's clear error. (A wrong shape fails
    # the same way but leaves orbax's pending reads to warn at exit, so the test uses this.)
    abstract = rigl_run["trainer"].abstract_state
    headless = abstract._replace(params={k: v for k, v in abstract.params.items() if k != "head"})
    with pytest.raises(CheckpointError, match="checkpoints/10 could not be restored"):
        A.load_checkpoint(workdir, 10, headless)
    assert digest(workdir) == before  # reading changed nothing


def test_end_to_end_mask_dynamics(rigl_run):
    rec = rigl_run["masks"]
    assert rec.steps == list(range(1, 21))
    t = rec.turnover()
    total = t.where(layer=TOTAL)
    assert max(total["turnover"]) > 0  # RigL moved connections
    for r in t.where(lambda r: r["layer"] != TOTAL):
        assert r["dropped"] == r["grown"] and r["prev_active"] == r["next_active"] == 2048
    # masks change only after RigL updates: t = 2, 4, … ≤ end_step 15 run at steps 3, 5, …, 15
    moved = sorted(r["step"] for r in total if r["dropped"] > 0)
    assert moved and set(moved) <= {3, 5, 7, 9, 11, 13, 15}
    itop = rec.ever_active().where(layer=TOTAL)
    rates = itop["rate"]
    assert rates[0] == 0.5 and all(b >= a for a, b in zip(rates, rates[1:])) and rates[-1] > 0.5
    # ever active = initial active + everything grown (a regrown weight counts once at most)
    assert itop["ever_active"][-1] <= 4096 + sum(total["grown"])
    flips = rec.flip_rate().where(layer=TOTAL)
    assert flips["flips"] == [2 * d for d in total["dropped"]]  # counts kept: flips = 2·dropped


def test_end_to_end_activation_sparsity_matches_an_independent_forward(rigl_run):
    t = rigl_run["acts"].table()
    assert sorted(t["step"]) == [5, 5, 10, 10, 15, 15, 20, 20]  # two layers, every 5 steps
    assert set(t["layer"]) == {"acts/0", "acts/1"} and set(t["width"]) == {64}
    assert t.value("depth", step=20, layer="acts/0") == 0
    assert t.value("depth", step=20, layer="acts/1") == 1
    p = A.load_checkpoint(rigl_run["workdir"], 20, rigl_run["trainer"])
    masks = A.mask_dict(p.masks)
    w0, w1 = (np.asarray(p.params["layers"][i]["kernel"]) * masks[f"layers/{i}/kernel"]
              for i in (0, 1))
    x = np.asarray(rigl_run["x"]).reshape(16, -1)
    h1 = np.maximum(x @ w0 + np.asarray(p.params["layers"][0]["bias"]), 0)
    h2 = np.maximum(h1 @ w1 + np.asarray(p.params["layers"][1]["bias"]), 0)
    assert t.value("fraction_nonzero", step=20, layer="acts/0") == pytest.approx(
        float(np.mean(h1 != 0)))
    assert t.value("fraction_nonzero", step=20, layer="acts/1") == pytest.approx(
        float(np.mean(h2 != 0)))
