"""The import-layer contract (pyproject's [tool.importlinter]) holds, and catches a break."""

import shutil
import site
import subprocess
import sys

import pytest

PACKAGES = ("sparsejax", "kernels", "configs", "experiments")


def _lint(root):
    """``lint-imports`` on the tree at ``root``: without site's .pth files (``-S``), so the
    packages are read from ``root`` and not from the editable install."""
    code = "import sys, importlinter.cli as c; sys.exit(c.lint_imports())"
    env = {"PYTHONPATH": ":".join([str(root), *site.getsitepackages()]), "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def tree(root, tmp_path):
    for name in PACKAGES:
        shutil.copytree(root / name, tmp_path / name,
                        ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(root / "pyproject.toml", tmp_path)
    return tmp_path


def test_the_layers_hold(tree):
    out = _lint(tree)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 2 kept, 0 broken." in out.stdout


@pytest.mark.parametrize("module,line,chain", [
    ("sparsejax/masks.py", "from sparsejax.train import loop", "sparsejax.masks -> sparsejax.train.loop"),
    ("sparsejax/nn/layers.py", "import sparsejax.models", "sparsejax.nn.layers -> sparsejax.models"),
    ("kernels/_common.py", "from sparsejax.nn import layers", "kernels._common -> sparsejax.nn.layers"),
])
def test_an_upward_import_breaks_the_build(tree, module, line, chain):
    with open(tree / module, "a") as f:
        f.write(f"\n{line}  # deliberately upward\n")
    out = _lint(tree)
    assert out.returncode != 0
    assert "BROKEN" in out.stdout and chain in out.stdout, out.stdout
