"""Writes validation/test results to a JSON file in the run directory."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from lightning_meta.data.shards import atomic_write_bytes
from lightning_meta.errors import require_file_name

__all__ = ["TestResultWriter"]


def checkpoint_global_step(path: Any) -> int | None:
    """Return the ``global_step`` (optimizer steps trained) saved in a Lightning checkpoint file, else ``None``.

    The file is opened with ``torch.load(map_location="cpu", weights_only=True, mmap=True)``: only
    the small ``global_step`` entry is used, and no tensor is read into memory. A folder (a
    DeepSpeed checkpoint), a remote URL or a file that ``weights_only`` refuses gives ``None``.

    Example:
        >>> checkpoint_global_step("no/such/file.ckpt") is None
        True

    """
    import torch

    if not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None
    for mmap in (True, False):  # mmap needs the zip format of torch >= 1.6; retry without for older files
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception:  # anything unreadable is "unknown", never an error at the end of a test
            continue
        step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
        return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
    return None


class TestResultWriter(Callback):
    """Saves the logged ``test/*`` metrics, the episode shape and wall time to ``results.json``.

    The file lands in the logger's run directory (``lightning_logs/version_N``) and is written
    atomically, so report tools never read a half-written file. It is written at the end of
    ``test``, and at the end of a ``validate`` run (with the ``val/*`` metrics).

    ``global_step`` is the number of optimizer steps the *evaluated weights* were trained for:
    the ``global_step`` saved in the evaluated checkpoint whenever there is one
    (``lightning-meta test|validate --ckpt_path``, or ``trainer.test(ckpt_path="best")`` after
    ``fit`` in the same trainer); the trainer's step when the same trainer ran ``fit`` and the
    weights it left are evaluated (``--test_after_fit``), or the step of the checkpoint an earlier
    ``test``/``validate`` of the same trainer loaded into the same module; ``null`` when it is
    unknown (no checkpoint, another module, or a checkpoint that cannot be read).
    ``evaluation_only`` is true when the trainer trained nothing itself (an evaluation-only run),
    ``ckpt_path`` names the checkpoint. ``wall_time_s`` runs from the start of ``fit`` (or, in an
    evaluation-only run, of the evaluation) to the end of the evaluation.

    Args:
        filename: name of the JSON file.

    Example:
        >>> trainer = L.Trainer(callbacks=[TestResultWriter()])

    """

    def __init__(self, filename: str = "results.json") -> None:
        require_file_name("filename", filename, "results.json")
        self.filename = filename
        self._start = time.time()
        self._ckpt_step: int | None = None
        # (id of the module, optimizer steps of the weights it holds) after the last fit or
        # checkpoint-loading evaluation of this trainer: a later `test()` without ckpt_path evaluates those
        self._weights: tuple[int, int | None] | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        self._ckpt_step = None  # runs before Lightning restores a checkpoint (on_load_checkpoint below)
        if stage != "fit" and trainer.global_step == 0:
            self._start = time.time()  # an evaluation-only run: its own time (after a fit: from the fit's start)

    def on_load_checkpoint(  # noqa: D102
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        step = checkpoint.get("global_step")
        self._ckpt_step = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._start = time.time()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._weights = (id(pl_module), trainer.global_step)

    def _trained_steps(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[int | None, bool]:
        """``(optimizer steps of the evaluated weights or None, evaluation_only)``.

        ``evaluation_only`` is true when this trainer trained nothing (its ``global_step`` is 0).
        """
        trained_here = trainer.global_step > 0  # this trainer ran fit (Lightning restores no loop state in test)
        if trainer.ckpt_path:
            # the evaluated weights are the checkpoint's, also after a fit in the same trainer
            # (`test(ckpt_path="best")` or an earlier checkpoint): its step, not the fit's last one.
            # Lightning passes the checkpoint to on_load_checkpoint only when it holds callback states
            # (not for save_weights_only checkpoints): read the step from the file then
            step = self._ckpt_step if self._ckpt_step is not None else checkpoint_global_step(trainer.ckpt_path)
            self._weights = (id(pl_module), step)
            return step, not trained_here
        if self._weights is not None:
            # the weights the last fit or checkpoint evaluation left in this module (an earlier
            # `test(ckpt_path=...)` replaced the fit's); another module's are unknown
            same = self._weights[0] == id(pl_module)
            return (self._weights[1] if same else None), not (trained_here and same)
        if trained_here:  # the weights fit left in memory: the trainer's own count
            return trainer.global_step, False
        return None, True  # weights from elsewhere (a fresh model, load_from_checkpoint): unknown

    def _write(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, prefix: str) -> None:
        # every rank: Trainer.log_dir broadcasts (a collective), so rank 0 alone would wait for the others forever
        folder = trainer.log_dir or trainer.default_root_dir
        if not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(f"{prefix}/")}
        dm = trainer.datamodule
        steps, evaluation_only = self._trained_steps(trainer, pl_module)
        record: dict[str, Any] = {
            "algorithm": type(pl_module).__name__,
            "stage": stage,
            "metrics": metrics,
            "global_step": steps,
            "evaluation_only": evaluation_only,
            "ckpt_path": None if not trainer.ckpt_path else str(trainer.ckpt_path),
            "wall_time_s": round(time.time() - self._start, 2),
        }
        for attr in ("eval_ways", "eval_shots", "eval_queries", f"{prefix}_episodes", "seed"):
            if dm is not None and hasattr(dm, attr):
                record[attr] = getattr(dm, attr)
        atomic_write_bytes(os.path.join(folder, self.filename), json.dumps(record, indent=2).encode())

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._write(trainer, pl_module, "test", "test")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if trainer.state.fn == TrainerFn.VALIDATING:  # `validate` only; validation during fit is in the event files
            self._write(trainer, pl_module, "validate", "val")
