"""Metric-space few-shot primitives: class prototypes and distances."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_meta.functional.precision import in_float32

__all__ = ["prototypes", "pairwise_distance", "cosine_similarity", "accuracy"]

Distance = Literal["euclidean", "cosine"]


def prototypes(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Per-class mean embedding.

    Args:
        embeddings: ``[..., n, d]`` support embeddings (leading axes are tasks).
        labels: ``[..., n]`` integer labels in ``0..ways-1``.
        ways: number of classes ``N``.

    Returns:
        ``[..., N, d]`` prototypes; row ``c`` is the mean of the embeddings labelled ``c``.

    A class without support examples gets a zero prototype (the data layer never produces one).

    Example:
        >>> prototypes(torch.tensor([[0.0], [2.0], [5.0]]), torch.tensor([0, 0, 1]), 2)
        tensor([[1.],
                [5.]])

    """
    onehot = F.one_hot(labels, ways).to(embeddings.dtype)  # [..., n, N]
    counts = onehot.sum(-2).clamp(min=1.0)  # [..., N]
    return (onehot.transpose(-1, -2) @ embeddings) / counts.unsqueeze(-1)


@in_float32
def _squared_euclidean(queries: Tensor, protos: Tensor) -> Tensor:
    # the expanded form is faster than cdist for small d and exact enough in float32, but not in
    # bf16: under autocast the cross term would be a bf16 product (hence in_float32)
    q2 = (queries**2).sum(-1, keepdim=True)
    p2 = (protos**2).sum(-1).unsqueeze(-2)
    return (q2 + p2 - 2.0 * queries @ protos.transpose(-1, -2)).clamp(min=0.0)


@in_float32
def cosine_similarity(queries: Tensor, keys: Tensor) -> Tensor:
    """``[..., m, n]`` cosines between ``[..., m, d]`` queries and ``[..., n, d]`` keys, in float32.

    bf16 rounds the cosines (about 0.8-0.95 for post-ReLU features) to ~2^-8, which flips
    predictions under autocast; so, as for the euclidean distance, bf16/fp16 inputs and autocast
    are computed (and returned) in float32.
    """
    return F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).transpose(-1, -2)


def pairwise_distance(queries: Tensor, protos: Tensor, kind: Distance = "euclidean") -> Tensor:
    """Distances between ``[..., m, d]`` queries and ``[..., N, d]`` prototypes, shape ``[..., m, N]``.

    ``euclidean`` is the squared Euclidean distance (Snell et al. 2017); ``cosine`` is ``1 - cos``.
    Both are computed in float32 (and returned in float32) for bf16/fp16 inputs and under
    autocast: the expanded euclidean form and the cosines both lose too much in bf16.
    """
    if kind == "euclidean":
        return _squared_euclidean(queries, protos)
    if kind == "cosine":
        return 1.0 - cosine_similarity(queries, protos)
    raise ValueError(f"distance={kind!r} is not supported; use 'euclidean' or 'cosine'")


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Fraction of correct arg-max predictions (a 0-d tensor); ``labels`` is ``logits``' shape minus its last axis."""
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"accuracy needs labels of shape {list(logits.shape[:-1])} for logits of shape "
                         f"{list(logits.shape)}, got {list(labels.shape)}")
    return (logits.argmax(-1) == labels).to(torch.float32).mean()
