"""Inner-loop speed and memory of the optimization-based learners, as ratios to a supervised step.

Conv-4-64 (BatchNorm with batch statistics, as MAML's reference code), 28x28x1 images, 5-way
1-shot 15-query episodes. Usage (records the tables in ``benchmarks/inner_loop.md``)::

    OMP_NUM_THREADS=1 python benchmarks/inner_loop.py --threads 1
    OMP_NUM_THREADS=1 python benchmarks/inner_loop.py --quick     # a few seconds' smoke run
    python benchmarks/inner_loop.py --device cuda --meta-batch 8 32 --rounds 3 3 --out benchmarks/inner_loop_gpu.md

**Speed.** For meta-batch 8 and 32 and 1 and 5 inner steps: episodes/s of one meta-gradient
(as the default ``training_step`` computes it, no optimizer step) for MAML (second and first order, and second
order with activation checkpointing, and second order with ``vmap`` over tasks), ANIL, Reptile,
Meta-SGD and iMAML, of the same second-order MAML written with ``higher`` (its canonical
``innerloop_ctx`` loop; a hand-written ``torch.autograd.grad`` loop when ``higher`` is missing or
broken), and of a plain supervised
forward+backward of the same network over the same images (all support and query images of the
meta-batch in one batch: the compute limit, DESIGN §6). Each round times every learner once, in
turn, on the same meta-batch; after warm-up rounds, the median over rounds is reported, and the
ratio ``time / supervised time`` is formed within the same run.

**Memory.** For 1, 5 and 10 inner steps: the peak number of bytes allocated by PyTorch's CPU
allocator while one meta-gradient is computed, above what was allocated before it started
(activations, saved tensors, gradients; the model and the data are excluded). It is read from
the allocation records of ``torch.profiler`` with ``profile_memory=True`` (accumulated in time
order; the peak of the running sum), so it is exact for PyTorch tensors and independent of the
machine's load. ``--mem-batch`` tasks per meta-batch (default 4). With ``--device cuda`` the timings synchronise
the device around each call, and the peak is ``torch.cuda.max_memory_allocated`` above the level
at the start (the caching allocator's view: also exact for PyTorch tensors).

**Arithmetic** (``--flops``): the convolution and matrix-multiply FLOPs of one meta-gradient of
each learner, counted by ``torch.utils.flop_counter.FlopCounterMode`` (forward, backward and
double-backward kernels alike), as a multiple of the supervised step's. This is the work the
algorithm asks for, independent of the machine: a time ratio below it means the learner runs its
kernels more efficiently than the one large supervised batch does, and no implementation of the
same algorithm can go below it on a compute-bound device without doing the arithmetic faster.
``--skip-speed`` leaves out the timed table (e.g. ``--flops --skip-speed --mem-steps`` prints
only the arithmetic, in about a minute).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.func import functional_call

from lightning_meta import Episode, collate_episodes
from lightning_meta.algorithms import ANIL, IMAML, MAML, MetaSGD, Reptile
from lightning_meta.backbones import Conv4

WAYS, SHOTS, QUERIES, SIZE = 5, 1, 15, 28
INNER_LR = 0.4
DEVICE = torch.device("cpu")  # set by --device


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def make_batch(tasks: int, seed: int = 0) -> Episode:
    g = torch.Generator().manual_seed(seed)
    eps = []
    for _ in range(tasks):
        eps.append(Episode(torch.randn(WAYS * SHOTS, 1, SIZE, SIZE, generator=g),
                           torch.arange(WAYS).repeat_interleave(SHOTS),
                           torch.randn(WAYS * QUERIES, 1, SIZE, SIZE, generator=g),
                           torch.arange(WAYS).repeat_interleave(QUERIES), torch.arange(WAYS)))
    return collate_episodes(eps).to(DEVICE)


def body() -> Conv4:
    torch.manual_seed(0)
    return Conv4(1, 64, SIZE, norm="batch_no_stats").to(DEVICE)


def small_conv4_arguments(description: str, steps: int, rounds: int) -> argparse.Namespace:
    """Command line of the scripts that shrink the Conv-4 until kernels cost little; applies it.

    ``--hidden`` and ``--size`` replace :func:`body` and ``SIZE`` of this module for the process;
    one thread.
    """
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--hidden", type=int, default=1, help="channels of every Conv-4 block (64 in the speed table)")
    p.add_argument("--size", type=int, default=16, help="image side (>= 16 for four 2x2 poolings)")
    p.add_argument("--meta-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--rounds", type=int, default=rounds)
    a = p.parse_args()
    torch.set_num_threads(1)
    global SIZE, body
    SIZE = a.size

    def small_body() -> Conv4:
        torch.manual_seed(0)
        return Conv4(1, a.hidden, a.size, norm="batch_no_stats").to(DEVICE)

    body = small_body
    a.parser = p
    return a


ONE_BACKWARD = "MAML 2nd order, one backward over the meta-batch"


def learners(steps: int) -> dict[str, torch.nn.Module]:
    """The meta-learners, all on a freshly initialised (identical) Conv-4-64."""
    common = {"ways": WAYS, "inner_steps": steps}
    models = {
        "MAML 2nd order": MAML(body(), inner_lr=INNER_LR, **common),
        "MAML 2nd order, vmap over tasks": MAML(body(), inner_lr=INNER_LR, task_batching="vmap", **common),
        "MAML 2nd order, per-task backward": MAML(body(), inner_lr=INNER_LR, per_task_backward=True, **common),
        ONE_BACKWARD: MAML(body(), inner_lr=INNER_LR, **common),
        "MAML 2nd order + checkpointing": MAML(body(), inner_lr=INNER_LR, activation_checkpointing=True, **common),
        "MAML 1st order": MAML(body(), inner_lr=INNER_LR, first_order=True, **common),
        "ANIL (2nd order)": ANIL(body(), inner_lr=INNER_LR, **common),
        "Reptile": Reptile(body(), inner_lr=0.1, **common),
        "Meta-SGD (2nd order)": MetaSGD(body(), inner_lr=INNER_LR, **common),
        "iMAML (5 CG steps)": IMAML(body(), inner_lr=0.1, lam=1.0, cg_steps=5, **common),
    }
    return {name: m.to(DEVICE) for name, m in models.items()}


# ---------------------------------------------------------------------------------------- peers
def higher_step(net: torch.nn.Module, steps: int) -> Callable[[Episode], None] | None:
    """Second-order MAML with ``higher`` (its documented MAML loop: one backward per task)."""
    try:
        import higher
    except ImportError:
        return None
    inner_opt = torch.optim.SGD(net.parameters(), lr=INNER_LR)

    def run(batch: Episode) -> None:
        for ep in batch.tasks():
            with higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(steps):
                    diffopt.step(F.cross_entropy(fnet(ep.support_x), ep.support_y))
                (F.cross_entropy(fnet(ep.query_x), ep.query_y) / batch.num_tasks).backward()

    return run


def autograd_step(net: torch.nn.Module, steps: int) -> Callable[[Episode], None]:
    """Second-order MAML written by hand with ``torch.autograd.grad(create_graph=True)``."""
    names = [n for n, _ in net.named_parameters()]

    def run(batch: Episode) -> None:
        losses = []
        for ep in batch.tasks():
            fast = list(net.parameters())
            for _ in range(steps):
                out = functional_call(net, dict(zip(names, fast, strict=True)), (ep.support_x,))
                grads = torch.autograd.grad(F.cross_entropy(out, ep.support_y), fast, create_graph=True)
                fast = [p - INNER_LR * g for p, g in zip(fast, grads, strict=True)]
            losses.append(F.cross_entropy(functional_call(net, dict(zip(names, fast, strict=True)), (ep.query_x,)),
                                          ep.query_y))
        torch.stack(losses).mean().backward()

    return run


def default_step(learner: torch.nn.Module) -> Callable[[Episode], None]:
    """One meta-gradient as our ``training_step`` computes it by default.

    The MAML family's per-task loop differentiates each task's share as soon as it is computed
    (``MetaLearner._task_split_loss``); the others (and ``vmap``) build the meta-batch's graph
    and run one backward.
    """

    def run(batch: Episode) -> None:
        loss = learner._task_split_loss(batch) if learner._splits_tasks(batch) else learner.meta_loss(batch)
        loss.backward()

    return run


def one_backward_step(learner: torch.nn.Module) -> Callable[[Episode], None]:
    """One graph over the whole meta-batch, one backward (the MAML family's default before 2026-11-27)."""
    return lambda batch: learner.meta_loss(batch).backward()


def per_task_step(learner: torch.nn.Module) -> Callable[[Episode], None]:
    """One meta-gradient as ``per_task_backward=True`` computes it: each task's loss / B, then its backward."""

    def run(batch: Episode) -> None:
        for i in range(batch.num_tasks):
            (learner.meta_loss(batch.select(i)) / batch.num_tasks).backward()

    return run


def supervised_step(net: torch.nn.Module) -> Callable[[Episode], None]:
    """One forward+backward of ``net`` over every support and query image of the meta-batch."""

    def run(batch: Episode) -> None:
        x = torch.cat([batch.support_x.flatten(0, 1), batch.query_x.flatten(0, 1)])
        y = torch.cat([batch.support_y.flatten(), batch.query_y.flatten()])
        F.cross_entropy(net(x), y).backward()

    return run


def contenders(steps: int) -> tuple[dict[str, Callable[[Episode], None]], dict[str, torch.nn.Module], str]:
    """``name -> run(batch)`` for the supervised step, our learners and the peer; the modules to zero."""
    models = learners(steps)
    runs: dict[str, Callable[[Episode], None]] = {}
    sup = MAML(body(), ways=WAYS).model.to(DEVICE)  # the head is created on the CPU
    runs["supervised fwd+bwd"] = supervised_step(sup)
    for name, m in models.items():
        if name == ONE_BACKWARD:
            runs[name] = one_backward_step(m)
        else:
            runs[name] = (per_task_step if m.per_task_backward else default_step)(m)
    peer_net = MAML(body(), ways=WAYS).model.to(DEVICE)
    peer = higher_step(peer_net, steps)
    peer_name = "higher, MAML 2nd order"
    if peer is None:
        peer, peer_name = autograd_step(peer_net, steps), "hand-written autograd.grad MAML 2nd order"
    try:  # higher may not work with this PyTorch: fall back, and say so in the table
        peer(make_batch(1, seed=99))
    except Exception as e:  # noqa: BLE001
        print(f"higher failed on torch {torch.__version__}: {type(e).__name__}: {e}; using a hand-written loop",
              file=sys.stderr)
        peer = autograd_step(peer_net, steps)
        peer_name = f"hand-written autograd.grad MAML 2nd order (higher failed: {type(e).__name__})"
    runs[peer_name] = peer
    modules = {"supervised fwd+bwd": sup, **models, peer_name: peer_net}
    return runs, modules, peer_name


# ---------------------------------------------------------------------------------------- speed
def time_speed(tasks: int, steps: int, rounds: int, warmup: int, only: list[str] | None = None) -> dict[str, float]:
    """Median seconds per meta-batch of every contender (interleaved rounds after full-size warm-up calls).

    ``only``: time just these contenders (and always the supervised step, the ratios' reference).
    """
    runs, modules, _ = contenders(steps)
    if only:
        unknown = sorted(set(only) - set(runs))
        if unknown:
            raise SystemExit(f"--only {unknown}: not contenders; choose from {sorted(runs)}")
        runs = {k: v for k, v in runs.items() if k == "supervised fwd+bwd" or k in only}
    # warm-up on a full-size meta-batch (other episodes): a first call at the timed size pays for its
    # allocations, which a smaller warm-up batch does not absorb and one timed round would then include
    batch, small = make_batch(tasks), make_batch(tasks, seed=2)
    for _ in range(warmup):
        for name, run in runs.items():
            modules[name].zero_grad(set_to_none=True)
            run(small)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            modules[name].zero_grad(set_to_none=True)
            sync()
            t = time.perf_counter()
            run(batch)
            sync()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------------- arithmetic
def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **_kw) -> int:
    """FLOPs of ``aten.convolution_backward`` that count grouped convolutions right.

    torch's own formula (torch 2.13) ignores ``groups`` in the weight gradient and so counts a
    grouped convolution's backward ``groups`` times too high. ``vmap`` over tasks runs every conv
    as a grouped one (one group per task), which made its count grow with the square of the
    meta-batch while its time grows linearly (checked: 1/4/16 tasks; pytorch/pytorch PR 183405
    adds the missing division). For ``groups=1`` this formula gives torch's numbers. Each of the input and the
    weight gradient is one convolution with the forward's multiply-adds: ``2 * N * |w| * |spatial|``,
    ``spatial`` being the output of the non-transposed convolution.
    """
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    per_gradient = 2 * x_shape[0] * math.prod(w_shape) * math.prod(spatial)
    return per_gradient * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(tasks: int, steps: int, only: list[str] | None = None) -> dict[str, int]:
    """Convolution/matmul FLOPs of one call of each contender on a ``tasks``-task meta-batch."""
    from torch.utils.flop_counter import FlopCounterMode

    runs, modules, _ = contenders(steps)
    batch = make_batch(tasks)
    out = {}
    for name, run in runs.items():
        if only and name != "supervised fwd+bwd" and name not in only:
            continue
        modules[name].zero_grad(set_to_none=True)
        counter = FlopCounterMode(display=False,
                                  custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops})
        with counter:
            run(batch)
        out[name] = counter.get_total_flops()
        modules[name].zero_grad(set_to_none=True)
    return out


def flops_table(a: argparse.Namespace) -> list[str]:
    """The markdown lines of the arithmetic table (``--flops``)."""
    lines = ["### Arithmetic: convolution/matmul GFLOPs of one meta-gradient and, in brackets, "
             "the multiple of the supervised step's", ""]
    counts = {(b, k): count_flops(b, k, a.only) for b in a.meta_batch for k in a.steps}
    header = ["learner"] + [f"B={b}, k={k}" for b in a.meta_batch for k in a.steps]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name in next(iter(counts.values())):
        cells = [f"{c[name] / 1e9:.1f} ({c[name] / c['supervised fwd+bwd']:.2f}x)" for c in counts.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


# --------------------------------------------------------------------------------------- memory
def peak_allocated(fn: Callable[[], None]) -> int | None:
    """Peak bytes allocated by PyTorch's allocator (CPU, or CUDA) during ``fn()``, above the level at its start."""
    if DEVICE.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(DEVICE)
        base = torch.cuda.memory_allocated(DEVICE)
        fn()
        sync()
        return torch.cuda.max_memory_allocated(DEVICE) - base
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
    except (ImportError, AttributeError, RuntimeError) as e:
        print(f"memory measurement unavailable: {e}", file=sys.stderr)
        return None
    allocs = []
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            allocs.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    allocs.sort(key=lambda a: a[0])
    cur = peak = 0
    for _, size in allocs:
        cur += size
        peak = max(peak, cur)
    return peak


MEMORY_ROWS = ["supervised fwd+bwd", "MAML 2nd order", "MAML 2nd order, vmap over tasks",
               "MAML 2nd order, per-task backward", ONE_BACKWARD,
               "MAML 2nd order + checkpointing", "MAML 1st order",
               "ANIL (2nd order)", "Reptile", "Meta-SGD (2nd order)", "iMAML (5 CG steps)"]


def measure_memory(tasks: int, steps: int, only: list[str] | None = None) -> dict[str, int | None]:
    runs, modules, peer_name = contenders(steps)
    batch, small = make_batch(tasks, seed=1), make_batch(1, seed=2)
    out = {}
    names = [*MEMORY_ROWS, peer_name]
    if only:  # the supervised step always, as in the timed table
        names = [n for n in names if n == "supervised fwd+bwd" or n in only]
    for name in names:
        modules[name].zero_grad(set_to_none=True)
        runs[name](small)  # warm-up (first-call allocations)
        modules[name].zero_grad(set_to_none=True)
        out[name] = peak_allocated(lambda n=name: runs[n](batch))
        modules[name].zero_grad(set_to_none=True)
    return out


HEADER = """# Inner loop: speed and memory of the optimization-based learners

Conv-4-64 (BatchNorm with batch statistics), 28x28x1, 5-way 1-shot 15-query episodes, one CPU
thread. Written by `benchmarks/inner_loop.py` (its docstring describes the method in full).

**Read only the ratios.** The machine is shared with other jobs and its load changes during a run,
so absolute episodes/s are not comparable between runs; every learner is timed in the same run,
interleaved with the supervised step it is divided by (a plain forward+backward of the same
network over all support and query images of the meta-batch), and only ratios within this run
mean anything. With one timed round (the larger meta-batch, to keep the run near ten minutes)
a ratio can be off by the load change between two calls; differences of 10-20% are within noise.

**Memory** is the peak of the bytes PyTorch's CPU allocator holds above the level at the start
of one meta-gradient (``torch.profiler`` allocation records, ``profile_memory=True``): activations,
saved tensors and gradients, not the model or the data. It does not depend on the load.

**Arithmetic** (``--flops``) is the convolution and matrix-multiply FLOPs of one meta-gradient
(``torch.utils.flop_counter``, with a groups-aware count for the convolution backward), the same
on every machine: how much work each algorithm asks for, next to how long it takes.
"""

GPU_HEADER = """# Inner loop on a GPU: speed and memory of the optimization-based learners

Conv-4-64 (BatchNorm with batch statistics), 28x28x1, 5-way 1-shot 15-query episodes, on one
CUDA device. Written by `benchmarks/inner_loop.py --device cuda` (its docstring describes the
method). Every learner is timed in the same run, interleaved with the supervised step it is
divided by; each timed call is bracketed by `torch.cuda.synchronize`. Memory is
`torch.cuda.max_memory_allocated` above the level at the start of one meta-gradient.
"""

NOTES = """Notes on the method:

- Each learner is timed as its default ``training_step`` computes the meta-gradient. For the
  MAML family's per-task loop (MAML, ANIL, Meta-SGD) that is task by task: each task's share of
  the meta-loss is differentiated right after its forward, so one task's graph is held at a time
  (``MetaLearner._task_split_loss``, the default since 2026-11-27). The ``one backward over the
  meta-batch`` row is the same MAML computed the way that default was before: the whole
  meta-batch's graph, then one backward. The ``per-task backward`` row is MAML with
  ``per_task_backward=True`` (manual optimisation: each task's loss divided by the meta-batch
  size, then its backward). The ``higher`` column uses its documented MAML loop, one backward per
  task. ``vmap``, Reptile and iMAML compute one meta-loss for the whole meta-batch.
- Checkpointing re-runs each inner step (forward, inner backward) in the outer backward.
- Reptile adapts on support + query (80 images per step), so its cost grows with k like k
  supervised steps; iMAML's inner steps keep no graph and its 5 conjugate-gradient steps are
  Hessian-vector products on the support set.
- ``vmap over tasks``: the same second-order MAML with ``task_batching='vmap'``; its BatchNorm
  layers then run as elementary operations (``lightning_meta.functional.norms``), because PyTorch's
  fused kernels give wrong second derivatives under ``vmap``.
"""


# ---------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--meta-batch", type=int, nargs="+", default=[8, 32])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    p.add_argument("--rounds", type=int, nargs="+", default=[3, 1],
                   help="timed rounds (median) for each --meta-batch value (the last repeats)")
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up calls per learner (full-size meta-batch)")
    p.add_argument("--mem-steps", type=int, nargs="*", default=[1, 5, 10], help="inner steps of the memory "
                   "table; none (a bare --mem-steps) skips it")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME",
                   help="time (and measure the memory of) only these learners (table names, e.g. 'MAML 2nd order'); "
                        "the supervised step always")
    p.add_argument("--mem-batch", type=int, default=4)
    p.add_argument("--flops", action="store_true", help="add the arithmetic table (FLOPs as a multiple of the "
                   "supervised step's)")
    p.add_argument("--skip-speed", action="store_true", help="leave out the timed table")
    p.add_argument("--quick", action="store_true", help="tiny smoke run (meta-batch 2, 1-2 steps, one round)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here (default: print only)")
    a = p.parse_args()
    if a.quick:
        a.meta_batch, a.steps, a.rounds, a.warmup, a.mem_steps, a.mem_batch = [2], [1, 2], [1], 1, [1, 2], 1
    global DEVICE
    DEVICE = torch.device(a.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {a.device}: no CUDA device is available; use --device cpu")
    rounds = {b: a.rounds[min(i, len(a.rounds) - 1)] for i, b in enumerate(a.meta_batch)}
    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    start = time.time()

    lines = [HEADER if DEVICE.type == "cpu" else GPU_HEADER]
    command = ("OMP_NUM_THREADS=1 " if DEVICE.type == "cpu" else "") + "python benchmarks/inner_loop.py " + shlex.join(
        sys.argv[1:])
    lines.append(f"Command: `{command.strip()}`  ")
    where = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible "
             f"(shared with other jobs; load average at start {os.getloadavg()[0]:.1f})")
    if DEVICE.type == "cuda":
        where = f"{torch.cuda.get_device_name(DEVICE)} (CUDA {torch.version.cuda})"
    lines.append(f"Date: {datetime.date.today().isoformat()}; torch {torch.__version__}; {a.threads} thread(s); "
                 f"{where}")
    lines.append("")
    if not a.skip_speed:
        lines.extend(speed_table(a, rounds, start))
    if a.flops:
        lines.extend(flops_table(a))
    if a.mem_steps:
        lines.extend(memory_table(a))
    lines.append(f"Total wall time: {time.time() - start:.0f} s.")
    lines.append("")
    lines.append(NOTES)
    text = "\n".join(lines)
    print(text)
    if a.out is not None:
        a.out.write_text(text + "\n")


def speed_table(a: argparse.Namespace, rounds: dict[int, int], start: float) -> list[str]:
    """The markdown lines of the timed table (episodes/s and ratios to the supervised step)."""
    lines = ["### Speed: episodes/s and, in brackets, time as a multiple of the supervised step", ""]
    lines.append("Timed rounds (median): " + ", ".join(f"B={b}: {r}" for b, r in rounds.items())
                 + f"; {a.warmup} warm-up call(s) per learner first.")
    lines.append("")
    header = ["learner"] + [f"B={b}, k={k}" for b in a.meta_batch for k in a.steps]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    results: dict[tuple[int, int], dict[str, float]] = {}
    for b in a.meta_batch:
        for k in a.steps:
            results[(b, k)] = time_speed(b, k, rounds[b], a.warmup, a.only)
            print(f"speed B={b} k={k} done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    names = list(next(iter(results.values())))
    for name in names:
        cells = []
        for b in a.meta_batch:
            for k in a.steps:
                r = results[(b, k)]
                cells.append(f"{b / r[name]:.2f} ep/s ({r[name] / r['supervised fwd+bwd']:.2f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def memory_table(a: argparse.Namespace) -> list[str]:
    """The markdown lines of the memory table (``--mem-steps``, ``--mem-batch``)."""
    start = time.time()
    lines = [f"### Memory: peak bytes allocated during one meta-gradient, meta-batch {a.mem_batch} (MiB)", ""]
    mem = {k: measure_memory(a.mem_batch, k, a.only) for k in a.mem_steps}
    print(f"memory done ({time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    mem_names = list(next(iter(mem.values())))
    header = ["learner"] + [f"k={k}" for k in a.mem_steps]
    if len(a.mem_steps) > 1:
        header.append(f"MiB per extra step (k={a.mem_steps[0]}..{a.mem_steps[-1]})")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for name in mem_names:
        vals = [mem[k][name] for k in a.mem_steps]
        cells = ["n/a" if v is None else f"{v / 2**20:.1f}" for v in vals]
        if len(a.mem_steps) > 1 and None not in vals:
            slope = (vals[-1] - vals[0]) / (a.mem_steps[-1] - a.mem_steps[0]) / 2**20
            cells.append(f"{slope:+.2f}")
        elif len(a.mem_steps) > 1:
            cells.append("n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


if __name__ == "__main__":
    main()
