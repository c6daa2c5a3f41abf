"""Shape check shared by the backbones whose ``out_features`` depends on the configured image size."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_meta.errors import MetaConfigError


def flatten_checked(net: nn.Module, out: Tensor, x: Tensor, hint: str = "") -> Tensor:
    """``out`` flattened to ``[b, features]``; refuses a feature count other than ``net.out_features``.

    Heads and prototypes are sized from ``out_features``, which ``net`` computed from its
    ``image_size``: images of another size would give another count and fail (or mislead) later.
    """
    out = torch.flatten(out, 1)
    if out.shape[-1] != net.out_features:
        raise MetaConfigError(f"{type(net).__name__} built for {net.image_size}x{net.image_size} images (out_features="
                         f"{net.out_features}) got images of {list(x.shape[-2:])}, giving {out.shape[-1]} features; "
                         f"build it with image_size matching the data{hint}")
    return out
