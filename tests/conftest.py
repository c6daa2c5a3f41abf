"""Shared fixtures: an isolated cache folder, so tests never touch ~/.cache/lightning_meta."""

from __future__ import annotations

import os

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
