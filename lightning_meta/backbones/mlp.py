"""Multi-layer perceptron body (the 1-40-40-1 sinusoid network of MAML without its last layer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_meta.errors import MetaConfigError, require_positive

__all__ = ["MLP"]


class MLP(nn.Module):
    """Linear -> ReLU blocks; images are flattened first.

    Args:
        in_features: input size (1 for sinusoid, 784 for flattened 28x28 images).
        hidden: sizes of the hidden layers; ``out_features`` is the last one.
        init: ``default`` keeps PyTorch's Linear initialisation; ``truncated_normal`` draws every
            weight from a normal with standard deviation ``init_std`` truncated at two standard
            deviations and sets biases to zero, the scheme of the MAML reference code for the
            sinusoid network. A task head added by a learner (:class:`~lightning_meta.algorithms.MAML`)
            is initialised the same way through :meth:`init_head`.
        init_std: standard deviation of the ``truncated_normal`` scheme.

    Example:
        >>> MLP(1, [40, 40])(torch.zeros(10, 1)).shape
        torch.Size([10, 40])

    """

    def __init__(
        self,
        in_features: int = 1,
        hidden: Sequence[int] = (40, 40),
        init: Literal["default", "truncated_normal"] = "default",
        init_std: float = 0.01,
    ) -> None:
        super().__init__()
        hidden = list(hidden)
        if in_features <= 0 or not hidden or any(h <= 0 for h in hidden):
            raise MetaConfigError(
                f"MLP needs in_features > 0 and a non-empty list of positive hidden sizes, got {in_features}, {hidden}"
            )
        if init not in ("default", "truncated_normal"):
            raise MetaConfigError(f"init={init!r} is not supported; use 'default' or 'truncated_normal'")
        require_positive("init_std", init_std, "the MAML reference code uses 0.01")
        self.init = init
        self.init_std = init_std
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU()]
            prev = h
        self.net = nn.Sequential(*layers)
        self.out_features = prev
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                self.init_head(layer)

    def init_head(self, layer: nn.Linear) -> None:
        """Initialise ``layer`` (one of ours, or a head stacked on top) with this MLP's scheme."""
        if self.init == "truncated_normal":
            with torch.no_grad():
                nn.init.trunc_normal_(layer.weight, std=self.init_std, a=-2 * self.init_std, b=2 * self.init_std)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[b, ...] -> [b, out_features]``."""
        return self.net(torch.flatten(x, 1))
