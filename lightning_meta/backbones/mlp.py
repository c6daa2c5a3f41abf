"""Multi-layer perceptron body (the 1-40-40-1 sinusoid network of MAML without its last layer)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Linear -> ReLU blocks; images are flattened first.

    Args:
        in_features: input size (1 for sinusoid, 784 for flattened 28x28 images).
        hidden: sizes of the hidden layers; ``out_features`` is the last one.

    Example:
        >>> MLP(1, [40, 40])(torch.zeros(10, 1)).shape
        torch.Size([10, 40])
    """

    def __init__(self, in_features: int = 1, hidden: Sequence[int] = (40, 40)) -> None:
        super().__init__()
        hidden = list(hidden)
        if in_features <= 0 or not hidden or any(h <= 0 for h in hidden):
            raise ValueError(
                f"MLP needs in_features > 0 and a non-empty list of positive hidden sizes, got {in_features}, {hidden}"
            )
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.net = nn.Sequential(*layers)
        self.out_features = prev

    def forward(self, x: Tensor) -> Tensor:
        """``[b, ...] -> [b, out_features]``."""
        return self.net(torch.flatten(x, 1))
