"""Mixed precision in inner loops: the adapted weights and their updates stay float32.

Two bf16 set-ups reach a meta-learner (DESIGN §5):

- ``precision="bf16-mixed"`` with DDP or a single device runs the step under ``torch.autocast``:
  parameters stay float32, matrix products run in bf16, and gradients come back in the dtype of
  the tensors they are taken with respect to. The functional inner loop therefore already keeps
  its fast weights and the update ``theta' = theta - alpha * g`` in float32 (tested).
- DeepSpeed ``bf16`` (and ``bf16-true``) cast the module itself to bf16 and feed bf16 inputs,
  without autocast. An inner loop over those weights would round every fast weight to bf16's
  8-bit mantissa, so inner updates smaller than ~1/256 of a weight are partly or wholly lost.
  :func:`upcast_low_precision` makes float32 copies of the adapted tensors (differentiable
  casts, so the meta-gradient still reaches the bf16 parameters and DeepSpeed's float32 master
  copy), and :func:`low_precision_autocast` lets the bf16 module run with them: it turns
  autocast on, in the input's dtype, where it is off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["LOW_PRECISION_DTYPES", "in_float32", "low_precision_autocast", "upcast_low_precision"]

#: floating dtypes below float32 that the inner loop does not keep its fast weights in
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def upcast_low_precision(params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """float32 versions of the bf16/fp16 tensors of ``params`` (differentiable casts); others unchanged.

    Example:
        >>> p = {"w": torch.ones(2, dtype=torch.bfloat16, requires_grad=True), "b": torch.zeros(2)}
        >>> {k: v.dtype for k, v in upcast_low_precision(p).items()}
        {'w': torch.float32, 'b': torch.float32}

    """
    return {k: v.float() if v.dtype in LOW_PRECISION_DTYPES else v for k, v in params.items()}


def low_precision_autocast(x: Tensor) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in ``x``'s dtype when ``x`` is bf16/fp16 and autocast is off on its device; else a no-op.

    Inside, layers whose weights are float32 fast weights and whose inputs are bf16 run their
    products in bf16 (as under ``precision="bf16-mixed"``) instead of failing on mixed dtypes.

    Example:
        >>> w = torch.randn(3, 4)
        >>> x = torch.randn(2, 4, dtype=torch.bfloat16)
        >>> with low_precision_autocast(x):
        ...     y = torch.nn.functional.linear(x, w)
        >>> y.dtype
        torch.bfloat16

    """
    if x.dtype in LOW_PRECISION_DTYPES and not torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, dtype=x.dtype)
    return contextlib.nullcontext()


def in_float32(fn):
    """Decorate ``fn(*tensors, ...)`` so it runs in float32 (or wider) with autocast off.

    For the closed-form pieces that bf16 ruins: ``torch.linalg.solve`` has no bf16 kernel, and
    the expanded squared distance ``|q|^2 + |p|^2 - 2 q.p`` loses the small differences between
    large terms when the product runs in bf16 under autocast (prediction flips of 1-14% measured
    on ResNet-sized embeddings). bf16/fp16 tensor arguments are cast to float32 (differentiable
    casts); float32/float64 ones are left alone; the result keeps the wide dtype, so logits built
    from it are not rounded again.

    Example:
        >>> @in_float32
        ... def gram(x):
        ...     return x @ x.T
        >>> gram(torch.ones(2, 3, dtype=torch.bfloat16)).dtype
        torch.float32

    """
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        device = tensors[0].device.type if tensors else "cpu"
        args = tuple(a.float() if isinstance(a, Tensor) and a.dtype in LOW_PRECISION_DTYPES else a for a in args)
        kwargs = {k: v.float() if isinstance(v, Tensor) and v.dtype in LOW_PRECISION_DTYPES else v
                  for k, v in kwargs.items()}
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return wrapped
