"""CompileMetaLoss: compiled meta-training gives the same weights as eager meta-training."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.backbones import MLP
from lightning_meta.callbacks.compile import CompileMetaLoss
from lightning_meta.datamodules import SinusoidDataModule


def _fit(callbacks: list, steps: int = 4, batching: str = "vmap") -> MAML:
    L.seed_everything(0)
    model = MAML(MLP(1, [16, 16]), task="regression", inner_lr=0.01, inner_steps=2, task_batching=batching)
    dm = SinusoidDataModule(meta_batch_size=4, train_episodes=64, val_episodes=4, test_episodes=4)
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(model, dm)
    return model


def _assert_same_weights(a: MAML, b: MAML, tol: float) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p, q, atol=tol, rtol=0), f"{name} differs by {(p - q).abs().max():.2e}"


@pytest.mark.parametrize("batching", ["vmap", "loop"])
def test_traced_meta_loss_matches_eager_and_is_removed_after_fit(batching):
    """Both task batchings compile (the loop keeps torch.func.grad while torch.compile traces)."""
    eager = _fit([], batching=batching)
    cb = CompileMetaLoss(backend="aot_eager")  # traces forward and the double backward, no codegen
    compiled = _fit([cb], batching=batching)
    assert "meta_loss" not in vars(compiled)  # the module is left as it was
    L.seed_everything(0)
    start = MAML(MLP(1, [16, 16]), task="regression")  # the same initial weights as both runs
    assert max((p - q).abs().max().item() for p, q in zip(eager.parameters(), start.parameters(), strict=True)) > 1e-4
    _assert_same_weights(eager, compiled, 1e-6)


@pytest.mark.slow
def test_inductor_meta_loss_matches_eager():
    eager = _fit([])
    compiled = _fit([CompileMetaLoss()])
    _assert_same_weights(eager, compiled, 1e-5)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"backend": "nope"}, "backend='nope'"), ({"mode": "fast"}, "mode='fast'")]
)
def test_bad_arguments_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CompileMetaLoss(**kwargs)
