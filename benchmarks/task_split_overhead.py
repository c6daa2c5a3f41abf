"""Per-task overhead of the MAML family's task-by-task training step, A/B in one process.

The default training step (``MetaLearner._task_split_loss``) differentiates each task's share of
the meta-loss right after its forward. Where kernels cost little (a tiny Conv-4 on a CPU, or any
small model on a GPU, where the step is bound by dispatch) it ran slower than one backward over
the whole meta-batch (``inner_loop_gpu.md``, run D). This script times, interleaved on the same
episodes:

- ``per-call``: each task's term from its own ``meta_loss`` call (the generic
  ``MetaLearner._task_losses``, which re-does the parameter dicts and BatchNorm policy per task);
- ``setup once``: MAML's ``_task_losses`` (the default since the thirteenth session), which sets
  them up once per meta-batch and yields the per-task terms;
- ``one backward``: ``meta_loss`` over the whole meta-batch, then one backward.

    OMP_NUM_THREADS=1 python benchmarks/task_split_overhead.py --hidden 1 --size 16 --meta-batch 8 --steps 1 --rounds 40

Median milliseconds per meta-gradient; read the ratios.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inner_loop  # noqa: E402  (the same learners and episodes as the speed table)

from lightning_meta.algorithms.base import MetaLearner  # noqa: E402
from lightning_meta.algorithms.maml import MAML  # noqa: E402


def main() -> None:
    a = inner_loop.small_conv4_arguments(__doc__.splitlines()[0], steps=1, rounds=40)
    models = inner_loop.learners(a.steps)
    split, one = models["MAML 2nd order"], models[inner_loop.ONE_BACKWARD]
    batch = inner_loop.make_batch(a.meta_batch)
    setup_once = MAML._task_losses

    def run(variant: str) -> float:
        MAML._task_losses = setup_once if variant == "setup once" else MetaLearner._task_losses
        model = one if variant == "one backward" else split
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        if variant == "one backward":
            one.meta_loss(batch).backward()
        else:
            split._task_split_loss(batch).backward()
        return time.perf_counter() - start

    variants = ("per-call", "setup once", "one backward")
    times: dict[str, list[float]] = {v: [] for v in variants}
    try:
        for v in variants:  # warm-up
            for _ in range(3):
                run(v)
        for _ in range(a.rounds):
            for v in variants:
                times[v].append(run(v))
    finally:
        MAML._task_losses = setup_once
    base = statistics.median(times["per-call"])
    print(f"Conv-4-{a.hidden} {a.size}x{a.size}, meta-batch {a.meta_batch}, {a.steps} inner step(s), "
          f"{a.rounds} interleaved rounds, torch {torch.__version__}, 1 thread")
    print("| variant | ms per meta-gradient (median) | vs per-call |\n|---|---|---|")
    for v in variants:
        m = statistics.median(times[v])
        print(f"| {v} | {m * 1e3:.2f} | {m / base:.3f}x |")


if __name__ == "__main__":
    main()
