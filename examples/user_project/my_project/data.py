"""Our own episodic data: procedural texture classes, made on the fly as a pure function of the episode key."""

from __future__ import annotations

import numpy as np
import torch

from lightning_meta import Episode
from lightning_meta.data.sampling import episode_rng
from lightning_meta.datamodules import EpisodicDataModule
from lightning_meta.errors import MetaConfigError

__all__ = ["PatternDataModule", "PatternSource"]


class PatternSource:
    """N-way K-shot episodes over a set of texture classes.

    Class ``c`` is a fixed random mixture of three 2-D sinusoids (seeded by ``(seed, c)``); an example
    is that texture shifted by up to one pixel, plus Gaussian noise. ``episode`` depends only on
    ``(seed, split, epoch, index)``, the sampling contract of lightning-meta's datamodules, so
    episodes do not depend on the number of devices or dataloader workers.

    Args:
        class_ids: the classes of this split.
        ways, shots, queries: the episode shape.
        image_size: height and width of the images.
        noise: standard deviation of the pixel noise (textures have unit scale).
        seed: data seed.

    """

    def __init__(self, class_ids: list[int], ways: int, shots: int, queries: int, image_size: int, noise: float,
                 seed: int) -> None:
        self.class_ids, self.ways, self.shots, self.queries = list(class_ids), ways, shots, queries
        self.image_size, self.noise, self.seed = image_size, noise, seed

    def texture(self, class_id: int) -> np.ndarray:
        """Return the noiseless ``[S + 2, S + 2]`` texture of a class (a one-pixel margin allows shifts)."""
        rng = np.random.default_rng([self.seed, 7919, class_id])
        yy, xx = np.mgrid[0 : self.image_size + 2, 0 : self.image_size + 2] / self.image_size
        img = np.zeros_like(xx)
        for _ in range(3):
            fx, fy = rng.uniform(-4, 4, 2)
            img += rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * (fx * xx + fy * yy) + rng.uniform(0, 2 * np.pi))
        return img / 1.5

    def episode(self, split: str, epoch: int, index: int) -> Episode:
        """Episode ``index`` of ``(split, epoch)``: support grouped by class in label order, then queries."""
        rng = episode_rng(self.seed, split, epoch, index)
        classes = rng.choice(self.class_ids, size=self.ways, replace=False)
        s, per_class = self.image_size, self.shots + self.queries
        images = np.empty((self.ways, per_class, 1, s, s), np.float32)
        for label, c in enumerate(classes):
            tex = self.texture(int(c))
            for j in range(per_class):
                dy, dx = rng.integers(0, 3, 2)
                images[label, j, 0] = tex[dy : dy + s, dx : dx + s] + self.noise * rng.standard_normal((s, s))
        x = torch.from_numpy(images)
        labels = torch.arange(self.ways)
        return Episode(
            support_x=x[:, : self.shots].reshape(-1, 1, s, s),          # [N*K, 1, S, S]
            support_y=labels.repeat_interleave(self.shots),              # [N*K]
            query_x=x[:, self.shots :].reshape(-1, 1, s, s),             # [N*Q, 1, S, S]
            query_y=labels.repeat_interleave(self.queries),              # [N*Q]
            classes=torch.as_tensor(classes, dtype=torch.long),          # [N]
        )


class PatternDataModule(EpisodicDataModule):
    """Texture-classification episodes with disjoint train/val/test classes (no files, no download).

    Args:
        num_classes: classes in total; the first 60% train, the next 20% validate, the rest test.
        image_size: height and width of the images.
        noise: pixel noise standard deviation.
        ways, shots, queries, eval_ways, eval_shots, eval_queries, meta_batch_size,
        eval_meta_batch_size, train_episodes, val_episodes, test_episodes, seed, num_workers:
            see :class:`lightning_meta.datamodules.EpisodicDataModule`.

    Example:
        >>> dm = PatternDataModule(ways=3, shots=1, queries=2, meta_batch_size=2)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader())).support_x.shape
        torch.Size([2, 3, 1, 16, 16])

    """

    def __init__(
        self,
        num_classes: int = 100,
        image_size: int = 16,
        noise: float = 0.5,
        ways: int = 5,
        shots: int = 1,
        queries: int = 5,
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
        super().__init__(ways=ways, shots=shots, queries=queries, eval_ways=eval_ways, eval_shots=eval_shots,
                         eval_queries=eval_queries, meta_batch_size=meta_batch_size,
                         eval_meta_batch_size=eval_meta_batch_size, train_episodes=train_episodes,
                         val_episodes=val_episodes, test_episodes=test_episodes, seed=seed, num_workers=num_workers)
        n_train, n_val = int(0.6 * num_classes), int(0.2 * num_classes)
        self.splits = {"train": list(range(n_train)), "val": list(range(n_train, n_train + n_val)),
                       "test": list(range(n_train + n_val, num_classes))}
        for split, need in (("train", self.ways), ("val", self.eval_ways), ("test", self.eval_ways)):
            if len(self.splits[split]) < need:
                raise MetaConfigError(
                    f"num_classes={num_classes} leaves {len(self.splits[split])} {split} classes but episodes are "
                    f"{need}-way; raise num_classes to at least {int(np.ceil(need / 0.2)) + 1}"
                )
        if not noise >= 0:
            raise MetaConfigError(f"noise={noise} must be >= 0")
        self.image_size, self.noise = image_size, noise

    def setup(self, stage: str | None = None) -> None:
        """One :class:`PatternSource` per split (training shape for ``train``, evaluation shape otherwise)."""
        for split, ids in self.splits.items():
            train = split == "train"
            self.sources[split] = PatternSource(
                ids, self.ways if train else self.eval_ways, self.shots if train else self.eval_shots,
                self.queries if train else self.eval_queries, self.image_size, self.noise, self.seed,
            )
