"""Writes validation/test results to a JSON file in the run directory."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only

from lightning_meta.data.shards import atomic_write_bytes

__all__ = ["TestResultWriter"]


class TestResultWriter(Callback):
    """Saves the logged ``test/*`` metrics, the episode shape and wall time to ``results.json``.

    The file lands in the logger's run directory (``lightning_logs/version_N``) and is written
    atomically, so report tools never read a half-written file.

    Args:
        filename: name of the JSON file.

    Example:
        >>> trainer = L.Trainer(callbacks=[TestResultWriter()])  # doctest: +SKIP

    """

    def __init__(self, filename: str = "results.json") -> None:
        if not filename or os.sep in filename:
            raise ValueError(f"filename={filename!r} must be a plain file name such as 'results.json'")
        self.filename = filename
        self._start = time.time()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        self._start = time.time()

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        dm = trainer.datamodule
        record: dict[str, Any] = {
            "algorithm": type(pl_module).__name__,
            "metrics": metrics,
            "global_step": trainer.global_step,
            "wall_time_s": round(time.time() - self._start, 2),
        }
        for attr in ("eval_ways", "eval_shots", "eval_queries", "test_episodes", "seed"):
            if dm is not None and hasattr(dm, attr):
                record[attr] = getattr(dm, attr)
        folder = trainer.log_dir or trainer.default_root_dir
        atomic_write_bytes(os.path.join(folder, self.filename), json.dumps(record, indent=2).encode())
