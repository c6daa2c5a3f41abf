"""Episode sampling as pure functions of ``(seed, split, epoch, index)`` (DESIGN §2).

No global random state is used: every episode draws from its own ``numpy.random.Generator``
seeded by a :class:`numpy.random.SeedSequence` of those four integers, so an episode is the same
whatever the number of dataloader workers, devices or nodes, and whatever ran before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SPLIT_CODES", "FixedShape", "counter_uniform", "episode_rng", "sample_fixed"]

SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "predict": 2}


def episode_rng(seed: int, split: str, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one episode."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_CODES[split], int(epoch), int(index)]))


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser, element-wise on ``uint64`` (wrap-around arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def counter_uniform(seed: int, split: str, epoch: int, indices: np.ndarray | list[int], n: int) -> np.ndarray:
    """Draw ``[len(indices), n]`` uniforms in ``[0, 1)``, each a hash of its coordinates.

    Draw ``j`` of episode ``i`` is a hash of ``(seed, split, epoch, i, j)``.

    A counter-based alternative to :func:`episode_rng` for cheap, fully vectorised episodes
    (sinusoid): each value is still a pure function of the episode's coordinates, so a meta-batch
    built in one call equals its episodes built one by one.

    Example:
        >>> a = counter_uniform(0, "train", 3, [5, 6], 4)
        >>> bool((a[1] == counter_uniform(0, "train", 3, [6], 4)[0]).all()), a.shape
        (True, (2, 4))

    """
    idx = np.asarray(indices, dtype=np.uint64).reshape(-1, 1)
    j = np.arange(n, dtype=np.uint64).reshape(1, -1)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed) * np.uint64(4) + np.uint64(SPLIT_CODES[split]))
        key = _splitmix64(key ^ np.uint64(epoch))
        x = _splitmix64(_splitmix64(key ^ idx) + j)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)


@dataclass(frozen=True)
class FixedShape:
    """An N-way K-shot episode shape with Q queries per class."""

    ways: int
    shots: int
    queries: int

    @property
    def per_class(self) -> int:
        """Examples drawn from each class (``shots + queries``)."""
        return self.shots + self.queries


def sample_fixed(rng: np.random.Generator, counts: Sequence[int], shape: FixedShape) -> list[tuple[int, np.ndarray]]:
    """Draws ``ways`` distinct classes and ``shots + queries`` distinct examples of each.

    Args:
        rng: the episode's generator.
        counts: number of examples of each available class.
        shape: the episode shape.

    Returns:
        ``[(class_position, member_positions), ...]`` in label order; the first ``shots`` members
        of each class are the support set, the rest the queries.

    """
    classes = rng.choice(len(counts), size=shape.ways, replace=False)
    return [(int(c), rng.choice(counts[c], size=shape.per_class, replace=False)) for c in classes]
