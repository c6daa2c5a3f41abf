"""Few-shot classification episodes from webdataset shards (and the embedded default data set)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

from lightning_meta.data.glyphs import default_glyph_shards
from lightning_meta.data.sampling import FixedShape, episode_rng, sample_fixed
from lightning_meta.data.shards import ClassEntry, IndexedReader, ShardIndex, load_index
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError
from lightning_meta.datamodules.base import EpisodicDataModule

__all__ = ["ShardDataModule", "ShardEpisodeSource"]


class ShardEpisodeSource:
    """Exact N-way K-shot episodes over the classes of one split, read through an index.

    Args:
        reader: the indexed reader (shared by all splits of a shard set).
        class_positions: positions in ``reader.index.classes`` that belong to this split.
        shape: episode shape.
        seed: data seed.
    """

    def __init__(self, reader: IndexedReader, class_positions: Sequence[int], shape: FixedShape, seed: int) -> None:
        self.reader = reader
        self.class_positions = list(class_positions)
        self.counts = [reader.index.classes[p].count for p in self.class_positions]
        self.shape = shape
        self.seed = seed

    def sample(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
        """The classes (local positions) and members of one episode; subclasses may sample differently."""
        return sample_fixed(rng, self.counts, self.shape)

    def episode(self, split: str, epoch: int, index: int) -> Episode:
        """Episode ``index`` of ``(split, epoch)``; a pure function of (seed, split, epoch, index)."""
        rng = episode_rng(self.seed, split, epoch, index)
        draw = self.sample(rng)
        k = self.shape.shots
        sx, qx, ids = [], [], []
        for local, members in draw:
            pos = self.class_positions[local]
            imgs = [self.reader.image(pos, int(m)) for m in members]
            sx += imgs[:k]
            qx += imgs[k:]
            ids.append(self.reader.index.classes[pos].id)
        n = self.shape.ways
        try:
            support_x, query_x = torch.stack(sx), torch.stack(qx)
        except RuntimeError as e:
            raise MetaConfigError(
                f"images of different sizes in one episode ({e}); resize the data set to one size when converting"
            ) from e
        return Episode(
            support_x=support_x,
            support_y=torch.arange(n).repeat_interleave(k),
            query_x=query_x,
            query_y=torch.arange(n).repeat_interleave(self.shape.queries),
            classes=torch.tensor(ids, dtype=torch.long),
        )


class ShardDataModule(EpisodicDataModule):
    """N-way K-shot episodes from class-grouped webdataset shards, read through ``index.json``.

    With ``shards=None`` it uses the embedded default data set (procedural glyph alphabets,
    generated offline into the cache folder on first use). Shards written by ``lightning-meta
    convert`` carry their train/val/test split in the index; for third-party shards without one,
    the index is built and cached automatically and classes are split by ``split_ratios``, unless
    ``val_shards`` / ``test_shards`` name separate shard sets.

    Args:
        shards: brace pattern (``data/train-{000000..000009}.tar``), glob, list, or a directory of
            ``.tar`` files; ``None`` for the embedded default.
        val_shards, test_shards: separate shard sets for validation/test (all their classes are used).
        ways, shots, queries, eval_ways, eval_shots, eval_queries, meta_batch_size,
        eval_meta_batch_size, train_episodes, val_episodes, test_episodes, seed, num_workers:
            see :class:`~lightning_meta.datamodules.EpisodicDataModule`.
        verify: shard check before training: ``sha256`` (memoised per file), ``size``, or ``none``.
        invert: use ``255 - pixel`` (for black-ink-on-white images such as Omniglot).
        split_ratios: train/val/test fractions of classes when the index has no split.
        cache_mb: decoded-image cache per process, in MB.

    Example:
        >>> dm = ShardDataModule(ways=5, shots=1, queries=15)  # doctest: +SKIP
        >>> dm.prepare_data(); dm.setup("fit")                  # doctest: +SKIP
        >>> next(iter(dm.train_dataloader())).support_x.shape   # doctest: +SKIP
        torch.Size([4, 5, 1, 28, 28])
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
        split_ratios: tuple[float, float, float] = (0.64, 0.16, 0.20),
        cache_mb: float = 256.0,
    ) -> None:
        super().__init__(ways=ways, shots=shots, queries=queries, eval_ways=eval_ways, eval_shots=eval_shots,
                         eval_queries=eval_queries, meta_batch_size=meta_batch_size,
                         eval_meta_batch_size=eval_meta_batch_size, train_episodes=train_episodes,
                         val_episodes=val_episodes, test_episodes=test_episodes, seed=seed, num_workers=num_workers)
        if verify not in ("sha256", "size", "none"):
            raise MetaConfigError(f"verify={verify!r} is not supported; use 'sha256', 'size' or 'none'")
        if len(split_ratios) != 3 or any(r < 0 for r in split_ratios) or not np.isclose(sum(split_ratios), 1.0):
            raise MetaConfigError(f"split_ratios={split_ratios} must be three non-negative fractions summing to 1")
        self.shards = shards
        self.val_shards = val_shards
        self.test_shards = test_shards
        self.verify = verify
        self.invert = invert
        self.split_ratios = tuple(split_ratios)
        self.cache_mb = cache_mb
        self._readers: dict[str, IndexedReader] = {}

    def _train_spec(self) -> str | list[str]:
        return str(default_glyph_shards()) if self.shards is None else self.shards

    def prepare_data(self) -> None:
        """Generates the embedded default on first use and builds indices of third-party shards (rank 0)."""
        for spec in (self._train_spec(), self.val_shards, self.test_shards):
            if spec is not None:
                load_index(spec, verify="none")

    def _reader(self, spec: str | list[str]) -> IndexedReader:
        key = repr(spec)
        if key not in self._readers:
            self._readers[key] = IndexedReader(load_index(spec, verify=self.verify), self.invert, self.cache_mb)
        return self._readers[key]

    def _split_positions(self, index: ShardIndex) -> dict[str, list[int]]:
        labelled = any(c.split for c in index.classes)
        if labelled:
            out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
            for i, c in enumerate(index.classes):
                if c.split in out:
                    out[c.split].append(i)
            return out
        order = np.random.default_rng(np.random.SeedSequence([self.seed, 4242])).permutation(len(index.classes))
        n = len(order)
        n_train = int(round(self.split_ratios[0] * n))
        n_val = int(round(self.split_ratios[1] * n))
        return {"train": sorted(order[:n_train].tolist()), "val": sorted(order[n_train:n_train + n_val].tolist()),
                "test": sorted(order[n_train + n_val:].tolist())}

    def _check(self, split: str, spec: str, entries: list[ClassEntry], shape: FixedShape) -> None:
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

    def setup(self, stage: str | None = None) -> None:
        """Loads and verifies the indices, assigns classes to splits and checks the episode shapes fit."""
        train_spec = self._train_spec()
        main = self._reader(train_spec)
        positions = self._split_positions(main.index)
        train_shape = FixedShape(self.ways, self.shots, self.queries)
        eval_shape = FixedShape(self.eval_ways, self.eval_shots, self.eval_queries)
        plan: dict[str, tuple[IndexedReader, list[int], FixedShape, str]] = {
            "train": (main, positions["train"], train_shape, str(train_spec))
        }
        for split, extra in (("val", self.val_shards), ("test", self.test_shards)):
            if extra is not None:
                r = self._reader(extra)
                plan[split] = (r, list(range(len(r.index.classes))), eval_shape, str(extra))
            else:
                plan[split] = (main, positions[split], eval_shape, str(train_spec))
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage or "", ("train", "val", "test")):
            reader, pos, shape, spec = plan[split]
            self._check(split, spec, [reader.index.classes[p] for p in pos], shape)
            self.sources[split] = ShardEpisodeSource(reader, pos, shape, self.seed)
        self.split_sizes = {s: len(p[1]) for s, p in plan.items()}

    @property
    def data_location(self) -> str:
        """Where the shards are (the cache folder for the embedded default)."""
        return os.fspath(self._train_spec()) if not isinstance(self._train_spec(), list) else str(self._train_spec())
