"""Episode augmentation as a pure function of the episode key (DESIGN §2: no unseeded randomness).

:func:`random_affine` warps each image of a batch by its own small random affine transform,
drawn from a ``numpy.random.Generator``; :class:`AffineAugmentedSource` wraps any episode source
and applies it to the episodes of chosen splits, with a generator derived from
``(seed, split, epoch, index)``, so an augmented episode is the same on every worker, rank and run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_meta.data.sampling import SPLIT_CODES
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError

__all__ = ["AffineAugmentedSource", "random_affine"]

_AUGMENT_SALT = 0xAFF1


def random_affine(
    images: Tensor,
    rng: np.random.Generator,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: float = 0.0,
    shear: float = 0.0,
) -> Tensor:
    """Warps every image ``[b, C, H, W]`` by its own random affine map (bilinear, zero padding).

    For each image: rotation ``U(-degrees, degrees)``, per-axis scale ``U(1 - scale, 1 + scale)``,
    shears ``U(-shear, shear)`` on both axes and a shift ``U(-translate, translate)`` of the image
    side on both axes. All zeros gives back ``images`` unchanged. A scale of 1.2 makes the content
    1.2 times larger (the sampling grid uses the inverse map).

    Returns:
        a new tensor of the same shape and dtype.

    Example:
        >>> x = torch.rand(4, 1, 28, 28)
        >>> random_affine(x, np.random.default_rng(0), degrees=10, translate=0.05).shape
        torch.Size([4, 1, 28, 28])

    """
    if images.dim() != 4:
        raise ValueError(f"random_affine expects images [b, C, H, W], got shape {tuple(images.shape)}")
    b = images.shape[0]
    if b == 0 or not (degrees or translate or scale or shear):
        return images.clone()
    angle = np.deg2rad(rng.uniform(-degrees, degrees, size=b))
    sx, sy = rng.uniform(1 - scale, 1 + scale, size=(2, b))
    hx, hy = rng.uniform(-shear, shear, size=(2, b))
    tx, ty = rng.uniform(-translate, translate, size=(2, b)) * 2.0  # grid coordinates span [-1, 1]
    cos, sin = np.cos(angle), np.sin(angle)
    theta = np.zeros((b, 2, 3))
    for i in range(b):  # the image moves by rotation @ shear @ scale, then the shift
        rot = np.array([[cos[i], -sin[i]], [sin[i], cos[i]]])
        sh = np.array([[1.0, hx[i]], [hy[i], 1.0]])
        forward = rot @ sh @ np.diag([sx[i], sy[i]])
        # affine_grid maps each output pixel to the input point it samples: the inverse map
        inverse = np.linalg.inv(forward)
        theta[i, :, :2] = inverse
        theta[i, :, 2] = -inverse @ np.array([tx[i], ty[i]])
    theta_t = torch.as_tensor(theta, dtype=images.dtype, device=images.device)
    grid = F.affine_grid(theta_t, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class AffineAugmentedSource:
    """Wraps an episode source and applies :func:`random_affine` to every image of chosen splits.

    The transform of an episode depends only on ``(seed, split, epoch, index)``. Padding is zero,
    which is the background of inverted (ink = 1) images such as the converted Omniglot shards.

    Args:
        source: any object with ``episode(split, epoch, index) -> Episode``.
        seed: data seed.
        degrees, translate, scale, shear: see :func:`random_affine`.
        splits: splits to augment (default: training only).

    """

    def __init__(
        self,
        source,
        seed: int,
        degrees: float = 0.0,
        translate: float = 0.0,
        scale: float = 0.0,
        shear: float = 0.0,
        splits: Sequence[str] = ("train",),
    ) -> None:
        for name, value, hi in (("degrees", degrees, 180.0), ("translate", translate, 0.5), ("scale", scale, 0.9),
                                ("shear", shear, 1.0)):
            if not 0.0 <= value <= hi:
                raise MetaConfigError(f"affine {name}={value} must be in [0, {hi}]")
        self.source = source
        self.seed = seed
        self.degrees, self.translate, self.scale, self.shear = degrees, translate, scale, shear
        self.splits = tuple(splits)

    def episode(self, split: str, epoch: int, index: int) -> Episode:
        """The wrapped source's episode, warped when ``split`` is augmented."""
        ep = self.source.episode(split, epoch, index)
        if split not in self.splits:
            return ep
        rng = np.random.default_rng(
            np.random.SeedSequence([int(self.seed), SPLIT_CODES[split], int(epoch), int(index), _AUGMENT_SALT]))
        kw = {"degrees": self.degrees, "translate": self.translate, "scale": self.scale, "shear": self.shear}
        with torch.no_grad():
            support_x = random_affine(ep.support_x, rng, **kw)
            query_x = random_affine(ep.query_x, rng, **kw)
        return Episode(support_x, ep.support_y, query_x, ep.query_y, ep.classes)

    def __getattr__(self, name: str):
        if name == "source":  # not yet set (unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.source, name)
