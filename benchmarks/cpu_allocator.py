"""A/B of glibc's malloc settings on the CPU meta-gradient: does returning memory to the OS cost time?

On Linux, glibc's ``malloc`` hands large blocks back to the kernel when they are freed (blocks
above the mmap threshold are unmapped; the top of the heap is trimmed). The next meta-batch then
touches the same amount of fresh memory again, and every new 4 KiB page is a *minor page fault*
that the kernel zero-fills. A learner's meta-gradient allocates and frees hundreds of MB per call,
so this can be a visible share of its time, and it depends on how much memory the call holds at
once: a whole meta-batch graph (our default) holds more than one task's graph at a time
(``per_task_backward=True``, or ``higher``'s loop).

This script measures that effect and nothing else. It runs the same timing (the contenders of
``benchmarks/inner_loop.py``: the supervised step, second-order MAML with and without per-task
backward, and ``higher``) in child processes that alternate between two environments:

- ``default``: glibc as shipped;
- ``keep``: ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=<1 TiB>``, i.e. no
  block is ever given back to the kernel, so freed memory is reused without page faults.

Each child times every contender in interleaved rounds (median) and counts the minor page faults
of each call (``getrusage``). Children alternate ``default``/``keep`` ``--pairs`` times; the table
reports the median over the pairs. Usage (records in ``benchmarks/inner_loop.md``)::

    OMP_NUM_THREADS=1 python benchmarks/cpu_allocator.py --meta-batch 8 --steps 1 5 --pairs 3 --rounds 5

The ``keep`` setting is for a dedicated training process: its resident memory stays at its peak.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
KEEP = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776"
CONTENDERS = ["supervised fwd+bwd", "MAML 2nd order", "MAML 2nd order, per-task backward"]


def _inner_loop():
    spec = importlib.util.spec_from_file_location("inner_loop_bench", HERE / "inner_loop.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(tasks: int, steps: int, rounds: int) -> dict:
    """Time the contenders in this process; return median seconds and median minor faults per call."""
    import torch

    torch.set_num_threads(1)
    il = _inner_loop()
    runs, modules, peer = il.contenders(steps)
    names = CONTENDERS + [peer]
    batch = il.make_batch(tasks)
    for _ in range(2):  # warm-up at the timed size: the first calls grow the heap
        for n in names:
            modules[n].zero_grad(set_to_none=True)
            runs[n](batch)
    secs: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    for _ in range(rounds):
        for n in names:
            modules[n].zero_grad(set_to_none=True)
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            runs[n](batch)
            secs[n].append(time.perf_counter() - t0)
            faults[n].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {"names": names, "s": {n: statistics.median(v) for n, v in secs.items()},
            "faults": {n: statistics.median(v) for n, v in faults.items()}}


def run_child(env_name: str, tasks: int, steps: int, rounds: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GLIBC_TUNABLES", None)
    if env_name == "keep":
        env["GLIBC_TUNABLES"] = KEEP
    out = subprocess.run([sys.executable, __file__, "--child", str(tasks), str(steps), str(rounds)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--meta-batch", type=int, nargs="+", default=[8])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    p.add_argument("--pairs", type=int, default=3, help="alternations of a default and a keep child")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per child (median)")
    p.add_argument("--out", type=Path, help="write the markdown here (default: print only)")
    p.add_argument("--child", type=int, nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(*a.child)))
        return
    for v, flag in ((a.pairs, "--pairs"), (a.rounds, "--rounds")):
        if v < 1:
            raise SystemExit(f"{flag} {v}: must be at least 1")
    start, load = time.time(), os.getloadavg()[0]
    lines = ["| meta-batch, steps | learner | s per call: default | keep | keep / default "
             "| time / supervised: default | keep | minor page faults per call: default | keep |",
             "|---|---|---|---|---|---|---|---|---|"]
    for tasks in a.meta_batch:
        for steps in a.steps:
            res: dict[str, list[dict]] = {"default": [], "keep": []}
            for _ in range(a.pairs):
                for env_name in ("default", "keep"):
                    res[env_name].append(run_child(env_name, tasks, steps, a.rounds))
            names = res["default"][0]["names"]

            def med(env_name: str, key: str, name: str, res: dict[str, list[dict]] = res) -> float:
                return statistics.median(r[key][name] for r in res[env_name])

            sup = {e: med(e, "s", "supervised fwd+bwd") for e in res}
            for n in names:
                d, k = med("default", "s", n), med("keep", "s", n)
                lines.append(f"| B={tasks}, k={steps} | {n} | {d:.3f} | {k:.3f} | {k / d:.2f} | "
                             f"{d / sup['default']:.2f}x | {k / sup['keep']:.2f}x | "
                             f"{med('default', 'faults', n):,.0f} | {med('keep', 'faults', n):,.0f} |")
            print(f"B={tasks} k={steps} done ({time.time() - start:.0f} s)", file=sys.stderr)
    import torch

    cmd = "OMP_NUM_THREADS=1 python benchmarks/cpu_allocator.py " + shlex.join(sys.argv[1:])
    head = [
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today()}; torch {torch.__version__}; glibc {platform.libc_ver()[1]}; "
        f"{platform.machine()}, {os.cpu_count()} cores visible (load average at start {load:.1f}); "
        f"{a.pairs} alternating pairs of child processes, {a.rounds} timed rounds each (medians)",
        "",
    ]
    text = "\n".join(head + lines + ["", f"Total wall time: {time.time() - start:.0f} s."]) + "\n"
    print(text)
    if a.out:
        a.out.write_text(text)


if __name__ == "__main__":
    main()
