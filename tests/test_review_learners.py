"""Fixes from the ninth session's reviews of the metric-based learners and the backbones.

Each test here failed before its fix (checked by reverting the fix and running it).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from episode_fixtures import cls_batch
from torch import nn

from lightning_meta import Episode, collate_episodes
from lightning_meta.algorithms import IMAML, MAML, MatchingNet, MetaOptNet, ProtoNet, RelationNet
from lightning_meta.backbones import MLP, Conv4, TorchvisionBackbone, add_film
from lightning_meta.errors import MetaConfigError


def _learner(cls, **kw):
    if issubclass(cls, RelationNet):
        return cls(Conv4(1, 8, 16, pool_blocks=2, flatten=False), ways=3, **kw)
    if issubclass(cls, MetaOptNet):
        kw.setdefault("ridge_lambda", 1.0)
    return cls(Conv4(1, 8, 16), ways=3, **kw).double()


# ------------------------------------------------------------------ loss_fn / score_fn overrides
class _Sentinel:
    """A subclass mixin whose loss is 3 x the default and whose score is a constant."""

    def loss_fn(self, outputs, targets):
        return 3.0 * super().loss_fn(outputs, targets)

    def score_fn(self, outputs, targets):
        return torch.tensor(0.25, dtype=torch.float32)


@pytest.mark.parametrize("cls", [ProtoNet, MatchingNet, MetaOptNet, RelationNet])
def test_batched_paths_honour_an_overridden_loss_fn_and_score_fn(cls):
    batch = cls_batch(tasks=2, ways=3, shots=2, queries=2, size=16)
    if cls is RelationNet:
        batch = batch.to(torch.float32)
    torch.manual_seed(0)
    plain = _learner(cls)
    torch.manual_seed(0)
    custom = _learner(type(f"My{cls.__name__}", (_Sentinel, cls), {}))
    custom.load_state_dict(plain.state_dict())
    assert torch.allclose(custom.meta_loss(batch), 3.0 * plain.meta_loss(batch), rtol=1e-5)
    assert custom._train_scores.tolist() == [0.25, 0.25]
    assert custom.evaluate(batch)["acc"].tolist() == [0.25, 0.25]


def test_maml_vmap_honours_an_overridden_loss_fn():
    class Scaled(MAML):
        def loss_fn(self, outputs, targets):
            return 3.0 * F.cross_entropy(outputs, targets)

    batch = cls_batch(tasks=2, ways=3, shots=1, queries=2, size=16, dtype=torch.float32)
    kw = dict(ways=3, inner_steps=1, task_batching="vmap")
    torch.manual_seed(0)
    plain = MAML(Conv4(1, 4, 16), **kw)
    torch.manual_seed(0)
    scaled = Scaled(Conv4(1, 4, 16), **kw)
    # the inner loop also uses loss_fn: compare with the plain learner at three times the inner rate
    plain.inner_lr = 3.0 * plain.inner_lr
    assert torch.allclose(scaled.meta_loss(batch), 3.0 * plain.meta_loss(batch), rtol=1e-4)


# ------------------------------------------------------------------ check_batch
@pytest.mark.parametrize("cls", [ProtoNet, MatchingNet, MetaOptNet, RelationNet])
@pytest.mark.parametrize("part", ["support", "query"])
def test_examples_and_labels_of_different_lengths_are_refused(cls, part):
    ep = cls_batch(tasks=1, ways=3, shots=2, queries=2, size=16, dtype=torch.float32).task(0)
    x = getattr(ep, f"{part}_x")
    fields = {"support_x": ep.support_x, "support_y": ep.support_y, "query_x": ep.query_x,
              "query_y": ep.query_y, "classes": ep.classes}
    fields[f"{part}_x"] = torch.cat([x, x[:1]])  # one image more than labels
    batch = collate_episodes([Episode(**fields)])
    with pytest.raises(MetaConfigError, match=f"{part}_x of shape .* does not match {part}_y"):
        _learner(cls).check_batch(batch)


def test_regression_batches_of_matching_lengths_still_pass():
    model = MAML(MLP(1, [8, 8]), task="regression", ways=0)
    ep = Episode(torch.randn(3, 5, 1), torch.randn(3, 5, 1), torch.randn(3, 4, 1), torch.randn(3, 4, 1),
                 torch.zeros(3, 0, dtype=torch.long))
    model.check_batch(ep)


# ------------------------------------------------------------------ hyperparameters set after construction
def test_matching_temperature_and_ridge_lambda_set_later_survive_a_checkpoint(tmp_path):
    import lightning as L

    for cls, name, value in ((MatchingNet, "temperature", 0.05), (MetaOptNet, "ridge_lambda", 1e3)):
        model = _learner(cls)
        setattr(model, name, value)
        trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
        trainer.strategy.connect(model)
        path = tmp_path / f"{cls.__name__}.ckpt"
        trainer.save_checkpoint(path)
        back = cls.load_from_checkpoint(path, backbone=Conv4(1, 8, 16))
        assert getattr(back, name) == value


@pytest.mark.parametrize("make", [
    lambda: ProtoNet(Conv4(1, 8, 16), temperature=float("nan")),
    lambda: MatchingNet(Conv4(1, 8, 16), temperature=float("nan")),
    lambda: MetaOptNet(Conv4(1, 8, 16), ridge_lambda=float("nan")),
    lambda: MetaOptNet(Conv4(1, 8, 16), scale=float("inf")),
    lambda: ProtoNet(Conv4(1, 8, 16), lr=float("nan")),
    lambda: IMAML(MLP(1, [4]), task="regression", lam=float("nan")),
])
def test_nan_and_inf_are_refused_where_a_positive_number_is_needed(make):
    with pytest.raises(MetaConfigError, match="must be > 0 and finite"):
        make()


def test_setting_a_bad_matching_temperature_later_is_refused():
    model = _learner(MatchingNet)
    with pytest.raises(MetaConfigError, match="temperature=0 must be > 0"):
        model.temperature = 0


# ------------------------------------------------------------------ RelationNet under bf16 autocast
def test_relation_scores_stay_float32_under_bf16_autocast():
    torch.manual_seed(0)
    batch = cls_batch(tasks=4, ways=5, shots=2, queries=3, size=16, dtype=torch.float32)
    model = RelationNet(Conv4(1, 16, 16, pool_blocks=2, flatten=False), ways=5).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        scores = model._batched_scores(batch)
    assert scores.dtype == torch.float32
    top2 = scores.topk(2, -1).values
    assert (top2[..., 0] == top2[..., 1]).sum() == 0  # bf16 scores tied on most queries


# ------------------------------------------------------------------ backbones
class LayerNorm2d(nn.LayerNorm):
    """A channels-first LayerNorm as torchvision's and timm's (normalises dimension 1 of [b, C, H, W])."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _convnext_like():
    net = nn.Module()
    net.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1))
    net.classifier = nn.Sequential(LayerNorm2d(8), nn.Flatten(1), nn.Linear(8, 10))
    net.forward = lambda x: net.classifier(net.features(x))
    with torch.no_grad():
        net.classifier[0].weight.uniform_(0.5, 2.0)
        net.classifier[0].bias.uniform_(-1.0, 1.0)
    return net


def test_torchvision_backbone_keeps_the_heads_layers_before_its_linear():
    net = _convnext_like()
    seen = {}
    net.classifier[2].register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    x = torch.randn(4, 3, 12, 12)
    net(x)
    state = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("classifier.2")}
    body = TorchvisionBackbone(net)
    assert body.out_features == 8
    torch.testing.assert_close(body(x), seen["x"])  # the penultimate features, LayerNorm included
    assert {k.removeprefix("model.") for k in body.state_dict()} == set(state)  # original names kept


def test_torchvision_backbone_drops_dropout_of_the_head():
    net = nn.Module()
    net.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(8, 10))
    net.forward = lambda x: net.classifier(net.features(x))
    body = TorchvisionBackbone(net).train()
    x = torch.randn(4, 3, 12, 12)
    torch.testing.assert_close(body(x), net.features(x))
    assert isinstance(net.classifier, nn.Identity)


def test_a_frozen_torchvision_body_keeps_its_batchnorm_statistics():
    def make():
        net = nn.Module()
        net.features = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.fc = nn.Linear(8, 10)
        net.forward = lambda x: net.fc(net.features(x))
        return net

    frozen = TorchvisionBackbone(make(), freeze=True).train()
    before = frozen.model.features[1].running_mean.clone()
    frozen(torch.randn(4, 3, 12, 12) + 3.0)
    assert torch.equal(frozen.model.features[1].running_mean, before)
    assert frozen.training and not frozen.model.features[1].training
    trainable = TorchvisionBackbone(make()).train()
    trainable(torch.randn(4, 3, 12, 12) + 3.0)
    assert not torch.equal(trainable.model.features[1].running_mean, before)


def test_film_after_a_channels_first_layernorm_modulates_channels():
    net = nn.Sequential(nn.Conv2d(3, 6, 1), LayerNorm2d(6))
    assert add_film(net) == ["1"]
    film = net[1].modulation
    with torch.no_grad():
        film.film_scale.copy_(torch.arange(6.0))
        film.film_shift.copy_(-torch.arange(6.0))
    x = torch.randn(2, 3, 5, 5)
    ref = net[1].__class__.forward(net[1], net[0](x))  # the norm's output without the hook
    expected = ref * (1 + torch.arange(6.0).view(1, 6, 1, 1)) - torch.arange(6.0).view(1, 6, 1, 1)
    torch.testing.assert_close(net(x), expected)


@pytest.mark.parametrize("shape", [[6, 5, 5], [5, 5]])
def test_film_after_a_layernorm_over_several_dimensions_is_refused(shape):
    net = nn.Sequential(nn.Conv2d(3, 6, 1), nn.LayerNorm(shape))
    with pytest.raises(MetaConfigError, match="several dimensions"):
        add_film(net)
    assert not hasattr(net[1], "modulation")


def test_film_after_a_token_layernorm_still_modulates_the_last_dimension():
    net = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    add_film(net)
    assert net[1].modulation.channel_dim == -1 and net[1].modulation.num_features == 6


def test_mlp_init_head_accepts_a_linear_without_bias():
    mlp = MLP(1, [8], init="truncated_normal")
    layer = nn.Linear(8, 3, bias=False)
    mlp.init_head(layer)
    assert layer.weight.abs().max() <= 2 * mlp.init_std


# ------------------------------------------------------------------ extension API (ninth-session review)
@pytest.mark.parametrize("name", ["Reptile", "IMAML"])
def test_subclasses_whose_training_ignores_adapt_are_refused(name):
    import lightning_meta.algorithms as algorithms

    base = getattr(algorithms, name)

    class Custom(base):
        def adapt(self, episode):
            return super().adapt(episode)

    with pytest.raises(MetaConfigError, match=rf"overrides adapt/predict, but {name} trains with"):
        Custom(Conv4(1, 4, 16), ways=3)

    class WithLoss(Custom):
        def meta_loss(self, batch):
            return super().meta_loss(batch)

    WithLoss(Conv4(1, 4, 16), ways=3)  # overriding meta_loss too is allowed


def test_overriding_a_batched_loss_alone_is_refused():
    class OnlyBatched(ProtoNet):
        def per_task_loss(self, outputs, targets):
            return 10 * super().per_task_loss(outputs, targets)

    with pytest.raises(MetaConfigError, match="overrides per_task_loss but not loss_fn"):
        OnlyBatched(Conv4(1, 4, 16), ways=3)

    class Both(OnlyBatched):
        def loss_fn(self, outputs, targets):
            return 10 * F.cross_entropy(outputs, targets)

    Both(Conv4(1, 4, 16), ways=3)


def test_a_maml_subclass_without_init_saves_its_arguments(tmp_path):
    import lightning as L

    class MyMAML(MAML):
        pass

    model = MyMAML(Conv4(1, 4, 16), ways=3, inner_lr=0.05, inner_steps=4)
    assert model.hparams["inner_lr"] == 0.05 and model.hparams["inner_steps"] == 4
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    back = MyMAML.load_from_checkpoint(tmp_path / "m.ckpt", backbone=Conv4(1, 4, 16))
    assert (back.inner_lr, back.inner_steps, back.ways) == (0.05, 4, 3)


def test_a_relaxed_check_batch_reaches_mamls_batched_path():
    class Lenient(MAML):
        def check_batch(self, batch):
            pass  # e.g. 3-way episodes on a 5-way head

    batch = cls_batch(tasks=2, ways=3, shots=1, queries=2, size=16, dtype=torch.float32)
    assert torch.isfinite(Lenient(Conv4(1, 4, 16), ways=5).meta_loss(batch))
    with pytest.raises(MetaConfigError, match="3-way"):
        MAML(Conv4(1, 4, 16), ways=5).meta_loss(batch)  # the default still refuses, also called directly


def test_a_backbone_whose_out_features_is_wrong_is_named():
    class Wrong(nn.Module):
        out_features = 32

        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(16 * 16, 16))

        def forward(self, x):
            return self.net(x)

    batch = cls_batch(tasks=1, ways=3, shots=1, queries=2, size=16, dtype=torch.float32)
    with pytest.raises(MetaConfigError, match=r"returns 16 features .* declares out_features=32; set its out_features"):
        MAML(Wrong(), ways=3).meta_loss(batch)


@pytest.mark.parametrize(("size", "channels", "relation_padding", "maps", "fc_in"),
                         [(28, 1, 1, 5, 64), (84, 3, 0, 19, 576)])
def test_relation_network_as_in_the_authors_code(size, channels, relation_padding, maps, fc_in):
    """Sung et al. 2018's networks: unpadded first two encoder convolutions; relation convs padded on Omniglot only."""
    encoder = Conv4(channels, 64, size, pool_blocks=2, flatten=False, padding=[0, 0, 1, 1])
    model = RelationNet(encoder, ways=5, relation_padding=relation_padding)
    assert model.feature_shape == (64, maps, maps)
    assert model.relation.fc[0].in_features == fc_in
    # two 3x3 convolutions without bias (BatchNorm follows), two BatchNorms, 64 -> 8 -> 1 fully connected
    expected = 128 * 64 * 9 + 128 + 64 * 64 * 9 + 128 + fc_in * 8 + 8 + 8 + 1
    assert sum(p.numel() for p in model.relation.parameters()) == expected
    ep = Episode(torch.randn(5, channels, size, size), torch.arange(5), torch.randn(10, channels, size, size),
                 torch.arange(5).repeat(2), torch.arange(5))
    assert model.predict(model.adapt(ep), ep.query_x).shape == (10, 5)


def test_conv4_refuses_paddings_that_leave_no_pixel():
    with pytest.raises(ValueError, match=r"image_size=8 is too small for padding=\[0, 0, 0, 0\]"):
        Conv4(1, 8, 8, padding=0)
    with pytest.raises(ValueError, match="padding=.* must be an int >= 0 or four of them"):
        Conv4(1, 8, 28, padding=[1, 1])


def test_content_addressing_of_an_empty_memory_row_is_finite_in_float16():
    from lightning_meta.functional.sequence import cosine_read_weights

    keys = torch.randn(2, 1, 8, dtype=torch.float16)
    memory = torch.randn(2, 4, 8, dtype=torch.float16)
    memory[:, 2] = 0  # a cleared slot
    weights = cosine_read_weights(keys, memory)
    assert torch.isfinite(weights).all()
    reference = cosine_read_weights(keys.double(), memory.double())
    torch.testing.assert_close(weights.double(), reference, atol=2e-3, rtol=0)


def test_single_episodes_and_int32_labels_are_refused_by_the_steps():
    model = ProtoNet(Conv4(1, 4, 16), ways=3)
    batch = cls_batch(tasks=1, ways=3, shots=1, queries=2, size=16, dtype=torch.float32)
    with pytest.raises(MetaConfigError, match="got a single episode; collate it"):
        model.check_batch(batch.task(0))
    int32 = collate_episodes([Episode(batch.support_x[0], batch.support_y[0].int(), batch.query_x[0],
                                      batch.query_y[0], batch.classes[0])])
    with pytest.raises(MetaConfigError, match=r"labels must be torch.long .* support_y of dtype torch.int32"):
        model.check_batch(int32)


# ------------------------------------------------------------------ regressions found in review of the above
def test_a_maml_subclass_with_its_own_init_and_kwargs_still_loads(tmp_path):
    import lightning as L

    class FOMAML(MAML):
        def __init__(self, backbone=None, **kwargs):
            super().__init__(backbone if backbone is not None else MLP(4, [8]), first_order=True, **kwargs)
            self.save_hyperparameters(ignore=["backbone"])

    model = FOMAML(ways=3, inner_lr=0.1)
    assert dict(model.hparams) == {"ways": 3, "inner_lr": 0.1}  # MAML's own arguments are not mixed in
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "f.ckpt")
    back = FOMAML.load_from_checkpoint(tmp_path / "f.ckpt")
    assert (back.ways, back.inner_lr, back.first_order) == (3, 0.1, True)


def test_a_sequential_head_without_linear_is_stripped_whole():
    net = nn.Module()
    net.features = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU())
    # SqueezeNet's layout: a convolutional classifier
    net.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(16, 1000, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    net.forward = lambda x: net.classifier(net.features(x))
    body = TorchvisionBackbone(net, out_features=16 * 6 * 6)
    assert isinstance(net.classifier, nn.Identity)
    assert body(torch.randn(2, 3, 8, 8)).shape == (2, 576)


def test_film_follows_layernorm_subclasses_that_normalise_the_last_dimension():
    class FP16LayerNorm(nn.LayerNorm):  # CLIP's pattern: compute in float32, return the input dtype
        def forward(self, x):
            return super().forward(x.float()).type(x.dtype)

    net = nn.Sequential(nn.Linear(4, 6), FP16LayerNorm(6))
    assert add_film(net) == ["1"]
    assert net[1].modulation.channel_dim == -1
    assert net(torch.randn(2, 5, 4)).shape == (2, 5, 6)


def test_film_refuses_an_output_whose_channel_dimension_does_not_fit():
    from lightning_meta.backbones import FiLM

    film = FiLM(6, channel_dim=1)
    with pytest.raises(MetaConfigError, match=r"dimension 1 does not hold 6 channels"):
        film(torch.randn(2, 5, 6))


def test_inner_adapt_penalty_equals_a_hand_written_proximal_loop():
    """iMAML's inner loop now runs through the shared inner_adapt, with its proximal term as a penalty."""
    from lightning_meta.functional import inner_adapt

    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    theta = {k: v.detach().clone() for k, v in net.named_parameters()}
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    lam, lr, steps = 0.7, 0.1, 4

    def penalty(p):
        return lam / 2 * sum(((p[k] - theta[k]) ** 2).sum() for k in theta)

    fast = inner_adapt(net, theta, {}, x, y, F.mse_loss, lr, steps, first_order=True, penalty=penalty)
    w, b = theta["weight"].clone(), theta["bias"].clone()
    n = x.shape[0] * y.shape[1]
    for _ in range(steps):  # d/dW mean((xW^T + b - y)^2) = 2/n (r^T x); plus lam (W - W0)
        r = x @ w.T + b - y
        grad_w = 2 / n * r.T @ x + lam * (w - theta["weight"])
        grad_b = 2 / n * r.sum(0) + lam * (b - theta["bias"])
        w, b = w - lr * grad_w, b - lr * grad_b
    torch.testing.assert_close(fast["weight"], w, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast["bias"], b, rtol=0, atol=1e-12)
