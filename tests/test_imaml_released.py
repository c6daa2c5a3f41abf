"""IMAML's options for the authors' released code, against a reference written the way that code works.

The reference trains an ``nn.Module`` in place with ``torch.optim.SGD``, pulls it back towards the
initialisation with one step on the proximal term, and solves the damped system
``((1 + cg_damping) I + H / (lam + lam_damping)) x = g`` with its own conjugate gradient on
flattened vectors and explicit Hessian-vector products.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lightning_meta.algorithms import IMAML
from lightning_meta.backbones import MLP
from lightning_meta.episode import Episode, collate_episodes
from lightning_meta.errors import MetaConfigError


def _batch(tasks=2, ways=3, shots=2, queries=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = [Episode(torch.randn(ways * shots, 6, generator=g, dtype=torch.float64), torch.arange(ways).repeat(shots),
                   torch.randn(ways * queries, 6, generator=g, dtype=torch.float64), torch.arange(ways).repeat(queries),
                   torch.arange(ways)) for _ in range(tasks)]
    return collate_episodes(eps)


def _model(**kwargs):
    torch.manual_seed(0)
    args = dict(ways=3, inner_lr=0.1, inner_steps=4, lam=2.0, cg_steps=6, cg_tol=0.0, inner_solver="pull_back",
                cg_damping=1.0, lam_damping=10.0)
    return IMAML(MLP(6, [8]), **{**args, **kwargs}).double()


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _reference_meta_gradient(model: IMAML, batch, inner_lr, steps, lam, cg_steps, cg_damping, lam_damping):
    start = copy.deepcopy(model.model)
    w0 = _flat([p.detach() for p in start.parameters()])
    total = torch.zeros_like(w0)
    for ep in batch.tasks():
        net = copy.deepcopy(start)
        opt = torch.optim.SGD(net.parameters(), lr=inner_lr)
        for _ in range(steps):  # plain steps on the support loss
            opt.zero_grad()
            F.cross_entropy(net(ep.support_x), ep.support_y).backward()
            opt.step()
        opt.zero_grad()  # pull back: one step on lam / 2 * ||w - w0||^2
        (0.5 * lam * ((_flat(list(net.parameters())) - w0) ** 2).sum()).backward()
        opt.step()
        params = list(net.parameters())
        g = _flat(torch.autograd.grad(F.cross_entropy(net(ep.query_x), ep.query_y), params))

        def apply(v, net=net, params=params, ep=ep):
            grads = torch.autograd.grad(F.cross_entropy(net(ep.support_x), ep.support_y), params, create_graph=True)
            hv = _flat(torch.autograd.grad((_flat(grads) * v).sum(), params))
            return (1.0 + cg_damping) * v + hv / (lam + lam_damping)

        x = torch.zeros_like(g)  # conjugate gradient from zero, a fixed number of iterations
        r = g.clone()
        p = r.clone()
        for _ in range(cg_steps):
            ap = apply(p)
            alpha = (r @ r) / (p @ ap)
            x = x + alpha * p
            r_new = r - alpha * ap
            p = r_new + (r_new @ r_new) / (r @ r) * p
            r = r_new
        total += x / batch.num_tasks
    return total


def test_released_code_options_equal_a_reference_written_like_it():
    model = _model()
    batch = _batch()
    want = _reference_meta_gradient(model, batch, inner_lr=0.1, steps=4, lam=2.0, cg_steps=6, cg_damping=1.0,
                                    lam_damping=10.0)
    model.zero_grad()
    model.meta_loss(batch).backward()
    got = _flat([p.grad for p in model.model.parameters()])
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    # each option matters: the paper's inner problem or system gives another meta-gradient
    for kwargs in ({"inner_solver": "proximal"}, {"cg_damping": 0.0}, {"lam_damping": 0.0}):
        other = _model(**kwargs)
        other.zero_grad()
        other.meta_loss(batch).backward()
        assert (_flat([p.grad for p in other.model.parameters()]) - want).abs().max() > 1e-4, kwargs


def test_eval_lam_zero_is_plain_gradient_descent_at_evaluation():
    model = _model(eval_lam=0.0, eval_inner_steps=5)
    batch = _batch(tasks=1)
    ep = next(iter(batch.tasks()))
    model.eval()
    fast = model.adapt(ep)
    net = copy.deepcopy(model.model)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(net(ep.support_x), ep.support_y).backward()
        opt.step()
    for (name, p) in net.named_parameters():
        torch.testing.assert_close(fast[name], p.detach(), rtol=1e-12, atol=1e-14, msg=name)
    # training keeps the training inner problem (pull back) ...
    model.train()
    trained = model.adapt(ep, steps=5)
    assert (trained["head.weight"] - fast["head.weight"]).abs().max() > 1e-6
    # ... and so does evaluation when eval_lam is not set
    default = _model(eval_inner_steps=5)
    default.eval()
    for name, value in default.adapt(ep).items():
        torch.testing.assert_close(value, trained[name].detach(), rtol=0, atol=0, msg=name)


def test_report_steps_see_the_weights_after_the_pull_back():
    """The score after the last reported step is the episode's score (the pull-back belongs to the last step)."""
    torch.manual_seed(0)
    model = IMAML(MLP(6, [8]), task="regression", inner_lr=0.1, lam=2.0, inner_solver="pull_back",
                  eval_inner_steps=3, eval_report_steps=[1, 3]).double()
    g = torch.Generator().manual_seed(3)
    batch = collate_episodes([Episode(torch.randn(5, 6, generator=g, dtype=torch.float64),
                                      torch.randn(5, 1, generator=g, dtype=torch.float64),
                                      torch.randn(7, 6, generator=g, dtype=torch.float64),
                                      torch.randn(7, 1, generator=g, dtype=torch.float64),
                                      torch.zeros(0, dtype=torch.long)) for _ in range(3)])
    model.eval()
    scores = model.evaluate(batch)
    torch.testing.assert_close(scores["mse_step3"], scores["mse"], rtol=0, atol=0)
    assert (scores["mse_step1"] - scores["mse"]).abs().max() > 1e-6


def test_defaults_are_the_papers_and_bad_values_are_refused():
    model = IMAML(MLP(6, [8]), ways=3)
    assert (model.inner_solver, model.cg_damping, model.lam_damping, model.eval_lam) == ("proximal", 0.0, 0.0, None)
    for kwargs, match in (({"inner_solver": "sgd"}, "use 'proximal'"), ({"cg_damping": -1.0}, "cg_damping=-1.0"),
                          ({"lam_damping": float("nan")}, "lam_damping=nan"), ({"eval_lam": -0.5}, "eval_lam=-0.5")):
        with pytest.raises(MetaConfigError, match=match):
            IMAML(MLP(6, [8]), ways=3, **kwargs)


def test_the_curvature_warning_names_the_damped_system():
    assert _model()._system_name() == "2 I + H / (lam + 10)"
    assert _model(cg_damping=0.0, lam_damping=0.0)._system_name() == "I + H / lam"
