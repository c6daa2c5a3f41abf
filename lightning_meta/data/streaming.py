"""Streaming reader: one shuffled, repeating, sequential stream per class (the Meta-Dataset design).

For shard sets on remote storage or too large for random access: any URL webdataset can open
(``https://``, ``gs://``, ``pipe:<command>``, local paths) through :func:`webdataset.gopen.gopen`.
The index (``index.json``, found beside the shards or given explicitly, or built by streaming
third-party shards once) says which shard holds each class and where its members are; since the
project's shards group samples by class, a class is one contiguous run of a shard.

**Streams.** Class ``c`` is read as a sequence of *passes*. A pass reads the class's members in
file order through a shuffle buffer of ``buffer_size`` samples seeded by ``(key, pass)``, so it
yields every member exactly once, in an order that is a pure function of the seed (a full
shuffle when the class fits in the buffer). The episode sources (``ShardDataModule(reader=
"streaming")``) keep a cursor ``(pass, position)`` per class and *flush on wrap*: when an
episode needs more examples of a class than its current pass has left, the rest of the pass is
skipped and the examples come from the start of the next one, so an example never repeats inside
an episode.

**Memory bound.** Per reader process: at most ``max_open_streams`` class streams are open at
once (least recently used closed first; a closed stream is reopened and fast-forwarded when it
is needed again); each holds at most ``buffer_size + RECENT`` encoded samples and one open
file or pipe. A class that fits in its buffer is kept there, and its next passes are made from
memory instead of reopening its shard. So sample memory is at most
``max_open_streams * (buffer_size + RECENT)`` times the largest encoded sample, whatever the size
of the data set; the index itself keeps a few numbers per sample.

**Faults.** Opening or reading a shard that fails (network error, a failing ``pipe:`` command,
a truncated transfer) is retried ``retries`` times with exponential back-off from
``retry_delay`` seconds, continuing after the members already read; then a
:class:`~lightning_meta.errors.ShardError` names the URL. A shard whose members do not match the
index is refused at once with the command that rebuilds it.

Example:
    >>> import tempfile, numpy as np
    >>> from lightning_meta.data.shards import ShardWriter
    >>> with ShardWriter(tempfile.mkdtemp()) as w:
    ...     n = w.add_class(0, [np.full((2, 2), i, np.uint8) for i in range(3)], split="train")
    >>> reader = StreamingReader(load_stream_index("pipe:cat " + w.paths[0]))
    >>> sorted(int(reader.decode(0, reader.get(0, (0, 0), p))[0, 0, 0] * 255) for p in range(3))
    [0, 1, 2]

"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shlex
import tarfile
import time
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_meta.data.shards import (
    IMAGE_EXTS,
    INDEX_FORMAT,
    INDEX_NAME,
    INDEX_VERSION,
    ClassEntry,
    ShardIndex,
    Verify,
    atomic_write_bytes,
    cache_dir,
    decode_image,
    load_index,
    resolve_shards,
)
from lightning_meta.errors import ShardError

__all__ = [
    "RECENT",
    "SCAN_INDEX",
    "StreamingReader",
    "is_local_url",
    "load_stream_index",
    "open_url",
    "sibling_url",
    "url_basename",
]

#: ``index=`` value for third-party shards without ``index.json``: stream them once to build one
SCAN_INDEX = "scan"

#: samples a class stream keeps after yielding them (re-reads of a few positions, e.g. replacing a
#: corrupt sample, do not reopen the stream)
RECENT = 16


# --------------------------------------------------------------------------- URLs
def is_local_url(url: str) -> bool:
    """Tell whether ``url`` is a plain path or a ``file:`` URL (seekable), not ``pipe:`` or a remote scheme."""
    if url.startswith("pipe:"):
        return False
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or (len(scheme) == 1 and os.name == "nt")


def _local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if url.startswith("file:") else os.path.expanduser(url)


def _shard_token(url: str) -> str:
    """Return the part of a URL naming the shard: the URL itself, or the ``.tar`` argument of a pipe command."""
    if not url.startswith("pipe:"):
        return url
    try:
        tokens = shlex.split(url[5:])
    except ValueError:
        tokens = url[5:].split()
    named = [t for t in tokens if ".tar" in t or t.endswith(".json")]
    return named[-1] if named else (tokens[-1] if tokens else url)


def url_basename(url: str) -> str:
    """File name a URL points at (``pipe:`` commands: the last argument naming a ``.tar``).

    Example:
        >>> url_basename("pipe:curl -s https://host/data/train-000001.tar"), url_basename("gs://b/x/a.tar")
        ('train-000001.tar', 'a.tar')

    """
    token = _shard_token(url)
    path = urlparse(token).path if "://" in token or token.startswith("file:") else token
    return posixpath.basename(path)


def sibling_url(url: str, name: str) -> str:
    """Return the URL of file ``name`` in the same folder as ``url`` (for ``pipe:``, the command rewritten).

    Example:
        >>> sibling_url("pipe:cat /data/train-000000.tar", "index.json")
        'pipe:cat /data/index.json'
        >>> sibling_url("https://host/d/train-000000.tar", "index.json")
        'https://host/d/index.json'

    """
    base = url_basename(url)
    if url.startswith("pipe:"):
        i = url.rfind(base)
        return url if i < 0 or not base else url[:i] + name + url[i + len(base):]
    parsed = urlparse(url)
    if parsed.scheme in ("", "file") and "://" not in url and not url.startswith("file:"):
        return os.path.join(os.path.dirname(url), name)
    return parsed._replace(path=posixpath.join(posixpath.dirname(parsed.path), name), query="", fragment="").geturl()


def _expand(spec: str | Sequence[str]) -> list[str]:
    """Brace-expands every URL; local items also accept globs and directories."""
    from braceexpand import braceexpand

    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[str] = []
    for item in items:
        item = os.fspath(item)
        if is_local_url(item) and not item.startswith("file:"):
            out += resolve_shards(item)
        else:
            out += list(braceexpand(item))
    if not out:
        raise ShardError(f"shards={spec!r} names no shard; give a URL, a brace pattern or a list")
    return out


# --------------------------------------------------------------------------- opening
class _Mismatch(ShardError):
    """The shard's members are not where the index says (never retried)."""


def _quiet_close(stream: Any) -> None:
    """Close a file or a webdataset ``Pipe`` without raising (a pipe closed early exits with SIGPIPE)."""
    try:
        from webdataset.gopen import set_options

        set_options(stream, ignore_errors=True)
    except ImportError:  # pragma: no cover - webdataset is a core dependency
        pass
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - closing must never fail a read that succeeded
        pass


def _failed_status(stream: Any) -> int | None:
    """Exit status of a ``pipe:`` command that failed (None for files, running or successful commands)."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        status = proc.wait(timeout=1.0)  # its output ended: it is exiting, or has exited
    except Exception:  # noqa: BLE001 - still running (we stopped reading early) or not ours
        return None
    return None if status in (0, 141, -13) else status


def _gopen(url: str) -> Any:
    if is_local_url(url):
        return open(_local_path(url), "rb")
    from webdataset.gopen import gopen

    try:
        return gopen(url, "rb")
    except ValueError as e:  # unknown scheme, or pipes disabled by WDS_SECURE: retrying cannot help
        raise ShardError(f"cannot open {url}: {e}; use a URL webdataset can open (a path, file:, pipe:, http(s):, "
                         "gs:, ...)") from e


_RETRYABLE = (OSError, EOFError, tarfile.TarError)


def _retrying(url: str, retries: int, retry_delay: float, what: str, attempt_fn):
    """Call ``attempt_fn()`` until it succeeds, at most ``retries + 1`` times."""
    attempt = 0
    while True:
        try:
            return attempt_fn()
        except ShardError:
            raise
        except _RETRYABLE as e:
            attempt += 1
            if attempt > retries:
                raise ShardError(f"cannot {what} {url}: failed {attempt} time(s) (retries={retries}); last error: "
                                 f"{type(e).__name__}: {e}. Check that the URL is reachable, or raise retries") from e
            time.sleep(retry_delay * 2 ** (attempt - 1))


def open_url(url: str, retries: int = 3, retry_delay: float = 1.0) -> bytes:
    """All the bytes at ``url`` (a small file such as ``index.json``), retrying failed reads.

    Raises:
        ShardError: naming the URL once ``retries`` retries failed.

    """

    def attempt() -> bytes:
        stream = _gopen(url)
        try:
            chunks = []
            while block := stream.read(1 << 20):
                chunks.append(block)
            data = b"".join(chunks)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # a failing pipe command raises here (its exit status)
        return data

    return _retrying(url, retries, retry_delay, "read", attempt)


# --------------------------------------------------------------------------- index
def _index_from_raw(raw: dict[str, Any], urls: list[str], where: str) -> ShardIndex:
    """Build an index whose shards are ``urls``, matched to the index's shard entries by file name."""
    if raw.get("format") != INDEX_FORMAT or raw.get("version") != INDEX_VERSION:
        raise ShardError(f"{where} is not a lightning-meta index (format {raw.get('format')!r} version "
                         f"{raw.get('version')!r}); rebuild it with `lightning-meta index <shard folder>`")
    listed = {url_basename(s["path"]): i for i, s in enumerate(raw["shards"])}
    to_url: dict[int, int] = {}
    for u, url in enumerate(urls):
        name = url_basename(url)
        if name not in listed:
            raise ShardError(f"shard {url} (file {name!r}) is not listed in the index {where}; give the matching "
                             "index with index=..., or rebuild it with `lightning-meta index <shard folder>`")
        if listed[name] in to_url:
            raise ShardError(f"shard {url} is given twice (as {urls[to_url[listed[name]]]} too: file {name!r}); "
                             "list each shard once")
        to_url[listed[name]] = u
    classes = []
    for c in raw["classes"]:
        members = [(to_url[m[0]], int(m[1]), int(m[2])) for m in c["members"] if m[0] in to_url]
        if members:
            classes.append(ClassEntry(c["id"], c["name"], c.get("split"), c.get("group"), c["ext"], members))
    if not classes:
        raise ShardError(f"the index {where} lists no class in the {len(urls)} shard(s) given")
    inv = {u: i for i, u in to_url.items()}
    sizes = [int(raw["shards"][inv[u]].get("size", 0)) for u in range(len(urls))]
    digests = [raw["shards"][inv[u]].get("sha256") for u in range(len(urls))]
    return ShardIndex(list(urls), sizes, digests, classes, raw.get("meta", {}), where)


class _CountingReader:
    """A read-only stream that counts the bytes read through it (for the end-of-archive check)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.total = 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.total += len(data)
        return data


def _scan_stream(url: str, retries: int, retry_delay: float) -> list[tuple[int, int, int, str]]:
    """``(class id, image offset, image size, ext)`` of every labelled sample of a (third-party) shard.

    A stream that ends before the tar end-of-archive marker (a truncated file or transfer) raises
    :class:`tarfile.ReadError`, which is retried and then reported with the URL: ``tarfile``
    itself stops silently at a missing header, which would index only the classes before the cut.
    """

    def attempt() -> list[tuple[int, int, int, str]]:
        stream = _gopen(url)
        try:
            samples: OrderedDict[str, dict[str, Any]] = OrderedDict()
            counted = _CountingReader(stream)
            with tarfile.open(fileobj=counted, mode="r|") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    base = posixpath.basename(info.name)
                    if base.startswith("."):
                        continue
                    key, _, ext = base.partition(".")
                    key = posixpath.join(posixpath.dirname(info.name), key)
                    ext = ext.lower()
                    entry = samples.setdefault(key, {})
                    if ext == "cls":
                        entry["cls"] = tar.extractfile(info).read()
                    elif ext in IMAGE_EXTS:
                        entry.setdefault("img", (info.offset_data, info.size, ext))
                end = tar.offset  # where the next header (the end-of-archive marker) starts
            while counted.read(1 << 16):
                pass  # the rest: the marker and the record padding of a complete tar
            if counted.total < end + tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"the stream ends at byte {counted.total}, before the tar end-of-archive "
                                        f"marker at byte {end}: the shard or its transfer is truncated")
        finally:
            _quiet_close(stream)
        out = []
        for key, parts in samples.items():
            if "img" not in parts or "cls" not in parts:
                if "img" in parts:
                    raise ShardError(f"sample {key!r} in {url} has no .cls member with its class id")
                continue
            try:
                cid = int(parts["cls"].decode().strip())
            except ValueError as e:
                raise ShardError(f"sample {key!r} in {url}: .cls does not hold an integer class id") from e
            out.append((cid, *parts["img"]))
        return out

    return _retrying(url, retries, retry_delay, "scan", attempt)


def _scanned_index(urls: list[str], retries: int, retry_delay: float) -> ShardIndex:
    """Build (or load from the cache) the index of shards without ``index.json`` by streaming them once."""
    stamp = hashlib.sha256("\n".join(urls).encode()).hexdigest()[:24]
    cached = cache_dir() / "indices" / f"stream-{stamp}.json"
    if cached.exists():
        try:
            index = _index_from_raw(json.loads(cached.read_text()), urls, str(cached))
        except (OSError, json.JSONDecodeError, ShardError):
            pass  # rebuild below
        else:
            rank_zero_info(f"index='scan': using the index scanned earlier, cached at {cached} (delete it to scan "
                           "again after the shards change)")
            return index
    members: dict[int, list[tuple[int, int, int]]] = defaultdict(list)
    exts: dict[int, str] = {}
    for u, url in enumerate(urls):
        for cid, off, size, ext in _scan_stream(url, retries, retry_delay):
            members[cid].append((u, off, size))
            exts.setdefault(cid, ext)
    if not members:
        raise ShardError(f"no labelled samples (<key>.<image> + <key>.cls) found in {len(urls)} shard(s) starting "
                         f"with {urls[0]}")
    raw = {
        "format": INDEX_FORMAT, "version": INDEX_VERSION,
        "shards": [{"path": url, "size": 0, "sha256": None} for url in urls],
        "classes": [{"id": c, "name": str(c), "split": None, "group": None, "ext": exts[c],
                     "members": [list(m) for m in members[c]]} for c in sorted(members)],
        "meta": {"source": "scanned streamed third-party shards"},
    }
    try:
        atomic_write_bytes(cached, json.dumps(raw, separators=(",", ":")).encode())
    except OSError:
        pass  # read-only cache: the index is still usable
    return _index_from_raw(raw, urls, str(cached))


def load_stream_index(
    shards: str | Sequence[str],
    index: str | None = None,
    verify: Verify = "none",
    retries: int = 3,
    retry_delay: float = 1.0,
) -> ShardIndex:
    """Load the index of a shard set given by URLs; its ``shards`` are those URLs, in the order given.

    Local shard sets (paths, patterns, directories) use :func:`~lightning_meta.data.shards.load_index`
    with ``verify`` (which scans shards that have no ``index.json`` beside them). Otherwise the
    index is ``index`` when given, else ``index.json`` beside the first shard (:func:`sibling_url`,
    which also rewrites ``pipe:`` commands); index shards are matched to URLs by file name.
    Third-party shards without an index need ``index="scan"``: they are streamed once to build
    one, cached under :func:`~lightning_meta.data.shards.cache_dir` (remote shards are not
    checksummed). A missing index is not guessed from a failed read: a transient failure would
    otherwise replace the index's class names and train/val/test split by a random one.

    Raises:
        ShardError: unreadable index (after retries; the message names ``index="scan"``) or
            shards, URLs missing from the index.

    """
    items = [shards] if isinstance(shards, (str, os.PathLike)) else [os.fspath(s) for s in shards]
    local = all(is_local_url(os.fspath(s)) and not os.fspath(s).startswith("file:") for s in items)
    if local and index in (None, SCAN_INDEX):
        return load_index(shards, verify=verify)
    urls = _expand(shards)
    if index == SCAN_INDEX:
        return _scanned_index(urls, retries, retry_delay)
    where = index if index is not None else sibling_url(urls[0], INDEX_NAME)
    if index is not None and is_local_url(index) and not os.path.exists(_local_path(index)):
        raise ShardError(f"index={index!r} does not exist; point it at the index.json of the shards")
    try:
        raw = json.loads(open_url(where, retries, retry_delay))
    except json.JSONDecodeError as e:
        raise ShardError(f"the index {where} is not valid JSON ({e}); rebuild it with "
                         "`lightning-meta index <shard folder>`") from e
    except ShardError as e:
        if index is not None:
            raise
        raise ShardError(
            f"no readable index beside the shards: {e}. Shards written by lightning-meta have an index.json "
            "holding their class names and train/val/test split, and a failed read must not replace it by a "
            "random split: check the URL or credentials and retry, give its location with index=..., or, for "
            f"third-party shards without an index, pass index={SCAN_INDEX!r} (--data.init_args.index "
            f"{SCAN_INDEX}) to stream the {len(urls)} shard(s) once and build one"
        ) from e
    return _index_from_raw(raw, urls, where)


# --------------------------------------------------------------------------- reader
class _Pass:
    """One pass over a class: its members in file order through a seeded shuffle buffer."""

    def __init__(self, members: Iterator[bytes], rng: np.random.Generator, size: int) -> None:
        self.members = members
        self.rng = rng
        self.size = size
        self.buf: list[bytes | None] = []
        self.order: list[int] | None = None
        self.overflowed = False
        #: every member in file order, when the whole class fit in the buffer: the next pass of the
        #: class is then made from memory (the same input sequence, so the same output) instead of
        #: reopening its shard
        self.cached: list[bytes] | None = None

    def __iter__(self) -> _Pass:
        return self

    def __next__(self) -> bytes:
        if self.order is None:
            for data in self.members:
                if len(self.buf) < self.size:
                    self.buf.append(data)
                    continue
                self.overflowed = True
                j = int(self.rng.integers(self.size))
                out, self.buf[j] = self.buf[j], data
                return out
            if not self.overflowed:
                self.cached = list(self.buf)
            self.order = self.rng.permutation(len(self.buf)).tolist()[::-1]
        if not self.order:
            raise StopIteration
        j = self.order.pop()
        out, self.buf[j] = self.buf[j], None
        return out

    @property
    def buffered(self) -> int:
        """Distinct encoded samples held right now (the buffer, or the cached class)."""
        if self.cached is not None:
            return len(self.cached)
        return sum(b is not None for b in self.buf)

    def close(self) -> None:
        close = getattr(self.members, "close", None)
        if close is not None:
            close()
        self.buf = []
        self.cached = None


class _ClassStream:
    """A pass being read, with its position and the last ``RECENT`` samples it yielded."""

    def __init__(self, the_pass: _Pass, key: tuple[int, ...], name: str) -> None:
        self.the_pass = the_pass
        self.key = key
        self.name = name
        self.produced = 0
        self.recent: OrderedDict[int, bytes] = OrderedDict()

    def can_reach(self, pos: int) -> bool:
        return pos in self.recent or pos >= self.produced

    def get(self, pos: int) -> bytes:
        if pos in self.recent:
            return self.recent[pos]
        data = b""
        while self.produced <= pos:
            try:
                data = next(self.the_pass)
            except StopIteration:
                raise _Mismatch(f"class {self.name!r} ran out after {self.produced} member(s) but position {pos} was "
                                "asked for: its shards hold fewer members than the index says; rebuild the index "
                                "with `lightning-meta index <shard folder>`") from None
            self.recent[self.produced] = data
            self.produced += 1
            if len(self.recent) > RECENT:
                self.recent.popitem(last=False)
        return data

    def close(self) -> None:
        self.the_pass.close()
        self.recent.clear()


class StreamingReader:
    """Per-class shuffled repeating streams over shards at any URL webdataset opens (see the module doc).

    :meth:`get` returns the encoded sample at a position of one pass of a class; passes are
    identified by a caller-chosen integer ``key`` (the episode sources use ``(seed, split, epoch,
    pass)``), and the order inside a pass is a pure function of the key and the class. Reading
    positions in increasing order streams; going back reopens the pass and fast-forwards.

    Args:
        index: the index, whose ``shards`` are the URLs (:func:`load_stream_index`).
        invert: map pixel ``v`` to ``255 - v`` when decoding.
        buffer_size: shuffle buffer per class stream, in samples.
        max_open_streams: class streams open at once per process (least recently used closed first).
        retries: retries of a shard that fails to open or read, before the error names its URL.
        retry_delay: seconds before the first retry (doubled for each further one).

    """

    def __init__(self, index: ShardIndex, invert: bool = False, buffer_size: int = 128, max_open_streams: int = 128,
                 retries: int = 3, retry_delay: float = 1.0) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size={buffer_size} must be >= 1")
        if max_open_streams < 1:
            raise ValueError(f"max_open_streams={max_open_streams} must be >= 1")
        if retries < 0:
            raise ValueError(f"retries={retries} must be >= 0")
        self.index = index
        self.invert = invert
        self.buffer_size = buffer_size
        self.max_open_streams = max_open_streams
        self.retries = retries
        self.retry_delay = retry_delay
        self._streams: OrderedDict[int, _ClassStream] = OrderedDict()
        self._pid = os.getpid()
        self.passes_opened = 0  # statistics for tests and benchmarks
        self.shard_opens = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_streams"] = OrderedDict()
        return state

    # ------------------------------------------------------------ members
    def _read_once(self, url: str, wanted: list[tuple[int, int]]) -> Iterator[bytes]:
        self.shard_opens += 1
        stream = _gopen(url)
        try:
            if is_local_url(url):
                for off, size in wanted:
                    stream.seek(off)
                    data = stream.read(size)
                    if len(data) != size:
                        raise _Mismatch(f"shard {url} ends before the member at byte {off} that the index lists: it "
                                        "was truncated or changed after indexing; re-create it or rebuild the index")
                    yield data
                return
            j = 0
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    for info in tar:
                        if not info.isfile() or info.offset_data < wanted[j][0]:
                            continue
                        off, size = wanted[j]
                        if info.offset_data != off or info.size != size:
                            raise _Mismatch(f"shard {url} has member {info.name!r} at byte {info.offset_data} where "
                                            f"the index lists a {size}-byte member at byte {off}: the index is out of "
                                            "date; rebuild it with `lightning-meta index <shard folder>`")
                        data = tar.extractfile(info).read()
                        if len(data) != size:
                            raise EOFError(f"member {info.name!r} of {url} ended early")
                        yield data
                        j += 1
                        if j == len(wanted):
                            return
                raise _Mismatch(f"shard {url} ended before the member at byte {wanted[j][0]} that the index lists: it "
                                "is truncated or the index is out of date; re-create the shard or rebuild the index")
            except (_Mismatch, tarfile.TarError, EOFError) as e:
                status = _failed_status(stream)  # a failed command looks like a short or empty tar: say why
                if status is not None:
                    raise OSError(f"command exited with status {status} ({e})") from e
                raise
        finally:
            _quiet_close(stream)

    def _shard_members(self, url: str, wanted: list[tuple[int, int]]) -> Iterator[bytes]:
        """Members at ``wanted`` (offset, size) of one shard, in order; failed reads resume after the last one read."""
        done, attempt = 0, 0
        while done < len(wanted):
            try:
                with contextlib.closing(self._read_once(url, wanted[done:])) as members:
                    for data in members:
                        done += 1
                        yield data
            except ShardError:
                raise
            except _RETRYABLE as e:
                attempt += 1
                if attempt > self.retries:
                    raise ShardError(
                        f"cannot read shard {url}: failed {attempt} time(s) (retries={self.retries}); last error: "
                        f"{type(e).__name__}: {e}. Check that the URL is reachable, or raise retries"
                    ) from e
                time.sleep(self.retry_delay * 2 ** (attempt - 1))

    def _class_members(self, class_pos: int) -> Iterator[bytes]:
        members = sorted(self.index.classes[class_pos].members)
        start = 0
        while start < len(members):
            shard = members[start][0]
            stop = start
            while stop < len(members) and members[stop][0] == shard:
                stop += 1
            yield from self._shard_members(self.index.shards[shard], [(m[1], m[2]) for m in members[start:stop]])
            start = stop

    # ------------------------------------------------------------ streams
    def _check_pid(self) -> None:
        if os.getpid() != self._pid:  # a forked worker: never touch the parent's files or pipes
            self._streams, self._pid = OrderedDict(), os.getpid()

    def get(self, class_pos: int, key: tuple[int, ...], pos: int) -> bytes:
        """Return the encoded sample at position ``pos`` of the pass ``key`` of class ``index.classes[class_pos]``.

        Raises:
            ShardError: the shard cannot be read after the retries (naming its URL), or its members
                do not match the index.

        """
        self._check_pid()
        s = self._streams.get(class_pos)
        if s is None or s.key != tuple(key) or not s.can_reach(pos):
            cached = s.the_pass.cached if s is not None else None
            if s is not None:
                s.close()
            rng = np.random.default_rng(np.random.SeedSequence([*map(int, key), int(class_pos), 0x5EA3]))
            members = iter(cached) if cached is not None else self._class_members(class_pos)
            the_pass = _Pass(members, rng, self.buffer_size)
            if cached is not None:
                the_pass.cached = cached
            s = _ClassStream(the_pass, tuple(key), self.index.classes[class_pos].name)
            self._streams[class_pos] = s
            self.passes_opened += 1
        self._streams.move_to_end(class_pos)
        while len(self._streams) > self.max_open_streams:
            _, old = self._streams.popitem(last=False)
            old.close()
        return s.get(pos)

    def decode(self, class_pos: int, data: bytes) -> Tensor:
        """Decode an image to ``[C, H, W]`` float32 in ``[0, 1]`` (raises the decoder's error for damaged bytes)."""
        arr = decode_image(data, self.index.classes[class_pos].ext)
        if self.invert:
            arr = 255 - arr
        t = torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True))
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)
        return t.to(torch.float32).div_(255.0)

    @property
    def open_streams(self) -> int:
        """Class streams open now (at most ``max_open_streams``)."""
        return len(self._streams)

    @property
    def buffered_samples(self) -> int:
        """Encoded samples held by all open streams (shuffle buffers and recent samples)."""
        return sum(s.the_pass.buffered + len(s.recent) for s in self._streams.values())

    def close(self) -> None:
        """Close every open stream (files and pipes)."""
        self._check_pid()
        while self._streams:
            _, s = self._streams.popitem()
            s.close()

