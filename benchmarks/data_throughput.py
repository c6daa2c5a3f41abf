"""Episode loading throughput of the indexed shard reader, as a ratio to the ProtoNet step it feeds.

For 5-way 1-shot 15-query episodes at 28x28x1 and 84x84x3, PNG vs raw uint8 (``.npy``) members,
0 and 2 dataloader workers: episodes/s of the train dataloader (cold: every image decoded once,
no cache hits) and the time of one ProtoNet (Conv-4-64) training step on such an episode, in the
same run. Usage (records the table in ``benchmarks/data_throughput.md``)::

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py [--episodes 200]

The streaming reader of DESIGN §2 is not implemented yet, so only the indexed reader is measured.
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


def loader_rate(path: Path, workers: int, episodes: int) -> float:
    dm = ShardDataModule(shards=str(path), ways=5, shots=1, queries=15, meta_batch_size=1,
                         train_episodes=episodes, num_workers=workers, verify="size", cache_mb=0)
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
    p.add_argument("--out", default=str(Path(__file__).with_name("data_throughput.md")))
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size, channels in ((28, 1), (84, 3)):
            step = step_time(size, channels)
            for ext in ("png", "npy"):
                path = write_set(Path(tmp), size, channels, ext)
                for workers in (0, 2):
                    rate = loader_rate(path, workers, a.episodes)
                    load_ms = 1000.0 / rate
                    rows.append((f"{size}x{size}x{channels}", ext, workers, rate, load_ms, step * 1000,
                                 load_ms / (step * 1000)))
                    print(rows[-1], flush=True)
    lines = [
        "# Data throughput: indexed shard reader vs the ProtoNet step it feeds",
        "",
        f"Command: `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/data_throughput.py "
        f"--episodes {a.episodes}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared), torch threads {torch.get_num_threads()}, "
        f"{time.strftime('%Y-%m-%d')}. Cold reads: the decoded-image cache is off (cache_mb=0).",
        "Episodes: 5-way 1-shot 15-query (80 images). Step: one ProtoNet Conv-4-64 training step on one episode.",
        "With 2 workers loading overlaps the step, so the ratio that matters is load time per worker / step.",
        "",
        "| images | format | workers | episodes/s | load ms/episode | step ms | load / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.1f} | {r[6]:.3f} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
