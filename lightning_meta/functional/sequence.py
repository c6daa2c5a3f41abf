"""Pure functions of the model-based (black-box) learners.

Label encodings, attention masks, causal convolution and the content / least-recently-used
addressing of an external memory.

Masks follow :func:`torch.nn.functional.scaled_dot_product_attention`: a boolean ``allowed``
tensor is True where position ``i`` (row) may attend to position ``j`` (column).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "causal_conv1d",
    "causal_mask",
    "cosine_read_weights",
    "encode_labels",
    "label_dim",
    "least_used",
    "support_query_mask",
]


def label_dim(ways: int) -> int:
    """Size of the label encoding: ``ways`` (one-hot) for classification, 2 for regression (``ways == 0``)."""
    if ways < 0:
        raise ValueError(f"ways={ways} must be >= 0 (0 means regression)")
    return ways if ways > 0 else 2


def encode_labels(y: Tensor, ways: int, dtype: torch.dtype | None = None) -> Tensor:
    """Label encodings fed to a sequence model next to the input embeddings.

    Classification (``ways > 0``): ``y`` long ``[...]`` -> one-hot ``[..., ways]``. Regression
    (``ways == 0``): ``y`` float ``[..., 1]`` -> ``[..., 2]`` = ``(y, 1)``; the constant 1 marks a
    known target, so that an all-zero encoding means "unknown" for both tasks (a target of 0 is
    still distinguishable from a query). ``dtype`` is the result's floating type (default: the
    default dtype for classification, ``y``'s dtype for regression).

    Example:
        >>> encode_labels(torch.tensor([2, 0]), 3)
        tensor([[0., 0., 1.],
                [1., 0., 0.]])
        >>> encode_labels(torch.tensor([[0.5]]), 0)
        tensor([[0.5000, 1.0000]])

    """
    if ways > 0:
        if y.is_floating_point():
            raise ValueError(f"classification labels must be integers, got dtype {y.dtype}")
        return F.one_hot(y, ways).to(dtype or torch.get_default_dtype())
    if y.shape[-1] != 1:
        raise ValueError(f"regression targets must have a trailing size-1 axis, got shape {tuple(y.shape)}")
    y = y.to(dtype or y.dtype)
    return torch.cat([y, torch.ones_like(y)], dim=-1)


def causal_mask(length: int, device: torch.device | str | None = None) -> Tensor:
    """``[T, T]`` boolean mask, True where ``j <= i`` (a position sees itself and the past only).

    Example:
        >>> causal_mask(3).int()
        tensor([[1, 0, 0],
                [1, 1, 0],
                [1, 1, 1]], dtype=torch.int32)

    """
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def support_query_mask(num_support: int, num_query: int, device: torch.device | str | None = None) -> Tensor:
    """``[S+Q, S+Q]`` boolean mask for a sequence of ``S`` support tokens followed by ``Q`` queries.

    Support tokens attend to every support token (in both directions, so the mask does not depend
    on the support order) and never to queries; each query attends to the support tokens and to
    itself, never to another query, so its prediction does not depend on the other queries.

    Example:
        >>> support_query_mask(2, 2).int()
        tensor([[1, 1, 0, 0],
                [1, 1, 0, 0],
                [1, 1, 1, 0],
                [1, 1, 0, 1]], dtype=torch.int32)

    """
    n = num_support + num_query
    allowed = torch.zeros(n, n, dtype=torch.bool, device=device)
    allowed[:, :num_support] = True
    idx = torch.arange(num_support, n, device=device)
    allowed[idx, idx] = True
    return allowed


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, dilation: int = 1) -> Tensor:
    """1-D convolution whose output at step ``t`` depends only on inputs at steps ``<= t``.

    The input is padded on the left by ``dilation * (kernel - 1)`` zeros, so the length is kept.

    Args:
        x: ``[b, c_in, T]``.
        weight: ``[c_out, c_in, kernel]`` (tap ``kernel - 1`` reads step ``t``, tap 0 reads
            ``t - dilation * (kernel - 1)``).
        bias: ``[c_out]`` or None.
        dilation: spacing of the taps.

    Returns:
        ``[b, c_out, T]``.

    """
    pad = dilation * (weight.shape[-1] - 1)
    return F.conv1d(F.pad(x, (pad, 0)), weight, bias, dilation=dilation)


def cosine_read_weights(keys: Tensor, memory: Tensor, sharpness: Tensor | float = 1.0, eps: float = 1e-8) -> Tensor:
    """Content addressing: ``softmax_i(sharpness * cos(key, memory[i]))`` for every read head.

    Args:
        keys: ``[b, heads, width]``.
        memory: ``[b, slots, width]``.
        sharpness: scalar multiplying the cosine similarities before the softmax (1 in Santoro et al.).
        eps: guards the norms of empty (all-zero) memory rows; raised to the smallest normal number
            of the dtype when it would round to zero there (float16: 6.1e-5).

    Returns:
        ``[b, heads, slots]``, each row sums to 1.

    """
    sim = torch.einsum("bhw,bsw->bhs", keys, memory)
    norms = keys.norm(dim=-1, keepdim=True) * memory.norm(dim=-1)[:, None, :]
    eps = max(eps, torch.finfo(norms.dtype).tiny)  # 1e-8 is 0 in float16: 0 / 0 for an empty row
    return torch.softmax(sharpness * sim / norms.clamp_min(eps), dim=-1)


def least_used(usage: Tensor, n: int) -> Tensor:
    """One-hot weights ``[b, n, slots]`` of the ``n`` least used memory slots (row ``h`` = ``h``-th least used).

    Ties go to the lower slot index, so an empty memory is filled from slot 0 upwards.
    """
    if not 0 < n <= usage.shape[-1]:
        raise ValueError(f"least_used: n={n} slots asked of a memory with {usage.shape[-1]}; use 1 <= n <= slots")
    idx = torch.sort(usage, dim=-1, stable=True).indices[:, :n]  # [b, n]
    return F.one_hot(idx, usage.shape[-1]).to(usage.dtype)
