"""Regression tests for bugs found by the eighth session's review of the optimization-based family.

Each test fails without its fix (checked by reverting the fix).
"""

from __future__ import annotations

import pytest
import torch

from lightning_meta.functional.implicit import conjugate_gradient, implicit_meta_gradient


@pytest.mark.parametrize("scale", [1.0, 1e-5, 1e-8])
def test_implicit_meta_gradient_scales_with_the_query_gradient(scale):
    """``(I + H/lam)^-1 g`` is linear in ``g``: a tiny query gradient must not come back as zero."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 4, generator=g, dtype=torch.float64)
    a = a @ a.T + 0.1 * torch.eye(4, dtype=torch.float64)
    phi = [torch.randn(4, generator=g, dtype=torch.float64)]
    q = torch.randn(4, generator=g, dtype=torch.float64)
    lam = 1.0
    got = implicit_meta_gradient(lambda p: 0.5 * p[0] @ a @ p[0], phi, [q * scale], lam, cg_steps=4)[0]
    want = torch.linalg.solve(torch.eye(4, dtype=torch.float64) + a / lam, q * scale)
    torch.testing.assert_close(got / scale, want / scale, rtol=1e-8, atol=0)


def test_conjugate_gradient_stops_on_negative_curvature():
    """An indefinite operator gives the last finite iterate, not a division by a negative or zero curvature."""
    a = torch.diag(torch.tensor([1.0, -1.0]))
    b = [torch.tensor([1.0, 1.0])]
    x = conjugate_gradient(lambda v: [a @ v[0]], b, steps=5)[0]
    assert torch.isfinite(x).all()
    assert torch.equal(x, torch.zeros(2))  # p = b has p^T A p = 0: stop before the first update


def test_per_step_batchnorm_running_statistics_keep_float32_accuracy_under_autocast():
    """Under bf16 autocast the layer input is bf16; its running statistics must be as exact as BatchNorm2d's."""
    from torch import nn

    from lightning_meta.functional.inner_loop import PerStepBatchNorm

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    x = torch.randn(16, 3, 12, 12) * 3 + 5
    plain = nn.BatchNorm2d(8, momentum=1.0)
    per_step = PerStepBatchNorm.from_batchnorm(nn.BatchNorm2d(8, momentum=1.0), steps=2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        plain(h)
        per_step(h)
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(per_step.running_mean[0], plain.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per_step.running_var[0], plain.running_var, rtol=1e-5, atol=1e-6)


def test_mamlpp_resumes_from_a_checkpoint_with_rates_for_evaluation_steps(tmp_path):
    """Earlier checkpoints kept rates (and their Adam moments) for max(inner_steps, eval_inner_steps) steps."""
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_meta.algorithms import MAMLPlusPlus
    from lightning_meta.backbones import MLP
    from lightning_meta.datamodules import SinusoidDataModule

    def make():
        return MAMLPlusPlus(MLP(1, [4]), task="regression", inner_lr=0.01, inner_steps=3, eval_inner_steps=5,
                            msl_anneal_epochs=1)

    def trainer(steps, callbacks=()):
        return L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, default_root_dir=tmp_path, callbacks=list(callbacks))

    def data():
        return SinusoidDataModule(meta_batch_size=2, train_episodes=8)

    torch.manual_seed(0)
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(2, [ModelCheckpoint(dirpath=tmp_path, filename="new", every_n_train_steps=2)]).fit(model, data())
    # map_location: the fit above runs on a GPU where one is visible
    ckpt = torch.load(tmp_path / "new.ckpt", weights_only=False, map_location="cpu")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    rate_names = [n for n in ckpt["state_dict"] if n.startswith("step_lrs.")]
    assert rate_names
    for n in rate_names:  # the earlier layout: two more rates per tensor, and Adam moments to match
        ckpt["state_dict"][n] = torch.cat([ckpt["state_dict"][n], torch.full((2,), 0.01)])
        state = ckpt["optimizer_states"][0]["state"][names.index(n)]
        for key in ("exp_avg", "exp_avg_sq"):
            state[key] = torch.cat([state[key], torch.zeros(2)])
    torch.save(ckpt, tmp_path / "old.ckpt")
    resumed = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(4).fit(resumed, data(), ckpt_path=tmp_path / "old.ckpt")
    assert resumed.trainer.global_step == 4
    assert all(v.shape == (3,) for v in resumed.step_lrs.values())


def test_mamlpp_subclass_overriding_the_hooks_without_meta_loss_is_refused():
    """Its multi-step loss would train without the overridden hooks while evaluation used them."""
    from lightning_meta.algorithms import MAMLPlusPlus
    from lightning_meta.backbones import MLP
    from lightning_meta.errors import MetaConfigError

    class Shifted(MAMLPlusPlus):
        def predict(self, state, x):
            return super().predict(state, x) + 10.0

    with pytest.raises(MetaConfigError, match="override meta_loss too"):
        Shifted(MLP(1, [4]), task="regression")

    class ShiftedWithLoss(Shifted):
        def meta_loss(self, batch):
            return super(MAMLPlusPlus, self).meta_loss(batch)

    ShiftedWithLoss(MLP(1, [4]), task="regression")  # its own training objective: accepted


@pytest.mark.parametrize("name", ["MetaSGD", "MAMLPlusPlus", "MAML"])
def test_evaluation_adapt_keeps_no_graph_to_learned_inner_rates(name):
    """In evaluation mode ``adapt`` returns weights without autograd history, learned rates included."""
    import lightning_meta.algorithms as algorithms
    from lightning_meta import Episode
    from lightning_meta.backbones import MLP

    torch.manual_seed(0)
    ep = Episode(torch.randn(10, 1), torch.randn(10, 1), torch.randn(10, 1), torch.randn(10, 1),
                 torch.zeros(0, dtype=torch.long))
    model = getattr(algorithms, name)(MLP(1, [16]), task="regression", inner_lr=0.01, inner_steps=2,
                                      eval_inner_steps=4).eval()
    state = model.adapt(ep)
    assert all(v.grad_fn is None and not v.requires_grad for v in state.values()), name
    model.train()
    trained = model.adapt(ep)  # training mode: the rates keep their graph (they are learned)
    assert trained["head.weight"].grad_fn is not None
    if name != "MAML":
        rate = next(iter(model.alphas.values() if name == "MetaSGD" else model.step_lrs.values()))
        grads = torch.autograd.grad(trained["head.weight"].sum(), rate, allow_unused=True)
        assert grads[0] is not None


class _BodyWithUnusedLayer(torch.nn.Module):
    """A small image body holding a layer its forward never calls (e.g. a pre-trained net's old classifier)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, stride=4)
        self.unused = torch.nn.Linear(4, 10)
        self.out_features = 64

    def forward(self, x):
        return torch.tanh(self.conv(x)).flatten(1)


@pytest.mark.parametrize("first_order", [False, True])
def test_an_adapted_weight_the_forward_does_not_use_gets_a_zero_inner_gradient(first_order):
    """The per-task loop (autograd.grad) crashed on it; vmap (torch.func.grad) gave zeros. Both now agree."""
    from episode_fixtures import cls_batch

    from lightning_meta.algorithms import MAML

    grads = {}
    for batching in ("loop", "vmap"):
        torch.manual_seed(0)
        model = MAML(_BodyWithUnusedLayer(), ways=3, inner_lr=0.3, inner_steps=2, first_order=first_order,
                     task_batching=batching).double()
        model.meta_loss(cls_batch()).backward()
        grads[batching] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        model.eval()
        assert model.evaluate(cls_batch())["acc"].shape == (2,)
    assert grads["loop"].keys() == grads["vmap"].keys()
    for n, g in grads["loop"].items():
        torch.testing.assert_close(g, grads["vmap"][n], rtol=1e-10, atol=1e-12)


def _bn_batch(dtype=torch.float32):
    from episode_fixtures import cls_batch

    return cls_batch(tasks=2, ways=3, shots=1, queries=2, size=28, dtype=dtype)


def test_frozen_batchnorm_trains_a_bf16_module():
    """bn='frozen' normalised float32 fast weights with bf16 running statistics, which F.batch_norm refuses."""
    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import Conv4

    torch.manual_seed(0)
    model = MAML(Conv4(1, 8, image_size=28, norm="batch"), ways=3, inner_lr=0.1, bn="frozen").bfloat16()
    loss = model.meta_loss(_bn_batch(torch.bfloat16))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(b.dtype == torch.bfloat16 for b in model.model.buffers() if b.is_floating_point())  # module unchanged


def test_first_order_vmap_through_batchnorm_under_bf16_autocast_matches_float32():
    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import Conv4

    losses = []
    for autocast in (False, True):
        torch.manual_seed(0)
        model = MAML(Conv4(1, 8, image_size=28, norm="batch_no_stats"), ways=3, inner_lr=0.1, first_order=True,
                     task_batching="vmap")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            losses.append(model.meta_loss(_bn_batch()).float())
    torch.testing.assert_close(losses[1], losses[0], rtol=5e-2, atol=5e-2)


def test_vmap_with_a_bf16_convolutional_module_explains_the_failure():
    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import Conv4
    from lightning_meta.errors import MetaConfigError

    torch.manual_seed(0)
    model = MAML(Conv4(1, 8, image_size=28, norm="none"), ways=3, inner_lr=0.1, task_batching="vmap").bfloat16()
    with pytest.raises(MetaConfigError, match="use task_batching='loop'"):  # torch 2.13 (CI's pin) cannot batch it
        model.meta_loss(_bn_batch(torch.bfloat16))


def _regression_episode(y_shape):
    from lightning_meta import Episode

    g = torch.Generator().manual_seed(0)
    return Episode(torch.randn(5, 1, generator=g), torch.randn(*y_shape, generator=g), torch.randn(5, 1, generator=g),
                   torch.randn(*y_shape, generator=g), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("y_shape", [(5,), (5, 2)])
def test_regression_targets_of_another_shape_are_refused(y_shape):
    """A [K] or [K, 2] target broadcast silently against the [K, 1] output before."""
    from lightning_meta import collate_episodes
    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import MLP
    from lightning_meta.errors import MetaConfigError

    model = MAML(MLP(1, [8]), task="regression")
    model.check_batch(collate_episodes([_regression_episode((5, 1))]))  # the right shape passes
    with pytest.raises(MetaConfigError, match=r"\[\.\.\., n, 1\]"):
        model.check_batch(collate_episodes([_regression_episode(y_shape)]))


def test_predict_step_refuses_episodes_of_other_ways_like_validate():
    from episode_fixtures import cls_batch

    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import Conv4
    from lightning_meta.errors import MetaConfigError

    model = MAML(Conv4(1, 8, image_size=16, norm="batch_no_stats"), ways=5, inner_lr=0.1).double().eval()
    with pytest.raises(MetaConfigError, match="3-way"):
        model.predict_step(cls_batch(ways=3), 0)
