"""Small random episodes shared by the algorithm tests (imported as a plain module from tests/)."""

from __future__ import annotations

import torch

from lightning_meta import Episode, collate_episodes


def cls_batch(tasks=2, ways=3, shots=2, queries=3, size=16, seed=0, dtype=torch.float64):
    """A meta-batch of ``tasks`` random ``ways``-way image episodes (1 x size x size), seeded."""
    g = torch.Generator().manual_seed(seed)
    eps = [Episode(torch.randn(ways * shots, 1, size, size, generator=g, dtype=dtype),
                   torch.arange(ways).repeat_interleave(shots),
                   torch.randn(ways * queries, 1, size, size, generator=g, dtype=dtype),
                   torch.arange(ways).repeat_interleave(queries), torch.arange(ways)) for _ in range(tasks)]
    return collate_episodes(eps)
