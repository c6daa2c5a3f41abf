"""Fixes from the ninth session's reviews of the data layer, the metrics and the callbacks.

Each test here failed before its fix (checked by reverting the fix and running it).
"""

from __future__ import annotations

import lightning as L
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.backbones import MLP
from lightning_meta.datamodules import SinusoidDataModule


def _trainer(root, **kw):
    kw.setdefault("max_steps", 2)
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                     default_root_dir=root, **kw)


def test_fit_after_validate_on_the_same_model(tmp_path):
    """``validate`` resets the metric states inside inference mode; ``fit`` must still update them."""
    torch.manual_seed(0)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.01)
    dm = SinusoidDataModule(meta_batch_size=2, train_episodes=4, val_episodes=2, eval_meta_batch_size=2)
    before = _trainer(tmp_path).validate(model, dm, verbose=False)[0]["val/mse"]
    trainer = _trainer(tmp_path, val_check_interval=2)
    trainer.fit(model, dm)
    assert trainer.global_step == 2
    after = trainer.callback_metrics["val/mse"].item()
    assert after != before and torch.isfinite(torch.tensor(after))
