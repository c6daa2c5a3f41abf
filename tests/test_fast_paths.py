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


def test_per_task_loss_and_score_equal_per_task_loop():
    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import MLP

    torch.manual_seed(0)
    for task, out, y in [
        ("classification", torch.randn(4, 10, 5), torch.randint(0, 5, (4, 10))),
        ("regression", torch.randn(4, 10, 1), torch.randn(4, 10, 1)),
    ]:
        m = MAML(MLP(1, [4]), ways=5, task=task)
        want_l = torch.stack([m.loss_fn(out[i], y[i]) for i in range(4)])
        want_s = torch.stack([m.score_fn(out[i], y[i]) for i in range(4)])
        torch.testing.assert_close(m.per_task_loss(out, y), want_l)
        torch.testing.assert_close(m.per_task_score(out, y), want_s)


def test_counter_uniform_is_uniform_and_pure():
    import numpy as np

    from lightning_meta.data.sampling import counter_uniform

    u = counter_uniform(1, "train", 0, list(range(2000)), 50)
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    hist = np.histogram(u, bins=10, range=(0, 1))[0] / u.size
    assert np.abs(hist - 0.1).max() < 0.005
    assert np.array_equal(u[7], counter_uniform(1, "train", 0, [7], 50)[0])
    assert not np.array_equal(u[7], counter_uniform(1, "train", 1, [7], 50)[0])  # epoch matters
    assert not np.array_equal(u[7], counter_uniform(1, "val", 0, [7], 50)[0])  # split matters
    assert not np.array_equal(u[7], counter_uniform(2, "train", 0, [7], 50)[0])  # seed matters
