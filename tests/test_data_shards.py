"""Shards, indices, the indexed reader, episode sampling and the embedded glyph generator.

Fixture data: shards written by ``ShardWriter`` into temporary folders, small glyph sets made by
``generate_glyphs``, and the committed third-party shards in ``tests/data/thirdparty`` (made by
``tests/data/make_thirdparty_shards.py``). The cache folder is always a temporary one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_meta.data import shards as shards_mod
from lightning_meta.data.convert import convert_imagefolder
from lightning_meta.data.glyphs import generate_glyphs
from lightning_meta.data.sampling import FixedShape, episode_rng, sample_fixed
from lightning_meta.data.shards import (
    INDEX_NAME,
    IndexedReader,
    ShardWriter,
    atomic_write_bytes,
    build_index,
    load_index,
    resolve_shards,
    scan_tar,
    verify_index,
)
from lightning_meta.errors import MetaConfigError, ShardError

THIRDPARTY = Path(__file__).parent / "data" / "thirdparty"
THIRDPARTY_IDS = [3 + 7 * k for k in range(8)]  # see tests/data/make_thirdparty_shards.py


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Never touch the user's cache: every test gets its own LIGHTNING_META_CACHE."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(cache))
    return cache


def _images(seed: int, n: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for _ in range(n)]


# class id -> (images, split, ext); images are non-square so that H/W mix-ups show
CLASSES = {
    10: (_images(0, 4, (6, 5)), "train", "png"),
    11: (_images(1, 3, (6, 5)), "train", "png"),
    12: (_images(2, 3, (6, 5)), "train", "png"),
    20: (_images(3, 2, (4, 3, 3)), "val", "npy"),
    21: (_images(4, 3, (6, 5, 3)), "test", "png"),
}


def _write(out: Path, max_samples: int = 5) -> Path:
    with ShardWriter(out, prefix="t", max_samples=max_samples, meta={"origin": "unit test"}) as w:
        for cid, (imgs, split, ext) in CLASSES.items():
            w.add_class(cid, imgs, name=f"class{cid}", split=split, group=f"g{cid // 10}", ext=ext)
    return out


def _tar_labels(path: Path) -> list[tuple[str, int]]:
    """``(key, class id)`` of every sample of a tar, in member order."""
    out = []
    with tarfile.open(path) as tar:
        for m in tar:
            if m.name.endswith(".cls"):
                out.append((m.name[: -len(".cls")], int(tar.extractfile(m).read().decode())))
    return out


@pytest.fixture
def written(tmp_path) -> Path:
    return _write(tmp_path / "written")


# --------------------------------------------------------------------------- writer
def test_writer_groups_classes_into_shards_and_writes_index(written):
    names = sorted(p.name for p in written.iterdir())
    # class 12 does not fit the first train shard (max_samples=5 reached): a new shard, never a split class
    assert names == ["index.json", "t-test-000000.tar", "t-train-000000.tar", "t-train-000001.tar", "t-val-000000.tar"]
    shard_of: dict[int, str] = {}
    for tar in written.glob("*.tar"):
        labels = [c for _, c in _tar_labels(tar)]
        # grouped by class: each class is one contiguous run, and lives in exactly one shard
        runs = [c for i, c in enumerate(labels) if i == 0 or labels[i - 1] != c]
        assert len(runs) == len(set(runs))
        for c in runs:
            assert c not in shard_of, f"class {c} straddles {shard_of.get(c)} and {tar.name}"
            shard_of[c] = tar.name
            assert labels.count(c) == len(CLASSES[c][0])
    assert shard_of == {
        10: "t-train-000000.tar",
        11: "t-train-000000.tar",
        12: "t-train-000001.tar",
        20: "t-val-000000.tar",
        21: "t-test-000000.tar",
    }
    raw = json.loads((written / INDEX_NAME).read_text())
    assert raw["meta"] == {"origin": "unit test"}
    # shard paths are relative, so the folder can be moved
    assert all(not os.path.isabs(s["path"]) for s in raw["shards"])
    for s in raw["shards"]:
        p = written / s["path"]
        assert s["size"] == p.stat().st_size
        assert s["sha256"] == hashlib.sha256(p.read_bytes()).hexdigest()


def test_writer_members_follow_webdataset_convention(written):
    with tarfile.open(written / "t-val-000000.tar") as tar:
        names = tar.getnames()
        assert names == ["0000020_00000.npy", "0000020_00000.cls", "0000020_00001.npy", "0000020_00001.cls"]
        assert tar.extractfile("0000020_00001.cls").read() == b"20"


def test_indexed_reader_returns_the_written_pixels(written):
    index = load_index(written)
    assert [c.id for c in index.classes] == sorted(CLASSES)
    reader = IndexedReader(index)
    inverted = IndexedReader(index, invert=True)
    for pos, entry in enumerate(index.classes):
        imgs, split, ext = CLASSES[entry.id]
        assert (entry.name, entry.split, entry.group, entry.ext, entry.count) == (
            f"class{entry.id}",
            split,
            f"g{entry.id // 10}",
            ext,
            len(imgs),
        )
        for m, img in enumerate(imgs):
            chw = torch.from_numpy(img).unsqueeze(0) if img.ndim == 2 else torch.from_numpy(img).permute(2, 0, 1)
            got = reader.image(pos, m)
            assert got.dtype == torch.float32
            assert torch.equal(got, chw.float() / 255.0), (entry.id, m)
            assert torch.equal(inverted.image(pos, m), (255 - chw).float() / 255.0)
    # the folder can be moved: paths are resolved relative to index.json
    moved = written.parent / "moved"
    written.rename(moved)
    again = IndexedReader(load_index(moved))
    assert torch.equal(again.image(0, 0), reader.image(0, 0))


def test_indexed_reader_cache_is_bounded(written):
    index = load_index(written)
    one = 6 * 5 * 4  # bytes of one decoded [1, 6, 5] float32 image
    reader = IndexedReader(index, cache_mb=2.5 * one / 2**20)
    for m in range(4):
        reader.image(0, m)
        assert reader._cached_bytes <= reader.cache_bytes
    assert len(reader._cache) == 2
    # pickling (for spawned workers) drops open files and the cache
    import pickle

    clone = pickle.loads(pickle.dumps(reader))
    assert clone._files == {} and len(clone._cache) == 0
    assert torch.equal(clone.image(0, 3), reader.image(0, 3))


def test_aborted_writer_leaves_no_shard_set(tmp_path):
    out = tmp_path / "aborted"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(out, prefix="t", max_samples=5) as w:
            w.add_class(0, _images(0, 3, (6, 5)), split="train")
            raise RuntimeError("boom")
    assert list(out.iterdir()) == []  # not even the temporary file of the open shard


def test_aborted_writer_removes_completed_shards_too(tmp_path):
    out = tmp_path / "aborted"
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(out, prefix="t", max_samples=5) as w:
            w.add_class(0, _images(0, 3, (6, 5)), split="train")
            w.add_class(1, _images(1, 3, (6, 5)), split="val")  # closes (completes) the train shard
            raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == []
    # nothing left that could be mistaken for a (third-party) shard set
    with pytest.raises(ShardError, match="matched no .tar files"):
        load_index(out)


def test_writer_refuses_bad_calls(tmp_path):
    with pytest.raises(ValueError, match="max_samples=0"):
        ShardWriter(tmp_path / "a", max_samples=0)
    w = ShardWriter(tmp_path / "b")
    with pytest.raises(ValueError, match="no class was added"):
        w.close()
    w.add_class(1, _images(0, 2, (4, 4)))
    with pytest.raises(ValueError, match="class id 1 was already written"):
        w.add_class(1, _images(1, 2, (4, 4)))
    w.close()
    assert (tmp_path / "b" / INDEX_NAME).exists()


# --------------------------------------------------------------------------- resolve
def test_resolve_shards_accepts_patterns_dirs_globs_and_lists(written):
    expected = [str((written / n).resolve()) for n in ("t-train-000000.tar", "t-train-000001.tar")]
    assert resolve_shards(str(written / "t-train-{000000..000001}.tar")) == expected
    assert resolve_shards(str(written / "t-train-*.tar")) == expected
    assert resolve_shards([str(written / "t-train-000000.tar"), str(written / "t-train-000001.tar")]) == expected
    assert len(resolve_shards(written)) == 4


def test_pattern_matching_nothing_is_refused_with_the_pattern_and_fix(tmp_path):
    pattern = str(tmp_path / "nowhere" / "train-{000000..000003}.tar")
    with pytest.raises(ShardError) as info:
        resolve_shards(pattern)
    msg = str(info.value)
    assert pattern in msg and "matched no .tar files" in msg and "brace patterns" in msg
    assert isinstance(info.value, MetaConfigError)
    with pytest.raises(ShardError, match="matched no .tar files"):
        load_index(str(tmp_path))  # an empty folder


def test_pattern_naming_a_missing_shard_is_refused(tmp_path):
    folder = tmp_path / "tp"
    shutil.copytree(THIRDPARTY, folder)
    pattern = str(folder / "shard-{000000..000002}.tar")  # 000002 does not exist
    with pytest.raises(ShardError, match=r"shard-000002\.tar does not exist"):
        resolve_shards(pattern)


# --------------------------------------------------------------------------- third-party
def test_scan_tar_offsets_point_at_member_bytes():
    path = THIRDPARTY / "shard-000000.tar"
    entries = scan_tar(str(path))
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert [e[0] for e in entries] == names
        for name, off, size in entries:
            assert data[off : off + size] == tar.extractfile(name).read()


def test_build_index_of_thirdparty_shards():
    paths = resolve_shards(str(THIRDPARTY / "shard-{000000..000001}.tar"))
    index = build_index(paths, class_meta={3: {"name": "three", "split": "train"}})
    assert [c.id for c in index.classes] == THIRDPARTY_IDS
    assert all(c.count == 3 and c.ext == "png" for c in index.classes)
    assert index.classes[0].name == "three" and index.classes[0].split == "train"
    assert index.classes[1].name == "10" and index.classes[1].split is None
    # the set is shuffled: classes are spread over both shards
    assert {m[0] for c in index.classes for m in c.members} == {0, 1}
    reader = IndexedReader(index)
    for pos, c in enumerate(index.classes):
        drawings = set()
        for m in range(c.count):
            px = (reader.image(pos, m)[0, 0, :2] * 255).round().long().tolist()
            assert px[0] == c.id
            drawings.add(px[1])
        assert drawings == {0, 1, 2}


def test_build_index_refuses_samples_without_class(tmp_path):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        info = tarfile.TarInfo("a.png")
        info.size = 3
        import io

        tar.addfile(info, io.BytesIO(b"xyz"))
    with pytest.raises(ShardError, match=r"'a'.*has no \.cls member"):
        build_index([str(bad)])


def test_thirdparty_index_is_built_once_and_cached(tmp_path, _private_cache, monkeypatch):
    folder = tmp_path / "tp"
    shutil.copytree(THIRDPARTY, folder)
    index = load_index(str(folder / "shard-{000000..000001}.tar"))
    assert not (folder / INDEX_NAME).exists()  # never writes beside third-party shards
    cached = list((_private_cache / "indices").glob("*.json"))
    assert len(cached) == 1
    assert [c.id for c in index.classes] == THIRDPARTY_IDS

    calls = []
    real = shards_mod.build_index
    monkeypatch.setattr(shards_mod, "build_index", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = load_index(folder)  # the directory resolves to the same shards: same cache entry
    assert calls == []
    assert [(c.id, c.members) for c in again.classes] == [(c.id, c.members) for c in index.classes]

    # a changed shard (new mtime) is re-indexed, not served from a stale cache entry
    st = os.stat(folder / "shard-000001.tar")
    os.utime(folder / "shard-000001.tar", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_index(folder)
    assert calls == [1]
    assert len(list((_private_cache / "indices").glob("*.json"))) == 2


def _truncate(path: Path, size: int) -> None:
    os.truncate(path, size)


@pytest.mark.parametrize("where", ["header", "mid-header", "data"])
def test_truncated_thirdparty_shard_is_refused(tmp_path, where):
    folder = tmp_path / "tp"
    shutil.copytree(THIRDPARTY, folder)
    shard = folder / "shard-000000.tar"
    entries = scan_tar(str(shard))
    _, off, size = entries[10]
    header = off - 512  # start of member 10's header (a block boundary)
    cut = {"header": header, "mid-header": header + 100, "data": off + size // 2 if size > 1 else off}[where]
    _truncate(shard, cut)
    with pytest.raises(ShardError) as info:
        load_index(folder)
    msg = str(info.value)
    assert "truncated" in msg and str(shard) in msg and "re-create" in msg


def test_thirdparty_shard_with_a_garbled_header_is_refused(tmp_path):
    folder = tmp_path / "tp"
    shutil.copytree(THIRDPARTY, folder)
    shard = folder / "shard-000001.tar"
    _, off, _ = scan_tar(str(shard))[6]
    data = bytearray(shard.read_bytes())
    data[off - 512 : off - 412] = b"\x7f" * 100  # same size; tarfile would just stop listing here
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard-000001\.tar is corrupt: unreadable tar header at byte"):
        load_index(folder)


# --------------------------------------------------------------------------- verification
def test_truncated_shard_is_refused(written):
    shard = written / "t-train-000001.tar"
    full = shard.stat().st_size
    _truncate(shard, full - 1500)
    with pytest.raises(ShardError) as info:
        load_index(written)
    msg = str(info.value)
    assert "truncated" in msg and str(shard.resolve()) in msg
    assert f"{full - 1500} bytes" in msg and str(full) in msg
    assert "re-create it" in msg and "lightning-meta index" in msg


def test_corrupt_shard_is_refused(written):
    shard = written / "t-train-000000.tar"
    entries = scan_tar(str(shard))
    name, off, size = next(e for e in entries if e[0].endswith(".png"))
    data = bytearray(shard.read_bytes())
    for i in range(off + size // 2, off + size // 2 + 4):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    # the size still matches: only the checksum can tell
    assert load_index(written, verify="size").classes
    with pytest.raises(ShardError) as info:
        load_index(written)
    msg = str(info.value)
    assert "corrupt" in msg and "SHA-256" in msg and str(shard.resolve()) in msg
    assert "re-create the shard" in msg and "lightning-meta index" in msg


def test_missing_shard_listed_in_index_is_refused(written):
    gone = written / "t-val-000000.tar"
    gone.unlink()
    with pytest.raises(ShardError) as info:
        load_index(written)
    msg = str(info.value)
    assert "missing" in msg and str(gone.resolve()) in msg and "restore it or rebuild" in msg


def test_shard_not_in_index_is_refused(written):
    shutil.copy(written / "t-val-000000.tar", written / "t-extra-000000.tar")
    with pytest.raises(ShardError, match=r"t-extra-000000\.tar is not listed in .*index\.json; rebuild"):
        load_index(written)


def test_subset_of_indexed_shards_keeps_only_their_classes(written):
    index = load_index(str(written / "t-train-*.tar"))
    assert [c.id for c in index.classes] == [10, 11, 12]
    assert [c.split for c in index.classes] == ["train"] * 3


def test_unreadable_index_names_the_fix(written):
    (written / INDEX_NAME).write_text("{not json")
    with pytest.raises(ShardError, match=r"cannot read shard index .*lightning-meta index"):
        load_index(written)
    (written / INDEX_NAME).write_text(json.dumps({"format": "other", "version": 9}))
    with pytest.raises(ShardError, match="is not a lightning-meta index"):
        load_index(written)


def test_verify_memoises_checksums_in_the_cache(written, _private_cache, monkeypatch):
    index = load_index(written)
    memo = json.loads((_private_cache / "verified-shards.json").read_text())
    assert len(memo) == 4
    monkeypatch.setattr(shards_mod, "sha256_file", lambda p: pytest.fail(f"re-hashed {p}"))
    verify_index(index)  # all four are memoised: no hashing


# --------------------------------------------------------------------------- permissions
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_atomic_files_shards_and_glyph_folder_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    """mkstemp/mkdtemp make 0600/0700 entries; what is published gets an ordinary file's permissions."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "old.json").write_bytes(b"{}")
    os.chmod(tmp_path / "a" / "old.json", 0o600)
    old = os.umask(umask)
    try:
        assert shards_mod.current_umask() == umask
        atomic_write_bytes(tmp_path / "a" / "new.json", b"{}")
        atomic_write_bytes(tmp_path / "a" / "old.json", b"[]")  # replacing a private file
        written = _write(tmp_path / "w", max_samples=4)
        glyphs = generate_glyphs(tmp_path / "g", alphabets=2, chars_per_alphabet=(1, 1), drawings=2, splits=(1, 1, 0))
        converted = tmp_path / "c"
        convert_imagefolder(Path(__file__).parent / "data" / "fake_trees" / "imagefolder", converted)
        assert os.umask(umask) == umask, "reading the umask leaves it as it was"
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a" / "new.json") == _mode(tmp_path / "a" / "old.json") == file_mode
    for folder in (written, glyphs, converted):
        files = sorted(folder.iterdir())
        assert len([f for f in files if f.suffix == ".tar"]) >= 1 and folder / INDEX_NAME in files
        assert {f.name: _mode(f) for f in files} == {f.name: file_mode for f in files}
    assert _mode(glyphs) == _mode(converted) == dir_mode
    assert not list(tmp_path.rglob(".*")), "no temporary file or folder is left behind"


def test_umask_is_read_without_proc_too(monkeypatch):
    """Where /proc/self/status is missing the umask is set and restored (under a lock)."""

    def no_proc(*args, **kwargs):
        raise FileNotFoundError("/proc/self/status")

    old = os.umask(0o027)
    try:
        with_proc = shards_mod.current_umask()
        monkeypatch.setattr(shards_mod, "open", no_proc, raising=False)
        assert shards_mod.current_umask() == with_proc == 0o027
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(old)


# --------------------------------------------------------------------------- sampling
def test_episode_rng_is_a_pure_function_of_its_four_integers():
    draw = lambda *a: episode_rng(*a).integers(0, 2**31, size=8).tolist()  # noqa: E731
    base = draw(0, "train", 0, 0)
    assert draw(0, "train", 0, 0) == base
    assert (
        len(
            {
                tuple(base),
                tuple(draw(1, "train", 0, 0)),
                tuple(draw(0, "val", 0, 0)),
                tuple(draw(0, "train", 1, 0)),
                tuple(draw(0, "train", 0, 1)),
            }
        )
        == 5
    )


def test_sample_fixed_draws_distinct_classes_and_examples():
    counts = [3, 7, 4, 10, 3, 5, 6]
    shape = FixedShape(ways=5, shots=2, queries=1)
    seen_classes = set()
    for i in range(200):
        draw = sample_fixed(episode_rng(0, "train", 0, i), counts, shape)
        classes = [c for c, _ in draw]
        assert len(draw) == 5 and len(set(classes)) == 5
        for c, members in draw:
            assert len(members) == 3 and len(set(members.tolist())) == 3
            assert all(0 <= m < counts[c] for m in members)
        seen_classes.update(classes)
    assert seen_classes == set(range(len(counts)))


# --------------------------------------------------------------------------- glyphs
def _tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_generate_glyphs_is_deterministic_and_split_by_alphabet(tmp_path):
    kw = dict(alphabets=3, chars_per_alphabet=(2, 3), drawings=3, splits=(1, 1, 1))
    a = generate_glyphs(tmp_path / "a", seed=5, **kw)
    b = generate_glyphs(tmp_path / "b", seed=5, **kw)
    c = generate_glyphs(tmp_path / "c", seed=6, **kw)
    assert _tree_digest(a) == _tree_digest(b)
    assert _tree_digest(a) != _tree_digest(c)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temporary folders left

    index = load_index(a)
    groups = {s: {c.group for c in index.split_classes(s)} for s in ("train", "val", "test")}
    assert all(len(g) == 1 for g in groups.values())  # one alphabet per split here
    assert len(set().union(*groups.values())) == 3  # and the splits share no alphabet
    assert all(2 <= len(index.split_classes(s)) <= 3 for s in groups)
    assert all(c.count == 3 for c in index.classes)
    assert index.meta["seed"] == 5
    img = IndexedReader(index).image(0, 0)
    assert img.shape == (1, 28, 28)
    assert 0 < img.mean() < 0.6  # white ink on black, but some ink


def test_generate_glyphs_replaces_an_existing_folder_and_checks_splits(tmp_path):
    out = tmp_path / "g"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    generate_glyphs(out, alphabets=2, chars_per_alphabet=(1, 1), drawings=2, splits=(1, 1, 0))
    assert not (out / "stale.txt").exists() and (out / INDEX_NAME).exists()
    with pytest.raises(ValueError, match=r"splits=\(1, 1, 1\) must sum to alphabets=2"):
        generate_glyphs(tmp_path / "h", alphabets=2, splits=(1, 1, 1))


def _first_use(cache: str, log: str, barrier) -> None:
    import time

    os.environ["LIGHTNING_META_CACHE"] = cache
    from lightning_meta.data import glyphs

    original = glyphs.generate_glyphs

    def slow_small(out, seed=0):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)  # both processes are past the cache check by now
        return original(out, seed=seed, alphabets=2, chars_per_alphabet=(3, 3), drawings=2, size=16,
                        splits=(1, 1, 0))

    glyphs.generate_glyphs = slow_small
    barrier.wait()
    out = glyphs.default_glyph_shards()
    assert (out / "index.json").exists()


def test_two_processes_on_a_cold_cache_generate_the_embedded_default_once(tmp_path):
    """Two jobs (or nodes sharing a cache) starting together: one generates, the other waits and reuses it."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    log = tmp_path / "generations.txt"
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_first_use, args=(str(tmp_path / "cache"), str(log), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().split()) == 1
