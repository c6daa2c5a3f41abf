"""The Conv-4 embedding network of Vinyals et al. (2016), used by MAML, ProtoNet and most few-shot papers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from lightning_meta.backbones._shapes import flatten_checked
from lightning_meta.errors import MetaConfigError, as_integer, require_int

__all__ = ["Conv4"]

Norm = Literal["batch", "batch_no_stats", "none"]


class Conv4(nn.Module):
    """Four blocks of 3x3 conv -> norm -> ReLU -> 2x2 max-pool, flattened.

    For 28x28 inputs and ``hidden=64`` the output has 64 features (1x1 spatial); for 84x84 it has
    ``hidden * 5 * 5``. ``out_features`` holds the flattened size for the configured ``image_size``
    and ``out_shape`` the ``(channels, height, width)`` of the feature maps before flattening.

    Relation Networks (Sung et al. 2018) keep feature maps: ``pool_blocks=2, flatten=False`` pools
    only after the first two blocks and returns ``[b, hidden, image_size // 4, image_size // 4]``;
    the authors' encoder also leaves the first two convolutions unpadded,
    ``padding=[0, 0, 1, 1]`` (28x28 -> 64x5x5, 84x84 -> 64x19x19).

    Args:
        in_channels: input channels (1 for glyphs/Omniglot, 3 for miniImageNet).
        hidden: channels of every block (64 for Omniglot, 32 for MAML on miniImageNet).
        image_size: input height/width, used to compute ``out_features``.
        norm: ``batch`` (BatchNorm with running statistics), ``batch_no_stats`` (BatchNorm that always
            uses batch statistics, as MAML's reference code) or ``none``.
        pool_blocks: how many blocks (the first ones) end with a 2x2 max-pool; 4 is the usual Conv-4.
        flatten: return ``[b, out_features]`` (default) or the feature maps ``[b, *out_shape]``.
        padding: zero padding of the 3x3 convolutions, one value for all four blocks or one per
            block (1 keeps the size; 0 trims a pixel on each side).

    Example:
        >>> import torch
        >>> net = Conv4(in_channels=1, hidden=64, image_size=28)
        >>> net(torch.zeros(2, 1, 28, 28)).shape, net.out_features
        (torch.Size([2, 64]), 64)
        >>> Conv4(1, 64, 28, pool_blocks=2, flatten=False).out_shape
        (64, 7, 7)
        >>> Conv4(1, 64, 84, pool_blocks=2, flatten=False, padding=[0, 0, 1, 1]).out_shape
        (64, 19, 19)

    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        norm: Norm = "batch",
        pool_blocks: int = 4,
        flatten: bool = True,
        padding: int | Sequence[int] = 1,
    ) -> None:
        super().__init__()
        require_int("in_channels", in_channels, 1, "image channels: 1 for Omniglot, 3 for RGB")
        require_int("hidden", hidden, 1, "channels of every block; 64 in MAML/ProtoNet")
        require_int("image_size", image_size, 1, "the input height and width")
        require_int("pool_blocks", pool_blocks, 0, "blocks that end with a 2x2 max-pool, at most 4")
        if not 0 <= pool_blocks <= 4:
            raise MetaConfigError(f"pool_blocks={pool_blocks} must be between 0 and 4 (Conv4 has four blocks)")
        if image_size < 1:
            raise MetaConfigError(f"image_size={image_size} must be >= 1 (the input height and width)")
        pads = [padding] * 4 if as_integer(padding) is not None else list(padding)
        if len(pads) != 4 or any(as_integer(p) is None or p < 0 for p in pads):
            raise MetaConfigError(f"padding={padding!r} must be an int >= 0 or four of them (one per block)")
        pads = [as_integer(p) for p in pads]
        if pads == [1, 1, 1, 1] and image_size < 2**pool_blocks:
            times = {4: "four times", 3: "three times", 2: "twice", 1: "once"}.get(pool_blocks)
            raise MetaConfigError(
                f"Conv4 halves the image {times}; image_size={image_size} is below the minimum {2**pool_blocks}"
            )
        side = image_size
        for block, pad in enumerate(pads):
            side += 2 * pad - 2  # a 3x3 convolution
            if block < pool_blocks:
                side //= 2
            if side < 1:
                raise MetaConfigError(f"image_size={image_size} is too small for padding={pads} and pool_blocks="
                                 f"{pool_blocks}: block {block + 1} leaves no pixel; use larger images or padding 1")
        if norm not in ("batch", "batch_no_stats", "none"):
            raise MetaConfigError(f"norm={norm!r} is not supported; use 'batch', 'batch_no_stats' or 'none'")
        layers: list[nn.Module] = []
        channels = in_channels
        for block in range(4):
            layers.append(nn.Conv2d(channels, hidden, kernel_size=3, padding=pads[block]))
            if norm != "none":
                layers.append(nn.BatchNorm2d(hidden, track_running_stats=(norm == "batch")))
            layers.append(nn.ReLU(inplace=False))
            if block < pool_blocks:
                layers.append(nn.MaxPool2d(2))
            channels = hidden
        self.encoder = nn.Sequential(*layers)
        self.out_shape = (hidden, side, side)
        self.out_features = hidden * side * side
        self.flatten = flatten
        self.in_channels = in_channels
        self.image_size = image_size

    def forward(self, x: Tensor) -> Tensor:
        """``[b, C, H, W] -> [b, out_features]`` (or ``[b, *out_shape]`` when ``flatten=False``)."""
        out = self.encoder(x)
        return flatten_checked(self, out, x) if self.flatten else out
