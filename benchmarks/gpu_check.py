"""One-GPU check of the scale features (issue #6 item 5): one script, one table, under 5 minutes.

Usage::

    python benchmarks/gpu_check.py --out benchmarks/gpu_check.md                      # one CUDA GPU
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check.md

Sections (each row is computed on its own; a failing row prints its error in the table and the
traceback on stderr, and the script goes on):

1. **Strategies** -- second-order MAML (sinusoid MLP, meta-batch 4, Adam) trained for ``N`` steps
   with the plain single-device strategy, DDP on one device, and DeepSpeed ZeRO-2 on one device
   (automatic optimisation and one backward per task): the largest weight difference from the
   plain run (same seed, same episodes). Expected: float32 rounding only (<= 1e-6). Then the
   ZeRO-3 partial-adaptation path (ANIL, and MAML with ``adapt_filter="head"``) against the plain
   run of the same model; each ZeRO-3 row runs in a child process, since a failing ZeRO-3 run can
   end in a segmentation fault (seen on CPU) that would otherwise stop the whole script.
2. **bf16 drift** -- (a) the inner update ``theta_k - theta_0`` after k = 1/5/10 inner steps,
   relative error against float32 from the same (bf16-representable) weights, for autocast
   (``precision="bf16-mixed"``), a bf16 module with float32 fast weights (what MAML does under
   DeepSpeed bf16) and a bf16 module whose fast weights are bf16 too (no upcast, for contrast);
   (b) the weights after ``N`` outer steps with ``bf16-mixed`` vs ``32-true`` (plain and ZeRO-2).
3. **Peak memory** -- ``torch.cuda.max_memory_allocated`` above the model and data while one
   meta-gradient is computed (``meta_loss`` + ``backward``), at 1/5/10 inner steps, for MAML second
   order, first order, ANIL, MAML second order with activation checkpointing (Conv-4-64, 28x28,
   20-way 5-shot 15-query, meta-batch 4), and ViT-small + LoRA (5-way 1-shot). ``n/a`` on CPU.
4. **Throughput** -- episodes/s of one meta-gradient of second-order MAML (Conv-4-64 without
   BatchNorm, 5-way 1-shot 15-query, 1 and 5 inner steps) with the per-task loop and with ``vmap``,
   at meta-batch 8 and 32 (median of timed repeats after warm-up).

``--quick`` shrinks every model and count (a smoke test of the script, not a measurement). Nothing
is downloaded: the data are random tensors and the sinusoid family.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import inspect
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from lightning_meta import Episode, collate_episodes
from lightning_meta.algorithms import ANIL, MAML
from lightning_meta.backbones import MLP, Conv4
from lightning_meta.backbones.adapters import LoRABackbone
from lightning_meta.backbones.vit import ViT
from lightning_meta.functional import inner_adapt

HAS_CKPT = "activation_checkpointing" in inspect.signature(MAML).parameters


class Table:
    """Rows of one markdown table, printed as they come."""

    def __init__(self, title: str, header: list[str], note: str = "") -> None:
        self.title, self.header, self.note, self.rows = title, header, note, []
        print(f"\n## {title}\n", flush=True)

    def add(self, row: list[str]) -> None:
        self.rows.append(row)
        print(" | ".join(row), flush=True)

    def markdown(self) -> str:
        lines = [f"## {self.title}", ""]
        if self.note:
            lines += [self.note, ""]
        lines += ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"


def attempt(fn: Callable[[], list[str]], width: int) -> list[str]:
    """``fn()``, or a row whose cells say what failed (the traceback goes to stderr)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a check that fails is reported, the others still run
        traceback.print_exc()
        msg = f"error: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return [msg] + ["-"] * (width - 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fmt(x: float) -> str:
    return f"{x:.2e}" if x and (abs(x) < 1e-2 or abs(x) >= 1e4) else f"{x:.4g}"


# ------------------------------------------------------------------------------- 1. strategies
def _sinusoid_learner(kind: str, per_task_backward: bool = False) -> MAML:
    """``maml`` (second order, all weights adapt), ``anil``, ``head`` (MAML adapting only the head) or ``lora``."""
    if kind == "lora":  # rank-2 LoRA factors adapt; the base weights (trained in the outer loop) do not
        from lightning_meta.backbones.adapters import LoRABackbone

        return MAML(LoRABackbone(MLP(1, [40, 40]), rank=2, freeze="none"), task="regression", inner_lr=0.01,
                    inner_steps=1, per_task_backward=per_task_backward, adapt_filter="lora")
    if kind == "anil":
        return ANIL(MLP(1, [40, 40]), task="regression", inner_lr=0.01, inner_steps=1,
                    per_task_backward=per_task_backward)
    return MAML(MLP(1, [40, 40]), task="regression", inner_lr=0.01, inner_steps=1, per_task_backward=per_task_backward,
                adapt_filter="head" if kind == "head" else "all")


def _print_exception_now(trainer, pl_module, exception: BaseException) -> None:
    # Lightning prints a training error only after tearing the strategy down, and a failed ZeRO-3
    # run can crash in that teardown (SIGSEGV on CPU): print it before
    traceback.print_exception(exception)
    sys.stderr.flush()


def train_weights(strategy: str, args: argparse.Namespace, precision: str = "32-true",
                  per_task_backward: bool = False, kind: str = "maml") -> torch.Tensor:
    """Flattened float32 weights after ``args.steps`` outer steps of ``kind`` (see ``_sinusoid_learner``)."""
    import lightning as L

    import lightning_meta.strategies  # noqa: F401 - registers the deepspeed_* names
    from lightning_meta.datamodules import SinusoidDataModule

    report = L.Callback()
    report.on_exception = _print_exception_now  # type: ignore[method-assign]
    torch.manual_seed(0)
    model = _sinusoid_learner(kind, per_task_backward)
    dm = SinusoidDataModule(meta_batch_size=4, train_episodes=4 * args.steps, seed=0)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = L.Trainer(max_steps=args.steps, accelerator="gpu" if args.device.type == "cuda" else "cpu",
                            devices=1, strategy=strategy, precision=precision, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=tmp, callbacks=[report])
        trainer.fit(model, dm)
    # the (one-process) process group stays up: DDP and DeepSpeed reuse it in the next runs, and
    # DeepSpeed keeps references to it that a destroy/re-create would leave dangling
    gather = contextlib.nullcontext()
    if getattr(trainer.strategy, "zero_stage", 0) == 3:  # partitioned parameters are empty outside forwards
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
    with gather:
        return torch.cat([p.detach().float().cpu().flatten() for p in model.parameters()])


def zero3_child(args: argparse.Namespace) -> None:
    """``--zero3-child KIND``: prints ``ZERO3 <max abs diff> <max abs weight>`` of ZeRO-3 vs plain for KIND."""
    ds3 = "deepspeed_meta_stage_3" if args.device.type == "cuda" else "deepspeed_cpu_stage_3"
    plain = train_weights("auto", args, kind=args.zero3_child)
    w = train_weights(ds3, args, kind=args.zero3_child)
    print(f"ZERO3 {(w - plain).abs().max().item()!r} {w.abs().max().item()!r}", flush=True)


def zero3_row(label: str, kind: str, args: argparse.Namespace) -> list[str]:
    """One ZeRO-3 row, computed by ``zero3_child`` in a child process (a crash there cannot stop this script)."""
    t = time.perf_counter()
    cmd = [sys.executable, "-X", "faulthandler", os.path.abspath(__file__), "--device", str(args.device),
           "--steps", str(args.steps), "--zero3-child", kind]
    # the child starts its own one-process group: it must not see this process' rendezvous variables
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**env, "PYTHONWARNINGS": "ignore"})
    found = [line.split() for line in proc.stdout.splitlines() if line.startswith("ZERO3 ")]
    seconds = f"{time.perf_counter() - t:.1f}"
    if proc.returncode != 0 or not found:
        rc = proc.returncode
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        lines = [line.strip() for line in proc.stderr.splitlines()]
        errors = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))]
        message = errors[:1]  # the first exception (a crash may follow it, e.g. in the teardown)
        if "Current thread" in " ".join(lines):  # faulthandler: the innermost project frame of the crash
            stack = lines[[i for i, line in enumerate(lines) if line.startswith("Current thread")][-1] + 1:]
            frames = [line[5:] for line in stack if line.startswith("File ")]
            ours = [f for f in frames if "lightning_meta" in f] or frames
            if ours:
                path, _, rest = ours[0].partition(", ")
                message.append(f"crashed in {os.path.basename(path.strip(chr(34)))}, {rest}")
        sys.stderr.write(f"--- {label}: child stderr (end) ---\n{proc.stderr[-6000:]}\n")
        return [label, f"error (child {how}): {'; '.join(message)[:240] or 'no error message'}", "-", seconds]
    diff, biggest = float(found[-1][1]), float(found[-1][2])
    return [label, fmt(diff), fmt(biggest), seconds]


def strategies(args: argparse.Namespace) -> Table:
    ds = "deepspeed_meta_stage_2" if args.device.type == "cuda" else "deepspeed_cpu_stage_2"
    table = Table(f"1. Strategies on one device vs plain ({args.steps} steps of second-order MAML, sinusoid)",
                  ["strategy", "max abs weight diff vs plain", "max abs weight", "seconds"])
    t = time.perf_counter()
    plain = train_weights("auto", args)
    seconds = f"{time.perf_counter() - t:.1f}"
    table.add(["plain (single device)", "0 (reference)", fmt(plain.abs().max().item()), seconds])
    for name, strategy, per_task in [("DDP, 1 device", "ddp", False), (f"DeepSpeed ZeRO-2 ({ds})", ds, False),
                                     (f"DeepSpeed ZeRO-2, backward per task ({ds})", ds, True)]:
        def row(strategy=strategy, per_task=per_task, name=name) -> list[str]:
            t = time.perf_counter()
            w = train_weights(strategy, args, per_task_backward=per_task)
            return [name, fmt((w - plain).abs().max().item()), fmt(w.abs().max().item()),
                    f"{time.perf_counter() - t:.1f}"]
        table.add(attempt(row, 4))
    ds3 = "deepspeed_meta_stage_3" if args.device.type == "cuda" else "deepspeed_cpu_stage_3"
    for label, kind in [(f"DeepSpeed ZeRO-3, ANIL vs plain ANIL ({ds3})", "anil"),
                        (f"DeepSpeed ZeRO-3, MAML adapt_filter='head' vs plain ({ds3})", "head"),
                        (f"DeepSpeed ZeRO-3, MAML adapt_filter='lora' vs plain ({ds3})", "lora")]:
        table.add(attempt(lambda label=label, kind=kind: zero3_row(label, kind, args), 4))
    return table


# ---------------------------------------------------------------------------------- 2. bf16
def _bf16_representable(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    return model


def _sinusoid_episode(device: torch.device, seed: int = 1) -> Episode:
    g = torch.Generator().manual_seed(seed)
    x, xq = torch.rand(10, 1, generator=g) * 10 - 5, torch.rand(10, 1, generator=g) * 10 - 5
    return Episode(x, torch.sin(x), xq, torch.sin(xq), torch.zeros(0, dtype=torch.long)).to(device)


def _image_episode(device: torch.device, ways: int, shots: int, queries: int, size: int, seed: int = 0,
                   channels: int = 1) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.randn(ways * shots, channels, size, size, generator=g),
                   torch.arange(ways).repeat_interleave(shots),
                   torch.randn(ways * queries, channels, size, size, generator=g),
                   torch.arange(ways).repeat_interleave(queries), torch.arange(ways)).to(device)


def _update(model: MAML, fast: dict[str, torch.Tensor]) -> torch.Tensor:
    p0 = dict(model.model.named_parameters())
    return torch.cat([(fast[k].float() - p0[k].float()).detach().flatten() for k in model.adapted_names])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def inner_drift(model: MAML, ep: Episode, steps: int, device: torch.device) -> dict[str, float]:
    """Relative error of the inner update after ``steps`` steps, for the three bf16 set-ups."""
    ref = _update(model, model.adapt(ep, steps=steps))
    out = {}
    with torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False):
        out["autocast"] = _rel(_update(model, model.adapt(ep, steps=steps)), ref)
    low = copy.deepcopy(model).bfloat16()
    ep16 = ep.to(torch.bfloat16)
    out["fp32 fast"] = _rel(_update(low, low.adapt(ep16, steps=steps)), ref)
    adapted, frozen = {}, {}
    names = set(low.adapted_names)
    for n, p in low.model.named_parameters():
        (adapted if n in names else frozen)[n] = p
    raw = inner_adapt(low.model, adapted, low.model_buffers(), ep16.support_x, ep16.support_y, low.loss_fn,
                      low.inner_lr, steps, frozen=frozen)
    out["bf16 fast"] = _rel(_update(low, {**frozen, **raw}), ref)
    return out


def bf16_drift(args: argparse.Namespace) -> list[Table]:
    dev = args.device
    steps = (1, 2) if args.quick else (1, 5, 10)
    vit = (dict(dim=32, depth=2, heads=2) if args.quick else dict(dim=384, depth=12, heads=6))
    setups = {
        "sinusoid MLP 1-40-40-1, inner lr 0.01": (
            lambda: MAML(MLP(1, [40, 40]), task="regression", inner_lr=0.01), lambda: _sinusoid_episode(dev)),
        f"ViT (dim {vit['dim']}, depth {vit['depth']}) + LoRA r8 (LoRA and head adapt), inner lr 0.1": (
            lambda: MAML(LoRABackbone(ViT(1, 28, 4, **vit), rank=8, alpha=16.0, target=r"attn\.(qkv|proj)$",
                                      freeze="none"), ways=5, inner_lr=0.1, adapt_filter=r"lora_|^head\."),
            lambda: _image_episode(dev, 5, 1, 15, 28)),
    }
    table = Table("2a. bf16 drift of the inner update (relative error vs float32, same start)",
                  ["model", "inner steps", "bf16-mixed autocast (fp32 params)",
                   "bf16 module, fp32 fast weights (MAML under DeepSpeed bf16)",
                   "bf16 module, bf16 fast weights (no upcast)"],
                  note="Weights are first rounded to bf16 so that every column starts from the same point.")
    for label, (make, episode) in setups.items():
        for k in steps:
            def row(make=make, episode=episode, k=k, label=label) -> list[str]:
                torch.manual_seed(0)
                model = _bf16_representable(make()).to(dev)
                d = inner_drift(model, episode(), k, dev)
                return [label, str(k), fmt(d["autocast"]), fmt(d["fp32 fast"]), fmt(d["bf16 fast"])]
            table.add(attempt(row, 5))
    outer = Table(f"2b. Weights after {args.steps} outer steps: bf16 vs float32 training (sinusoid MAML)",
                  ["strategy", "precision", "max abs diff vs 32-true", "relative L2 diff"])
    ds = "deepspeed_meta_stage_2" if dev.type == "cuda" else "deepspeed_cpu_stage_2"
    for strategy in ("auto", ds):
        def row(strategy=strategy) -> list[str]:
            w32 = train_weights(strategy, args, precision="32-true")
            w16 = train_weights(strategy, args, precision="bf16-mixed")
            return [strategy, "bf16-mixed", fmt((w16 - w32).abs().max().item()), fmt(_rel(w16, w32))]
        outer.add(attempt(row, 4))
    return [table, outer]


# --------------------------------------------------------------------------------- 3. memory
def _batch(device: torch.device, tasks: int, ways: int, shots: int, queries: int, size: int,
           channels: int = 1) -> Episode:
    return collate_episodes([_image_episode(device, ways, shots, queries, size, seed=i, channels=channels)
                             for i in range(tasks)])


def peak_bytes(model: MAML, batch: Episode, device: torch.device) -> tuple[float | None, float]:
    """(peak MB above the model and data, seconds) of one ``meta_loss`` + ``backward``."""
    model.zero_grad(set_to_none=True)
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    model.meta_loss(batch).backward()
    sync(device)
    seconds = time.perf_counter() - t
    if device.type != "cuda":
        return None, seconds
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20, seconds


def memory(args: argparse.Namespace) -> Table:
    dev = args.device
    steps = (1, 2) if args.quick else (1, 5, 10)
    hidden, ways, shots, tasks = (8, 5, 1, 2) if args.quick else (64, 20, 5, 4)
    vit = (dict(dim=32, depth=2, heads=2) if args.quick else dict(dim=384, depth=12, heads=6))

    def conv(**kw) -> Callable[[int], MAML]:
        cls = kw.pop("cls", MAML)
        return lambda k: cls(Conv4(1, hidden, 28, norm="batch_no_stats"), ways=ways, inner_lr=0.4, inner_steps=k, **kw)

    def vit_lora(checkpoint: bool) -> Callable[[int], MAML]:
        extra = {"activation_checkpointing": True} if checkpoint else {}
        return lambda k: MAML(LoRABackbone(ViT(1, 28, 4, checkpoint=checkpoint, **vit), rank=8, alpha=16.0,
                                           target=r"attn\.(qkv|proj)$", freeze="none"),
                              ways=5, inner_lr=0.1, inner_steps=k, adapt_filter=r"lora_|^head\.", **extra)

    rows: list[tuple[str, Callable[[int], MAML] | None, tuple]] = [
        ("MAML second order", conv(), (ways, shots)),
        ("MAML first order", conv(first_order=True), (ways, shots)),
        ("ANIL (second order, head only)", conv(cls=ANIL), (ways, shots)),
        ("MAML second order + activation checkpointing", conv(activation_checkpointing=True) if HAS_CKPT else None,
         (ways, shots)),
        (f"ViT (dim {vit['dim']}, depth {vit['depth']}) + LoRA, second order", vit_lora(False), (5, 1)),
        ("  ... + checkpointing (ViT blocks, inner steps)", vit_lora(True) if HAS_CKPT else None, (5, 1)),
    ]
    unit = "peak MB" if dev.type == "cuda" else "peak MB (n/a on CPU)"
    table = Table(
        f"3. Peak memory of one meta-gradient (meta-batch {tasks}; Conv-4-{hidden} 28x28 {ways}-way {shots}-shot "
        "15-query; ViT 5-way 1-shot)",
        ["learner", *[f"{unit}, {k} step{'s' if k > 1 else ''}" for k in steps], "seconds at the largest"],
    )
    for label, make, (w, s) in rows:
        def row(label=label, make=make, w=w, s=s) -> list[str]:
            if make is None:
                return [label, *["n/a (MAML has no activation_checkpointing option)"] * len(steps), "-"]
            batch = _batch(dev, tasks, w, s, 15, 28)
            cells, secs = [], 0.0
            for k in steps:
                torch.manual_seed(0)
                model = make(k).to(dev)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    mb, secs = peak_bytes(model, batch, dev)
                cells.append("n/a" if mb is None else f"{mb:.1f}")
                del model
            return [label, *cells, f"{secs:.2f}"]
        table.add(attempt(row, len(steps) + 2))
    return table


# ----------------------------------------------------------------------------- 4. throughput
def throughput(args: argparse.Namespace) -> Table:
    dev = args.device
    hidden = 8 if args.quick else 64
    sizes = (2, 4) if args.quick else (8, 32)
    warmup, repeats, iters = (1, 2, 1) if args.quick else (3, 5, 5)
    steps = (1,) if args.quick else (1, 5)
    table = Table(f"4. Episodes/s, second-order MAML, Conv-4-{hidden} (no BatchNorm), 5-way 1-shot 15-query",
                  ["meta-batch", "inner steps", "loop (episodes/s)", "vmap (episodes/s)", "vmap / loop"])
    for b, k in [(b, k) for b in sizes for k in steps]:
        def row(b=b, k=k) -> list[str]:
            batch = _batch(dev, b, 5, 1, 15, 28)
            speed = {}
            for batching in ("loop", "vmap"):
                torch.manual_seed(0)
                model = MAML(Conv4(1, hidden, 28, norm="none"), ways=5, inner_lr=0.4, inner_steps=k,
                             task_batching=batching).to(dev)
                for _ in range(warmup):
                    model.zero_grad(set_to_none=True)
                    model.meta_loss(batch).backward()
                times = []
                for _ in range(repeats):
                    sync(dev)
                    t = time.perf_counter()
                    for _ in range(iters):
                        model.zero_grad(set_to_none=True)
                        model.meta_loss(batch).backward()
                    sync(dev)
                    times.append((time.perf_counter() - t) / iters)
                speed[batching] = b / statistics.median(times)
            return [str(b), str(k), f"{speed['loop']:.1f}", f"{speed['vmap']:.1f}",
                    f"{speed['vmap'] / speed['loop']:.2f}"]
        table.add(attempt(row, 5))
    return table


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the script")
    p.add_argument("--steps", type=int, default=None, help="outer steps in sections 1 and 2b (default 20; 3 quick)")
    p.add_argument("--out", default=None, help="also write the tables (markdown) to this file")
    p.add_argument("--sections", default="1234", help="which sections to run, e.g. 34")
    p.add_argument("--zero3-child", default=None, choices=["anil", "head", "lora"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device is available; run with --device cpu (add --quick for a smoke test)")
    args.steps = args.steps or (3 if args.quick else 20)
    if args.zero3_child:
        zero3_child(args)
        return ""
    start = time.perf_counter()
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else platform.processor() or "cpu"
    head = (f"# GPU check ({datetime.date.today().isoformat()})\n\n"
            f"`python benchmarks/gpu_check.py {' '.join(argv if argv is not None else sys.argv[1:])}`\n\n"
            f"device: {args.device} ({name}); torch {torch.__version__}; threads {torch.get_num_threads()}; "
            f"quick={args.quick}; activation_checkpointing option: {HAS_CKPT}\n")
    print(head, flush=True)
    tables: list[Table] = []
    sections = {"1": strategies, "2": bf16_drift, "3": memory, "4": throughput}
    for key in args.sections:
        t = time.perf_counter()
        out = sections[key](args)
        tables += out if isinstance(out, list) else [out]
        print(f"(section {key}: {time.perf_counter() - t:.1f} s)", flush=True)
    text = head + "\n" + "\n".join(t.markdown() for t in tables) + f"\nTotal: {time.perf_counter() - start:.0f} s.\n"
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text)
    return text


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        main()
