"""Tests for lightning_meta.functional: prototypes, distances, CI statistics, inner loop, BN policies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_meta.functional import (
    accuracy,
    bn_policy,
    inner_adapt,
    mean_ci95,
    mean_ci95_from_stats,
    pairwise_distance,
    prototypes,
    sgd_step,
)

# ----------------------------------------------------------------------------- prototypes


def loop_prototypes(emb: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    rows = []
    for c in range(ways):
        members = [emb[i] for i in range(len(labels)) if int(labels[i]) == c]
        rows.append(sum(members) / len(members) if members else torch.zeros(emb.shape[-1], dtype=emb.dtype))
    return torch.stack(rows)


def test_prototypes_match_per_class_loop_with_uneven_shots():
    torch.manual_seed(0)
    labels = torch.tensor([2, 0, 1, 2, 2, 0, 3, 1, 2])  # uneven counts, unsorted
    emb = torch.randn(len(labels), 7, dtype=torch.float64)
    out = prototypes(emb, labels, 4)
    assert out.shape == (4, 7)
    torch.testing.assert_close(out, loop_prototypes(emb, labels, 4), rtol=1e-12, atol=1e-12)


def test_prototypes_batched_matches_per_task_loop():
    torch.manual_seed(1)
    b, n, d, ways = 3, 10, 5, 4
    emb = torch.randn(b, n, d, dtype=torch.float64)
    labels = torch.stack([torch.randperm(n) % ways for _ in range(b)])
    out = prototypes(emb, labels, ways)
    assert out.shape == (b, ways, d)
    for i in range(b):
        torch.testing.assert_close(out[i], loop_prototypes(emb[i], labels[i], ways), rtol=1e-12, atol=1e-12)


def test_prototypes_empty_class_is_zero_and_gradient_flows():
    emb = torch.randn(4, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 2, 2])
    out = prototypes(emb, labels, 3)
    assert torch.equal(out[1], torch.zeros(3))
    out.sum().backward()
    # each embedding contributes 1/count of its class to every coordinate
    torch.testing.assert_close(emb.grad, torch.full((4, 3), 0.5))


# ------------------------------------------------------------------------------ distances


def test_euclidean_distance_is_squared_cdist():
    torch.manual_seed(2)
    q = torch.randn(2, 9, 6, dtype=torch.float64)
    p = torch.randn(2, 4, 6, dtype=torch.float64)
    d = pairwise_distance(q, p, "euclidean")
    assert d.shape == (2, 9, 4)
    torch.testing.assert_close(d, torch.cdist(q, p) ** 2, rtol=1e-10, atol=1e-10)
    # a query equal to a prototype is at distance zero (never negative after rounding)
    d0 = pairwise_distance(p[0], p[0])
    assert (d0 >= 0).all()
    torch.testing.assert_close(torch.diagonal(d0), torch.zeros(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_cosine_distance_by_hand():
    torch.manual_seed(3)
    q = torch.randn(5, 3, dtype=torch.float64)
    p = torch.randn(4, 3, dtype=torch.float64)
    d = pairwise_distance(q, p, "cosine")
    expected = torch.empty(5, 4, dtype=torch.float64)
    for i in range(5):
        for j in range(4):
            expected[i, j] = 1.0 - (q[i] @ p[j]) / (q[i].norm() * p[j].norm())
    torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-12)
    # scale invariance, range [0, 2]
    torch.testing.assert_close(pairwise_distance(3.0 * q, 0.5 * p, "cosine"), d, rtol=1e-12, atol=1e-12)
    assert (d >= 0).all() and (d <= 2).all()


def test_unknown_distance_raises():
    with pytest.raises(ValueError, match="manhattan"):
        pairwise_distance(torch.zeros(2, 3), torch.zeros(2, 3), "manhattan")  # type: ignore[arg-type]


def test_accuracy():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 4.0], [0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 1, 0])).item() == pytest.approx(0.5)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("n", [2, 3, 17, 600])
def test_mean_ci95_from_stats_matches_numpy(n):
    rng = np.random.default_rng(n)
    x = rng.uniform(0.2, 1.0, size=n)
    t = torch.from_numpy(x)
    mean, half = mean_ci95_from_stats(t.sum(), (t**2).sum(), torch.tensor(float(n)))
    assert mean.item() == pytest.approx(x.mean(), rel=1e-12)
    assert half.item() == pytest.approx(1.96 * x.std(ddof=1) / math.sqrt(n), rel=1e-9)
    m2, h2 = mean_ci95(t.float())
    assert m2 == pytest.approx(x.mean(), rel=1e-6)
    assert h2 == pytest.approx(1.96 * x.std(ddof=1) / math.sqrt(n), rel=1e-4)


def test_mean_ci95_edge_cases():
    # one episode: zero half-width; constant scores: zero half-width (never NaN from rounding)
    m, h = mean_ci95_from_stats(torch.tensor(0.7), torch.tensor(0.49), torch.tensor(1.0))
    assert m.item() == pytest.approx(0.7) and h.item() == 0.0
    x = torch.full((50,), 0.1, dtype=torch.float64)
    m, h = mean_ci95_from_stats(x.sum(), (x**2).sum(), torch.tensor(50.0))
    assert h.item() == pytest.approx(0.0, abs=1e-9) and not math.isnan(h.item())
    # no episodes: NaN
    m, h = mean_ci95_from_stats(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0))
    assert math.isnan(m.item())
    assert all(math.isnan(v) for v in mean_ci95(torch.tensor([])))


# ----------------------------------------------------------------------------- inner loop


def test_sgd_step_float_and_per_parameter_lr():
    p = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3.0)}
    g = {"a": torch.tensor([0.5, -1.0]), "b": torch.tensor(2.0)}
    out = sgd_step(p, g, 0.1)
    torch.testing.assert_close(out["a"], torch.tensor([0.95, 2.1]))
    torch.testing.assert_close(out["b"], torch.tensor(2.8))
    out = sgd_step(p, g, {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor(0.5)})
    torch.testing.assert_close(out["a"], torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(out["b"], torch.tensor(2.0))
    assert torch.equal(p["a"], torch.tensor([1.0, 2.0]))  # inputs untouched


def test_inner_adapt_matches_manual_gradient_descent_and_leaves_module_alone():
    torch.manual_seed(4)
    net = nn.Linear(3, 2).double()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    params = dict(net.named_parameters())
    seen = []
    fast = inner_adapt(
        net, params, {}, x, y, nn.functional.mse_loss, lr=0.3, steps=3, callback=lambda step, p: seen.append(step)
    )
    assert seen == [0, 1, 2]
    w, b = net.weight.detach().clone(), net.bias.detach().clone()
    for _ in range(3):
        w.requires_grad_(True)
        b.requires_grad_(True)
        loss = nn.functional.mse_loss(x @ w.T + b, y)
        gw, gb = torch.autograd.grad(loss, (w, b))
        w, b = (w - 0.3 * gw).detach(), (b - 0.3 * gb).detach()
    torch.testing.assert_close(fast["weight"].detach(), w, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast["bias"].detach(), b, rtol=1e-12, atol=1e-12)
    assert fast["weight"].requires_grad  # second order by default: still a function of params
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_inner_adapt_zero_steps_and_first_order():
    net = nn.Linear(2, 1)
    params = dict(net.named_parameters())
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    same = inner_adapt(net, params, {}, x, y, nn.functional.mse_loss, 0.1, steps=0)
    assert all(same[k] is params[k] for k in params)
    fo = inner_adapt(net, params, {}, x, y, nn.functional.mse_loss, 0.1, steps=2, first_order=True)
    # first order: d fast / d params is the identity
    (fo["weight"].sum() + fo["bias"].sum()).backward()
    torch.testing.assert_close(net.weight.grad, torch.ones_like(net.weight))
    torch.testing.assert_close(net.bias.grad, torch.ones_like(net.bias))


def test_inner_adapt_frozen_parameters_are_used_but_not_adapted():
    torch.manual_seed(5)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    named = dict(net.named_parameters())
    adapted = {k: v for k, v in named.items() if k.startswith("2.")}
    frozen = {k: v for k, v in named.items() if k.startswith("0.")}
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    fast = inner_adapt(net, adapted, {}, x, y, nn.functional.mse_loss, 0.5, steps=1, frozen=frozen)
    assert sorted(fast) == ["2.bias", "2.weight"]
    h = torch.tanh(net[0](x)).detach()
    w = net[2].weight.detach().clone().requires_grad_(True)
    b = net[2].bias.detach().clone().requires_grad_(True)
    gw, gb = torch.autograd.grad(nn.functional.mse_loss(h @ w.T + b, y), (w, b))
    torch.testing.assert_close(fast["2.weight"].detach(), w - 0.5 * gw)
    torch.testing.assert_close(fast["2.bias"].detach(), b - 0.5 * gb)


# ------------------------------------------------------------------------------ BN policy


def make_bn_net() -> nn.Sequential:
    torch.manual_seed(6)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2), nn.BatchNorm1d(2))
    # non-trivial running statistics so that "used" vs "not used" is visible
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return net


def bn_state(net: nn.Module) -> list[tuple[bool, bool]]:
    return [(m.training, m.track_running_stats) for m in net.modules() if isinstance(m, nn.BatchNorm1d)]


def buffers_copy(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in net.named_buffers()}


@pytest.mark.parametrize("policy", ["transductive", "frozen"])
@pytest.mark.parametrize("training", [True, False])
def test_bn_policy_restores_module_state(policy, training):
    net = make_bn_net().train(training)
    net[4].track_running_stats = False  # mixed settings must come back exactly
    before = bn_state(net)
    with bn_policy(net, policy):
        inside = bn_state(net)
        net(torch.randn(5, 3))
    assert bn_state(net) == before
    if policy == "transductive":
        assert inside == [(True, False), (True, False)]
    else:
        assert [t for t, _ in inside] == [False, False]
    assert net[0].training == training  # non-norm modules untouched


def test_bn_policy_restores_state_after_exception():
    net = make_bn_net().eval()
    before = bn_state(net)
    with pytest.raises(RuntimeError, match="boom"), bn_policy(net, "transductive"):
        raise RuntimeError("boom")
    assert bn_state(net) == before


@pytest.mark.parametrize("training", [True, False])
def test_transductive_uses_batch_stats_and_leaves_running_stats_untouched(training):
    net = make_bn_net().train(training)
    before = buffers_copy(net)
    x = torch.randn(8, 3)
    with bn_policy(net, "transductive"):
        out = net(x)
    for k, v in net.named_buffers():
        assert torch.equal(v, before[k]), k
    # reference: batch statistics (biased variance), running statistics ignored
    h = net[0](x)
    h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + net[1].eps) * net[1].weight + net[1].bias
    h = net[3](torch.relu(h))
    ref = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + net[4].eps) * net[4].weight + net[4].bias
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_frozen_uses_running_stats_even_in_training_mode():
    net = make_bn_net().train()
    before = buffers_copy(net)
    x = torch.randn(8, 3)
    with bn_policy(net, "frozen"):
        out = net(x)
    for k, v in net.named_buffers():
        assert torch.equal(v, before[k]), k
    net.eval()
    torch.testing.assert_close(out, net(x))


def test_bn_policy_errors():
    with pytest.raises(ValueError, match="'per_step'"), bn_policy(make_bn_net(), "per_step"):  # type: ignore[arg-type]
        pass
    no_stats = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False))
    with pytest.raises(ValueError, match="transductive"), bn_policy(no_stats, "frozen"):
        pass
    assert no_stats[1].training  # restored even though the policy was refused
