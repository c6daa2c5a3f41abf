"""A preemption signal mid-run: flag, save at the batch boundary, requeue, stop; the resumed run is exact."""

from __future__ import annotations

import os
import signal
import stat

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_meta.algorithms import MAML
from lightning_meta.backbones import MLP
from lightning_meta.callbacks import PreemptionCheckpoint
from lightning_meta.datamodules import SinusoidDataModule


class SendSignal(Callback):
    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGUSR1)


def _fit(root, max_steps, callbacks, ckpt_path=None):
    torch.manual_seed(0)
    dm = SinusoidDataModule(meta_batch_size=4, train_episodes=24, val_episodes=4)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.01)
    trainer = L.Trainer(max_steps=max_steps, default_root_dir=root, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=callbacks)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return trainer, model


def test_signal_saves_requeues_stops_and_resumes_exactly(tmp_path):
    marker = tmp_path / "requeued.txt"
    stub = tmp_path / "scontrol"
    stub.write_text(f"#!/bin/sh\necho \"$@\" > {marker}\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    os.environ["SLURM_JOB_ID"] = "4242"
    try:
        cb = PreemptionCheckpoint(requeue_command=f"{stub} requeue {{job_id}}")
        trainer, _ = _fit(tmp_path / "run", 14, [cb, SendSignal(at_step=8)])
    finally:
        os.environ.pop("SLURM_JOB_ID")
    assert trainer.global_step == 9  # the flagged batch completes, then training stops
    assert cb.saved_path and os.path.basename(cb.saved_path) == "hpc_ckpt_1.ckpt" and os.path.exists(cb.saved_path)
    assert marker.read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) is not cb._handler  # handler restored after training
    # the requeued job resumes (ckpt_path="hpc" is what Lightning picks by itself under Slurm)
    _, resumed = _fit(tmp_path / "run", 14, [PreemptionCheckpoint(requeue=False)], ckpt_path="hpc")
    _, full = _fit(tmp_path / "full", 14, [])
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_bad_signal_name():
    with pytest.raises(ValueError, match="SIGNOPE"):
        PreemptionCheckpoint(signal_name="SIGNOPE")


class _Batches(Callback):
    def __init__(self) -> None:
        self.seen: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(round(float(batch.support_x.sum()), 4))


def test_preempted_twice_first_at_an_epoch_end_resumes_exactly(tmp_path):
    """A requeued job preempted again: the first save falls on an epoch's last batch (6-batch epochs).

    Lightning 2.6 resumes that first checkpoint with its epoch counters one behind; before
    `repair_fit_progress` and the sampler-epoch bookkeeping, the second requeue drew the wrong epoch.
    """
    runs = []
    for at_step, ckpt in ((5, None), (8, "hpc"), (None, "hpc")):
        seen = _Batches()
        callbacks = [PreemptionCheckpoint(requeue=False), seen]
        if at_step is not None:
            callbacks.append(SendSignal(at_step=at_step))
        trainer, model = _fit(tmp_path / "run", 14, callbacks, ckpt_path=ckpt)
        runs.append((seen.seen, trainer.global_step))
    assert [steps for _, steps in runs] == [6, 9, 14]  # stopped after step 6 (an epoch end) and step 9
    full_seen = _Batches()
    _, full = _fit(tmp_path / "full", 14, [full_seen])
    assert [b for seen, _ in runs for b in seen] == full_seen.seen
    for a, b in zip(full.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
