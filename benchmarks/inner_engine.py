"""A/B of the per-task inner loop's gradient engine: ``torch.autograd.grad`` vs ``torch.func.grad``.

Outside ``torch.func`` transforms the inner loop takes its gradients with ``torch.autograd.grad``
(``lightning_meta.functional.inner_loop.inner_adapt``); inside them (``vmap``) it must use
``torch.func.grad``. This script times second-order MAML on Conv-4-64 (``benchmarks/inner_loop.py``'s
network and episodes) with each engine, interleaved with ``higher`` on the same meta-batch, and
checks that both engines give the same meta-gradient. The ``torch.func.grad`` variant is forced by
making ``inside_func_transform`` report a transform. Usage (records in ``benchmarks/inner_loop.md``)::

    OMP_NUM_THREADS=1 python benchmarks/inner_engine.py --meta-batch 8 --steps 5 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inner_loop as bench  # noqa: E402  (the network, episodes and higher loop of inner_loop.py)

import lightning_meta.functional.inner_loop as inner  # noqa: E402
from lightning_meta.algorithms import MAML  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    torch.set_num_threads(1)
    model = MAML(bench.body(), ways=bench.WAYS, inner_lr=bench.INNER_LR, inner_steps=a.steps)
    runs, modules, peer = bench.contenders(a.steps)
    batch, warm = bench.make_batch(a.meta_batch), bench.make_batch(a.meta_batch, seed=2)
    real = inner.inside_func_transform

    def meta_gradient(b) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        model.meta_loss(b).backward()
        return torch.cat([q.grad.flatten() for q in model.parameters()])

    def func_grad(b) -> torch.Tensor:
        inner.inside_func_transform = lambda: True
        try:
            return meta_gradient(b)
        finally:
            inner.inside_func_transform = real

    def higher(b) -> None:
        modules[peer].zero_grad(set_to_none=True)
        runs[peer](b)

    variants = {"torch.autograd.grad (default)": meta_gradient, "torch.func.grad": func_grad, peer: higher}
    for fn in variants.values():
        fn(warm)
    times: dict[str, list[float]] = {k: [] for k in variants}
    grads = {}
    for _ in range(a.rounds):
        for name, fn in variants.items():
            t = time.perf_counter()
            out = fn(batch)
            times[name].append(time.perf_counter() - t)
            if out is not None:
                grads[name] = out
    diff = (grads["torch.autograd.grad (default)"] - grads["torch.func.grad"]).abs().max().item()
    print(f"second-order MAML, Conv-4-64, meta-batch {a.meta_batch}, {a.steps} inner steps, {a.rounds} rounds, "
          f"1 thread; torch {torch.__version__}")
    print(f"max |meta-gradient difference| between the engines: {diff:.3g}")
    print("| variant | median s per meta-gradient | rounds (s) |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {', '.join(f'{x:.2f}' for x in ts)} |")


if __name__ == "__main__":
    main()
