"""The default training step of the MAML family takes the meta-gradient task by task.

``MetaLearner._task_split_loss`` differentiates each task's share of the meta-loss on its own and
returns a tensor whose value is the meta-loss and whose gradient is the sum of the shares'
gradients. These tests compare whole training runs against the same runs with one backward over
the whole meta-batch (the path it replaces), and pin where it is not used.
"""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch

from lightning_meta.algorithms import ANIL, IMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile
from lightning_meta.backbones import MLP, Conv4
from lightning_meta.datamodules import SinusoidDataModule
from lightning_meta.episode import Episode, collate_episodes


class _Data(L.LightningDataModule):
    """A fixed list of 3-way 2-shot meta-batches of 8x8 images (float64), 3 tasks each."""

    def __init__(self, batches=3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.batches = []
        for _ in range(batches):
            eps = []
            for _ in range(3):
                sx = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
                qx = torch.randn(9, 1, 8, 8, generator=g, dtype=torch.float64)
                eps.append(Episode(sx, torch.arange(3).repeat(2), qx, torch.arange(3).repeat(3), torch.arange(3)))
            self.batches.append(collate_episodes(eps))

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


def _learner(cls, **kwargs):
    torch.manual_seed(0)
    body = Conv4(1, 4, 8, norm="batch_no_stats" if cls is not MAMLPlusPlus else "batch", pool_blocks=2)
    extra = {"bn": "per_step"} if cls is MAMLPlusPlus else {}
    if cls is MAMLPlusPlus:
        extra["msl_anneal_epochs"] = 0
    model = cls(body, ways=3, inner_lr=0.1, inner_steps=2, **extra, **kwargs).double()
    model.configure_optimizers = lambda: torch.optim.SGD(model.parameters(), lr=0.5)
    return model


def _train(model, split: bool, tmp_path, **trainer_kwargs):
    model._split_tasks_in_training = split
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, **trainer_kwargs)
    calls = []
    original = model._task_split_loss
    model._task_split_loss = lambda batch: calls.append(1) or original(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=_Data(batches=3 * trainer_kwargs.get("accumulate_grad_batches", 1)))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, len(calls), trainer


@pytest.mark.parametrize("cls", [MAML, ANIL, MetaSGD, MAMLPlusPlus])
def test_training_by_task_equals_one_backward_over_the_meta_batch(cls, tmp_path):
    whole, used_whole, _ = _train(_learner(cls), False, tmp_path)
    split, used_split, _ = _train(_learner(cls), True, tmp_path)
    assert used_whole == 0 and used_split == 3
    assert whole.keys() == split.keys()
    for k in whole:  # weights, learned rates, per-step BatchNorm statistics
        torch.testing.assert_close(split[k], whole[k], rtol=1e-10, atol=1e-12, msg=k)


@pytest.mark.parametrize("setting", [{"gradient_clip_val": 0.05}, {"accumulate_grad_batches": 2}])
def test_clipping_and_accumulation_apply_to_the_summed_gradient(setting, tmp_path):
    whole, _, _ = _train(_learner(MAML), False, tmp_path, **setting)
    split, used, _ = _train(_learner(MAML), True, tmp_path, **setting)
    assert used > 0
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-10, atol=1e-12, msg=k)


def test_the_returned_loss_has_the_meta_loss_as_its_value():
    model = _learner(MAML)
    batch = _Data(1).batches[0]
    value = model.meta_loss(batch).detach()
    split = model._task_split_loss(batch)
    torch.testing.assert_close(split.detach(), value, rtol=1e-12, atol=0)
    assert model._train_scores.shape == (3,)


def test_where_the_split_is_not_used():
    batch = _Data(1).batches[0]
    assert _learner(MAML)._splits_tasks(batch)
    assert not _learner(MAML, task_batching="vmap")._splits_tasks(batch)
    assert not _learner(MAML)._splits_tasks(batch.select(0))  # one task: nothing to split
    torch.manual_seed(0)
    assert not Reptile(MLP(1, [4]), task="regression")._splits_tasks(batch)
    assert not IMAML(MLP(1, [4]), task="regression")._splits_tasks(batch)

    class OwnLoss(MAML):  # a user's meta-loss may couple the tasks: left alone
        def meta_loss(self, batch):
            return super().meta_loss(batch)

    assert not OwnLoss(MLP(1, [4]), task="regression")._splits_tasks(batch)


def test_sinusoid_fit_uses_the_split_and_logs_the_true_loss(tmp_path):
    """The logged train/loss is the meta-loss (not the surrogate's value) on the split path too."""
    logged = {}
    for split in (False, True):
        torch.manual_seed(0)
        model = MAML(MLP(1, [8]), task="regression", inner_lr=0.02, inner_steps=1)
        model._split_tasks_in_training = split
        trainer = L.Trainer(max_steps=2, log_every_n_steps=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, SinusoidDataModule(meta_batch_size=4, train_episodes=8))
        logged[split] = float(trainer.callback_metrics["train/loss"])
    assert logged[True] == pytest.approx(logged[False], rel=1e-5)


def test_the_split_holds_less_memory_than_one_backward(load_benchmark):
    """Peak bytes allocated during one meta-gradient (the benchmark's torch.profiler measurement)."""
    peak_allocated = load_benchmark("inner_loop").peak_allocated
    torch.manual_seed(0)
    model = MAML(Conv4(1, 16, 28, norm="batch_no_stats"), ways=5, inner_lr=0.1, inner_steps=3)
    g = torch.Generator().manual_seed(1)
    eps = [Episode(torch.randn(5, 1, 28, 28, generator=g), torch.arange(5), torch.randn(25, 1, 28, 28, generator=g),
                   torch.arange(5).repeat(5), torch.arange(5)) for _ in range(6)]
    batch = collate_episodes(eps)
    peaks = {}
    for name, fn in (("whole", model.meta_loss), ("split", model._task_split_loss)):
        model.zero_grad(set_to_none=True)
        peaks[name] = peak_allocated(lambda fn=fn: fn(batch).backward())
    assert peaks["split"] < 0.5 * peaks["whole"], peaks


def test_the_split_is_used_only_under_strategies_that_backpropagate_the_returned_loss():
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    batch = _Data(1).batches[0]
    model = _learner(MAML)
    plain = SimpleNamespace(precision_plugin=SimpleNamespace())
    for strategy, expected in ((SingleDeviceStrategy(), True), (DDPStrategy(), True), (object(), False)):
        model._trainer = SimpleNamespace(strategy=strategy, **vars(plain))
        assert model._splits_tasks(batch) is expected, type(strategy).__name__
    model._trainer = SimpleNamespace(strategy=SingleDeviceStrategy(), precision_plugin=SimpleNamespace(scaler=object()))
    assert not model._splits_tasks(batch)  # fp16 gradient scaling


def test_a_parameter_gradient_hook_sees_the_meta_gradient_once(tmp_path):
    """register_hook ran on each task's gradient and again on their sum: a halving hook halved twice."""
    grads = {}
    for split in (False, True):
        model = _learner(MAML)
        model._split_tasks_in_training = split
        model.model.head.weight.register_hook(lambda g: g * 0.5)
        batch = _Data(1).batches[0]
        assert not model._splits_tasks(batch)
        model.zero_grad()
        model.training_step(batch, 0).backward()
        grads[split] = model.model.head.weight.grad.clone()
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls", [MAML, ANIL, MetaSGD, MAMLPlusPlus])
def test_task_losses_do_the_setup_once_and_equal_one_meta_loss_call_per_task(cls):
    """MAML's own meta-loss yields its per-task terms with the parameter dicts and BatchNorm policy
    set up once per meta-batch; values, their gradients and the training scores equal one
    ``meta_loss`` call per task (the generic path, which MAML++'s own loss keeps)."""
    from lightning_meta.algorithms.base import MetaLearner

    model = _learner(cls).train()
    batch = _Data(1).batches[0]
    params = [p for p in model.parameters() if p.requires_grad]
    got = {}
    for name, fn in (("setup once", type(model)._task_losses), ("per call", MetaLearner._task_losses)):
        losses, grads, scores = [], [], []
        for loss in fn(model, batch):
            losses.append(loss.detach())
            grads.append(torch.autograd.grad(loss, params, allow_unused=True))
            scores.append(model._train_scores)
        got[name] = losses, grads, scores
    assert len(got["setup once"][0]) == batch.num_tasks
    torch.testing.assert_close(got["setup once"][0], got["per call"][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got["setup once"][2], got["per call"][2], rtol=0, atol=0)
    for a, b in zip(got["setup once"][1], got["per call"][1], strict=True):
        for ga, gb in zip(a, b, strict=True):
            assert (ga is None) == (gb is None)
            if ga is not None:
                torch.testing.assert_close(ga, gb, rtol=0, atol=1e-12)
    hoisted = type(model)._task_losses is not MetaLearner._task_losses and type(model).meta_loss is MAML.meta_loss
    assert hoisted == (cls is not MAMLPlusPlus)


def test_an_error_between_tasks_closes_the_task_losses_at_once(monkeypatch):
    """The per-task terms come from a generator that holds MAML's BatchNorm policy open between
    tasks; an error in a task's gradient closes it right away (not when the traceback is freed)."""
    model = _learner(MAML).train()
    batch = _Data(1).batches[0]
    closed = []
    inner = MAML._task_losses

    def recording(self, b):
        try:
            yield from inner(self, b)
        finally:
            closed.append(True)

    monkeypatch.setattr(MAML, "_task_losses", recording)
    real_grad = torch.autograd.grad

    def failing(outputs, inputs, *args, **kwargs):
        if "create_graph" not in kwargs:  # the outer per-task gradient (inner steps pass create_graph)
            raise RuntimeError("boom")
        return real_grad(outputs, inputs, *args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", failing)
    with pytest.raises(RuntimeError, match="boom") as info:
        model._task_split_loss(batch)
    assert closed == [True] and info.value is not None  # the traceback (and its frames) still held here
