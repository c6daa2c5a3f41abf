"""Large-backbone support: ViT, LoRA / FiLM / CAVIA adapters, the torchvision wrapper, bf16 inner loops.

References are written independently of the code under test: attention through
``nn.MultiheadAttention``, LoRA and MAML through hand-written tensor maths and an explicit
``torch.autograd.grad`` loop, the wrapper against the wrapped model's own layers.
"""

from __future__ import annotations

import copy
import os
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from episode_fixtures import cls_batch as _cls_batch
from torch import nn
from torch.func import functional_call, grad, vmap

from lightning_meta import Episode, collate_episodes
from lightning_meta.algorithms import ANIL, MAML, ProtoNet
from lightning_meta.backbones import MLP, Conv4
from lightning_meta.backbones.adapters import FiLM, FiLMBackbone, LoRABackbone, LoRALinear, add_film, add_lora
from lightning_meta.backbones.vit import ViT, ViTBlock
from lightning_meta.backbones.wrap import TorchvisionBackbone
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional import inner_adapt
from lightning_meta.functional.precision import low_precision_autocast, upcast_low_precision


def tiny_vit(**kw) -> ViT:
    args = dict(in_channels=1, image_size=16, patch_size=4, dim=16, depth=2, heads=2)
    args.update(kw)
    return ViT(**args)




def _grads(model, batch):
    model.zero_grad()
    model.meta_loss(batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(ga, gb, rtol=1e-6, atol=1e-9):
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=rtol, atol=atol, msg=k)


# ----------------------------------------------------------------------------------------- ViT
def test_vit_small_defaults_parameter_count():
    dim, depth, patches, hidden = 384, 12, (224 // 16) ** 2, 4 * 384
    norms, qkv, proj = 2 * 2 * dim, dim * 3 * dim + 3 * dim, dim * dim + dim
    block = norms + qkv + proj + (dim * hidden + hidden) + (hidden * dim + dim)
    expected = (3 * 16 * 16 * dim + dim) + dim + (patches + 1) * dim + depth * block + 2 * dim
    net = ViT()
    assert sum(p.numel() for p in net.parameters()) == expected == 21_665_664  # timm's ViT-S/16 minus its head
    assert net.out_features == 384 and len(net.blocks) == 12 and net.num_patches == 196


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_shapes_and_pooling(pool):
    net = tiny_vit(pool=pool, in_channels=3, image_size=12, patch_size=3)
    assert net.num_patches == 16 and net.pos_embed.shape == (1, 16 + (pool == "cls"), 16)
    assert (net.cls_token is not None) == (pool == "cls")
    assert net(torch.randn(5, 3, 12, 12)).shape == (5, 16)


def test_vit_block_equals_multihead_attention_reference():
    torch.manual_seed(0)
    block = ViTBlock(12, heads=3).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    mha = nn.MultiheadAttention(12, 3, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.attn.qkv.weight)
        mha.in_proj_bias.copy_(block.attn.qkv.bias)
        mha.out_proj.weight.copy_(block.attn.proj.weight)
        mha.out_proj.bias.copy_(block.attn.proj.bias)
    h = block.norm1(x)
    h = x + mha(h, h, h, need_weights=False)[0]
    expected = h + block.fc2(F.gelu(block.fc1(block.norm2(h))))
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-12)


def test_vit_functional_call_grad_and_vmap():
    torch.manual_seed(0)
    net = tiny_vit().double()
    params = dict(net.named_parameters())
    x = torch.randn(3, 4, 1, 16, 16, dtype=torch.float64)  # 3 tasks of 4 images

    def loss(p, xi):
        return functional_call(net, p, (xi,)).pow(2).mean()

    torch.testing.assert_close(functional_call(net, params, (x[0],)), net(x[0]))
    g_func = grad(loss)(params, x[0])
    g_auto = torch.autograd.grad(net(x[0]).pow(2).mean(), list(params.values()))
    for (k, a), b in zip(g_func.items(), g_auto, strict=True):
        torch.testing.assert_close(a, b, msg=k)
    batched = vmap(lambda xi: functional_call(net, params, (xi,)))(x)
    torch.testing.assert_close(batched, torch.stack([net(xi) for xi in x]))


def _second_order_meta_grads(net, x, y, steps=2, lr=0.3):
    """Explicit two-step inner loop on every parameter with torch.autograd.grad(create_graph=True)."""
    params = dict(net.named_parameters())
    fast = dict(params)
    for _ in range(steps):
        inner = F.mse_loss(functional_call(net, fast, (x[0],)), y[0])
        gs = torch.autograd.grad(inner, list(fast.values()), create_graph=True)
        fast = {k: v - lr * g for (k, v), g in zip(fast.items(), gs, strict=True)}
    outer = F.mse_loss(functional_call(net, fast, (x[1],)), y[1])
    return outer, torch.autograd.grad(outer, list(params.values()))


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_checkpoint_same_outputs_and_second_order_grads(pool):
    torch.manual_seed(0)
    plain = tiny_vit(pool=pool).double()
    ckpt = tiny_vit(pool=pool, checkpoint=True).double()
    ckpt.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 6, 1, 16, 16, dtype=torch.float64), torch.randn(2, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(ckpt(x[0]), plain(x[0]), rtol=0, atol=1e-12)
    la, ga = _second_order_meta_grads(plain, x, y)
    lb, gb = _second_order_meta_grads(ckpt, x, y)
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-12)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_vit_checkpoint_really_drops_activations():
    def saved_bytes(net, x):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            net(x)
        return total[0]

    torch.manual_seed(0)
    plain, ckpt = tiny_vit(depth=3, dim=32), tiny_vit(depth=3, dim=32, checkpoint=True)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(8, 1, 16, 16)
    assert saved_bytes(ckpt, x) < 0.2 * saved_bytes(plain, x)
    with torch.no_grad():  # no graph, nothing to checkpoint
        torch.testing.assert_close(ckpt(x), plain(x), rtol=0, atol=0)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_vit_checkpoint_in_the_inner_loop(batching, recwarn, monkeypatch):
    """The per-task loop (autograd.grad) checkpoints the blocks; under vmap they run plainly, with a warning."""
    import lightning_meta.backbones.vit as vit_module

    calls = []
    real = vit_module.checkpoint
    monkeypatch.setattr(vit_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    plain = tiny_vit().double()
    ckpt = tiny_vit(checkpoint=True).double()
    ckpt.load_state_dict(plain.state_dict())
    batch = _cls_batch(tasks=2)
    a = MAML(plain, ways=3, inner_lr=0.3, inner_steps=2, adapt_filter="head", task_batching=batching).double()
    b = MAML(ckpt, ways=3, inner_lr=0.3, inner_steps=2, adapt_filter="head", task_batching=batching).double()
    b.load_state_dict(a.state_dict())
    gb = _grads(b, batch)
    warned = [w for w in recwarn.list if "inside torch.func transforms" in str(w.message)]
    assert len(warned) == (1 if batching == "vmap" else 0)
    # 2 tasks x (2 inner-step forwards + 1 query forward) x 2 blocks in the loop; under vmap every
    # forward runs inside the transform, so none is checkpointed
    assert len(calls) == (2 * 2 * 3 if batching == "loop" else 0)
    _assert_grads_close(_grads(a, batch), gb)


def test_vit_checkpoint_with_maml_activation_checkpointing():
    import inspect

    if "activation_checkpointing" not in inspect.signature(MAML).parameters:
        pytest.skip("MAML has no activation_checkpointing option in this checkout")
    torch.manual_seed(1)
    plain = tiny_vit().double()
    ckpt = tiny_vit(checkpoint=True).double()
    ckpt.load_state_dict(plain.state_dict())
    batch = _cls_batch(tasks=2, seed=2)
    a = MAML(plain, ways=3, inner_lr=0.3, inner_steps=2, adapt_filter="head|attn").double()
    b = MAML(ckpt, ways=3, inner_lr=0.3, inner_steps=2, adapt_filter="head|attn",
             activation_checkpointing=True).double()
    b.load_state_dict(a.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.autograd.grad inner loop: blocks really are checkpointed
        gb = _grads(b, batch)
    _assert_grads_close(_grads(a, batch), gb)


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(image_size=30, patch_size=4), r"patch_size=4 does not divide image_size=30.*patch_size=3"),
    (dict(dim=18, heads=4), r"heads=4 does not divide dim=18"),
    (dict(depth=0), r"depth=0 must be a positive integer"),
    (dict(pool="max"), r"pool='max'"),
    (dict(mlp_ratio=0.0), r"mlp_ratio=0.0"),
])
def test_vit_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(MetaConfigError, match=match):
        tiny_vit(**kwargs)


def test_vit_wrong_image_size_names_the_fix():
    with pytest.raises(MetaConfigError, match=r"built for 16x16 images.*set image_size"):
        tiny_vit()(torch.zeros(1, 1, 28, 28))


# ---------------------------------------------------------------------------------------- LoRA
def test_lora_at_init_equals_base_model_exactly():
    torch.manual_seed(0)
    base = tiny_vit(pool="mean")
    lora = copy.deepcopy(base)
    wrapped = add_lora(lora, rank=3, alpha=6.0, target=r"attn\.(qkv|proj)$|fc1$")
    assert wrapped == [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "fc1")]
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(lora(x), base(x))
    # existing names are unchanged, so the base network's state dict loads
    missing, unexpected = lora.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all("lora_" in k for k in missing)


def test_lora_state_dict_with_the_old_factor_names_loads():
    # before LoRAFactors, the factors were LoRALinear parameters named lora_A / lora_B
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    add_lora(net, rank=2)
    with torch.no_grad():
        net[0].lora_B.normal_()
    old = {k.replace("lora_factors.A", "lora_A").replace("lora_factors.B", "lora_B"): v.clone()
           for k, v in net.state_dict().items()}
    assert "0.lora_A" in old and not any("lora_factors" in k for k in old)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    add_lora(fresh, rank=2)
    assert fresh.load_state_dict(old) is not None  # strict: no missing or unexpected keys
    x = torch.randn(5, 3)
    torch.testing.assert_close(fresh(x), net(x))


def test_lora_linear_equals_hand_formula_and_freezes_base():
    torch.manual_seed(0)
    layer = LoRALinear(5, 4, rank=2, alpha=3.0).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 5, dtype=torch.float64)
    expected = x @ layer.weight.T + layer.bias + (3.0 / 2) * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_factors.A", "lora_factors.B"}
    assert "rank=2" in repr(layer) and "alpha=3" in repr(layer)


@pytest.mark.parametrize(("freeze", "trainable_base"), [
    ("wrapped", {"net.2.weight", "net.2.bias"}),
    ("all", set()),
    ("none", {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}),
])
def test_lora_backbone_freeze_modes(freeze, trainable_base):
    body = LoRABackbone(MLP(3, [6, 5]), rank=2, target=r"^net\.0$", freeze=freeze)
    trainable = {n.removeprefix("body."): p.requires_grad for n, p in body.named_parameters()}
    assert trainable.pop("net.0.lora_factors.A") and trainable.pop("net.0.lora_factors.B")
    assert {n for n, t in trainable.items() if t} == trainable_base
    assert body.out_features == 5 and body.wrapped == ["net.0"]


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(rank=0), r"rank=0 must be an integer >= 1"),
    (dict(rank=-2), r"rank=-2"),
    (dict(rank=2, alpha=0.0), r"alpha=0.0 must be > 0"),
    (dict(rank=2, target="nomatch"), r"target='nomatch' matches no nn.Linear.*net\.0"),
    (dict(rank=2, target="("), r"not a valid regular expression"),
])
def test_lora_bad_configuration_is_refused(kwargs, match):
    with pytest.raises(MetaConfigError, match=match):
        LoRABackbone(MLP(3, [6]), **kwargs)


def test_lora_preset_adapts_only_lora_parameters():
    torch.manual_seed(0)
    model = MAML(LoRABackbone(tiny_vit(), rank=2, target=r"attn\.qkv$", freeze="none"), ways=3,
                 adapt_filter="lora", inner_lr=0.5)
    assert model.adapted_names == [f"backbone.body.blocks.{i}.attn.qkv.lora_factors.{m}"
                                   for i in range(2) for m in "AB"]
    batch = _cls_batch(tasks=1, dtype=torch.float32)
    fast = model.adapt(batch.tasks()[0])
    params = dict(model.model.named_parameters())
    changed = {n for n, v in fast.items() if not torch.equal(v.detach(), params[n].detach())}
    # B moves in the first step (A's gradient is zero while B is zero); nothing outside LoRA moves
    assert changed and all(n.endswith("lora_factors.B") for n in changed)


class TanhMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(3, 6), nn.Linear(6, 5)
        self.out_features = 5

    def forward(self, x):
        return torch.tanh(self.l2(torch.tanh(self.l1(x))))


def test_maml_lora_meta_gradient_equals_explicit_autograd_loop():
    """Second-order MAML adapting only LoRA factors, against hand-written LoRA maths and autograd.grad."""
    torch.manual_seed(0)
    rank, alpha, lr, steps, ways = 2, 3.0, 0.4, 2, 3
    model = MAML(LoRABackbone(TanhMLP(), rank=rank, alpha=alpha, freeze="none"), ways=ways, inner_lr=lr,
                 inner_steps=steps, adapt_filter="lora").double()
    with torch.no_grad():  # non-zero B so that every term of the meta-gradient is exercised
        for n, p in model.named_parameters():
            if n.endswith("lora_factors.B"):
                p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(3)
    eps = [Episode(torch.randn(6, 3, generator=g, dtype=torch.float64), torch.arange(ways).repeat(2),
                   torch.randn(9, 3, generator=g, dtype=torch.float64), torch.arange(ways).repeat(3),
                   torch.arange(ways)) for _ in range(3)]
    got = _grads(model, collate_episodes(eps))

    P = {n.removeprefix("model."): p for n, p in model.named_parameters()}
    s = alpha / rank

    def forward(lo, x):
        h = x
        for layer in ("l1", "l2"):
            pre = f"backbone.body.{layer}."
            w, b = P[pre + "weight"], P[pre + "bias"]
            h = torch.tanh(h @ w.T + b + s * (h @ lo[pre + "lora_factors.A"].T) @ lo[pre + "lora_factors.B"].T)
        return h @ P["head.weight"].T + P["head.bias"]

    total = 0
    for ep in eps:
        lo = {k: v for k, v in P.items() if "lora_" in k}
        for _ in range(steps):
            gs = torch.autograd.grad(F.cross_entropy(forward(lo, ep.support_x), ep.support_y), list(lo.values()),
                                     create_graph=True)
            lo = {k: v - lr * gk for (k, v), gk in zip(lo.items(), gs, strict=True)}
        total = total + F.cross_entropy(forward(lo, ep.query_x), ep.query_y) / len(eps)
    want = dict(zip(P, torch.autograd.grad(total, list(P.values())), strict=True))
    assert set(got) == {f"model.{k}" for k in P}  # base weights and head get outer gradients (freeze='none')
    for k, v in want.items():
        torch.testing.assert_close(got[f"model.{k}"], v, rtol=1e-9, atol=1e-12, msg=k)


def test_maml_lora_vit_vmap_equals_loop():
    torch.manual_seed(0)
    body = LoRABackbone(tiny_vit(depth=1), rank=2, target=r"attn", freeze="none")
    with torch.no_grad():
        for n, p in body.named_parameters():
            if n.endswith("lora_factors.B"):
                p.normal_(0, 0.1)
    a = MAML(copy.deepcopy(body), ways=3, inner_lr=0.3, inner_steps=2, adapt_filter="lora").double()
    b = MAML(copy.deepcopy(body), ways=3, inner_lr=0.3, inner_steps=2, adapt_filter="lora",
             task_batching="vmap").double()
    b.load_state_dict(a.state_dict())
    batch = _cls_batch(tasks=3, seed=1)
    _assert_grads_close(_grads(a, batch), _grads(b, batch))


# ---------------------------------------------------------------------------------------- FiLM
@pytest.mark.parametrize("context_dim", [0, 3])
def test_film_is_identity_at_init_and_matches_formula(context_dim):
    torch.manual_seed(0)
    net = Conv4(1, 8, 16, norm="batch_no_stats")
    ref = copy.deepcopy(net)
    assert add_film(net, context_dim=context_dim) == ["encoder.1", "encoder.5", "encoder.9", "encoder.13"]
    x = torch.randn(4, 1, 16, 16)
    assert torch.equal(net(x), ref(x))
    film = FiLM(3, channel_dim=1, context_dim=context_dim).double()
    with torch.no_grad():
        for p in film.parameters():
            p.normal_()
    h = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    scale, shift = (film.generator(film.context).chunk(2) if context_dim else (film.film_scale, film.film_shift))
    torch.testing.assert_close(film(h), h * (1 + scale[None, :, None, None]) + shift[None, :, None, None])


def test_film_preset_adapts_only_modulation_and_cavia_context():
    torch.manual_seed(0)
    plain = MAML(FiLMBackbone(Conv4(1, 4, 16, norm="batch_no_stats")), ways=3, adapt_filter="film")
    assert plain.adapted_names and all(".modulation.film_" in n for n in plain.adapted_names)
    cavia = MAML(FiLMBackbone(Conv4(1, 4, 16, norm="batch_no_stats"), context_dim=2), ways=3,
                 adapt_filter="film").double()
    assert cavia.adapted_names == [f"backbone.body.encoder.{i}.modulation.context" for i in (1, 5, 9, 13)]
    ctx = dict(cavia.named_parameters())[f"model.{cavia.adapted_names[0]}"]
    assert not ctx.requires_grad  # CAVIA: the context starts at zero for every task, not meta-learned
    ga = _grads(cavia, _cls_batch(tasks=2))
    assert "model.backbone.body.encoder.1.modulation.generator.weight" in ga
    assert ga["model.backbone.body.encoder.1.modulation.generator.weight"].abs().sum() > 0


def test_film_on_vit_layernorm_vmap_equals_loop():
    """Adapting FiLM after LayerNorm (not the LayerNorm weights) is exact under vmap, so it is allowed."""
    torch.manual_seed(0)
    body = FiLMBackbone(tiny_vit(depth=1))
    assert body.modulated == ["blocks.0.norm1", "blocks.0.norm2", "norm"]
    a = MAML(copy.deepcopy(body), ways=3, inner_lr=0.3, inner_steps=2, adapt_filter="film").double()
    b = MAML(copy.deepcopy(body), ways=3, inner_lr=0.3, inner_steps=2, adapt_filter="film",
             task_batching="vmap").double()
    b.load_state_dict(a.state_dict())
    batch = _cls_batch(tasks=3, seed=2)
    _assert_grads_close(_grads(a, batch), _grads(b, batch))


def test_film_bad_targets_are_refused():
    with pytest.raises(MetaConfigError, match=r"no normalisation layer.*encoder\.0"):
        add_film(Conv4(1, 4, 16, norm="none"))
    with pytest.raises(MetaConfigError, match=r"'encoder.1' \(ReLU\), whose output channels are unknown"):
        add_film(Conv4(1, 4, 16, norm="none"), target=r"encoder\.1$")
    net = Conv4(1, 4, 16)
    add_film(net)
    with pytest.raises(MetaConfigError, match="already has a FiLM"):
        add_film(net)


# --------------------------------------------------------------------------------- torchvision
class TinyBasicBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class TinyResNet(nn.Module):
    """Shaped like torchvision's ResNet: conv1/bn1/relu/maxpool/layer1/avgpool/fc, logits out."""

    def __init__(self, num_classes: int = 10, width: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1, self.relu, self.maxpool = nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2)
        self.layer1 = TinyBasicBlock(width)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_torchvision_wrapper_strips_fc_and_returns_pooled_features():
    torch.manual_seed(0)
    net = TinyResNet(num_classes=7, width=6).eval()
    ref = copy.deepcopy(net)
    body = TorchvisionBackbone(net).eval()
    assert body.out_features == 6 and body.stripped == "fc" and isinstance(body.model.fc, nn.Identity)
    x = torch.randn(3, 3, 16, 16)
    feats = torch.flatten(ref.avgpool(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))), 1)
    torch.testing.assert_close(body(x), feats)
    torch.testing.assert_close(ref.fc(body(x)), ref(x))


def test_torchvision_wrapper_named_head_sequential_and_errors():
    net = nn.Module()
    net.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(4, 10))
    net.forward = lambda x: net.classifier(net.features(x))
    body = TorchvisionBackbone(net)
    assert body.stripped == "classifier" and body.out_features == 4
    assert body(torch.zeros(2, 3, 8, 8)).shape == (2, 4)
    with pytest.raises(MetaConfigError, match=r"head='missing' is not a submodule.*children"):
        TorchvisionBackbone(TinyResNet(), head="missing")
    conv_head = nn.Module()
    conv_head.classifier = nn.Conv2d(4, 10, 1)
    with pytest.raises(MetaConfigError, match="cannot infer out_features"):
        TorchvisionBackbone(conv_head)
    with pytest.raises(MetaConfigError, match="not an import path"):
        TorchvisionBackbone("resnet18")
    with pytest.raises(MetaConfigError, match="cannot import"):
        TorchvisionBackbone("no_such_package_xyz.models.resnet18")
    wrong = TorchvisionBackbone(TinyResNet(width=8), out_features=5)
    with pytest.raises(MetaConfigError, match="returns 8 features, not out_features=5; set out_features=8"):
        wrong(torch.zeros(2, 3, 8, 8))


def test_torchvision_wrapper_loads_local_weights_and_freezes(tmp_path):
    torch.manual_seed(0)
    src = TinyResNet()
    torch.save(src.state_dict(), tmp_path / "w.pth")
    body = TorchvisionBackbone(TinyResNet(), weights_path=str(tmp_path / "w.pth"), freeze=True)
    assert torch.equal(body.model.conv1.weight, src.conv1.weight)
    assert not any(p.requires_grad for p in body.parameters())
    torch.save({"state_dict": TinyResNet(num_classes=3).state_dict()}, tmp_path / "bad.ckpt")
    with pytest.raises(MetaConfigError, match="does not fit TinyResNet"):
        TorchvisionBackbone(TinyResNet(), weights_path=str(tmp_path / "bad.ckpt"))


def test_torchvision_wrapper_with_maml_anil_protonet():
    torch.manual_seed(0)
    batch = _cls_batch(tasks=2, size=8, dtype=torch.float32)
    rgb = (-1, -1, 3, -1, -1)
    batch3 = Episode(batch.support_x.expand(rgb), batch.support_y, batch.query_x.expand(rgb), batch.query_y,
                     batch.classes)
    for model in (MAML(TorchvisionBackbone(TinyResNet()), ways=3, inner_lr=0.1),
                  ANIL(TorchvisionBackbone(TinyResNet()), ways=3, inner_lr=0.1),
                  ProtoNet(TorchvisionBackbone(TinyResNet()), ways=3)):
        loss = model.meta_loss(batch3)
        loss.backward()
        assert torch.isfinite(loss)
        conv = model.model.backbone.model.conv1 if isinstance(model, MAML) else model.backbone.model.conv1
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


def test_torchvision_wrapper_from_yaml(tmp_path, monkeypatch):
    from lightning_meta.cli import main

    (tmp_path / "tvlike_models.py").write_text(textwrap.dedent("""
        from torch import nn
        import torch

        class TinyNet(nn.Module):
            def __init__(self, num_classes: int = 10, width: int = 4):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.AdaptiveAvgPool2d(1))
                self.fc = nn.Linear(width, num_classes)

            def forward(self, x):
                return self.fc(torch.flatten(self.features(x), 1))

        def tiny_net(num_classes: int = 10, width: int = 4):
            return TinyNet(num_classes, width)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    data = {"class_path": "lightning_meta.datamodules.ShardDataModule",
            "init_args": {"ways": 3, "shots": 1, "queries": 2, "meta_batch_size": 2}}
    for backbone in ({"model": "tvlike_models.tiny_net", "model_kwargs": {"width": 6}},
                     {"model": {"class_path": "tvlike_models.TinyNet", "init_args": {"width": 6}}}):
        import yaml

        cfg = {"model": {"class_path": "lightning_meta.algorithms.MAML",
                         "init_args": {"backbone": {"class_path": "lightning_meta.backbones.wrap.TorchvisionBackbone",
                                                    "init_args": backbone}}},
               "data": data}
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        cli = main(["--config", str(tmp_path / "cfg.yaml")], run=False)
        body = cli.model.model.backbone
        assert isinstance(body, TorchvisionBackbone) and body.out_features == 6
        assert cli.model.model.head.in_features == 6 and cli.model.model.head.out_features == 3
    sys.modules.pop("tvlike_models", None)


def test_vit_with_film_from_yaml(tmp_path, monkeypatch):
    import yaml

    from lightning_meta.cli import main

    monkeypatch.chdir(tmp_path)
    vit = {"class_path": "lightning_meta.backbones.vit.ViT",
           "init_args": {"in_channels": 1, "image_size": 28, "patch_size": 7, "dim": 16, "depth": 1, "heads": 2,
                         "pool": "mean", "checkpoint": True}}
    cfg = {"model": {"class_path": "lightning_meta.algorithms.MAML",
                     "init_args": {"adapt_filter": "film",
                                   "backbone": {"class_path": "lightning_meta.backbones.adapters.FiLMBackbone",
                                                "init_args": {"backbone": vit, "context_dim": 2}}}},
           "data": {"class_path": "lightning_meta.datamodules.ShardDataModule",
                    "init_args": {"ways": 3, "shots": 1, "queries": 2, "meta_batch_size": 2}}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    model = main(["--config", str(tmp_path / "cfg.yaml")], run=False).model
    assert model.model.backbone.body.checkpoint and model.model.backbone.body.pool == "mean"
    assert model.adapted_names == ["backbone.body.blocks.0.norm1.modulation.context",
                                   "backbone.body.blocks.0.norm2.modulation.context",
                                   "backbone.body.norm.modulation.context"]


# ---------------------------------------------------------------------------------------- bf16
def _sinusoid_episode(seed=1):
    g = torch.Generator().manual_seed(seed)
    x, xq = torch.rand(10, 1, generator=g) * 10 - 5, torch.rand(10, 1, generator=g) * 10 - 5
    return Episode(x, torch.sin(x), xq, torch.sin(xq), torch.zeros(0, dtype=torch.long))


def _update(model, ep, fast):
    p0 = dict(model.model.named_parameters())
    return torch.cat([(fast[k].float() - p0[k].float()).detach().flatten() for k in model.adapted_names])


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _bf16_rounded_maml(steps=3, lr=0.01):
    torch.manual_seed(0)
    model = MAML(MLP(1, [40, 40]), task="regression", inner_lr=lr, inner_steps=steps)
    with torch.no_grad():  # every variant starts from the same (bf16-representable) weights
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


# Tolerance for the bf16 tests: bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 0.002), every
# matrix product is rounded to it, and three inner steps chain ~10 such products; measured relative
# errors of the inner update are 0.3-1.2% (sinusoid MLP, lr 1e-3..1e-1, 1-5 steps, CPU autocast and
# a bf16 module alike), so 5% leaves a 4x margin. Rounding the fast weights themselves to bf16 loses
# 16-77% of updates of this size (inner_lr 0.01: 26%), far outside it.
BF16_TOL = 0.05


def test_bf16_autocast_keeps_fast_weights_fp32_and_close_to_fp32():
    model, ep = _bf16_rounded_maml(), _sinusoid_episode()
    ref = _update(model, ep, model.adapt(ep))
    seen = []
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):  # what Lightning's bf16-mixed does
        fast = inner_adapt(model.model, dict(model.model.named_parameters()), {}, ep.support_x, ep.support_y,
                           model.loss_fn, model.inner_lr, 3,
                           callback=lambda s, f: seen.extend(v.dtype for v in f.values()))
        out = model.predict(fast, ep.query_x)
    assert out.dtype == torch.bfloat16  # the products really ran in bf16
    assert set(seen) == {torch.float32} and all(v.dtype == torch.float32 for v in fast.values())
    assert 0 < _rel(_update(model, ep, fast), ref) < BF16_TOL
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
        fast = model.adapt(ep)
    assert {fast[k].dtype for k in model.adapted_names} == {torch.float32}
    assert 0 < _rel(_update(model, ep, fast), ref) < BF16_TOL


def test_bf16_module_inner_loop_runs_in_fp32():
    """DeepSpeed bf16 / bf16-true: the module and inputs are bf16; MAML keeps the adapted weights in fp32."""
    model, ep = _bf16_rounded_maml(), _sinusoid_episode()
    ref = _update(model, ep, model.adapt(ep))
    low = copy.deepcopy(model).bfloat16()
    ep16 = Episode(*(t.bfloat16() for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y)), ep.classes)
    fast = low.adapt(ep16)
    assert all(fast[k].dtype == torch.float32 for k in low.adapted_names)
    new_err = _rel(_update(low, ep16, fast), ref)
    # the old behaviour, for contrast: the same inner loop over the bf16 weights themselves
    raw = inner_adapt(low.model, dict(low.model.named_parameters()), {}, ep16.support_x, ep16.support_y,
                      low.loss_fn, low.inner_lr, 3)
    assert all(v.dtype == torch.bfloat16 for v in raw.values())
    old_err = _rel(_update(low, ep16, raw), ref)
    assert new_err < BF16_TOL < old_err
    # the meta-gradient reaches the bf16 parameters through the float32 copies
    low.zero_grad()
    loss = low.meta_loss(collate_episodes([ep16, ep16]))
    loss.backward()
    head = low.model.head.weight
    assert head.grad is not None and head.grad.dtype == torch.bfloat16 and torch.isfinite(head.grad).all()


def test_bf16_module_anil_and_lora_vit_run():
    torch.manual_seed(0)
    batch = _cls_batch(tasks=2, dtype=torch.bfloat16)
    for model in (ANIL(tiny_vit(), ways=3, inner_lr=0.3),
                  MAML(LoRABackbone(tiny_vit(), rank=2, target="attn", freeze="none"), ways=3,
                       adapt_filter=r"lora_|^head\.", inner_lr=0.3),
                  MAML(tiny_vit(), ways=3, inner_lr=0.3)):  # LayerNorm weights adapted in fp32 too
        model = model.bfloat16()
        fast = model.adapt(batch.tasks()[0])
        assert {fast[k].dtype for k in model.adapted_names} == {torch.float32}
        loss = model.meta_loss(batch)
        loss.backward()
        assert torch.isfinite(loss)


def test_precision_helpers():
    x16, x32 = torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2)
    with low_precision_autocast(x16):
        assert torch.is_autocast_enabled("cpu")
    with low_precision_autocast(x32):
        assert not torch.is_autocast_enabled("cpu")
    p = {"a": torch.ones(2, dtype=torch.float16, requires_grad=True), "b": torch.ones(2, dtype=torch.float64)}
    up = upcast_low_precision(p)
    assert up["a"].dtype == torch.float32 and up["b"] is p["b"]
    up["a"].sum().backward()
    assert p["a"].grad is not None and p["a"].grad.dtype == torch.float16


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_trainer_keeps_fast_weights_fp32(precision, monkeypatch, tmp_path):
    """precision='bf16-mixed' (autocast, fp32 parameters) and 'bf16-true' (bf16 module): fp32 fast weights."""
    import lightning as L

    import lightning_meta.algorithms.maml as maml_module
    from lightning_meta.datamodules import SinusoidDataModule

    dtypes = set()
    real = maml_module.inner_adapt

    def spy(*args, **kwargs):
        fast = real(*args, **kwargs)
        dtypes.update(v.dtype for v in fast.values())
        return fast

    monkeypatch.setattr(maml_module, "inner_adapt", spy)
    torch.manual_seed(0)
    model = MAML(MLP(1, [16]), task="regression", inner_lr=0.01, inner_steps=2)
    trainer = L.Trainer(max_steps=2, precision=precision, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, SinusoidDataModule(meta_batch_size=2, train_episodes=8))
    assert dtypes == {torch.float32}
    want = torch.float32 if precision == "bf16-mixed" else torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {want}


@pytest.mark.slow
def test_deepspeed_bf16_keeps_adapted_weights_fp32(monkeypatch, tmp_path):
    """DeepSpeed bf16 casts the module to bf16; the inner loop still adapts float32 copies."""
    pytest.importorskip("deepspeed")
    import lightning as L

    import lightning_meta.algorithms.maml as maml_module
    import lightning_meta.strategies  # noqa: F401 - registers deepspeed_cpu_stage_2
    from lightning_meta.datamodules import SinusoidDataModule

    dtypes = set()
    real = maml_module.inner_adapt

    def spy(*args, **kwargs):
        fast = real(*args, **kwargs)
        dtypes.update(v.dtype for v in fast.values())
        return fast

    monkeypatch.setattr(maml_module, "inner_adapt", spy)
    torch.manual_seed(0)
    model = MAML(MLP(1, [16]), task="regression", inner_lr=0.01, inner_steps=2)
    trainer = L.Trainer(max_steps=2, precision="bf16-mixed", accelerator="cpu", devices=1,
                        strategy="deepspeed_cpu_stage_2", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=tmp_path)
    trainer.fit(model, SinusoidDataModule(meta_batch_size=2, train_episodes=8))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert dtypes == {torch.float32}


def test_gpu_check_script_runs_on_cpu_quick(tmp_path, load_benchmark):
    out = tmp_path / "table.md"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: extra threads only contend on a loaded machine
    try:
        text = load_benchmark("gpu_check").main(["--device", "cpu", "--quick", "--sections", "34", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert out.read_text() == text
    assert "## 3. Peak memory" in text and "## 4. Episodes/s" in text and "error:" not in text
    assert text.count("| n/a |") >= 4  # no CUDA: the memory columns say so


@pytest.mark.slow
def test_gpu_check_script_all_sections_on_cpu_quick(tmp_path, load_benchmark):
    pytest.importorskip("deepspeed")
    saved = dict(os.environ)
    try:  # its in-process DDP/DeepSpeed runs set LOCAL_RANK, MASTER_PORT, ... (Lightning's launcher)
        text = load_benchmark("gpu_check").main(["--device", "cpu", "--quick", "--out", str(tmp_path / "t.md")])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert "error:" not in text and "## 1. Strategies" in text and "## 2b." in text


# ------------------------------------------------------- review fixes (fourth session)
def test_lora_never_wraps_the_output_projection_of_multihead_attention():
    from lightning_meta.backbones import add_lora
    from lightning_meta.errors import MetaConfigError

    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc = nn.Linear(8, 8)

    body = Body()
    assert add_lora(body, rank=2) == ["fc"]  # attn.out_proj would be dead: nn.MultiheadAttention reads its weight
    only = nn.Module()
    only.attn = nn.MultiheadAttention(8, 2, batch_first=True)
    with pytest.raises(MetaConfigError, match="output projection of an nn.MultiheadAttention"):
        add_lora(only, rank=2)


def test_film_follows_the_network_dtype_and_a_refused_call_changes_nothing():
    from lightning_meta.backbones import Conv4, add_film
    from lightning_meta.errors import MetaConfigError

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.InstanceNorm2d(4), nn.Conv2d(4, 4, 3)).bfloat16()
    add_film(net)  # the InstanceNorm has no parameters of its own
    assert net[1].modulation.film_scale.dtype == torch.bfloat16
    assert net(torch.randn(2, 1, 8, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    conv = Conv4(1, 4, 16)
    with pytest.raises(MetaConfigError, match="whose output channels are unknown"):
        add_film(conv, target=r"^encoder\.[012]$")  # encoder.2 is a ReLU
    assert not any("modulation" in n for n, _ in conv.named_modules())
    assert add_film(conv, target=r"^encoder\.[01]$") == ["encoder.0", "encoder.1"]  # the retry works


def test_torchvision_backbone_refuses_files_that_are_not_state_dicts(tmp_path):
    from lightning_meta.backbones.wrap import TorchvisionBackbone
    from lightning_meta.errors import MetaConfigError

    net = nn.Linear(2, 2)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    for name, message in (("text.pth", "cannot be read as a PyTorch state dict"), ("tensor.pth", "not a state dict")):
        with pytest.raises(MetaConfigError, match=message):
            TorchvisionBackbone._load(net, str(tmp_path / name))


def test_conv4_strided_downsampling_against_a_hand_written_forward():
    """``downsample="stride"`` (MAML/Reptile's Omniglot network) against F.conv2d/F.batch_norm written out."""
    torch.manual_seed(0)
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    for global_pool in (False, True):
        net = Conv4(1, 8, 28, norm="batch_no_stats", downsample="stride", global_pool=global_pool).double()
        convs = [m for m in net.encoder if isinstance(m, torch.nn.Conv2d)]
        norms = [m for m in net.encoder if isinstance(m, torch.nn.BatchNorm2d)]
        assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.encoder)
        h = x
        sides = []
        for conv, bn in zip(convs, norms, strict=True):
            h = F.conv2d(h, conv.weight, conv.bias, stride=2, padding=1)
            h = F.relu(F.batch_norm(h, None, None, bn.weight, bn.bias, training=True, eps=bn.eps))
            sides.append(h.shape[-1])
        assert sides == [14, 7, 4, 2]  # TensorFlow's SAME sizes: ceil(n / 2)
        want = h.mean(dim=(-2, -1)) if global_pool else h.flatten(1)
        torch.testing.assert_close(net(x), want)
        assert net.out_features == (8 if global_pool else 32) == want.shape[1]
    assert Conv4(3, 32, 84, downsample="stride").out_shape == (32, 6, 6)  # 84 -> 42 -> 21 -> 11 -> 6
    assert Conv4(1, 4, 28, downsample="stride", pool_blocks=2).out_shape == (4, 7, 7)


def test_conv4_strided_options_refuse_bad_values():
    with pytest.raises(MetaConfigError, match="use 'max_pool' or 'stride'"):
        Conv4(downsample="avg")
    with pytest.raises(MetaConfigError, match="needs flatten=True"):
        Conv4(downsample="stride", global_pool=True, flatten=False)
    net = Conv4(1, 4, 28, downsample="stride", global_pool=True)
    with pytest.raises(MetaConfigError, match="built for 28x28 images got images of"):
        net(torch.zeros(2, 1, 40, 40))  # 3x3 maps where 28x28 gives 2x2


def test_conv4_xavier_init_matches_the_glorot_bound():
    torch.manual_seed(0)
    net = Conv4(1, 16, 28, init="xavier", downsample="stride")
    for conv in (m for m in net.encoder if isinstance(m, torch.nn.Conv2d)):
        fan_in, fan_out = conv.in_channels * 9, conv.out_channels * 9
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        w = conv.weight.detach()
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # uniform on [-bound, bound]
        assert abs(w.std().item() - bound / 3**0.5) < 0.15 * bound  # the uniform's standard deviation
        assert torch.count_nonzero(conv.bias) == 0
    with pytest.raises(MetaConfigError, match="use 'default' or 'xavier'"):
        Conv4(init="he")


def test_conv4_leaky_relu_against_a_hand_written_forward():
    """``activation="leaky_relu"`` (MAML++'s network): F.conv2d/F.batch_norm/F.leaky_relu/F.max_pool2d written out."""
    torch.manual_seed(0)
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    for slope in (0.01, 0.2):
        net = Conv4(1, 8, 28, norm="batch_no_stats", activation="leaky_relu", negative_slope=slope).double()
        convs = [m for m in net.encoder if isinstance(m, torch.nn.Conv2d)]
        norms = [m for m in net.encoder if isinstance(m, torch.nn.BatchNorm2d)]
        h = x
        for conv, bn in zip(convs, norms, strict=True):
            h = F.batch_norm(F.conv2d(h, conv.weight, conv.bias, padding=1), None, None, bn.weight, bn.bias,
                             training=True, eps=bn.eps)
            h = F.max_pool2d(torch.where(h > 0, h, slope * h), 2)
        torch.testing.assert_close(net(x), h.flatten(1))
        assert (net(x) < 0).any()  # a ReLU network's max-pooled output would be >= 0
    with pytest.raises(MetaConfigError, match="use 'relu' or 'leaky_relu'"):
        Conv4(activation="gelu")
    with pytest.raises(MetaConfigError, match="only applies to activation='leaky_relu'"):
        Conv4(negative_slope=0.2)
    with pytest.raises(MetaConfigError, match="negative_slope"):
        Conv4(activation="leaky_relu", negative_slope=-1.0)


def test_conv4_head_init_reaches_the_learners_head():
    """``head_init``: the MAML authors' standard-normal (Omniglot) or Glorot-uniform (miniImageNet) head, zero bias."""
    torch.manual_seed(0)
    normal = MAML(Conv4(1, 64, 28, head_init="normal"), ways=20).model.head
    w = normal.weight.detach()
    assert abs(w.mean().item()) < 0.05 and abs(w.std().item() - 1.0) < 0.05  # 1280 draws of N(0, 1)
    assert torch.count_nonzero(normal.bias) == 0
    xavier = ANIL(Conv4(1, 64, 28, head_init="xavier"), ways=20).model.head
    bound = (6.0 / (64 + 20)) ** 0.5
    assert xavier.weight.abs().max() <= bound and xavier.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(xavier.bias) == 0
    default = MAML(Conv4(1, 64, 28), ways=20).model.head  # PyTorch's: uniform(+-1/sqrt(64)), nonzero bias
    assert default.weight.abs().max() <= 1 / 8 and torch.count_nonzero(default.bias) == 20
    film = MAML(FiLMBackbone(Conv4(1, 64, 28, head_init="normal")), ways=20).model.head  # through a wrapper
    assert abs(film.weight.std().item() - 1.0) < 0.05 and torch.count_nonzero(film.bias) == 0
    lora = MAML(LoRABackbone(MLP(4, [64], init="truncated_normal"), rank=2), ways=20).model.head
    assert lora.weight.abs().max() <= 0.02 and torch.count_nonzero(lora.bias) == 0  # MLP's scheme: std 0.01, cut at 2
    with pytest.raises(MetaConfigError, match="use 'default', 'normal' or 'xavier'"):
        Conv4(head_init="zeros")


def test_conv4_batchnorm_without_scale_matches_the_offset_only_forward_and_trains():
    """``norm_scale=False`` (the MAML authors' BatchNorm: offset, no scale) in every inner-loop engine."""
    from lightning_meta.algorithms import MAMLPlusPlus, MetaSGD

    torch.manual_seed(0)
    net = Conv4(1, 6, 28, norm="batch_no_stats", norm_scale=False, norm_eps=1e-3, downsample="stride",
                global_pool=True).double()
    norms = [m for m in net.encoder if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.weight is None and m.bias is not None for m in norms)
    assert not any(k.endswith(f"{i}.weight") for k in net.state_dict() for i in (1, 4, 7, 10))
    with torch.no_grad():
        for m in norms:
            m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(5, 1, 28, 28, dtype=torch.float64)
    h = x
    for conv, bn in zip((m for m in net.encoder if isinstance(m, torch.nn.Conv2d)), norms, strict=True):
        h = F.conv2d(h, conv.weight, conv.bias, stride=2, padding=1)
        mean, var = h.mean(dim=(0, 2, 3), keepdim=True), h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        h = F.relu((h - mean) / torch.sqrt(var + 1e-3) + bn.bias.view(1, -1, 1, 1))  # TensorFlow's epsilon
    torch.testing.assert_close(net(x), h.mean(dim=(-2, -1)))

    batch = _cls_batch(tasks=2, ways=3, shots=1, queries=2, size=28)
    for adapt_filter in ("no_norm", "all"):  # offsets outer-only (the MAML authors') or adapted too
        grads = {}
        for engine in ("loop", "vmap"):  # the fused kernel against vmap's elementary-operation BatchNorm
            torch.manual_seed(1)
            body = Conv4(1, 6, 28, norm="batch_no_stats", norm_scale=False).double()
            model = MAML(body, ways=3, inner_lr=0.5, adapt_filter=adapt_filter, task_batching=engine).double()
            model.meta_loss(batch).backward()
            grads[engine] = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert grads["loop"]["model.backbone.encoder.1.bias"].abs().sum() > 0  # the offsets train
        for n, g in grads["loop"].items():
            torch.testing.assert_close(grads["vmap"][n], g, rtol=1e-9, atol=1e-12, msg=f"{adapt_filter} {n}")
    for model in (MetaSGD(Conv4(1, 6, 28, norm_scale=False), ways=3),
                  MAML(Conv4(1, 6, 28, norm_scale=False), ways=3, bn="frozen")):
        model.meta_loss(batch.to(torch.float32)).backward()  # second order through an adapted offset
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    pp = MAMLPlusPlus(Conv4(1, 6, 28, norm="batch", norm_scale=False), ways=3, inner_steps=2, bn="per_step").double()
    per_step = [m for m in pp.modules() if type(m).__name__ == "PerStepBatchNorm"]
    assert per_step and all(m.weight is None and m.bias.shape == (2, 6) for m in per_step)
    pp.meta_loss(batch).backward()
    assert all(torch.isfinite(m.bias.grad).all() and m.bias.grad.abs().sum() > 0 for m in per_step)
    with pytest.raises(MetaConfigError, match="norm='none' has no BatchNorm"):
        Conv4(norm="none", norm_scale=False)
    with pytest.raises(MetaConfigError, match="norm_eps"):
        Conv4(norm_eps=0.0)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_offset_batchnorm_equals_batchnorm_with_its_scale_fixed_at_one(momentum):
    from lightning_meta.backbones.conv4 import OffsetBatchNorm2d

    torch.manual_seed(0)
    ours, ref = OffsetBatchNorm2d(3, momentum=momentum), nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        ours.bias.uniform_(-1, 1)
        ref.bias.copy_(ours.bias)
    for step in range(3):  # training updates the same running statistics; evaluation uses them
        x = torch.randn(4, 3, 5, 5) * (step + 1)
        torch.testing.assert_close(ours(x), ref(x))
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, k), getattr(ref, k))
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(ours(x), ref(x))
    untracked = OffsetBatchNorm2d(3, track_running_stats=False).eval()  # always batch statistics
    torch.testing.assert_close(untracked(x), F.batch_norm(x, None, None, None, untracked.bias, True))
    from lightning_meta.functional.inner_loop import PerStepBatchNorm

    per_step = PerStepBatchNorm.from_batchnorm(OffsetBatchNorm2d(3, track_running_stats=False).double(), steps=2)
    assert per_step.weight is None and per_step.bias.dtype == torch.float64  # was a float32 copy
    torch.testing.assert_close(per_step(x.double()), F.batch_norm(x.double(), None, None, None, None, True))
