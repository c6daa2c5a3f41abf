"""ANIL, Meta-SGD, Reptile and adapt_filter against independent references."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from episode_fixtures import cls_batch as _cls_batch
from torch import nn

from lightning_meta import Episode, collate_episodes
from lightning_meta.algorithms import ANIL, MAML, MetaSGD, Reptile
from lightning_meta.algorithms.maml import adapt_filter_fn
from lightning_meta.backbones import MLP, Conv4
from lightning_meta.errors import MetaConfigError


class Raw(nn.Module):
    """Identity body: the MAML model is then just its linear head (closed forms apply)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.out_features = d

    def forward(self, x):
        return x


def _reg_batch(tasks=3, n=6, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = []
    for _ in range(tasks):
        w = torch.randn(d, 1, generator=g, dtype=torch.float64)
        sx = torch.randn(n, d, generator=g, dtype=torch.float64)
        qx = torch.randn(n, d, generator=g, dtype=torch.float64)
        eps.append(Episode(sx, sx @ w, qx, qx @ w + 0.1, torch.zeros(0, dtype=torch.long)))
    return collate_episodes(eps)




def _grads(model, batch):
    model.zero_grad()
    model.meta_loss(batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_anil_equals_maml_head_only(first_order, batching):
    torch.manual_seed(0)
    body = Conv4(1, 4, 16, norm="none")
    anil = ANIL(copy.deepcopy(body), ways=3, inner_lr=0.3, inner_steps=3, first_order=first_order,
                task_batching=batching).double()
    maml = MAML(copy.deepcopy(body), ways=3, inner_lr=0.3, inner_steps=3, first_order=first_order,
                adapt_filter="head", task_batching="loop").double()
    maml.load_state_dict(anil.state_dict())
    batch = _cls_batch()
    ga, gm = _grads(anil, batch), _grads(maml, batch)
    assert ga.keys() == gm.keys() and any(k.startswith("model.backbone") for k in ga)
    for k in ga:
        torch.testing.assert_close(ga[k], gm[k], rtol=1e-6, atol=1e-9)


def test_anil_evaluation_matches_maml_head_only():
    torch.manual_seed(1)
    body = Conv4(1, 4, 16, norm="batch_no_stats")
    anil = ANIL(copy.deepcopy(body), ways=3, inner_steps=2, eval_inner_steps=4, eval_report_steps=[1, 4]).double()
    maml = MAML(copy.deepcopy(body), ways=3, inner_steps=2, eval_inner_steps=4, eval_report_steps=[1, 4],
                adapt_filter="head").double()
    maml.load_state_dict(anil.state_dict())
    anil.eval(), maml.eval()
    batch = _cls_batch(seed=3)
    ra, rm = anil.evaluate(batch), maml.evaluate(batch)
    assert ra.keys() == rm.keys() == {"acc", "acc_step1", "acc_step4"}
    for k in ra:
        torch.testing.assert_close(ra[k], rm[k])


@pytest.mark.parametrize("first_order", [False, True])
def test_metasgd_closed_form_linear(first_order):
    d, tasks = 3, 3
    model = MetaSGD(Raw(d), task="regression", inner_lr=0.05, init_range=(0.01, 0.1),
                    first_order=first_order).double()
    batch = _reg_batch(tasks=tasks, d=d)
    model.zero_grad()
    model.meta_loss(batch).backward()
    W = model.model.head.weight.detach().numpy().reshape(-1)
    b = model.model.head.bias.detach().numpy()
    theta = np.concatenate([W, b])  # augmented weights
    alpha = np.concatenate([model.alphas["head__weight"].detach().numpy().reshape(-1),
                            model.alphas["head__bias"].detach().numpy()])
    g_theta, g_alpha = np.zeros_like(theta), np.zeros_like(alpha)
    for i in range(tasks):
        Xs = np.hstack([batch.support_x[i].numpy(), np.ones((6, 1))])
        Xq = np.hstack([batch.query_x[i].numpy(), np.ones((6, 1))])
        ys, yq = batch.support_y[i].numpy().ravel(), batch.query_y[i].numpy().ravel()
        gs = 2 / len(ys) * Xs.T @ (Xs @ theta - ys)
        Hs = 2 / len(ys) * Xs.T @ Xs
        fast = theta - alpha * gs
        gq = 2 / len(yq) * Xq.T @ (Xq @ fast - yq)
        J = np.eye(len(theta)) if first_order else np.eye(len(theta)) - np.diag(alpha) @ Hs
        g_theta += J.T @ gq / tasks
        g_alpha += -gs * gq / tasks
    got_theta = np.concatenate([model.model.head.weight.grad.numpy().reshape(-1), model.model.head.bias.grad.numpy()])
    got_alpha = np.concatenate([model.alphas["head__weight"].grad.numpy().reshape(-1),
                                model.alphas["head__bias"].grad.numpy()])
    np.testing.assert_allclose(got_theta, g_theta, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got_alpha, g_alpha, rtol=1e-9, atol=1e-12)


def test_metasgd_vmap_equals_loop():
    torch.manual_seed(0)
    a = MetaSGD(MLP(1, [8, 8]), task="regression", inner_lr=0.02, inner_steps=2).double()
    b = MetaSGD(MLP(1, [8, 8]), task="regression", inner_lr=0.02, inner_steps=2, task_batching="vmap").double()
    b.load_state_dict(a.state_dict())
    batch = collate_episodes([Episode(torch.randn(5, 1).double(), torch.randn(5, 1).double(),
                                      torch.randn(7, 1).double(), torch.randn(7, 1).double(),
                                      torch.zeros(0, dtype=torch.long)) for _ in range(4)])
    ga, gb = _grads(a, batch), _grads(b, batch)
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_reptile_update_equals_explicit_loop(batching):
    torch.manual_seed(0)
    eps, inner_lr, steps = 0.5, 0.05, 3
    model = Reptile(MLP(2, [6]), task="regression", inner_lr=inner_lr, inner_steps=steps, lr=eps,
                    task_batching=batching).double()
    g = torch.Generator().manual_seed(4)
    batch = collate_episodes([Episode(torch.randn(4, 2, generator=g).double(), torch.randn(4, 1, generator=g).double(),
                                      torch.randn(5, 2, generator=g).double(), torch.randn(5, 1, generator=g).double(),
                                      torch.zeros(0, dtype=torch.long)) for _ in range(3)])
    # reference: plain modules, plain SGD steps on support + query of each task, average, interpolate
    start = copy.deepcopy(model.model)
    finals = []
    for ep in batch.tasks():
        net = copy.deepcopy(start)
        x, y = torch.cat([ep.support_x, ep.query_x]), torch.cat([ep.support_y, ep.query_y])
        for _ in range(steps):
            loss = F.mse_loss(net(x), y)
            grads = torch.autograd.grad(loss, list(net.parameters()))
            with torch.no_grad():
                for p, gr in zip(net.parameters(), grads, strict=True):
                    p -= inner_lr * gr
        finals.append([p.detach() for p in net.parameters()])
    expected = [p0.detach() + eps * (torch.stack([f[i] for f in finals]).mean(0) - p0.detach())
                for i, p0 in enumerate(start.parameters())]
    opt = model.configure_optimizers()
    opt.zero_grad()
    model.meta_loss(batch).backward()
    opt.step()
    for got, want in zip(model.model.parameters(), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-12)


def test_adapt_filter_presets_and_regex():
    f = adapt_filter_fn("head")
    assert f("head.weight") and not f("backbone.encoder.0.weight")
    assert adapt_filter_fn("lora")("blocks.0.lora_factors.A") and not adapt_filter_fn("lora")("blocks.0.weight")
    assert adapt_filter_fn("film")("backbone.film.gamma") and adapt_filter_fn("film")("context")
    assert adapt_filter_fn(r"encoder\.0\.")("backbone.encoder.0.weight")
    with pytest.raises(MetaConfigError, match="adapt_filter"):
        adapt_filter_fn("(")
    with pytest.raises(MetaConfigError, match="selects no parameter"):
        MAML(MLP(1, [4]), task="regression", adapt_filter="nothing_matches_this")


@pytest.mark.parametrize("downsample", ["max_pool", "stride"])
def test_no_norm_preset_keeps_normalisation_weights_in_the_outer_loop(downsample):
    """``no_norm`` equals a hand-written regex over the BatchNorm positions, and so does its meta-gradient."""
    torch.manual_seed(0)
    body = Conv4(1, 4, 16, norm="batch_no_stats", downsample=downsample)
    positions = "1|5|9|13" if downsample == "max_pool" else "1|4|7|10"  # conv, bn, relu(, pool) per block
    regex = rf"^(?!backbone\.encoder\.({positions})\.)"
    a = MAML(copy.deepcopy(body), ways=3, inner_lr=0.3, adapt_filter="no_norm").double()
    b = MAML(copy.deepcopy(body), ways=3, inner_lr=0.3, adapt_filter=regex).double()
    b.load_state_dict(a.state_dict())
    assert a.adapted_names == b.adapted_names and len(a.adapted_names) == 10
    assert not any(isinstance(dict(a.model.named_modules())[n.rsplit(".", 1)[0]], torch.nn.BatchNorm2d)
                   for n in a.adapted_names)
    batch = _cls_batch(tasks=2, size=16)
    ga, gb = _grads(a, batch), _grads(b, batch)
    assert ga.keys() == gb.keys() and "model.backbone.encoder.1.weight" in ga  # BN weights still get outer gradients
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=0, atol=0)
    full = MAML(copy.deepcopy(body), ways=3, inner_lr=0.3).double()
    full.load_state_dict(a.state_dict())
    gf = _grads(full, batch)
    assert max((gf[k] - ga[k]).abs().max() for k in ga) > 1e-6  # adapting BN weights changes the meta-gradient


def test_bias_only_adaptation_leaves_weights():
    torch.manual_seed(0)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.1, adapt_filter="bias").double()
    ep = Episode(torch.randn(5, 1).double(), torch.randn(5, 1).double(), torch.randn(5, 1).double(),
                 torch.randn(5, 1).double(), torch.zeros(0, dtype=torch.long))
    fast = model.adapt(ep)
    params = dict(model.model.named_parameters())
    for name, value in fast.items():
        changed = not torch.equal(value.detach(), params[name].detach())
        assert changed == name.endswith("bias"), name


@pytest.mark.parametrize("cls", [MAML, ANIL])
def test_second_order_vmap_with_batchnorm_equals_loop(cls):
    """Adapted BatchNorm weights (MAML) or a BatchNorm body under a vmapped head (ANIL): vmap == loop."""
    torch.manual_seed(0)
    body = Conv4(1, 4, 16, norm="batch_no_stats")
    loop = cls(copy.deepcopy(body), ways=3, inner_lr=0.3, inner_steps=2).double()
    vm = cls(copy.deepcopy(body), ways=3, inner_lr=0.3, inner_steps=2, task_batching="vmap").double()
    vm.load_state_dict(loop.state_dict())
    batch = _cls_batch()
    gl, gv = _grads(loop, batch), _grads(vm, batch)
    assert gl.keys() == gv.keys() and any(k.endswith("encoder.1.weight") for k in gl)  # the first BatchNorm
    for k in gl:
        torch.testing.assert_close(gv[k], gl[k], rtol=0, atol=1e-6, msg=k)


def test_conjugate_gradient_solves_spd_system():
    from lightning_meta.functional.implicit import conjugate_gradient

    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    x = conjugate_gradient(lambda v: [a @ v[0]], [b], steps=6)[0]
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("lam", [0.5, 2.0])
def test_imaml_gradient_equals_closed_form_implicit_gradient(lam):
    """Linear regression: phi* = argmin L_s + lam/2 |phi - theta|^2 has a closed form, and
    d L_q(phi*) / d theta = lam (H + lam I)^{-1} grad L_q(phi*) exactly."""
    from lightning_meta.algorithms import IMAML

    d, tasks = 3, 2
    model = IMAML(Raw(d), task="regression", inner_lr=0.05, inner_steps=600, lam=lam, cg_steps=d + 1).double()
    batch = _reg_batch(tasks=tasks, d=d, seed=5)
    model.zero_grad()
    model.meta_loss(batch).backward()
    theta = np.concatenate([model.model.head.weight.detach().numpy().reshape(-1),
                            model.model.head.bias.detach().numpy()])
    want = np.zeros_like(theta)
    for i in range(tasks):
        Xs = np.hstack([batch.support_x[i].numpy(), np.ones((6, 1))])
        Xq = np.hstack([batch.query_x[i].numpy(), np.ones((6, 1))])
        ys, yq = batch.support_y[i].numpy().ravel(), batch.query_y[i].numpy().ravel()
        H = 2 / len(ys) * Xs.T @ Xs
        phi = np.linalg.solve(H + lam * np.eye(d + 1), lam * theta + 2 / len(ys) * Xs.T @ ys)
        gq = 2 / len(yq) * Xq.T @ (Xq @ phi - yq)
        want += lam * np.linalg.solve(H + lam * np.eye(d + 1), gq) / tasks
    got = np.concatenate([model.model.head.weight.grad.numpy().reshape(-1), model.model.head.bias.grad.numpy()])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)


def test_imaml_bad_arguments():
    from lightning_meta.algorithms import IMAML

    with pytest.raises(MetaConfigError, match="lam=0"):
        IMAML(MLP(1, [4]), task="regression", lam=0)
    with pytest.raises(MetaConfigError, match="cg_steps=0"):
        IMAML(MLP(1, [4]), task="regression", cg_steps=0)


def _mamlpp_closed_form(model, batch, first_order):
    """Two inner steps, per-tensor per-step rates, MSL weights (w1, w2); numpy closed form."""
    w = model.step_weights()
    theta = np.concatenate([model.model.head.weight.detach().numpy().reshape(-1),
                            model.model.head.bias.detach().numpy()])
    d1 = len(theta)
    lw = model.step_lrs["head__weight"].detach().numpy()
    lb = model.step_lrs["head__bias"].detach().numpy()
    A = [np.diag([lw[s]] * (d1 - 1) + [lb[s]]) for s in range(2)]
    g_theta = np.zeros(d1)
    g_lw, g_lb = np.zeros(2), np.zeros(2)
    tasks = batch.num_tasks
    for i in range(tasks):
        Xs = np.hstack([batch.support_x[i].numpy(), np.ones((6, 1))])
        Xq = np.hstack([batch.query_x[i].numpy(), np.ones((6, 1))])
        ys, yq = batch.support_y[i].numpy().ravel(), batch.query_y[i].numpy().ravel()
        H = 2 / 6 * Xs.T @ Xs
        gs0 = 2 / 6 * Xs.T @ (Xs @ theta - ys)
        t1 = theta - A[0] @ gs0
        gs1 = 2 / 6 * Xs.T @ (Xs @ t1 - ys)
        t2 = t1 - A[1] @ gs1
        gq1, gq2 = 2 / 6 * Xq.T @ (Xq @ t1 - yq), 2 / 6 * Xq.T @ (Xq @ t2 - yq)
        eye = np.eye(d1)
        J1 = eye if first_order else eye - A[0] @ H
        J21 = eye if first_order else eye - A[1] @ H  # d t2 / d t1
        dt2 = w[1] * gq2                      # dL/dt2
        dt1 = w[0] * gq1 + J21.T @ dt2        # dL/dt1 (total)
        g_theta += J1.T @ dt1 / tasks
        # rates: t1 depends on a1 through -gs0, t2 on a2 through -gs1 (gs1's own dependence on a1 is
        # dropped in first order, kept otherwise: it is inside J21 for theta but a1 enters t1 only)
        g_lw[0] += -(gs0[:-1] * dt1[:-1]).sum() / tasks
        g_lb[0] += -(gs0[-1] * dt1[-1]) / tasks
        g_lw[1] += -(gs1[:-1] * dt2[:-1]).sum() / tasks
        g_lb[1] += -(gs1[-1] * dt2[-1]) / tasks
    return g_theta, g_lw, g_lb


@pytest.mark.parametrize("first_order_epochs", [0, 1])
def test_mamlpp_lslr_msl_da_closed_form(first_order_epochs, monkeypatch):
    from lightning_meta.algorithms import MAMLPlusPlus

    monkeypatch.setattr(MAMLPlusPlus, "current_epoch_or_zero", property(lambda self: 0))
    torch.manual_seed(0)
    model = MAMLPlusPlus(Raw(3), task="regression", inner_lr=0.05, inner_steps=2, msl_anneal_epochs=5,
                         first_order_epochs=first_order_epochs).double()
    with torch.no_grad():
        model.step_lrs["head__weight"].copy_(torch.tensor([0.05, 0.08]))
        model.step_lrs["head__bias"].copy_(torch.tensor([0.02, 0.11]))
    assert model.step_weights() == [0.5, 0.5]
    batch = _reg_batch(tasks=2, d=3, seed=7)
    model.zero_grad()
    model.meta_loss(batch).backward()
    g_theta, g_lw, g_lb = _mamlpp_closed_form(model, batch, first_order=first_order_epochs > 0)
    got = np.concatenate([model.model.head.weight.grad.numpy().reshape(-1), model.model.head.bias.grad.numpy()])
    np.testing.assert_allclose(got, g_theta, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.step_lrs["head__weight"].grad.numpy(), g_lw, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.step_lrs["head__bias"].grad.numpy(), g_lb, rtol=1e-9, atol=1e-12)


def test_msl_weights_anneal_and_sum_to_one():
    from lightning_meta.algorithms.mamlpp import msl_weights

    prev_final = 0.0
    for epoch in range(12):
        w = msl_weights(5, epoch, 10)
        assert abs(sum(w) - 1.0) < 1e-12 and min(w) >= 0
        assert w[-1] >= prev_final
        prev_final = w[-1]
    assert msl_weights(5, 0, 10) == [0.2] * 4 + [pytest.approx(0.2)]
    assert msl_weights(5, 10, 10) == [0.0, 0.0, 0.0, 0.0, 1.0]


def test_mamlpp_vmap_equals_loop():
    from lightning_meta.algorithms import MAMLPlusPlus

    torch.manual_seed(0)
    a = MAMLPlusPlus(MLP(1, [8]), task="regression", inner_lr=0.02, inner_steps=3).double()
    b = MAMLPlusPlus(MLP(1, [8]), task="regression", inner_lr=0.02, inner_steps=3, task_batching="vmap").double()
    b.load_state_dict(a.state_dict())
    batch = collate_episodes([Episode(torch.randn(5, 1).double(), torch.randn(5, 1).double(),
                                      torch.randn(7, 1).double(), torch.randn(7, 1).double(),
                                      torch.zeros(0, dtype=torch.long)) for _ in range(3)])
    ga, gb = _grads(a, batch), _grads(b, batch)
    assert ga.keys() == gb.keys() and "step_lrs.head__weight" in ga
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("cls", [MAML, ANIL])
def test_per_task_backward_gives_the_same_step(cls, tmp_path):
    import lightning as L

    from lightning_meta.datamodules import SinusoidDataModule

    def fit(per_task):
        torch.manual_seed(0)
        model = cls(MLP(1, [8]), task="regression", inner_lr=0.02, inner_steps=2, per_task_backward=per_task)
        dm = SinusoidDataModule(meta_batch_size=4, train_episodes=12)
        trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(model, dm)
        return model

    a, b = fit(False), fit(True)
    assert not b.automatic_optimization
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


# ----------------------------------------------------------------- per-step BatchNorm (MAML++ BNRS + BNWB)
def _ref_conv4(P, x, row, stats, mode, momentum=0.1, eps=1e-5):
    """Conv4 written out by hand: conv -> explicit per-step batch norm -> relu -> pool, then the head.

    ``mode``: "train" (batch statistics, update row ``row`` of ``stats``), "running" (normalise with
    the stored row), "batch" (batch statistics, no update).
    """
    h = x
    for i in range(4):
        h = F.conv2d(h, P[f"backbone.encoder.{4 * i}.weight"], P[f"backbone.encoder.{4 * i}.bias"], padding=1)
        gamma = P[f"backbone.encoder.{4 * i + 1}.weight"][row].view(1, -1, 1, 1)
        beta = P[f"backbone.encoder.{4 * i + 1}.bias"][row].view(1, -1, 1, 1)
        mean_s, var_s = stats[i]
        if mode == "running":
            mu, var = mean_s[row].view(1, -1, 1, 1), var_s[row].view(1, -1, 1, 1)
        else:
            n = h.shape[0] * h.shape[2] * h.shape[3]
            mu = h.sum((0, 2, 3), keepdim=True) / n
            var = ((h - mu) ** 2).sum((0, 2, 3), keepdim=True) / n
            if mode == "train":
                mean_s[row] = (1 - momentum) * mean_s[row] + momentum * mu.detach().flatten()
                var_s[row] = (1 - momentum) * var_s[row] + momentum * var.detach().flatten() * n / (n - 1)
        h = (h - mu) / torch.sqrt(var + eps) * gamma + beta
        h = F.max_pool2d(F.relu(h), 2)
    return h.flatten(1) @ P["head.weight"].T + P["head.bias"]


def _per_step_model(cls, policy):
    torch.manual_seed(0)
    kw = {"msl_anneal_epochs": 5} if cls.__name__ == "MAMLPlusPlus" else {}
    model = cls(Conv4(1, 4, 16, norm="batch"), ways=3, inner_lr=0.3, inner_steps=2, eval_inner_steps=3, bn=policy,
                **kw).double()
    with torch.no_grad():  # distinct rows, so that using the wrong step would show
        for name, p in model.named_parameters():
            if p.dim() == 2 and "encoder" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p) if name.endswith("weight") else 0.2 * torch.randn_like(p))
        if hasattr(model, "step_lrs"):
            for v in model.step_lrs.values():
                v.copy_(torch.tensor([0.2, 0.35]))  # evaluation's third step reuses the second
    return model


@pytest.mark.parametrize("policy", ["per_step", "per_step_transductive"])
@pytest.mark.parametrize("algo", ["MAMLPlusPlus", "MAML"])
def test_per_step_batchnorm_against_hand_written_loop(algo, policy, monkeypatch):
    from lightning_meta.algorithms import MAMLPlusPlus

    cls = MAMLPlusPlus if algo == "MAMLPlusPlus" else MAML
    monkeypatch.setattr(MAMLPlusPlus, "current_epoch_or_zero", property(lambda self: 0))
    model = _per_step_model(cls, policy)
    assert not any("encoder.1." in n for n in model.adapted_names)  # per-step BN weights are outer-only
    batch = _cls_batch(tasks=2, seed=11)
    P0 = {k: v.detach().clone().requires_grad_(True) for k, v in model.model.named_parameters()}
    lrs = {k: v.detach().clone().requires_grad_(True) for k, v in getattr(model, "step_lrs", {}).items()}
    stats = [(model.model.backbone.encoder[4 * i + 1].running_mean.clone(),
              model.model.backbone.encoder[4 * i + 1].running_var.clone()) for i in range(4)]
    weights = model.step_weights() if algo == "MAMLPlusPlus" else [0.0, 1.0]
    assert weights[0] > 0 if algo == "MAMLPlusPlus" else True

    def rate(name, s):
        return lrs[name.replace(".", "__")][min(s, 1)] if lrs else 0.3

    total = 0.0
    for i in range(batch.num_tasks):
        fast = {k: v for k, v in P0.items() if k in model.adapted_names}
        outer = {k: v for k, v in P0.items() if k not in model.adapted_names}
        for s in range(2):
            loss = F.cross_entropy(_ref_conv4({**outer, **fast}, batch.support_x[i], s, stats, "train"),
                                   batch.support_y[i])
            g = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {k: v - rate(k, s) * gk for (k, v), gk in zip(fast.items(), g, strict=True)}
            if weights[s] > 0:
                q = _ref_conv4({**outer, **fast}, batch.query_x[i], s, stats, "train")
                total = total + weights[s] * F.cross_entropy(q, batch.query_y[i]) / batch.num_tasks
    want = torch.autograd.grad(total, [*P0.values(), *lrs.values()])

    model.zero_grad()
    got_loss = model.meta_loss(batch)
    got_loss.backward()
    torch.testing.assert_close(got_loss, total.detach(), rtol=1e-10, atol=1e-12)
    got = [p.grad for p in model.model.parameters()] + [p.grad for p in getattr(model, "step_lrs", {}).values()]
    for (name, _), a, b in zip([*P0.items(), *lrs.items()], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10, msg=name)
    for i, (m, v) in enumerate(stats):
        layer = model.model.backbone.encoder[4 * i + 1]
        torch.testing.assert_close(layer.running_mean, m, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, v, rtol=1e-10, atol=1e-12)
    assert not torch.equal(stats[0][0][0], stats[0][0][1])  # the two steps collected different statistics

    # evaluation: 3 inner steps (one more than trained; the third reuses the last BN row), no stat updates
    model.eval()
    ep = batch.task(0)
    before = {k: v.clone() for k, v in model.named_buffers()}
    logits = model.predict(model.adapt(ep), ep.query_x)
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), k
    mode = "running" if policy == "per_step" else "batch"
    fast = {k: v.detach().requires_grad_(True) for k, v in P0.items() if k in model.adapted_names}
    outer = {k: v.detach() for k, v in P0.items() if k not in model.adapted_names}
    for s in range(3):
        loss = F.cross_entropy(_ref_conv4({**outer, **fast}, ep.support_x, min(s, 1), stats, mode), ep.support_y)
        g = torch.autograd.grad(loss, list(fast.values()))
        fast = {k: (v - rate(k, s) * gk).detach().requires_grad_(True)
                for (k, v), gk in zip(fast.items(), g, strict=True)}
    ref = _ref_conv4({**outer, **fast}, ep.query_x, 1, stats, mode)
    torch.testing.assert_close(logits.detach(), ref.detach(), rtol=1e-8, atol=1e-10)


def test_per_step_batchnorm_refusals():
    from lightning_meta.algorithms import IMAML, MAMLPlusPlus

    body = Conv4(1, 4, 16, norm="batch")
    with pytest.raises(MetaConfigError, match="task_batching='loop'"):
        MAMLPlusPlus(copy.deepcopy(body), ways=3, bn="per_step", task_batching="vmap")
    with pytest.raises(MetaConfigError, match="task_batching='loop'"):
        MAML(copy.deepcopy(body), ways=3, bn="per_step_transductive", task_batching="vmap", first_order=True)
    for cls in (ANIL, Reptile, IMAML):
        with pytest.raises(MetaConfigError, match="bn='per_step'"):
            cls(copy.deepcopy(body), ways=3, bn="per_step")
    with pytest.raises(MetaConfigError, match="has none"):
        MAML(MLP(1, [4]), task="regression", bn="per_step")
    with pytest.raises(MetaConfigError, match="bn='batch'"):
        MAML(copy.deepcopy(body), ways=3, bn="batch")  # type: ignore[arg-type]


def test_mamlpp_schedules_longer_than_training_are_refused(tmp_path):
    import lightning as L

    from lightning_meta.algorithms import MAMLPlusPlus
    from lightning_meta.datamodules import SinusoidDataModule

    def fit(max_steps, **kw):
        model = MAMLPlusPlus(MLP(1, [8]), task="regression", inner_lr=0.01, inner_steps=2, **kw)
        dm = SinusoidDataModule(meta_batch_size=2, train_episodes=8)  # 4 steps per epoch
        trainer = L.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(model, dm)
        return model, trainer

    with pytest.raises(MetaConfigError, match="msl_anneal_epochs=3 is longer than the 2 epoch"):
        fit(8, msl_anneal_epochs=3, first_order_epochs=0)
    with pytest.raises(MetaConfigError, match="first_order_epochs=2 covers all 2 epoch"):
        fit(8, msl_anneal_epochs=1, first_order_epochs=2)
    model, trainer = fit(8, msl_anneal_epochs=2, first_order_epochs=1)  # fits: trains
    assert trainer.global_step == 8 and model.training_epochs() == 2


# ------------------------------------------------------- evaluation with more inner steps than training
def _eval_reference(model, ep, steps, lr_of, prox=None, head_only=False):
    """Plain-module SGD on the support set, then the query MSE (a differently written inner loop)."""
    net = copy.deepcopy(model.model)
    theta = {k: p.detach().clone() for k, p in net.named_parameters()}
    for s in range(steps):
        loss = F.mse_loss(net(ep.support_x), ep.support_y)
        if prox is not None:
            loss = loss + prox / 2 * sum(((p - theta[k]) ** 2).sum() for k, p in net.named_parameters())
        names = [k for k, _ in net.named_parameters() if not head_only or k.startswith("head.")]
        params = dict(net.named_parameters())
        grads = torch.autograd.grad(loss, [params[k] for k in names])
        with torch.no_grad():
            for k, g in zip(names, grads, strict=True):
                params[k] -= lr_of(k, s) * g
    with torch.no_grad():
        return F.mse_loss(net(ep.query_x), ep.query_y)


def _eval_case(name):
    from lightning_meta.algorithms import IMAML, MAMLPlusPlus

    torch.manual_seed(0)
    common = {"task": "regression", "inner_steps": 1, "eval_inner_steps": 4}
    if name == "MAML":
        m = MAML(MLP(1, [8]), inner_lr=0.05, **common)
        return m, (lambda k, s: 0.05), {}
    if name == "ANIL":
        m = ANIL(MLP(1, [8]), inner_lr=0.05, **common)
        return m, (lambda k, s: 0.05), {"head_only": True}
    if name == "MetaSGD":
        m = MetaSGD(MLP(1, [8]), inner_lr=0.05, init_range=(0.01, 0.1), **common)
        return m, (lambda k, s: m.alphas[k.replace(".", "__")].detach()), {}
    if name == "MAMLPlusPlus":
        m = MAMLPlusPlus(MLP(1, [8]), inner_lr=0.05, msl_anneal_epochs=0, **common)
        assert all(v.shape == (1,) for v in m.step_lrs.values())  # one learned rate per trained step
        with torch.no_grad():
            for v in m.step_lrs.values():
                v.fill_(0.07)
        # evaluation steps beyond the trained one reuse its (learned) rate
        return m, (lambda k, s: m.step_lrs[k.replace(".", "__")][0].detach()), {}
    if name == "Reptile":
        m = Reptile(MLP(1, [8]), inner_lr=0.05, **common)
        return m, (lambda k, s: 0.05), {}
    m = IMAML(MLP(1, [8]), inner_lr=0.05, lam=0.5, **common)
    return m, (lambda k, s: 0.05), {"prox": 0.5}


@pytest.mark.parametrize("name", ["MAML", "ANIL", "MetaSGD", "MAMLPlusPlus", "Reptile", "IMAML"])
def test_evaluation_with_more_inner_steps_than_training(name):
    model, lr_of, extra = _eval_case(name)
    model = model.double().eval()
    assert model.inner_steps == 1 and model.eval_inner_steps == 4
    batch = _reg_batch(tasks=3, d=1, seed=13)
    got = model.evaluate(batch)["mse"]
    want = torch.stack([_eval_reference(model, ep, 4, lr_of, **extra) for ep in batch.tasks()])
    one = torch.stack([_eval_reference(model, ep, 1, lr_of, **extra) for ep in batch.tasks()])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    assert (got - one).abs().max() > 1e-6  # four steps really ran, not the training one


# ------------------------------------------------------- review fixes (fourth session)
def test_imaml_adapt_solves_the_proximal_problem():
    """``adapt`` + ``predict`` (predict_step, user code) run the same regularised inner loop as training."""
    from lightning_meta.algorithms import IMAML

    torch.manual_seed(0)
    model = IMAML(MLP(1, [8]), task="regression", inner_lr=0.05, inner_steps=3, lam=0.5).double().eval()
    batch = _reg_batch(tasks=2, d=1, seed=5)
    for ep in batch.tasks():
        got = F.mse_loss(model.predict(model.adapt(ep), ep.query_x), ep.query_y)
        want = _eval_reference(model, ep, 3, lambda k, s: 0.05, prox=0.5)
        plain = _eval_reference(model, ep, 3, lambda k, s: 0.05)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        assert (got - plain).abs() > 1e-6  # the proximal term really acts
    torch.testing.assert_close(model.evaluate(batch)["mse"],
                               torch.stack([_eval_reference(model, ep, 3, lambda k, s: 0.05, prox=0.5)
                                            for ep in batch.tasks()]), rtol=1e-9, atol=1e-12)


def test_imaml_refuses_first_order():
    from lightning_meta.algorithms import IMAML

    with pytest.raises(MetaConfigError, match="no first-order variant"):
        IMAML(MLP(1, [8]), task="regression", first_order=True)


def test_mamlpp_loads_a_checkpoint_with_rates_for_evaluation_steps():
    """Earlier checkpoints kept max(inner_steps, eval_inner_steps) rates; the untrained ones are dropped."""
    from lightning_meta.algorithms import MAMLPlusPlus

    model = MAMLPlusPlus(MLP(1, [8]), task="regression", inner_steps=2, eval_inner_steps=5)
    state = model.state_dict()
    old = {k: (torch.cat([v, torch.full((3,), 9.0)]) if k.startswith("step_lrs.") else v) for k, v in state.items()}
    for k in [k for k in old if k.startswith("step_lrs.")]:
        old[k][:2] = torch.tensor([0.3, 0.4])
    model.load_state_dict(old)
    for v in model.step_lrs.values():
        assert v.tolist() == pytest.approx([0.3, 0.4])
    rates = model.inner_lrs()
    assert float(rates(4)["head.weight"].detach()) == pytest.approx(0.4)  # step 5 of evaluation reuses the last rate


class _Underscored(nn.Module):
    """A body whose attribute name ends in '_' ('hidden_.weight' does not survive '.' -> '__' -> '.')."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden_ = nn.Linear(1, 4)
        self.out_features = 4

    def forward(self, x):
        return torch.relu(self.hidden_(x))


def test_per_parameter_rates_follow_names_that_do_not_round_trip():
    from lightning_meta.algorithms import MAMLPlusPlus
    from lightning_meta.algorithms.maml import parameter_keys

    for model in (MetaSGD(_Underscored(), task="regression"),
                  MAMLPlusPlus(_Underscored(), task="regression", inner_steps=2, msl_anneal_epochs=0)):
        rates = model.inner_lrs()
        rates = rates(0) if callable(rates) else rates
        assert set(rates) == set(model.adapted_names)
        model.double().meta_loss(_reg_batch(tasks=2, d=1, seed=1)).backward()
        assert all(p.grad is not None for p in model.parameters())  # every rate and weight is trained
    with pytest.raises(MetaConfigError, match="same per-parameter key"):
        parameter_keys(["a.b", "a__b"])


def test_metasgd_init_range_is_checked():
    for bad in [(0.1, 0.005), (0.005,), (-0.1, 0.1)]:
        with pytest.raises(MetaConfigError, match="init_range"):
            MetaSGD(MLP(1, [8]), task="regression", init_range=bad)


def test_reptile_refuses_weights_it_would_never_train():
    with pytest.raises(MetaConfigError, match="would never train"):
        Reptile(MLP(1, [8]), task="regression", adapt_filter="head")
    body = MLP(1, [8]).requires_grad_(False)  # frozen on purpose: accepted
    model = Reptile(body, task="regression", adapt_filter="head")
    assert model.adapted_names == ["head.weight", "head.bias"]


def test_frozen_batchnorm_without_running_statistics_is_refused_at_construction():
    for cls in (MAML, ANIL):
        with pytest.raises(MetaConfigError, match="bn='transductive'"):
            cls(Conv4(1, 4, 16, norm="batch_no_stats"), ways=3, bn="frozen")


def test_filter_matching_only_outer_only_per_step_norm_weights_is_explained():
    with pytest.raises(MetaConfigError, match="outer loop only"):
        MAML(Conv4(1, 4, 16, norm="batch"), ways=3, bn="per_step", adapt_filter=r"encoder\.1\.")


def test_per_step_conversion_keeps_film_layers():
    """A FiLM layer attached to a BatchNorm (add_film's default target) keeps acting after the conversion."""
    from lightning_meta.backbones import add_film
    from lightning_meta.functional.inner_loop import convert_per_step_norm

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    add_film(net, target=r"^1$")
    with torch.no_grad():
        for p in net[1].modulation.parameters():
            p.normal_()
    x = torch.randn(5, 1, 6, 6)
    before = net(x)
    convert_per_step_norm(net, steps=3)
    assert "1.modulation" in dict(net.named_modules())
    torch.testing.assert_close(net(x), before)
    body = Conv4(1, 4, 16, norm="batch")
    add_film(body)
    model = MAML(body, ways=3, bn="per_step", inner_steps=2, adapt_filter="film")
    assert model.adapted_names and all("modulation" in n for n in model.adapted_names)


def test_no_norm_covers_rmsnorm_and_needs_the_norm_names():
    class Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 4)
            self.norm = nn.RMSNorm(4)
            self.out_features = 4

        def forward(self, x):
            return self.norm(self.lin(x))

    model = MAML(Body(), task="regression", adapt_filter="no_norm")
    assert model.adapted_names == ["backbone.lin.weight", "backbone.lin.bias", "head.weight", "head.bias"]
    with pytest.raises(MetaConfigError, match="pass norm_names"):
        adapt_filter_fn("no_norm")
