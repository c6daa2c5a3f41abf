"""The streaming reader, multi-source episodes and corrupt-sample handling (issue #3).

Fixture data: tiny class-grouped shards written with the project's ``ShardWriter`` into
``tmp_path``. Every image carries its identity in its pixels (pixel ``[0, 0]`` = class id,
``[0, 1]`` = member number), so a test can tell exactly which example an episode holds.
"""

from __future__ import annotations

import re
import stat
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_meta.algorithms import ProtoNet
from lightning_meta.data import streaming as streaming_mod
from lightning_meta.data.faults import CorruptSampleWarning, SampleCounter
from lightning_meta.data.shards import ShardWriter, load_index
from lightning_meta.data.streaming import (
    RECENT,
    load_stream_index,
    sibling_url,
    url_basename,
)
from lightning_meta.datamodules import ShardDataModule
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError, ShardError

SIDE = 6


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))


def _image(cid: int, member: int, side: int = SIDE) -> np.ndarray:
    img = np.full((side, side), 7, np.uint8)
    img[0, 0], img[0, 1] = cid, member
    img[1:, :] = (cid * 31 + member * 17) % 251  # some texture for the learners
    return img


def write_set(out: Path, first_id: int = 0, train: int = 10, val: int = 6, test: int = 6,
              sizes: tuple[int, int] = (8, 14), max_samples: int = 40, ext: str = "png", groups: int = 3,
              side: int = SIDE) -> Path:
    """Class ``first_id + c`` has ``sizes[0] + c % (sizes[1] - sizes[0] + 1)`` examples, in group ``g{c % groups}``."""
    span = sizes[1] - sizes[0] + 1
    with ShardWriter(out, max_samples=max_samples) as w:
        for c in range(train + val + test):
            split = "train" if c < train else ("val" if c < train + val else "test")
            n = sizes[0] + c % span
            cid = first_id + c
            w.add_class(cid, [_image(cid, m, side) for m in range(n)], name=f"c{cid}", split=split,
                        group=f"g{c % groups}", ext=ext)
    return out


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    return write_set(tmp_path_factory.mktemp("shards") / "s", ext="npy")  # npy: fast to decode


def _pipe(folder: Path) -> list[str]:
    return [f"pipe:cat {p}" for p in sorted(map(str, folder.glob("*.tar")))]


def ids_of(ep: Episode) -> list[tuple[int, int, str]]:
    """``(class id, member, 'S'|'Q')`` of every image of a single episode, read from its pixels."""
    out = []
    for xs, ys, tag in ((ep.support_x, ep.support_y, "S"), (ep.query_x, ep.query_y, "Q")):
        for x, y in zip(xs, ys, strict=True):
            cid, member = (x[0, 0, :2] * 255).round().long().tolist()
            assert cid == int(ep.classes[int(y)])
            out.append((cid, member, tag))
    return out


def _dm(spec, **kw) -> ShardDataModule:
    args = dict(ways=3, shots=2, queries=2, eval_queries=2, meta_batch_size=2, eval_meta_batch_size=2,
                train_episodes=8, val_episodes=6, test_episodes=6, verify="size", retry_delay=0.0)
    args.update(kw)
    return ShardDataModule(shards=spec, **args)


def _ready(dm: ShardDataModule, stage: str = "fit") -> ShardDataModule:
    dm.prepare_data()
    dm.setup(stage)
    return dm


def _same(a: Episode, b: Episode) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("support_x", "support_y", "query_x", "query_y",
                                                                    "classes"))


def _located(index) -> dict[int, list[tuple[str, int, int]]]:
    """Members of every class by shard file name (URL lists may order shards differently from the index)."""
    return {c.id: [(url_basename(index.shards[m[0]]), m[1], m[2]) for m in c.members] for c in index.classes}


def chi2_sf(stat_value: float, dof: int) -> float:
    """Survival function of the chi-square distribution (regularised upper incomplete gamma)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         torch.tensor(stat_value / 2.0, dtype=torch.float64)))


# --------------------------------------------------------------------------- URLs and the index
def test_url_helpers_find_the_shard_name_and_its_index():
    assert url_basename("pipe:cat /d/x/shard-train-000001.tar") == "shard-train-000001.tar"
    assert url_basename("https://h/a/b/s-000.tar?sig=1") == "s-000.tar"
    assert url_basename("/local/s-000.tar") == "s-000.tar"
    assert sibling_url("pipe:curl -s https://h/d/s-000.tar", "index.json") == "pipe:curl -s https://h/d/index.json"
    assert sibling_url("gs://bucket/d/s-000.tar", "index.json") == "gs://bucket/d/index.json"


def test_pipe_urls_find_the_index_and_match_the_local_index(shard_set):
    local = load_index(str(shard_set), verify="none")
    piped = load_stream_index(_pipe(shard_set))
    assert piped.path == f"pipe:cat {shard_set}/index.json"
    assert [c.id for c in piped.classes] == [c.id for c in local.classes]
    assert _located(piped) == _located(local)
    assert all(u.startswith("pipe:cat ") for u in piped.shards)


def test_shard_missing_from_the_index_is_refused(shard_set, tmp_path):
    extra = tmp_path / "extra-000000.tar"
    extra.write_bytes((shard_set / "shard-train-000000.tar").read_bytes())
    with pytest.raises(ShardError, match=r"extra-000000\.tar.*not listed in the index .*index\.json"):
        load_stream_index(f"pipe:cat {extra}", index=str(shard_set / "index.json"))


def test_unindexed_streamed_shards_are_scanned_once(shard_set, tmp_path, monkeypatch):
    for p in shard_set.glob("*.tar"):  # third-party shards: the tars without index.json
        (tmp_path / p.name).write_bytes(p.read_bytes())
    urls = _pipe(tmp_path)
    # no index.json to read: an error (a failed read must not become a random split), naming index="scan"
    with pytest.raises(ShardError, match=rf"no readable index beside the shards.*index='scan'.*the {len(urls)} shard"):
        load_stream_index(urls, retries=0, retry_delay=0.0)
    scanned = load_stream_index(urls, index="scan", retries=0, retry_delay=0.0)
    ref = load_index(str(shard_set), verify="none")
    assert _located(scanned) == _located(ref)
    assert scanned.shards == urls and all(c.split is None for c in scanned.classes)

    def no_scan(*args, **kwargs):
        raise AssertionError("scanned again")

    monkeypatch.setattr(streaming_mod, "_scan_stream", no_scan)
    again = load_stream_index(urls, index="scan", retries=0, retry_delay=0.0)  # cached
    assert _located(again) == _located(ref)


# --------------------------------------------------------------------------- streams
@pytest.mark.parametrize("transport", ["path", "pipe"])
def test_streaming_episodes_are_exact_and_never_repeat_an_example(shard_set, transport):
    spec = str(shard_set) if transport == "path" else _pipe(shard_set)
    # 4 + 3 examples of classes holding 8..14: most episodes wrap a class stream
    dm = _ready(_dm(spec, reader="streaming", ways=4, shots=4, queries=3, train_episodes=40))
    src = dm.sources["train"]
    index = src.reader.index
    train_ids = {c.id for c in index.split_classes("train")}
    for i in range(40):
        ep = src.episode("train", 1, i)
        assert ep.support_x.shape == (16, 1, SIDE, SIDE) and ep.query_x.shape == (12, 1, SIDE, SIDE)
        assert torch.equal(ep.support_y, torch.arange(4).repeat_interleave(4))
        seen = ids_of(ep)
        assert {c for c, _, _ in seen} <= train_ids
        assert len({(c, m) for c, m, _ in seen}) == len(seen), f"episode {i} repeats an example"


def test_streams_are_shuffled_passes_with_flush_on_wrap(shard_set):
    dm = _ready(_dm(str(shard_set), reader="streaming", ways=4, shots=3, queries=2, train_episodes=60,
                    stream_buffer=4))
    src = dm.sources["train"]
    counts = {src.reader.index.classes[p].id: src.reader.index.classes[p].count for p in src.class_positions}
    passes: dict[tuple[int, int], list[int]] = {}
    for i in range(60):
        ep = src.episode("train", 0, i)
        _, where = src.ranges("train", 0, i)
        for (_local, p, start), cid in zip(where, ep.classes.tolist(), strict=True):
            members = [m for c, m, _ in ids_of(ep) if c == cid]
            got = passes.setdefault((cid, p), [])
            assert start == len(got)  # each episode continues its class stream where the last one stopped
            got += members
    last = {}
    for cid, p in passes:
        last[cid] = max(p, last.get(cid, -1))
    for (cid, p), members in passes.items():
        assert len(members) == len(set(members)) <= counts[cid]  # a pass never repeats an example
        if p < last[cid]:
            assert counts[cid] - len(members) < 5  # flushed only when the next episode did not fit
    for cid in last:
        starts = {tuple(m[:5]) for (c, _), m in passes.items() if c == cid and len(m) >= 5}
        assert len(starts) > 1 or last[cid] == 0  # every pass is shuffled anew
    firsts = [m[:5] for m in passes.values() if len(m) >= 5]
    assert any(f != sorted(f) for f in firsts)


def test_streaming_episodes_are_a_pure_function_of_the_key(shard_set):
    a = _ready(_dm(str(shard_set), reader="streaming")).sources["train"]
    b = _ready(_dm(_pipe(shard_set), reader="streaming")).sources["train"]
    ref = [a.episode("train", 2, i) for i in range(8)]
    b.episode("train", 0, 3)  # other history
    assert _same(b.episode("train", 2, 5), ref[5])  # jumps forward without decoding what it skips
    assert _same(b.episode("train", 2, 2), ref[2])  # and back
    assert not _same(a.episode("train", 3, 5), ref[5])


def test_streaming_and_indexed_choose_the_same_classes_and_frequencies(shard_set):
    n = 400
    kw = dict(ways=3, shots=2, queries=2, train_episodes=n)
    streaming = _ready(_dm(str(shard_set), reader="streaming", **kw)).sources["train"]
    indexed = _ready(_dm(str(shard_set), **kw)).sources["train"]
    other_seed = _ready(_dm(str(shard_set), seed=1, **kw)).sources["train"]
    s_eps = [streaming.episode("train", 0, i) for i in range(n)]
    i_eps = [indexed.episode("train", 0, i) for i in range(n)]
    o_eps = [other_seed.episode("train", 0, i) for i in range(n)]
    # same plan: the same classes, episode by episode
    assert all(torch.equal(s.classes, i.classes) for s, i in zip(s_eps, i_eps, strict=True))
    # class frequencies against an independent draw (another seed): chi-square test of homogeneity
    s_cls = Counter(c for e in s_eps for c in e.classes.tolist())
    o_cls = Counter(c for e in o_eps for c in e.classes.tolist())
    classes = sorted(s_cls)
    table = np.array([[s_cls[c] for c in classes], [o_cls[c] for c in classes]], dtype=float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    assert chi2_sf(float(((table - expected) ** 2 / expected).sum()), len(classes) - 1) > 1e-3
    # and uniform over the 10 training classes
    assert chi2_sf(float(((table[0] - n * 3 / 10) ** 2 / (n * 3 / 10)).sum()), len(classes) - 1) > 1e-3
    # example frequencies inside each class: streaming agrees with the indexed reader's uniform draws
    s_ex = Counter((c, m) for e in s_eps for c, m, _ in ids_of(e))
    i_ex = Counter((c, m) for e in i_eps for c, m, _ in ids_of(e))
    keys = sorted(set(s_ex) | set(i_ex))
    table = np.array([[s_ex[k] for k in keys], [i_ex[k] for k in keys]], dtype=float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    assert chi2_sf(float(((table - expected) ** 2 / expected).sum()), len(keys) - 1) > 1e-3
    # every example is used, and passes make streaming more even than independent draws
    assert set(s_ex) == set(i_ex) == {(c.id, m) for c in streaming.reader.index.split_classes("train")
                                      for m in range(c.count)}
    spread = {name: sum(np.var([ex[(c, m)] for m in range(20) if (c, m) in ex]) for c in classes)
              for name, ex in (("streaming", s_ex), ("indexed", i_ex))}
    assert spread["streaming"] < 0.5 * spread["indexed"]


def test_streaming_memory_is_bounded(shard_set):
    dm = _ready(_dm(str(shard_set), reader="streaming", ways=5, shots=2, queries=2, stream_buffer=3,
                    max_open_streams=2, train_episodes=30))
    src = dm.sources["train"]
    most = 0
    for i in range(30):
        ep = src.episode("train", 0, i)
        assert len({(c, m) for c, m, _ in ids_of(ep)}) == 20
        assert src.reader.open_streams <= 2
        most = max(most, src.reader.buffered_samples)
    assert 0 < most <= 2 * (3 + RECENT)


def test_classes_that_fit_the_buffer_are_read_once(shard_set):
    kw = dict(reader="streaming", ways=4, shots=3, queries=2, train_episodes=40)
    cached = _ready(_dm(_pipe(shard_set), stream_buffer=16, **kw)).sources["train"]  # classes hold <= 14
    evicting = _ready(_dm(_pipe(shard_set), stream_buffer=16, max_open_streams=1, **kw)).sources["train"]
    for i in range(40):
        assert _same(cached.episode("train", 0, i), evicting.episode("train", 0, i))
    classes = len(cached.class_positions)
    assert cached.reader.passes_opened > 2 * classes  # many passes ...
    assert cached.reader.shard_opens <= classes  # ... but each class was streamed from its shard once
    assert evicting.reader.shard_opens > 2 * classes  # without the cache every pass reopens the shard


def test_streaming_episodes_do_not_depend_on_workers_or_ranks(shard_set):
    spec = str(shard_set)
    runs = {}
    for workers in (0, 2):
        dm = _ready(_dm(spec, reader="streaming", num_workers=workers, meta_batch_size=4, train_episodes=16))
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(1)
        runs[workers] = list(loader)
        del loader
    assert len(runs[0]) == 4
    assert all(_same(a, b) for a, b in zip(runs[0], runs[2], strict=True))
    halves = []
    for r in range(2):
        dm = _dm(spec, reader="streaming", meta_batch_size=4, train_episodes=16)
        dm.trainer = SimpleNamespace(global_rank=r, world_size=2)
        loader = _ready(dm).train_dataloader()
        loader.sampler.set_epoch(1)
        halves.append(list(loader))
    for step, whole in enumerate(runs[0]):
        joined = torch.cat([halves[0][step].support_x, halves[1][step].support_x])
        assert torch.equal(joined, whole.support_x)


# --------------------------------------------------------------------------- remote faults
def _flaky(tmp_path: Path, fail_times: int) -> Path:
    script = tmp_path / "flaky.sh"
    script.write_text('#!/bin/sh\n# fails the first N calls (N in $1.left), then cats the shard $2\n'
                      'n=$(cat "$1"); if [ "$n" -gt 0 ]; then echo $((n - 1)) > "$1"; exit 3; fi\ncat "$2"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    (tmp_path / "left").write_text(str(fail_times))
    return script


@pytest.mark.parametrize("fail_times", [2, 9])
def test_failing_remote_shard_is_retried_then_named(shard_set, tmp_path, fail_times):
    script = _flaky(tmp_path, fail_times)
    urls = [f"pipe:{script} {tmp_path / 'left'} {p}" for p in sorted(map(str, shard_set.glob("shard-train-*.tar")))]
    dm = _ready(_dm(urls, reader="streaming", index=str(shard_set / "index.json"), retries=3, val_shards=str(shard_set),
                    test_shards=str(shard_set)))
    src = dm.sources["train"]
    if fail_times <= 3:
        ep = src.episode("train", 0, 0)  # two failures, then the third try works
        assert ep.support_x.shape[0] == 6 and (tmp_path / "left").read_text().strip() == "0"
        return
    with pytest.raises(ShardError) as info:
        src.episode("train", 0, 0)
    msg = str(info.value)
    assert "cannot read shard pipe:" in msg and "shard-train-00000" in msg and "failed 4 time(s) (retries=3)" in msg
    assert re.search(r"exit(ed with status)? 3", msg)  # the cause: the command's exit status


def test_unreachable_index_is_named(tmp_path):
    with pytest.raises(ShardError, match=r"cannot read pipe:cat /nonexistent/index\.json: failed 2 time"):
        load_stream_index("pipe:cat /nonexistent/s-000.tar", index="pipe:cat /nonexistent/index.json", retries=1,
                          retry_delay=0.0)
    dm = _dm("unknownscheme://x/s-{000..001}.tar", reader="streaming", retries=0)
    with pytest.raises(ShardError, match=r"no readable index beside the shards: cannot .*unknownscheme://x/index\.json"):
        dm.prepare_data()
    dm = _dm("unknownscheme://x/s-{000..001}.tar", reader="streaming", retries=0, index="scan")
    with pytest.raises(ShardError) as info:
        dm.prepare_data()
    assert "cannot open unknownscheme://x/s-000.tar" in str(info.value) and "pipe:" in str(info.value)


def test_index_that_does_not_match_a_streamed_shard_is_refused(shard_set, tmp_path):
    other = write_set(tmp_path / "o", sizes=(9, 15))  # same names, different member offsets
    urls = _pipe(other)
    dm = _ready(_dm(urls, reader="streaming", index=str(shard_set / "index.json")))
    with pytest.raises(ShardError, match="index is out of date|ended before the member"):
        for i in range(8):
            dm.sources["train"].episode("train", 0, i)


# --------------------------------------------------------------------------- corrupt samples
def _corrupt(folder: Path, class_id: int, member: int) -> None:
    """Garbles one image in place (same size, so the shard still passes verify='size')."""
    index = load_index(str(folder), verify="none")
    entry = next(c for c in index.classes if c.id == class_id)
    shard, off, size = entry.members[member]
    with open(index.shards[shard], "r+b") as f:
        f.seek(off)
        f.write(b"\x89PNG garbage " * (size // 13) + b"x" * (size % 13))


@pytest.mark.parametrize("reader", ["indexed", "streaming"])
def test_corrupt_sample_is_skipped_counted_and_replaced(tmp_path, reader):
    folder = write_set(tmp_path / "s", train=5, val=5, test=5)
    _corrupt(folder, 2, 3)
    dm = _ready(_dm(str(folder), reader=reader, ways=5, shots=3, queries=3, max_corrupt_fraction=0.5), "train")
    src = dm.sources["train"]
    with pytest.warns(CorruptSampleWarning, match=r"skipping corrupt sample .*class 'c2'"):
        eps = [src.episode("train", 0, i) for i in range(6)]
    for ep in eps:
        seen = ids_of(ep)
        assert len(seen) == 30 and len(set((c, m) for c, m, _ in seen)) == 30  # full shape, no repeats
        assert (2, 3) not in {(c, m) for c, m, _ in seen}
    read, skipped = dm.skipped_samples()
    assert skipped >= 1 and read == 6 * 30 + skipped
    # the replacement is a pure function of the key: the same episodes again
    again = _ready(_dm(str(folder), reader=reader, ways=5, shots=3, queries=3, max_corrupt_fraction=0.5), "train")
    with pytest.warns(CorruptSampleWarning):
        assert all(_same(again.sources["train"].episode("train", 0, i), eps[i]) for i in range(6))


@pytest.mark.parametrize("reader", ["indexed", "streaming"])
def test_too_many_corrupt_samples_stop_the_run(tmp_path, reader):
    folder = write_set(tmp_path / "s", train=5, val=5, test=5)
    _corrupt(folder, 1, 0)
    dm = _ready(_dm(str(folder), reader=reader, ways=5, shots=3, queries=3, max_corrupt_fraction=0.0), "train")
    with pytest.warns(CorruptSampleWarning), pytest.raises(ShardError) as info:
        for i in range(6):
            dm.sources["train"].episode("train", 0, i)
    msg = str(info.value)
    assert "1 corrupt sample(s) skipped" in msg and "max_corrupt_fraction=0.0" in msg and "re-create them" in msg


def test_counter_threshold_counts_over_a_floor():
    c = SampleCounter(max_fraction=0.02)
    c.read(50)
    with pytest.warns(CorruptSampleWarning):
        c.skip("a", ValueError("bad"))
        c.skip("b", ValueError("bad"))  # 2 <= 0.02 * max(50, 100)
    with pytest.warns(CorruptSampleWarning), pytest.raises(ShardError, match="3 corrupt sample"):
        c.skip("c", ValueError("bad"))
    assert c.totals() == (50, 3)


class _Recorder(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, tuple]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        key = tuple(sorted((c, m) for i in range(batch.num_tasks) for c, m, _ in ids_of(batch.task(i))))
        self.seen.append((trainer.global_step, key))


def _model() -> ProtoNet:
    torch.manual_seed(0)
    return ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(SIDE * SIDE, 16)), lr=1e-2)


def _fit(root: Path, dm: ShardDataModule, max_steps: int, ckpt_path: str | None = None, every: int | None = None):
    model = _model()
    rec = _Recorder()
    callbacks: list[Callback] = [rec]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{step}"))
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=callbacks, enable_checkpointing=bool(every),
                        default_root_dir=root)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return rec.seen, model, trainer


def test_skipped_samples_are_logged_during_training(tmp_path):
    folder = write_set(tmp_path / "s", train=5, val=5, test=5)
    _corrupt(folder, 0, 0)
    _corrupt(folder, 3, 1)
    dm = _dm(str(folder), ways=5, shots=4, queries=3, meta_batch_size=1, train_episodes=6, max_corrupt_fraction=0.5)
    with pytest.warns(CorruptSampleWarning):
        _, _, trainer = _fit(tmp_path, dm, max_steps=6)
    assert float(trainer.callback_metrics["data/skipped_samples"]) >= 2
    assert 0 < float(trainer.callback_metrics["data/skipped_fraction"]) < 0.5


# --------------------------------------------------------------------------- resume
@pytest.mark.parametrize(("shape", "stop"), [("fixed", 3), ("fixed", 5), ("variable", 6)])
def test_streaming_resume_continues_the_identical_episodes(shard_set, tmp_path, shape, stop):
    # 4 meta-batches per epoch: stops 3 and 5 are mid-epoch (the second one in epoch 1)
    def dm():
        kw = dict(meta_batch_size=1, eval_meta_batch_size=1, train_episodes=4) if shape == "variable" else \
            dict(meta_batch_size=2, train_episodes=8)
        return _dm(_pipe(shard_set), reader="streaming", episode_shape=shape, min_ways=3, max_ways=6, **kw)

    full, full_model, _ = _fit(tmp_path / "full", dm(), max_steps=10)
    first, _, _ = _fit(tmp_path / "a", dm(), max_steps=stop, every=stop)
    ckpt = tmp_path / "a" / f"step={stop}.ckpt"
    state = torch.load(ckpt, weights_only=False)["ShardDataModule"]
    assert state["reader"] == "streaming" and state["epoch"] * 4 + state["batches"] == stop
    second, resumed_model, _ = _fit(tmp_path / "b", dm(), max_steps=10, ckpt_path=str(ckpt))
    assert first == full[:stop]
    assert [k for _, k in second] == [k for _, k in full[stop:]]
    epoch_start = stop - stop % 4
    consumed = {k for _, k in first[epoch_start:]}
    assert not consumed & {k for _, k in second[: 4 - stop % 4]}  # nothing of the epoch is served twice
    for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resume_with_another_reader_is_refused(shard_set):
    dm = _dm(str(shard_set), reader="indexed")
    with pytest.raises(MetaConfigError, match="reader='streaming' but reader='indexed'"):
        dm.load_state_dict({"seed": 0, "meta_batch_size": 2, "epoch": 0, "batches": 1, "reader": "streaming"})


# --------------------------------------------------------------------------- multi-source
def test_multi_source_picks_one_source_per_episode_uniformly(tmp_path):
    a = write_set(tmp_path / "a", first_id=0, ext="npy")
    b = write_set(tmp_path / "b", first_id=100, ext="npy")
    n = 400
    for reader in ("indexed", "streaming"):
        srcs = [str(a), str(b)]
        dm = ShardDataModule(sources=srcs, reader=reader, ways=3, shots=2, queries=2, eval_queries=2,
                             meta_batch_size=1, train_episodes=n, verify="size")
        _ready(dm)
        mix = dm.sources["train"]
        eps = [mix.episode("train", 0, i) for i in range(n)]
        from_b = [bool((e.classes >= 100).all()) for e in eps]
        assert all(bool((e.classes < 100).all()) or fb for e, fb in zip(eps, from_b, strict=True))  # one source each
        assert abs(sum(from_b) / n - 0.5) < 4 * 0.5 / np.sqrt(n)  # uniform (4 sigma)
        assert [mix.source_of("train", 0, i) for i in range(n)] == [int(f) for f in from_b]
        for i in range(0, 40, 7):  # each episode is what its source makes for that key
            assert _same(eps[i], mix.sources[int(from_b[i])].episode("train", 0, i))
        for e in eps[:200]:
            seen = ids_of(e)
            assert len({(c, m) for c, m, _ in seen}) == len(seen)
        assert dm.split_sizes == {"train": 20, "val": 12, "test": 12}
        if reader == "indexed":
            first = eps
        else:
            assert [e.classes.tolist() for e in eps] == [e.classes.tolist() for e in first]


def test_multi_source_refuses_mismatched_images_and_shards_with_sources(tmp_path):
    a = write_set(tmp_path / "a")
    b = write_set(tmp_path / "b", first_id=100, side=8)
    with pytest.raises(MetaConfigError, match=r"images of different shapes .*\[1, 6, 6\].*\[1, 8, 8\]"):
        _ready(ShardDataModule(sources=[str(a), str(b)], ways=3, shots=1, queries=1, eval_queries=1, verify="size"))
    with pytest.raises(MetaConfigError, match="both shards and sources are set"):
        ShardDataModule(shards=str(a), sources=[str(b)])


# --------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reader": "webdataset"}, "reader='webdataset' is not supported"),
        ({"episode_shape": "ragged"}, "episode_shape='ragged' is not supported"),
        ({"hierarchy": "tree"}, "hierarchy='tree' is not supported"),
        ({"index": "x/index.json"}, "applies to reader='streaming' only"),
        ({"episode_shape": "variable"}, "eval_meta_batch_size=1"),
        ({"episode_shape": "variable", "eval_meta_batch_size": 1, "max_ways": 3}, "max_ways=3 is smaller than"),
        ({"reader": "streaming", "stream_buffer": 0}, "stream_buffer=0 must be >= 1"),
        ({"reader": "streaming", "retries": -1}, "retries=-1 must be >= 0"),
        ({"max_corrupt_fraction": 1.5}, r"max_corrupt_fraction=1.5 must be in \[0, 1\]"),
        ({"sources": []}, "must be a non-empty list"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    shards = None if "sources" in kwargs else "unused"
    with pytest.raises(MetaConfigError, match=message):
        ShardDataModule(shards=shards, **kwargs)
