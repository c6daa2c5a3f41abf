"""Framework overhead of our second-order MAML against ``higher``'s, with kernels made nearly free.

At Conv-4-64 on 28x28 images the convolution kernels dominate a meta-gradient, and ours and
``higher``'s run the same kernels (``profile_vs_higher.py``), so the two are level within this
machine's noise (``inner_loop.md``). This script shrinks the network (``--hidden`` channels,
``--size`` pixels) until the kernels cost little, so that what is left is the per-step work of the
two implementations: Python, dispatch, autograd bookkeeping. Same episodes, same steps, interleaved
rounds, median seconds per meta-batch; the ratio is the number to read.

    OMP_NUM_THREADS=1 python benchmarks/overhead_vs_higher.py --hidden 1 --size 16 --meta-batch 8 --steps 5 --rounds 15

Needs ``higher`` (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inner_loop  # noqa: E402  (the same contenders as the speed table)

from lightning_meta.backbones import Conv4  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1, help="channels of every Conv-4 block (64 in the speed table)")
    p.add_argument("--size", type=int, default=16, help="image side (>= 16 for four 2x2 poolings)")
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=15)
    a = p.parse_args()
    torch.set_num_threads(1)
    inner_loop.SIZE = a.size

    def small_body() -> Conv4:
        torch.manual_seed(0)
        return Conv4(1, a.hidden, a.size, norm="batch_no_stats")

    inner_loop.body = small_body
    runs, modules, peer = inner_loop.contenders(a.steps)
    if not peer.startswith("higher"):
        p.error("higher is not installed: pip install -e '.[bench]'")
    names = ["MAML 2nd order", peer]
    batch = inner_loop.make_batch(a.meta_batch)
    for name in names:  # warm-up
        for _ in range(3):
            modules[name].zero_grad(set_to_none=True)
            runs[name](batch)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(a.rounds):
        for name in names:
            modules[name].zero_grad(set_to_none=True)
            start = time.perf_counter()
            runs[name](batch)
            times[name].append(time.perf_counter() - start)
    med = {n: statistics.median(t) for n, t in times.items()}
    print(f"Conv-4-{a.hidden} at {a.size}x{a.size}, meta-batch {a.meta_batch}, {a.steps} inner step(s), "
          f"{a.rounds} interleaved rounds, one thread, torch {torch.__version__}")
    for name in names:
        print(f"| {name} | {med[name] * 1000:.1f} ms |")
    print(f"our speed / higher's: {med[peer] / med['MAML 2nd order']:.2f}x")


if __name__ == "__main__":
    main()
