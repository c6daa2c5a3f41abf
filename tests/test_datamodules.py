"""The episodic datamodules: the sampling contract (DESIGN §2), refusal of bad input, resume.

Fixture data: a small glyph set generated once per module with ``generate_glyphs`` (about a
second), and the committed third-party shards in ``tests/data/thirdparty`` (see
``tests/data/README.md``). ``LIGHTNING_META_CACHE`` points at a per-test temporary folder.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lightning_meta.data import shards as shards_mod
from lightning_meta.data.glyphs import generate_glyphs
from lightning_meta.data.shards import load_index, scan_tar
from lightning_meta.datamodules import EpisodicDataModule, MetaBatchSampler, ShardDataModule, SinusoidDataModule
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError, ShardError

THIRDPARTY = Path(__file__).parent / "data" / "thirdparty"
THIRDPARTY_PATTERN = str(THIRDPARTY / "shard-{000000..000001}.tar")
THIRDPARTY_IDS = {3 + 7 * k for k in range(8)}  # see tests/data/make_thirdparty_shards.py
DRAWINGS = 20


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's cache: every test gets its own LIGHTNING_META_CACHE."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def glyphs(tmp_path_factory) -> Path:
    """A small embedded-style glyph set: 6 alphabets split 4/1/1, 20 drawings per character."""
    return generate_glyphs(
        tmp_path_factory.mktemp("glyphs") / "g",
        seed=0,
        alphabets=6,
        chars_per_alphabet=(6, 8),
        drawings=DRAWINGS,
        splits=(4, 1, 1),
    )


@pytest.fixture
def glyph_copy(glyphs, tmp_path) -> Path:
    """A private copy of the glyph set that a test may damage."""
    return Path(shutil.copytree(glyphs, tmp_path / "copy"))


def _split_ids(folder: Path) -> dict[str, set[int]]:
    index = load_index(folder, verify="none")
    return {s: {c.id for c in index.split_classes(s)} for s in ("train", "val", "test")}


def _dm(shards, **kw) -> ShardDataModule:
    args = dict(
        ways=3,
        shots=1,
        queries=2,
        eval_queries=2,
        meta_batch_size=2,
        eval_meta_batch_size=2,
        train_episodes=8,
        val_episodes=6,
        test_episodes=6,
    )
    args.update(kw)
    return ShardDataModule(shards=str(shards), **args)


def _ready(dm, stage="fit"):
    dm.prepare_data()
    dm.setup(stage)
    return dm


def _equal(a: Episode, b: Episode) -> bool:
    return all(torch.equal(getattr(a, f.name), getattr(b, f.name)) for f in fields(Episode))


def _assert_same_batches(xs: list[Episode], ys: list[Episode]) -> None:
    assert len(xs) == len(ys)
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        for f in fields(Episode):
            assert torch.equal(getattr(x, f.name), getattr(y, f.name)), f"batch {i}: {f.name} differs"


def _fake_trainer(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world)


# --------------------------------------------------------------------------- episode contract
def _member_of(reader, pos: int, img: torch.Tensor) -> int:
    """Which member of class ``pos`` the image is (exact pixel match)."""
    hits = [m for m in range(reader.index.classes[pos].count) if torch.equal(reader.image(pos, m), img)]
    assert len(hits) == 1, f"image matches {len(hits)} members of class position {pos}"
    return hits[0]


@pytest.mark.parametrize("split", ["train", "val"])
def test_episode_is_an_exact_n_way_k_shot_task(glyphs, split):
    dm = _ready(_dm(glyphs, ways=5, shots=2, queries=3, eval_ways=4, eval_shots=3, eval_queries=4))
    ways, shots, queries = (5, 2, 3) if split == "train" else (4, 3, 4)
    source = dm.sources[split]
    reader = source.reader
    pos_of = {c.id: p for p, c in enumerate(reader.index.classes)}
    split_ids = _split_ids(glyphs)[split]
    for index in range(6):
        ep = source.episode(split, 0, index)
        assert ep.support_x.shape == (ways * shots, 1, 28, 28)
        assert ep.query_x.shape == (ways * queries, 1, 28, 28)
        assert torch.equal(ep.support_y, torch.arange(ways).repeat_interleave(shots))
        assert torch.equal(ep.query_y, torch.arange(ways).repeat_interleave(queries))
        ids = ep.classes.tolist()
        assert len(set(ids)) == ways and set(ids) <= split_ids  # original class ids of this split
        for label, cid in enumerate(ids):
            imgs = list(ep.support_x[ep.support_y == label]) + list(ep.query_x[ep.query_y == label])
            members = [_member_of(reader, pos_of[cid], img) for img in imgs]
            assert len(set(members)) == shots + queries  # distinct examples, no support/query overlap


def test_episode_is_a_pure_function_of_seed_split_epoch_index(glyphs):
    a = _ready(_dm(glyphs)).sources["train"]
    b = _ready(_dm(glyphs)).sources["train"]  # built separately
    other_seed = _ready(_dm(glyphs, seed=1)).sources["train"]
    ep = a.episode("train", 2, 5)
    b.episode("train", 0, 0)  # history does not matter
    assert _equal(ep, b.episode("train", 2, 5))
    assert _equal(ep, a.episode("train", 2, 5))
    for different in (a.episode("train", 3, 5), a.episode("train", 2, 6), other_seed.episode("train", 2, 5)):
        assert not _equal(ep, different)


def test_episodes_are_identical_with_num_workers_0_and_2(glyphs):
    runs = {}
    for workers in (0, 2):
        dm = _ready(_dm(glyphs, num_workers=workers))
        loader = dm.train_dataloader()
        assert loader.num_workers == workers
        batches = []
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)
            batches.append(list(loader))
        runs[workers] = batches
        del loader
    for epoch in (0, 1):
        assert len(runs[0][epoch]) == 4  # 8 episodes / meta-batch 2
        assert runs[0][epoch][0].support_x.shape == (2, 3, 1, 28, 28)
        _assert_same_batches(runs[0][epoch], runs[2][epoch])
    assert not torch.equal(runs[0][0][0].support_x, runs[0][1][0].support_x)  # a new epoch, new episodes


# --------------------------------------------------------------------------- ranks
@pytest.mark.parametrize(("episodes", "batch", "world"), [(40, 8, 2), (40, 8, 4), (30, 6, 3), (13, 4, 2)])
def test_ranks_split_each_global_meta_batch(episodes, batch, world):
    for epoch in (0, 3):
        single = MetaBatchSampler(episodes, batch)
        single.set_epoch(epoch)
        ranks = []
        for r in range(world):
            s = MetaBatchSampler(episodes, batch, rank=r, world_size=world)
            s.set_epoch(epoch)
            ranks.append(list(s))
            assert len(s) == len(single)
        whole = list(single)
        assert len(whole) == episodes // batch
        for step, (e, indices) in enumerate(whole):
            assert e == epoch and len(indices) == batch
            parts = [ranks[r][step] for r in range(world)]
            assert all(pe == epoch and len(pi) == batch // world for pe, pi in parts)
            assert sum((pi for _, pi in parts), ()) == indices  # rank 0 + rank 1 + ... of step b == step b
        keys = lambda steps: {(e, i) for e, idx in steps for i in idx}  # noqa: E731
        assert set().union(*(keys(r) for r in ranks)) == keys(whole)


def test_two_rank_datamodules_see_the_single_rank_meta_batches(glyphs):
    single = list(_ready(_dm(glyphs, meta_batch_size=4)).train_dataloader())
    per_rank = []
    for r in range(2):
        dm = _dm(glyphs, meta_batch_size=4)
        dm.trainer = _fake_trainer(r, 2)
        per_rank.append(list(_ready(dm).train_dataloader()))
    assert len(single) == len(per_rank[0]) == len(per_rank[1]) == 2
    for step, whole in enumerate(single):
        halves = [per_rank[r][step] for r in range(2)]
        assert all(h.num_tasks == 2 for h in halves)
        for f in fields(Episode):
            joined = torch.cat([getattr(h, f.name) for h in halves])
            assert torch.equal(joined, getattr(whole, f.name)), f"step {step}: {f.name}"


@pytest.mark.parametrize(("episodes", "batch", "world"), [(17, 4, 3), (6, 8, 4), (100, 8, 1), (9, 2, 2)])
def test_eval_samplers_partition_the_fixed_list(episodes, batch, world):
    seen: list[int] = []
    for r in range(world):
        s = MetaBatchSampler(episodes, batch, rank=r, world_size=world, train=False)
        s.set_epoch(5)  # Lightning sets epochs on every sampler; evaluation ignores them
        keys = list(s)
        assert len(keys) == len(s)
        assert all(e == 0 and 1 <= len(idx) <= batch for e, idx in keys)
        seen += [i for _, idx in keys for i in idx]
    assert sorted(seen) == list(range(episodes))  # nothing missing, no overlap


def test_eval_episodes_do_not_depend_on_the_world_size(glyphs):
    def by_index(dm) -> dict[int, Episode]:
        loader = dm.val_dataloader()
        keys = list(loader.sampler)
        out = {}
        for (_, indices), batch in zip(keys, loader, strict=True):
            out.update({i: batch.task(j) for j, i in enumerate(indices)})
        return out

    single = by_index(_ready(_dm(glyphs, val_episodes=7, eval_meta_batch_size=3)))
    merged: dict[int, Episode] = {}
    for r in range(2):
        dm = _dm(glyphs, val_episodes=7, eval_meta_batch_size=3)
        dm.trainer = _fake_trainer(r, 2)
        part = by_index(_ready(dm))
        assert not set(part) & set(merged)
        merged.update(part)
    assert sorted(merged) == sorted(single) == list(range(7))
    assert all(_equal(merged[i], single[i]) for i in range(7))


def test_meta_batch_not_divisible_by_world_size_is_refused(glyphs):
    with pytest.raises(MetaConfigError, match=r"meta_batch_size=6 is global .* world size 4; use a multiple of 4"):
        MetaBatchSampler(24, 6, rank=0, world_size=4)
    MetaBatchSampler(24, 6, rank=0, world_size=4, train=False)  # evaluation batches are per device
    dm = _dm(glyphs, meta_batch_size=3, train_episodes=9)
    dm.trainer = _fake_trainer(0, 2)
    with pytest.raises(MetaConfigError, match="meta_batch_size=3"):
        _ready(dm).train_dataloader()


# --------------------------------------------------------------------------- fixed evaluation lists
def test_val_and_test_episodes_are_a_fixed_list(glyphs):
    a, b = _ready(_dm(glyphs), None), _ready(_dm(glyphs), None)
    val = list(a.val_dataloader())
    assert len(val) == 3
    _assert_same_batches(val, list(b.val_dataloader()))
    _assert_same_batches(list(a.test_dataloader()), list(b.test_dataloader()))
    assert not torch.equal(val[0].classes, list(a.test_dataloader())[0].classes)  # disjoint class splits

    # independent of the training epoch (and of any epoch set on the evaluation sampler)
    train = a.train_dataloader()
    train.sampler.set_epoch(4)
    list(train)
    later = a.val_dataloader()
    later.sampler.set_epoch(4)
    _assert_same_batches(val, list(later))


# --------------------------------------------------------------------------- bad input
def test_pattern_matching_nothing_is_refused(tmp_path):
    pattern = str(tmp_path / "missing" / "train-{000000..000009}.tar")
    dm = ShardDataModule(shards=pattern, ways=2, shots=1, queries=1, meta_batch_size=1, train_episodes=1)
    for step in (dm.prepare_data, lambda: dm.setup("fit")):
        with pytest.raises(ShardError) as info:
            step()
        msg = str(info.value)
        assert pattern in msg and "matched no .tar files" in msg and "check the path or pattern" in msg


def test_truncated_shard_is_refused_in_setup(glyph_copy):
    shard = glyph_copy / "glyphs-val-000000.tar"
    full = shard.stat().st_size
    os.truncate(shard, full - 1000)
    dm = _dm(glyph_copy)
    dm.prepare_data()  # only indexes; verification is setup's job
    with pytest.raises(ShardError) as info:
        dm.setup("fit")
    msg = str(info.value)
    assert "truncated" in msg and str(shard.resolve()) in msg and f"{full - 1000} bytes" in msg
    assert "re-create it" in msg


def test_corrupt_shard_is_refused_in_setup(glyph_copy):
    shard = glyph_copy / "glyphs-train-000000.tar"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.seek(size // 2)
        chunk = f.read(16)
        f.seek(size // 2)
        f.write(bytes(b ^ 0x5A for b in chunk))
    assert shard.stat().st_size == size
    with pytest.raises(ShardError) as info:
        _ready(_dm(glyph_copy))
    msg = str(info.value)
    assert "corrupt" in msg and "SHA-256" in msg and str(shard.resolve()) in msg
    assert "re-create the shard" in msg


def test_missing_shard_listed_in_index_is_refused(glyph_copy):
    gone = glyph_copy / "glyphs-test-000000.tar"
    gone.unlink()
    with pytest.raises(ShardError) as info:
        _ready(_dm(glyph_copy))
    msg = str(info.value)
    assert "missing" in msg and str(gone.resolve()) in msg and "index.json" in msg and "rebuild" in msg


def test_ways_larger_than_the_split_is_refused(glyphs):
    n_train, n_val = len(_split_ids(glyphs)["train"]), len(_split_ids(glyphs)["val"])
    with pytest.raises(MetaConfigError) as info:
        _ready(_dm(glyphs, ways=n_train + 1))
    msg = str(info.value)
    assert f"{n_train + 1}-way train episodes" in msg and f"has {n_train}" in msg and "lower ways" in msg
    with pytest.raises(MetaConfigError) as info:
        _ready(_dm(glyphs, ways=3, eval_ways=n_val + 1))
    msg = str(info.value)
    assert f"{n_val + 1}-way val episodes" in msg and f"has {n_val}" in msg and "lower eval_ways" in msg


def test_class_smaller_than_shots_plus_queries_is_refused(glyphs):
    with pytest.raises(MetaConfigError) as info:
        _ready(_dm(glyphs, shots=5, queries=DRAWINGS - 4))
    msg = str(info.value)
    assert f"has {DRAWINGS} examples" in msg
    assert f"shots + queries = 5 + {DRAWINGS - 4} = {DRAWINGS + 1}" in msg and "lower shots/queries" in msg
    _ready(_dm(glyphs, shots=5, queries=DRAWINGS - 5))  # exactly enough is fine


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"meta_batch_size": 0}, "meta_batch_size=0 must be >= 1"),
        ({"train_episodes": 3, "meta_batch_size": 4}, "train_episodes=3 is smaller than meta_batch_size=4"),
        ({"num_workers": -1}, "num_workers=-1 must be >= 0"),
        ({"eval_ways": 0}, "eval_ways=0 must be >= 1"),
        ({"verify": "md5"}, "verify='md5' is not supported"),
        ({"split_ratios": (0.5, 0.5, 0.5)}, r"split_ratios=\(0.5, 0.5, 0.5\) must be three"),
    ],
)
def test_bad_arguments_are_refused_at_construction(kwargs, message):
    with pytest.raises(MetaConfigError, match=message):
        ShardDataModule(shards="unused", **kwargs)


# --------------------------------------------------------------------------- third-party shards
def _check_thirdparty_episode(ep: Episode, ways: int, allowed: set[int]) -> None:
    ids = ep.classes.tolist()
    assert len(set(ids)) == ways and set(ids) <= allowed
    drawings: dict[int, list[int]] = {}
    for x, y in [*zip(ep.support_x, ep.support_y, strict=True), *zip(ep.query_x, ep.query_y, strict=True)]:
        cid, drawing = (x[0, 0, :2] * 255).round().long().tolist()  # labels baked into the pixels
        assert cid == ids[int(y)]
        drawings.setdefault(cid, []).append(drawing)
    assert all(len(d) == len(set(d)) for d in drawings.values())  # distinct examples per class


@pytest.mark.parametrize("spec", [THIRDPARTY_PATTERN, str(THIRDPARTY)], ids=["brace-pattern", "directory"])
def test_thirdparty_shards_are_indexed_cached_split_and_sampled(spec, _private_cache, monkeypatch):
    kw = dict(
        ways=2,
        shots=1,
        queries=2,
        eval_queries=2,
        split_ratios=(0.5, 0.25, 0.25),
        meta_batch_size=2,
        train_episodes=4,
        val_episodes=4,
        test_episodes=4,
    )
    dm = _ready(ShardDataModule(shards=spec, **kw), None)
    assert not (THIRDPARTY / "index.json").exists()  # the committed folder stays untouched
    cached = list((_private_cache / "indices").glob("*.json"))
    assert len(cached) == 1
    assert dm.split_sizes == {"train": 4, "val": 2, "test": 2}
    index = dm.sources["train"].reader.index
    ids = {s: {index.classes[p].id for p in dm.sources[s].class_positions} for s in ("train", "val", "test")}
    assert set().union(*ids.values()) == THIRDPARTY_IDS and sum(map(len, ids.values())) == 8  # disjoint
    for split, loader in (
        ("train", dm.train_dataloader()),
        ("val", dm.val_dataloader()),
        ("test", dm.test_dataloader()),
    ):
        for batch in loader:
            for ep in batch.tasks():
                assert ep.support_x.shape == (2, 1, 8, 8)
                _check_thirdparty_episode(ep, 2, ids[split])

    # a second load reuses the cached index: nothing is scanned again
    monkeypatch.setattr(shards_mod, "build_index", lambda *a, **k: pytest.fail("index rebuilt"))
    monkeypatch.setattr(shards_mod, "scan_tar", lambda *a, **k: pytest.fail("shards rescanned"))
    again = _ready(ShardDataModule(shards=spec, **kw), None)
    assert list((_private_cache / "indices").glob("*.json")) == cached
    assert {index.classes[p].id for p in again.sources["val"].class_positions} == ids["val"]
    _assert_same_batches(list(dm.val_dataloader()), list(again.val_dataloader()))


def test_thirdparty_default_split_too_small_for_the_ways_is_refused():
    # 8 classes with the default ratios (0.64, 0.16, 0.20): 5 / 1 / 2 classes
    dm = ShardDataModule(shards=THIRDPARTY_PATTERN, ways=2, shots=1, queries=1, meta_batch_size=1, train_episodes=1)
    with pytest.raises(MetaConfigError) as info:
        _ready(dm)
    msg = str(info.value)
    assert "2-way val episodes need 2 classes" in msg and "has 1" in msg and "lower eval_ways" in msg
    with pytest.raises(MetaConfigError, match=r"has 3 examples .* 1 \+ 3 = 4"):
        _ready(
            ShardDataModule(
                shards=THIRDPARTY_PATTERN,
                ways=2,
                shots=1,
                queries=3,
                meta_batch_size=1,
                train_episodes=1,
                split_ratios=(0.5, 0.25, 0.25),
            ),
            "fit",
        )


def test_truncated_thirdparty_shard_is_refused_in_prepare_data(tmp_path):
    folder = Path(shutil.copytree(THIRDPARTY, tmp_path / "tp"))
    shard = folder / "shard-000000.tar"
    _, off, _ = scan_tar(str(shard))[8]
    os.truncate(shard, off - 512)  # cut at a header boundary: tarfile alone would not notice
    with pytest.raises(ShardError, match=r"shard-000000\.tar is truncated"):
        ShardDataModule(shards=str(folder)).prepare_data()


# --------------------------------------------------------------------------- sinusoid
def _fit_sine(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``y = A sin(x - p)`` -> (A, p, max residual)."""
    design = np.stack([np.sin(x), -np.cos(x)], axis=1)  # A cos p, A sin p
    (c, s), *_ = np.linalg.lstsq(design, y, rcond=None)
    return math.hypot(c, s), math.atan2(s, c), float(np.abs(design @ np.array([c, s]) - y).max())


@pytest.mark.parametrize(
    ("amplitude", "phase", "x_range"),
    [((0.1, 5.0), (0.0, math.pi), (-5.0, 5.0)), ((1.0, 2.0), (0.5, 1.0), (0.0, 3.0))],
)
def test_sinusoid_tasks_follow_the_configured_family(amplitude, phase, x_range):
    dm = SinusoidDataModule(
        shots=5,
        queries=7,
        eval_shots=10,
        eval_queries=30,
        amplitude=amplitude,
        phase=phase,
        x_range=x_range,
        meta_batch_size=4,
        eval_meta_batch_size=5,
        train_episodes=40,
        val_episodes=10,
    )
    dm.setup("fit")
    train = list(dm.train_dataloader())
    assert len(train) == 10
    b = train[0]
    assert (b.support_x.shape, b.support_y.shape, b.query_x.shape, b.query_y.shape) == (
        (4, 5, 1),
        (4, 5, 1),
        (4, 7, 1),
        (4, 7, 1),
    )
    assert b.classes.shape == (4, 0) and b.support_x.dtype == torch.float32
    val = next(iter(dm.val_dataloader()))
    assert val.support_x.shape == (5, 10, 1) and val.query_x.shape == (5, 30, 1)
    amps, phases = [], []
    for batch in train:
        for ep in batch.tasks():
            x = torch.cat([ep.support_x, ep.query_x]).squeeze(1).double().numpy()
            y = torch.cat([ep.support_y, ep.query_y]).squeeze(1).double().numpy()
            assert x_range[0] <= x.min() and x.max() <= x_range[1]
            a, p, residual = _fit_sine(x, y)
            assert residual < 1e-4  # support and queries come from one and the same sine
            assert amplitude[0] - 1e-4 <= a <= amplitude[1] + 1e-4
            assert phase[0] - 1e-4 <= p <= phase[1] + 1e-4
            amps.append(a)
            phases.append(p)
    # the draws spread over the ranges rather than sitting at one value
    assert np.ptp(amps) > 0.5 * (amplitude[1] - amplitude[0])
    assert np.ptp(phases) > 0.5 * (phase[1] - phase[0])


def test_sinusoid_is_deterministic():
    def batches(seed: int) -> list[Episode]:
        dm = SinusoidDataModule(seed=seed, meta_batch_size=2, train_episodes=6)
        dm.setup("fit")
        return list(dm.train_dataloader())

    first = batches(3)
    _assert_same_batches(first, batches(3))
    assert not torch.equal(first[0].support_y, batches(4)[0].support_y)
    with pytest.raises(MetaConfigError, match=r"amplitude=\(5.0, 1.0\) must be a finite interval"):
        SinusoidDataModule(amplitude=(5.0, 1.0))


# --------------------------------------------------------------------------- resume
def _sinusoid(seed: int = 0) -> SinusoidDataModule:
    dm = SinusoidDataModule(seed=seed, meta_batch_size=4, train_episodes=20)  # 5 meta-batches per epoch
    dm.setup("fit")
    return dm


def _epoch(dm: EpisodicDataModule, epoch: int) -> tuple[list, list[Episode]]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader.sampler), list(loader)


def test_resume_continues_the_episode_stream_exactly():
    keys, batches = _epoch(_sinusoid(), 2)
    assert len(keys) == 5

    progress = SimpleNamespace(current=SimpleNamespace(processed=2, completed=2, started=3))  # mid-epoch 2
    batch_progress = SimpleNamespace(current=SimpleNamespace(processed=3))
    interrupted = _sinusoid()
    interrupted.trainer = SimpleNamespace(
        fit_loop=SimpleNamespace(epoch_progress=progress, epoch_loop=SimpleNamespace(batch_progress=batch_progress))
    )
    state = interrupted.state_dict()
    assert state == {"seed": 0, "meta_batch_size": 4, "epoch": 2, "batches": 3,
                     "train_shape": {"ways": 0, "shots": 10, "queries": 10, "train_episodes": 20}}

    resumed = _sinusoid()
    resumed.load_state_dict(state)
    tail_keys, tail = _epoch(resumed, 2)
    assert tail_keys == keys[3:]
    sampler = resumed.train_dataloader().sampler
    sampler.set_epoch(2)
    # len() stays the full epoch: Lightning adds the restored progress (3 consumed) to the 2 yielded
    assert len(sampler) == 5 and sampler.start_batch() == 3
    _assert_same_batches(tail, batches[3:])
    # the next epoch is whole again, and equals the uninterrupted run's
    next_keys, next_batches = _epoch(resumed, 3)
    ref_keys, ref_batches = _epoch(_sinusoid(), 3)
    assert next_keys == ref_keys and len(next_keys) == 5
    _assert_same_batches(next_batches, ref_batches)


def test_resume_at_an_epoch_boundary_and_without_progress():
    keys, _ = _epoch(_sinusoid(), 1)
    dm = _sinusoid()
    dm.load_state_dict({"seed": 0, "epoch": 1, "batches": 0})
    assert _epoch(dm, 1)[0] == keys
    dm = _sinusoid()
    dm.load_state_dict({"seed": 0, "epoch": 1, "batches": 5})  # the epoch was finished
    assert _epoch(dm, 1)[0] == []
    dm = _sinusoid()
    dm.load_state_dict(_sinusoid().state_dict())  # no trainer: no position, nothing skipped
    assert _epoch(dm, 1)[0] == keys


def test_resume_with_a_different_seed_is_refused():
    dm = _sinusoid(seed=0)
    with pytest.raises(MetaConfigError) as info:
        dm.load_state_dict({"seed": 1, "epoch": 0, "batches": 2})
    msg = str(info.value)
    assert "data seed 1" in msg and "seed=0" in msg and "resume with the same seed" in msg


def test_same_classes_in_two_splits_are_refused():
    # unlabelled shards given again as the test set: all their classes, training classes included
    dm = _dm(THIRDPARTY_PATTERN, test_shards=THIRDPARTY_PATTERN)
    with pytest.raises(MetaConfigError, match="both the train and the test split") as err:
        _ready(dm, "test")
    assert "unseen" in str(err.value) and "test_shards" in str(err.value)


def test_two_third_party_sets_with_the_same_class_ids_are_not_confused(tmp_path):
    """Scanned indices all live in one cache folder; classes are told apart by their shard files."""
    from lightning_meta.data.shards import ShardWriter

    for name, shift in (("a", 0), ("b", 100)):
        with ShardWriter(tmp_path / name, max_samples=1000) as w:
            for c in range(8):  # ids 0..7 in both sets, different images
                w.add_class(c, [np.full((6, 6), (c * 13 + m + shift) % 251, np.uint8) for m in range(4)], ext="npy")
        (tmp_path / name / "index.json").unlink()  # third-party shards: no index of their own
    dm = _dm(tmp_path / "a", val_shards=str(tmp_path / "b"), split_ratios=(0.75, 0.0, 0.25), verify="size",
             ways=2, queries=1, eval_queries=1)
    _ready(dm)  # accepted: B's classes 0..7 are other classes than A's 0..7
    assert len(dm.train_dataloader()) > 0 and len(dm.val_dataloader()) > 0


def test_split_names_outside_train_val_test_are_refused(glyph_copy):
    import json

    path = glyph_copy / "index.json"
    raw = json.loads(path.read_text())
    first = raw["classes"][0]
    first["split"] = "validation"  # a typo'd split: its classes would silently never be used
    path.write_text(json.dumps(raw))
    with pytest.raises(MetaConfigError, match="split='validation'") as err:
        _ready(_dm(glyph_copy))
    assert first["name"] in str(err.value) and "train, val or test" in str(err.value)


def test_an_epoch_that_is_not_a_whole_number_of_meta_batches_warns():
    with pytest.warns(UserWarning, match="runs 5 meta-batches \\(20 episodes\\) and never uses the last 2"):
        SinusoidDataModule(meta_batch_size=4, train_episodes=22)


def test_evaluation_lists_that_starve_a_process_or_are_uneven_under_zero3_are_refused():
    dm = SinusoidDataModule(meta_batch_size=4, train_episodes=8, val_episodes=1, test_episodes=5,
                            eval_meta_batch_size=2)
    dm.setup("fit")
    dm.setup("test")
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2, strategy=object())
    with pytest.raises(MetaConfigError, match="val_episodes=1 leaves 1 of the 2 processes without a val episode"):
        dm.val_dataloader()
    dm.test_dataloader()  # DDP: 5 episodes on 2 processes (3 + 2) is fine
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2, strategy=SimpleNamespace(zero_stage_3=True))
    with pytest.raises(MetaConfigError, match=r"gives \[2, 1\] steps; use a multiple of 4 \(e.g. test_episodes=8\)"):
        dm.test_dataloader()


def test_resume_with_another_training_episode_shape_is_refused():
    state = {"seed": 0, "meta_batch_size": 4, "epoch": 0, "batches": 2,
             "train_shape": {"ways": 0, "shots": 10, "queries": 10, "train_episodes": 20}}
    _sinusoid().load_state_dict(state)  # the same shape: accepted
    other = SinusoidDataModule(seed=0, meta_batch_size=4, train_episodes=20, shots=5)
    with pytest.raises(MetaConfigError, match="had shots=10 but this run has shots=5; resuming would continue"):
        other.load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "train_shape"}
    other.load_state_dict(legacy)  # checkpoints written before the shape was saved still load
