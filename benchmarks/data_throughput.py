"""Episode loading throughput of the shard readers, as a ratio to the ProtoNet step it feeds.

For 5-way 1-shot 15-query episodes at 28x28x1 and 84x84x3, PNG vs raw uint8 (``.npy``) members,
0 and 2 dataloader workers, and three readers: ``indexed`` (random access by byte offset),
``streaming`` (per-class shuffled streams over local paths, which it reads by seeking) and
``streaming-pipe`` (the same streams through ``pipe:cat <shard>`` URLs, read sequentially as a
remote object store would be): episodes/s of the train dataloader (cold: every image decoded
once, no cache hits) and the time of one ProtoNet (Conv-4-64) training step on such an episode,
in the same run. Usage (records the table in ``benchmarks/data_throughput.md``)::

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py [--episodes 200] [--readers indexed streaming]

``--quick`` runs a tiny setting (28x28, PNG, 0 workers, a few episodes) to check that the script
works; it prints the table and writes a file only when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lightning_meta.algorithms import ProtoNet
from lightning_meta.backbones import Conv4
from lightning_meta.data.shards import ShardWriter
from lightning_meta.datamodules import ShardDataModule

READERS = ("indexed", "streaming", "streaming-pipe")


def write_set(root: Path, size: int, channels: int, ext: str, classes: int = 60, per_class: int = 20) -> Path:
    rng = np.random.default_rng(0)
    out = root / f"s{size}c{channels}{ext}"
    with ShardWriter(out, max_samples=600) as w:
        for c in range(classes):
            shape = (size, size) if channels == 1 else (size, size, channels)
            base = rng.integers(0, 256, size=shape, dtype=np.uint8)
            imgs = [np.clip(base.astype(int) + rng.integers(-20, 20, size=shape), 0, 255).astype(np.uint8)
                    for _ in range(per_class)]
            split = "train" if c < classes - 10 else ("val" if c < classes - 5 else "test")
            w.add_class(c, imgs, name=f"c{c}", split=split, ext=ext)
    return out


def reader_spec(path: Path, reader: str) -> tuple[str | list[str], str]:
    """Shard spec and ``ShardDataModule(reader=...)`` value of a benchmark reader."""
    if reader == "streaming-pipe":
        return [f"pipe:cat {p}" for p in sorted(map(str, path.glob("*.tar")))], "streaming"
    return str(path), reader


def loader_rate(path: Path, workers: int, episodes: int, reader: str = "indexed") -> float:
    spec, kind = reader_spec(path, reader)
    dm = ShardDataModule(shards=spec, ways=5, shots=1, queries=15, meta_batch_size=1, train_episodes=episodes,
                         num_workers=workers, verify="size", cache_mb=0, reader=kind)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)  # start-up (worker spawn) excluded
    t = time.perf_counter()
    n = 0
    for _ in it:
        n += 1
    return n / (time.perf_counter() - t)


def step_time(size: int, channels: int, repeats: int = 10) -> float:
    torch.manual_seed(0)
    model = ProtoNet(Conv4(channels, 64, size))
    opt = model.configure_optimizers()
    from lightning_meta import Episode, collate_episodes

    ep = Episode(torch.rand(5, channels, size, size), torch.arange(5), torch.rand(75, channels, size, size),
                 torch.arange(5).repeat_interleave(15), torch.arange(5))
    batch = collate_episodes([ep])
    for _ in range(2):
        model.meta_loss(batch).backward()
    t = time.perf_counter()
    for _ in range(repeats):
        opt.zero_grad()
        model.meta_loss(batch).backward()
        opt.step()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--readers", nargs="+", default=list(READERS), choices=READERS)
    p.add_argument("--quick", action="store_true", help="tiny setting to check the script runs; writes only with --out")
    p.add_argument("--out", default=None, help="default: benchmarks/data_throughput.md (none with --quick)")
    a = p.parse_args()
    if a.out is None and not a.quick:
        a.out = str(Path(__file__).with_name("data_throughput.md"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    sizes = ((28, 1),) if a.quick else ((28, 1), (84, 3))
    formats = ("png",) if a.quick else ("png", "npy")
    worker_counts = (0,) if a.quick else (0, 2)
    episodes = min(a.episodes, 6) if a.quick else a.episodes
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, channels in sizes:
            step = step_time(size, channels, repeats=2 if a.quick else 10)
            for ext in formats:
                path = write_set(Path(tmp), size, channels, ext, classes=20 if a.quick else 60)
                for reader in a.readers:
                    for workers in worker_counts:
                        rate = loader_rate(path, workers, episodes, reader)
                        load_ms = 1000.0 / rate
                        rows.append((f"{size}x{size}x{channels}", ext, reader, workers, rate, load_ms, step * 1000,
                                     load_ms / (step * 1000)))
                        print(rows[-1], flush=True)
    readers = " ".join(a.readers)
    lines = [
        "# Data throughput: shard readers vs the ProtoNet step they feed",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/data_throughput.py "
        f"--episodes {episodes} --readers {readers}{' --quick' if a.quick else ''}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), torch threads {torch.get_num_threads()}, "
        f"{time.strftime('%Y-%m-%d')}. Cold reads: the decoded-image cache is off (cache_mb=0).",
        "Episodes: 5-way 1-shot 15-query (80 images). Step: one ProtoNet Conv-4-64 training step on one episode.",
        "With 2 workers loading overlaps the step, so the ratio that matters is load time per worker / step.",
        "Readers: indexed = byte-offset reads; streaming = per-class shuffled streams over the local paths (seeks);",
        "streaming-pipe = the same through `pipe:cat` URLs, read sequentially like a remote store (each class pass",
        "starts a `cat` and reads the shard up to the class; every worker streams every episode's examples).",
        "",
        "| images | format | reader | workers | episodes/s | load ms/episode | step ms | load / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.1f} | {r[5]:.2f} | {r[6]:.1f} | {r[7]:.3f} |")
    text = "\n".join(lines) + "\n"
    if a.out:
        Path(a.out).write_text(text)
        print(f"wrote {a.out}")
    else:
        print(text)


if __name__ == "__main__":
    main()
