"""Every ``Example:`` in the library and the kernels runs, and prints what it says.

Each module's docstrings are collected with ``doctest.DocTestFinder`` and run with
ELLIPSIS and NORMALIZE_WHITESPACE; a module whose docstrings hold an ``Example`` heading
with no ``>>>`` line fails, so an example that cannot run cannot be added.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import re

import pytest

import sparsejax
import sparsejax.kernels

FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _modules() -> list[str]:
    names = []
    for pkg in (sparsejax, sparsejax.kernels):
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.startswith("sparsejax.kernels.") and pkg is sparsejax:
                continue
            names.append(info.name)
    return sorted(set(names))


MODULES = _modules()


def _examples_without_prompt(module) -> list[str]:
    """Docstrings that announce an example but hold no doctest."""
    bad = []
    for test in doctest.DocTestFinder(recurse=True).find(module, module.__name__):
        doc = test.docstring or ""
        if re.search(r"^\s*Example", doc, flags=re.M) and not test.examples:
            bad.append(test.name)
    return bad


@pytest.mark.parametrize("name", MODULES)
def test_examples_run(name):
    module = importlib.import_module(name)
    assert not _examples_without_prompt(module), "Example with no >>> lines"
    finder = doctest.DocTestFinder(recurse=True, exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in finder.find(module, name, globs={}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples failed"


def test_every_module_is_collected():
    for expected in ("sparsejax.masks", "sparsejax.train.loop", "sparsejax.kernels.nm_matmul.api"):
        assert expected in MODULES
