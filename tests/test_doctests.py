"""The ``Example:`` sections of the docstrings run and print what they show.

Every module of the package (and of ``lightning_meta.datamodules`` / ``lightning_meta.callbacks``,
which install from the top-level ``datamodules/`` and ``callbacks/`` folders) is collected and its
examples are run with :mod:`doctest`.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import lightning_meta


def _modules() -> list[str]:
    names = ["lightning_meta"]
    for pkg in ("lightning_meta", "lightning_meta.datamodules", "lightning_meta.callbacks"):
        mod = importlib.import_module(pkg)
        names += [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(mod.__path__)]
    for sub in ("algorithms", "backbones", "data", "functional", "metrics", "strategies"):
        pkg = importlib.import_module(f"lightning_meta.{sub}")
        names += [f"lightning_meta.{sub}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
    return sorted(set(names) - {"lightning_meta.__main__"})


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an example that writes files writes them here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs=vars(module).copy()):
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} of {results.attempted} docstring examples of {name} failed"


def test_the_package_has_examples():
    assert lightning_meta.__doc__ is not None
    assert len(_modules()) > 40
