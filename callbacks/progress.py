"""A tqdm progress bar for meta-learning: episodes per second and validation score ± 95% CI."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError, require_int
from lightning_meta.functional import mean_ci95_from_stats

__all__ = ["MetaProgressBar", "format_score"]


def format_score(name: str, mean: float, ci95: float | None) -> str:
    """Render a score for the bar: accuracy in percent, anything else as a plain number.

    Example:
        >>> format_score("acc", 0.6321, 0.0144)
        '63.2±1.4%'
        >>> format_score("mse", 0.5123, None)
        '0.512'

    """
    if name == "acc":
        return f"{100 * mean:.1f}" + ("" if ci95 is None else f"±{100 * ci95:.1f}") + "%"
    return f"{mean:.3g}" + ("" if ci95 is None else f"±{ci95:.2g}")


def _score_name(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    name = getattr(pl_module, "score_name", None)
    if name:
        return name
    return "mse" if "val/mse" in trainer.callback_metrics else "acc"


class MetaProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, plus training episodes/s and the validation score with its 95% CI.

    The training bar shows ``eps/s`` (episodes per second over the last ``window`` training
    steps, global: local episodes x world size) and the latest ``val_acc`` as ``63.2±1.4%`` (or
    ``val_mse`` for regression), read from the ``val/acc`` and ``val/acc_ci95`` that every
    lightning_meta learner logs. During validation, the validation bar shows the running score
    of the episodes this process has validated so far. Naming it in ``trainer.callbacks``
    replaces Lightning's default bar.

    Args:
        refresh_rate: update the bars every this many batches (0 disables them).
        process_position: bar offset, for several concurrent trainers.
        leave: keep a finished epoch's bar on screen.
        window: training steps averaged for ``eps/s``.

    Example:
        >>> trainer = L.Trainer(callbacks=[MetaProgressBar(window=50)])

        In YAML: ``- class_path: lightning_meta.callbacks.MetaProgressBar``.

    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False,
                 window: int = 20) -> None:
        if not isinstance(window, int) or window < 2:
            raise MetaConfigError(f"window={window!r} must be an integer >= 2 (steps averaged for episodes/s)")
        require_int("refresh_rate", refresh_rate, 0, "batches between bar updates; 0 disables the bars")
        require_int("process_position", process_position, 0, "the bar offset")
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        self.window = window
        self.episodes_per_s: float | None = None
        self._marks: deque[tuple[float, int]] = deque(maxlen=window)

    def _episodes(self, trainer: L.Trainer, batch: Any) -> int:
        n = batch.num_tasks if isinstance(batch, Episode) else (len(batch) if hasattr(batch, "__len__") else 1)
        return n * max(1, trainer.world_size)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._marks.clear()  # the pause between epochs (their end, checkpoints) is not training time
        super().on_train_epoch_start(trainer, *_)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._marks.append((time.perf_counter(), self._episodes(trainer, batch)))
        if len(self._marks) >= 2:
            elapsed = self._marks[-1][0] - self._marks[0][0]
            episodes = sum(n for _, n in list(self._marks)[1:])
            if elapsed > 0:
                self.episodes_per_s = episodes / elapsed
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
        metric = getattr(pl_module, "val_metric", None)
        bar = self._val_progress_bar
        if metric is None or bar is None or bar.disable or not hasattr(metric, "total"):
            return
        if float(metric.n) > 0 and self._should_update(batch_idx + 1, bar.total):
            mean, half = mean_ci95_from_stats(metric.total, metric.total_sq, metric.n)
            name = _score_name(trainer, pl_module)
            bar.set_postfix({name: format_score(name, float(mean), float(half))})

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._marks.clear()  # the validation pause is not training time
        super().on_validation_end(trainer, pl_module)

    @override
    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        if self.episodes_per_s is not None:
            items["eps/s"] = f"{self.episodes_per_s:.1f}"
        name = _score_name(trainer, pl_module)
        metrics = trainer.callback_metrics
        if f"val/{name}" in metrics:
            ci = metrics.get(f"val/{name}_ci95")
            items[f"val_{name}"] = format_score(name, float(metrics[f"val/{name}"]),
                                                None if ci is None else float(ci))
        return items
