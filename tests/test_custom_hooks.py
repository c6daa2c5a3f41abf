"""A subclass that overrides adapt/predict trains and evaluates through them (not the batched fast paths)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_meta import Episode, collate_episodes
from lightning_meta.algorithms import MAML, ProtoNet
from lightning_meta.backbones import MLP


def _episodes(n: int, ways: int = 3, shots: int = 2, queries: int = 4, dim: int = 6) -> list[Episode]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        centers = torch.randn(ways, dim, generator=g) * 2
        sy = torch.arange(ways).repeat_interleave(shots)
        qy = torch.arange(ways).repeat_interleave(queries)
        out.append(Episode(centers[sy] + torch.randn(len(sy), dim, generator=g), sy,
                           centers[qy] + torch.randn(len(qy), dim, generator=g), qy, torch.arange(ways)))
    return out


class CountingMAML(MAML):
    calls = 0

    def adapt(self, episode, steps=None, first_order=None):
        type(self).calls += 1
        return super().adapt(episode, steps=steps, first_order=first_order)


def test_maml_subclass_hooks_are_used_and_match_the_batched_path():
    torch.manual_seed(0)
    plain = MAML(MLP(6, [8]), ways=3, inner_lr=0.3, inner_steps=2)
    custom = CountingMAML(MLP(6, [8]), ways=3, inner_lr=0.3, inner_steps=2)
    custom.load_state_dict(plain.state_dict())
    batch = collate_episodes(_episodes(3))
    CountingMAML.calls = 0
    a, b = plain.meta_loss(batch), custom.meta_loss(batch)
    assert CountingMAML.calls == 3  # one adapt per task: the override ran
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)  # the generic path agrees with the batched one
    ga = torch.autograd.grad(a, list(plain.parameters()))
    gb = torch.autograd.grad(b, list(custom.parameters()))
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)  # second-order meta-gradient too
    CountingMAML.calls = 0
    scores = custom.evaluate(batch)["acc"]
    assert CountingMAML.calls == 3 and scores.shape == (3,)


class HotProtoNet(ProtoNet):
    def predict(self, state, x):  # doubled logits: a user temperature
        return 2.0 * super().predict(state, x)


def test_protonet_subclass_predict_changes_training():
    torch.manual_seed(0)
    model = HotProtoNet(MLP(6, [8]), ways=3)
    episodes = _episodes(2)
    loss = model.meta_loss(collate_episodes(episodes))
    expected = torch.stack([
        F.cross_entropy(2.0 * ProtoNet.predict(model, ProtoNet.adapt(model, ep), ep.query_x), ep.query_y)
        for ep in episodes
    ]).mean()
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
    undoubled = torch.stack([
        F.cross_entropy(ProtoNet.predict(model, ProtoNet.adapt(model, ep), ep.query_x), ep.query_y)
        for ep in episodes
    ]).mean()
    assert not torch.isclose(loss, undoubled)  # the override changed the objective of the same weights
