"""Callbacks for the fake-``srun`` test (tests/test_slurm.py), loaded by ``lightning-meta fit`` by class path.

tests/test_slurm.py starts ``python -m lightning_meta fit ...`` twice, once per Slurm task, with
the Slurm environment variables of a 2-task job and this folder on ``PYTHONPATH``, and adds
these callbacks with ``--trainer.callbacks+=slurm_script.Record`` (and ``slurm_script.Hold``):

- :class:`Hold` stops each rank at the start of a chosen training step, writes a marker file and
  waits until its :class:`~lightning_meta.callbacks.PreemptionCheckpoint` has seen the signal that
  the test sends to both processes once both markers exist: the signal then arrives mid-run at
  a known step on every rank, whatever the load of the machine.
- :class:`Record` writes what the rank saw (cluster environment, checkpoint resumed from, first
  and last step, final weights) to ``rank<r>.npz`` in its folder when training ends.
"""

from __future__ import annotations

import os
import time

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback

from lightning_meta.callbacks import PreemptionCheckpoint


class Hold(Callback):
    """At the start of training step ``at_step``: write ``rank<r>.held`` in ``folder``, then wait for the signal."""

    def __init__(self, at_step: int, folder: str, timeout: float = 300.0) -> None:
        self.at_step = at_step
        self.folder = folder
        self.timeout = timeout

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step != self.at_step:
            return
        (cb,) = [c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)]
        with open(os.path.join(self.folder, f"rank{trainer.global_rank}.held"), "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + self.timeout
        while not cb.flagged:  # the handler sets it; time.sleep resumes after the handler returns
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {trainer.global_rank}: no preemption signal within {self.timeout} s")
            time.sleep(0.02)


class Record(Callback):
    """Writes ``rank<r>.npz`` in ``folder`` when training ends (see the module docstring)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.first_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        env = trainer.strategy.cluster_environment
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).double().numpy()
        np.savez(
            os.path.join(self.folder, f"rank{trainer.global_rank}.npz"),
            weights=weights, first_step=np.array(self.first_step), last_step=np.array(trainer.global_step),
            env=np.array(type(env).__name__), detected=np.array(SLURMEnvironment.detect()),
            auto_requeue=np.array(bool(getattr(env, "auto_requeue", True))), world=np.array(trainer.world_size),
            ckpt_path=np.array(str(trainer.ckpt_path or "")),
        )
