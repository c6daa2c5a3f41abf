"""Webdataset shards grouped by class, their ``index.json`` sidecar, and an indexed random-access reader.

A sample is ``<key>.<png|jpg|npy>`` plus ``<key>.cls`` (the integer class id, webdataset's
convention). The index maps every class to the byte ranges of its images inside the tar files,
so an exact N-way K-shot episode reads exactly the ``N * (K + Q)`` members it needs.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import os
import tarfile
import tempfile
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from lightning_meta.errors import ShardError

__all__ = [
    "IMAGE_EXTS",
    "ClassEntry",
    "ShardIndex",
    "ShardWriter",
    "IndexedReader",
    "build_index",
    "cache_dir",
    "cache_lock",
    "decode_image",
    "load_index",
    "publish_permissions",
    "resolve_shards",
]

INDEX_NAME = "index.json"
INDEX_FORMAT = "lightning-meta/index"
INDEX_VERSION = 1
IMAGE_EXTS = ("png", "jpg", "jpeg", "npy", "ppm", "pgm")
Verify = Literal["none", "size", "sha256"]


def cache_dir() -> Path:
    """Cache root: ``$LIGHTNING_META_CACHE`` or ``~/.cache/lightning_meta``."""
    root = os.environ.get("LIGHTNING_META_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightning_meta")
    return Path(root)


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """Return the process umask, read without changing it where the platform allows.

    On Linux it is parsed from ``/proc/self/status`` (``Umask:`` line, kernel 4.7+), which is
    thread-safe. Elsewhere it is read the only portable way, by setting it (to the private 0o077)
    and restoring it at once, serialised by a lock; a file another thread creates between those
    two calls (a few microseconds) gets private permissions, never wider ones.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        umask = os.umask(0o077)  # private, should another thread create a file meanwhile
        os.umask(umask)
    return umask


def publish_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions of an ordinary new file or folder under the current umask.

    ``tempfile.mkstemp`` and ``mkdtemp`` create private entries (0600 / 0700) whatever the umask;
    everything written atomically through them (shards, ``index.json``, reports, caches) is passed
    here before it is renamed into place, so it ends up ``0o666 & ~umask`` (a file, 0644 under the
    usual umask 022) or ``0o777 & ~umask`` (a folder, 0755), as ``open(path, "w")`` or
    ``os.mkdir`` would create it. Only ``path`` itself changes, not a folder's contents.
    """
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~current_umask())


@contextlib.contextmanager
def cache_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) for the ``with`` block.

    Guards check-then-generate of shared cache entries (the embedded default, converted Omniglot
    sets), so that two processes starting on a cold cache (two jobs, or several nodes sharing one
    cache folder) do not both generate and replace each other's folder while it is read. POSIX
    ``flock``; where it is unavailable the block runs unlocked.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temporary file in the same folder, fsync it, then rename it over ``path``.

    The file gets the permissions of an ordinary new file (``0o666 & ~umask``, see
    :func:`publish_permissions`), not the private 0600 of its ``mkstemp`` temporary.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------- index
@dataclass
class ClassEntry:
    """One class of an index: its id, provenance and member locations ``(shard, offset, size)``."""

    id: int
    name: str
    split: str | None
    group: str | None
    ext: str
    members: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Number of images of the class."""
        return len(self.members)


@dataclass
class ShardIndex:
    """The parsed ``index.json``: shard files (absolute paths), sizes/checksums and classes."""

    shards: list[str]
    sizes: list[int]
    sha256: list[str | None]
    classes: list[ClassEntry]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def split_classes(self, split: str) -> list[ClassEntry]:
        """Classes whose ``split`` field equals ``split``."""
        return [c for c in self.classes if c.split == split]

    def to_json(self, root: Path) -> dict[str, Any]:
        """A JSON-serialisable dict; shard paths are stored relative to ``root`` when inside it."""

        def rel(p: str) -> str:
            try:
                return str(Path(p).resolve().relative_to(root.resolve()))
            except ValueError:
                return str(Path(p).resolve())

        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "shards": [
                {"path": rel(p), "size": s, "sha256": h}
                for p, s, h in zip(self.shards, self.sizes, self.sha256, strict=True)
            ],
            "classes": [
                {"id": c.id, "name": c.name, "split": c.split, "group": c.group, "ext": c.ext,
                 "members": [list(m) for m in c.members]}
                for c in self.classes
            ],
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Writes the index atomically."""
        path = Path(path)
        data = json.dumps(self.to_json(path.parent), separators=(",", ":")).encode()
        atomic_write_bytes(path, data)
        self.path = str(path)


def _parse_index(path: Path) -> ShardIndex:
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"cannot read shard index {path}: {e}; delete it and rebuild with "
                         f"`lightning-meta index {path.parent}`") from e
    if raw.get("format") != INDEX_FORMAT or raw.get("version") != INDEX_VERSION:
        raise ShardError(f"{path} is not a lightning-meta index (format {raw.get('format')!r} version "
                         f"{raw.get('version')!r}); rebuild it with `lightning-meta index {path.parent}`")
    root = path.parent
    shards = [str((root / s["path"]).resolve()) if not os.path.isabs(s["path"]) else s["path"] for s in raw["shards"]]
    classes = [
        ClassEntry(c["id"], c["name"], c.get("split"), c.get("group"), c["ext"], [tuple(m) for m in c["members"]])
        for c in raw["classes"]
    ]
    return ShardIndex(shards, [s["size"] for s in raw["shards"]], [s.get("sha256") for s in raw["shards"]],
                      classes, raw.get("meta", {}), str(path))


def _verified_hash(path: str, verify_cache: Path) -> str:
    """SHA-256 of ``path``, memoised by (path, size, mtime) in a small JSON file of the cache."""
    st = os.stat(path)
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}"
    memo: dict[str, str] = {}
    if verify_cache.exists():
        try:
            memo = json.loads(verify_cache.read_text())
        except (OSError, json.JSONDecodeError):
            memo = {}
    if key in memo:
        return memo[key]
    digest = sha256_file(path)
    memo[key] = digest
    try:
        atomic_write_bytes(verify_cache, json.dumps(memo).encode())
    except OSError:
        pass  # read-only cache: verification still happened, it just is not memoised
    return digest


def verify_index(index: ShardIndex, verify: Verify = "sha256", only: Collection[str] | None = None) -> None:
    """Checks that every shard (of ``only``, when given) exists and matches the size (and checksum) in the index.

    Raises:
        ShardError: naming the shard, what differs and the command that rebuilds the index.

    """
    if verify == "none":
        return
    where = Path(index.path).parent if index.path else Path(".")
    rebuild = f"`lightning-meta index {where}`"
    for p, size, digest in zip(index.shards, index.sizes, index.sha256, strict=True):
        if only is not None and p not in only:
            continue
        if not os.path.exists(p):
            raise ShardError(
                f"shard {p} listed in {index.path} is missing; restore it or rebuild the index with {rebuild}"
            )
        actual = os.path.getsize(p)
        if actual != size:
            raise ShardError(
                f"shard {p} has {actual} bytes but the index records {size}: it is truncated or was changed; "
                f"re-create it, or rebuild the index with {rebuild} if the change is intended"
            )
        if verify == "sha256" and digest:
            got = _verified_hash(p, cache_dir() / "verified-shards.json")
            if got != digest:
                raise ShardError(
                    f"shard {p} is corrupt: SHA-256 {got[:12]}... differs from {digest[:12]}... in the index; "
                    f"re-create the shard, or rebuild the index with {rebuild} if the change is intended"
                )


def resolve_shards(shards: str | Sequence[str], resolve: bool = True) -> list[str]:
    """Expands a brace pattern (``data/train-{000000..000009}.tar``), a glob, a list, or a directory.

    Args:
        shards: the pattern(s), list or directory.
        resolve: return real paths (symbolic links followed, the default) or absolute paths as
            given (to find an ``index.json`` that sits beside symlinked shards).

    Raises:
        ShardError: when nothing matches, naming the pattern.

    """
    from braceexpand import braceexpand

    items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    out: list[str] = []
    for item in items:
        item = os.path.expanduser(str(item))
        if os.path.isdir(item):
            out += sorted(glob.glob(os.path.join(item, "*.tar")))
            continue
        for pat in braceexpand(item):
            out += sorted(glob.glob(pat)) if any(ch in pat for ch in "*?[") else [pat]
    if not any(os.path.exists(p) for p in out):
        raise ShardError(
            f"shards={shards!r} matched no .tar files; check the path or pattern (brace patterns like "
            "'dir/train-{000000..000009}.tar', globs and directories are accepted), or create shards with "
            "`lightning-meta convert`"
        )
    missing = [p for p in out if not os.path.isfile(p)]
    if missing:
        raise ShardError(f"shards={shards!r}: {missing[0]} does not exist or is not a file; restore it or "
                         "leave it out of the pattern")
    return [str(Path(p).resolve()) if resolve else os.path.abspath(p) for p in out]


def scan_tar(path: str) -> list[tuple[str, int, int]]:
    """``(member name, data offset, size)`` of every regular file in a tar.

    Raises:
        ShardError: when the tar is truncated or not a tar.

    """
    try:
        with tarfile.open(path, "r:") as tar:
            entries = [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
            stop = tar.offset  # where tarfile stopped reading headers: the end-of-archive marker
        with open(path, "rb") as f:
            f.seek(stop)
            marker = f.read(tarfile.BLOCKSIZE)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(
            f"shard {path} cannot be read as a tar file ({e}); it is truncated or corrupt: re-create it"
        ) from e
    # tarfile silently stops at a missing or unreadable header after the first one; a complete tar
    # ends with a zero block there, so anything else means members were lost
    if len(marker) < tarfile.BLOCKSIZE:
        raise ShardError(f"shard {path} is truncated: it ends at byte {os.path.getsize(path)} without the "
                         f"end-of-archive marker, after {len(entries)} member(s); re-create it")
    if marker.count(0) != len(marker):
        raise ShardError(f"shard {path} is corrupt: unreadable tar header at byte {stop} after {len(entries)} "
                         "member(s); re-create it")
    end = os.path.getsize(path)
    for name, off, size in entries:
        if off + size > end:
            raise ShardError(
                f"shard {path} is truncated: member {name} ends at byte {off + size} of {end}; re-create it"
            )
    return entries


def build_index(
    shard_paths: Sequence[str],
    class_meta: dict[int, dict[str, Any]] | None = None,
    checksums: bool = True,
    meta: dict[str, Any] | None = None,
) -> ShardIndex:
    """Builds an index by scanning tar shards (ours or any webdataset shards with ``.cls`` members).

    Args:
        shard_paths: the tar files.
        class_meta: optional ``{class_id: {"name", "split", "group"}}``.
        checksums: record the SHA-256 of each shard.
        meta: free-form provenance stored in the index.

    Raises:
        ShardError: for unreadable tars, samples without a ``.cls`` member or without an image.

    """
    class_meta = class_meta or {}
    members: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    exts: dict[int, str] = {}
    for si, path in enumerate(shard_paths):
        entries = scan_tar(path)
        by_key: dict[str, dict[str, tuple[int, int]]] = OrderedDict()
        for name, off, size in entries:
            base = os.path.basename(name)
            if base.startswith("."):
                continue
            key_dir = os.path.dirname(name)
            key, _, ext = base.partition(".")
            by_key.setdefault(os.path.join(key_dir, key), {})[ext.lower()] = (off, size)
        with open(path, "rb") as f:
            for key, parts in by_key.items():
                if "cls" not in parts:
                    if any(e in parts for e in IMAGE_EXTS):
                        raise ShardError(f"sample {key!r} in {path} has no .cls member with its class id; "
                                         "write '<key>.cls' holding the integer class")
                    continue
                img_ext = next((e for e in IMAGE_EXTS if e in parts), None)
                if img_ext is None:
                    raise ShardError(f"sample {key!r} in {path} has no image member ({', '.join(IMAGE_EXTS)})")
                off, size = parts["cls"]
                f.seek(off)
                try:
                    cid = int(f.read(size).decode().strip())
                except ValueError as e:
                    raise ShardError(f"sample {key!r} in {path}: .cls does not hold an integer class id") from e
                members[cid].append((si, *parts[img_ext]))
                exts.setdefault(cid, img_ext)
    if not members:
        raise ShardError(f"no labelled samples found in {len(shard_paths)} shard(s) starting with {shard_paths[0]}")
    classes = []
    for cid in sorted(members):
        m = class_meta.get(cid, {})
        classes.append(
            ClassEntry(cid, m.get("name", str(cid)), m.get("split"), m.get("group"), exts[cid], members[cid])
        )
    sizes = [os.path.getsize(p) for p in shard_paths]
    digests = [sha256_file(p) if checksums else None for p in shard_paths]
    return ShardIndex([str(Path(p).resolve()) for p in shard_paths], sizes, digests, classes, dict(meta or {}))


def load_index(shards: str | Sequence[str], verify: Verify = "sha256") -> ShardIndex:
    """Loads (or builds and caches) the index of a shard set and verifies it.

    An ``index.json`` beside the shards is used when present. Otherwise (third-party shards) the
    index is built by scanning the tars and cached under :func:`cache_dir`, keyed by the shard
    paths, sizes and modification times, so a changed shard is re-indexed.

    Raises:
        ShardError: for missing, truncated or corrupt shards and inconsistent indices.

    """
    given = resolve_shards(shards, resolve=False)
    paths = [str(Path(p).resolve()) for p in given]
    # the index beside the shards as given, else beside their real files: links into a
    # content-addressed store (Hugging Face hub, git-annex, DVC) name blobs by hash in another folder
    candidate = None
    for folders in ({os.path.dirname(p) for p in given}, {os.path.dirname(p) for p in paths}):
        if len(folders) == 1 and (Path(next(iter(folders))) / INDEX_NAME).exists():
            candidate = Path(next(iter(folders))) / INDEX_NAME
            break
    if candidate is not None:
        index = _parse_index(candidate)
        listed = set(index.shards)
        unknown = [p for p in paths if p not in listed]
        if unknown:
            raise ShardError(f"shard {unknown[0]} is not listed in {candidate}; rebuild the index with "
                             f"`lightning-meta index {candidate.parent}`")
        subset = set(paths) != listed
        if subset:  # a subset was asked for: keep only its members
            keep = {i for i, p in enumerate(index.shards) if p in set(paths)}
            for c in index.classes:
                c.members = [m for m in c.members if m[0] in keep]
            index.classes = [c for c in index.classes if c.members]
        # a folder stands for the whole set (a missing shard is an error); a pattern or list for its shards only
        items = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
        whole = any(os.path.isdir(os.path.expanduser(str(i))) for i in items)
        verify_index(index, verify, only=set(paths) if subset and not whole else None)
        return index
    stamp = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        stamp.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    cached = cache_dir() / "indices" / f"{stamp.hexdigest()[:24]}.json"
    if cached.exists():
        index = _parse_index(cached)
    else:
        index = build_index(paths, meta={"source": "scanned third-party shards"})
        index.save(cached)
    verify_index(index, verify)
    return index


# --------------------------------------------------------------------------- writer
class ShardWriter:
    """Writes labelled images as webdataset tar shards grouped by class, plus ``index.json``.

    A class never straddles two shards; a shard is closed once it holds ``max_samples`` samples.
    Each shard is written to a temporary name and renamed when complete, and the index is written
    last (atomically), so an interrupted conversion never leaves a shard set that looks valid.

    Args:
        out_dir: destination folder (created).
        prefix: shard name prefix; shards are ``{prefix}-{split}-000000.tar`` (split omitted if None).
        max_samples: samples per shard before rolling over (at a class boundary).
        meta: provenance stored in the index.

    Example:
        >>> import tempfile, numpy as np
        >>> with ShardWriter(tempfile.mkdtemp()) as w:
        ...     _ = w.add_class(0, [np.zeros((28, 28), np.uint8)] * 3, name="a", split="train")
        >>> w.index.classes[0].count
        3

    """

    def __init__(self, out_dir: str | os.PathLike, prefix: str = "shard", max_samples: int = 5000,
                 meta: dict[str, Any] | None = None) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples={max_samples} must be >= 1")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples = max_samples
        self.meta = dict(meta or {})
        self.class_meta: dict[int, dict[str, Any]] = {}
        self.paths: list[str] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: str | None = None
        self._final: str | None = None
        self._count = 0
        self._split: str | None = None
        self._shard_no: dict[str | None, int] = defaultdict(int)
        self.index: ShardIndex | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _open(self, split: str | None) -> None:
        no = self._shard_no[split]
        self._shard_no[split] += 1
        name = f"{self.prefix}-{split}-{no:06d}.tar" if split else f"{self.prefix}-{no:06d}.tar"
        self._final = str(self.out_dir / name)
        fd, self._tmp = tempfile.mkstemp(dir=self.out_dir, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        publish_permissions(self._tmp)  # mkstemp's 0600 -> an ordinary file's 0o666 & ~umask
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self._count = 0
        self._split = split

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        with open(self._tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, self._final)
        self.paths.append(self._final)
        self._tar = None

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0  # reproducible bytes
        info.mode = 0o644
        self._tar.addfile(info, io.BytesIO(data))

    def add_class(
        self,
        class_id: int,
        images: Iterable[bytes | np.ndarray],
        name: str | None = None,
        split: str | None = None,
        group: str | None = None,
        ext: Literal["png", "npy"] = "png",
    ) -> int:
        """Adds every image of one class; arrays are encoded as ``ext``, bytes are stored as given.

        Returns:
            the number of samples written.

        """
        if class_id in self.class_meta:
            raise ValueError(f"class id {class_id} was already written; class ids must be unique")
        if self._tar is None or self._split != split or self._count >= self.max_samples:
            self._close_shard()
            self._open(split)
        n = 0
        for i, img in enumerate(images):
            data = encode_image(img, ext) if isinstance(img, np.ndarray) else bytes(img)
            key = f"{class_id:07d}_{i:05d}"
            self._add(f"{key}.{ext}", data)
            self._add(f"{key}.cls", str(class_id).encode())
            n += 1
        if n == 0:
            raise ValueError(f"class {class_id} ({name}) has no images")
        self._count += n
        self.class_meta[class_id] = {"name": name or str(class_id), "split": split, "group": group}
        return n

    def abort(self) -> None:
        """Drops the shard being written (its temporary file) and the shards it completed; writes no index.

        Completed shards are removed too: without an index they would still look like a valid
        (third-party) shard set holding only part of the data.
        """
        if self._tar is not None:
            self._tar.close()
            os.unlink(self._tmp)
            self._tar = None
        for p in self.paths:
            if os.path.exists(p):
                os.unlink(p)
        self.paths = []

    def close(self) -> ShardIndex:
        """Finishes the last shard and writes ``index.json`` (atomically)."""
        self._close_shard()
        if not self.paths:
            raise ValueError("ShardWriter.close: no class was added")
        self.index = build_index(self.paths, self.class_meta, checksums=True, meta=self.meta)
        self.index.save(self.out_dir / INDEX_NAME)
        return self.index


def encode_image(img: np.ndarray, ext: str) -> bytes:
    """Encodes a ``uint8`` array ``[H, W]`` or ``[H, W, C]`` as PNG or NPY bytes."""
    if ext == "npy":
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(img), allow_pickle=False)
        return buf.getvalue()
    if ext == "png":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
        return buf.getvalue()
    raise ValueError(f"ext={ext!r} is not supported for arrays; use 'png' or 'npy'")


def decode_image(data: bytes, ext: str) -> np.ndarray:
    """Decodes image bytes to a ``uint8`` array ``[H, W]`` or ``[H, W, C]``."""
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "RGB"):
            im = im.convert("RGB" if im.mode in ("RGBA", "P", "CMYK") else "L")
        return np.asarray(im, dtype=np.uint8)


# --------------------------------------------------------------------------- reader
class IndexedReader:
    """Random access to class members through an index, with a bounded cache of decoded images.

    File handles are opened lazily per process (safe with dataloader workers), and the cache
    holds at most ``cache_mb`` megabytes of decoded tensors (least recently used evicted first).

    Args:
        index: a loaded :class:`ShardIndex`.
        invert: map pixel ``v`` to ``255 - v`` (Omniglot-style black ink on white -> ink as 1).
        cache_mb: decoded-image cache size per process.

    """

    def __init__(self, index: ShardIndex, invert: bool = False, cache_mb: float = 256.0) -> None:
        self.index = index
        self.invert = invert
        self.cache_bytes = int(cache_mb * 2**20)
        self._files: dict[int, Any] = {}
        self._pid = os.getpid()
        self._cache: OrderedDict[tuple[int, int], Tensor] = OrderedDict()
        self._cached_bytes = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"] = {}
        state["_cache"] = OrderedDict()
        state["_cached_bytes"] = 0
        return state

    def _file(self, shard: int):
        if os.getpid() != self._pid:  # forked worker: never share file offsets with the parent
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.index.shards[shard], "rb")
        return f

    def read_bytes(self, class_pos: int, member: int) -> tuple[bytes, str]:
        """Raw bytes and extension of member ``member`` of ``index.classes[class_pos]``."""
        entry = self.index.classes[class_pos]
        shard, off, size = entry.members[member]
        f = self._file(shard)
        f.seek(off)
        data = f.read(size)
        if len(data) != size:
            raise ShardError(f"shard {self.index.shards[shard]} ended early while reading class {entry.name}; "
                             "it was truncated after indexing: re-create it")
        return data, entry.ext

    def image(self, class_pos: int, member: int) -> Tensor:
        """Decoded image ``[C, H, W]`` float32 in ``[0, 1]``."""
        key = (class_pos, member)
        t = self._cache.get(key)
        if t is not None:
            self._cache.move_to_end(key)
            return t
        data, ext = self.read_bytes(class_pos, member)
        arr = decode_image(data, ext)
        if self.invert:
            arr = 255 - arr
        t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True))
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
        t = t.to(torch.float32).div_(255.0)
        nbytes = t.numel() * 4
        if nbytes <= self.cache_bytes:
            self._cache[key] = t
            self._cached_bytes += nbytes
            while self._cached_bytes > self.cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.numel() * 4
        return t
