"""The package installs as declared: kernels/ ships as sparsejax.kernels, nothing is missed."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest


def _declared(root: Path) -> tuple[list[str], dict]:
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return cfg["packages"], cfg["package-dir"]


def _package_folders(root: Path) -> set[str]:
    found = set()
    for top, name in (("sparsejax", "sparsejax"), ("kernels", "sparsejax.kernels")):
        for init in (root / top).rglob("__init__.py"):
            rel = init.parent.relative_to(root / top).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_package_folder_is_declared(root):
    packages, package_dir = _declared(root)
    assert package_dir["sparsejax.kernels"] == "kernels"
    missing = _package_folders(root) - set(packages)
    assert not missing, f"add these to [tool.setuptools] packages in pyproject.toml: {missing}"


@pytest.mark.slow
def test_non_editable_install_ships_kernels(root, tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(root)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    probe = ("import sparsejax, sparsejax.kernels, sparsejax.train, sparsejax.models;"
             "print(sparsejax.__file__); print(sparsejax.kernels.__file__)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    files = out.stdout.split()
    assert all(f.startswith(str(target)) for f in files), files  # not the checkout
    assert files[1].endswith(os.path.join("sparsejax", "kernels", "__init__.py"))
    for pkg in _declared(root)[0]:
        assert (target / Path(*pkg.split("."))).is_dir(), pkg
