"""Reptile with the paper's recipe: inner Adam (beta1 = 0) carried across meta-steps, inner mini-batches, epsilon decay.

The references below train plain ``nn.Module`` copies in place with ``torch.optim.Adam`` (an
independent Adam) and their own mini-batch loop, the way the released Reptile code does: one
optimiser whose moment estimates persist while the weights are reset to the initialisation
before each task.
"""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_meta.algorithms import Reptile
from lightning_meta.algorithms.reptile import _EVAL_STREAM, _content_key, cyclic_minibatches, minibatch_generator
from lightning_meta.backbones import MLP, Conv4
from lightning_meta.episode import Episode, collate_episodes
from lightning_meta.errors import MetaConfigError

WAYS, SHOTS, QUERIES = 3, 2, 2


def _batches(steps: int, tasks: int, seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        eps = []
        for _ in range(tasks):
            sx = torch.randn(WAYS * SHOTS, 16, generator=g, dtype=torch.float64)
            qx = torch.randn(WAYS * QUERIES, 16, generator=g, dtype=torch.float64)
            eps.append(Episode(sx, torch.arange(WAYS).repeat(SHOTS), qx, torch.arange(WAYS).repeat(QUERIES),
                               torch.arange(WAYS)))
        out.append(collate_episodes(eps))
    return out


class _Data(L.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.batches[:1], batch_size=None)


def _reptile(**kwargs) -> Reptile:
    torch.manual_seed(0)
    # no BatchNorm: a bias in front of batch statistics has a zero gradient up to round-off, which
    # Adam's normalisation turns into full-size steps of either sign (nothing to compare there)
    body = MLP(16, [12, 12])
    args = dict(ways=WAYS, inner_optimizer="adam", inner_lr=0.01, inner_steps=3, inner_batch_size=4,
                outer_optimizer="sgd", lr=0.9, lr_final=0.1, minibatch_seed=7)
    return Reptile(body, **{**args, **kwargs}).double()


def _fit(model: Reptile, batches, tmp_path, max_steps=None, ckpt_path=None, **trainer_kwargs):
    trainer = L.Trainer(max_steps=max_steps or len(batches), logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, default_root_dir=tmp_path, **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=_Data(batches), ckpt_path=ckpt_path)
    return trainer


def _reference_batches(n: int, size: int, count: int, generator: torch.Generator) -> list[list[int]]:
    """The released code's mini-batch loop, written as it is there: fill, emit, reshuffle on every pass."""
    out: list[list[int]] = []
    current: list[int] = []
    while True:
        for i in torch.randperm(n, generator=generator).tolist():
            current.append(i)
            if len(current) == size:
                out.append(current)
                current = []
                if len(out) == count:
                    return out


def _adam_state(opt: torch.optim.Adam, net: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, int]:
    states = [opt.state[p] for p in net.parameters()]
    m = torch.cat([s["exp_avg"].flatten() for s in states])
    v = torch.cat([s["exp_avg_sq"].flatten() for s in states])
    return m, v, int(states[0]["step"])


def _set_adam_state(opt: torch.optim.Adam, net: torch.nn.Module, m, v, step: int) -> None:
    offset = 0
    for p in net.parameters():
        n = p.numel()
        opt.state[p] = {"step": torch.tensor(float(step), dtype=torch.float64),
                        "exp_avg": m[offset:offset + n].view_as(p).clone() if m.numel() else torch.zeros_like(p),
                        "exp_avg_sq": v[offset:offset + n].view_as(p).clone()}
        offset += n


def _reference_run(model: Reptile, batches, betas, inner_lr, steps, batch_size, eps0, eps_final, seed):
    """Reptile as the released code runs it, with every task of a step starting from the step's Adam state
    and the step's state the mean of the tasks' final states (the two coincide for one task per step)."""
    net = copy.deepcopy(model.model)
    opt = torch.optim.Adam(net.parameters(), lr=inner_lr, betas=betas, eps=1e-8)
    total = len(batches)
    m = v = None
    t = 0
    for step, batch in enumerate(batches):
        start = [p.detach().clone() for p in net.parameters()]
        finals, ends = [], []
        for i, ep in enumerate(batch.tasks()):
            with torch.no_grad():
                for p, s in zip(net.parameters(), start, strict=True):
                    p.copy_(s)
            if m is not None:
                _set_adam_state(opt, net, m, v, t)
            else:
                opt.state.clear()
            x = torch.cat([ep.support_x, ep.query_x])
            y = torch.cat([ep.support_y, ep.query_y])
            for idx in _reference_batches(len(x), batch_size, steps, minibatch_generator(seed, step, i)):
                opt.zero_grad()
                F.cross_entropy(net(x[idx]), y[idx]).backward()
                opt.step()
            finals.append([p.detach().clone() for p in net.parameters()])
            ends.append(_adam_state(opt, net))
        m = torch.stack([e[0] for e in ends]).mean(0)
        v = torch.stack([e[1] for e in ends]).mean(0)
        t = ends[0][2]
        epsilon = eps0 + (eps_final - eps0) * step / total
        with torch.no_grad():
            for j, (p, s) in enumerate(zip(net.parameters(), start, strict=True)):
                mean = torch.stack([f[j] for f in finals]).mean(0)
                p.copy_(s + epsilon * (mean - s))
    return net, m, v, t


@pytest.mark.parametrize(("tasks", "betas"), [(1, (0.0, 0.999)), (3, (0.9, 0.99))])
def test_training_equals_the_released_codes_loop(tasks, betas, tmp_path):
    batches = _batches(steps=4, tasks=tasks)
    model = _reptile(inner_betas=betas)
    ref, m, v, t = _reference_run(model, batches, betas, inner_lr=0.01, steps=3, batch_size=4, eps0=0.9,
                                  eps_final=0.1, seed=7)
    _fit(model, batches, tmp_path)
    for (name, got), want in zip(model.model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(model.inner_adam_v, v, rtol=1e-10, atol=1e-14)
    if betas[0] > 0:
        torch.testing.assert_close(model.inner_adam_m, m, rtol=1e-10, atol=1e-14)
    else:
        assert model.inner_adam_m.numel() == 0  # beta1 = 0 keeps no first moment
    assert int(model.inner_adam_step) == t == 4 * 3
    # training moved the weights (else the comparison is empty)
    start = _reptile(inner_betas=betas).model
    assert max((a - b).abs().max() for a, b in zip(model.model.parameters(), start.parameters(), strict=True)) > 1e-3


def test_the_inner_optimizer_and_minibatches_change_the_update(tmp_path):
    """Each ingredient matters: dropping it changes the weights (so the test above pins each of them)."""
    batches = _batches(steps=2, tasks=2)
    results = {}
    for key, kwargs in {"paper": {}, "sgd": {"inner_optimizer": "sgd"}, "whole": {"inner_batch_size": None},
                        "constant": {"lr_final": None}}.items():
        model = _reptile(**kwargs)
        _fit(model, batches, tmp_path)
        results[key] = torch.cat([p.detach().flatten() for p in model.model.parameters()])
    for key in ("sgd", "whole", "constant"):
        assert (results[key] - results["paper"]).abs().max() > 1e-6, key


def test_epsilon_decays_linearly_to_lr_final(tmp_path):
    model = _reptile(inner_optimizer="sgd", inner_batch_size=None, lr=1.0, lr_final=0.0)
    seen = []

    class Probe(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    _fit(model, _batches(steps=4, tasks=1), tmp_path, callbacks=[Probe()])
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_evaluation_starts_from_the_carried_state_and_leaves_it(tmp_path):
    batches = _batches(steps=2, tasks=2)
    model = _reptile(eval_inner_batch_size=3, eval_inner_steps=4)
    _fit(model, batches, tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    got = model.evaluate(batches[0])["acc"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing changed
    # reference: torch.optim.Adam on a module copy, from the carried moments, support set only
    expected = []
    for ep in batches[0].tasks():
        net = copy.deepcopy(model.model)
        opt = torch.optim.Adam(net.parameters(), lr=0.01, betas=(0.0, 0.999))
        _set_adam_state(opt, net, model.inner_adam_m, model.inner_adam_v, int(model.inner_adam_step))
        generator = minibatch_generator(7, _EVAL_STREAM, _content_key(ep.support_x, ep.support_y))
        for idx in _reference_batches(len(ep.support_x), 3, 4, generator):
            opt.zero_grad()
            F.cross_entropy(net(ep.support_x[idx]), ep.support_y[idx]).backward()
            opt.step()
        with torch.no_grad():
            expected.append((net(ep.query_x).argmax(-1) == ep.query_y).double().mean())
    torch.testing.assert_close(got, torch.stack(expected).to(got.dtype))


def test_resume_continues_the_carried_state_exactly(tmp_path):
    """Two epochs of two steps straight, or stopped after the first epoch and resumed from its checkpoint."""
    batches = _batches(steps=2, tasks=2)
    straight = _reptile()
    _fit(straight, batches, tmp_path / "a", max_steps=4)

    class StopAfterFirstEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    first = _reptile()
    trainer = _fit(first, batches, tmp_path / "b", max_steps=4, callbacks=[StopAfterFirstEpoch()])
    assert trainer.global_step == 2
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    resumed = _reptile()
    _fit(resumed, batches, tmp_path / "c", max_steps=4, ckpt_path=str(tmp_path / "half.ckpt"))
    assert int(resumed.inner_adam_step) == 4 * 3
    for k, v in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-12, atol=1e-14, msg=k)


def test_minibatches_follow_the_released_codes_order():
    for n, size, count in [(6, 4, 5), (5, 25, 3), (8, 8, 2), (3, 1, 7)]:
        ours = cyclic_minibatches(n, size, count, minibatch_generator(1, 2, 3))
        ref = _reference_batches(n, size, count, minibatch_generator(1, 2, 3))
        assert [b.tolist() for b in ours] == ref
    # every pass visits each example once; a batch may span two passes
    flat = torch.cat(cyclic_minibatches(5, 3, 5, minibatch_generator(0, 0, 0)))
    assert sorted(flat.tolist()) == sorted(list(range(5)) * 3)
    # the order depends on the seed, the step and the task
    orders = {tuple(cyclic_minibatches(10, 10, 1, minibatch_generator(*key))[0].tolist())
              for key in [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1)]}
    assert len(orders) == 4


def test_bad_arguments_are_refused_with_the_fix():
    body = Conv4(1, 4, 8, norm="batch_no_stats", pool_blocks=2)
    cases = [
        ({"inner_optimizer": "rmsprop"}, "use 'sgd' or 'adam'"),
        ({"inner_optimizer": "adam", "inner_betas": (0.9,)}, "two numbers"),
        ({"inner_optimizer": "adam", "inner_betas": (0.0, 1.0)}, "must be in [0, 1)"),
        ({"inner_optimizer": "adam", "inner_eps": 0.0}, "inner_eps=0.0 must be > 0"),
        ({"inner_batch_size": 0}, "inner_batch_size=0 must be >= 1"),
        ({"eval_inner_batch_size": 2.5}, "must be an integer"),
        ({"lr_final": -0.1}, "lr_final=-0.1"),
        ({"inner_optimizer": "adam", "task_batching": "vmap"}, "use task_batching='loop'"),
        ({"inner_batch_size": 4, "task_batching": "vmap"}, "use task_batching='loop'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(MetaConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            Reptile(body, ways=WAYS, **kwargs)


def test_lr_final_needs_a_known_run_length(tmp_path):
    model = _reptile()
    trainer = L.Trainer(max_steps=-1, max_epochs=-1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)

    class Endless(torch.utils.data.IterableDataset):
        def __iter__(self):
            while True:
                yield _batches(1, 1)[0]

    with pytest.raises(MetaConfigError, match="set trainer.max_steps"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(Endless(), batch_size=None))


def test_plain_reptile_is_unchanged():
    """Without the new options no Adam state is kept, so older checkpoints keep loading."""
    model = Reptile(Conv4(1, 4, 8, norm="batch_no_stats", pool_blocks=2), ways=WAYS)
    assert not any(k.startswith("inner_adam") for k in model.state_dict())


def test_gradient_accumulation_is_refused_with_the_carried_state(tmp_path):
    for kwargs in ({}, {"inner_optimizer": "sgd"}):  # the inner Adam, or mini-batches alone
        with pytest.raises(MetaConfigError, match="use a larger meta_batch_size instead of accumulation"):
            _fit(_reptile(**kwargs), _batches(steps=2, tasks=1), tmp_path, accumulate_grad_batches=2)
    _fit(_reptile(inner_optimizer="sgd", inner_batch_size=None), _batches(steps=2, tasks=1), tmp_path,
         accumulate_grad_batches=2)  # plain Reptile: accumulation is a larger meta-batch


def test_moment_buffers_stay_at_least_float32():
    model = _reptile()
    for cast, want in ((lambda m: m.to(torch.bfloat16), torch.float32), (lambda m: m.half(), torch.float32),
                       (lambda m: m.double(), torch.float64)):
        cast(model)
        assert model.inner_adam_v.dtype == want and model.inner_adam_step.dtype == torch.int64
    assert next(model.model.parameters()).dtype == torch.float64  # the rest of the module follows the cast


class _WithUnused(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = MLP(16, [12])
        self.aux = torch.nn.Linear(12, 2)  # adapted but never used by forward
        self.out_features = self.body.out_features

    def forward(self, x):
        return self.body(x)


def test_an_adapted_weight_the_loss_does_not_use_gets_a_zero_step(tmp_path):
    torch.manual_seed(0)
    model = Reptile(_WithUnused(), ways=WAYS, inner_optimizer="adam", inner_lr=0.01, inner_steps=2,
                    inner_batch_size=4, lr=0.5).double()
    before = model.model.backbone.aux.weight.detach().clone()
    _fit(model, _batches(steps=2, tasks=2), tmp_path)
    torch.testing.assert_close(model.model.backbone.aux.weight.detach(), before, rtol=0, atol=0)


def test_adapt_in_training_mode_keeps_the_first_order_identity_path():
    model = _reptile()
    model.train()
    ep = next(iter(_batches(steps=1, tasks=1)[0].tasks()))
    fast = model.adapt(ep)
    weight = model.model.head.weight
    assert fast["head.weight"].requires_grad
    (grad,) = torch.autograd.grad(fast["head.weight"].sum(), [weight])
    torch.testing.assert_close(grad, torch.ones_like(weight))
