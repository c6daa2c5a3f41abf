"""Trains a tiny meta-learner with 1 plain process or N DeepSpeed CPU processes and saves the final weights.

Run by tests/test_deepspeed.py as::

    python tests/deepspeed_script.py ALGO MODE WORLD OUT [SHARDS]

ALGO: ``maml`` (second order, sinusoid MLP), ``mamlhead`` / ``mamlfirst`` (the same with
``adapt_filter="head"`` / the first layer and the head), ``lora`` (MAML adapting LoRA factors),
``film`` / ``cavia`` (MAML adapting FiLM
parameters / a CAVIA context after the first layer), ``anil`` (sinusoid MLP) or ``protonet``
(glyph shards).
MODE: ``plain`` (Lightning's default strategy, WORLD must be 1), ``zero0``/``zero1``/``zero2``/``zero3``
(:class:`CPUDeepSpeedStrategy` with that ZeRO stage; ZeRO-3 gathers the weights before saving),
``zero2_pertask`` (ZeRO-2 with one ``manual_backward`` per task through ``per_task_backward=True``),
``zero2_pertask_noboundary`` (the same without the gradient-accumulation boundary: the known-wrong
variant), ``zero2_resume`` / ``zero3_resume`` (train 3 steps, save a DeepSpeed checkpoint, resume
in a fresh Trainer to the end), ``plain_val`` / ``zero3_val`` (validate every 3 steps; the
last ``val/mse`` is saved), or ``plain_evalckpt`` / ``zero2_evalckpt`` / ``zero3_evalckpt`` (train
3 steps, save, then ``Trainer.validate(ckpt_path=...)`` with fresh weights in a fresh Trainer;
``zero2_evalckpt3`` validates the ZeRO-2 checkpoint under ZeRO-3, which must be refused).
The global meta-batch is the same whatever WORLD is. Lightning re-launches this script for the
other ranks.
"""

from __future__ import annotations

import os
import sys

import lightning as L
import numpy as np
import torch

MAX_STEPS = 6


def build(algo: str, pertask: bool, shards: str):
    from lightning_meta.algorithms import ANIL, MAML, ProtoNet
    from lightning_meta.backbones import MLP, Conv4
    from lightning_meta.backbones.adapters import FiLMBackbone
    from lightning_meta.datamodules import ShardDataModule, SinusoidDataModule

    L.seed_everything(0, verbose=False)
    if algo in ("maml", "mamlhead", "mamlfirst", "anil"):
        dm = SinusoidDataModule(meta_batch_size=4, train_episodes=16, val_episodes=4, eval_meta_batch_size=2)
        filters = {"mamlhead": "head", "mamlfirst": r"net\.0\.|head"}  # mamlfirst: first layer and head adapt
        kwargs = {"adapt_filter": filters[algo]} if algo in filters else {}
        cls = ANIL if algo == "anil" else MAML
        model = cls(MLP(1, [16, 16]), task="regression", inner_lr=0.01, inner_steps=2, lr=0.01,
                    per_task_backward=pertask, **kwargs)
    elif algo == "lora":  # MAML adapting rank-1 LoRA factors on every Linear; the base weights train outside
        from lightning_meta.backbones.adapters import LoRABackbone

        dm = SinusoidDataModule(meta_batch_size=4, train_episodes=16, val_episodes=4, eval_meta_batch_size=2)
        model = MAML(LoRABackbone(MLP(1, [16, 16]), rank=1, freeze="none"), task="regression", inner_lr=0.05,
                     inner_steps=2, lr=0.01, adapt_filter="lora")
    elif algo in ("film", "cavia"):  # MAML adapting FiLM parameters / a CAVIA context after the first layer
        dm = SinusoidDataModule(meta_batch_size=4, train_episodes=16, val_episodes=4, eval_meta_batch_size=2)
        body = FiLMBackbone(MLP(1, [16, 16]), target=r"net\.0$", context_dim=4 if algo == "cavia" else 0)
        model = MAML(body, task="regression", inner_lr=0.01, inner_steps=2, lr=0.01, adapt_filter="film")
    else:
        dm = ShardDataModule(shards=shards, ways=3, shots=2, queries=2, meta_batch_size=4, train_episodes=16,
                             val_episodes=4, eval_meta_batch_size=2, eval_queries=2)
        cls = ProtoNet
        # float32 only (Lightning's DeepSpeed precision plugin casts modules to "32-true"). Adam turns
        # float32 rounding noise in near-zero gradients (conv biases before BatchNorm are exactly
        # zero) into lr-sized steps, so 1 vs 2 processes differ by ~1e-3 even under plain DDP;
        # SGD with momentum keeps the comparison at rounding level.
        model = cls(Conv4(1, 8, 16, norm="none"), ways=3, lr=0.05)
        model.configure_optimizers = lambda: torch.optim.SGD(  # type: ignore[method-assign]
            model.parameters(), lr=0.05, momentum=0.9)
        if pertask:
            model.per_task_backward, model.automatic_optimization = True, False
    return model, dm


def trainer_for(mode: str, world: int, max_steps: int, root: str, checkpoint_every: int = 0) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_meta.strategies import CPUDeepSpeedStrategy

    base = mode.split("_")[0]
    if base in ("plain", "ddp"):
        strategy = "auto" if base == "plain" else "ddp"
    else:
        strategy = CPUDeepSpeedStrategy(stage=int(base[4]))
    val = "val" in mode.split("_")  # validate every 3 steps (2 meta-batches) and keep the last val/mse
    return L.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=max_steps, limit_val_batches=2 if val else 0,
        val_check_interval=3 if val else None,
        logger=False, enable_checkpointing=bool(checkpoint_every), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, deterministic=True, default_root_dir=root,
        callbacks=[ModelCheckpoint(dirpath=os.path.join(root, "ckpt"), every_n_train_steps=checkpoint_every,
                                   save_top_k=-1, filename="{step}")] if checkpoint_every else None,
    )


def main(algo: str, mode: str, world: int, out: str, shards: str) -> None:
    torch.set_num_threads(1)
    pertask = "pertask" in mode
    model, dm = build(algo, pertask, shards)
    if mode.endswith("noboundary"):
        from lightning_meta.strategies import CPUDeepSpeedStrategy

        CPUDeepSpeedStrategy.set_task_boundary = lambda self, last: None  # type: ignore[method-assign]
    root = os.path.dirname(os.path.abspath(out))
    init = torch.cat([p.detach().flatten() for p in model.parameters()]).double().numpy().copy()
    if mode.endswith("resume"):
        # a run killed after step 3 (mid-epoch: an epoch holds 4 meta-batches) left a checkpoint
        stop = MAX_STEPS // 2
        trainer = trainer_for(mode, world, stop, root, checkpoint_every=stop)
        trainer.fit(model, dm)
        ckpt = os.path.join(root, "ckpt", f"step={stop}.ckpt")
        model, dm = build(algo, pertask, shards)  # fresh weights: everything must come from the checkpoint
        trainer = trainer_for(mode, world, MAX_STEPS, root)
        trainer.fit(model, dm, ckpt_path=ckpt)
    elif mode.endswith(("evalckpt", "evalckpt3")):
        # train 3 steps and save; a fresh model in a fresh Trainer validates from the checkpoint only
        stop = MAX_STEPS // 2
        trainer = trainer_for(mode, world, stop, root, checkpoint_every=stop)
        trainer.fit(model, dm)
        ckpt = os.path.join(root, "ckpt", f"step={stop}.ckpt")
        model, dm = build(algo, pertask, shards)
        # evalckpt3: validate under ZeRO-3 whatever stage saved the checkpoint
        trainer = trainer_for(("zero3" if mode.endswith("3") else mode.split("_")[0]) + "_val", world, stop, root)
        trainer.validate(model, dm, ckpt_path=ckpt)
    else:
        trainer = trainer_for(mode, world, MAX_STEPS, root)
        trainer.fit(model, dm)
    params = list(model.parameters())
    if getattr(trainer.strategy, "zero_stage", 0) == 3:  # partitioned weights: gather them on every rank
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            flat = torch.cat([p.detach().flatten() for p in params]).double().numpy().copy()
    else:
        flat = torch.cat([p.detach().flatten() for p in params]).double().numpy()
    if trainer.global_rank == 0:
        val = float(trainer.callback_metrics.get("val/mse", float("nan")))
        np.savez(out, weights=flat, init=init, val=np.array(val), world=np.array(trainer.world_size),
                 step=np.array(trainer.global_step),
                 dtype=np.array(str(next(model.parameters()).dtype)))


if __name__ == "__main__":
    os.environ.setdefault("PL_DISABLE_FORK", "1")
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "")
