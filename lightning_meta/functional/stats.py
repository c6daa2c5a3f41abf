"""Confidence intervals over per-episode scores, from sufficient statistics (sum, sum of squares, n)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["mean_ci95", "mean_ci95_from_stats"]

Z95 = 1.96


def mean_ci95_from_stats(total: Tensor, total_sq: Tensor, n: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and 95% half-width ``1.96 * s / sqrt(n)`` from ``sum(x)``, ``sum(x^2)`` and ``n``.

    ``s`` is the sample standard deviation (``n - 1`` in the denominator); the half-width is 0 for
    ``n = 1`` and both values are NaN for ``n = 0``.

    Example:
        >>> x = torch.tensor([0.8, 0.9, 1.0])
        >>> m, h = mean_ci95_from_stats(x.sum(), (x**2).sum(), torch.tensor(3.0))
        >>> round(m.item(), 4), round(h.item(), 4)
        (0.9, 0.1132)
        >>> mean_ci95_from_stats(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(0.0))
        (tensor(nan, dtype=torch.float64), tensor(nan, dtype=torch.float64))

    """
    n = n.to(torch.float64)
    total = total.to(torch.float64)
    total_sq = total_sq.to(torch.float64)
    mean = total / n
    var = (total_sq - n * mean * mean) / (n - 1).clamp(min=1.0)
    var = var.clamp(min=0.0)  # guard rounding below zero
    half = Z95 * torch.sqrt(var) / torch.sqrt(n)
    half = torch.where(n > 1, half, torch.zeros_like(half))
    half = torch.where(n == 0, torch.full_like(half, math.nan), half)  # no episodes: no interval either
    return mean, half


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and 95% CI half-width of a 1-D tensor of per-episode scores, as Python floats."""
    values = values.detach().flatten().to(torch.float64)
    if values.numel() == 0:
        return math.nan, math.nan
    m, h = mean_ci95_from_stats(values.sum(), (values**2).sum(), torch.tensor(float(values.numel())))
    return m.item(), h.item()
