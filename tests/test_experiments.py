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

# script → (JSON/Markdown stem, plot file or None)
TABLES = {
    "dst": ("dst_digits", None),
    "nm": ("nm_digits", "nm_digits_flip_rate.png"),
    "ift": ("ift_digits", "ift_digits.png"),
    "act": ("act_vit_digits", None),
}


def _render_only(root, name: str, out_md, out_json, out_png=None) -> None:
    cmd = [sys.executable, "-m", f"experiments.{name}_table", "--render_only",
           f"--out_md={out_md}", f"--out_json={out_json}"]
    if out_png is not None:
        cmd.append(f"--out_png={out_png}")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("name", list(TABLES))
def test_render_only_reproduces_the_committed_page(name, root, tmp_path):
    stem, png = TABLES[name]
    results = root / "docs" / "results"
    if png is not None:
        pytest.importorskip("matplotlib")
    out_md = tmp_path / f"{stem}.md"
    shutil.copyfile(results / f"{stem}.md", out_md)
    out_png = None if png is None else tmp_path / png
    _render_only(root, name, out_md, results / f"{stem}.json", out_png)
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
