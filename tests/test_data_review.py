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


def test_fit_progress_leaves_checkpoints_of_several_optimizer_steps_per_batch_alone():
    """Two optimizer steps per batch made a finished fit look like an in-training one with drifted counters."""
    from lightning_meta.fit_progress import repair_fit_progress

    closed = {"ready": 3, "started": 3, "processed": 3, "completed": 3}
    epoch = {"ready": 1, "started": 1, "processed": 1, "completed": 1}

    def checkpoint(global_step):
        return {"epoch": 1, "global_step": global_step, "loops": {"fit_loop": {
            "epoch_progress": {"total": dict(epoch), "current": dict(epoch)},
            "epoch_loop.batch_progress": {"total": dict(closed), "current": dict(closed), "is_last_batch": False},
            "epoch_loop.state_dict": {"_batches_that_stepped": 3}}}}

    assert repair_fit_progress(checkpoint(3)) is not None  # one step per batch: the known pattern is repaired
    two_steps = checkpoint(6)
    assert repair_fit_progress(two_steps) is None
    assert two_steps == checkpoint(6)


def test_a_subset_of_a_shard_set_is_verified_without_the_other_shards(tmp_path, monkeypatch):
    """Loading only the training shards required (and hashed) every shard the index lists."""
    from lightning_meta.data.shards import load_index
    from lightning_meta.errors import ShardError

    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))
    shards = tmp_path / "tiny"
    write_tiny_shards(shards)
    for test_shard in shards.glob("*-test-*.tar"):
        test_shard.unlink()
    index = load_index(str(shards / "*-train-*.tar"), verify="size")
    assert index.classes
    with pytest.raises(ShardError, match="missing"):  # the folder stands for the whole set: a lost shard is an error
        load_index(str(shards), verify="size")


def test_a_streaming_shard_given_twice_is_named(tmp_path, monkeypatch):
    from lightning_meta.data.streaming import load_stream_index
    from lightning_meta.errors import ShardError

    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))
    shards = tmp_path / "tiny"
    write_tiny_shards(shards)
    url = f"pipe:cat {shards}/" + sorted(p.name for p in shards.glob("*-train-*.tar"))[0]
    with pytest.raises(ShardError, match="given twice"):
        load_stream_index([url, url], retries=0, retry_delay=0)
