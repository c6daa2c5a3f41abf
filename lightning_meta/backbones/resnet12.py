"""The ResNet-12 embedding network of TADAM (Oreshkin et al. 2018) and MetaOptNet (Lee et al. 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from lightning_meta.backbones._shapes import flatten_checked
from lightning_meta.errors import MetaConfigError, require_non_negative

__all__ = ["ResNet12", "ResNet12Block"]

Norm = Literal["batch", "batch_no_stats", "none"]


def _norm(channels: int, norm: Norm) -> nn.Module:
    if norm == "none":
        return nn.Identity()
    return nn.BatchNorm2d(channels, track_running_stats=(norm == "batch"))


class ResNet12Block(nn.Module):
    """One residual block of ResNet-12.

    Three 3x3 conv -> norm (leaky ReLU after the first two), plus a 1x1 conv -> norm shortcut,
    added, leaky ReLU, then a 2x2 max-pool (halves the side, rounding down).

    Args:
        in_channels: input channels.
        out_channels: output channels.
        norm: see :class:`ResNet12`.
        negative_slope: slope of the leaky ReLU.

    Example:
        >>> import torch
        >>> ResNet12Block(3, 8)(torch.zeros(2, 3, 21, 21)).shape
        torch.Size([2, 8, 10, 10])

    """

    def __init__(self, in_channels: int, out_channels: int, norm: Norm = "batch", negative_slope: float = 0.1) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)
        self.bn1 = _norm(out_channels, norm)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.bn2 = _norm(out_channels, norm)
        self.conv3 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias)
        self.bn3 = _norm(out_channels, norm)
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=bias), _norm(out_channels, norm))
        self.act = nn.LeakyReLU(negative_slope)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        """``[b, in, H, W] -> [b, out, H // 2, W // 2]``."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.pool(self.act(out + self.shortcut(x)))


class ResNet12(nn.Module):
    """Four residual blocks (:class:`ResNet12Block`) of widths ``channels``; DropBlock is omitted.

    With the MetaOptNet widths ``(64, 160, 320, 640)`` an 84x84 image gives ``640 x 5 x 5`` feature
    maps (16,000 features when flattened, as MetaOptNet uses them) and a 28x28 image ``640 x 1 x 1``;
    ``global_pool=True`` averages the maps instead (TADAM), giving ``channels[-1]`` features.

    Args:
        in_channels: input channels (1 for glyphs/Omniglot, 3 for miniImageNet).
        channels: the four block widths.
        image_size: input height/width, used to compute ``out_features`` and ``out_shape``.
        norm: ``batch`` (BatchNorm with running statistics), ``batch_no_stats`` (always batch
            statistics) or ``none`` (convolutions get biases instead).
        negative_slope: slope of the leaky ReLUs (0.1 in MetaOptNet).
        global_pool: average the final maps over space instead of flattening them.
        flatten: return ``[b, out_features]`` (default) or the maps ``[b, *out_shape]``
            (ignored with ``global_pool``).

    Example:
        >>> import torch
        >>> net = ResNet12(in_channels=1, channels=(8, 16, 16, 32), image_size=28)
        >>> net(torch.zeros(2, 1, 28, 28)).shape, net.out_features, net.out_shape
        (torch.Size([2, 32]), 32, (32, 1, 1))

    """

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (64, 160, 320, 640),
        image_size: int = 84,
        norm: Norm = "batch",
        negative_slope: float = 0.1,
        global_pool: bool = False,
        flatten: bool = True,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4 or min(channels) < 1 or in_channels < 1:
            raise MetaConfigError(
                f"ResNet12 needs in_channels >= 1 and four positive block widths, got in_channels={in_channels}, "
                f"channels={channels}"
            )
        if image_size < 16:
            raise MetaConfigError(
                f"ResNet12 halves the image four times; image_size={image_size} is below the minimum 16"
            )
        if norm not in ("batch", "batch_no_stats", "none"):
            raise MetaConfigError(f"norm={norm!r} is not supported; use 'batch', 'batch_no_stats' or 'none'")
        require_non_negative("negative_slope", negative_slope, "the leaky ReLUs' slope; MetaOptNet uses 0.1")
        blocks = []
        prev = in_channels
        for c in channels:
            blocks.append(ResNet12Block(prev, c, norm, negative_slope))
            prev = c
        self.blocks = nn.Sequential(*blocks)
        side = image_size
        for _ in range(4):
            side //= 2
        self.global_pool = global_pool
        self.flatten = flatten or global_pool
        self.out_shape = (channels[-1], 1, 1) if global_pool else (channels[-1], side, side)
        self.out_features = channels[-1] * (1 if global_pool else side * side)
        self.in_channels = in_channels
        self.image_size = image_size
        self._reset_parameters(negative_slope)

    def _reset_parameters(self, negative_slope: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=negative_slope, mode="fan_out", nonlinearity="leaky_relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[b, C, H, W] -> [b, out_features]`` (or ``[b, *out_shape]`` when ``flatten=False``)."""
        out = self.blocks(x)
        if self.global_pool:
            return out.mean(dim=(-2, -1))
        return flatten_checked(self, out, x, " (or global_pool=True)") if self.flatten else out
