"""A Vision Transformer body (Dosovitskiy et al. 2021), ViT-small by default, written for functional inner loops."""

from __future__ import annotations

import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from lightning_meta.errors import MetaConfigError
from lightning_meta.functional.inner_loop import inside_func_transform

__all__ = ["Attention", "ViT", "ViTBlock"]

Pool = Literal["cls", "mean"]


class Attention(nn.Module):
    """Multi-head self-attention written with plain tensor operations.

    ``softmax(q k^T / sqrt(d)) v`` is spelled out instead of calling
    ``F.scaled_dot_product_attention``: its fused kernels are not twice differentiable on every
    device, and second-order MAML differentiates the inner-loop gradient again.

    Args:
        dim: token width (``heads * head_dim``).
        heads: attention heads; must divide ``dim``.
        qkv_bias: biases on the query/key/value projection.

    Example:
        >>> Attention(16, 4)(torch.zeros(2, 5, 16)).shape
        torch.Size([2, 5, 16])

    """

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % heads:
            raise MetaConfigError(f"dim={dim} is not divisible by heads={heads}; choose heads dividing dim "
                                  "(e.g. 6 for 384)")
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[b, n, dim] -> [b, n, dim]``."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [3, b, h, n, hd]
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q * self.scale) @ k.transpose(-2, -1), dim=-1)  # [b, h, n, n]
        out = (attn @ v).transpose(1, 2).reshape(b, n, d)  # [b, n, dim]
        return self.proj(out)


class ViTBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))`` (GELU MLP).

    Args:
        dim: token width.
        heads: attention heads.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
        qkv_bias: biases on the query/key/value projection.

    Example:
        >>> ViTBlock(16, 2)(torch.zeros(2, 5, 16)).shape
        torch.Size([2, 5, 16])

    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``[b, n, dim] -> [b, n, dim]``."""
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


def _call_block(block: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    # The block's weights are explicit inputs, so a checkpointed block recomputes with the weights
    # of this forward (the fast weights of an inner loop), not with whatever the module holds when
    # the backward runs (functional_call has restored the originals by then).
    return functional_call(block, params, (x,))


class ViT(nn.Module):
    """Vision Transformer embedding network: patch embedding, pre-norm blocks, final LayerNorm, pooled token.

    Defaults are ViT-small (``dim=384, depth=12, heads=6``, patch 16 on 224x224 RGB, 21.7M
    parameters); every size is configurable, e.g. ``ViT(1, image_size=28, patch_size=4, dim=64,
    depth=2, heads=2)`` for glyphs. There is no dropout, LayerNorm has no running statistics and
    attention is plain tensor maths, so the network works under ``torch.func.functional_call``,
    ``grad`` (twice, for second-order MAML) and ``vmap``. ``out_features = dim``.

    Activation checkpointing (``checkpoint=True``) recomputes each block in the backward pass
    with ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``, the variant that works
    under ``torch.autograd.grad(create_graph=True)`` (DESIGN §4); outputs and
    (second-order) gradients equal those without it. It is active only when gradients are
    enabled and outside ``torch.func`` transforms: ``torch.func.grad`` refuses the saved-tensor
    hooks it needs and a ``vmap`` would be gone when the backward recomputes, so inside them
    blocks run normally (with a one-time warning). MAML's per-task loop
    (``task_batching='loop'``) runs its inner steps with ``torch.autograd.grad``, so there the
    blocks are checkpointed too; under ``task_batching='vmap'`` they are not.

    Args:
        in_channels: input channels (3 for RGB, 1 for glyphs/Omniglot).
        image_size: input height and width; must be a multiple of ``patch_size``.
        patch_size: side of the square patches (the patch embedding is a strided convolution).
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads per block; must divide ``dim``.
        mlp_ratio: MLP hidden width as a multiple of ``dim``.
        qkv_bias: biases on the query/key/value projections.
        pool: ``cls`` (a learned class token, read out after the final norm) or ``mean`` (mean
            of the patch tokens after the final norm, no class token).
        checkpoint: non-reentrant activation checkpointing of every block.

    Raises:
        MetaConfigError: a non-positive size, ``patch_size`` not dividing ``image_size``, ``heads``
            not dividing ``dim``, or an unknown ``pool``.

    Example:
        >>> net = ViT(in_channels=1, image_size=28, patch_size=7, dim=32, depth=2, heads=4)
        >>> net(torch.zeros(2, 1, 28, 28)).shape, net.out_features, net.num_patches
        (torch.Size([2, 32]), 32, 16)

    """

    def __init__(
        self,
        in_channels: int = 3,
        image_size: int = 224,
        patch_size: int = 16,
        dim: int = 384,
        depth: int = 12,
        heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        pool: Pool = "cls",
        checkpoint: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("image_size", image_size), ("patch_size", patch_size),
                            ("dim", dim), ("depth", depth), ("heads", heads)):
            if not isinstance(value, int) or value < 1:
                raise MetaConfigError(f"ViT {name}={value!r} must be a positive integer")
        if image_size % patch_size:
            raise MetaConfigError(
                f"ViT patch_size={patch_size} does not divide image_size={image_size}; choose a divisor "
                f"(e.g. patch_size={_largest_divisor_at_most(image_size, patch_size)}) or resize the images"
            )
        if dim % heads:
            raise MetaConfigError(f"ViT heads={heads} does not divide dim={dim}; choose heads dividing dim "
                                  "(ViT-small: dim 384, heads 6)")
        if not mlp_ratio > 0 or int(dim * mlp_ratio) < 1:
            raise MetaConfigError(f"ViT mlp_ratio={mlp_ratio} must be > 0 (4.0 in ViT-small)")
        if pool not in ("cls", "mean"):
            raise MetaConfigError(f"ViT pool={pool!r} is not supported; use 'cls' or 'mean'")
        self.in_channels = in_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.pool = pool
        self.checkpoint = checkpoint
        self._warned_transform = False
        self.out_features = dim
        self.patch_embed = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        tokens = self.num_patches + (1 if pool == "cls" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
        self.blocks = nn.ModuleList(ViTBlock(dim, heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``[b, C, H, W] -> [b, dim]``."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            raise MetaConfigError(
                f"ViT was built for {self.image_size}x{self.image_size} images but got {tuple(x.shape[-2:])}; "
                "set image_size (and patch_size) to the data's size"
            )
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # [b, num_patches, dim]
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        h = tokens + self.pos_embed  # [b, tokens, dim]
        recompute = self.checkpoint and torch.is_grad_enabled()
        # torch.func gradient transforms refuse the saved-tensor hooks checkpointing relies on, and under
        # vmap the recomputation would run after the transform has exited
        if recompute and inside_func_transform():
            recompute = False
            if not self._warned_transform:
                self._warned_transform = True
                warnings.warn(
                    "ViT(checkpoint=True): blocks run without checkpointing inside torch.func transforms (vmap, or "
                    "torch.func.grad), which cannot hold checkpointed activations; forwards outside them are still "
                    "checkpointed. For a checkpointed inner loop use MAML(task_batching='loop'), which runs it with "
                    "torch.autograd.grad",
                    stacklevel=2,
                )
        for block in self.blocks:
            if recompute:
                h = checkpoint(_call_block, block, dict(block.named_parameters()), h, use_reentrant=False)
            else:
                h = block(h)
        h = self.norm(h)
        return h[:, 0] if self.pool == "cls" else h.mean(dim=1)


def _largest_divisor_at_most(n: int, k: int) -> int:
    return max(d for d in range(1, min(n, k) + 1) if n % d == 0)
