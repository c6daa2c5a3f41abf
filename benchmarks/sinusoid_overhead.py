"""Per-iteration cost of MAML sinusoid meta-training: Lightning vs a plain PyTorch loop, same run.

Both sides run the same model code (``MAML.meta_loss`` with vmap over 25 tasks, one second-order
inner step, Adam 1e-3) on the same episodes; only the driver differs. Usage::

    OMP_NUM_THREADS=1 python benchmarks/sinusoid_overhead.py --steps 2000

Prints ms/iteration for both and their ratio (interleaved repeats, median reported).
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.backbones import MLP
from lightning_meta.callbacks import CompileMetaLoss
from lightning_meta.datamodules import SinusoidDataModule


def make(batching: str):
    torch.manual_seed(0)
    dm = SinusoidDataModule(meta_batch_size=25, train_episodes=10_000_000)
    model = MAML(MLP(1, [40, 40]), task="regression", inner_lr=0.01, task_batching=batching)
    return dm, model


def plain(steps: int, batching: str, compiled: bool = False) -> float:
    dm, model = make(batching)
    meta_loss = torch.compile(model.meta_loss) if compiled else model.meta_loss
    dm.setup("fit")
    opt = model.configure_optimizers()
    it = iter(dm.train_dataloader())
    model.train()
    for _ in range(10):  # warm-up (and compilation) outside the timed window, as on the Lightning side
        loss = meta_loss(next(it))
        opt.zero_grad()
        loss.backward()
        opt.step()
    t = time.perf_counter()
    for _ in range(steps - 10):
        batch = next(it)
        loss = meta_loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / (steps - 10) * 1e3


def lightning(steps: int, batching: str, compiled: bool = False) -> float:
    dm, model = make(batching)

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 10:
                self.t = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            self.ms = (time.perf_counter() - self.t) / (steps - 10) * 1e3

    timer = Timer()
    trainer = L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, log_every_n_steps=500,
                        callbacks=[timer, CompileMetaLoss()] if compiled else [timer])
    trainer.fit(model, dm)
    return timer.ms


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["vmap", "vmap+compile", "loop"],
                   help="task batching, optionally with +compile (torch.compile of meta_loss / CompileMetaLoss)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    for variant in a.variants:
        batching, _, extra = variant.partition("+")
        compiled = extra == "compile"
        pl, li = [], []
        for _ in range(a.repeats):
            pl.append(plain(a.steps, batching, compiled))
            li.append(lightning(a.steps, batching, compiled))
        mp, ml = statistics.median(pl), statistics.median(li)
        print(f"{variant}: plain {mp:.2f} ms/it, lightning {ml:.2f} ms/it, ratio {ml / mp:.2f}; "
              f"70,000 iterations: {70000 * ml / 60000:.1f} min", flush=True)


if __name__ == "__main__":
    main()
