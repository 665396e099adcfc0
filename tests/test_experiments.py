"""The results pages re-render from their committed JSON byte for byte (no training).

``python -m experiments.<name>_table --render_only`` runs for every table with its
Markdown (and plot) written into a temporary directory that holds a copy of the
committed page, as a rerun would find it; the new page must equal the committed
``docs/results/<table>.md``, hand-written Reading included. The plot is only checked to
be written: its bytes depend on the matplotlib version.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

# page → (script, its flags, plot file or None)
TABLES = {
    "dst_digits": ("dst", [], None),
    "dst_lm": ("dst", ["--task=lm"], None),
    "erk_lm": ("dst", ["--task=lm_erk"], None),
    "nm_digits": ("nm", [], "nm_digits_flip_rate.png"),
    "nm_lm": ("nm", ["--task=lm"], "nm_lm_flip_rate.png"),
    "ift_digits": ("ift", [], "ift_digits.png"),
    "ift_lm": ("ift", ["--task=lm"], "ift_lm.png"),
    "act_vit_digits": ("act", [], None),
    "width_lm": ("width", [], "width_lm.png"),
}


def _render_only(root, name: str, out_md, out_json, out_png=None, extra=()) -> None:
    cmd = [sys.executable, "-m", f"experiments.{name}_table", "--render_only", *extra,
           f"--out_md={out_md}", f"--out_json={out_json}"]
    if out_png is not None:
        cmd.append(f"--out_png={out_png}")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("stem", list(TABLES))
def test_render_only_reproduces_the_committed_page(stem, root, tmp_path):
    name, extra, png = TABLES[stem]
    results = root / "docs" / "results"
    if png is not None:
        pytest.importorskip("matplotlib")
    out_md = tmp_path / f"{stem}.md"
    shutil.copyfile(results / f"{stem}.md", out_md)
    out_png = None if png is None else tmp_path / png
    _render_only(root, name, out_md, results / f"{stem}.json", out_png, extra)
    assert out_md.read_bytes() == (results / f"{stem}.md").read_bytes()
    if out_png is not None:
        assert out_png.stat().st_size > 0


def test_render_only_without_a_page_writes_the_reading_placeholder(root, tmp_path):
    out_md = tmp_path / "dst.md"
    _render_only(root, "dst", out_md, root / "docs" / "results" / "dst_digits.json")
    text = out_md.read_text()
    committed = (root / "docs" / "results" / "dst_digits.md").read_text()
    head = committed.split("<!-- reading:begin -->")[0]
    assert text.startswith(head)
    assert "_Not written yet: add a 3–5 sentence reading" in text


T95 = {2: 2.919986, 4: 2.131847}  # one-sided 95% Student-t quantiles (df), from the tables


def test_verdict_on_hand_made_seeds():
    import math

    from experiments.tables import verdict, verdict_line

    # a clear win: differences 0.10, 0.11, 0.11 → mean 0.10667, sd 0.005774
    v = verdict([0.90, 0.91, 0.92], [0.80, 0.80, 0.81])
    assert v.verdict == "reproduced" and v.n == 3
    assert math.isclose(v.effect, 0.32 / 3, rel_tol=1e-9)
    assert math.isclose(v.half_width, T95[2] * (1 / 30000) ** 0.5 / 3 ** 0.5, rel_tol=1e-5)
    # a clear loss on a lower-is-better metric: a's losses are 0.1 higher on every seed
    assert verdict([2.0, 2.1, 2.05], [1.9, 2.0, 1.92], higher_is_better=False).verdict == "not reproduced"
    # overlapping spreads: the mean favours a (+0.0) but the seeds disagree
    assert verdict([0.5, 0.7, 0.6], [0.6, 0.5, 0.7]).verdict == "inconclusive"
    # same mean win (+0.05) but noisy seeds: not enough to call
    assert verdict([0.6, 0.5, 0.75], [0.5, 0.55, 0.65]).verdict == "inconclusive"
    # a margin turns "a >= b" into "a matches b within margin": 0.02 worse, tight
    close = ([0.88, 0.89, 0.885], [0.90, 0.91, 0.905])
    assert verdict(*close).verdict == "not reproduced"
    assert verdict(*close, margin=0.05).verdict == "reproduced"
    assert verdict(*close, margin=0.019).verdict == "not reproduced"
    # five seeds use df = 4
    v5 = verdict([1, 2, 3, 4, 5], [0, 0, 0, 0, 0])
    assert math.isclose(v5.half_width, T95[4] * (2.5 ** 0.5) / 5 ** 0.5, rel_tol=1e-5)
    # one seed has no spread: never a verdict either way
    assert verdict([1.0], [0.0]).verdict == "inconclusive"
    with pytest.raises(ValueError, match="paired seeds: got 3 and 2"):
        verdict([1, 2, 3], [1, 2])
    assert verdict_line("RigL ≥ SET", v, " pts", 100, 1) == (
        "- RigL ≥ SET: **reproduced** (effect +10.7 pts, one-sided 95% bound ±1.0, 3 seeds)")


def test_claims_section_reads_the_verdicts_off_hand_made_runs():
    from experiments.tables import claims

    _claims = claims([("rigl", "set"), ("set", "static"), ("rigl", "static")],
                     {"set": "SET", "rigl": "RigL"})

    def runs(method, losses):
        return [{"method": method, "sparsity": 0.9, "seed": k, "eval_loss": x}
                for k, x in enumerate(losses)]

    result = {"config": {"metric": "eval_loss", "higher_is_better": False},
              "sparsities": [0.9], "seeds": [0, 1, 2],
              "runs": (runs("static", [2.00, 2.10, 2.05]) + runs("set", [2.01, 2.08, 2.06])
                       + runs("rigl", [1.90, 2.00, 1.94]))}
    lines = [x for x in _claims(result, {}) if x.startswith("- ")]
    assert [x.split(": ")[0] for x in lines] == [
        "- RigL ≥ SET at 0.9", "- SET ≥ static at 0.9", "- RigL ≥ static at 0.9"]
    # RigL is 0.11, 0.08, 0.12 nats lower than SET: a clear win of 0.31 / 3 nats, in
    # bits; SET vs static differs by +0.01, -0.02, +0.01 nats: overlapping
    import math
    assert f"**reproduced** (effect {0.31 / 3 / math.log(2):+.4f} bits per byte" in lines[0]
    assert "**inconclusive**" in lines[1]
    # the same numbers as accuracies (higher is better) turn the win into a loss
    result["config"] = {"metric": "eval_accuracy", "higher_is_better": True}
    for r in result["runs"]:
        r["eval_accuracy"] = r.pop("eval_loss")
    lines = [x for x in _claims(result, {}) if x.startswith("- ")]
    assert "**not reproduced** (effect -10.33 points of accuracy" in lines[0]


def test_claims_within_compare_distributions_per_method():
    from experiments.tables import claims

    section = claims([("erk", "uniform")], {"erk": "ERK", "rigl": "RigL"},
                     ("distribution", "sparsity"), within="method")
    losses = {("static", "erk"): [2.00, 2.10, 2.05], ("static", "uniform"): [2.01, 2.08, 2.06],
              ("rigl", "erk"): [1.90, 2.00, 1.94], ("rigl", "uniform"): [2.01, 2.08, 2.06]}
    runs = [{"method": m, "distribution": d, "sparsity": 0.9, "seed": k, "eval_loss": x}
            for (m, d), xs in losses.items() for k, x in enumerate(xs)]
    runs += [{"method": "dense", "distribution": None, "sparsity": None, "seed": k,
              "eval_loss": 1.5} for k in range(3)]  # no pair: no line
    result = {"config": {"metric": "eval_loss", "higher_is_better": False},
              "sparsities": [0.9], "seeds": [0, 1, 2], "runs": runs}
    lines = [x for x in section(result, {}) if x.startswith("- ")]
    assert [x.split(": ")[0] for x in lines] == ["- ERK ≥ uniform (static) at 0.9",
                                                 "- ERK ≥ uniform (RigL) at 0.9"]
    assert "**inconclusive**" in lines[0]  # differences +0.01, -0.02, +0.01
    import math
    assert f"**reproduced** (effect {0.31 / 3 / math.log(2):+.4f} bits per byte" in lines[1]
    # dense runs once (level None) and is compared at every level
    result["runs"] = [r for r in runs if r["distribution"] != "uniform"]
    lines = [x for x in claims([("rigl", "dense")], {})(result, {}) if x.startswith("- ")]
    assert [x.split(": ")[0] for x in lines] == ["- rigl ≥ dense at 0.9"]
    assert "**not reproduced**" in lines[0]  # 1.90–2.00 against 1.5


def test_render_only_refuses_a_json_of_another_task(root, tmp_path):
    out_md = tmp_path / "dst.md"
    cmd = [sys.executable, "-m", "experiments.dst_table", "--render_only",
           f"--out_md={out_md}", f"--out_json={root / 'docs' / 'results' / 'dst_lm.json'}"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "holds --task=lm runs; render it with --task=lm, not --task=digits" in proc.stderr
    assert not out_md.exists()  # nothing written


@pytest.mark.parametrize("name,flags,message", [
    ("nm", ["--task=lm", "--patterns=1:3"], "bad N:M pattern '1:3' for --task=lm"),
    ("dst", ["--task=lm_erk", "--distributions=erk,gaussian"],
     "--distributions: unknown distribution 'gaussian'"),
    ("width", ["--static_sparsity=1.5"], "--static_sparsity=1.5 is outside (0, 1)"),
    ("width", ["--widths=base,huge"], "unknown --widths ['huge']"),
])
def test_table_scripts_refuse_bad_settings_before_training(name, flags, message, root, tmp_path):
    out_md, out_json = tmp_path / "t.md", tmp_path / "t.json"
    cmd = [sys.executable, "-m", f"experiments.{name}_table", *flags, f"--out_md={out_md}",
           f"--out_json={out_json}"]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not out_md.exists() and not out_json.exists()  # nothing written, nothing trained
