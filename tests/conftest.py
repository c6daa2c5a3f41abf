"""Shared fixtures: an isolated cache folder, so tests never touch ~/.cache/lightning_meta; benchmark scripts."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory):
    """Points LIGHTNING_META_CACHE at a per-session folder (the embedded default is generated there once)."""
    old = os.environ.get("LIGHTNING_META_CACHE")
    os.environ["LIGHTNING_META_CACHE"] = str(tmp_path_factory.mktemp("lightning_meta_cache"))
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    yield
    if old is None:
        os.environ.pop("LIGHTNING_META_CACHE", None)
    else:
        os.environ["LIGHTNING_META_CACHE"] = old


@pytest.fixture(scope="session")
def load_benchmark():
    """``load_benchmark("inner_loop")`` imports ``benchmarks/inner_loop.py`` (not a package) as a module."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
