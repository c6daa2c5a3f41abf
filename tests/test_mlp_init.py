"""The MLP's reference initialisation (MAML sinusoid code: truncated normal std 0.01, zero biases)."""

from __future__ import annotations

import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.backbones import MLP


def test_truncated_normal_scheme_covers_body_and_head():
    torch.manual_seed(0)
    model = MAML(MLP(1, [40, 40], init="truncated_normal", init_std=0.01), task="regression", inner_lr=0.01)
    linears = [m for m in model.model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3  # two hidden layers and the regression head
    for layer in linears:
        w = layer.weight.detach()
        assert w.abs().max() <= 0.02 + 1e-7  # truncated at two standard deviations
        assert torch.all(layer.bias == 0)
    body = torch.cat([layer.weight.detach().flatten() for layer in linears[:2]])
    # a normal truncated at +-2 sigma has standard deviation 0.88 sigma
    assert body.std().item() == pytest.approx(0.0088, rel=0.1)


def test_default_scheme_is_pytorch_default():
    torch.manual_seed(0)
    ours = MLP(1, [40, 40])
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Linear(1, 40), torch.nn.ReLU(), torch.nn.Linear(40, 40), torch.nn.ReLU())
    for a, b in zip(ours.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kwargs", [{"init": "xavier"}, {"init_std": 0.0}])
def test_bad_init_refused(kwargs):
    with pytest.raises(ValueError, match="init"):
        MLP(1, [40], **kwargs)
