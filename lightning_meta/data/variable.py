"""Meta-Dataset's variable-way variable-shot episode sampler (Triantafillou et al. 2020, REFERENCE §5).

An episode plan is ``[(class_position, shots, queries), ...]``: which classes, how many support
examples of each (unequal) and how many queries (equal for every class). It depends only on the
number of examples of each class, so the indexed and the streaming readers share it, and it is
drawn from the episode's own generator (:func:`~lightning_meta.data.sampling.episode_rng`).

1. Way ``N ~ U{min_ways .. min(max_ways, classes)}``, classes uniformly without replacement; with
   a class hierarchy (Omniglot), a group (alphabet) is drawn uniformly first, then ``N`` of its
   classes, with ``N <= min(max_ways, classes in the group)``.
2. Queries ``q = min(max_queries, min_c floor(n_c / 2))`` for every class.
3. Support size ``beta ~ U(0, 1]``, ``|S| = min(max_support, sum_c ceil(beta * min(max_support_per_class, n_c - q)))``.
4. Shots ``alpha_c ~ U[log 0.5, log 2)``, ``w_c = n_c * exp(alpha_c)``, ``R_c = w_c / sum(w)``,
   ``k_c = min(floor(R_c * (|S| - N)) + 1, n_c - q)``: every class gets at least one shot and
   ``sum_c k_c <= |S|``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lightning_meta.errors import MetaConfigError

__all__ = ["VariableShape", "check_variable", "sample_variable", "usable_groups"]


@dataclass(frozen=True)
class VariableShape:
    """Bounds of Meta-Dataset's variable-way variable-shot episodes (defaults: the paper's values).

    Args:
        min_ways: smallest way (5).
        max_ways: largest way (50), further capped by the classes available.
        max_queries: queries per class at most (10).
        max_support: support-set size at most (500).
        max_support_per_class: most a class adds to the support-size draw (100).
        min_log_weight, max_log_weight: range of the log shot weights (``log 0.5``, ``log 2``).

    Example:
        >>> VariableShape().max_ways, VariableShape(max_ways=20).min_ways
        (50, 5)

    """

    min_ways: int = 5
    max_ways: int = 50
    max_queries: int = 10
    max_support: int = 500
    max_support_per_class: int = 100
    min_log_weight: float = math.log(0.5)
    max_log_weight: float = math.log(2.0)

    def __post_init__(self) -> None:
        if self.min_ways < 2:
            raise MetaConfigError(f"min_ways={self.min_ways} must be >= 2 (Meta-Dataset uses 5)")
        if self.max_ways < self.min_ways:
            raise MetaConfigError(f"max_ways={self.max_ways} is smaller than min_ways={self.min_ways}; "
                                  "use max_ways >= min_ways (Meta-Dataset uses 5 and 50)")
        if self.max_queries < 1:
            raise MetaConfigError(f"max_queries={self.max_queries} must be >= 1 (Meta-Dataset uses 10)")
        if self.max_support_per_class < 1:
            raise MetaConfigError(f"max_support_per_class={self.max_support_per_class} must be >= 1 "
                                  "(Meta-Dataset uses 100)")
        if self.max_support < self.max_ways:
            raise MetaConfigError(f"max_support={self.max_support} is smaller than max_ways={self.max_ways}: every "
                                  "class needs a support example; use max_support >= max_ways (Meta-Dataset: 500)")
        if not self.min_log_weight <= self.max_log_weight:
            raise MetaConfigError(f"min_log_weight={self.min_log_weight} must be <= max_log_weight="
                                  f"{self.max_log_weight}")


def check_variable(counts: Sequence[int], shape: VariableShape, groups: Sequence[Sequence[int]] | None,
                   names: Sequence[str] | None = None, where: str = "the split") -> None:
    """Refuses class sets that cannot give a variable episode, naming the problem and the fix.

    Args:
        counts: examples per class.
        shape: the episode bounds.
        groups: the usable groups (class positions) when sampling is hierarchical, else None.
        names: class names for the message.
        where: what the classes are (for the message).

    Raises:
        MetaConfigError: fewer than ``min_ways`` classes (in every group), or a class with fewer than
            two examples (one support and one query).

    """
    if len(counts) < shape.min_ways:
        raise MetaConfigError(f"variable-way episodes need at least min_ways={shape.min_ways} classes but {where} "
                              f"has {len(counts)}; lower min_ways or add classes")
    small = [i for i, n in enumerate(counts) if n < 2]
    if small:
        name = names[small[0]] if names is not None else str(small[0])
        raise MetaConfigError(f"class {name!r} in {where} has {counts[small[0]]} example(s) but a variable-way "
                              f"episode needs at least 2 per class (a support and a query); remove the "
                              f"{len(small)} class(es) that small")
    if groups is not None and not groups:
        raise MetaConfigError(f"hierarchical (group-first) variable-way episodes need a group with at least "
                              f"min_ways={shape.min_ways} classes, and {where} has none; set hierarchy='none' or "
                              "lower min_ways")


def usable_groups(group_of: Sequence[str | None], min_ways: int) -> list[np.ndarray]:
    """Class positions of each group with at least ``min_ways`` classes, groups in sorted name order."""
    by: dict[str, list[int]] = {}
    for i, g in enumerate(group_of):
        by.setdefault(str(g), []).append(i)
    return [np.asarray(by[g]) for g in sorted(by) if len(by[g]) >= min_ways]


def sample_variable(
    rng: np.random.Generator,
    counts: Sequence[int] | np.ndarray,
    shape: VariableShape,
    groups: Sequence[np.ndarray] | None = None,
) -> list[tuple[int, int, int]]:
    """Draws one variable-way variable-shot episode plan (REFERENCE §5).

    Args:
        rng: the episode's generator.
        counts: examples of each available class (at least 2 each, see :func:`check_variable`).
        shape: bounds.
        groups: for hierarchical sampling, the class positions of each group (every group with at
            least ``shape.min_ways`` classes); None samples classes from the whole split.

    Returns:
        ``[(class_position, shots, queries), ...]``, one entry per class in label order.

    Example:
        >>> plan = sample_variable(np.random.default_rng(0), [20] * 30, VariableShape())
        >>> 5 <= len(plan) <= 30, len({q for _, _, q in plan}), all(k >= 1 for _, k, _ in plan)
        (True, 1, True)

    """
    counts = np.asarray(counts, dtype=np.int64)
    if groups is None:
        pool = np.arange(len(counts))
    else:
        pool = np.asarray(groups[int(rng.integers(len(groups)))])
    ways = int(rng.integers(shape.min_ways, min(shape.max_ways, len(pool)) + 1))
    classes = pool[rng.choice(len(pool), size=ways, replace=False)]
    n = counts[classes]
    queries = int(min(shape.max_queries, int((n // 2).min())))
    remaining = n - queries
    beta = 1.0 - rng.random()  # U(0, 1]
    contrib = np.minimum(shape.max_support_per_class, remaining)
    support = int(min(shape.max_support, int(np.ceil(beta * contrib).sum())))
    alpha = rng.uniform(shape.min_log_weight, shape.max_log_weight, size=ways)
    weights = n * np.exp(alpha)
    share = weights / weights.sum()
    shots = np.minimum(np.floor(share * (support - ways)).astype(np.int64) + 1, remaining)
    return [(int(c), int(k), queries) for c, k in zip(classes, shots, strict=True)]
