"""Every notebook runs end to end in tiny mode, makes its plots, and its .ipynb is in sync.

The notebooks are jupytext pairs: ``notebooks/NN_name.py`` (percent format, the one to
edit) and ``notebooks/NN_name.ipynb``. Each one is executed here by nbclient on a fresh
kernel with ``SPARSEJAX_TINY=1``; any cell error fails the test.
"""

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


def test_there_are_six_notebooks():
    assert [p.stem[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"], NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_ipynb_is_paired_and_in_sync(path):
    import jupytext

    ipynb = path.with_suffix(".ipynb")
    assert ipynb.exists(), f"{ipynb.name} missing: run `jupytext --sync {path}`"
    py_cells = [(c.cell_type, c.source.strip()) for c in jupytext.read(path).cells]
    nb_cells = [(c.cell_type, c.source.strip()) for c in jupytext.read(ipynb).cells]
    assert py_cells == nb_cells, f"{ipynb.name} differs from {path.name}: `jupytext --sync`"
    assert "py:percent" in jupytext.read(ipynb).metadata["jupytext"]["formats"]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_in_tiny_mode(path, tmp_path, monkeypatch):
    import jupytext
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    monkeypatch.setenv("SPARSEJAX_TINY", "1")
    monkeypatch.setenv("SPARSEJAX_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # One CPU device in the kernel: the notebooks are about the numbers, not the mesh.
    flags = os.environ.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", "")
    monkeypatch.setenv("XLA_FLAGS", flags.strip())
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT)}}).execute()
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, f"{path.name} made no plot"
