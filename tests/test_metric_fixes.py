"""Review fixes: MetaOptNet.predict under bf16, cosine similarities in float32, hook overrides of the
batched learners, and predict_step returning what evaluate scores (BatchNorm batch statistics)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lightning_meta import Episode, collate_episodes
from lightning_meta.algorithms import MAML, MatchingNet, MetaOptNet, ProtoNet, RelationNet
from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.algorithms.mann import MANN
from lightning_meta.algorithms.matching import matching_attention, matching_log_probs
from lightning_meta.algorithms.snail import SNAIL
from lightning_meta.algorithms.transformer import TransformerICL
from lightning_meta.backbones import MLP, Conv4
from lightning_meta.functional.metric import pairwise_distance


def _vector_episode(ways: int = 3, shots: int = 2, queries: int = 4, dim: int = 6, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(ways, dim, generator=g) * 2
    sy = torch.arange(ways).repeat_interleave(shots)
    qy = torch.arange(ways).repeat_interleave(queries)
    return Episode(centers[sy] + torch.randn(len(sy), dim, generator=g), sy,
                   centers[qy] + torch.randn(len(qy), dim, generator=g), qy, torch.arange(ways))


def _image_episode(ways: int = 3, shots: int = 2, queries: int = 6, size: int = 16, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.rand(ways * shots, 1, size, size, generator=g), torch.arange(ways).repeat_interleave(shots),
                   torch.rand(ways * queries, 1, size, size, generator=g), torch.arange(ways).repeat(queries),
                   torch.arange(ways))


def _quiet_trainer(**kw) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, **kw)


# ------------------------------------------------------------ 1. MetaOptNet.predict under bf16
def test_metaoptnet_predict_runs_in_float32_for_a_bf16_module():
    """adapt returns float32 ridge weights; predict multiplied bf16 embeddings by them and crashed."""
    torch.manual_seed(0)
    model = MetaOptNet(MLP(6, [8]), ridge_lambda=1.0, ways=3).to(torch.bfloat16).eval()
    ep = _vector_episode().to(torch.bfloat16)
    with torch.no_grad():
        weights = model.adapt(ep)
        assert weights.dtype == torch.float32
        out = model.predict(weights, ep.query_x)
        batched = model._batched_logits(collate_episodes([ep]))[0]
    assert out.dtype == torch.float32 and batched.dtype == torch.float32
    # the same float32 product as the batched path (dual vs primal form: rounding only)
    torch.testing.assert_close(out, batched, rtol=1e-4, atol=1e-4)


class _HookedMetaOptNet(MetaOptNet):
    def predict(self, state, x):  # an override: fit/validate/test/predict go through the hooks
        return super().predict(state, x)


def test_metaoptnet_trainer_predict_bf16_true_through_the_hooks():
    torch.manual_seed(0)
    model = _HookedMetaOptNet(MLP(6, [8]), ridge_lambda=1.0, ways=3)
    data = DataLoader([_vector_episode(seed=s) for s in range(2)], batch_size=2, collate_fn=collate_episodes)
    out = _quiet_trainer(precision="bf16-true").predict(model, data)
    assert out[0]["labels"].shape == (2, 12)


# ---------------------------------------------------- 2. cosine similarities in float32
def _post_relu_embeddings(n: int, d: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)  # strongly positive features: all cosines close to 1
    return torch.relu(torch.randn(d, generator=g).abs() + 1.0 + 0.8 * torch.randn(n, d, generator=g))


def test_cosine_distance_is_float32_under_bf16_autocast():
    q, p = _post_relu_embeddings(30), _post_relu_embeddings(5, seed=1)
    ref = pairwise_distance(q, p, "cosine")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = pairwise_distance(q, p, "cosine")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, ref, rtol=0, atol=1e-6)
    # bf16 inputs (bf16-true): computed from the bf16 values, in float32
    bq, bp = q.bfloat16(), p.bfloat16()
    out = pairwise_distance(bq, bp, "cosine")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pairwise_distance(bq.float(), bp.float(), "cosine"), rtol=0, atol=1e-6)


def test_matching_similarities_are_float32_under_bf16_autocast():
    q, s = _post_relu_embeddings(30), _post_relu_embeddings(10, seed=1)
    sy = torch.arange(5).repeat_interleave(2)
    ref_a, ref_lp = matching_attention(q, s, 0.1), matching_log_probs(q, s, sy, 5, 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, lp = matching_attention(q, s, 0.1), matching_log_probs(q, s, sy, 5, 0.1)
    assert a.dtype == torch.float32 and lp.dtype == torch.float32
    torch.testing.assert_close(a, ref_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(lp, ref_lp, rtol=0, atol=1e-5)
    lp16 = matching_log_probs(q.bfloat16(), s.bfloat16(), sy, 5, 0.1)
    assert lp16.dtype == torch.float32
    torch.testing.assert_close(lp16, matching_log_probs(q.bfloat16().float(), s.bfloat16().float(), sy, 5, 0.1),
                               rtol=0, atol=1e-5)


# -------------------------------------------- 3. overridden hooks are used by fit/validate/test
def _build(name: str, norm: str = "batch", **kw) -> MetaLearner:
    torch.manual_seed(0)
    if name == "protonet":
        return kw.pop("cls", ProtoNet)(Conv4(1, 4, 16, norm=norm), ways=3, **kw)
    if name == "matching":
        return kw.pop("cls", MatchingNet)(Conv4(1, 4, 16, norm=norm), ways=3, **kw)
    if name == "relation":
        return kw.pop("cls", RelationNet)(Conv4(1, 4, 16, norm=norm, pool_blocks=2, flatten=False), ways=3,
                                          relation_channels=4, relation_hidden=4, **kw)
    if name == "metaoptnet":
        return kw.pop("cls", MetaOptNet)(Conv4(1, 4, 16, norm=norm), ridge_lambda=1.0, ways=3, **kw)
    if name == "snail":
        return kw.pop("cls", SNAIL)(Conv4(1, 4, 16, norm=norm), ways=3, max_len=7, tc_filters=8,
                                    attention=[(8, 8), (8, 8)], **kw)
    if name == "transformer":
        return kw.pop("cls", TransformerICL)(Conv4(1, 4, 16, norm=norm), ways=3, max_len=7, d_model=16,
                                             num_heads=2, num_layers=2, dim_feedforward=32, **kw)
    if name == "mann":
        return kw.pop("cls", MANN)(Conv4(1, 4, 16, norm=norm), ways=3, max_len=7, hidden_size=16, memory_slots=8,
                                   memory_width=8, read_heads=2, **kw)
    raise AssertionError(name)


_BASES = {"matching": MatchingNet, "relation": RelationNet, "metaoptnet": MetaOptNet, "snail": SNAIL}


@pytest.mark.parametrize("name", list(_BASES))
def test_overridden_predict_is_used_by_meta_loss_evaluate_and_predict_step(name):
    base = _BASES[name]

    class Flipped(base):
        def predict(self, state, x):  # a user head: reverses the ranking
            return -super().predict(state, x)

    model = _build(name, cls=Flipped)
    assert model._overrides_hooks_of(base)
    batch = collate_episodes([_image_episode(seed=s) for s in range(2)])
    loss = model.meta_loss(batch)
    torch.testing.assert_close(loss, MetaLearner.meta_loss(model, batch), rtol=0, atol=1e-6)
    model.eval()
    with torch.no_grad():
        generic = torch.stack([model.predict(model.adapt(ep), ep.query_x) for ep in batch.tasks()])
    acc = model.evaluate(batch)["acc"]
    torch.testing.assert_close(acc, (generic.argmax(-1) == batch.query_y).float().mean(1))
    assert torch.equal(model.predict_step(batch, 0)["labels"], generic.argmax(-1))


@pytest.mark.parametrize("name", list(_BASES))
def test_batched_path_still_used_without_overrides(name):
    model = _build(name)
    assert not model._overrides_hooks_of(_BASES[name])
    batch = collate_episodes([_image_episode()])
    assert model._batched_query_outputs(batch) is not None


# ------------------------------------------------- 4. predict_step returns what evaluate scores
LEARNERS = ["protonet", "matching", "relation", "metaoptnet", "snail", "transformer", "mann"]


@pytest.mark.parametrize("name", LEARNERS)
def test_predict_step_matches_evaluate_with_batch_statistics(name):
    """With norm='batch_no_stats' (batch statistics in eval mode too) the batched path normalises support and
    queries together; predict_step used separate passes and disagreed with what test scored."""
    model = _build(name, norm="batch_no_stats").eval()
    if name == "mann":  # at initialisation MANN's head bias outweighs the inputs: every query gets one class
        with torch.no_grad():
            model.head.bias.zero_()
    # queries brighter than the support: normalising them with or without the support differs a lot
    eps = [_image_episode(seed=s) for s in range(3)]
    batch = collate_episodes([Episode(e.support_x, e.support_y, 3.0 * e.query_x + 1.0, e.query_y, e.classes)
                              for e in eps])
    with torch.no_grad():
        batched = model._batched_query_outputs(batch)
        generic = torch.stack([model.predict(model.adapt(ep), ep.query_x) for ep in batch.tasks()])
    assert batched is not None
    assert not torch.equal(batched.argmax(-1), generic.argmax(-1))  # the two paths really differ here
    labels = model.predict_step(batch, 0)["labels"]
    assert torch.equal(labels, batched.argmax(-1))
    torch.testing.assert_close(model.evaluate(batch)["acc"], (labels == batch.query_y).float().mean(1))


@pytest.mark.parametrize("name", ["snail", "transformer", "mann"])
def test_predict_step_regression_values_match_the_batched_path(name):
    torch.manual_seed(0)
    kw = {"tc_filters": 8, "attention": [(8, 8)]} if name == "snail" else (
        {"d_model": 16, "num_heads": 2, "num_layers": 1, "dim_feedforward": 16} if name == "transformer"
        else {"hidden_size": 8, "memory_slots": 4, "memory_width": 4, "read_heads": 1})
    cls = {"snail": SNAIL, "transformer": TransformerICL, "mann": MANN}[name]
    backbone = MLP(1, [8])
    backbone.net.append(torch.nn.BatchNorm1d(8, track_running_stats=False))  # batch statistics in eval mode
    model = cls(backbone, task="regression", ways=0, max_len=6, **kw).eval()
    g = torch.Generator().manual_seed(0)
    eps = [Episode(torch.randn(5, 1, generator=g), torch.randn(5, 1, generator=g), torch.randn(7, 1, generator=g),
                   torch.randn(7, 1, generator=g), torch.zeros(0, dtype=torch.long)) for _ in range(2)]
    batch = collate_episodes(eps)
    with torch.no_grad():
        batched = model.batched_outputs(batch)
    values = model.predict_step(batch, 0)["values"]
    torch.testing.assert_close(values, batched)
    torch.testing.assert_close(model.evaluate(batch)["mse"], F.mse_loss(values, batch.query_y, reduction="none")
                               .mean((1, 2)))


def test_maml_predict_step_keeps_the_per_task_path():
    torch.manual_seed(0)
    model = MAML(MLP(6, [8]), ways=3, inner_lr=0.3, inner_steps=1)
    batch = collate_episodes([_vector_episode(seed=s) for s in range(2)])
    assert model._batched_query_outputs(batch) is None
    with torch.enable_grad():
        generic = torch.stack([model.predict(model.adapt(ep), ep.query_x).detach() for ep in batch.tasks()])
    assert torch.equal(model.predict_step(batch, 0)["labels"], generic.argmax(-1))


def test_trainer_predict_returns_what_trainer_test_scored():
    torch.manual_seed(0)
    model = ProtoNet(Conv4(1, 4, 16, norm="batch_no_stats"), ways=3)
    eps = [_image_episode(seed=s) for s in range(4)]
    eps = [Episode(e.support_x, e.support_y, 3.0 * e.query_x + 1.0, e.query_y, e.classes) for e in eps]
    data = DataLoader(eps, batch_size=2, collate_fn=collate_episodes)
    trainer = _quiet_trainer()
    acc = trainer.test(model, data, verbose=False)[0]["test/acc"]
    labels = torch.cat([out["labels"] for out in trainer.predict(model, data)])
    queries = torch.stack([e.query_y for e in eps])
    assert acc == pytest.approx((labels == queries).float().mean().item(), abs=1e-6)


def test_episode_gallery_marks_the_predictions_validation_scored():
    """The gallery's right/wrong marks come from the same batched path as validation (batch-statistics BatchNorm)."""
    from lightning_meta.callbacks import EpisodeGallery

    model = _build("protonet", norm="batch_no_stats").eval()
    e = _image_episode()
    ep = Episode(e.support_x, e.support_y, 3.0 * e.query_x + 1.0, e.query_y, e.classes)
    with torch.no_grad():
        shown = EpisodeGallery._predictions(model, ep)
        scored = model.predict_step(collate_episodes([ep]), 0)["labels"][0]
        per_task = model.predict(model.adapt(ep), ep.query_x).argmax(-1)
    assert not torch.equal(per_task, scored)  # the two paths differ here
    assert torch.equal(shown, scored)
