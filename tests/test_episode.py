"""Tests for the Episode container and collate_episodes."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from lightning_meta import Episode, collate_episodes


def make_episode(ways: int = 3, shots: int = 2, queries: int = 4, seed: int = 0, side: int = 5) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        support_x=torch.randn(ways * shots, 1, side, side, generator=g),
        support_y=torch.arange(ways).repeat_interleave(shots),
        query_x=torch.randn(ways * queries, 1, side, side, generator=g),
        query_y=torch.arange(ways).repeat_interleave(queries),
        classes=torch.randperm(20, generator=g)[:ways],
    )


def make_regression_episode(k: int = 4, q: int = 6, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.randn(k, 1, generator=g),
        torch.randn(k, 1, generator=g),
        torch.randn(q, 1, generator=g),
        torch.randn(q, 1, generator=g),
        torch.zeros(0, dtype=torch.long),
    )


def assert_episodes_equal(a: Episode, b: Episode) -> None:
    for f in fields(Episode):
        ta, tb = getattr(a, f.name), getattr(b, f.name)
        assert ta.dtype == tb.dtype, f.name
        assert torch.equal(ta, tb), f.name


def test_single_episode_properties():
    ep = make_episode(ways=3, shots=2, queries=4)
    assert not ep.is_batched
    assert ep.num_tasks == 1
    assert ep.ways == 3
    assert ep.tasks() == [ep]
    with pytest.raises(IndexError, match="collate_episodes"):
        ep.task(0)


def test_collate_shapes_and_roundtrip():
    eps = [make_episode(seed=s) for s in range(4)]
    batch = collate_episodes(eps)
    assert batch.is_batched
    assert batch.num_tasks == 4
    assert batch.ways == 3
    assert batch.support_x.shape == (4, 6, 1, 5, 5)
    assert batch.support_y.shape == (4, 6)
    assert batch.query_x.shape == (4, 12, 1, 5, 5)
    assert batch.query_y.shape == (4, 12)
    assert batch.classes.shape == (4, 3)
    assert batch.support_y.dtype == torch.long
    for i, ep in enumerate(eps):
        assert_episodes_equal(batch.task(i), ep)
    tasks = batch.tasks()
    assert len(tasks) == 4
    for t, ep in zip(tasks, eps, strict=True):
        assert_episodes_equal(t, ep)
    # re-collating the split tasks gives the same batch back
    assert_episodes_equal(collate_episodes(tasks), batch)


def test_collate_regression_episodes():
    eps = [make_regression_episode(seed=s) for s in range(3)]
    assert eps[0].ways == 0 and not eps[0].is_batched
    batch = collate_episodes(eps)
    assert batch.is_batched and batch.num_tasks == 3 and batch.ways == 0
    assert batch.support_x.shape == (3, 4, 1)
    assert batch.classes.shape == (3, 0)
    assert_episodes_equal(batch.task(2), eps[2])


def test_collate_empty_list_raises():
    with pytest.raises(ValueError, match="empty"):
        collate_episodes([])


@pytest.mark.parametrize(
    ("other", "field"),
    [
        (make_episode(ways=4), "support_x"),  # different way
        (make_episode(shots=1), "support_x"),  # different shot
        (make_episode(queries=3), "query_x"),  # different query count
    ],
)
def test_collate_mismatched_shapes_raise(other, field):
    with pytest.raises(ValueError, match=rf"episode 1 has {field} of shape"):
        collate_episodes([make_episode(), other])


def test_collate_rejects_batches_and_non_episodes():
    batch = collate_episodes([make_episode(), make_episode(seed=1)])
    with pytest.raises(ValueError, match="already a meta-batch"):
        collate_episodes([batch])
    with pytest.raises(ValueError, match="item 1 is tuple"):
        collate_episodes([make_episode(), (1, 2)])


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((torch.float64,), {}),
        (("cpu", torch.float64), {}),
        ((torch.device("cpu"),), {"dtype": torch.float64}),
        ((), {"device": "cpu", "dtype": torch.float64}),
    ],
)
def test_to_casts_floats_and_keeps_integer_dtypes(args, kwargs):
    ep = collate_episodes([make_episode(), make_episode(seed=1)])
    out = ep.to(*args, **kwargs)
    assert isinstance(out, Episode)
    assert out.support_x.dtype == torch.float64 and out.query_x.dtype == torch.float64
    for name in ("support_y", "query_y", "classes"):
        assert getattr(out, name).dtype == torch.long, name
        assert torch.equal(getattr(out, name), getattr(ep, name))
    torch.testing.assert_close(out.support_x, ep.support_x.double())


def test_to_moves_integer_tensors_with_every_spelling_of_the_device():
    from dataclasses import fields

    from lightning_meta.episode import _device_argument

    ep = collate_episodes([make_episode(), make_episode(seed=1)])
    meta = torch.empty(0, device="meta")
    for args, kwargs in [(("meta",), {}), ((torch.device("meta"),), {}), ((), {"device": "meta"}), ((meta,), {})]:
        out = ep.to(*args, **kwargs)
        for f in fields(out):
            assert getattr(out, f.name).device.type == "meta", (args, kwargs, f.name)
        assert out.support_y.dtype == torch.long and out.classes.dtype == torch.long
    # a CUDA index, ep.to(0), moved the images to cuda:0 and left the labels and class ids on the CPU
    assert _device_argument((0,), {}) == 0
    assert _device_argument(("cuda:1", torch.float16), {}) == "cuda:1"
    assert _device_argument((torch.float64,), {}) is None
    assert _device_argument((), {"dtype": torch.float64}) is None


def test_to_keeps_float_targets_float_for_regression():
    ep = make_regression_episode()
    out = ep.to(torch.float64)
    assert out.support_y.dtype == torch.float64 and out.query_y.dtype == torch.float64
    assert out.classes.dtype == torch.long


def test_lightning_device_transfer_keeps_episode():
    from lightning.fabric.utilities.apply_func import move_data_to_device

    ep = collate_episodes([make_episode(), make_episode(seed=1)])
    moved = move_data_to_device(ep, torch.device("cpu"))
    assert isinstance(moved, Episode)
    assert_episodes_equal(moved, ep)


def test_clone_is_independent_copy():
    ep = make_episode()
    c = ep.clone()
    assert_episodes_equal(c, ep)
    c.support_x.add_(1.0)
    c.support_y[0] = 2
    assert not torch.equal(c.support_x, ep.support_x)
    assert ep.support_y[0] == 0


def test_clone_of_inference_tensors_is_ordinary():
    with torch.inference_mode():
        ep = make_episode()
    assert ep.support_x.is_inference()
    c = ep.clone()
    for f in fields(Episode):
        assert not getattr(c, f.name).is_inference(), f.name
    # an ordinary tensor can join an autograd graph; an inference tensor could not be saved for backward
    w = torch.ones((), requires_grad=True)
    (c.support_x * w).sum().backward()
    assert w.grad is not None
