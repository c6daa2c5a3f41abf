"""The Omniglot one-shot classification benchmark of Lake et al. (2015): 20 runs, 20-way 1-shot.

Each run of ``all_runs.zip`` is one within-alphabet 20-way one-shot task: one drawing per class
(``runNN/training/classKK.png``) and 20 test drawings (``runNN/test/itemKK.png``) whose classes
are listed in ``runNN/class_labels.txt``. :class:`OmniglotRunsDataModule` makes every run one test
episode, so ``trainer.test(model, datamodule=dm)`` scores a meta-learner on the benchmark, and it
trains on an Omniglot *background* set (e.g. ``images_background_small1.zip``), converted into the
cache on first use with the same preprocessing as the runs (inverted: ink = 1, area-averaged to
``image_size``). The error is logged as ``test/error`` = mean over runs of wrong/20 (REFERENCE
§6); since every run has the same number of test items this equals ``1 - test/acc``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_meta.data.augment import AffineAugmentedSource
from lightning_meta.data.convert import SourceTree, convert_omniglot, omniglot_image
from lightning_meta.data.sampling import FixedShape, sample_fixed
from lightning_meta.data.shards import INDEX_NAME, IndexedReader, cache_dir, cache_lock, sha256_file
from lightning_meta.datamodules.shards import ShardDataModule, ShardEpisodeSource
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError

__all__ = [
    "AlphabetEpisodeSource",
    "OmniglotRun",
    "OmniglotRunsDataModule",
    "OmniglotRunsError",
    "OmniglotRunsSource",
    "load_omniglot_runs",
]

_CONVERT_VERSION = 1
_RUN_DIR = re.compile(r"^run\d+$")


# --------------------------------------------------------------------------- the runs
@dataclass
class OmniglotRun:
    """One run: ``support_x [N, 1, s, s]`` (class ``k`` = ``classKK``), ``query_x [M, 1, s, s]``, ``query_y [M]``."""

    name: str
    support_x: Tensor
    query_x: Tensor
    query_y: Tensor
    support_files: list[str]
    query_files: list[str]


def load_omniglot_runs(path: str | os.PathLike, image_size: int | None = 28) -> list[OmniglotRun]:
    """Reads the one-shot runs from ``all_runs.zip`` or the folder it extracts to.

    Images get the converter's Omniglot preprocessing (:func:`~lightning_meta.data.convert.omniglot_image`:
    inverted so ink is 1, area-averaged to ``image_size``), as float tensors in ``[0, 1]``. The
    support images of a run are its ``training/class*.png`` in name order (label ``k`` is the
    ``k``-th file); the queries are the test items listed in ``class_labels.txt``, in name order.

    Raises:
        MetaConfigError: when the path is missing, holds no ``runNN/class_labels.txt``, or a listed
            file is absent.

    """
    tree = SourceTree(path, "runs")
    try:
        label_files = [f for f in tree.files if PurePosixPath(f).name == "class_labels.txt"
                       and _RUN_DIR.match(PurePosixPath(f).parent.name)]
        if not label_files:
            raise MetaConfigError(f"runs={str(tree.path)!r} holds no runNN/class_labels.txt; point it at all_runs.zip "
                                  "(github.com/brendenlake/omniglot, python/one-shot-classification) or its folder")
        present = set(tree.files)
        runs = []
        for lf in sorted(label_files, key=lambda f: PurePosixPath(f).parent.name):
            run_dir = PurePosixPath(lf).parent
            root = run_dir.parent
            support_files = sorted(f for f in tree.files if PurePosixPath(f).parent == run_dir / "training"
                                   and f.lower().endswith(".png"))
            if not support_files:
                raise MetaConfigError(f"run {run_dir} in {tree.path} has no training/class*.png images")
            pairs = []
            for line_no, line in enumerate(tree.read(lf).decode().splitlines(), start=1):
                if not line.strip():
                    continue
                tokens = line.split()
                if len(tokens) != 2:
                    raise MetaConfigError(f"{tree.path}:{lf} line {line_no} is {line!r}; expected "
                                          "'runNN/test/itemKK.png runNN/training/classKK.png'")
                test_f, train_f = (str(root / t) if str(root) != "." else t for t in tokens)
                for f in (test_f, train_f):
                    if f not in present:
                        raise MetaConfigError(f"{f} (listed in {lf}) is missing from {tree.path}; restore the runs")
                if train_f not in support_files:
                    raise MetaConfigError(f"{lf} line {line_no} matches {test_f} to {train_f}, which is not a "
                                          f"training image of {run_dir}")
                pairs.append((test_f, support_files.index(train_f)))
            pairs.sort()

            def load(files: Sequence[str]) -> Tensor:
                arrays = [omniglot_image(tree.read(f), image_size, f"{tree.path}:{f}") for f in files]
                return torch.from_numpy(np.stack(arrays)).unsqueeze(1).float().div_(255.0)

            runs.append(OmniglotRun(
                name=run_dir.name,
                support_x=load(support_files),
                query_x=load([p[0] for p in pairs]),
                query_y=torch.tensor([p[1] for p in pairs], dtype=torch.long),
                support_files=support_files,
                query_files=[p[0] for p in pairs],
            ))
    finally:
        tree.close()
    shapes = {(tuple(r.support_x.shape), tuple(r.query_x.shape)) for r in runs}
    if len(shapes) != 1:
        raise MetaConfigError(f"the runs in {path} have different sizes {sorted(shapes)}; every run must have the "
                              "same number of training and test images")
    return runs


class OmniglotRunsSource:
    """Episode source whose episode ``i`` (any split, any epoch) is run ``i``: support = one drawing per class.

    Args:
        runs: the parsed runs (:func:`load_omniglot_runs`).

    """

    def __init__(self, runs: Sequence[OmniglotRun]) -> None:
        self.runs = list(runs)

    def episode(self, split: str, epoch: int, index: int) -> Episode:
        """Run ``index`` as a single ``N``-way 1-shot episode with its ``M`` test items as queries."""
        r = self.runs[index]
        n = r.support_x.shape[0]
        return Episode(r.support_x.clone(), torch.arange(n), r.query_x.clone(), r.query_y.clone(), torch.arange(n))


# --------------------------------------------------------------------------- within-alphabet episodes
class AlphabetEpisodeSource(ShardEpisodeSource):
    """N-way K-shot episodes whose classes all come from one alphabet (the index ``group``), like the runs.

    An episode first draws an alphabet uniformly among those with at least ``ways`` classes, then
    ``ways`` of its characters; still a pure function of ``(seed, split, epoch, index)``.

    Raises:
        MetaConfigError: when no alphabet has ``ways`` classes.

    """

    def __init__(self, reader: IndexedReader, class_positions: Sequence[int], shape: FixedShape, seed: int,
                 split: str = "train") -> None:
        super().__init__(reader, class_positions, shape, seed)
        groups: dict[str, list[int]] = defaultdict(list)
        for local, pos in enumerate(self.class_positions):
            groups[str(reader.index.classes[pos].group)].append(local)
        self.groups = [groups[g] for g in sorted(groups) if len(groups[g]) >= shape.ways]
        if not self.groups:
            sizes = ", ".join(f"{g}: {len(v)}" for g, v in sorted(groups.items()))
            raise MetaConfigError(f"within-alphabet {shape.ways}-way {split} episodes need an alphabet with "
                                  f"{shape.ways} characters, but the {split} alphabets have {sizes}; lower the way "
                                  "or pick other alphabets")

    def sample(self, rng: np.random.Generator) -> list[tuple[int, np.ndarray]]:
        """One alphabet, then ``ways`` of its classes and ``shots + queries`` drawings of each."""
        members = self.groups[int(rng.integers(len(self.groups)))]
        draw = sample_fixed(rng, [self.counts[i] for i in members], self.shape)
        return [(members[c], m) for c, m in draw]


# --------------------------------------------------------------------------- test/error
class OmniglotRunsError(Callback):
    """Logs ``test/error`` (mean over runs of wrong/N) and ``test/error_ci95`` next to ``test/acc``.

    It reads the meta-learner's episodic test metric (per-run accuracy) just before the model
    logs and resets it. :class:`OmniglotRunsDataModule` adds it to the trainer by itself.
    """

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        metric = getattr(pl_module, "test_metric", None)
        if metric is None or getattr(metric, "update_count", 0) == 0:
            return
        r = metric.compute()
        error = 1.0 - r["mean"].float()
        pl_module.log_dict({"test/error": error, "test/error_ci95": r["ci95"].float()}, sync_dist=False)
        rank_zero_info(f"Omniglot one-shot error: {100 * error.item():.2f}% over {int(r['n'].item())} runs "
                       "(REFERENCE §6: mean over runs of wrong / test items)")


# --------------------------------------------------------------------------- the datamodule
class OmniglotRunsDataModule(ShardDataModule):
    """Trains on Omniglot background alphabets and tests on the one-shot runs (one run = one test episode).

    Training data, pick one:

    - ``background``: an Omniglot set (``images_background_small1.zip``, ``images_background.zip`` or
      an extracted folder), converted on first use into ``$LIGHTNING_META_CACHE/omniglot/`` with
      :func:`~lightning_meta.data.convert.convert_omniglot`: alphabets split into train/val by
      ``val_alphabets`` or ``val_fraction`` (seeded by ``seed``), training characters x4 by rotation
      when ``rotations``, and the runs' preprocessing at ``image_size``;
    - ``shards``: shards already converted (``lightning-meta convert omniglot ...``), splits from their index;
    - neither: test only (``trainer.test`` with a trained model).

    Test episodes are the runs, in order (``test_episodes`` = number of runs, 20). Validation
    episodes (when there are validation alphabets) are ``eval_ways``-way ``eval_shots``-shot
    within one alphabet, like the runs. ``test/error`` is logged by :class:`OmniglotRunsError`,
    which this datamodule adds to the trainer. The other arguments are
    :class:`~lightning_meta.datamodules.ShardDataModule`'s (described there).

    Args:
        runs: ``all_runs.zip`` or the folder holding ``run01`` ... ``run20``.
        background: an Omniglot alphabet set to train on (zip or folder), converted into the cache.
        shards: pre-converted training shards instead of ``background``.
        image_size: image side for training and test images (default 28).
        rotations: add the 90/180/270 degree rotations of each training character as new classes.
        val_alphabets: background alphabets held out for validation (names).
        val_fraction: or a seeded fraction of the background alphabets for validation.
        within_alphabet: draw each *training* episode from one alphabet (like the runs).
        affine_degrees: per-image random rotation ``U(-d, d)`` degrees of training episodes (0 disables
            it; see :func:`~lightning_meta.data.augment.random_affine`; a pure function of the episode key).
        affine_translate: random shift ``U(-t, t)`` of the image side on both axes (0 disables it).
        affine_scale: random per-axis scale ``U(1 - s, 1 + s)`` (0 disables it).
        affine_shear: random shears ``U(-s, s)`` degrees on both axes (0 disables it).
        format: storage of the converted cache (``npy`` decodes fastest).
        eval_ways: classes per validation episode (the runs fix the test shape).
        eval_shots: support examples per class in a validation episode.
        eval_queries: query examples per class in a validation episode.

    Example:
        >>> dm = OmniglotRunsDataModule("all_runs.zip", background="images_background_small1.zip")  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=dm); trainer.test(model, datamodule=dm)  # doctest: +SKIP

    """

    def __init__(
        self,
        runs: str,
        background: str | None = None,
        shards: str | list[str] | None = None,
        image_size: int = 28,
        rotations: bool = True,
        val_alphabets: list[str] | None = None,
        val_fraction: float = 0.0,
        within_alphabet: bool = False,
        affine_degrees: float = 0.0,
        affine_translate: float = 0.0,
        affine_scale: float = 0.0,
        affine_shear: float = 0.0,
        format: Literal["png", "npy"] = "npy",
        ways: int = 20,
        shots: int = 1,
        queries: int = 5,
        eval_ways: int | None = 20,
        eval_shots: int | None = 1,
        eval_queries: int = 5,
        meta_batch_size: int = 1,
        eval_meta_batch_size: int = 20,
        train_episodes: int = 1000,
        val_episodes: int = 100,
        seed: int = 0,
        num_workers: int = 0,
        verify: Literal["sha256", "size", "none"] = "sha256",
        cache_mb: float = 256.0,
    ) -> None:
        super().__init__(shards=shards, ways=ways, shots=shots, queries=queries, eval_ways=eval_ways,
                         eval_shots=eval_shots, eval_queries=eval_queries, meta_batch_size=meta_batch_size,
                         eval_meta_batch_size=eval_meta_batch_size, train_episodes=train_episodes,
                         val_episodes=val_episodes, test_episodes=20, seed=seed, num_workers=num_workers,
                         verify=verify, invert=False, cache_mb=cache_mb)
        if background is not None and shards is not None:
            raise MetaConfigError("both background and shards are set; train either on an Omniglot set that is "
                                  "converted on first use (background=...) or on converted shards (shards=...)")
        if image_size < 16:
            raise MetaConfigError(f"image_size={image_size} is too small; use >= 16 (28 is the usual size)")
        if format not in ("png", "npy"):
            raise MetaConfigError(f"format={format!r} is not supported; use 'npy' or 'png'")
        if val_alphabets is not None and val_fraction:
            raise MetaConfigError(f"both val_alphabets and val_fraction={val_fraction} given; use one of them")
        self.runs = runs
        self.background = background
        self.image_size = image_size
        self.rotations = rotations
        self.val_alphabets = list(val_alphabets) if val_alphabets is not None else None
        self.val_fraction = val_fraction
        self.within_alphabet = within_alphabet
        self.affine = {"degrees": affine_degrees, "translate": affine_translate, "scale": affine_scale,
                       "shear": affine_shear}
        AffineAugmentedSource(None, seed, **self.affine)  # validates the ranges now
        self.format = format
        self.run_list: list[OmniglotRun] | None = None

    # ------------------------------------------------------------ training data
    def background_shards(self) -> Path:
        """Folder of the converted background set in the cache (converted now if missing)."""
        if self.background is None:
            raise MetaConfigError("background is not set")
        src = Path(os.path.expanduser(self.background))
        if not src.exists():
            raise MetaConfigError(f"background={self.background!r} does not exist; point it at an Omniglot set "
                                  "such as images_background_small1.zip (or its extracted folder)")
        options = {"version": _CONVERT_VERSION, "image_size": self.image_size, "rotations": self.rotations,
                   "val_alphabets": self.val_alphabets, "val_fraction": self.val_fraction, "seed": self.seed,
                   "format": self.format}
        h = hashlib.sha256(json.dumps(options, sort_keys=True).encode())
        if src.is_file():
            h.update(sha256_file(src).encode())
        else:
            for base, _dirs, files in sorted(os.walk(src)):
                for f in sorted(files):
                    st = os.stat(os.path.join(base, f))
                    h.update(f"{os.path.relpath(os.path.join(base, f), src)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        out = cache_dir() / "omniglot" / f"{src.name.removesuffix('.zip')}-{h.hexdigest()[:16]}"
        if (out / INDEX_NAME).exists():
            return out
        with cache_lock(out.parent / f".{out.name}.lock"):  # another process may be converting it right now
            if not (out / INDEX_NAME).exists():
                rank_zero_info(f"converting {src} into {out} (first use)")
                convert_omniglot(src, out, image_size=self.image_size, rotations=self.rotations,
                                 rotation_splits=("train",), val_alphabets=self.val_alphabets,
                                 val_fraction=self.val_fraction, seed=self.seed, fmt=self.format, overwrite=True)
        return out

    def _train_spec(self) -> str | list[str] | None:
        if self.background is not None:
            return str(self.background_shards())
        return self.shards

    def prepare_data(self) -> None:
        """Converts the background set on first use (rank 0) and checks that the runs can be read."""
        spec = self._train_spec()
        if spec is not None:
            from lightning_meta.data.shards import load_index

            load_index(spec, verify="none")
        if not os.path.exists(os.path.expanduser(self.runs)):
            raise MetaConfigError(f"runs={self.runs!r} does not exist; point it at all_runs.zip or its folder")

    # ------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        """Builds the training/validation sources from the shards and the test source from the runs."""
        if self.run_list is None:
            self.run_list = load_omniglot_runs(self.runs, self.image_size)
        self.test_episodes = len(self.run_list)
        self.sources["test"] = OmniglotRunsSource(self.run_list)
        run_shape = tuple(self.run_list[0].support_x.shape[1:])
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": (), "predict": ()}
        splits = wanted.get(stage or "", ("train", "val"))
        spec = self._train_spec()
        if splits and spec is None:
            raise MetaConfigError(f"stage {stage!r} needs training data: set background (an Omniglot set such as "
                                  "images_background_small1.zip) or shards; only trainer.test works without them")
        if splits:
            reader = self._reader(spec)
            positions = self._split_positions(reader.index)
            shapes = {"train": FixedShape(self.ways, self.shots, self.queries),
                      "val": FixedShape(self.eval_ways, self.eval_shots, self.eval_queries)}
            if positions["train"]:
                first = reader.image(positions["train"][0], 0)
                if tuple(first.shape) != run_shape:
                    raise MetaConfigError(f"the training images in {spec} have shape {tuple(first.shape)} but the runs "
                                          f"are {run_shape} at image_size={self.image_size}; convert the background "
                                          "set at the same image size")
            for split in splits:
                pos = positions[split]
                if split == "val" and not pos:
                    self.sources.pop("val", None)  # no validation alphabets: validation is skipped
                    continue
                self._check(split, str(spec), [reader.index.classes[p] for p in pos], shapes[split])
                if split == "val" or self.within_alphabet:
                    source = AlphabetEpisodeSource(reader, pos, shapes[split], self.seed, split)
                else:
                    source = ShardEpisodeSource(reader, pos, shapes[split], self.seed)
                if split == "train" and any(self.affine.values()):
                    source = AffineAugmentedSource(source, self.seed, **self.affine, splits=("train",))
                self.sources[split] = source
            self.split_sizes = {s: len(p) for s, p in positions.items()}
        trainer = getattr(self, "trainer", None)
        if trainer is not None and not any(isinstance(c, OmniglotRunsError) for c in trainer.callbacks):
            trainer.callbacks.append(OmniglotRunsError())

    def val_dataloader(self):  # noqa: D102
        if "val" not in self.sources:
            return []
        return super().val_dataloader()

    def runs_query_labels(self) -> Tensor:
        """The correct class of every test item, ``[runs, items]`` (for scoring predictions)."""
        if self.run_list is None:
            self.run_list = load_omniglot_runs(self.runs, self.image_size)
        return torch.stack([r.query_y for r in self.run_list])

    @property
    def data_location(self) -> str:
        """The runs (and the training shards, when set)."""
        spec = self._train_spec()
        return f"runs={self.runs}" + (f", train={spec}" if spec is not None else "")
