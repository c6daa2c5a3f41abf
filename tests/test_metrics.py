"""Tests for the EpisodicMean metric (mean and 95% CI over episodes from sufficient statistics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lightning_meta.metrics import EpisodicMean


def numpy_mean_ci(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), float(1.96 * x.std(ddof=1) / math.sqrt(len(x)))


def test_episodic_mean_matches_numpy_over_several_updates():
    torch.manual_seed(0)
    chunks = [torch.rand(4), torch.rand(1), torch.rand(2, 3), torch.rand(7)]  # any shape, one score per element
    m = EpisodicMean()
    for c in chunks:
        m.update(c)
    out = m.compute()
    x = torch.cat([c.flatten() for c in chunks]).double().numpy()
    mean, half = numpy_mean_ci(x)
    assert out["n"].item() == len(x) == 18
    assert out["mean"].item() == pytest.approx(mean, rel=1e-12)
    assert out["ci95"].item() == pytest.approx(half, rel=1e-9)
    assert out["mean"].dtype == torch.float64


def test_episodic_mean_is_exact_for_float32_accuracies():
    # accuracies near 1 in float32: the statistics are accumulated in float64, so no cancellation
    rng = np.random.default_rng(1)
    x = (rng.integers(70, 76, size=600) / 75.0).astype(np.float32)
    m = EpisodicMean()
    for chunk in np.array_split(x, 37):
        m.update(torch.from_numpy(chunk))
    mean, half = numpy_mean_ci(x.astype(np.float64))
    out = m.compute()
    assert out["mean"].item() == pytest.approx(mean, rel=1e-10)
    assert out["ci95"].item() == pytest.approx(half, rel=1e-7)


def test_episodic_mean_does_not_track_gradients():
    w = torch.ones(3, requires_grad=True)
    m = EpisodicMean()
    m.update(w * 0.5)
    assert not m.total.requires_grad
    assert m.compute()["mean"].item() == pytest.approx(0.5)


def test_episodic_mean_reset_and_single_episode():
    m = EpisodicMean()
    m.update(torch.tensor([0.1, 0.9, 0.5]))
    m.reset()
    assert m.n.item() == 0 and m.total.item() == 0 and m.total_sq.item() == 0
    m.update(torch.tensor([0.25]))
    out = m.compute()
    assert out["mean"].item() == pytest.approx(0.25)
    assert out["ci95"].item() == 0.0
    assert out["n"].item() == 1


def test_episodic_mean_merge_state_equals_union():
    torch.manual_seed(2)
    a, b = torch.rand(5), torch.rand(8)
    m1, m2, whole = EpisodicMean(), EpisodicMean(), EpisodicMean()
    m1.update(a)
    m2.update(b)
    whole.update(torch.cat([a, b]))
    m1.merge_state(m2)
    for k in ("mean", "ci95", "n"):
        torch.testing.assert_close(m1.compute()[k], whole.compute()[k])


# ------------------------------------------------------------------------- 2-process DDP


def _ddp_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(100 + rank)
        local = torch.rand(3 * (rank + 2))  # unequal numbers of episodes on the two ranks
        m = EpisodicMean()
        for chunk in local.split(3):
            m.update(chunk)
        out = m.compute()  # synchronised across ranks
        torch.save({"out": out, "scores": local}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_episodic_mean_ddp_gloo_equals_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    x = torch.cat([r["scores"] for r in res]).double().numpy()
    assert len(x) == 6 + 9
    mean, half = numpy_mean_ci(x)
    for r in res:  # every rank reports the statistics of the union
        assert r["out"]["n"].item() == len(x)
        assert r["out"]["mean"].item() == pytest.approx(mean, rel=1e-10)
        assert r["out"]["ci95"].item() == pytest.approx(half, rel=1e-7)


@pytest.mark.parametrize("cast", ["to_bf16", "to_fp16", "bfloat16", "half", "type"])
def test_episodic_mean_states_stay_float64_when_the_module_is_cast(cast):
    # Trainer(precision="bf16-true") casts the LightningModule (and its metrics) with Module.to(dtype);
    # a bf16 sum stops growing at 256, so cast states would report a wrong mean and episode count.
    m = EpisodicMean()
    parent = torch.nn.Module()
    parent.metric = m
    {"to_bf16": lambda: parent.to(torch.bfloat16), "to_fp16": lambda: parent.to(dtype=torch.float16),
     "bfloat16": parent.bfloat16, "half": parent.half, "type": lambda: parent.type(torch.bfloat16)}[cast]()
    scores = torch.full((1000,), 0.9)
    for chunk in scores.split(10):
        m.update(chunk.to(torch.bfloat16))
    assert m.total.dtype == m.total_sq.dtype == m.n.dtype == torch.float64
    r = m.compute()
    assert r["n"].item() == 1000
    assert r["mean"].item() == pytest.approx(torch.tensor(0.9, dtype=torch.bfloat16).item(), abs=1e-12)
    m.reset()
    assert m.total.dtype == torch.float64 and m.n.item() == 0


def test_bf16_true_meta_test_reports_every_episode():
    import lightning as L
    from torch.utils.data import DataLoader

    from lightning_meta import Episode
    from lightning_meta.algorithms import ProtoNet
    from lightning_meta.episode import collate_episodes

    g = torch.Generator().manual_seed(0)
    eps = []
    for _ in range(300):
        centers = torch.randn(5, 8, generator=g) * 3
        eps.append(Episode(centers, torch.arange(5), centers.repeat(3, 1) + 2.5 * torch.randn(15, 8, generator=g),
                           torch.arange(5).repeat(3), torch.arange(5)))
    model = ProtoNet(torch.nn.Linear(8, 8))
    trainer = L.Trainer(precision="bf16-true", accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    r = trainer.test(model, DataLoader(eps, batch_size=1, collate_fn=collate_episodes), verbose=False)[0]
    assert r["test/episodes"] == 300  # a bf16 count saturates at 256
    assert model.test_metric.total.dtype == torch.float64
    assert 0.2 < r["test/acc"] < 1.0
