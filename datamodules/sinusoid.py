"""The sinusoid regression task family of the MAML paper (Finn et al. 2017, §5.1)."""

from __future__ import annotations

import math

import numpy as np
import torch

from lightning_meta.data.sampling import counter_uniform
from lightning_meta.datamodules.base import EpisodicDataModule
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError

__all__ = ["SinusoidDataModule", "SinusoidSource"]


class SinusoidSource:
    """Tasks ``y = A sin(x - phase)``, ``A ~ U[amplitude]``, ``phase ~ U[phase]``, ``x ~ U[x_range]``.

    Args:
        shots: support points per task.
        queries: query points per task.
        seed: the data seed; a task is a pure function of (seed, split, epoch, index).
        amplitude: ``(low, high)`` of the amplitude.
        phase: ``(low, high)`` of the phase.
        x_range: ``(low, high)`` of the inputs.

    Example:
        >>> src = SinusoidSource(5, 10, seed=0, amplitude=(0.1, 5.0), phase=(0.0, 3.14), x_range=(-5.0, 5.0))
        >>> ep = src.episode("train", 0, 3)
        >>> ep.support_x.shape, ep.query_y.shape
        (torch.Size([5, 1]), torch.Size([10, 1]))

    """

    def __init__(self, shots: int, queries: int, seed: int, amplitude: tuple[float, float],
                 phase: tuple[float, float], x_range: tuple[float, float]) -> None:
        self.shots, self.queries, self.seed = shots, queries, seed
        self.amplitude, self.phase, self.x_range = amplitude, phase, x_range

    def _draws(self, split: str, epoch: int, indices: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        n = self.shots + self.queries
        u = counter_uniform(self.seed, split, epoch, list(indices), n + 2)  # [B, n + 2]
        a = self.amplitude[0] + (self.amplitude[1] - self.amplitude[0]) * u[:, :1]
        p = self.phase[0] + (self.phase[1] - self.phase[0]) * u[:, 1:2]
        x = self.x_range[0] + (self.x_range[1] - self.x_range[0]) * u[:, 2:]
        return x[..., None], (a * np.sin(x - p))[..., None]

    def episode(self, split: str, epoch: int, index: int) -> Episode:
        """Task ``index`` of ``(split, epoch)``: ``shots`` support and ``queries`` fresh query points."""
        return self.episodes(split, epoch, (index,)).task(0)

    def episodes(self, split: str, epoch: int, indices: tuple[int, ...]) -> Episode:
        """The meta-batch of ``indices`` in one vectorised draw (equal to collating each :meth:`episode`)."""
        x, y = self._draws(split, epoch, indices)
        x = torch.from_numpy(x.astype(np.float32))
        y = torch.from_numpy(y.astype(np.float32))
        k = self.shots
        return Episode(x[:, :k], y[:, :k], x[:, k:], y[:, k:], torch.zeros(len(indices), 0, dtype=torch.long))


class SinusoidDataModule(EpisodicDataModule):
    """Sinusoid regression episodes (no shards, generated on the fly, exact and resumable).

    The defaults follow the MAML paper: amplitude in [0.1, 5.0], phase in [0, pi], x in [-5, 5],
    K = 10 support points during meta-training, meta-batch 25. Evaluation uses ``eval_shots``
    support points (K = 5 or 10 in the paper's Table 2) and ``eval_queries`` fresh points. The
    meta-batch, episode count, seed and worker arguments are
    :class:`~lightning_meta.datamodules.EpisodicDataModule`'s (described there).

    Args:
        shots: support points per training task (K).
        queries: query points per training task.
        eval_shots: support points at validation/test (default: ``shots``).
        eval_queries: query points at validation/test.
        amplitude: ``(low, high)`` of the uniform amplitude ``A``.
        phase: ``(low, high)`` of the uniform phase.
        x_range: ``(low, high)`` of the uniform inputs ``x``.

    Example:
        >>> dm = SinusoidDataModule(); dm.setup("fit")
        >>> batch = next(iter(dm.train_dataloader()))
        >>> batch.support_x.shape, batch.query_y.shape
        (torch.Size([25, 10, 1]), torch.Size([25, 10, 1]))

    """

    task = "regression"

    def __init__(
        self,
        shots: int = 10,
        queries: int = 10,
        eval_shots: int | None = None,
        eval_queries: int = 100,
        amplitude: tuple[float, float] = (0.1, 5.0),
        phase: tuple[float, float] = (0.0, float(np.pi)),
        x_range: tuple[float, float] = (-5.0, 5.0),
        meta_batch_size: int = 25,
        eval_meta_batch_size: int = 100,
        train_episodes: int = 25000,
        val_episodes: int = 100,
        test_episodes: int = 600,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(ways=1, shots=shots, queries=queries, eval_ways=1, eval_shots=eval_shots,
                         eval_queries=eval_queries, meta_batch_size=meta_batch_size,
                         eval_meta_batch_size=eval_meta_batch_size, train_episodes=train_episodes,
                         val_episodes=val_episodes, test_episodes=test_episodes, seed=seed, num_workers=num_workers)
        for name, (lo, hi) in {"amplitude": amplitude, "phase": phase, "x_range": x_range}.items():
            if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
                raise MetaConfigError(f"{name}={(lo, hi)} must be a finite interval (low <= high)")
        self.ways = 0  # regression: no classes (linked to the model's ways)
        self.amplitude, self.phase, self.x_range = tuple(amplitude), tuple(phase), tuple(x_range)

    def setup(self, stage: str | None = None) -> None:  # noqa: D102
        args = (self.seed, self.amplitude, self.phase, self.x_range)
        self.sources["train"] = SinusoidSource(self.shots, self.queries, *args)
        for split in ("val", "test"):
            self.sources[split] = SinusoidSource(self.eval_shots, self.eval_queries, *args)
