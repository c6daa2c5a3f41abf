"""Activation checkpointing inside the inner loop: same meta-gradients, refused where it cannot work."""

from __future__ import annotations

import copy

import pytest
import torch
from episode_fixtures import cls_batch as _cls_batch
from torch import nn

from lightning_meta.algorithms import ANIL, MAML, MAMLPlusPlus, MetaSGD
from lightning_meta.backbones import MLP, Conv4
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional import inner_adapt
from lightning_meta.functional.inner_loop import checkpointed


def _grads(model, batch):
    model.zero_grad()
    loss = model.meta_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _pair(cls, norm="batch_no_stats", **kw):
    torch.manual_seed(0)
    body = Conv4(1, 4, 16, norm=norm)
    off = cls(copy.deepcopy(body), ways=3, **kw).double()
    on = cls(copy.deepcopy(body), ways=3, activation_checkpointing=True, **kw).double()
    on.load_state_dict(off.state_dict())
    return off, on


def _assert_same(off, on, batch):
    loss_off, g_off = _grads(off, batch)
    loss_on, g_on = _grads(on, batch)
    assert g_off.keys() == g_on.keys() and len(g_off) > 2
    torch.testing.assert_close(loss_on, loss_off, rtol=0, atol=1e-12)
    for k in g_off:
        assert g_off[k].abs().max() > 0, k  # the comparison is not vacuous
        torch.testing.assert_close(g_on[k], g_off[k], rtol=0, atol=1e-6, msg=k)
        torch.testing.assert_close(g_on[k], g_off[k], rtol=1e-9, atol=1e-12, msg=k)  # in fact equal to rounding


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_checkpointing_gives_the_same_meta_gradient(first_order):
    off, on = _pair(MAML, inner_lr=0.3, inner_steps=3, first_order=first_order)
    _assert_same(off, on, _cls_batch())


@pytest.mark.parametrize("first_order_epochs", [0, 1])
@pytest.mark.parametrize("bn", ["transductive", "per_step"])
def test_mamlpp_checkpointing_gives_the_same_meta_gradient(first_order_epochs, bn):
    """MSL (all steps weighted), LSLR, second order and first order (derivative-order annealing at epoch 0);
    ``per_step`` adds per-step BatchNorm, whose running statistics must not be updated twice."""
    off, on = _pair(MAMLPlusPlus, norm="batch", inner_lr=0.2, inner_steps=3, msl_anneal_epochs=5,
                    first_order_epochs=first_order_epochs, bn=bn)
    assert off.use_first_order() == (first_order_epochs > 0)
    _assert_same(off, on, _cls_batch(seed=1))
    for (name, a), b in zip(off.named_buffers(), on.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-12, msg=name)  # identical per-step running statistics
    if bn == "per_step":
        assert any(not torch.equal(b, torch.zeros_like(b)) for n, b in off.named_buffers() if "running_mean" in n)


@pytest.mark.parametrize("cls", [MetaSGD, ANIL])
def test_relatives_checkpointing_gives_the_same_meta_gradient(cls):
    off, on = _pair(cls, inner_lr=0.2, inner_steps=2)
    _assert_same(off, on, _cls_batch(seed=2))


def test_checkpointed_evaluation_and_adapt_match():
    off, on = _pair(MAML, inner_lr=0.3, inner_steps=2, eval_inner_steps=4)
    batch = _cls_batch(seed=3)
    ep = batch.task(0)
    fa, fb = off.adapt(ep), on.adapt(ep)
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=1e-9, atol=1e-12)
    off.eval(), on.eval()
    ra, rb = off.evaluate(batch), on.evaluate(batch)
    torch.testing.assert_close(rb["acc"], ra["acc"])


def test_inner_adapt_checkpoint_matches_plain_autograd_reference():
    """Second-order gradient w.r.t. the initial weights and a per-parameter rate, against a loop written
    with plain modules and ``torch.autograd.grad(create_graph=True)``."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 2, dtype=torch.float64)
    qx, qy = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in net.named_parameters()}
    rate = {k: torch.full_like(v, 0.1).requires_grad_(True) for k, v in params.items()}
    loss_fn = nn.functional.mse_loss

    fast = inner_adapt(net, params, {}, x, y, loss_fn, rate, steps=3, checkpoint=True)
    out = torch.func.functional_call(net, fast, (qx,))
    got = torch.autograd.grad(loss_fn(out, qy), [*params.values(), *rate.values()])

    w1, b1, w2, b2 = (params[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias"))
    cur = [w1, b1, w2, b2]
    rates = [rate[k] for k in ("0.weight", "0.bias", "2.weight", "2.bias")]
    for _ in range(3):
        pred = torch.tanh(x @ cur[0].T + cur[1]) @ cur[2].T + cur[3]
        g = torch.autograd.grad(((pred - y) ** 2).mean(), cur, create_graph=True)
        cur = [c - r * gi for c, r, gi in zip(cur, rates, g, strict=True)]
    pred = torch.tanh(qx @ cur[0].T + cur[1]) @ cur[2].T + cur[3]
    want = torch.autograd.grad(((pred - qy) ** 2).mean(), [w1, b1, w2, b2, *rates])
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_checkpointed_keeps_only_inputs():
    """The outer graph keeps at most the input of a ``checkpointed`` function, not its activations."""
    w = torch.randn(50, 50, requires_grad=True, dtype=torch.float64)
    packed = []

    def pack(t):
        packed.append(t.numel())
        return t

    def fn(v):
        return (v.tanh() @ v.tanh()).sin().sum()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain = fn(w)
    n_plain = sum(packed)
    packed.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ck = checkpointed(fn, w)
    assert n_plain >= 4 * 50 * 50 and sum(packed) <= 50 * 50  # at most the input; the activations are recomputed
    torch.testing.assert_close(torch.autograd.grad(ck, w)[0], torch.autograd.grad(plain, w)[0])


def test_checkpointing_refusals():
    with pytest.raises(MetaConfigError, match="task_batching='loop'"):
        MAML(MLP(1, [4]), task="regression", task_batching="vmap", activation_checkpointing=True)
    with pytest.raises(MetaConfigError, match="activation_checkpointing"):
        MAMLPlusPlus(MLP(1, [4]), task="regression", task_batching="vmap", activation_checkpointing=True)
