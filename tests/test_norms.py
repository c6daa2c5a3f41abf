"""Normalisation from elementary operations (lightning_meta.functional.norms) against PyTorch's kernels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_meta.functional import decomposed_norms, norms

D = torch.float64


def _leaf(*shape, scale=1.0, shift=0.0):
    return (shift + scale * torch.randn(*shape, dtype=D)).requires_grad_(True)


def _check(fused, decomposed, inputs):
    """Same values, first and second derivatives (float64)."""
    a, b = fused(*inputs), decomposed(*inputs)
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(a)
    ga = torch.autograd.grad((a * probe).sum(), inputs, create_graph=True)
    gb = torch.autograd.grad((b * probe).sum(), inputs, create_graph=True)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-10)
    # second derivatives (the bias gradient is constant: None, i.e. zero, on both sides)
    hvp_a = torch.autograd.grad(sum((g ** 2).sum() for g in ga), inputs, allow_unused=True)
    hvp_b = torch.autograd.grad(sum((g ** 2).sum() for g in gb), inputs, allow_unused=True, materialize_grads=True)
    assert hvp_a[0] is not None and hvp_a[0].abs().sum() > 0
    for x, y in zip(hvp_a, hvp_b, strict=True):
        torch.testing.assert_close(y, torch.zeros_like(y) if x is None else x, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (4, 3, 5, 2)])
def test_batch_norm_with_batch_statistics(shape):
    torch.manual_seed(0)
    x, w, b = _leaf(*shape, shift=0.5), _leaf(3, scale=0.3, shift=1.0), _leaf(3, scale=0.3)
    _check(lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True, eps=1e-3),
           lambda x, w, b: norms.batch_norm(x, None, None, w, b, training=True, eps=1e-3), (x, w, b))


def test_batch_norm_with_running_statistics():
    torch.manual_seed(1)
    x, w, b = _leaf(5, 3, 4), _leaf(3, shift=1.0), _leaf(3)
    mean, var = torch.randn(3, dtype=D), torch.rand(3, dtype=D) + 0.5
    _check(lambda x, w, b: F.batch_norm(x, mean, var, w, b, training=False),
           lambda x, w, b: norms.batch_norm(x, mean, var, w, b, training=False), (x, w, b))


def test_instance_and_layer_norm():
    torch.manual_seed(2)
    x, w, b = _leaf(4, 3, 7), _leaf(3, shift=1.0), _leaf(3)
    _check(lambda x, w, b: F.instance_norm(x, weight=w, bias=b),
           lambda x, w, b: norms.instance_norm(x, weight=w, bias=b), (x, w, b))
    x, w, b = _leaf(4, 5, 6), _leaf(5, 6, shift=1.0), _leaf(5, 6)
    _check(lambda x, w, b: F.layer_norm(x, (5, 6), w, b, eps=1e-6),
           lambda x, w, b: norms.layer_norm(x, (5, 6), w, b, eps=1e-6), (x, w, b))


def test_modules_use_the_decomposition_inside_the_block_only(monkeypatch):
    calls = []
    real = norms.batch_norm
    monkeypatch.setattr(norms._DecomposedNorms, "_table",
                        {**norms._DecomposedNorms._table,
                         F.batch_norm: lambda *a, **k: calls.append(1) or real(*a, **k)})
    bn = nn.BatchNorm2d(3, track_running_stats=False).double()
    x = torch.randn(4, 3, 2, 2, dtype=D)
    outside = bn(x)
    assert calls == []
    with decomposed_norms():
        inside = bn(x)
    assert calls == [1]
    torch.testing.assert_close(inside, outside)
    with decomposed_norms(enabled=False):
        bn(x)
    assert calls == [1]


def test_running_statistics_updates_keep_the_kernel():
    """A BatchNorm that updates its running statistics is not decomposed (its buffers still change)."""
    torch.manual_seed(3)
    bn = nn.BatchNorm1d(3).double()
    ref = nn.BatchNorm1d(3).double()
    x = torch.randn(8, 3, dtype=D)
    with decomposed_norms():
        y = bn(x)
    torch.testing.assert_close(y, ref(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    assert bn.num_batches_tracked.item() == 1
    inorm = nn.InstanceNorm1d(3, track_running_stats=True).double()
    with decomposed_norms():
        inorm(torch.randn(2, 3, 5, dtype=D))
    assert inorm.running_mean.abs().sum() > 0


def test_sixteen_bit_inputs_keep_their_dtype_with_float32_statistics():
    torch.manual_seed(4)
    x = (3 + torch.randn(16, 4, 8)).bfloat16()
    w, b = torch.ones(4), torch.zeros(4)
    y = norms.batch_norm(x, None, None, w, b, training=True)
    assert y.dtype == torch.bfloat16
    ref = F.batch_norm(x.float(), None, None, w, b, training=True)
    assert (y.float() - ref).abs().max() < 0.02
    assert norms.layer_norm(x, (8,)).dtype == torch.bfloat16


def test_layer_norm_accepts_an_int_shape():
    x = torch.randn(3, 5, dtype=D)
    torch.testing.assert_close(norms.layer_norm(x, 5), F.layer_norm(x, (5,)))
