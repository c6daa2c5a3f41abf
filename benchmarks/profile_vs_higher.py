"""Operator-level CPU profile of our second-order MAML and ``higher``'s on the same meta-batch.

Where does the few-percent gap at meta-batch 8, one inner step, on the 2-core machine come from
(``inner_loop.md``)? This script times both (interleaved rounds, median) and prints
``torch.profiler``'s per-operator self CPU time and call counts for one meta-gradient of each, so
the two can be compared operator by operator.

    OMP_NUM_THREADS=1 python benchmarks/profile_vs_higher.py --meta-batch 8 --steps 1 --rounds 7

Needs ``higher`` (``pip install -e ".[bench]"``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import inner_loop  # noqa: E402  (the same contenders as the speed table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rows", type=int, default=15, help="operators listed per profile")
    p.add_argument("--layouts", action="store_true",
                   help="also compare the (operator, input shapes, strides, dtypes) both run, on a 2-task batch")
    a = p.parse_args()
    torch.set_num_threads(1)
    runs, modules, peer = inner_loop.contenders(a.steps)
    if peer not in runs or not peer.startswith("higher"):
        p.error("higher is not installed: pip install -e '.[bench]'")
    batch = inner_loop.make_batch(a.meta_batch, seed=1)
    names = ["MAML 2nd order", peer]

    def call(name: str) -> float:
        modules[name].zero_grad(set_to_none=True)
        start = time.perf_counter()
        runs[name](batch)
        return time.perf_counter() - start

    for name in names:  # warm-up
        call(name)
        call(name)
    times: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(a.rounds):
        for name in names:
            times[name].append(call(name))
    print(f"meta-batch {a.meta_batch}, {a.steps} inner step(s), {a.rounds} interleaved rounds, one thread")
    for name in names:
        ts = sorted(times[name])
        print(f"{name}: median {ts[len(ts) // 2]:.3f} s (min {ts[0]:.3f}, max {ts[-1]:.3f})")
    for name in names:
        modules[name].zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            runs[name](batch)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n{name}: {len(events)} operator kinds, {sum(e.count for e in events)} calls, "
              f"self CPU total {total / 1e3:.0f} ms")
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: a.rows]:
            print(f"  {e.key:45s} {e.count:6d} calls  {e.self_cpu_time_total / 1e3:8.1f} ms")
    if a.layouts:
        small = inner_loop.make_batch(2, seed=1)
        seen = {name: operator_layouts(lambda n=name: runs[n](small)) for name in names}
        ours, theirs = seen[names[0]], seen[names[1]]
        print(f"\nlayouts (convolution, ReLU, pooling, BatchNorm inputs and outputs, meta-batch 2): "
              f"{len(ours)} distinct in ours, {len(theirs)} in {names[1]}; only ours: {len(set(ours) - set(theirs))}, "
              f"only theirs: {len(set(theirs) - set(ours))}, different counts: "
              f"{sum(ours[k] != theirs[k] for k in set(ours) & set(theirs))}")


def operator_layouts(fn) -> dict[tuple, int]:
    """How often each (operator, input shapes/strides/dtypes) of the heavy kernels runs during ``fn()``."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    heavy = ("conv", "relu", "clamp", "max_pool", "batch_norm")

    class Log(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: Counter = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            out = func(*args, **(kwargs or {}))
            if any(h in name for h in heavy):
                tensors = [t for t in (*args, out) if isinstance(t, torch.Tensor)]
                self.seen[(name, tuple((tuple(t.shape), t.stride(), str(t.dtype)) for t in tensors))] += 1
            return out

    log = Log()
    with log:
        fn()
    return dict(log.seen)


if __name__ == "__main__":
    main()
