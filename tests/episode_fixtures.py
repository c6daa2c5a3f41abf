"""Small random episodes and shards shared by the tests (imported as a plain module from tests/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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


def write_tiny_shards(out: Path) -> None:
    """12 classes of 28x28 images (6 train, 3 val, 3 test), 8 each, each class a fixed random pattern plus noise."""
    from lightning_meta.data.shards import ShardWriter

    rng = np.random.default_rng(0)
    with ShardWriter(out, prefix="tiny", max_samples=40) as w:
        for c in range(12):
            base = rng.integers(0, 256, (28, 28))
            imgs = [np.clip(base + rng.normal(0, 20, (28, 28)), 0, 255).astype(np.uint8) for _ in range(8)]
            w.add_class(c, imgs, name=f"c{c}", split="train" if c < 6 else "val" if c < 9 else "test")
