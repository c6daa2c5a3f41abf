"""Regression tests for bugs found by the eighth session's review of the datamodules and episodes.

Each test fails without its fix (checked by reverting the fix).
"""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from episode_fixtures import write_tiny_shards
from PIL import Image

from lightning_meta import Episode
from lightning_meta.datamodules import ShardDataModule, SinusoidDataModule
from lightning_meta.errors import MetaConfigError


def _third_party_shards(folder, shards=2, classes=10, per_class=4):
    """webdataset-style shards without index.json whose classes spread over every file."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for s in range(shards):
        with tarfile.open(folder / f"part-{s:06d}.tar", "w") as tar:
            for c in range(classes):
                for i in range(per_class):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(buf, "PNG")
                    for ext, data in (("png", buf.getvalue()), ("cls", str(c).encode())):
                        info = tarfile.TarInfo(f"s{s}_c{c}_{i}.{ext}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))


def test_a_test_split_naming_one_of_the_training_shards_is_refused(tmp_path, monkeypatch):
    """A class spread over two files was indexed with both files for train, one for test: the leak went unseen."""
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "thirdparty"
    _third_party_shards(data)
    dm = ShardDataModule(str(data), test_shards=str(data / "part-000001.tar"), ways=2, shots=1, queries=1,
                         eval_ways=2, eval_shots=1, eval_queries=1, verify="none")
    with pytest.raises(MetaConfigError, match="in both the train and the test split"):
        dm.setup()


@pytest.mark.parametrize(("changed", "value"), [("max_ways", 3), ("max_queries", 1), ("min_ways", 3)])
def test_resuming_with_other_variable_episode_bounds_is_refused(changed, value, tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))
    shards = tmp_path / "tiny"
    write_tiny_shards(shards)
    kw = dict(episode_shape="variable", eval_episode_shape="fixed", eval_ways=3, eval_shots=1, eval_queries=2,
              meta_batch_size=1, train_episodes=8, min_ways=2, max_ways=6, max_queries=3, verify="none",
              hierarchy="none")
    saved = ShardDataModule(str(shards), **kw).state_dict()
    saved.update(epoch=0, batches=3)
    ShardDataModule(str(shards), **kw).load_state_dict(dict(saved))  # the same settings resume
    with pytest.raises(MetaConfigError, match=f"{changed}="):
        ShardDataModule(str(shards), **{**kw, changed: value}).load_state_dict(dict(saved))


def test_checkpoints_without_the_newer_shape_keys_still_resume():
    dm = SinusoidDataModule(meta_batch_size=2, train_episodes=8)
    state = dm.state_dict()
    state["train_shape"] = {k: v for k, v in state["train_shape"].items() if k != "train_episodes"}  # older layout
    state.update(epoch=0, batches=1)
    SinusoidDataModule(meta_batch_size=2, train_episodes=8).load_state_dict(state)


def test_a_negative_seed_is_refused_at_construction():
    with pytest.raises(MetaConfigError, match="seed=-1"):
        SinusoidDataModule(seed=-1)


def test_episode_to_another_tensor_moves_the_labels_too():
    ep = Episode(torch.randn(3, 2), torch.arange(3), torch.randn(3, 2), torch.arange(3), torch.arange(3))
    moved = ep.to(torch.empty(0, dtype=torch.float64, device="meta"))
    assert {getattr(moved, n).device.type for n in ("support_x", "support_y", "query_x", "query_y", "classes")} \
        == {"meta"}
    assert moved.support_x.dtype == torch.float64 and moved.support_y.dtype == torch.long
