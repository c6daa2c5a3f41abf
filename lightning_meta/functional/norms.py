"""Normalisation written with elementary operations, for second-order MAML under ``torch.func.vmap``.

PyTorch's fused ``batch_norm`` / ``layer_norm`` / ``instance_norm`` kernels give silently wrong
second derivatives when they run under ``vmap`` with a batched (per-task adapted) weight or bias:
errors of 1e-3 to 1 on the meta-gradient, not rounding (checked with torch 2.11 and 2.13; see
``tests/test_norms.py``). The same formulas written with ``mean``, ``var`` and arithmetic are
differentiated correctly, so :func:`decomposed_norms` swaps them in for the duration of a block.
``group_norm`` and ``rms_norm`` are exact under ``vmap`` and are left alone.

The decomposition is used only where it is needed (second-order MAML with ``task_batching='vmap'``):
it costs a few more kernels than the fused versions.

Example:
    >>> import torch
    >>> from torch import nn
    >>> norm = nn.BatchNorm1d(3, track_running_stats=False)
    >>> x = torch.randn(8, 3)
    >>> with decomposed_norms():
    ...     y = norm(x)
    >>> torch.allclose(y, norm(x), atol=1e-6)
    True

"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def _stats_dtype(x: Tensor) -> torch.dtype:
    # 16-bit inputs: statistics in float32, as the fused kernels compute them
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]) -> Tensor:
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def _normalise(x: Tensor, dims: list[int], eps: float) -> Tensor:
    xf = x.to(_stats_dtype(x))
    mean = xf.mean(dims, keepdim=True)
    var = xf.var(dims, unbiased=False, keepdim=True)
    return (xf - mean) * torch.rsqrt(var + eps)


def _with_statistics(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """Normalise with given per-channel statistics (running mean and variance)."""
    xf = x.to(_stats_dtype(x))
    channel = [1, -1] + [1] * (x.dim() - 2)
    return (xf - mean.to(xf.dtype).reshape(channel)) * torch.rsqrt(var.to(xf.dtype).reshape(channel) + eps)


def batch_norm(input: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None = None,
               bias: Tensor | None = None, training: bool = False, momentum: float = 0.1,
               eps: float = 1e-5) -> Tensor:
    """``F.batch_norm`` from elementary operations; never updates running statistics (see :func:`decomposed_norms`)."""
    channel = [1, -1] + [1] * (input.dim() - 2)
    if training and input.numel() // input.shape[1] <= 1:  # as F.batch_norm: no variance from one value
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(input.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm in evaluation mode (training=False) needs running_mean and running_var")
    if training:
        y = _normalise(input, [0, *range(2, input.dim())], eps)
    else:
        y = _with_statistics(input, running_mean, running_var, eps)
    return _affine(y, weight, bias, channel).to(input.dtype)


def instance_norm(input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                  weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``F.instance_norm`` from elementary operations (statistics of each sample and channel)."""
    channel = [1, -1] + [1] * (input.dim() - 2)
    if use_input_stats or running_mean is None:
        y = _normalise(input, list(range(2, input.dim())), eps)
    else:
        y = _with_statistics(input, running_mean, running_var, eps)
    return _affine(y, weight, bias, channel).to(input.dtype)


def layer_norm(input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """``F.layer_norm`` from elementary operations (statistics over the last ``len(normalized_shape)`` dims)."""
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    y = _normalise(input, list(range(input.dim() - len(shape), input.dim())), eps)
    return _affine(y, weight, bias, shape).to(input.dtype)


def _updates_running_stats(func, args: tuple, kwargs: dict) -> bool:
    """Whether a call would update running statistics in place, which the decomposition does not do."""
    names = {F.batch_norm: ("input", "running_mean", "running_var", "weight", "bias", "training"),
             F.instance_norm: ("input", "running_mean", "running_var", "weight", "bias", "use_input_stats")}[func]
    bound = dict(zip(names, args, strict=False)) | kwargs
    default = func is F.instance_norm  # use_input_stats defaults to True, batch_norm's training to False
    return bound.get("running_mean") is not None and bool(bound.get(names[-1], default))


class _DecomposedNorms(TorchFunctionMode):
    _table = {F.batch_norm: batch_norm, F.instance_norm: instance_norm, F.layer_norm: layer_norm}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        replacement = self._table.get(func)
        if replacement is None or (func is not F.layer_norm and _updates_running_stats(func, args, kwargs)):
            return func(*args, **kwargs)  # in-place running-statistics updates keep the fused kernel
        return replacement(*args, **kwargs)


def has_fused_norms(module: torch.nn.Module) -> bool:
    """Whether ``module`` contains a layer that calls ``batch_norm``, ``instance_norm`` or ``layer_norm``."""
    kinds = (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm)
    return any(isinstance(m, kinds) for m in module.modules())


@contextlib.contextmanager
def decomposed_norms(enabled: bool = True) -> Iterator[None]:
    """Run ``F.batch_norm``, ``F.instance_norm`` and ``F.layer_norm`` as elementary operations inside the block.

    Calls that would update running statistics in place keep PyTorch's kernel (they cannot run
    under ``vmap`` anyway). ``enabled=False`` makes the block a no-op.
    """
    if not enabled:
        yield
        return
    with _DecomposedNorms():
        yield
