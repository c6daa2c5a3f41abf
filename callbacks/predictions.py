"""Write what ``predict`` returns to a file in the run folder (``lightning-meta predict`` keeps it)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from lightning_meta.data.shards import atomic_write_bytes
from lightning_meta.errors import require_file_name

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Saves the query predictions of every predicted episode as JSON lines, one task per line.

    Each line holds what the learner's ``predict_step`` returns for one task: ``labels`` (episode
    labels, ``0..ways-1``) and ``classes`` (the original class ids) for classification, or
    ``values`` for regression, plus ``batch`` and ``task`` (its position in the predicted
    meta-batches). The file (``predictions.jsonl``, written atomically at the end of ``predict``)
    lands in the logger's run folder, else in ``trainer.default_root_dir``. Under DDP every rank
    writes the episodes it predicted (episode ``i`` is on rank ``i mod world_size``) to
    ``predictions.rank<r>.jsonl``. ``lightning-meta predict`` adds one when no prediction writer
    is configured.

    Args:
        filename: name of the file (a plain name, no folder).

    Example:
        >>> trainer = L.Trainer(callbacks=[PredictionWriter()])
        >>> trainer.predict(model, datamodule=dm)                # doctest: +SKIP

    """

    def __init__(self, filename: str = "predictions.jsonl") -> None:
        require_file_name("filename", filename, "predictions.jsonl")
        super().__init__(write_interval="epoch")
        self.filename = filename
        self.path: str | None = None

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions: Sequence[Any],
                           batch_indices: Sequence[Any]) -> None:
        """Write every task's predictions, one JSON line each (see the class docstring)."""
        folder = trainer.log_dir or trainer.default_root_dir  # every rank: log_dir may broadcast
        name = self.filename
        if trainer.world_size > 1:
            stem, dot, ext = name.rpartition(".")
            name = f"{stem}.rank{trainer.global_rank}.{ext}" if dot else f"{name}.rank{trainer.global_rank}"
        # one dataloader gives a list of step outputs; several give a list per dataloader
        per_loader = predictions if predictions and isinstance(predictions[0], list) else [predictions]
        lines = []
        for loader, outputs in enumerate(per_loader):
            for b, out in enumerate(outputs):
                if not isinstance(out, dict):
                    raise TypeError(f"PredictionWriter needs predict_step to return a dict of tensors, got "
                                    f"{type(out).__name__}")
                tasks = next(iter(out.values())).shape[0]
                for t in range(tasks):
                    row: dict[str, Any] = {"batch": b, "task": t}
                    if len(per_loader) > 1:
                        row["dataloader"] = loader
                    for key, value in out.items():
                        row[key] = value[t].tolist() if isinstance(value, torch.Tensor) else value
                    lines.append(json.dumps(row))
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, name)
        atomic_write_bytes(self.path, ("\n".join(lines) + "\n" if lines else "").encode())
