"""``per_task_backward=True`` under a Trainer behaves as the default one-backward path.

It uses Lightning's manual optimisation, where Lightning steps no scheduler and refuses some
Trainer settings; these tests pin what the learner does in their place.
"""

from __future__ import annotations

import csv
import glob
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_meta.algorithms import MAML
from lightning_meta.backbones import MLP
from lightning_meta.datamodules import SinusoidDataModule
from lightning_meta.errors import MetaConfigError


class Scheduled(MAML):
    """MAML whose ``configure_optimizers`` returns the scheduler configs given to it."""

    def __init__(self, schedulers, **kwargs) -> None:
        super().__init__(MLP(1, [8]), task="regression", inner_lr=0.02, inner_steps=1, **kwargs)
        self._schedulers = schedulers

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.01)
        return [opt], [make(opt) for make in self._schedulers]


def _fit(model: MAML, epochs: int = 2, episodes: int = 8, tmp_path=None, **trainer_kwargs) -> L.Trainer:
    trainer_kwargs.setdefault("logger", False)
    trainer = L.Trainer(max_epochs=epochs, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        **trainer_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, SinusoidDataModule(meta_batch_size=2, train_episodes=episodes))  # 4 batches per epoch
    return trainer


def _lrs(trainer: L.Trainer) -> list[float]:
    return [float(c.scheduler.optimizer.param_groups[0]["lr"]) for c in trainer.lr_scheduler_configs]


def _pair(schedulers, tmp_path, epochs: int = 2) -> tuple[L.Trainer, L.Trainer, MAML, MAML]:
    runs = []
    for per_task in (False, True):
        torch.manual_seed(0)
        model = Scheduled(schedulers, per_task_backward=per_task)
        runs.append((_fit(model, epochs=epochs, tmp_path=tmp_path), model))
    (ta, a), (tb, b) = runs
    return ta, tb, a, b


def test_schedulers_follow_interval_and_frequency_as_in_automatic_optimisation(tmp_path):
    schedulers = [
        lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),  # interval "epoch" (default)
        lambda opt: {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9 ** k),
                     "interval": "step", "frequency": 3},
    ]
    ta, tb, a, b = _pair(schedulers, tmp_path)
    counts_a = [c.scheduler.last_epoch for c in ta.lr_scheduler_configs]
    counts_b = [c.scheduler.last_epoch for c in tb.lr_scheduler_configs]
    # 2 epochs of 4 batches: the epoch scheduler steps twice, the step scheduler every 3rd batch of each epoch
    assert counts_a == [2, 2]
    assert counts_b == counts_a
    assert _lrs(tb) == pytest.approx(_lrs(ta), rel=1e-12)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_reduce_on_plateau_is_refused_before_any_step(interval, tmp_path):
    schedulers = [lambda opt: {"scheduler": torch.optim.lr_scheduler.ReduceLROnPlateau(opt),
                               "monitor": "train/loss", "interval": interval}]
    torch.manual_seed(0)
    model = Scheduled(schedulers, per_task_backward=True)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(MetaConfigError, match="ReduceLROnPlateau.*per_task_backward=False"):
        _fit(model, epochs=1, tmp_path=tmp_path)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(("setting", "match"), [({"gradient_clip_val": 1.0}, "gradient_clip_val=1.0"),
                                                ({"accumulate_grad_batches": 2}, "meta_batch_size")])
def test_clipping_and_accumulation_are_refused_naming_per_task_backward(setting, match, tmp_path):
    with pytest.raises(MetaConfigError, match=match) as err:
        _fit(Scheduled([], per_task_backward=True), epochs=1, tmp_path=tmp_path, **setting)
    assert "per_task_backward" in str(err.value)
    _fit(Scheduled([], per_task_backward=False), epochs=1, tmp_path=tmp_path, **setting)  # the default path takes them


def _logged_losses(per_task: bool, every: int, tmp_path) -> dict[int, float]:
    torch.manual_seed(0)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.02, inner_steps=1, per_task_backward=per_task)
    logger = CSVLogger(tmp_path / f"logs_{per_task}_{every}", name="run")
    _fit(model, epochs=1, episodes=16, tmp_path=tmp_path, logger=logger, log_every_n_steps=every)
    path = glob.glob(str(tmp_path / f"logs_{per_task}_{every}" / "run" / "*" / "metrics.csv"))[0]
    with open(path) as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_logged_train_loss_is_that_of_its_own_step(tmp_path):
    every_step = _logged_losses(False, 1, tmp_path)  # the loss of every batch (same weights in both paths)
    per_task = _logged_losses(True, 2, tmp_path)
    assert per_task, "nothing logged"
    for step, value in per_task.items():
        assert value == pytest.approx(every_step[step], rel=1e-5), (step, value, every_step)
