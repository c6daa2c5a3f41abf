"""Prototypical Networks: logits by hand, batched meta-loss against the per-task path, way changes."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from lightning_meta import Episode, collate_episodes
from lightning_meta.algorithms import MetaLearner, ProtoNet
from lightning_meta.backbones import MLP, Conv4
from lightning_meta.errors import MetaConfigError


def episode(ways: int, shots: int = 2, queries: int = 3, d: int = 6, seed: int = 0, dtype=torch.float32) -> Episode:
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(ways, d, generator=g, dtype=dtype)
    sy = torch.arange(ways).repeat(shots)  # interleaved labels: prototypes must not assume sorted support
    qy = torch.arange(ways).repeat_interleave(queries)
    return Episode(
        centers[sy] + torch.randn(len(sy), d, generator=g, dtype=dtype),
        sy,
        centers[qy] + torch.randn(len(qy), d, generator=g, dtype=dtype),
        qy,
        torch.randperm(50, generator=g)[:ways],
    )


def protonet(**kwargs) -> ProtoNet:
    torch.manual_seed(0)
    return ProtoNet(MLP(6, [16, 8]), **kwargs)


def test_logits_are_negative_squared_distances_to_class_means():
    model = protonet().double()
    ep = episode(ways=4, dtype=torch.float64)
    logits = model.predict(model.adapt(ep), ep.query_x)
    assert logits.shape == (12, 4)
    with torch.no_grad():
        s_emb, q_emb = model.backbone(ep.support_x), model.backbone(ep.query_x)
        expected = torch.empty(12, 4, dtype=torch.float64)
        for c in range(4):
            mean_c = s_emb[ep.support_y == c].mean(0)
            for i in range(12):
                expected[i, c] = -((q_emb[i] - mean_c) ** 2).sum()
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-10, atol=1e-10)


def test_temperature_and_cosine_distance():
    ep = episode(ways=3, dtype=torch.float64)
    base = protonet().double()
    hot = protonet(temperature=4.0).double()
    torch.testing.assert_close(hot.predict(hot.adapt(ep), ep.query_x), base.predict(base.adapt(ep), ep.query_x) / 4.0)
    cos = protonet(distance="cosine").double()
    logits = cos.predict(cos.adapt(ep), ep.query_x)
    with torch.no_grad():
        s_emb, q_emb = cos.backbone(ep.support_x), cos.backbone(ep.query_x)
        protos = torch.stack([s_emb[ep.support_y == c].mean(0) for c in range(3)])
        expected = F.cosine_similarity(q_emb[:, None, :], protos[None, :, :], dim=-1) - 1.0
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize(
    "backbone", [lambda: MLP(6, [16, 8]), lambda: Conv4(1, hidden=4, image_size=16, norm="none")], ids=["mlp", "conv4"]
)
def test_batched_meta_loss_equals_per_task_path(distance, backbone):
    torch.manual_seed(0)
    batched = ProtoNet(backbone(), distance=distance, temperature=0.5)
    per_task = ProtoNet(backbone(), distance=distance, temperature=0.5)
    per_task.load_state_dict(batched.state_dict())
    if isinstance(batched.backbone, MLP):
        batch = collate_episodes([episode(ways=3, seed=s) for s in range(4)])
    else:
        g = torch.Generator().manual_seed(1)
        batch = collate_episodes(
            [
                Episode(
                    torch.randn(6, 1, 16, 16, generator=g),
                    torch.arange(3).repeat(2),
                    torch.randn(9, 1, 16, 16, generator=g),
                    torch.arange(3).repeat(3),
                    torch.arange(3),
                )
                for _ in range(3)
            ]
        )
    loss_b = batched.meta_loss(batch)
    loss_t = MetaLearner.meta_loss(per_task, batch)  # the base class' adapt/predict loop
    torch.testing.assert_close(loss_b, loss_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched._train_scores, per_task._train_scores)
    loss_b.backward()
    loss_t.backward()
    grads = 0
    for (k, p), (_, q) in zip(batched.named_parameters(), per_task.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5, msg=k)
        grads += int(p.grad.abs().sum() > 0)
    assert grads > 0


def test_evaluate_matches_per_task_accuracy():
    model = protonet().eval()
    eps = [episode(ways=3, seed=s) for s in range(4)]
    acc = model.evaluate(collate_episodes(eps))["acc"]
    assert acc.shape == (4,)
    for a, ep in zip(acc, eps, strict=True):
        with torch.no_grad():
            logits = model.predict(model.adapt(ep), ep.query_x)
        assert a.item() == pytest.approx((logits.argmax(-1) == ep.query_y).float().mean().item())


def test_training_way_differs_from_evaluation_way():
    model = protonet(ways=20)
    wide = collate_episodes([episode(ways=20, shots=1, queries=1, seed=s) for s in range(2)])
    loss = model.meta_loss(wide)
    assert torch.isfinite(loss)
    loss.backward()
    ep20, ep5 = episode(ways=20, shots=1, queries=2), episode(ways=5, seed=3)
    assert model.predict(model.adapt(ep20), ep20.query_x).shape == (40, 20)
    logits5 = model.predict(model.adapt(ep5), ep5.query_x)
    assert logits5.shape == (15, 5)
    model.eval()
    assert model.evaluate(collate_episodes([ep5, episode(ways=5, seed=4)]))["acc"].shape == (2,)
    with torch.inference_mode():
        model.test_step(collate_episodes([ep5]), 0)
    assert model.test_metric.n.item() == 1


def test_predict_step_maps_labels_to_original_classes():
    model = protonet().eval()
    eps = [episode(ways=4, seed=s) for s in range(2)]
    with torch.inference_mode():
        out = model.predict_step(collate_episodes(eps), 0)
    assert out["labels"].shape == (2, 12)
    for i, ep in enumerate(eps):
        with torch.no_grad():
            labels = model.predict(model.adapt(ep), ep.query_x).argmax(-1)
        assert torch.equal(out["labels"][i], labels)
        assert torch.equal(out["classes"][i], ep.classes[labels])


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"temperature": 0}, "temperature=0"),
        ({"temperature": -1.5}, "temperature=-1.5"),
        ({"distance": "manhattan"}, "distance='manhattan'"),
        ({"lr": 0}, "lr=0"),
        ({"ways": 1}, "ways=1"),
    ],
)
def test_bad_configuration_raises_meta_config_error(kwargs, named):
    with pytest.raises(MetaConfigError, match=re.escape(named)):
        ProtoNet(MLP(6, [8]), **kwargs)


def test_regression_batches_are_refused():
    model = protonet()
    reg = collate_episodes(
        [
            Episode(
                torch.randn(4, 6),
                torch.randn(4, 1),
                torch.randn(4, 6),
                torch.randn(4, 1),
                torch.zeros(0, dtype=torch.long),
            )
        ]
    )
    with pytest.raises(MetaConfigError, match="regression"):
        model.training_step(reg, 0)


def test_a_fixed_temperature_set_later_survives_a_checkpoint(tmp_path):
    import lightning as L

    model = protonet(temperature=1.0)
    model.temperature = 3.0
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, max_steps=0)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = ProtoNet.load_from_checkpoint(tmp_path / "m.ckpt", backbone=MLP(6, [16, 8]))
    assert loaded.temperature == 3.0
