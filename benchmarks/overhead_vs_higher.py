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

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inner_loop  # noqa: E402  (the same contenders as the speed table)


def main() -> None:
    a = inner_loop.small_conv4_arguments(__doc__.splitlines()[0], steps=5, rounds=15)
    runs, modules, peer = inner_loop.contenders(a.steps)
    if not peer.startswith("higher"):
        a.parser.error("higher is not installed: pip install -e '.[bench]'")
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
