"""Fast paths must give exactly what the reference paths give."""

from __future__ import annotations

import torch

from lightning_meta import collate_episodes
from lightning_meta.datamodules import SinusoidDataModule


def test_sinusoid_batched_episodes_equal_collated_singles():
    dm = SinusoidDataModule(shots=7, queries=3)
    dm.setup("fit")
    for split in ("train", "val"):
        src = dm.sources[split]
        fast = src.episodes(split, 4, (10, 11, 12, 13))
        ref = collate_episodes([src.episode(split, 4, i) for i in (10, 11, 12, 13)])
        for f in ("support_x", "support_y", "query_x", "query_y", "classes"):
            assert torch.equal(getattr(fast, f), getattr(ref, f)), (split, f)
