"""ResNet-12 backbone: shapes at 84x84 and 28x28, parameter count, block maths by hand, options, refusals."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from lightning_meta import Episode, collate_episodes
from lightning_meta.algorithms.metaoptnet import MetaOptNet
from lightning_meta.backbones.resnet12 import ResNet12, ResNet12Block

SMALL = (8, 12, 16, 20)


@pytest.mark.parametrize(("size", "side"), [(84, 5), (28, 1), (32, 2)])
def test_output_shapes_match_declared_sizes(size, side):
    net = ResNet12(in_channels=3, channels=SMALL, image_size=size)
    assert net.out_shape == (20, side, side) and net.out_features == 20 * side * side
    out = net(torch.randn(2, 3, size, size))
    assert out.shape == (2, net.out_features)
    maps = ResNet12(3, SMALL, size, flatten=False)
    assert maps(torch.randn(2, 3, size, size)).shape == (2, *maps.out_shape)
    pooled = ResNet12(3, SMALL, size, global_pool=True)
    assert pooled.out_features == 20 and pooled(torch.randn(2, 3, size, size)).shape == (2, 20)


def test_default_widths_parameter_count_and_feature_size():
    net = ResNet12()  # MetaOptNet's (64, 160, 320, 640) on 84x84 RGB
    expected, prev = 0, 3
    for c in (64, 160, 320, 640):
        convs = prev * c * 9 + 2 * c * c * 9 + prev * c  # three 3x3 convs and the 1x1 shortcut, no biases
        norms = 4 * 2 * c  # four BatchNorms (weight and bias)
        expected += convs + norms
        prev = c
    assert sum(p.numel() for p in net.parameters()) == expected
    assert 12_000_000 < expected < 13_000_000
    assert net.out_features == 640 * 5 * 5 == 16000
    assert len(net.blocks) == 4
    assert sum(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules()) == 12


def test_block_equals_hand_computation():
    torch.manual_seed(0)
    block = ResNet12Block(3, 6, negative_slope=0.2).double().train()
    x = torch.randn(4, 3, 9, 9, dtype=torch.float64)
    out = block(x)
    assert out.shape == (4, 6, 4, 4)

    def bn(t, m):  # training-mode BatchNorm with the module's affine parameters
        return F.batch_norm(t, None, None, m.weight, m.bias, training=True, eps=m.eps)

    act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    h = act(bn(F.conv2d(x, block.conv1.weight, padding=1), block.bn1))
    h = act(bn(F.conv2d(h, block.conv2.weight, padding=1), block.bn2))
    h = bn(F.conv2d(h, block.conv3.weight, padding=1), block.bn3)
    short = bn(F.conv2d(x, block.shortcut[0].weight), block.shortcut[1])
    expected = F.max_pool2d(act(h + short), 2)
    torch.testing.assert_close(out, expected)


def test_norm_options():
    none = ResNet12(1, SMALL, 28, norm="none")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in none.modules())
    assert all(m.bias is not None for m in none.modules() if isinstance(m, torch.nn.Conv2d))
    no_stats = ResNet12(1, SMALL, 28, norm="batch_no_stats")
    assert all(m.running_mean is None for m in no_stats.modules() if isinstance(m, torch.nn.BatchNorm2d))
    x = torch.randn(3, 1, 28, 28)
    no_stats.eval()  # still normalises with the batch's statistics: a sample's output depends on its batch
    assert (no_stats(x)[:1] - no_stats(x[:1])).abs().max() > 1e-4
    stats = ResNet12(1, SMALL, 28, norm="batch").eval()  # running statistics: independent of the batch
    torch.testing.assert_close(stats(x)[:1], stats(x[:1]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"channels": (8, 8, 8)}, "four positive block widths"),
        ({"channels": (8, 0, 8, 8)}, "four positive block widths"),
        ({"image_size": 12}, "image_size=12 is below the minimum 16"),
        ({"norm": "layer"}, "norm='layer'"),
        ({"negative_slope": -0.1}, "negative_slope=-0.1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ResNet12(**kwargs)


def test_metaoptnet_trains_through_resnet12():
    torch.manual_seed(0)
    model = MetaOptNet(ResNet12(1, SMALL, 28), ridge_lambda=1.0, ways=3)
    g = torch.Generator().manual_seed(0)
    eps = [
        Episode(torch.randn(6, 1, 28, 28, generator=g), torch.arange(3).repeat(2),
                torch.randn(6, 1, 28, 28, generator=g), torch.arange(3).repeat(2), torch.arange(3))
        for _ in range(2)
    ]
    loss = model.meta_loss(collate_episodes(eps))
    assert torch.isfinite(loss)
    loss.backward()
    first = model.backbone.blocks[0].conv1.weight.grad
    assert first is not None and first.abs().sum() > 0
