"""The episodic datamodule base: deterministic meta-batches, rank/worker partitioning, exact resume."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_meta.data.faults import SampleCounter
from lightning_meta.episode import Episode, collate_episodes
from lightning_meta.errors import MetaConfigError, require_int

__all__ = ["EpisodeLoader", "EpisodeSource", "EpisodicDataModule", "MetaBatchSampler"]


class EpisodeSource(Protocol):
    """Anything that makes episode ``index`` of ``(split, epoch)`` as a pure function (picklable).

    Two attribute names are read when present: a method ``episodes(split, epoch, indices)``
    returning the collated meta-batch of those episodes (a faster path than collating
    :meth:`episode`; it must give the same result), and ``counter``, a
    :class:`~lightning_meta.data.faults.SampleCounter` whose decoded samples are counted per
    consumed training batch. Other values under these names are ignored.
    """

    def episode(self, split: str, epoch: int, index: int) -> Episode:
        """Make episode ``index`` of ``(split, epoch)``."""
        ...


def _identity(x: Any) -> Any:
    return x


class _MetaBatchDataset(Dataset):
    """Map-style dataset whose keys are ``(epoch, episode indices)``; returns a collated meta-batch."""

    def __init__(self, source: EpisodeSource, split: str) -> None:
        self.source = source
        self.split = split

    def __getitem__(self, key: tuple[int, tuple[int, ...]]) -> Episode:
        epoch, indices = key
        counter = getattr(self.source, "counter", None)  # a SampleCounter: tag the batch with what it decoded
        counter = counter if isinstance(counter, SampleCounter) else None
        before = counter.local_totals() if counter is not None else None
        batched = getattr(self.source, "episodes", None)  # optional fast path, same result as collating
        if callable(batched):
            batch = batched(self.split, epoch, indices)
        else:
            batch = collate_episodes([self.source.episode(self.split, epoch, i) for i in indices])
        if before is not None:
            after = counter.local_totals()
            # read by the datamodule when the batch is consumed (prefetched batches are not counted)
            batch._samples = (after[0] - before[0], after[1] - before[1])
        return batch

    def __len__(self) -> int:  # only used by samplers that ask; keys are not positions
        return 0


class EpisodeLoader(DataLoader):
    """A DataLoader that tells Lightning it resumes exactly mid-epoch.

    The position itself is saved by :meth:`EpisodicDataModule.state_dict` (epoch and meta-batches
    consumed, read from the trainer's progress counters) and restored into the sampler; this
    loader's own ``state_dict`` only mirrors it so Lightning does not warn that it is not resumable.
    """

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        s = self.sampler
        return {"epoch": getattr(s, "epoch", 0), "resume": getattr(s, "resume", None)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # noqa: D102
        pass  # restored through the datamodule, which Lightning loads first


class MetaBatchSampler(DistributedSampler):
    """Yields ``(epoch, global episode indices)`` keys: this rank's share of each meta-batch.

    Training: meta-batch ``b`` of an epoch holds global episodes ``b*B .. b*B+B-1``; rank ``r`` of
    ``W`` takes the contiguous slice ``r*B/W .. (r+1)*B/W - 1``. Evaluation: episode ``i`` of the
    fixed list goes to rank ``i mod W``, in chunks of ``B`` per step. Keys are made in the main
    process, so dataloader workers only decode; episodes never depend on the worker count.

    It subclasses :class:`~torch.utils.data.DistributedSampler` only so that Lightning does not
    wrap it in another distributed sampler: the partitioning here is already per rank.

    Args:
        num_episodes: episodes per training epoch, or the length of the fixed evaluation list.
        batch_size: training: the global meta-batch (divisible by ``world_size``); evaluation:
            episodes per step on each rank.
        rank: this process's rank.
        world_size: number of ranks.
        train: training keys (epoch-dependent meta-batches) or evaluation keys (the fixed list).
        resume: ``(epoch, meta-batches already consumed in it)`` to continue a stream mid-epoch.

    Example:
        >>> s = MetaBatchSampler(num_episodes=8, batch_size=4, rank=1, world_size=2)
        >>> list(s)
        [(0, (2, 3)), (0, (6, 7))]

    """

    def __init__(
        self,
        num_episodes: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        train: bool = True,
        resume: tuple[int, int] | None = None,
    ) -> None:
        # deliberately not calling DistributedSampler.__init__ (it wants a dataset and a process group)
        self.num_episodes = num_episodes
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.train = train
        self.resume = resume  # (epoch, batches already consumed in that epoch)
        # A resumed fit may iterate the loader before its first set_epoch, and worker processes then
        # draw their first keys at once: start at the resumed epoch, not at epoch 0.
        self.epoch = resume[0] if train and resume is not None else 0
        # attributes Lightning may read from a DistributedSampler
        self.num_replicas, self.shuffle, self.drop_last, self.seed, self.dataset = world_size, False, False, 0, None
        if train and batch_size % world_size:
            raise MetaConfigError(
                f"meta_batch_size={batch_size} is global and must be divisible by the world size {world_size}; "
                f"use a multiple of {world_size}"
            )

    @property
    def num_batches(self) -> int:
        """Meta-batches in a full epoch on this rank."""
        if self.train:
            return self.num_episodes // self.batch_size
        mine = len(range(self.rank, self.num_episodes, self.world_size))
        return -(-mine // self.batch_size)

    def start_batch(self) -> int:
        """First meta-batch of the current epoch (non-zero only in the epoch a run resumed in)."""
        if self.train and self.resume is not None and self.resume[0] == self.epoch:
            return min(self.resume[1], self.num_batches)
        return 0

    def set_epoch(self, epoch: int) -> None:  # noqa: D102
        self.epoch = epoch

    def __len__(self) -> int:
        # the full epoch length even in a resumed epoch: Lightning counts the restored progress
        # (batches already consumed) towards it, and caches this length for later epochs
        return self.num_batches

    def __iter__(self):
        if self.train:
            per_rank = self.batch_size // self.world_size
            for b in range(self.start_batch(), self.num_batches):
                first = b * self.batch_size + self.rank * per_rank
                yield (self.epoch, tuple(range(first, first + per_rank)))
        else:
            mine = list(range(self.rank, self.num_episodes, self.world_size))
            for s in range(0, len(mine), self.batch_size):
                yield (0, tuple(mine[s : s + self.batch_size]))


class EpisodicDataModule(L.LightningDataModule):
    """Base of every episodic datamodule.

    Subclasses build an :class:`EpisodeSource` per split in :meth:`setup` (stored in
    ``self.sources``); this base turns them into dataloaders honouring the sampling contract
    (DESIGN §2) and saves its position in the Lightning checkpoint for exact resume.

    Args:
        ways: classes per training episode (N-way).
        shots: support examples per class in a training episode (K-shot).
        queries: query examples per class in a training episode.
        eval_ways: classes per validation/test episode (default: ``ways``).
        eval_shots: support examples per class at validation/test (default: ``shots``).
        eval_queries: query examples per class at validation/test.
        meta_batch_size: episodes per optimizer step, global over all devices.
        eval_meta_batch_size: episodes per validation/test step on each device.
        train_episodes: training episodes per epoch (global); an epoch runs
            ``train_episodes // meta_batch_size`` whole meta-batches (a remainder is unused, with a warning).
        val_episodes: number of episodes in the fixed validation list.
        test_episodes: number of episodes in the fixed test list.
        seed: the data seed; episodes are a pure function of (seed, split, epoch, index).
        num_workers: dataloader worker processes (episodes do not depend on it).


    Example:
        >>> import torch
        >>> class Shifted:  # an EpisodeSource: episode ``index`` puts its two classes at index and index + 10
        ...     def episode(self, split, epoch, index):
        ...         x = torch.tensor([[float(index)], [index + 10.0]])
        ...         return Episode(x, torch.arange(2), x + 0.5, torch.arange(2), torch.tensor([0, 1]))
        >>> class ShiftedData(EpisodicDataModule):
        ...     def setup(self, stage=None):
        ...         for split in ("train", "val", "test"):
        ...             self.sources[split] = Shifted()
        >>> dm = ShiftedData(ways=2, shots=1, queries=1, meta_batch_size=2, train_episodes=4)
        >>> dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch.support_x.shape, batch.support_x[:, 0, 0].tolist()
        (torch.Size([2, 2, 1]), [0.0, 1.0])

    """

    task = "classification"

    def __init__(
        self,
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
    ) -> None:
        super().__init__()
        checks = {"ways": ways, "shots": shots, "queries": queries, "eval_queries": eval_queries,
                  "meta_batch_size": meta_batch_size, "eval_meta_batch_size": eval_meta_batch_size,
                  "train_episodes": train_episodes, "val_episodes": val_episodes, "test_episodes": test_episodes}
        for name, value in checks.items():
            require_int(name, value, 1)
        if eval_ways is not None:
            require_int("eval_ways", eval_ways, 1, "or null: the same as ways")
        if eval_shots is not None:
            require_int("eval_shots", eval_shots, 1, "or null: the same as shots")
        if train_episodes < meta_batch_size:
            raise MetaConfigError(
                f"train_episodes={train_episodes} is smaller than meta_batch_size={meta_batch_size}; "
                "an epoch needs at least one meta-batch"
            )
        require_int("num_workers", num_workers, 0)
        require_int("seed", seed, 0, "episodes are drawn from seed, split, epoch and index")
        if train_episodes % meta_batch_size:
            whole = train_episodes // meta_batch_size
            rank_zero_warn(
                f"train_episodes={train_episodes} is not a multiple of meta_batch_size={meta_batch_size}: each epoch "
                f"runs {whole} meta-batches ({whole * meta_batch_size} episodes) and never uses the last "
                f"{train_episodes % meta_batch_size}; set train_episodes to a multiple to silence this"
            )
        self.ways = ways
        self.shots = shots
        self.queries = queries
        self.eval_ways = eval_ways or ways
        self.eval_shots = eval_shots or shots
        self.eval_queries = eval_queries
        self.meta_batch_size = meta_batch_size
        self.eval_meta_batch_size = eval_meta_batch_size
        self.train_episodes = train_episodes
        self.val_episodes = val_episodes
        self.test_episodes = test_episodes
        self.seed = seed
        self.num_workers = num_workers
        self.sources: dict[str, EpisodeSource] = {}
        self._resume: tuple[int, int] | None = None
        self._train_sampler: MetaBatchSampler | None = None
        self._inputs_checked: dict[str, tuple[int, int]] = {}

    # ------------------------------------------------------------ topology
    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    # ------------------------------------------------------------ model inputs
    def image_shape(self, split: str) -> tuple[int, ...] | None:
        """Shape ``[C, H, W]`` of the images of a split as the model receives them; None when unknown.

        Unknown also when the first image cannot be read (a corrupt sample, which the data
        pipeline's own checks and ``max_corrupt_fraction`` deal with).

        The default asks the split's source for ``first_image_shape()`` (shard sources have it;
        wrappers such as :class:`~lightning_meta.data.augment.AffineAugmentedSource` pass it on).
        Datamodules that resize or otherwise reshape images after the source override this.
        """
        first = getattr(self.sources.get(split), "first_image_shape", None)
        if not callable(first):
            return None
        try:
            return tuple(first())
        except Exception:  # e.g. a corrupt first sample: unknown here; the loader's own checks report it
            return None

    def check_model_inputs(self, splits: Iterable[str] | None = None) -> None:
        """Refuse a model whose backbone does not take this data's images, before any forward.

        Compares :meth:`image_shape` of each split (all built splits by default) with what the
        trainer's model declares (:meth:`~lightning_meta.algorithms.MetaLearner.check_input_shape`);
        does nothing without a trainer, a model that can check, or a known image shape. Each
        split's source is checked once per model.

        Raises:
            MetaConfigError: the images do not fit the backbone (the message names both and the fix).

        """
        trainer = getattr(self, "trainer", None)
        model = getattr(trainer, "lightning_module", None) if trainer is not None else None
        check = getattr(model, "check_input_shape", None)
        if not callable(check):
            return
        checked = self.__dict__.setdefault("_inputs_checked", {})
        for split in (list(self.sources) if splits is None else splits):
            source = self.sources.get(split)
            key = (id(model), id(source))
            if source is None or checked.get(split) == key:
                continue
            shape = self.image_shape(split)
            if shape is not None:
                name = {"train": "training", "val": "validation"}.get(split, split)
                check(shape, f"the {name} images{self._describe_split(split)}")
            checked[split] = key

    def _describe_split(self, split: str) -> str:
        """Where a split's data comes from, for messages (`` (of <location>)``); empty by default."""
        return ""

    def _loader(self, split: str) -> DataLoader:
        if split not in self.sources:
            skip = {"val": "; to train without validation pass --trainer.limit_val_batches 0 "
                           "(Trainer(limit_val_batches=0))"}.get(split, "")
            raise MetaConfigError(
                f"{type(self).__name__}.setup() did not create a source for split {split!r}: set "
                f"self.sources[{split!r}] to an EpisodeSource in setup(){skip}"
            )
        self.check_model_inputs([split])
        rank, world = self._rank_world()
        if split == "train":
            sampler = MetaBatchSampler(self.train_episodes, self.meta_batch_size, rank, world, True, self._resume)
            self._train_sampler = sampler
            self._check_batching(split, self.meta_batch_size // world, world)
        else:
            n = self.val_episodes if split == "val" else self.test_episodes
            sampler = MetaBatchSampler(n, self.eval_meta_batch_size, rank, world, train=False)
            self._check_batching(split, self.eval_meta_batch_size, world)
            self._check_eval_split(split, n, world)
        return EpisodeLoader(
            _MetaBatchDataset(self.sources[split], split),
            batch_size=None,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=_identity,
            persistent_workers=self.num_workers > 0,
        )

    def _check_eval_split(self, split: str, n: int, world: int) -> None:
        """Refuse evaluation lists that leave a process without episodes, or (ZeRO-3) uneven across processes.

        Every process computes the same counts, so every process refuses together.
        """
        if world < 2:
            return
        bs = self.eval_meta_batch_size
        counts = [MetaBatchSampler(n, bs, r, world, train=False).num_batches for r in range(world)]
        name = "val_episodes" if split == "val" else "test_episodes"
        if min(counts) == 0:
            raise MetaConfigError(
                f"{name}={n} leaves {counts.count(0)} of the {world} processes without a {split} episode (episodes "
                f"are dealt round-robin); use {name} >= {world}"
            )
        strategy = getattr(getattr(self, "trainer", None), "strategy", None)
        if getattr(strategy, "zero_stage_3", False) and len(set(counts)) > 1:
            even = -(-n // (world * bs)) * world * bs
            raise MetaConfigError(
                f"under DeepSpeed ZeRO-3 every process must run the same number of {split} steps (each forward "
                f"gathers the partitioned weights collectively), but {name}={n} with eval_meta_batch_size={bs} on "
                f"{world} processes gives {counts} steps; use a multiple of {world * bs} (e.g. {name}={even}), "
                "or ZeRO stage 2"
            )

    def _check_batching(self, split: str, per_device: int, world: int) -> None:
        """Refuse meta-batches the split's episodes cannot form (``per_device`` episodes per device and step).

        The default accepts any size; datamodules whose episodes change shape (variable way/shot)
        override it, because such episodes cannot be stacked into one meta-batch tensor.
        """

    def train_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:  # noqa: D102
        return self._loader("test")

    # -------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        """Epoch and meta-batches consumed in it, read from the trainer's progress counters."""
        state: dict[str, Any] = {"seed": self.seed, "meta_batch_size": self.meta_batch_size,
                                 "train_shape": self._train_shape()}
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            loop = trainer.fit_loop
            sampler = self.__dict__.get("_train_sampler")
            if sampler is not None:
                # the epoch Lightning told the sampler to draw (set_epoch at the epoch's start): right
                # in every hook, after fit has returned, and after a resume through an epoch's last
                # batch, where Lightning's `started` counter stays one epoch behind
                state["epoch"] = int(sampler.epoch)
            else:
                # no training loader yet: the last epoch *started* (`completed` is one ahead once fit
                # has returned, `processed` one ahead at on_train_epoch_end)
                state["epoch"] = max(int(loop.epoch_progress.current.started) - 1, 0)
            state["batches"] = loop.epoch_loop.batch_progress.current.processed
        return state

    def _train_shape(self) -> dict[str, Any]:
        """Return what fixes the training episode stream besides the seed and the meta-batch size."""
        return {"ways": self.ways, "shots": self.shots, "queries": self.queries, "train_episodes": self.train_episodes}

    def _evaluating_only(self) -> bool:
        """Whether the attached trainer runs validate, test or predict (the training stream does not matter)."""
        trainer = getattr(self, "trainer", None)
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return fn is not None and fn != TrainerFn.FITTING

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continues the episode stream where the checkpoint left it.

        Evaluation-only runs (``validate``/``test``/``predict`` with ``ckpt_path``) ignore the saved
        training stream: its seed, meta-batch size and shape may differ from this run's.
        """
        if self._evaluating_only():
            return
        if state_dict.get("seed", self.seed) != self.seed:
            raise MetaConfigError(
                f"the checkpoint was trained with data seed {state_dict['seed']} but seed={self.seed}; "
                "resume with the same seed (or start a new run) to keep the episode stream exact"
            )
        saved_batch = state_dict.get("meta_batch_size", self.meta_batch_size)
        if saved_batch != self.meta_batch_size:
            raise MetaConfigError(
                f"the checkpoint was trained with meta_batch_size={saved_batch} but meta_batch_size="
                f"{self.meta_batch_size}; resume with the same global meta-batch size to keep the episode stream exact"
            )
        saved_shape = state_dict.get("train_shape")
        current = self._train_shape()
        # only the keys the checkpoint saved: earlier versions saved fewer
        changed = {k: (v, current.get(k)) for k, v in dict(saved_shape or {}).items() if current.get(k) != v}
        if changed:
            raise MetaConfigError(
                "the checkpoint's training episodes had "
                + ", ".join(f"{k}={a}" for k, (a, _) in changed.items()) + " but this run has "
                + ", ".join(f"{k}={b}" for k, (_, b) in changed.items())
                + "; resuming would continue a different episode stream. Resume with the same values, or start "
                "a new run from the weights (e.g. MAML.load_from_checkpoint) instead of --ckpt_path"
            )
        if "epoch" in state_dict:
            self._resume = (int(state_dict["epoch"]), int(state_dict["batches"]))
