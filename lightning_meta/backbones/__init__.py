"""Embedding networks ("bodies"); algorithms add their own task head."""

from lightning_meta.backbones.adapters import (
    FiLM,
    FiLMBackbone,
    LoRABackbone,
    LoRAFactors,
    LoRALinear,
    add_film,
    add_lora,
)
from lightning_meta.backbones.conv4 import Conv4
from lightning_meta.backbones.mlp import MLP
from lightning_meta.backbones.resnet12 import ResNet12
from lightning_meta.backbones.vit import ViT, ViTBlock
from lightning_meta.backbones.wrap import TorchvisionBackbone

__all__ = [
    "Conv4",
    "FiLM",
    "FiLMBackbone",
    "LoRABackbone",
    "LoRAFactors",
    "LoRALinear",
    "MLP",
    "ResNet12",
    "TorchvisionBackbone",
    "ViT",
    "ViTBlock",
    "add_film",
    "add_lora",
]
