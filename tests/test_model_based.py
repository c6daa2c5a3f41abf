"""Model-based (black-box) learners: SNAIL, TransformerICL and MANN.

Shapes for classification and regression, the batched path against the per-task hooks, query
independence, support-order (in)variance, causality, the length/way refusals, the pure sequence
functions, and short training runs on a tiny generated glyph set and on sinusoids (slow).
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from lightning_meta import Episode, collate_episodes
from lightning_meta.algorithms._sequence import SequenceLearner, support_permutation
from lightning_meta.algorithms.mann import MANN
from lightning_meta.algorithms.snail import SNAIL
from lightning_meta.algorithms.transformer import TransformerICL
from lightning_meta.backbones import MLP, Conv4
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional.sequence import (
    causal_conv1d,
    causal_mask,
    cosine_read_weights,
    encode_labels,
    least_used,
    support_query_mask,
)

D = 6  # feature size of the vector episodes


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread buys nothing, and on a busy shared runner two spinning
    threads per process made the training runs 10-40x slower (measured: a SNAIL sinusoid step took 0.06 s on
    one thread and 2.4 s on two with a load average of 4 on 2 cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make(name: str, backbone: nn.Module, **kwargs) -> SequenceLearner:
    """A small learner of each kind (sizes chosen for fast CPU tests)."""
    torch.manual_seed(0)
    if name == "snail":
        return SNAIL(backbone, **{"tc_filters": 8, "attention": [(8, 8), (8, 8)], **kwargs})
    if name == "transformer":
        return TransformerICL(backbone, **{"d_model": 16, "num_heads": 2, "num_layers": 2, "dim_feedforward": 32,
                                           **kwargs})
    return MANN(backbone, **{"hidden_size": 16, "memory_slots": 8, "memory_width": 8, "read_heads": 2, **kwargs})


LEARNERS = ["snail", "transformer", "mann"]


def cls_episode(ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> Episode:
    """Vector classification episode, support grouped by class as the datamodules make them."""
    g = torch.Generator().manual_seed(seed)
    centers = 2.0 * torch.randn(ways, D, generator=g)
    sy = torch.arange(ways).repeat_interleave(shots)
    qy = torch.arange(ways).repeat_interleave(queries)
    return Episode(centers[sy] + torch.randn(len(sy), D, generator=g), sy,
                   centers[qy] + torch.randn(len(qy), D, generator=g), qy, torch.randperm(40, generator=g)[:ways])


def reg_episode(shots: int = 5, queries: int = 4, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    a, p = 0.1 + 4.9 * torch.rand(1, generator=g), math.pi * torch.rand(1, generator=g)
    x = 10 * torch.rand(shots + queries, 1, generator=g) - 5
    y = a * torch.sin(x - p)
    return Episode(x[:shots], y[:shots], x[shots:], y[shots:], torch.zeros(0, dtype=torch.long))


def image_episode(ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.rand(ways * shots, 1, 16, 16, generator=g), torch.arange(ways).repeat_interleave(shots),
                   torch.rand(ways * queries, 1, 16, 16, generator=g), torch.arange(ways).repeat_interleave(queries),
                   torch.arange(ways))


def out_of(model: SequenceLearner, ep: Episode) -> torch.Tensor:
    return model.predict(model.adapt(ep), ep.query_x).detach()


# ------------------------------------------------------------------------------------------ shapes
@pytest.mark.parametrize("name", LEARNERS)
def test_classification_shapes_loss_and_gradients(name):
    model = make(name, Conv4(1, 4, 16), ways=5, max_len=7)  # 5 one-hot slots, 3-way episodes
    batch = collate_episodes([image_episode(seed=s) for s in range(2)])
    assert model.predict(model.adapt(batch.task(0)), batch.query_x[0]).shape == (6, 3)
    assert model.batched_outputs(batch).shape == (2, 6, 3)
    loss = model.meta_loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert model._train_scores.shape == (2,)
    loss.backward()
    for name_, p in model.named_parameters():  # every part learns: backbone, sequence model, head
        assert p.grad is not None and torch.isfinite(p.grad).all(), name_
    assert model.backbone.encoder[0].weight.grad.abs().sum() > 0
    scores = model.evaluate(batch)
    assert set(scores) == {"acc"} and scores["acc"].shape == (2,)
    assert ((scores["acc"] >= 0) & (scores["acc"] <= 1)).all()
    pred = model.predict_step(batch, 0)
    assert pred["labels"].shape == (2, 6) and int(pred["labels"].max()) < 3


@pytest.mark.parametrize("name", LEARNERS)
def test_regression_shapes_loss_and_scores(name):
    model = make(name, MLP(1, [16]), task="regression", ways=0, max_len=6)
    assert model.label_dim == 2 and model.out_dim == 1
    batch = collate_episodes([reg_episode(seed=s) for s in range(3)])
    assert out_of(model, batch.task(0)).shape == (4, 1)
    out = model.batched_outputs(batch)
    assert out.shape == (3, 4, 1)
    loss = model.meta_loss(batch)
    loss.backward()
    torch.testing.assert_close(loss.detach(), F.mse_loss(out.detach(), batch.query_y))
    mse = model.evaluate(batch)["mse"]
    torch.testing.assert_close(mse, ((out.detach() - batch.query_y) ** 2).mean((1, 2)))


@pytest.mark.parametrize("task", ["classification", "regression"])
@pytest.mark.parametrize("name", LEARNERS)
def test_batched_path_equals_per_task_hooks(name, task):
    """The meta-batch path (all tasks through the sequence model at once) equals adapt/predict per task."""
    if task == "classification":
        model = make(name, MLP(D, [12]), ways=4, max_len=7)
        episodes = [cls_episode(seed=s) for s in range(3)]
    else:
        model = make(name, MLP(1, [12]), task="regression", ways=0, max_len=6)
        episodes = [reg_episode(seed=s) for s in range(3)]
    batched = model.batched_outputs(collate_episodes(episodes)).detach()
    for i, ep in enumerate(episodes):
        torch.testing.assert_close(batched[i], out_of(model, ep), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", LEARNERS)
def test_query_prediction_depends_on_that_query_only(name):
    model = make(name, MLP(D, [12]), ways=3, max_len=7)
    ep = cls_episode(queries=3)
    base = out_of(model, ep)
    moved = Episode(ep.support_x, ep.support_y, ep.query_x.clone(), ep.query_y, ep.classes)
    moved.query_x[0] += 5.0
    out = out_of(model, moved)
    assert not torch.allclose(out[0], base[0], atol=1e-4)  # the perturbed query's own output changes
    torch.testing.assert_close(out[1:], base[1:], rtol=0, atol=1e-6)
    alone = model.predict(model.adapt(ep), ep.query_x[4:5]).detach()  # fewer queries: same prediction
    torch.testing.assert_close(alone[0], base[4], rtol=1e-5, atol=1e-6)
    other = Episode(ep.support_x + 1.0, ep.support_y, ep.query_x, ep.query_y, ep.classes)
    assert not torch.allclose(out_of(model, other), base, atol=1e-4)  # and the support set matters


# ------------------------------------------------------------------------------------ support order
def permuted(ep: Episode, seed: int = 1) -> Episode:
    perm = torch.randperm(len(ep.support_y), generator=torch.Generator().manual_seed(seed))
    assert not torch.equal(perm, torch.arange(len(perm)))
    return Episode(ep.support_x[perm], ep.support_y[perm], ep.query_x, ep.query_y, ep.classes)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_transformer_is_invariant_to_the_support_order(task):
    if task == "classification":
        model, ep = make("transformer", MLP(D, [12]), ways=3, max_len=7), cls_episode()
    else:
        model, ep = make("transformer", MLP(1, [12]), task="regression", ways=0, max_len=6), reg_episode()
    torch.testing.assert_close(out_of(model, permuted(ep)), out_of(model, ep), rtol=0, atol=1e-5)
    doc = " ".join(TransformerICL.__doc__.split())
    assert "invariant to the order of the support examples" in doc


def test_transformer_with_batchnorm_backbone_is_invariant_to_the_support_order():
    model = make("transformer", Conv4(1, 4, 16), ways=3, max_len=7)
    ep = image_episode()
    p = permuted(ep)
    a = model.batched_outputs(collate_episodes([ep])).detach()
    b = model.batched_outputs(collate_episodes([p])).detach()
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_transformer_eval_fast_path_matches_training_mode():
    """PyTorch's fused inference path of nn.TransformerEncoder must honour the same attention mask."""
    model = make("transformer", MLP(D, [12]), ways=3, max_len=7)
    batch = collate_episodes([cls_episode(seed=s) for s in range(2)])
    train_out = model.batched_outputs(batch).detach()
    model.eval()
    with torch.inference_mode():
        eval_out = model.batched_outputs(batch)
    torch.testing.assert_close(eval_out, train_out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["snail", "mann"])
def test_order_dependence_is_documented_and_real(name):
    cls = {"snail": SNAIL, "mann": MANN}[name]
    assert "read the support sequence in" in " ".join(cls.__doc__.split())
    model = make(name, MLP(D, [12]), ways=3, max_len=7, support_order="given")
    ep = cls_episode()
    diff = (out_of(model, permuted(ep)) - out_of(model, ep)).abs().max()
    assert diff > 1e-4, "a permutation of the support set should change an order-dependent learner's outputs"


@pytest.mark.parametrize("name", ["snail", "mann"])
def test_shuffled_support_order_ignores_the_given_order_and_hides_labels_from_positions(name):
    model = make(name, MLP(D, [12]), ways=5, max_len=7)
    assert model.support_order == "shuffled"  # the default of the order-dependent learners
    ep = cls_episode(ways=5, shots=1)
    # 1-shot: any given order is read the same way
    torch.testing.assert_close(out_of(model, permuted(ep)), out_of(model, ep), rtol=0, atol=1e-6)
    # ... and differs between episodes of other classes
    tuples = [torch.randperm(40, generator=torch.Generator().manual_seed(s))[:5] for s in range(20)]
    orders = {tuple(support_permutation(ep.support_y, c).tolist()) for c in tuples}
    assert len(orders) >= 15  # 20 class tuples, 120 possible orders
    counts = torch.zeros(5, 5)  # over many class tuples every position holds every label
    for s in range(500):
        classes = torch.randperm(1000, generator=torch.Generator().manual_seed(s))[:5]
        counts[torch.arange(5), ep.support_y[support_permutation(ep.support_y, classes)]] += 1
    assert counts.min() > 60 and counts.max() < 140  # 100 expected per cell
    # the batched path (fit/validate/test) reads the same order as adapt + predict
    batch = collate_episodes([ep, cls_episode(ways=5, shots=1, seed=3)])
    model.eval()
    torch.testing.assert_close(model.batched_outputs(batch)[0].detach(), out_of(model, ep), rtol=0, atol=1e-5)
    # several shots: the order within a class still follows the given order, the rest does not matter
    ep2 = cls_episode(ways=3, shots=2)
    swap = torch.tensor([4, 5, 0, 1, 2, 3])  # classes moved, order inside each class kept
    moved = Episode(ep2.support_x[swap], ep2.support_y[swap], ep2.query_x, ep2.query_y, ep2.classes)
    torch.testing.assert_close(out_of(model, moved), out_of(model, ep2), rtol=0, atol=1e-6)


def test_support_order_is_validated_and_regression_keeps_the_given_order():
    with pytest.raises(MetaConfigError, match="support_order='random'"):
        make("snail", MLP(D, [12]), ways=3, max_len=7, support_order="random")
    model = make("snail", MLP(1, [12]), task="regression", ways=0, max_len=6)
    assert model._support_orders(torch.zeros(1, 5, 1), torch.zeros(1, 0, dtype=torch.long)) is None


# ----------------------------------------------------------------------------------------- causality
@pytest.mark.parametrize("t", [1, 4])
def test_snail_network_is_causal(t):
    model = make("snail", MLP(D, [12]), ways=3, max_len=7)
    seq = torch.randn(2, 7, model.embed_dim + model.label_dim)
    out = model.net(seq).detach()
    later = seq.clone()
    later[:, t] += 3.0
    out2 = model.net(later).detach()
    torch.testing.assert_close(out2[:, :t], out[:, :t], rtol=0, atol=1e-6)  # the past never sees the future
    assert not torch.allclose(out2[:, t], out[:, t], atol=1e-4)
    first = seq.clone()
    first[:, 0] += 3.0
    assert not torch.allclose(model.net(first).detach()[:, -1], out[:, -1], atol=1e-4)  # the last step sees all


def test_snail_temporal_convolutions_reach_the_whole_sequence():
    """Without attention reads, the dilated TC block alone must connect step 0 to step max_len - 1."""
    model = make("snail", MLP(D, [12]), ways=3, max_len=9)
    for block in model.net.blocks:
        if hasattr(block, "value"):  # an attention block: make its read zero
            nn.init.zeros_(block.value.weight)
            nn.init.zeros_(block.value.bias)
    seq = torch.randn(1, 9, model.embed_dim + model.label_dim, requires_grad=True)
    model.net(seq)[0, -1].sum().backward()
    assert seq.grad[0, 0].abs().sum() > 0
    assert torch.all(torch.isfinite(seq.grad))


def test_mann_steps_are_causal():
    model = make("mann", MLP(D, [12]), ways=3, max_len=7)
    x, labels = torch.randn(2, 6, model.embed_dim), encode_labels(torch.randint(0, 3, (2, 6)), 3)
    out, _ = model.run(x, labels)
    x2 = x.clone()
    x2[:, 3] += 3.0
    out2, _ = model.run(x2, labels)
    torch.testing.assert_close(out2[:, :3].detach(), out[:, :3].detach(), rtol=0, atol=0)
    assert not torch.allclose(out2[:, 3], out[:, 3], atol=1e-4)
    assert not torch.allclose(out2[:, 5], out[:, 5], atol=1e-4)  # later steps remember step 3


def test_transformer_queries_do_not_see_each_other_and_support_does_not_see_queries():
    model = make("transformer", MLP(D, [12]), ways=3, max_len=7)
    s, q = torch.randn(1, 5, 12), torch.randn(1, 3, 12)
    labels = encode_labels(torch.tensor([[0, 1, 2, 0, 1]]), 3)
    tokens = model.tokens(s, labels, q)
    blocked = ~support_query_mask(5, 3)
    h = model.encoder(tokens, mask=blocked).detach()
    q2 = q.clone()
    q2[0, 1] += 3.0
    h2 = model.encoder(model.tokens(s, labels, q2), mask=blocked).detach()
    torch.testing.assert_close(h2[:, :5], h[:, :5], rtol=0, atol=1e-6)  # support tokens ignore queries
    torch.testing.assert_close(h2[:, [5, 7]], h[:, [5, 7]], rtol=0, atol=1e-6)  # other queries unchanged
    assert not torch.allclose(h2[:, 6], h[:, 6], atol=1e-4)


@pytest.mark.parametrize("offset", [True, False])
def test_mann_label_offset(offset, monkeypatch):
    model = make("mann", MLP(D, [12]), ways=3, max_len=7, label_offset=offset, support_order="given")
    seen = {}
    original = model.run

    def spy(x, labels, state=None):
        seen["labels"] = labels
        return original(x, labels, state)

    monkeypatch.setattr(model, "run", spy)
    ep = cls_episode(ways=3, shots=1)
    base = out_of(model, ep)
    enc = encode_labels(ep.support_y, 3)
    if offset:  # label t arrives with input t+1; the first step gets zeros
        torch.testing.assert_close(seen["labels"][0], torch.cat([torch.zeros(1, 3), enc[:-1]]))
    else:
        torch.testing.assert_close(seen["labels"][0], enc)
    first_labels = seen["labels"]
    relabelled = Episode(ep.support_x, torch.tensor([0, 1, 0]), ep.query_x, ep.query_y, ep.classes)  # last label only
    assert not torch.allclose(out_of(model, relabelled), base, atol=1e-5)  # the last label is read ...
    # ... with the offset only at the query step (the support run is unchanged), without it at the last support step
    assert torch.equal(seen["labels"], first_labels) == offset


# --------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", LEARNERS)
def test_too_long_episode_is_refused_at_the_first_batch(name):
    model = make(name, MLP(D, [12]), ways=3, max_len=4)
    batch = collate_episodes([cls_episode(ways=3, shots=2)])  # 6 support examples: length 7 > 4
    with pytest.raises(MetaConfigError, match=r"max_len=4 .*6 support examples.*at least 7"):
        model.training_step(batch, 0)
    with pytest.raises(MetaConfigError, match="max_len 7"):
        model.adapt(batch.task(0))
    model.training_step(collate_episodes([cls_episode(ways=3, shots=1)]), 0)  # length 4 is accepted


def test_too_long_episode_is_refused_by_the_trainer_before_training(tmp_path):
    model = make("transformer", MLP(1, [12]), task="regression", ways=0, max_len=5)
    loader = DataLoader([reg_episode(shots=5)], batch_size=1, collate_fn=collate_episodes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(MetaConfigError, match="max_len=5"):
        trainer.fit(model, train_dataloaders=loader)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", LEARNERS)
def test_per_task_backward_gives_the_joint_gradient(name, tmp_path):
    model = make(name, MLP(D, [12]), ways=3, max_len=7)
    batch = collate_episodes([cls_episode(seed=s) for s in range(3)])
    model.meta_loss(batch).backward()
    joint = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for i in range(3):
        (model.meta_loss(batch.select(i)) / 3).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, joint[n], rtol=1e-5, atol=1e-6, msg=n)
    if name == "transformer":  # the manual-optimisation path runs under a Trainer
        model = make(name, MLP(D, [12]), ways=3, max_len=7, per_task_backward=True)
        assert model.hparams["per_task_backward"] and not model.automatic_optimization
        before = {k: v.clone() for k, v in model.state_dict().items()}
        loader = DataLoader([cls_episode(seed=s) for s in range(4)], batch_size=2, collate_fn=collate_episodes)
        L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, default_root_dir=tmp_path).fit(model, train_dataloaders=loader)
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", LEARNERS)
def test_more_classes_than_label_slots_is_refused(name):
    model = make(name, MLP(D, [12]), ways=3, max_len=10)
    with pytest.raises(MetaConfigError, match=r"ways=3 .*4-way.*at least 4"):
        model.training_step(collate_episodes([cls_episode(ways=4, shots=1)]), 0)


def test_constructor_refusals_and_hyperparameters():
    with pytest.raises(MetaConfigError, match="max_len=1"):
        make("snail", MLP(D, [12]), max_len=1)
    with pytest.raises(MetaConfigError, match="attention="):
        make("snail", MLP(D, [12]), attention=[])
    with pytest.raises(MetaConfigError, match="tc_filters=0"):
        make("snail", MLP(D, [12]), tc_filters=0)
    with pytest.raises(MetaConfigError, match="d_model=30 .*num_heads=4"):
        make("transformer", MLP(D, [12]), d_model=30, num_heads=4)
    with pytest.raises(MetaConfigError, match="dropout=1.0"):
        make("transformer", MLP(D, [12]), dropout=1.0)
    with pytest.raises(MetaConfigError, match="memory_slots=2 .*read_heads=4"):
        make("mann", MLP(D, [12]), memory_slots=2, read_heads=4)
    with pytest.raises(MetaConfigError, match="usage_decay=1.5"):
        make("mann", MLP(D, [12]), usage_decay=1.5)
    with pytest.raises(MetaConfigError, match="out_features"):
        make("mann", nn.Flatten())
    for name in LEARNERS:
        model = make(name, MLP(D, [12]), ways=7, max_len=9)
        assert model.hparams["max_len"] == 9 and model.hparams["ways"] == 7 and "backbone" not in model.hparams


# ------------------------------------------------------------------------------ pure sequence functions
def test_label_encodings_and_masks():
    assert torch.equal(encode_labels(torch.tensor([1, 0]), 3), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    assert torch.equal(encode_labels(torch.tensor([[0.0], [-2.0]]), 0), torch.tensor([[0.0, 1.0], [-2.0, 1.0]]))
    with pytest.raises(ValueError, match="integers"):
        encode_labels(torch.tensor([1.0]), 3)
    m = causal_mask(4)
    assert m.dtype == torch.bool and torch.equal(m, torch.ones(4, 4, dtype=torch.bool).tril())
    sq = support_query_mask(3, 2)
    assert sq[:3, :3].all() and not sq[:3, 3:].any()  # support sees support only
    assert sq[3:, :3].all() and sq[3, 3] and sq[4, 4] and not sq[3, 4] and not sq[4, 3]


@pytest.mark.parametrize("dilation", [1, 2, 4])
def test_causal_conv1d_matches_a_direct_sum(dilation):
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 3, 9, generator=g), torch.randn(4, 3, 2, generator=g), torch.randn(4, generator=g)
    out = causal_conv1d(x, w, b, dilation)
    assert out.shape == (2, 4, 9)
    expected = torch.empty(2, 4, 9)
    for t in range(9):
        past = x[:, :, t - dilation] if t - dilation >= 0 else torch.zeros(2, 3)
        expected[:, :, t] = past @ w[:, :, 0].T + x[:, :, t] @ w[:, :, 1].T + b
    torch.testing.assert_close(out, expected)


def test_memory_addressing():
    g = torch.Generator().manual_seed(0)
    keys, memory = torch.randn(2, 3, 5, generator=g), torch.randn(2, 7, 5, generator=g)
    w = cosine_read_weights(keys, memory, sharpness=4.0)
    expected = torch.softmax(4.0 * F.cosine_similarity(keys[:, :, None], memory[:, None], dim=-1), dim=-1)
    torch.testing.assert_close(w, expected)
    usage = torch.tensor([[0.5, 0.1, 0.1, 0.9], [0.0, 0.0, 0.0, 0.0]])
    lu = least_used(usage, 2)
    assert lu.shape == (2, 2, 4)
    assert torch.equal(lu.argmax(-1), torch.tensor([[1, 2], [0, 1]]))  # ties go to the lower index


# ------------------------------------------------------------------------------------- training runs
TRAIN_KW = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                limit_val_batches=0, num_sanity_val_steps=0)


@pytest.fixture(scope="module")
def glyph_shards(tmp_path_factory):
    from lightning_meta.data.glyphs import generate_glyphs

    root = tmp_path_factory.mktemp("model_based_glyphs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LIGHTNING_META_CACHE", str(root))
        out = generate_glyphs(root / "glyphs", seed=0, alphabets=6, chars_per_alphabet=(6, 8), drawings=10, size=28,
                              splits=(4, 1, 1))
        yield out


GLYPH_MODELS = {
    "snail": lambda: SNAIL(Conv4(1, 16, 28), ways=5, max_len=6, tc_filters=32, attention=[(32, 16), (64, 32)],
                           lr=3e-3),
    "transformer": lambda: TransformerICL(Conv4(1, 16, 28), ways=5, max_len=6, d_model=64, num_heads=4,
                                          num_layers=2, dim_feedforward=128, lr=3e-3),
    # support read in shuffled order (the default), so labels must be bound in memory; the paper's label offset
    # stays at chance for 200 steps there (53% vs 19% in one check), so the learning test uses the SNAIL scheme
    "mann": lambda: MANN(Conv4(1, 16, 28), ways=5, max_len=6, hidden_size=64, memory_slots=16, memory_width=32,
                         read_heads=1, label_offset=False, lr=3e-3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", LEARNERS)
def test_learns_5way_1shot_glyphs(name, glyph_shards, monkeypatch, tmp_path):
    from lightning_meta.datamodules import ShardDataModule

    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path))
    steps = 200
    L.seed_everything(0, verbose=False)
    dm = ShardDataModule(shards=str(glyph_shards), ways=5, shots=1, queries=5, eval_queries=5, meta_batch_size=4,
                         eval_meta_batch_size=25, train_episodes=4 * steps, test_episodes=100, verify="size")
    model = GLYPH_MODELS[name]()
    trainer = L.Trainer(max_steps=steps, default_root_dir=tmp_path, **TRAIN_KW)
    trainer.fit(model, dm)
    acc = trainer.test(model, dm, verbose=False)[0]["test/acc"]
    assert acc > 0.4, f"{name}: 5-way 1-shot test accuracy {acc:.3f} (chance 0.2)"


SINE_MODELS = {
    "snail": lambda: SNAIL(MLP(1, [40, 40]), task="regression", ways=0, max_len=11, tc_filters=32,
                           attention=[(32, 16), (64, 32)], lr=3e-3),
    "transformer": lambda: TransformerICL(MLP(1, [40, 40]), task="regression", ways=0, max_len=11, d_model=64,
                                          num_heads=4, num_layers=2, dim_feedforward=128, lr=3e-3),
    # the paper's label offset trains slowly on regression (the query sees the last support target as its label
    # input); the SNAIL scheme learns within the test's budget
    "mann": lambda: MANN(MLP(1, [40, 40]), task="regression", ways=0, max_len=11, hidden_size=64, memory_slots=16,
                         memory_width=32, read_heads=1, label_offset=False, lr=3e-3),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", LEARNERS)
def test_learns_sinusoid_regression(name, tmp_path):
    from lightning_meta.datamodules import SinusoidDataModule

    steps = 300
    L.seed_everything(0, verbose=False)
    dm = SinusoidDataModule(shots=10, queries=10, eval_queries=50, meta_batch_size=16, eval_meta_batch_size=100,
                            train_episodes=16 * steps, test_episodes=200)
    model = SINE_MODELS[name]()
    trainer = L.Trainer(max_steps=steps, default_root_dir=tmp_path, **TRAIN_KW)
    trainer.fit(model, dm)
    mse = trainer.test(model, dm, verbose=False)[0]["test/mse"]
    # predicting 0 costs E[A^2]/2 (about 4.2 for A ~ U[0.1, 5]); measure it on the same test tasks
    zero = torch.cat([(b.query_y**2).mean((1, 2)) for b in dm.test_dataloader()]).mean().item()
    assert 3.0 < zero < 5.5
    assert mse < 0.4 * zero, f"{name}: sinusoid test MSE {mse:.3f}, predicting 0 gives {zero:.3f}"


def test_mann_binds_the_last_support_label_in_memory():
    # label_offset=True: the last support label comes with an extra writing step, so the memory the queries
    # read depends on it (before, it reached the queries only through their own LSTM input); the given order keeps
    # the relabelled example last
    model = make("mann", MLP(D, [12]), ways=3, max_len=7, support_order="given")
    ep = cls_episode(ways=3, shots=1)
    memories = []
    original = model.step

    def spy(x, label, state, write=True):
        out = original(x, label, state, write)
        if not write:  # the query step: record the memory it reads
            memories.append(state.memory.detach().clone())
        return out

    model.step = spy
    for last in (2, 0):
        out_of(model, Episode(ep.support_x, torch.tensor([0, 1, last]), ep.query_x, ep.query_y, ep.classes))
    assert not torch.allclose(memories[0], memories[1], atol=1e-6)


@pytest.mark.parametrize("offset", [True, False])
def test_mann_queries_carry_no_label(offset):
    model = make("mann", MLP(D, [12]), ways=3, max_len=7, label_offset=offset)
    seen = []
    original = model.step

    def spy(x, label, state, write=True):
        if not write:
            seen.append(label.detach().clone())
        return original(x, label, state, write)

    model.step = spy
    out_of(model, cls_episode(ways=3, shots=1))
    assert len(seen) == 1 and torch.count_nonzero(seen[0]) == 0
