"""Trains tiny meta-learners with 1 or 2 CPU processes (gloo) and saves the final weights.

Run by tests/test_ddp.py as::

    python tests/ddp_script.py NAMES WORLD OUT [SHARDS]

NAMES is one key of ``_models()`` or a comma-separated list of them: each is trained in turn
(a fresh model, datamodule and Trainer, seeded alike) and then validated, all in the same
processes, so one launch covers several algorithms. Lightning's ``ddp`` strategy re-launches
this script for rank 1; later Trainers in the same script reuse the process group. OUT (``.npz``)
holds ``<name>/weights`` (and ``<name>/init``, before training), ``<name>/running_stats`` (BatchNorm
running means and variances; ``<name>/init_stats`` before training, ``<name>/running_stats_rank1``
those of the last rank), ``<name>/batches_tracked`` (every ``num_batches_tracked``), ``<name>/val``
(the validation score), ``<name>/n`` (validation episodes counted) and ``<name>/step`` for each
name, and ``world``. Everything runs in float64, so 1 and 2 processes differ by summation order
only (up to ~1e-7 after Adam scales the round-off in the zero gradients of conv biases before
BatchNorm).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch


def _sine(**kw: Any):
    from lightning_meta.datamodules import SinusoidDataModule

    args = dict(meta_batch_size=4, train_episodes=16, val_episodes=6, test_episodes=6, eval_meta_batch_size=2)
    return SinusoidDataModule(**{**args, **kw})


def _small_sine():
    # shorter episodes for the sequence learners and the second-order variants
    return _sine(shots=4, queries=4, eval_queries=4, train_episodes=8)


def _glyphs(shards: str, shots: int = 2, **kw: Any):
    from lightning_meta.datamodules import ShardDataModule

    args = dict(ways=3, shots=shots, queries=2, meta_batch_size=4, train_episodes=8, val_episodes=6,
                eval_meta_batch_size=2, eval_queries=2)
    return ShardDataModule(shards=shards, **{**args, **kw})


def _models() -> dict[str, Callable[[str], tuple[L.LightningModule, L.LightningDataModule]]]:
    from lightning_meta import algorithms as A
    from lightning_meta.backbones import MLP, Conv4

    seq = {"task": "regression", "ways": 0, "max_len": 5, "lr": 0.01}
    return {
        # the four algorithm families named by issue 6, and per-task backward
        "maml": lambda s: (A.MAML(MLP(1, [16, 16]), task="regression", inner_lr=0.01, inner_steps=2, lr=0.01),
                           _sine()),
        "maml_pertask": lambda s: (A.MAML(MLP(1, [16, 16]), task="regression", inner_lr=0.01, inner_steps=2, lr=0.01,
                                          per_task_backward=True), _sine()),
        "maml_conv": lambda s: (A.MAML(Conv4(1, 8, 16, norm="batch_no_stats"), ways=3, inner_lr=0.4, lr=0.01),
                                _glyphs(s, shots=1)),
        "anil": lambda s: (A.ANIL(MLP(1, [16, 16]), task="regression", inner_lr=0.01, inner_steps=2, lr=0.01),
                           _sine()),
        "protonet": lambda s: (A.ProtoNet(Conv4(1, 8, 16), ways=3, lr=0.01), _glyphs(s)),
        # every other algorithm shipped so far
        "metasgd": lambda s: (A.MetaSGD(MLP(1, [8, 8]), task="regression", inner_lr=0.01, inner_steps=2, lr=0.01),
                              _small_sine()),
        "reptile": lambda s: (A.Reptile(MLP(1, [8, 8]), task="regression", inner_lr=0.02, inner_steps=2, lr=0.5),
                              _small_sine()),
        # the Reptile paper's recipe: inner Adam carried across steps (beta1 > 0 to carry both moments),
        # inner mini-batches keyed by the global task index, evaluation mini-batches by the support set
        "reptile_paper": lambda s: (A.Reptile(MLP(1, [8, 8]), task="regression", inner_optimizer="adam",
                                              inner_betas=(0.5, 0.99), inner_lr=0.01, inner_steps=3,
                                              inner_batch_size=3, eval_inner_batch_size=2, lr=1.0, lr_final=0.2),
                                    _small_sine()),
        "mamlpp": lambda s: (A.MAMLPlusPlus(MLP(1, [8, 8]), task="regression", inner_lr=0.01, inner_steps=2,
                                            msl_anneal_epochs=2, lr=0.01), _small_sine()),
        "mamlpp_conv": lambda s: (A.MAMLPlusPlus(Conv4(1, 4, 16), ways=3, inner_lr=0.1, inner_steps=2, bn="per_step",
                                                 msl_anneal_epochs=2, lr=0.01), _glyphs(s, shots=1)),
        "imaml": lambda s: (A.IMAML(MLP(1, [8, 8]), task="regression", inner_lr=0.05, inner_steps=3, cg_steps=3,
                                    lam=1.0, lr=0.01), _small_sine()),
        "matchingnet": lambda s: (A.MatchingNet(Conv4(1, 4, 16), fce=True, fce_steps=2, ways=3, lr=0.01), _glyphs(s)),
        "matchingnet_pertask": lambda s: (A.MatchingNet(Conv4(1, 4, 16), fce=True, fce_steps=2, ways=3, lr=0.01,
                                                        per_task_backward=True), _glyphs(s)),
        "relationnet": lambda s: (A.RelationNet(Conv4(1, 4, 16, pool_blocks=2, flatten=False), relation_channels=4,
                                                ways=3, lr=0.01), _glyphs(s)),
        "metaoptnet": lambda s: (A.MetaOptNet(Conv4(1, 4, 16), ridge_lambda=1.0, scale=2.0, ways=3, lr=0.01),
                                 _glyphs(s)),
        "snail": lambda s: (A.SNAIL(MLP(1, [8]), tc_filters=4, attention=[(4, 4), (4, 4)], **seq), _small_sine()),
        "transformer": lambda s: (A.TransformerICL(MLP(1, [8]), d_model=8, num_heads=2, num_layers=1,
                                                   dim_feedforward=16, **seq), _small_sine()),
        "mann": lambda s: (A.MANN(MLP(1, [8]), hidden_size=8, memory_slots=4, memory_width=4, read_heads=1,
                                  label_offset=False, **seq), _small_sine()),
    }


#: learners whose run also tests a CheckpointEnsemble (of the initial and the trained weights)
ENSEMBLE_NAMES = ("maml",)


def _running_stats(model: torch.nn.Module) -> torch.Tensor:
    """Every BatchNorm running mean and variance of ``model``, flattened (float64)."""
    stats = [b.detach().double().flatten() for n, b in model.named_buffers()
             if n.endswith(("running_mean", "running_var"))]
    return torch.cat(stats) if stats else torch.zeros(0, dtype=torch.float64)


class _StatsAtBatchEnd(L.Callback):
    """What a checkpoint callback saves: the running statistics when callbacks' ``on_train_batch_end`` runs.

    Lightning calls the callbacks' hook before the module's, so statistics synchronised only in
    the module's hook would reach ``ModelCheckpoint`` / ``PreemptionCheckpoint`` files unsynchronised.
    """

    def __init__(self) -> None:
        self.last = torch.zeros(0, dtype=torch.float64)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.last = _running_stats(pl_module).clone()


def run_one(name: str, world: int, shards: str) -> dict[str, np.ndarray]:
    """Trains and validates ``name``; returns its final weights and validation score (rank 0 only)."""
    L.seed_everything(0, verbose=False)
    model, dm = _models()[name](shards)
    model = model.double()
    probe = _StatsAtBatchEnd()
    model.on_before_batch_transfer = lambda batch, idx: batch.to(torch.float64)  # type: ignore[method-assign]
    trainer = L.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_epochs=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, check_val_every_n_epoch=100, deterministic=True, callbacks=[probe],
    )
    init = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()
    init_stats = _running_stats(model)
    folder = os.environ.get("DDP_SCRIPT_DIR", ".")
    rank_tag = os.environ.get("LOCAL_RANK", "0")
    init_ckpt = os.path.join(folder, f"{name}.init.rank{rank_tag}.ckpt")  # every rank writes its own copy
    if name in ENSEMBLE_NAMES:
        torch.save({"state_dict": model.state_dict()}, init_ckpt)
    trainer.fit(model, dm)
    metrics = trainer.validate(model, dm, verbose=False)[0]
    score = "val/mse" if "val/mse" in metrics else "val/acc"
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).numpy()
    stats = _running_stats(model)
    last_rank_stats = trainer.strategy.all_gather(stats)[-1] if world > 1 and stats.numel() else stats
    tracked = [b.detach().flatten() for n, b in model.named_buffers() if n.endswith("num_batches_tracked")]
    extra = {}
    if name in ENSEMBLE_NAMES:  # the test score of the ensemble of the initial and the trained weights
        from lightning_meta.callbacks import CheckpointEnsemble

        final_ckpt = os.path.join(folder, f"{name}.final.ckpt")
        trainer.save_checkpoint(final_ckpt)  # every rank calls it; rank 0 writes
        tester = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", logger=False,
                           enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                           deterministic=True, callbacks=[CheckpointEnsemble([init_ckpt, final_ckpt])])
        test = tester.test(model, datamodule=_models()[name](shards)[1], verbose=False)[0]
        extra = {f"{name}/ensemble_test": np.array(test["test/mse"]), f"{name}/ensemble_n": np.array(
            test["test/episodes"]), f"{name}/ensemble_size": np.array(test["test/ensemble_size"])}
    return {**extra, f"{name}/weights": flat, f"{name}/init": init,
            f"{name}/running_stats": stats.numpy(), f"{name}/init_stats": init_stats.numpy(),
            f"{name}/running_stats_rank1": last_rank_stats.numpy(),
            f"{name}/stats_at_batch_end": probe.last.numpy(),
            f"{name}/batches_tracked": torch.cat(tracked).numpy() if tracked else np.zeros(0, dtype=np.int64),
            f"{name}/val": np.array(metrics[score]), f"{name}/n": np.array(metrics["val/episodes"]),
            f"{name}/step": np.array(trainer.global_step),
            "world": np.array(trainer.world_size), "rank": np.array(trainer.global_rank)}


def run_ensemble_top_k(world: int) -> dict[str, np.ndarray]:
    """MAML with a ModelCheckpoint keeping the 2 best and ``CheckpointEnsemble(top_k=2)`` testing them."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_meta import algorithms as A
    from lightning_meta.backbones import MLP
    from lightning_meta.callbacks import CheckpointEnsemble

    L.seed_everything(0, verbose=False)
    model = A.MAML(MLP(1, [16, 16]), task="regression", inner_lr=0.01, inner_steps=2, lr=0.01).double()
    model.on_before_batch_transfer = lambda batch, idx: batch.to(torch.float64)  # type: ignore[method-assign]
    folder = os.path.join(os.environ.get("DDP_SCRIPT_DIR", "."), f"ensemble_top_k.world{world}")
    keeper = ModelCheckpoint(dirpath=folder, monitor="val/mse", mode="min", save_top_k=2)
    ensemble = CheckpointEnsemble(top_k=2)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_epochs=3,
                        logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        deterministic=True, callbacks=[keeper, ensemble])
    trainer.fit(model, _sine())
    test = trainer.test(model, _sine(), verbose=False)[0]
    names = [os.path.basename(p) for p in ensemble.paths]
    return {"ensemble_top_k/mse": np.array(test["test/mse"]), "ensemble_top_k/n": np.array(test["test/episodes"]),
            "ensemble_top_k/members": np.array(sorted(names)),
            "world": np.array(trainer.world_size), "rank": np.array(trainer.global_rank)}


def main(names: str, world: int, out: str, shards: str) -> None:
    torch.set_num_threads(1)
    results: dict[str, np.ndarray] = {}
    for name in names.split(","):
        results.update(run_ensemble_top_k(world) if name == "ensemble_top_k" else run_one(name, world, shards))
    if int(results["rank"]) == 0:
        np.savez(out, **results)


if __name__ == "__main__":
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else "")
