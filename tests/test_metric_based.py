"""Metric-based learners: ProtoNet's learned temperature, Matching Networks (with FCE), Relation Networks,
MetaOptNet's ridge head; hand computations, batched vs per-task paths, refusals, and short training runs."""

from __future__ import annotations

import math
import re

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_meta import Episode, collate_episodes
from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.algorithms.matching import (
    AttentionLSTM,
    MatchingNet,
    SupportLSTM,
    matching_attention,
    matching_log_probs,
)
from lightning_meta.algorithms.metaoptnet import MetaOptNet
from lightning_meta.algorithms.protonet import ProtoNet
from lightning_meta.algorithms.relation import RelationModule, RelationNet, class_feature_maps, relation_pairs
from lightning_meta.backbones.conv4 import Conv4
from lightning_meta.backbones.mlp import MLP
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional.ridge import ridge_logits, ridge_regression


def episode(ways: int, shots: int = 2, queries: int = 3, d: int = 6, seed: int = 0, dtype=torch.float32) -> Episode:
    """Vector episodes around random class centres; support labels interleaved (not sorted)."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(ways, d, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat(shots)
    qy = torch.arange(ways).repeat_interleave(queries)
    return Episode(
        centers[sy] + torch.randn(len(sy), d, generator=g, dtype=dtype),
        sy,
        centers[qy] + torch.randn(len(qy), d, generator=g, dtype=dtype),
        qy,
        torch.randperm(50, generator=g)[:ways],
    )


def image_episode(ways: int = 3, shots: int = 2, queries: int = 2, size: int = 16, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.randn(ways * shots, 1, size, size, generator=g),
        torch.arange(ways).repeat(shots),
        torch.randn(ways * queries, 1, size, size, generator=g),
        torch.arange(ways).repeat_interleave(queries),
        torch.arange(ways),
    )


def assert_same_loss_and_grads(a: MetaLearner, b: MetaLearner, batch: Episode) -> None:
    """``a.meta_loss`` (the batched path) equals the base class' adapt/predict loop on ``b``."""
    b.load_state_dict(a.state_dict())
    loss_a = a.meta_loss(batch)
    loss_b = MetaLearner.meta_loss(b, batch)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a._train_scores, b._train_scores)
    loss_a.backward()
    loss_b.backward()
    nonzero = 0
    for (k, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=k)
        nonzero += int(p.grad.abs().sum() > 0)
    assert nonzero == len(list(a.parameters())), "every parameter should receive a gradient"


# --------------------------------------------------------------------------------------------- ProtoNet


def test_protonet_learned_temperature_scales_logits_and_gets_gradient():
    torch.manual_seed(0)
    fixed = ProtoNet(MLP(6, [16, 8]), temperature=2.0).double()
    torch.manual_seed(0)
    learned = ProtoNet(MLP(6, [16, 8]), temperature=2.0, learn_temperature=True).double()
    assert "log_temperature" in dict(learned.named_parameters())
    assert "log_temperature" not in fixed.state_dict()  # old checkpoints still load into the default model
    batch = collate_episodes([episode(3, seed=s, dtype=torch.float64) for s in range(2)])
    torch.testing.assert_close(learned._batched_logits(batch), fixed._batched_logits(batch))
    learned.meta_loss(batch).backward()
    g = learned.log_temperature.grad
    assert g is not None and g.abs().item() > 1e-8
    # d loss / d log T = -sum(dL/dlogits * logits): check against a finite difference
    with torch.no_grad():
        eps = 1e-6
        learned.log_temperature += eps
        up = learned.meta_loss(batch)
        learned.log_temperature -= 2 * eps
        down = learned.meta_loss(batch)
        learned.log_temperature += eps
    assert g.item() == pytest.approx(((up - down) / (2 * eps)).item(), rel=1e-5)


def test_protonet_learned_temperature_stays_positive_under_large_steps():
    torch.manual_seed(0)
    model = ProtoNet(MLP(6, [8]), distance="cosine", temperature=0.5, learn_temperature=True)
    opt = torch.optim.SGD([model.log_temperature], lr=0.05)  # a raw temperature would go below 0 in one step
    batch = collate_episodes([episode(3, seed=s) for s in range(2)])
    seen = []
    for _ in range(5):
        opt.zero_grad()
        # a loss that always pushes the temperature down, hard
        (model.meta_loss(batch) + 100.0 * model.temperature).backward()
        opt.step()
        seen.append(model.temperature.item())
    assert all(t > 0 for t in seen) and seen[-1] < 0.5
    assert torch.isfinite(model._batched_logits(batch)).all()


def test_protonet_keeps_positional_arguments_and_temperature_setter():
    model = ProtoNet(MLP(6, [8]), "cosine", 0.5, 7, 0.01, 0.1)
    got = (model.distance, model.temperature, model.ways, model.lr, model.weight_decay)
    assert got == ("cosine", 0.5, 7, 0.01, 0.1)
    assert model.learn_temperature is False
    model.temperature = 0.25
    assert model.temperature == 0.25
    learned = ProtoNet(MLP(6, [8]), temperature=0.5, learn_temperature=True)
    learned.temperature = 4.0
    assert learned.log_temperature.item() == pytest.approx(math.log(4.0))
    with pytest.raises(MetaConfigError, match=re.escape("temperature=-1 must be > 0")):
        model.temperature = -1


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"temperature": -2.0}])
def test_protonet_learned_temperature_refuses_non_positive_start(kwargs):
    with pytest.raises(MetaConfigError, match=re.escape(f"temperature={kwargs['temperature']} must be > 0")):
        ProtoNet(MLP(6, [8]), learn_temperature=True, **kwargs)


def test_protonet_trained_with_five_shots_evaluates_one_and_three_shots():
    torch.manual_seed(0)
    model = ProtoNet(MLP(6, [16, 8]), learn_temperature=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train = collate_episodes([episode(5, shots=5, queries=2, seed=s) for s in range(2)])
    for _ in range(3):
        opt.zero_grad()
        model.meta_loss(train).backward()
        opt.step()
    model.eval()
    for shots in (1, 3):
        eps = [episode(5, shots=shots, queries=4, seed=10 + s) for s in range(3)]
        acc = model.evaluate(collate_episodes(eps))["acc"]
        assert acc.shape == (3,)
        for a, ep in zip(acc, eps, strict=True):
            with torch.no_grad():
                s_emb, q_emb = model.backbone(ep.support_x), model.backbone(ep.query_x)
                protos = torch.stack([s_emb[ep.support_y == c].mean(0) for c in range(5)])
                if shots == 1:  # a 1-shot prototype is the embedding of its single example
                    torch.testing.assert_close(protos, s_emb[torch.argsort(ep.support_y)])
                logits = -((q_emb[:, None] - protos[None]) ** 2).sum(-1) / model.temperature
            assert a.item() == pytest.approx((logits.argmax(-1) == ep.query_y).float().mean().item())


# ------------------------------------------------------------------------------------------ ridge head


@pytest.mark.parametrize(("n", "d"), [(10, 40), (30, 8)], ids=["n<d", "n>d"])
@pytest.mark.parametrize("solver", ["auto", "dual", "primal"])
def test_ridge_regression_equals_primal_normal_equations(n, d, solver):
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(3, n, d, generator=g, dtype=torch.float64)
    y = F.one_hot(torch.randint(0, 5, (3, n), generator=g), 5).double()
    lam = 0.7
    w = ridge_regression(x, y, lam, solver=solver)
    assert w.shape == (3, d, 5)
    for t in range(3):
        xt = x[t].T
        expected = torch.linalg.solve(xt @ x[t] + lam * torch.eye(d, dtype=torch.float64), xt @ y[t])
        torch.testing.assert_close(w[t], expected, rtol=0, atol=1e-5)
        # it is the minimiser: the gradient of the ridge objective vanishes
        grad = 2 * xt @ (x[t] @ w[t] - y[t]) + 2 * lam * w[t]
        assert grad.abs().max().item() < 1e-9
    q = torch.randn(3, 4, d, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ridge_logits(q, x, y, lam), q @ w, rtol=0, atol=1e-10)


def test_ridge_is_differentiable_in_support_and_queries():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = F.one_hot(torch.tensor([0, 1, 2, 0]), 3).double()
    assert torch.autograd.gradcheck(lambda a, b: ridge_logits(b, a, y, 0.5), (x, q))
    assert torch.autograd.gradcheck(lambda a: ridge_regression(a, y, 0.5, solver="dual"), (x,))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: ridge_regression(torch.randn(4, 3), torch.randn(4, 2), 0.0), "lam=0.0 must be > 0"),
        (lambda: ridge_regression(torch.randn(4, 3), torch.randn(5, 2), 1.0), "same leading axes and n"),
        (lambda: ridge_regression(torch.randn(4, 3), torch.randn(4, 2), 1.0, solver="qr"), "solver='qr'"),
        (lambda: ridge_logits(torch.randn(2, 4), torch.randn(4, 3), torch.randn(4, 2), 1.0), "query (2, 4)"),
    ],
)
def test_ridge_refuses_bad_arguments(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_metaoptnet_logits_are_scaled_ridge_predictions():
    torch.manual_seed(0)
    model = MetaOptNet(MLP(6, [16, 12]), ridge_lambda=2.0, scale=3.0).double()
    ep = episode(4, shots=2, dtype=torch.float64)
    logits = model.predict(model.adapt(ep), ep.query_x)
    assert logits.shape == (12, 4)
    with torch.no_grad():
        x, q = model.backbone(ep.support_x), model.backbone(ep.query_x)
        y = F.one_hot(ep.support_y, 4).double()
        w = torch.linalg.solve(x.T @ x + 2.0 * torch.eye(12, dtype=torch.float64), x.T @ y)
        expected = 3.0 * q @ w
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-7, atol=1e-8)
    batched = model._batched_logits(collate_episodes([ep]))[0]
    torch.testing.assert_close(batched, logits, rtol=1e-7, atol=1e-8)


def test_metaoptnet_batched_meta_loss_equals_per_task_path_and_trains_scale():
    torch.manual_seed(0)
    a = MetaOptNet(Conv4(1, hidden=4, image_size=16, norm="none"), ridge_lambda=1.0, ways=3)
    b = MetaOptNet(Conv4(1, hidden=4, image_size=16, norm="none"), ridge_lambda=1.0, ways=3)
    assert_same_loss_and_grads(a, b, collate_episodes([image_episode(seed=s) for s in range(3)]))
    assert a.scale.grad.abs().item() > 0
    fixed = MetaOptNet(MLP(6, [8]), scale=5.0, learn_scale=False)
    assert "scale" not in dict(fixed.named_parameters()) and fixed.scale.item() == 5.0


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"ridge_lambda": 0.0}, "ridge_lambda=0.0 must be > 0"), ({"ridge_lambda": -1.0}, "ridge_lambda=-1.0"),
     ({"scale": 0.0}, "scale=0.0 must be > 0"), ({"lr": -1.0}, "lr=-1.0")],
)
def test_metaoptnet_bad_configuration(kwargs, named):
    with pytest.raises(MetaConfigError, match=re.escape(named)):
        MetaOptNet(MLP(6, [8]), **kwargs)


def test_metaoptnet_refuses_feature_maps():
    model = MetaOptNet(Conv4(1, 4, 16, flatten=False))
    with pytest.raises(MetaConfigError, match=re.escape("needs flat embeddings [b, d]")):
        model.meta_loss(collate_episodes([image_episode()]))


# ------------------------------------------------------------------------------------- Matching Networks


def test_matching_attention_sums_to_one_and_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    s = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    for temperature in (1.0, 0.2):
        att = matching_attention(q, s, temperature)
        assert att.shape == (2, 4, 6)
        torch.testing.assert_close(att.sum(-1), torch.ones(2, 4, dtype=torch.float64))
        for t in range(2):
            for i in range(4):
                cos = [float(q[t, i] @ s[t, j] / (q[t, i].norm() * s[t, j].norm())) for j in range(6)]
                e = [math.exp(c / temperature) for c in cos]
                expected = torch.tensor([v / sum(e) for v in e], dtype=torch.float64)
                torch.testing.assert_close(att[t, i], expected, rtol=1e-12, atol=1e-12)


def test_matching_probabilities_are_attention_weighted_one_hot_labels():
    g = torch.Generator().manual_seed(1)
    q, s = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1, 2, 0, 1])
    log_p = matching_log_probs(q, s, labels, 3)
    expected = matching_attention(q, s) @ F.one_hot(labels, 3).double()
    torch.testing.assert_close(log_p.exp(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(7, dtype=torch.float64))
    # stays finite where plain probabilities underflow (very low temperature)
    assert torch.isfinite(matching_log_probs(q, s, labels, 3, temperature=1e-4)).all()


def test_matching_net_predicts_log_probabilities_of_its_embeddings():
    torch.manual_seed(0)
    model = MatchingNet(MLP(6, [16, 8]), temperature=0.5).double()
    ep = episode(4, dtype=torch.float64)
    log_p = model.predict(model.adapt(ep), ep.query_x)
    with torch.no_grad():
        att = matching_attention(model.backbone(ep.query_x), model.backbone(ep.support_x), 0.5)
    torch.testing.assert_close(log_p.detach().exp(), att @ F.one_hot(ep.support_y, 4).double())
    batch = collate_episodes([ep])
    loss = model.meta_loss(batch)
    torch.testing.assert_close(loss, F.nll_loss(log_p, ep.query_y))


def test_fce_with_zero_lstm_weights_is_plain_attention():
    torch.manual_seed(0)
    plain = MatchingNet(MLP(6, [8]))
    fce = MatchingNet(MLP(6, [8]), fce=True, fce_steps=2)
    fce.backbone.load_state_dict(plain.backbone.state_dict())
    with torch.no_grad():
        for name, p in fce.named_parameters():
            if "lstm" in name:
                p.zero_()  # every gate is sigmoid(0)=1/2 and the candidate tanh(0)=0, so h stays 0
    batch = collate_episodes([episode(3, seed=s) for s in range(2)])
    torch.testing.assert_close(fce._batched_log_probs(batch), plain._batched_log_probs(batch))


def test_support_lstm_is_bidirectional_residual():
    torch.manual_seed(0)
    enc = SupportLSTM(4).double()
    s = torch.randn(2, 5, 4, dtype=torch.float64)
    out = enc(s)
    # hand recursion of both directions with the module's weights
    lstm = enc.lstm

    def run(x, sfx):
        cell = nn.LSTMCell(4, 4).double()
        cell.weight_ih.data = getattr(lstm, f"weight_ih_l0{sfx}").data
        cell.weight_hh.data = getattr(lstm, f"weight_hh_l0{sfx}").data
        cell.bias_ih.data = getattr(lstm, f"bias_ih_l0{sfx}").data
        cell.bias_hh.data = getattr(lstm, f"bias_hh_l0{sfx}").data
        h = c = torch.zeros(x.shape[0], 4, dtype=torch.float64)
        hs = []
        for t in range(x.shape[1]):
            h, c = cell(x[:, t], (h, c))
            hs.append(h)
        return torch.stack(hs, 1)

    fw = run(s, "")
    bw = run(s.flip(1), "_reverse").flip(1)
    torch.testing.assert_close(out, s + fw + bw)
    changed = s.clone()
    changed[:, -1] += 1.0
    assert (enc(changed)[:, 0] - out[:, 0]).abs().max() > 1e-6  # the first item sees the last one


def test_attention_lstm_follows_the_paper_recursion():
    torch.manual_seed(0)
    f = AttentionLSTM(4, steps=3).double()
    q, g = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 5, 4, dtype=torch.float64)
    out = f(q, g)
    for t in range(2):
        for i in range(3):
            x = q[t, i]
            h, c = x.clone(), torch.zeros(4, dtype=torch.float64)
            for _ in range(3):
                a = torch.softmax(g[t] @ h, 0)
                r = (a[:, None] * g[t]).sum(0)
                gates = f.cell.weight_ih @ torch.cat([x, r]) + f.cell.bias_ih + f.cell.weight_hh @ h + f.cell.bias_hh
                i_g, f_g, c_g, o_g = gates.chunk(4)
                c = torch.sigmoid(f_g) * c + torch.sigmoid(i_g) * torch.tanh(c_g)
                h = torch.sigmoid(o_g) * torch.tanh(c) + x
            torch.testing.assert_close(out[t, i], h)


@pytest.mark.parametrize("fce", [False, True], ids=["plain", "fce"])
def test_matching_batched_meta_loss_equals_per_task_path(fce):
    torch.manual_seed(0)
    a = MatchingNet(Conv4(1, hidden=4, image_size=16, norm="none"), fce=fce, ways=3)
    b = MatchingNet(Conv4(1, hidden=4, image_size=16, norm="none"), fce=fce, ways=3)
    assert_same_loss_and_grads(a, b, collate_episodes([image_episode(seed=s) for s in range(3)]))


def test_matching_shot_and_way_may_change_between_training_and_evaluation():
    torch.manual_seed(0)
    model = MatchingNet(MLP(6, [8]), fce=True)
    model.meta_loss(collate_episodes([episode(5, shots=3, seed=s) for s in range(2)])).backward()
    acc = model.evaluate(collate_episodes([episode(3, shots=1, queries=4, seed=s) for s in range(2)]))["acc"]
    assert acc.shape == (2,) and ((acc >= 0) & (acc <= 1)).all()


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: MatchingNet(MLP(6, [8]), temperature=0.0), "temperature=0.0 must be > 0"),
        (lambda: MatchingNet(MLP(6, [8]), fce=True, fce_steps=0), "fce_steps=0 must be >= 1"),
        (lambda: MatchingNet(nn.Flatten(), fce=True), "pass embedding_dim"),
    ],
)
def test_matching_bad_configuration(make, named):
    with pytest.raises(MetaConfigError, match=re.escape(named)):
        make()


def test_matching_fce_refuses_wrong_embedding_size_at_first_batch():
    model = MatchingNet(nn.Flatten(), fce=True, embedding_dim=10)
    with pytest.raises(MetaConfigError, match=re.escape("set embedding_dim=6")):
        model.meta_loss(collate_episodes([episode(3)]))


# ------------------------------------------------------------------------------------- Relation Networks


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_class_feature_maps_equal_a_hand_loop(aggregation):
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(2, 9, 3, 4, 4, generator=g, dtype=torch.float64)
    labels = torch.stack([torch.tensor([1, 0, 2, 1, 0, 2, 1, 0, 2]), torch.tensor([2, 2, 2, 0, 0, 0, 1, 1, 1])])
    out = class_feature_maps(maps, labels, 3, aggregation)
    assert out.shape == (2, 3, 3, 4, 4)
    for t in range(2):
        for c in range(3):
            acc = torch.zeros(3, 4, 4, dtype=torch.float64)
            count = 0
            for i in range(9):
                if labels[t, i] == c:
                    acc += maps[t, i]
                    count += 1
            expected = acc if aggregation == "sum" else acc / count
            torch.testing.assert_close(out[t, c], expected, rtol=1e-12, atol=1e-12)


def test_relation_pairs_put_the_class_map_first():
    classes, queries = torch.randn(3, 2, 4, 4), torch.randn(5, 2, 4, 4)
    pairs = relation_pairs(classes, queries)
    assert pairs.shape == (5, 3, 4, 4, 4)
    for i in range(5):
        for c in range(3):
            assert torch.equal(pairs[i, c], torch.cat([classes[c], queries[i]]))


def test_conv4_feature_map_option_is_backward_compatible():
    torch.manual_seed(0)
    old_style = Conv4(1, 8, 28)
    torch.manual_seed(0)
    explicit = Conv4(1, 8, 28, pool_blocks=4, flatten=True)
    assert list(old_style.state_dict()) == list(explicit.state_dict())
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(old_style(x), explicit(x))
    assert old_style.out_features == 8 and old_style.out_shape == (8, 1, 1)
    maps = Conv4(1, 8, 28, pool_blocks=2, flatten=False)
    assert maps(x).shape == (2, *maps.out_shape) == (2, 8, 7, 7)
    with pytest.raises(ValueError, match=re.escape("pool_blocks=5")):
        Conv4(1, 8, 28, pool_blocks=5)


def test_relation_net_scores_and_mse_loss():
    torch.manual_seed(0)
    model = RelationNet(Conv4(1, 4, 16, norm="none", pool_blocks=2, flatten=False), relation_channels=4,
                        relation_hidden=3, ways=3)
    ep = image_episode(ways=3, shots=2, queries=2)
    scores = model.predict(model.adapt(ep), ep.query_x)
    assert scores.shape == (6, 3) and ((scores > 0) & (scores < 1)).all()
    loss = model.meta_loss(collate_episodes([ep]))
    # BatchNorm in the relation module sees the same 18 pairs in both paths
    torch.testing.assert_close(loss, ((scores - F.one_hot(ep.query_y, 3).float()) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_relation_batched_meta_loss_equals_per_task_path():
    torch.manual_seed(0)
    a = RelationNet(Conv4(1, 4, 16, norm="none", pool_blocks=2, flatten=False), relation_channels=4, ways=3)
    b = RelationNet(Conv4(1, 4, 16, norm="none", pool_blocks=2, flatten=False), relation_channels=4, ways=3)
    batch = collate_episodes([image_episode(seed=s) for s in range(3)])
    b.load_state_dict(a.state_dict())
    # the per-task path runs the relation module once per task too, so BatchNorm agrees
    loss_a = a.meta_loss(batch)
    loss_b = torch.stack([b.loss_fn(b.predict(b.adapt(ep), ep.query_x), ep.query_y) for ep in batch.tasks()]).mean()
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    loss_a.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in a.parameters())


class _NoShape(nn.Module):
    """An encoder that declares nothing about its output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda: RelationNet(Conv4(1, 4, 28, pool_blocks=2, flatten=False), feature_shape=(4, 5, 5)),
         "feature_shape=(4, 5, 5) does not match the backbone's feature maps (4, 7, 7); "
         "set feature_shape to [4, 7, 7]"),
        (lambda: RelationNet(Conv4(1, 4, 28)), "build it with flatten=False"),
        (lambda: RelationNet(_NoShape()), "pass feature_shape=(C, H, W)"),
        (lambda: RelationNet(Conv4(1, 4, 16, pool_blocks=4, flatten=False)),
         "feature maps of side 1 are too small"),
        (lambda: RelationNet(Conv4(1, 4, 28, pool_blocks=2, flatten=False), aggregation="max"), "aggregation='max'"),
    ],
)
def test_relation_net_refuses_mismatched_features_at_construction(make, named):
    with pytest.raises(MetaConfigError, match=re.escape(named)):
        make()


def test_relation_net_refuses_mismatched_features_at_first_batch():
    wrong = RelationNet(_NoShape(), feature_shape=(4, 8, 8))
    with pytest.raises(MetaConfigError, match=re.escape("feature maps of shape (4, 16, 16) per image but the relation "
                                                        "module expects feature_shape=(4, 8, 8); set feature_shape to "
                                                        "[4, 16, 16]")):
        wrong.meta_loss(collate_episodes([image_episode(size=16)]))
    # an encoder built for 28x28 images fed 32x32 images
    model = RelationNet(Conv4(1, 4, 28, pool_blocks=2, flatten=False))
    with pytest.raises(MetaConfigError, match=re.escape("(4, 8, 8) per image")):
        model.evaluate(collate_episodes([image_episode(size=32)]))


def test_relation_module_size():
    module = RelationModule(128, feature_size=5)
    assert module(torch.randn(4, 128, 5, 5)).shape == (4,)
    assert module.fc[0].in_features == 64  # 5 -> 2 -> 1 after two poolings


# ------------------------------------------------------------------------------- Lightning training step


@pytest.mark.parametrize(
    "make",
    [
        lambda pt: MatchingNet(Conv4(1, 4, 16, norm="none"), fce=True, ways=3, lr=0.01, per_task_backward=pt),
        lambda pt: RelationNet(Conv4(1, 4, 16, pool_blocks=2, flatten=False), relation_channels=4, ways=3, lr=0.01,
                               per_task_backward=pt),
    ],
    ids=["matchingnet_fce", "relationnet"],
)
def test_per_task_backward_takes_the_same_optimizer_step(make):
    from torch.utils.data import DataLoader

    batch = collate_episodes([image_episode(seed=s) for s in range(3)])
    before, after = [], []
    for per_task in (False, True):
        torch.manual_seed(0)
        model = make(per_task)
        # plain SGD: Adam's first step is about lr * sign(g), which turns round-off in the zero
        # gradients of conv biases followed by BatchNorm into visible differences
        model.configure_optimizers = lambda m=model: torch.optim.SGD(m.parameters(), lr=0.5)
        before.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, accelerator="cpu")
        trainer.fit(model, train_dataloaders=DataLoader([batch], batch_size=None, collate_fn=lambda b: b))
        after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(before[0], before[1])
    assert (after[0] - before[0]).abs().max() > 1e-3  # the step moved the weights
    torch.testing.assert_close(after[1], after[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------- short training on glyphs


@pytest.fixture(scope="module")
def glyph_shards(tmp_path_factory):
    from lightning_meta.data.glyphs import generate_glyphs

    out = tmp_path_factory.mktemp("metric_glyphs") / "glyphs"
    return generate_glyphs(out, seed=3, alphabets=6, chars_per_alphabet=(6, 8), drawings=10, size=28, splits=(4, 1, 1))


MODELS = {
    "protonet_learned_temperature": lambda: ProtoNet(Conv4(1, 32, 28), distance="cosine", temperature=0.1,
                                                     learn_temperature=True),
    "matchingnet": lambda: MatchingNet(Conv4(1, 32, 28)),
    "matchingnet_fce": lambda: MatchingNet(Conv4(1, 32, 28), fce=True, fce_steps=2),
    "relationnet": lambda: RelationNet(Conv4(1, 32, 28, pool_blocks=2, flatten=False), relation_channels=32),
    "metaoptnet": lambda: MetaOptNet(Conv4(1, 32, 28), ridge_lambda=1.0, scale=10.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_learns_well_above_chance_on_glyphs(name, glyph_shards, tmp_path, monkeypatch):
    from lightning_meta.datamodules import ShardDataModule

    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path))
    L.seed_everything(0)
    model = MODELS[name]()
    # train 5-way 2-shot, test 5-way 1-shot on held-out alphabets (shot mismatch on purpose)
    dm = ShardDataModule(shards=str(glyph_shards), ways=5, shots=2, queries=4, eval_ways=5, eval_shots=1,
                         eval_queries=5, meta_batch_size=2, eval_meta_batch_size=10, train_episodes=80,
                         val_episodes=10, test_episodes=40)
    trainer = L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu", default_root_dir=tmp_path)
    trainer.fit(model, dm)
    acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    print(f"{name}: 5-way 1-shot test accuracy {acc:.3f} after 40 steps")  # shown with pytest -s
    assert acc > 0.5, f"{name}: test accuracy {acc:.3f} after 40 steps (chance 0.2)"


# ------------------------------------------------------- bf16 (review fix, fourth session)
def test_squared_distance_stays_exact_under_bf16_autocast():
    """The expanded |q|^2 + |p|^2 - 2 q.p with a bf16 cross term was off by up to ~8 on large embeddings."""
    from lightning_meta.functional.metric import pairwise_distance

    g = torch.Generator().manual_seed(0)
    q = 5.0 + torch.rand(40, 640, generator=g)  # post-ReLU-like, |q|^2 ~ 2e4
    p = 5.0 + torch.rand(5, 640, generator=g)
    exact = torch.cdist(q.double(), p.double()) ** 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = pairwise_distance(q, p)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=0.5)
    # bf16 inputs (DeepSpeed bf16 / bf16-true): computed from the bf16 values, in float32
    qb, pb = q.bfloat16(), p.bfloat16()
    got = pairwise_distance(qb, pb)
    want = torch.cdist(qb.double(), pb.double()) ** 2
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=0.5)


def test_ridge_head_accepts_bf16_embeddings():
    """torch.linalg.solve has no bf16 kernel: MetaOptNet under bf16-true used to crash."""
    from lightning_meta.functional.ridge import ridge_logits, ridge_regression

    g = torch.Generator().manual_seed(1)
    x, qx = torch.randn(10, 32, generator=g).bfloat16(), torch.randn(6, 32, generator=g).bfloat16()
    y = torch.nn.functional.one_hot(torch.arange(10) % 5, 5).bfloat16()
    ref = ridge_logits(qx.double(), x.double(), y.double(), lam=1.0)
    got = ridge_logits(qx, x, y, lam=1.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    w = ridge_regression(x, y, lam=1.0)
    torch.testing.assert_close(w.double(), ridge_regression(x.double(), y.double(), lam=1.0), rtol=1e-4, atol=1e-5)
