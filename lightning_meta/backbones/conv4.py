"""The Conv-4 embedding network of Vinyals et al. (2016), used by MAML, ProtoNet and most few-shot papers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.backbones._shapes import flatten_checked
from lightning_meta.errors import MetaConfigError, as_integer, require_int, require_non_negative, require_positive

__all__ = ["Conv4", "OffsetBatchNorm2d"]

Norm = Literal["batch", "batch_no_stats", "none"]


class OffsetBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with a learned offset and no scale (``weight`` is ``None``), as TensorFlow's default.

    The kernel receives a constant scale of ones: PyTorch's ``batch_norm`` cannot be
    differentiated twice with ``weight=None`` once its bias is part of an inner loop (second-order
    MAML adapting the offset fails in the backward), and with ones it can. The running-statistics
    logic is ``nn.BatchNorm2d``'s.

    Example:
        >>> bn = OffsetBatchNorm2d(3)
        >>> bn.weight is None, [n for n, _ in bn.named_parameters()]
        (True, ['bias'])
        >>> torch.allclose(bn(torch.randn(4, 3, 2, 2)).mean((0, 2, 3)), torch.zeros(3), atol=1e-6)
        True

    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 track_running_stats: bool = True) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=True,
                         track_running_stats=track_running_stats)
        self.register_parameter("weight", None)

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        keep_running = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if keep_running else None,
                            self.running_var if keep_running else None, torch.ones_like(self.bias), self.bias,
                            use_batch_stats, momentum, self.eps)


class Conv4(nn.Module):
    """Four blocks of 3x3 conv -> norm -> ReLU -> 2x2 max-pool, flattened.

    For 28x28 inputs and ``hidden=64`` the output has 64 features (1x1 spatial); for 84x84 it has
    ``hidden * 5 * 5``. ``out_features`` holds the flattened size for the configured ``image_size``
    and ``out_shape`` the ``(channels, height, width)`` of the feature maps before flattening.

    Relation Networks (Sung et al. 2018) keep feature maps: ``pool_blocks=2, flatten=False`` pools
    only after the first two blocks and returns ``[b, hidden, image_size // 4, image_size // 4]``;
    the authors' encoder also leaves the first two convolutions unpadded,
    ``padding=[0, 0, 1, 1]`` (28x28 -> 64x5x5, 84x84 -> 64x19x19).

    The MAML and Reptile authors' Omniglot network halves the image with stride-2 convolutions
    instead of max-pooling: ``downsample="stride"`` (28 -> 14 -> 7 -> 4 -> 2, the sizes of
    TensorFlow's ``SAME`` padding; on even sizes TensorFlow pads the bottom/right only where PyTorch
    pads both sides by one pixel, which shifts the sampling grid by a pixel but not the sizes). MAML then averages the
    final 2x2 map (``global_pool=True``: 64 features); Reptile flattens it (256 features).

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
        downsample: how the first ``pool_blocks`` blocks halve the image: ``max_pool`` (a 2x2
            max-pool after the ReLU) or ``stride`` (the convolution itself has stride 2).
        global_pool: average the final feature maps over height and width (``out_features`` =
            ``hidden``), as MAML's Omniglot network does.
        init: ``default`` (PyTorch's) or ``xavier`` (Xavier/Glorot-uniform convolution weights and
            zero biases, the initialisation of the MAML and Reptile authors' TensorFlow code).
        activation: ``relu``, or ``leaky_relu`` (slope ``negative_slope``) as in the MAML++
            authors' network.
        negative_slope: slope of ``leaky_relu`` for negative inputs (0.01, PyTorch's and the
            MAML++ code's default); only with ``activation="leaky_relu"``.
        head_init: initialisation of the linear task head a learner puts on top (the MAML family's
            :class:`~lightning_meta.algorithms.maml.BackboneWithHead`): ``default`` (PyTorch's),
            ``normal`` (standard-normal weights, zero bias: the MAML authors' Omniglot head) or
            ``xavier`` (Glorot-uniform weights, zero bias: their miniImageNet head). Learners
            without a head ignore it.
        norm_scale: ``False`` drops BatchNorm's learned scale and keeps its offset, as the MAML
            authors' TensorFlow code (``tf.contrib.layers.batch_norm`` without ``scale``): the layers
            are :class:`OffsetBatchNorm2d` (``weight`` is ``None``). Lightning's
            ``sync_batchnorm=True`` would replace them by plain ``SyncBatchNorm`` layers, with which
            second-order MAML cannot adapt the offsets; MAML normalises per task and needs no sync.
        norm_eps: BatchNorm's epsilon (> 0): PyTorch's 1e-5 by default; TensorFlow's
            ``batch_norm``, which the MAML authors' code uses, defaults to 1e-3.

    Example:
        >>> import torch
        >>> net = Conv4(in_channels=1, hidden=64, image_size=28)
        >>> net(torch.zeros(2, 1, 28, 28)).shape, net.out_features
        (torch.Size([2, 64]), 64)
        >>> Conv4(1, 64, 28, pool_blocks=2, flatten=False).out_shape
        (64, 7, 7)
        >>> Conv4(1, 64, 84, pool_blocks=2, flatten=False, padding=[0, 0, 1, 1]).out_shape
        (64, 19, 19)
        >>> Conv4(1, 64, 28, downsample="stride").out_shape, Conv4(1, 64, 28, downsample="stride").out_features
        ((64, 2, 2), 256)
        >>> Conv4(1, 64, 28, downsample="stride", global_pool=True).out_features
        64

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
        downsample: Literal["max_pool", "stride"] = "max_pool",
        global_pool: bool = False,
        init: Literal["default", "xavier"] = "default",
        activation: Literal["relu", "leaky_relu"] = "relu",
        negative_slope: float = 0.01,
        head_init: Literal["default", "normal", "xavier"] = "default",
        norm_scale: bool = True,
        norm_eps: float = 1e-5,
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
        if downsample not in ("max_pool", "stride"):
            raise MetaConfigError(f"downsample={downsample!r} is not supported; use 'max_pool' or 'stride'")
        if not isinstance(global_pool, bool):
            raise MetaConfigError(f"global_pool={global_pool!r} must be true or false")
        if global_pool and not flatten:
            raise MetaConfigError("global_pool=True returns one vector per image; it needs flatten=True")
        strided = downsample == "stride"
        if init not in ("default", "xavier"):
            raise MetaConfigError(f"init={init!r} is not supported; use 'default' or 'xavier'")
        if activation not in ("relu", "leaky_relu"):
            raise MetaConfigError(f"activation={activation!r} is not supported; use 'relu' or 'leaky_relu'")
        negative_slope = require_non_negative("negative_slope", negative_slope,
                                              "the leaky ReLU's slope for negative inputs; MAML++ uses 0.01")
        if activation == "relu" and negative_slope != 0.01:
            raise MetaConfigError(f"negative_slope={negative_slope} only applies to activation='leaky_relu' (got "
                                  "activation='relu'); set activation: leaky_relu or drop negative_slope")
        if not isinstance(norm_scale, bool):
            raise MetaConfigError(f"norm_scale={norm_scale!r} must be true or false")
        if not norm_scale and norm == "none":
            raise MetaConfigError("norm_scale=False removes BatchNorm's scale, but norm='none' has no BatchNorm; "
                                  "use norm='batch' or 'batch_no_stats', or drop norm_scale")
        norm_eps = require_positive("norm_eps", norm_eps, "BatchNorm's epsilon: 1e-5 in PyTorch, 1e-3 in TensorFlow")
        if head_init not in ("default", "normal", "xavier"):
            raise MetaConfigError(f"head_init={head_init!r} is not supported; use 'default', 'normal' or 'xavier'")
        if pads == [1, 1, 1, 1] and image_size < 2**pool_blocks and not strided:
            times = {4: "four times", 3: "three times", 2: "twice", 1: "once"}.get(pool_blocks)
            raise MetaConfigError(
                f"Conv4 halves the image {times}; image_size={image_size} is below the minimum {2**pool_blocks}"
            )
        side = image_size
        for block, pad in enumerate(pads):
            if strided and block < pool_blocks:
                side = (side + 2 * pad - 3) // 2 + 1  # a 3x3 convolution with stride 2
            else:
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
            stride = 2 if strided and block < pool_blocks else 1
            layers.append(nn.Conv2d(channels, hidden, kernel_size=3, padding=pads[block], stride=stride))
            if norm != "none":
                bn_type = nn.BatchNorm2d if norm_scale else OffsetBatchNorm2d
                layers.append(bn_type(hidden, eps=norm_eps, track_running_stats=(norm == "batch")))
            layers.append(nn.ReLU() if activation == "relu" else nn.LeakyReLU(negative_slope))
            if block < pool_blocks and not strided:
                layers.append(nn.MaxPool2d(2))
            channels = hidden
        self.encoder = nn.Sequential(*layers)
        if init == "xavier":
            for conv in (m for m in self.encoder if isinstance(m, nn.Conv2d)):
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)
        self.out_shape = (hidden, 1, 1) if global_pool else (hidden, side, side)
        self.out_features = hidden if global_pool else hidden * side * side
        self.global_pool = global_pool
        self._pooled_side = (side, side)
        self.flatten = flatten
        self.in_channels = in_channels
        self.image_size = image_size
        self.head_init = head_init

    def init_head(self, head: nn.Linear) -> None:
        """Initialise the learner's linear task head as ``head_init`` says (called by ``BackboneWithHead``)."""
        if self.head_init == "default":
            return
        with torch.no_grad():
            if self.head_init == "normal":
                nn.init.normal_(head.weight, 0.0, 1.0)
            else:
                nn.init.xavier_uniform_(head.weight)
            if head.bias is not None:
                nn.init.zeros_(head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[b, C, H, W] -> [b, out_features]`` (or ``[b, *out_shape]`` when ``flatten=False``)."""
        out = self.encoder(x)
        if self.global_pool:
            if tuple(out.shape[-2:]) != self._pooled_side:  # the pooled count alone cannot tell
                raise MetaConfigError(
                    f"Conv4 built for {self.image_size}x{self.image_size} images got images of {list(x.shape[-2:])} "
                    f"({list(out.shape[-2:])} maps instead of {list(self._pooled_side)} before global_pool); build "
                    "it with image_size matching the data"
                )
            out = out.mean(dim=(-2, -1), keepdim=True)
        return flatten_checked(self, out, x) if self.flatten else out
