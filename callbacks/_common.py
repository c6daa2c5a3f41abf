"""Helpers shared by the monitoring callbacks: logging, TensorBoard access, gradient contexts."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import lightning as L
import torch
from lightning.fabric.loggers import TensorBoardLogger as _FabricTensorBoardLogger

from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError

__all__ = [
    "eval_grad_context",
    "log_scalars",
    "logging_step",
    "require_meta_learner",
    "tensorboard_writer",
    "val_episodes_per_run",
]


def tensorboard_writer(trainer: L.Trainer) -> Any | None:
    """Return the ``SummaryWriter`` of the first TensorBoard logger of ``trainer``, or ``None``."""
    for logger in trainer.loggers:
        if isinstance(logger, _FabricTensorBoardLogger):
            return logger.experiment
    return None


def logging_step(trainer: L.Trainer) -> int:
    """The step at which Lightning's own logger connector writes records now.

    Lightning logs ``self.log`` values (``train/*``, ``val/*``, ``test/*``) at
    ``fit_loop.epoch_loop._batches_that_stepped``: during ``fit`` that is ``global_step - 1`` in
    ``on_train_batch_end`` and in validation (the counter moves after them), so a record at step
    ``s`` was made after ``s + 1`` optimizer steps; in ``validate``/``test`` it is the number of
    steps the trainer has trained (0 for a fresh one). Using the same value puts a callback's
    scalars at the step of the records they are computed alongside. Falls back to
    ``trainer.global_step`` if a future Lightning drops the counter.
    """
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    step = getattr(loop, "_batches_that_stepped", None)
    return step if isinstance(step, int) and not isinstance(step, bool) else trainer.global_step


def log_scalars(trainer: L.Trainer, metrics: Mapping[str, float], step: int | None = None) -> None:
    """Write scalars to every logger (rank zero) and to ``trainer.callback_metrics`` (this rank).

    Writing to the loggers directly (instead of ``LightningModule.log``) works in every hook,
    including ``on_validation_end``; ``callback_metrics`` makes the values visible to later
    callbacks (``ModelCheckpoint``, ``EarlyStopping``) and to tests. The default ``step`` is
    :func:`logging_step`, the step Lightning gives its own records at that moment.
    """
    if not metrics:
        return
    values = {k: float(v) for k, v in metrics.items()}
    step = logging_step(trainer) if step is None else step
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
    store = trainer.callback_metrics
    for k, v in values.items():
        store[k] = torch.tensor(v)


@contextlib.contextmanager
def eval_grad_context() -> Iterator[None]:
    """Leaves Lightning's ``inference_mode`` and enables autograd (gradient-based adaptation needs it)."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def require_meta_learner(pl_module: L.LightningModule, who: str, needs: tuple[str, ...]) -> None:
    """Refuses modules that lack the :class:`~lightning_meta.algorithms.MetaLearner` hooks ``needs``."""
    missing = [n for n in needs if not hasattr(pl_module, n)]
    if missing:
        raise MetaConfigError(
            f"{who} needs a lightning_meta MetaLearner (with {', '.join(needs)}), but {type(pl_module).__name__} "
            f"has no {', '.join(missing)}; use a lightning_meta.algorithms model or remove {who} from the callbacks"
        )


def clone_tasks(batch: Any, limit: int) -> list[Episode]:
    """Up to ``limit`` tasks of a meta-batch as ordinary CPU tensors (safe to keep after the step).

    The copies are made outside ``torch.inference_mode``: Lightning's ``validate``/``test`` run the
    batch hooks under it, and a copy made there would be an inference tensor, which a later
    re-adaptation (autograd) cannot use (as :meth:`MetaLearner._eval_step` copies its batch).
    """
    if not isinstance(batch, Episode) or limit <= 0:
        return []
    with torch.inference_mode(False):
        return [ep.clone().to("cpu") for ep in batch.tasks()[:limit]]


def val_episodes_per_run(trainer: L.Trainer) -> int | None:
    """Count the validation episodes that global rank zero sees in one (non-sanity) validation run.

    Read from the datamodule (``val_episodes``, ``eval_meta_batch_size``), the world size and
    ``limit_val_batches`` (``fast_dev_run`` sets it); ``None`` when the datamodule does not say.
    """
    dm = trainer.datamodule
    n = getattr(dm, "val_episodes", None)
    bs = getattr(dm, "eval_meta_batch_size", None)
    if not isinstance(n, int) or not isinstance(bs, int) or bs < 1:
        return None
    world = max(1, trainer.world_size)
    mine = len(range(0, n, world))
    batches = math.ceil(mine / bs)
    limit = trainer.limit_val_batches
    if isinstance(limit, int):
        batches = min(batches, limit)
    elif isinstance(limit, float) and limit < 1.0:
        batches = int(batches * limit)
    return min(mine, batches * bs)
