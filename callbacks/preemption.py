"""Preemption-safe checkpointing for Slurm (and any scheduler that sends a signal before killing a job)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.connectors.checkpoint_connector import _CheckpointConnector
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = ["PreemptionCheckpoint"]


class PreemptionCheckpoint(Callback):
    """Saves a checkpoint and requeues the job on a preemption signal, without saving in the signal handler.

    The handler only sets a flag. At the next training-batch boundary all ranks agree (any rank
    flagged means stop; with ``accumulate_grad_batches`` the boundary waits for the batch that
    steps the optimizer, so no accumulated gradient is lost), all ranks call
    ``trainer.save_checkpoint`` together (collective-safe for DDP and DeepSpeed), rank 0 runs
    ``requeue_command``, and training stops. The checkpoint is
    written as ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir``, which Lightning loads
    automatically when the requeued job starts under Slurm (or with ``--ckpt_path hpc``); the
    datamodule state inside it continues the identical episode stream.

    Use it with Lightning's own Slurm handling switched off
    (``SLURMEnvironment(auto_requeue=False)``) and ``#SBATCH --signal=SIGUSR1@120`` (no ``B:``).

    Args:
        signal_name: the signal to catch (``SIGUSR1`` by default, as Slurm's ``--signal`` sends).
        requeue: run ``requeue_command`` on rank 0 after saving.
        requeue_command: command template; ``{job_id}`` is replaced by ``$SLURM_JOB_ID``.

    Raises:
        ValueError: for a signal name that is unknown or cannot be caught, or a ``requeue_command``
            with another placeholder than ``{job_id}``.

    Example:
        >>> trainer = L.Trainer(callbacks=[PreemptionCheckpoint()])

    """

    def __init__(self, signal_name: str = "SIGUSR1", requeue: bool = True,
                 requeue_command: str = "scontrol requeue {job_id}") -> None:
        if not isinstance(getattr(signal, str(signal_name), None), signal.Signals) or signal_name in ("SIGKILL",
                                                                                                  "SIGSTOP"):
            raise ValueError(f"signal_name={signal_name!r} is not a signal this process can catch; use e.g. 'SIGUSR1' "
                             "(SIGKILL and SIGSTOP cannot be caught)")
        fix = "the only placeholder is {job_id}, e.g. 'scontrol requeue {job_id}'"
        if requeue:  # the command runs only then
            try:
                words = shlex.split(requeue_command.format(job_id="0"))
            except (KeyError, IndexError, ValueError, AttributeError) as e:
                raise ValueError(f"requeue_command={requeue_command!r} is not a valid template ({type(e).__name__}: "
                                 f"{e}); {fix}") from e
            if not words:
                raise ValueError(f"requeue_command={requeue_command!r} is empty; {fix} (or requeue=False)")
        self.signal_name = signal_name
        self.requeue = requeue
        self.requeue_command = requeue_command
        self.flagged = False
        self.saved_path: str | None = None
        self._previous: Any = None

    def _handler(self, signum: int, frame: Any) -> None:
        self.flagged = True  # nothing else: saving here can deadlock collective checkpoints

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self.flagged = False
        self.saved_path = None
        self._previous = signal.signal(getattr(signal, self.signal_name), self._handler)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if self._previous is not None:
            signal.signal(getattr(signal, self.signal_name), self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,  # noqa: D102
                           batch: Any, batch_idx: int) -> None:
        stop = trainer.strategy.reduce_boolean_decision(torch.tensor(self.flagged), all=False)
        if not stop:
            return
        if _mid_accumulation(trainer):
            # the gradients accumulated so far are not in any checkpoint: save after the batch that steps
            self.flagged = True  # every rank (the decision above is global), so they all save together
            return
        self.flagged = False  # handled: later batches save again only on a new signal
        path = _CheckpointConnector.hpc_save_path(trainer.default_root_dir)
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(f"preemption signal: saved {path} at step {trainer.global_step}; stopping")
        trainer.should_stop = True
        if trainer.global_step < (trainer.min_steps or 0) or trainer.current_epoch + 1 < (trainer.min_epochs or 0):
            rank_zero_warn(f"preemption: Lightning keeps training until min_steps={trainer.min_steps} / "
                           f"min_epochs={trainer.min_epochs} are reached, so this job goes on after the checkpoint")
        if self.requeue and trainer.is_global_zero:
            job = os.environ.get("SLURM_JOB_ID", "")
            if not job and "{job_id}" in self.requeue_command:
                rank_zero_warn("preemption: SLURM_JOB_ID is not set, so the job is not requeued")
            else:
                cmd = shlex.split(self.requeue_command.format(job_id=job))
                try:
                    result = subprocess.run(cmd, capture_output=True, text=True)
                except OSError as e:  # e.g. the command does not exist here
                    rank_zero_warn(f"preemption: `{' '.join(cmd)}` could not run: {e}")
                else:
                    if result.returncode != 0:
                        rank_zero_warn(f"preemption: `{' '.join(cmd)}` failed: {result.stderr.strip()}")


def _mid_accumulation(trainer: L.Trainer) -> bool:
    """Whether the batch that just ended accumulated gradients without an optimizer step.

    Lightning's own test (``accumulate_grad_batches``, the epoch's last batch steps); False when
    the loop does not expose it.
    """
    should_accumulate = getattr(trainer.fit_loop.epoch_loop, "_should_accumulate", None)
    return bool(should_accumulate()) if callable(should_accumulate) else False

