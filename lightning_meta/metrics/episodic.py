"""Episodic metrics: mean of a per-episode score with a 95% confidence interval, DDP-safe."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_meta.functional.stats import mean_ci95_from_stats

__all__ = ["EpisodicMean"]


class EpisodicMean(Metric):
    """Mean ± 95% CI of a per-episode score (accuracy for classification, MSE for regression).

    Keeps only ``sum``, ``sum_sq`` and ``n`` (summed across processes), so synchronising under DDP
    costs the same whatever the number of episodes, and the result equals a single-process run
    over the union of the episodes.

    Example:
        >>> m = EpisodicMean()
        >>> m.update(torch.tensor([0.8, 0.9])); m.update(torch.tensor([1.0]))
        >>> {k: round(v.item(), 4) for k, v in m.compute().items()}
        {'mean': 0.9, 'ci95': 0.1132, 'n': 3.0}

    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _apply(self, fn: Callable[[Tensor], Tensor], exclude_state: Sequence[str] = ()) -> EpisodicMean:
        """Moves the states with the module but keeps them float64 whatever dtype the module is cast to.

        ``Trainer(precision="bf16-true")`` (and DeepSpeed bf16/fp16) cast the LightningModule, and
        with it this metric, with ``Module.to(dtype)``; torchmetrics only guards ``.half()``/
        ``.float()``-style casts. A bf16 sum stops growing at 256, so cast states would report the
        wrong mean and episode count.
        """
        keys = tuple(self._defaults)
        this = super()._apply(fn, exclude_state=tuple(exclude_state) + keys)
        device = fn(torch.zeros(1, device=self.device)).device
        for key in keys:
            if key in exclude_state:
                continue
            this._defaults[key] = this._defaults[key].to(device=device, dtype=torch.float64)
            setattr(this, key, getattr(this, key).to(device=device, dtype=torch.float64))
        return this

    def update(self, scores: Tensor) -> None:
        """Adds per-episode scores (any shape; each element is one episode)."""
        scores = scores.detach().flatten().to(torch.float64)
        # out of place: states reset inside an inference_mode block (trainer.validate) are inference
        # tensors, which a later fit, outside inference mode, may not update in place
        self.total = self.total + scores.sum()
        self.total_sq = self.total_sq + (scores**2).sum()
        self.n = self.n + scores.numel()

    def compute(self) -> dict[str, Tensor]:
        """``{"mean", "ci95", "n"}`` where ``ci95`` is the half-width ``1.96 * s / sqrt(n)``."""
        mean, half = mean_ci95_from_stats(self.total, self.total_sq, self.n)
        return {"mean": mean, "ci95": half, "n": self.n}
