"""Few-shot classification episodes from webdataset shards (and the embedded default data set).

Two readers (DESIGN §2): ``indexed`` (random access through ``index.json``, the default) and
``streaming`` (one shuffled repeating stream per class, for remote or huge shard sets, see
:mod:`lightning_meta.data.streaming`). Two episode shapes: fixed N-way K-shot, and Meta-Dataset's
variable-way variable-shot episodes (REFERENCE §5, :mod:`lightning_meta.data.variable`). Several
shard sets can be mixed, one source per episode chosen uniformly.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_meta.data.faults import DECODE_ERRORS, SampleCounter
from lightning_meta.data.glyphs import default_glyph_shards
from lightning_meta.data.sampling import SPLIT_CODES, FixedShape, episode_rng, sample_fixed
from lightning_meta.data.shards import ClassEntry, IndexedReader, ShardIndex, load_index
from lightning_meta.data.streaming import SCAN_INDEX, StreamingReader, load_stream_index
from lightning_meta.data.variable import VariableShape, check_variable, sample_variable, usable_groups
from lightning_meta.datamodules.base import EpisodicDataModule
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError, ShardError, require_non_negative

__all__ = [
    "MultiSourceEpisodes",
    "ShardDataModule",
    "ShardEpisodeSource",
    "SkippedSamplesLogger",
    "StreamingEpisodeSource",
]

Shape = FixedShape | VariableShape
Plan = list[tuple[int, int, int]]  # (class position in the split, shots, queries)

DEFAULT_SPLIT_RATIOS = (0.64, 0.16, 0.20)  # train/val/test fractions of an index without splits


def _supports_variable(model: Any) -> bool:
    """Whether a model can consume episodes whose way and shots change from one episode to the next."""
    flag = getattr(type(model), "supports_variable_episodes", None)
    if flag is not None:
        return bool(flag)
    from lightning_meta.algorithms.matching import MatchingNet
    from lightning_meta.algorithms.metaoptnet import MetaOptNet
    from lightning_meta.algorithms.protonet import ProtoNet

    # metric-based learners have no way-sized head: prototypes / attention / ridge targets follow the episode
    return isinstance(model, (ProtoNet, MatchingNet, MetaOptNet))


class _EpisodeSourceBase:
    """Shared by both readers: episode plans, corrupt-sample replacement and the Episode layout."""

    def __init__(self, index: ShardIndex, class_positions: Sequence[int], shape: Shape, seed: int,
                 hierarchical: bool = False, counter: SampleCounter | None = None) -> None:
        self.class_positions = list(class_positions)
        self.counts = [index.classes[p].count for p in self.class_positions]
        self.shape = shape
        self.seed = seed
        self.counter = counter if counter is not None else SampleCounter()
        self.groups = None
        if isinstance(shape, VariableShape):
            names = [index.classes[p].name for p in self.class_positions]
            if hierarchical:
                self.groups = usable_groups([index.classes[p].group for p in self.class_positions], shape.min_ways)
            check_variable(self.counts, shape, self.groups, names)

    @property
    def variable(self) -> bool:
        """True for variable-way variable-shot episodes."""
        return isinstance(self.shape, VariableShape)

    def plan(self, rng: np.random.Generator) -> Plan:
        """Classes (positions in this split), shots and queries of one episode.

        For fixed shapes the classes are the first draw of :func:`~lightning_meta.data.sampling.sample_fixed`,
        so both readers pick the same classes for the same episode.
        """
        if self.variable:
            return sample_variable(rng, self.counts, self.shape, self.groups)
        classes = rng.choice(len(self.counts), size=self.shape.ways, replace=False)
        return [(int(c), self.shape.shots, self.shape.queries) for c in classes]

    def _fill(self, class_pos: int, wanted: Sequence[int], spare: Iterator[int], load: Any,
              what: Any) -> tuple[list[Tensor], int]:
        """Images of ``wanted`` members; a corrupt one is counted, warned about and replaced from ``spare``."""
        out: list[Tensor] = []
        reads = 0
        for m in wanted:
            while True:
                reads += 1
                try:
                    out.append(load(class_pos, m))
                    break
                except ShardError:
                    raise
                except DECODE_ERRORS as e:
                    self.counter.read(reads)
                    reads = 0
                    self.counter.skip(what(class_pos, m), e)
                    m = next(spare, None)
                    if m is None:
                        raise ShardError(f"class {what(class_pos, None)} has too many corrupt samples to fill an "
                                         f"episode of {len(wanted)} examples; re-create its shard") from e
        return out, reads

    @staticmethod
    def _episode(per_class: list[tuple[list[Tensor], int, int]], ids: list[int]) -> Episode:
        """``per_class``: ``(images, shots, queries)`` in label order; the first ``shots`` images are support."""
        sx, qx = [], []
        for imgs, k, _ in per_class:
            sx += imgs[:k]
            qx += imgs[k:]
        try:
            support_x, query_x = torch.stack(sx), torch.stack(qx)
        except RuntimeError as e:
            raise MetaConfigError(
                f"images of different sizes in one episode ({e}); resize the data set to one size when converting"
            ) from e
        # labels from Python lists: repeat_interleave with tensor repeats can cost milliseconds (thread pool)
        return Episode(
            support_x=support_x,
            support_y=torch.tensor([y for y, (_, k, _) in enumerate(per_class) for _ in range(k)], dtype=torch.long),
            query_x=query_x,
            query_y=torch.tensor([y for y, (_, _, q) in enumerate(per_class) for _ in range(q)], dtype=torch.long),
            classes=torch.tensor(ids, dtype=torch.long),
        )


class ShardEpisodeSource(_EpisodeSourceBase):
    """Episodes over the classes of one split, read through an index (the ``indexed`` reader).

    Fixed shapes give exact N-way K-shot episodes; :class:`~lightning_meta.data.variable.VariableShape`
    gives Meta-Dataset episodes. A sample that cannot be decoded is skipped (counted by
    ``counter``, which raises past its threshold) and replaced by the next member of its class
    that is not in the episode, so the episode keeps its shape and stays a pure function of
    ``(seed, split, epoch, index)`` and the data.

    Args:
        reader: the indexed reader (shared by all splits of a shard set).
        class_positions: positions in ``reader.index.classes`` that belong to this split.
        shape: episode shape.
        seed: data seed.
        hierarchical: variable shapes only: draw a group (the index's ``group``, e.g. the Omniglot
            alphabet) first, then the classes inside it.
        counter: corrupt-sample counter (a private one by default).

    """

    def __init__(self, reader: IndexedReader, class_positions: Sequence[int], shape: Shape, seed: int,
                 hierarchical: bool = False, counter: SampleCounter | None = None) -> None:
        super().__init__(reader.index, class_positions, shape, seed, hierarchical, counter)
        self.reader = reader

    def sample(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
        """Draw the classes (local positions) and members of a fixed-shape episode; subclasses may override."""
        return sample_fixed(rng, self.counts, self.shape)

    def draw(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray, int]]:
        """``(local class, members, shots)`` of one episode; the first ``shots`` members are the support."""
        if not self.variable:
            return [(local, members, self.shape.shots) for local, members in self.sample(rng)]
        return [(local, rng.choice(self.counts[local], size=k + q, replace=False), k) for local, k, q in self.plan(rng)]

    def _what(self, pos: int, member: int | None) -> str:
        c = self.reader.index.classes[pos]
        if member is None:
            return f"{c.name!r} (id {c.id})"
        shard = self.reader.index.shards[c.members[member][0]]
        return f"{member} of class {c.name!r} (id {c.id}) in {shard}"

    def episode(self, split: str, epoch: int, index: int) -> Episode:
        """Episode ``index`` of ``(split, epoch)``; a pure function of (seed, split, epoch, index)."""
        rng = episode_rng(self.seed, split, epoch, index)
        per_class, ids, reads = [], [], 0
        for local, members, k in self.draw(rng):
            pos = self.class_positions[local]
            count = self.counts[local]
            used = {int(m) for m in members}
            last = int(members[-1])
            spare = (c for c in ((last + j) % count for j in range(1, count)) if c not in used)
            imgs, r = self._fill(pos, [int(m) for m in members], spare, self.reader.image, self._what)
            reads += r
            per_class.append((imgs, k, len(members) - k))
            ids.append(self.reader.index.classes[pos].id)
        self.counter.read(reads)
        return self._episode(per_class, ids)

    def first_image_shape(self) -> tuple[int, ...]:
        """Shape ``[C, H, W]`` of the first image of the split (to check that sources agree)."""
        return tuple(self.reader.image(self.class_positions[0], 0).shape)


@dataclass
class _Fold:
    """Per-class cursors ``(pass, position)`` after the episodes ``< next`` of one ``(split, epoch)``."""

    key: tuple[str, int]
    next: int
    cursor: dict[int, tuple[int, int]]


class StreamingEpisodeSource(_EpisodeSourceBase):
    """Episodes over the classes of one split, read as one shuffled repeating stream per class.

    Episode ``i`` draws its plan (classes, shots, queries) from its own generator, exactly like
    :class:`ShardEpisodeSource`, so both readers choose the same classes. Its examples are the
    next ``shots + queries`` of each class stream: the cursor of class ``c`` before episode ``i``
    is the sum of what the episodes ``0 .. i-1`` of the epoch took from ``c``, with flush-on-wrap
    (an episode that needs more than the current pass has left starts the next pass). Cursors are
    computed from the plans alone, without reading data, so an episode is a pure function of
    ``(seed, split, epoch, index)`` and the data, whatever the number of devices and workers, and a
    resumed run continues with exactly the episodes it had not consumed. Streams restart at each
    epoch (passes are reshuffled per epoch). Each process streams through every episode's
    examples (skipped ones are read, not decoded), which keeps this layout independence.

    A corrupt sample is skipped (counted, warned) and replaced by the next example of the same
    pass after the episode's range (wrapping to the start of the pass), so no example repeats.

    Args:
        reader: the streaming reader.
        class_positions: positions in ``reader.index.classes`` that belong to this split.
        shape: episode shape.
        seed: data seed.
        hierarchical: variable shapes only: group (alphabet) first.
        counter: corrupt-sample counter.
        owns: for multi-source training, ``owns(split, epoch, index)`` says which episodes belong to
            this source (the cursors skip the others); None: every episode.

    """

    def __init__(self, reader: StreamingReader, class_positions: Sequence[int], shape: Shape, seed: int,
                 hierarchical: bool = False, counter: SampleCounter | None = None, owns: Any = None) -> None:
        super().__init__(reader.index, class_positions, shape, seed, hierarchical, counter)
        self.reader = reader
        self.owns = owns
        self._fold: _Fold | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fold"] = None
        return state

    def _plan_at(self, split: str, epoch: int, index: int) -> Plan:
        return self.plan(episode_rng(self.seed, split, epoch, index))

    def _advance(self, cursor: dict[int, tuple[int, int]], plan: Plan) -> list[tuple[int, int, int]]:
        """Move the cursors past one episode; return its ``(local class, pass, start)`` ranges."""
        out = []
        for local, k, q in plan:
            need = k + q
            p, at = cursor.get(local, (0, 0))
            if at + need > self.counts[local]:  # flush on wrap: never split an episode across two passes
                p, at = p + 1, 0
            cursor[local] = (p, at + need)
            out.append((local, p, at))
        return out

    def ranges(self, split: str, epoch: int, index: int) -> tuple[Plan, list[tuple[int, int, int]]]:
        """Return the plan of episode ``index`` and where its classes read: ``(local class, pass, start)``."""
        key = (split, int(epoch))
        fold = self._fold
        if fold is None or fold.key != key or fold.next > index:
            fold = self._fold = _Fold(key, 0, {})
        while fold.next < index:
            if self.owns is None or self.owns(split, epoch, fold.next):
                self._advance(fold.cursor, self._plan_at(split, epoch, fold.next))
            fold.next += 1
        plan = self._plan_at(split, epoch, index)
        where = self._advance(fold.cursor, plan)
        fold.next = index + 1
        return plan, where

    def _what(self, pos: int, member: int | None) -> str:
        c = self.reader.index.classes[pos]
        if member is None:
            return f"{c.name!r} (id {c.id})"
        return f"at stream position {member} of class {c.name!r} (id {c.id})"

    def episode(self, split: str, epoch: int, index: int) -> Episode:
        """Episode ``index`` of ``(split, epoch)`` (see the class doc for why it is a pure function)."""
        plan, where = self.ranges(split, epoch, index)
        per_class, ids, reads = [], [], 0
        for (local, k, q), (_, p, start) in zip(plan, where, strict=True):
            pos = self.class_positions[local]
            n = self.counts[local]
            key = (self.seed, SPLIT_CODES[split], int(epoch), p)
            spare = itertools.chain(range(start + k + q, n), range(0, start))

            def load(class_pos: int, position: int, key: tuple[int, ...] = key) -> Tensor:
                return self.reader.decode(class_pos, self.reader.get(class_pos, key, position))

            imgs, r = self._fill(pos, list(range(start, start + k + q)), spare, load, self._what)
            reads += r
            per_class.append((imgs, k, q))
            ids.append(self.reader.index.classes[pos].id)
        self.counter.read(reads)
        return self._episode(per_class, ids)

    def first_image_shape(self) -> tuple[int, ...]:
        """Shape ``[C, H, W]`` of one image of the split (streams one sample; the stream is closed after)."""
        pos = self.class_positions[0]
        try:
            return tuple(self.reader.decode(pos, self.reader.get(pos, (self.seed, 99, 0, 0), 0)).shape)
        finally:
            self.reader.close()


class _Chooser:
    """Which source episode ``(split, epoch, index)`` comes from: uniform, a pure function of the key."""

    def __init__(self, seed: int, n: int) -> None:
        self.seed = seed
        self.n = n

    def __call__(self, split: str, epoch: int, index: int) -> int:
        key = np.random.SeedSequence([int(self.seed), SPLIT_CODES[split], int(epoch), int(index), 0x5041])
        return int(np.random.default_rng(key).integers(self.n))


class _Owns:
    """``owns(split, epoch, index)`` for source ``k`` of a mixture (picklable)."""

    def __init__(self, chooser: _Chooser, k: int) -> None:
        self.chooser = chooser
        self.k = k

    def __call__(self, split: str, epoch: int, index: int) -> bool:
        return self.chooser(split, epoch, index) == self.k


class MultiSourceEpisodes:
    """Multi-source episodes: each one comes from a source chosen uniformly (Meta-Dataset training).

    The choice is a pure function of ``(seed, split, epoch, index)``, drawn independently of the
    episode's content; the chosen source then makes episode ``index`` as it would alone.

    Args:
        sources: the per-source episode sources (same split).
        names: the sources' shard specs (for messages and :meth:`source_of`).
        chooser: the uniform choice (shared with streaming sources, whose cursors skip the
            episodes of the other sources).

    Example:
        >>> mix = MultiSourceEpisodes([a, b], ["a", "b"], _Chooser(0, 2))  # doctest: +SKIP
        >>> mix.source_of("train", 0, 7)                                    # doctest: +SKIP
        1

    """

    def __init__(self, sources: Sequence[Any], names: Sequence[str], chooser: _Chooser) -> None:
        self.sources = list(sources)
        self.names = list(names)
        self.chooser = chooser

    def source_of(self, split: str, epoch: int, index: int) -> int:
        """Position of the source of an episode."""
        return self.chooser(split, epoch, index)

    def episode(self, split: str, epoch: int, index: int) -> Episode:
        """Episode ``index`` of the source chosen for it."""
        return self.sources[self.source_of(split, epoch, index)].episode(split, epoch, index)

    def first_image_shape(self) -> tuple[int, ...]:
        """Shape ``[C, H, W]`` of the images (all sources hold one shape; checked when they are built)."""
        return self.sources[0].first_image_shape()

    @property
    def counter(self) -> SampleCounter:
        """The corrupt-sample counter the sources share."""
        return self.sources[0].counter


class SkippedSamplesLogger(Callback):
    """Logs the corrupt samples the datamodule skipped (``data/skipped_samples``, ``data/skipped_fraction``).

    :class:`ShardDataModule` adds it to the trainer by itself; it logs only once a sample was
    skipped, so clean runs pay nothing. Counts are per rank (rank 0 is what loggers record).
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Log the counts when a sample was skipped."""
        dm = trainer.datamodule
        counts = getattr(dm, "skipped_samples", None)
        if counts is None:
            return
        read, skipped = counts()
        if skipped:
            pl_module.log("data/skipped_samples", float(skipped), batch_size=1)
            pl_module.log("data/skipped_fraction", skipped / max(read, 1), batch_size=1)


@dataclass
class _ShardSet:
    spec: Any
    index: ShardIndex
    reader: IndexedReader | StreamingReader


class ShardDataModule(EpisodicDataModule):
    """Few-shot episodes from class-grouped webdataset shards.

    With ``shards=None`` it uses the embedded default data set (procedural glyph alphabets,
    generated offline into the cache folder on first use). Shards written by ``lightning-meta
    convert`` carry their train/val/test split in the index; for third-party shards without one,
    the index is built and cached automatically and classes are split by ``split_ratios``, unless
    ``val_shards`` / ``test_shards`` name separate shard sets.

    **Readers.** ``indexed`` (default) reads members by byte offset through ``index.json``.
    ``streaming`` reads one shuffled repeating stream per class from any URL webdataset opens
    (``https://``, ``gs://``, ``pipe:<command>``, paths), with per-class cursors and flush-on-wrap
    (:mod:`lightning_meta.data.streaming`); its sample memory per process is at most
    ``max_open_streams * (stream_buffer + 16)`` encoded samples whatever the data set size. Both
    readers draw the same classes and shots for an episode and honour the sampling contract and
    exact resume; they differ in which examples of a class an episode gets.

    **Episode shapes.** ``fixed``: ``ways``-way ``shots``-shot with ``queries`` per class.
    ``variable``: Meta-Dataset's variable-way variable-shot sampler (REFERENCE §5), bounded by
    ``min_ways .. max_ways``, ``max_queries``, ``max_support`` and ``max_support_per_class``; with
    ``hierarchy`` the group (Omniglot alphabet) is drawn first. Variable episodes cannot be stacked,
    so they need one episode per device per step (``meta_batch_size`` = number of devices,
    ``eval_meta_batch_size=1``; use ``accumulate_grad_batches`` for more episodes per update) and
    a model without a way-sized head (ProtoNet, MatchingNet, MetaOptNet, or a class with
    ``supports_variable_episodes = True``).

    **Sources.** ``sources=[spec, ...]`` trains on several shard sets, each episode from one
    chosen uniformly (validation and test episodes too, from the sources that have classes in
    that split); all sources must hold images of one shape.

    **Corrupt samples** are skipped with a :class:`~lightning_meta.data.faults.CorruptSampleWarning`,
    replaced by another example of the class, counted (``skipped_samples()``, logged as
    ``data/skipped_samples``), and the run stops with a :class:`~lightning_meta.errors.ShardError`
    once more than ``max_corrupt_fraction`` of the samples read were skipped.

    The episode shape, meta-batch, episode count, seed and worker arguments are
    :class:`~lightning_meta.datamodules.EpisodicDataModule`'s (described there).

    Args:
        shards: brace pattern (``data/train-{000000..000009}.tar``), glob, list, directory, or (streaming)
            URLs; ``None`` for the embedded default.
        val_shards: a separate shard set for validation: its classes labelled ``val`` when its index
            has such labels, else all its classes. A class that would also be used by another split
            is refused.
        test_shards: the same for the test split.
        verify: shard check before training: ``sha256`` (memoised per file), ``size``, or ``none``
            (local shards; remote streamed shards cannot be checked before they are read).
        invert: use ``255 - pixel`` (for black-ink-on-white images such as Omniglot).
        split_ratios: train/val/test fractions of classes when the index has no split.
        cache_mb: decoded-image cache per process, in MB (indexed reader).
        reader: ``indexed`` or ``streaming``.
        index: streaming: where ``index.json`` of ``shards`` is (path or URL); default: beside the
            first shard (for ``pipe:`` URLs, the command with the shard's file name replaced).
            ``"scan"``: third-party remote shards (of ``shards`` or of every source) that have no
            index are streamed once to build one (cached by URL list); without it a remote index
            that cannot be read is an error. Local shards without an index are indexed as by the
            indexed reader, with or without ``"scan"``.
        episode_shape: ``fixed`` or ``variable`` (training episodes).
        eval_episode_shape: shape of validation/test episodes (default: ``episode_shape``).
        hierarchy: variable episodes: ``auto`` (group first when every class of the split has a
            ``group`` in the index and every group has at least ``min_ways`` classes, as Omniglot
            alphabets do), ``group`` (group first; smaller groups are never drawn, with a warning),
            ``none`` (classes drawn from the whole split).
        min_ways: variable episodes: fewest classes per episode (Meta-Dataset: 5).
        max_ways: variable episodes: most classes per episode (Meta-Dataset: 50).
        max_queries: variable episodes: most query examples per class (Meta-Dataset: 10).
        max_support: variable episodes: most support examples per episode (Meta-Dataset: 500).
        max_support_per_class: variable episodes: the most one class adds to the draw of the support-set
            size (Meta-Dataset: 100; not a cap on the shots of a class).
        sources: several shard sets to mix (instead of ``shards``).
        stream_buffer: streaming: shuffle buffer per class stream, in samples.
        max_open_streams: streaming: class streams open at once per process.
        retries: streaming: retries of a shard that fails to open or read, then the error names its URL.
        retry_delay: streaming: seconds before the first retry (doubled for each further one).
        max_corrupt_fraction: fail once more than this fraction of the samples read so far were corrupt
            (of at least 100 samples while fewer were read; checked at each skip); 0 fails on the first one.

    Example:
        >>> dm = ShardDataModule(ways=5, shots=1, queries=15)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")                  # doctest: +SKIP
        >>> next(iter(dm.train_dataloader())).support_x.shape   # doctest: +SKIP
        torch.Size([4, 5, 1, 28, 28])
        >>> ShardDataModule("pipe:curl -s https://host/d/train-{000000..000009}.tar", reader="streaming",
        ...                 episode_shape="variable", meta_batch_size=1, eval_meta_batch_size=1)  # doctest: +SKIP

    """

    def __init__(
        self,
        shards: str | list[str] | None = None,
        val_shards: str | list[str] | None = None,
        test_shards: str | list[str] | None = None,
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        eval_ways: int | None = None,
        eval_shots: int | None = None,
        eval_queries: int = 15,
        meta_batch_size: int = 4,
        eval_meta_batch_size: int = 8,
        train_episodes: int = 2000,
        val_episodes: int = 100,
        test_episodes: int = 600,
        seed: int = 0,
        num_workers: int = 0,
        verify: Literal["sha256", "size", "none"] = "sha256",
        invert: bool = False,
        split_ratios: tuple[float, float, float] = DEFAULT_SPLIT_RATIOS,
        cache_mb: float = 256.0,
        reader: Literal["indexed", "streaming"] = "indexed",
        index: str | None = None,
        episode_shape: Literal["fixed", "variable"] = "fixed",
        eval_episode_shape: Literal["fixed", "variable"] | None = None,
        hierarchy: Literal["auto", "group", "none"] = "auto",
        min_ways: int = 5,
        max_ways: int = 50,
        max_queries: int = 10,
        max_support: int = 500,
        max_support_per_class: int = 100,
        sources: list[str] | None = None,
        stream_buffer: int = 128,
        max_open_streams: int = 128,
        retries: int = 3,
        retry_delay: float = 1.0,
        max_corrupt_fraction: float = 0.01,
    ) -> None:
        super().__init__(ways=ways, shots=shots, queries=queries, eval_ways=eval_ways, eval_shots=eval_shots,
                         eval_queries=eval_queries, meta_batch_size=meta_batch_size,
                         eval_meta_batch_size=eval_meta_batch_size, train_episodes=train_episodes,
                         val_episodes=val_episodes, test_episodes=test_episodes, seed=seed, num_workers=num_workers)
        if verify not in ("sha256", "size", "none"):
            raise MetaConfigError(f"verify={verify!r} is not supported; use 'sha256', 'size' or 'none'")
        if len(split_ratios) != 3 or any(r < 0 for r in split_ratios) or not np.isclose(sum(split_ratios), 1.0):
            raise MetaConfigError(f"split_ratios={split_ratios} must be three non-negative fractions summing to 1")
        if reader not in ("indexed", "streaming"):
            raise MetaConfigError(f"reader={reader!r} is not supported; use 'indexed' (local shards) or 'streaming' "
                                  "(remote or huge shard sets)")
        for name, value in (("episode_shape", episode_shape), ("eval_episode_shape", eval_episode_shape or "fixed")):
            if value not in ("fixed", "variable"):
                raise MetaConfigError(f"{name}={value!r} is not supported; use 'fixed' or 'variable'")
        if hierarchy not in ("auto", "group", "none"):
            raise MetaConfigError(f"hierarchy={hierarchy!r} is not supported; use 'auto', 'group' or 'none'")
        if index is not None and reader != "streaming":
            raise MetaConfigError(f"index={index!r} applies to reader='streaming' only; the indexed reader reads "
                                  "index.json beside the shards")
        if sources is not None:
            if shards is not None:
                raise MetaConfigError("both shards and sources are set; give one shard set as shards=..., or several "
                                      "as sources=[...]")
            if isinstance(sources, str) or len(sources) == 0:
                raise MetaConfigError(f"sources={sources!r} must be a non-empty list of shard sets")
            if index is not None and index != SCAN_INDEX:
                raise MetaConfigError(f"index={index!r} applies to shards=...; with sources, put each index.json "
                                      f"beside its shards (index={SCAN_INDEX!r} scans every source that has none)")
        if stream_buffer < 1:
            raise MetaConfigError(f"stream_buffer={stream_buffer} must be >= 1 (samples per class stream)")
        if max_open_streams < 1:
            raise MetaConfigError(f"max_open_streams={max_open_streams} must be >= 1")
        if retries < 0:
            raise MetaConfigError(f"retries={retries} must be >= 0")
        require_non_negative("retry_delay", retry_delay, "seconds before the first streaming retry")
        require_non_negative("cache_mb", cache_mb, "the decoded-image cache per process in MB; 0 disables it")
        if not 0.0 <= max_corrupt_fraction <= 1.0:
            raise MetaConfigError(f"max_corrupt_fraction={max_corrupt_fraction} must be in [0, 1] (0 fails on the "
                                  "first corrupt sample)")
        self.variable_shape = VariableShape(min_ways, max_ways, max_queries, max_support, max_support_per_class)
        self.episode_shape = episode_shape
        self.eval_episode_shape = eval_episode_shape or episode_shape
        if self.eval_episode_shape == "variable" and eval_meta_batch_size != 1:
            raise MetaConfigError(
                f"variable-way evaluation episodes cannot be stacked into meta-batches of eval_meta_batch_size="
                f"{eval_meta_batch_size}; set eval_meta_batch_size=1 (or eval_episode_shape='fixed')"
            )
        self.shards = shards
        self.val_shards = val_shards
        self.test_shards = test_shards
        self.verify = verify
        self.invert = invert
        self.split_ratios = tuple(split_ratios)
        self.cache_mb = cache_mb
        self.reader = reader
        self.index = index
        self.hierarchy = hierarchy
        self.source_specs = list(sources) if sources is not None else None
        self.stream_buffer = stream_buffer
        self.max_open_streams = max_open_streams
        self.retries = retries
        self.retry_delay = retry_delay
        self.max_corrupt_fraction = max_corrupt_fraction
        self._readers: dict[str, IndexedReader] = {}
        self._stream_readers: dict[str, StreamingReader] = {}
        self._counters: dict[str, SampleCounter] = {}
        self._restored_counts: tuple[int, int] | None = None
        # (read, skipped) of the training batches the trainer consumed: what a checkpoint saves, so a
        # resumed run counts like an uninterrupted one whatever the workers had prefetched
        self._consumed: list[int] | None = None
        self._split_specs: dict[str, str] = {}

    # ------------------------------------------------------------ shard sets
    def _train_spec(self) -> str | list[str]:
        return str(default_glyph_shards()) if self.shards is None else self.shards

    def _train_specs(self) -> list[Any]:
        return list(self.source_specs) if self.source_specs is not None else [self._train_spec()]

    def prepare_data(self) -> None:
        """Generate the embedded default on first use and build indices of third-party shards (rank 0)."""
        for spec in (*self._train_specs(), self.val_shards, self.test_shards):
            if spec is None:
                continue
            if self.reader == "streaming":
                load_stream_index(spec, self._index_of(spec), "none", self.retries, self.retry_delay)
            else:
                load_index(spec, verify="none")

    def _reader(self, spec: str | list[str]) -> IndexedReader:
        key = repr(spec)
        if key not in self._readers:
            self._readers[key] = IndexedReader(load_index(spec, verify=self.verify), self.invert, self.cache_mb)
        return self._readers[key]

    def _index_of(self, spec: Any) -> str | None:
        """The ``index`` argument for a shard set: ``index`` for ``shards``, ``"scan"`` for every set."""
        return self.index if spec is self.shards or self.index == SCAN_INDEX else None

    def _stream_reader(self, spec: str | list[str]) -> StreamingReader:
        key = repr(spec)
        if key not in self._stream_readers:
            index = load_stream_index(spec, self._index_of(spec), self.verify, self.retries, self.retry_delay)
            self._stream_readers[key] = StreamingReader(index, self.invert, self.stream_buffer, self.max_open_streams,
                                                        self.retries, self.retry_delay)
        return self._stream_readers[key]

    def _open(self, spec: Any) -> _ShardSet:
        r = self._stream_reader(spec) if self.reader == "streaming" else self._reader(spec)
        return _ShardSet(spec, r.index, r)

    @staticmethod
    def _check_distinct_sources(sets: list[_ShardSet]) -> None:
        """Refuse sources that share a shard: it would be drawn twice as often, its streams read twice."""
        owner: dict[str, int] = {}
        for k, sset in enumerate(sets):
            for shard in sset.index.shards:
                first = owner.setdefault(shard, k)
                if first != k:
                    raise MetaConfigError(
                        f"sources {first} ({sets[first].spec!r}) and {k} ({sset.spec!r}) both hold the shard {shard}; "
                        "each episode comes from one source chosen uniformly, so a shard set given twice would be "
                        "drawn twice as often. List every shard set once"
                    )

    def _check_split_ratios_used(self, sets: list[_ShardSet]) -> None:
        """Refuse a non-default ``split_ratios`` that no index uses (every one assigns its own splits)."""
        if np.allclose(self.split_ratios, DEFAULT_SPLIT_RATIOS) or not sets:
            return
        if all(any(c.split for c in s.index.classes) for s in sets):
            where = (sets[0].index.path or sets[0].spec or "the embedded default") if len(sets) == 1 else \
                f"all {len(sets)} sources"
            raise MetaConfigError(
                f"split_ratios={self.split_ratios} would be ignored: the index of {where} already assigns every "
                "class to train/val/test (split_ratios only splits an index without splits). Leave split_ratios at "
                "its default, or write the shards without splits (`lightning-meta convert` without --split-ratios "
                "or split folders) to split them here"
            )

    def _split_positions(self, index: ShardIndex) -> dict[str, list[int]]:
        labelled = any(c.split for c in index.classes)
        if labelled:
            out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
            unknown: dict[str, list[str]] = {}
            for i, c in enumerate(index.classes):
                if c.split in out:
                    out[c.split].append(i)
                else:  # an unlabelled class, or a split name no datamodule split asks for
                    unknown.setdefault(str(c.split), []).append(c.name)
            if unknown:
                listing = "; ".join(
                    f"split={k!r}: {len(v)} classes (e.g. {', '.join(v[:3])})" for k, v in unknown.items()
                )
                raise MetaConfigError(
                    f"the index {index.path or ''} assigns classes to splits other than train/val/test ({listing}); "
                    "label every class train, val or test (rewrite the shards with ShardWriter(split=...) or "
                    "`lightning-meta convert`, then `lightning-meta index`)"
                )
            return out
        order = np.random.default_rng(np.random.SeedSequence([self.seed, 4242])).permutation(len(index.classes))
        n = len(order)
        n_train = int(round(self.split_ratios[0] * n))
        n_val = int(round(self.split_ratios[1] * n))
        return {"train": sorted(order[:n_train].tolist()), "val": sorted(order[n_train:n_train + n_val].tolist()),
                "test": sorted(order[n_train + n_val:].tolist())}

    # ------------------------------------------------------------ shapes
    def _shape(self, split: str) -> Shape:
        kind = self.episode_shape if split == "train" else self.eval_episode_shape
        if kind == "variable":
            return self.variable_shape
        if split == "train":
            return FixedShape(self.ways, self.shots, self.queries)
        return FixedShape(self.eval_ways, self.eval_shots, self.eval_queries)

    def _hierarchical(self, split: str, spec: Any, entries: list[ClassEntry]) -> bool:
        """Whether variable episodes of a split draw a group first (``hierarchy``; see the class doc)."""
        if self.hierarchy == "none":
            return False
        grouped = bool(entries) and all(c.group is not None for c in entries)
        if self.hierarchy == "auto":
            sizes: dict[str, int] = {}
            for c in entries:
                sizes[str(c.group)] = sizes.get(str(c.group), 0) + 1
            # only when every class can be reached: a group smaller than min_ways would never be drawn
            return grouped and min(sizes.values()) >= self.variable_shape.min_ways
        if not grouped:
            missing = next((c for c in entries if c.group is None), None)
            raise MetaConfigError(
                f"hierarchy='group' needs a group for every class, but class "
                f"{missing.name if missing else '?'!r} of the {split} split of {spec} has none (index.json 'group', "
                "written by `lightning-meta convert omniglot`); use hierarchy='auto' or 'none'"
            )
        small = sorted({str(c.group) for c in entries} - {str(entries[int(g[0])].group) for g in usable_groups(
            [c.group for c in entries], self.variable_shape.min_ways)})
        if small:
            rank_zero_warn(f"hierarchy='group': {len(small)} group(s) of the {split} split of {spec} have fewer than "
                           f"min_ways={self.variable_shape.min_ways} classes and are never sampled (e.g. {small[0]!r})")
        return True

    def _check(self, split: str, spec: str, entries: list[ClassEntry], shape: Shape,
               hierarchical: bool | None = None) -> None:
        if isinstance(shape, VariableShape):
            groups = None
            if hierarchical is None:
                hierarchical = self._hierarchical(split, spec, entries)
            if hierarchical:
                groups = usable_groups([c.group for c in entries], shape.min_ways)
            check_variable([c.count for c in entries], shape, groups, [c.name for c in entries],
                           f"the {split} split of {spec}")
            return
        if len(entries) < shape.ways:
            raise MetaConfigError(
                f"{shape.ways}-way {split} episodes need {shape.ways} classes but the {split} split of {spec} has "
                f"{len(entries)}; lower {'ways' if split == 'train' else 'eval_ways'} or add classes"
            )
        small = [c for c in entries if c.count < shape.per_class]
        if small:
            c = small[0]
            raise MetaConfigError(
                f"class {c.name!r} (id {c.id}) in the {split} split has {c.count} examples but an episode needs "
                f"shots + queries = {shape.shots} + {shape.queries} = {shape.per_class}; lower shots/queries "
                f"({len(small)} class(es) are too small) or remove those classes"
            )

    def _make_source(self, sset: _ShardSet, positions: list[int], shape: Shape, split: str, hierarchical: bool,
                     counter: SampleCounter, owns: Any = None) -> Any:
        if isinstance(sset.reader, StreamingReader):
            return StreamingEpisodeSource(sset.reader, positions, shape, self.seed, hierarchical, counter, owns)
        return ShardEpisodeSource(sset.reader, positions, shape, self.seed, hierarchical, counter)

    # ------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Load and verify the indices, assign classes to splits and check that the episode shapes fit."""
        train_sets = [self._open(spec) for spec in self._train_specs()]
        self._check_distinct_sources(train_sets)
        self._check_split_ratios_used(train_sets)
        positions = [self._split_positions(s.index) for s in train_sets]
        plan: dict[str, list[tuple[_ShardSet, list[int]]]] = {
            "train": [(s, p["train"]) for s, p in zip(train_sets, positions, strict=True)]
        }
        for split, extra in (("val", self.val_shards), ("test", self.test_shards)):
            if extra is not None:
                s = self._open(extra)
                # a labelled set contributes its classes of this split; an unlabelled one all of them
                own = [i for i, c in enumerate(s.index.classes) if c.split == split]
                plan[split] = [(s, own or list(range(len(s.index.classes))))]
            else:
                plan[split] = [(s, p[split]) for s, p in zip(train_sets, positions, strict=True)]
        self._check_disjoint(plan)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage or "", ("train", "val", "test")):
            self.sources[split] = self._build_split(split, plan[split])
            self._inputs_checked.pop(split, None)
            self._split_specs[split] = ", ".join(dict.fromkeys(str(s.spec) for s, _ in plan[split]))
        self.split_sizes = {s: sum(len(p) for _, p in parts) for s, parts in plan.items()}
        self._check_model()  # (images vs the backbone's in_channels / image_size: checked by each dataloader)
        trainer = getattr(self, "trainer", None)
        callbacks = getattr(trainer, "callbacks", None)
        if isinstance(callbacks, list) and not any(isinstance(c, SkippedSamplesLogger) for c in callbacks):
            callbacks.append(SkippedSamplesLogger())

    @staticmethod
    def _check_disjoint(plan: dict[str, list[tuple[_ShardSet, list[int]]]]) -> None:
        """Refuse a class that two splits would both use.

        Two classes of the same name are the same class when their members lie in at least one
        common shard file (resolved paths), so the same shards given as ``shards`` and
        ``val_shards``/``test_shards`` are caught, also when a class spreads over several files
        and a split names only some of them, while two different data sets that happen to share
        class names (e.g. the integer ids of third-party shards, whose scanned indices all live in
        one cache folder) are not confused.
        """
        files: dict[str, dict[str, set[str]]] = {}  # split -> class name -> shard files holding its members
        for split, parts in plan.items():
            files[split] = {}
            for sset, pos in parts:
                shards = [os.path.realpath(f) for f in sset.index.shards]
                for i in pos:
                    entry = sset.index.classes[i]
                    files[split].setdefault(entry.name, set()).update(shards[m[0]] for m in entry.members)
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            fa, fb = files.get(a, {}), files.get(b, {})
            # one shard file in common is enough: a class spread over several files is indexed with only the
            # files a split was given (e.g. test_shards naming one of the training shards)
            shared = sorted(name for name in fa.keys() & fb.keys() if fa[name] & fb[name])
            if shared:
                raise MetaConfigError(
                    f"{len(shared)} classes are in both the {a} and the {b} split (e.g. {', '.join(shared[:5])}); "
                    f"meta-{b} classes must be unseen in meta-{a}: point {b}_shards at shards of other classes, "
                    "or relabel the splits in index.json"
                )

    def _build_split(self, split: str, parts: list[tuple[_ShardSet, list[int]]]) -> Any:
        shape = self._shape(split)
        counter = self._counters.get(split)
        if counter is None:
            where = ", ".join(str(s.spec) for s, _ in parts)
            counter = self._counters[split] = SampleCounter(self.max_corrupt_fraction, self.num_workers + 1, where)
            if self._restored_counts is not None and split == "train":
                counter.restore(*self._restored_counts)
        multi = len(parts) > 1
        if multi:
            parts = [(s, p) for s, p in parts if p] or parts[:1]  # sources without classes in this split sit out
        chooser = _Chooser(self.seed, len(parts))
        built, shapes = [], set()
        for k, (sset, pos) in enumerate(parts):
            entries = [sset.index.classes[p] for p in pos]
            hierarchical = isinstance(shape, VariableShape) and self._hierarchical(split, sset.spec, entries)
            self._check(split, str(sset.spec), entries, shape, hierarchical)
            owns = _Owns(chooser, k) if len(parts) > 1 else None
            source = self._make_source(sset, pos, shape, split, hierarchical, counter, owns)
            if len(parts) > 1:
                shapes.add((str(sset.spec), source.first_image_shape()))
            built.append(source)
        if len(built) == 1:
            return built[0]
        if len({s for _, s in shapes}) > 1:
            listing = "; ".join(f"{spec}: {list(s)}" for spec, s in sorted(shapes))
            raise MetaConfigError(f"the sources hold images of different shapes ({listing}); convert them at one size "
                                  "and channel count (`lightning-meta convert ... --image-size`)")
        return MultiSourceEpisodes(built, [str(s.spec) for s, _ in parts], chooser)

    def _check_model(self) -> None:
        trainer = getattr(self, "trainer", None)
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        if model is None or "variable" not in (self.episode_shape, self.eval_episode_shape):
            return
        if not _supports_variable(model):
            raise MetaConfigError(
                f"{type(model).__name__} cannot train or evaluate on variable-way episodes (its output size is fixed "
                f"by ways={getattr(model, 'ways', '?')}); use episode_shape='fixed', or a metric-based learner "
                "(ProtoNet, MatchingNet, MetaOptNet); a model that handles any way can declare "
                "supports_variable_episodes = True"
            )

    def _describe_split(self, split: str) -> str:
        where = self._split_specs.get(split)
        if not where:
            return ""
        if self.shards is None and self.source_specs is None and where == self._train_spec():
            return " (of the embedded default data set)"
        return f" (of {where})"

    def _check_batching(self, split: str, per_device: int, world: int) -> None:
        if isinstance(self._shape(split), VariableShape) and per_device != 1:
            which = "meta_batch_size" if split == "train" else "eval_meta_batch_size"
            value = self.meta_batch_size if split == "train" else self.eval_meta_batch_size
            fix = f"meta_batch_size={world} (one episode per device)" if split == "train" else "eval_meta_batch_size=1"
            raise MetaConfigError(
                f"variable-way episodes have different shapes and cannot be stacked: {which}={value} gives "
                f"{per_device} episodes per device and step on {world} device(s); set {fix}, and use the trainer's "
                "accumulate_grad_batches for more episodes per update"
            )

    # ------------------------------------------------------------ faults
    def skipped_samples(self) -> tuple[int, int]:
        """``(read, skipped)``: samples decoded and corrupt samples skipped on this rank, all workers."""
        read = skipped = 0
        for c in self._counters.values():
            r, s = c.totals()
            read += r
            skipped += s
        return read, skipped

    # ------------------------------------------------------------ resume
    def _train_shape(self) -> dict[str, Any]:
        """The base shape plus what else fixes the training stream: variable-episode bounds, streaming buffer."""
        shape: dict[str, Any] = dict(super()._train_shape())
        if self.episode_shape == "variable":
            v = self.variable_shape
            shape.update(min_ways=v.min_ways, max_ways=v.max_ways, max_queries=v.max_queries,
                         max_support=v.max_support, max_support_per_class=v.max_support_per_class,
                         hierarchy=self.hierarchy)
        if self.reader == "streaming":
            shape["stream_buffer"] = self.stream_buffer
        return shape

    def consumed_batch(self, batch: Any) -> None:
        """Count the samples a training batch decoded (its ``_samples`` tag), once the trainer uses it.

        Called by the learners' ``on_train_batch_start``
        (:class:`~lightning_meta.algorithms.MetaLearner`); a LightningModule of another kind can
        call it there too. Without it, checkpoints save the counts of everything decoded so far,
        prefetched batches included.
        """
        samples = batch.__dict__.pop("_samples", None) if isinstance(batch, Episode) else None
        if samples is not None:
            read, skipped = self._consumed or (0, 0)
            self._consumed = [read + samples[0], skipped + samples[1]]

    def state_dict(self) -> dict[str, Any]:
        """Return the base position plus the reader, the episode shape and the corrupt-sample counts.

        The counts are those of the training batches consumed so far (decoded samples of batches
        that dataloader workers prefetched are not in them).
        """
        state = super().state_dict()
        state["reader"] = self.reader
        state["episode_shape"] = self.episode_shape
        if self._consumed is not None:
            state["samples_read"], state["samples_skipped"] = self._consumed
        elif "train" in self._counters:  # no batch was reported by consumed_batch (another kind of module)
            state["samples_read"], state["samples_skipped"] = self._counters["train"].totals()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continues the episode stream where the checkpoint left it (same reader and episode shape)."""
        if self._evaluating_only():
            return
        for name in ("reader", "episode_shape"):
            saved = state_dict.get(name)
            if saved is not None and saved != getattr(self, name):
                raise MetaConfigError(
                    f"the checkpoint was trained with {name}={saved!r} but {name}={getattr(self, name)!r}; episodes "
                    f"would differ from the interrupted run: resume with {name}={saved!r} (or start a new run)"
                )
        super().load_state_dict(state_dict)
        if "samples_read" in state_dict:
            self._restored_counts = (int(state_dict["samples_read"]), int(state_dict["samples_skipped"]))
            self._consumed = list(self._restored_counts)
            if "train" in self._counters:
                self._counters["train"].restore(*self._restored_counts)

    def teardown(self, stage: str | None = None) -> None:
        """Close the streaming readers' open files and pipes."""
        for r in self._stream_readers.values():
            r.close()

    @property
    def data_location(self) -> str:
        """Where the shards are (the cache folder for the embedded default)."""
        if self.source_specs is not None:
            return str(self.source_specs)
        return os.fspath(self._train_spec()) if not isinstance(self._train_spec(), list) else str(self._train_spec())
