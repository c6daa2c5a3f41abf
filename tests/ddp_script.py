"""Trains a tiny meta-learner with 1 or 2 CPU processes (gloo) and saves the final weights.

Run by tests/test_ddp.py as ``python tests/ddp_script.py ALGO WORLD OUT``. Lightning's ``ddp``
strategy re-launches this script for rank 1.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import numpy as np
import torch


def main(algo: str, world: int, out: str, shards: str) -> None:
    from lightning_meta.algorithms import MAML, ProtoNet
    from lightning_meta.backbones import MLP, Conv4
    from lightning_meta.datamodules import ShardDataModule, SinusoidDataModule

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    if algo in ("maml", "maml_pertask"):
        dm = SinusoidDataModule(meta_batch_size=4, train_episodes=16, val_episodes=6, eval_meta_batch_size=2)
        model = MAML(MLP(1, [16, 16]), task="regression", inner_lr=0.01, inner_steps=2, lr=0.01,
                     per_task_backward=algo == "maml_pertask")
    elif algo == "maml_conv":
        dm = ShardDataModule(shards=shards, ways=3, shots=1, queries=2, meta_batch_size=4, train_episodes=8,
                             val_episodes=6, eval_meta_batch_size=2, eval_queries=2)
        model = MAML(Conv4(1, 8, 16, norm="batch_no_stats"), ways=3, inner_lr=0.4, lr=0.01)
    else:
        dm = ShardDataModule(shards=shards, ways=3, shots=2, queries=2, meta_batch_size=4, train_episodes=8,
                             val_episodes=6, eval_meta_batch_size=2, eval_queries=2)
        model = ProtoNet(Conv4(1, 8, 16), lr=0.01)
    model = model.double()
    dm_transfer = dm
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_epochs=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, deterministic=True,
    )
    model.on_before_batch_transfer = lambda batch, idx: batch.to(torch.float64)  # type: ignore[method-assign]
    trainer.fit(model, dm_transfer)
    metrics = trainer.validate(model, dm_transfer, verbose=False)[0]
    if trainer.global_rank == 0:
        flat = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()
        key = "val/mse" if algo.startswith("maml") and algo != "maml_conv" else "val/acc"
        np.savez(out, weights=flat, val=np.array(metrics[key]), n=np.array(metrics["val/episodes"]),
                 world=np.array(trainer.world_size))


if __name__ == "__main__":
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")
