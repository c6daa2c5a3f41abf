"""Differentiable closed-form ridge regression, the base learner of MetaOptNet-RR (Lee et al. 2019)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from lightning_meta.functional.precision import in_float32

__all__ = ["ridge_regression", "ridge_logits"]

RidgeSolver = Literal["auto", "dual", "primal"]


def _check(support: Tensor, targets: Tensor, lam: float) -> None:
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam={lam} must be > 0 (the ridge penalty makes the system invertible)")
    if support.dim() < 2 or targets.dim() != support.dim() or support.shape[:-1] != targets.shape[:-1]:
        raise ValueError(
            f"support {tuple(support.shape)} and targets {tuple(targets.shape)} must be [..., n, d] and [..., n, k] "
            "with the same leading axes and n"
        )


def _dual_coefficients(support: Tensor, targets: Tensor, lam: float) -> Tensor:
    """Solves for the dual coefficients ``A = (X X^T + lam I)^{-1} Y`` ``[..., n, k]`` (``W = X^T A``)."""
    n = support.shape[-2]
    eye = torch.eye(n, dtype=support.dtype, device=support.device)
    gram = support @ support.transpose(-1, -2) + lam * eye  # [..., n, n], symmetric positive definite
    return torch.linalg.solve(gram, targets)


@in_float32
def ridge_regression(support: Tensor, targets: Tensor, lam: float, solver: RidgeSolver = "auto") -> Tensor:
    """Weights of the ridge regression from ``support`` to ``targets``, differentiable in both.

    Solves ``min_W ||X W - Y||^2 + lam ||W||^2``, whose solution has a primal and a dual form::

        W = (X^T X + lam I_d)^{-1} X^T Y   (primal: a d x d system)
          = X^T (X X^T + lam I_n)^{-1} Y   (dual/kernel: an n x n system)

    The dual form is the one MetaOptNet uses: with a few shots ``n`` is far smaller than the
    embedding size ``d`` (25 support examples against 16,000 ResNet-12 features).
    bf16/fp16 inputs are solved in float32 with autocast off (there is no bf16 solver), and the
    weights come back in float32.

    Args:
        support: ``[..., n, d]`` support embeddings ``X`` (leading axes are tasks).
        targets: ``[..., n, k]`` regression targets ``Y`` (one-hot labels for classification).
        lam: ridge penalty ``lam > 0``.
        solver: ``dual``, ``primal``, or ``auto`` (the smaller system: dual when ``n <= d``).

    Returns:
        ``[..., d, k]`` weights ``W``.

    Raises:
        ValueError: for ``lam <= 0``, mismatched shapes or an unknown solver.

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> ridge_regression(x, torch.eye(2), lam=1.0)
        tensor([[0.5000, 0.0000],
                [0.0000, 0.4000]])

    """
    _check(support, targets, lam)
    n, d = support.shape[-2:]
    if solver == "auto":
        solver = "dual" if n <= d else "primal"
    if solver == "dual":
        return support.transpose(-1, -2) @ _dual_coefficients(support, targets, lam)
    if solver == "primal":
        eye = torch.eye(d, dtype=support.dtype, device=support.device)
        xt = support.transpose(-1, -2)
        return torch.linalg.solve(xt @ support + lam * eye, xt @ targets)
    raise ValueError(f"solver={solver!r} is not supported; use 'auto', 'dual' or 'primal'")


@in_float32
def ridge_logits(query: Tensor, support: Tensor, targets: Tensor, lam: float) -> Tensor:
    """Ridge predictions ``Q W`` for ``[..., m, d]`` queries, shape ``[..., m, k]``.

    Uses the dual form without forming ``W``: ``Q X^T (X X^T + lam I)^{-1} Y``, which costs
    ``O(m n d + n^3)`` instead of ``O(n d k + d^3)`` (cheaper whenever ``n < d``).

    Example:
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> ridge_logits(x, x, torch.eye(2), lam=1.0)
        tensor([[0.5000, 0.0000],
                [0.0000, 0.8000]])

    """
    _check(support, targets, lam)
    if query.shape[:-2] != support.shape[:-2] or query.shape[-1] != support.shape[-1]:
        raise ValueError(f"query {tuple(query.shape)} must be [..., m, d] like support {tuple(support.shape)}")
    return (query @ support.transpose(-1, -2)) @ _dual_coefficients(support, targets, lam)
