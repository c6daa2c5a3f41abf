"""Episode sampling as pure functions of ``(seed, split, epoch, index)`` (DESIGN §2).

No global random state is used: every episode draws from its own ``numpy.random.Generator``
seeded by a :class:`numpy.random.SeedSequence` of those four integers, so an episode is the same
whatever the number of dataloader workers, devices or nodes, and whatever ran before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["SPLIT_CODES", "FixedShape", "episode_rng", "sample_fixed"]

SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "predict": 2}


def episode_rng(seed: int, split: str, epoch: int, index: int) -> np.random.Generator:
    """The random generator of one episode."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_CODES[split], int(epoch), int(index)]))


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
