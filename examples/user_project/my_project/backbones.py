"""A small convolutional body of our own (any ``nn.Module`` with an ``out_features`` attribute works)."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["SmallConvNet"]


class SmallConvNet(nn.Module):
    """Two conv -> GroupNorm -> ReLU -> max-pool blocks, then flatten: ``[b, C, H, W] -> [b, out_features]``.

    GroupNorm has no running statistics, so the same network works in MAML's functional inner loop
    (per-task fast weights) and in ProtoNet, without choosing a BatchNorm policy.

    Args:
        in_channels: image channels.
        hidden: channels of both blocks.
        image_size: input height and width (a multiple of 4); sets ``out_features``.

    Example:
        >>> import torch
        >>> net = SmallConvNet(in_channels=1, hidden=8, image_size=16)
        >>> net(torch.zeros(3, 1, 16, 16)).shape, net.out_features
        (torch.Size([3, 128]), 128)

    """

    def __init__(self, in_channels: int = 1, hidden: int = 16, image_size: int = 16) -> None:
        super().__init__()
        if image_size < 4 or image_size % 4:
            raise ValueError(f"image_size={image_size} must be a positive multiple of 4 (two 2x2 poolings)")
        groups = 4 if hidden % 4 == 0 else 1
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(hidden, hidden, 3, padding=1), nn.GroupNorm(groups, hidden), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.out_features = hidden * (image_size // 4) ** 2  # read by lightning_meta's task heads

    def forward(self, x: Tensor) -> Tensor:
        """Flattened features of a batch of images."""
        return self.features(x).flatten(1)
