"""Embedding networks ("bodies"); algorithms add their own task head."""

from lightning_meta.backbones.conv4 import Conv4
from lightning_meta.backbones.mlp import MLP
from lightning_meta.backbones.resnet12 import ResNet12

__all__ = ["Conv4", "MLP", "ResNet12"]
