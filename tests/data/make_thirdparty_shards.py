#!/usr/bin/env python3
"""Writes ``tests/data/thirdparty/``: a tiny third-party webdataset shard set (seeded, no index).

The layout is what other tools write, not what lightning-meta's ShardWriter writes:

* two shards ``shard-000000.tar`` and ``shard-000001.tar``, written with :mod:`tarfile` only;
* each sample is ``<key>.png`` (8x8 grayscale) plus ``<key>.cls`` (the integer class id as text);
  a few samples also carry a ``<key>.json`` member, which readers must ignore;
* samples are shuffled, so classes are spread over both shards (not grouped by class);
* there is no ``index.json``: lightning-meta must build (and cache) one itself.

There are 8 classes with 3 drawings each. Class ids are not contiguous (``3 + 7 * k``) so that
tests can tell original class ids from positions. Every image carries its own label in its
pixels, so tests can check an episode without decoding anything else:

* ``pixel[0, 0]`` is the class id, ``pixel[0, 1]`` is the drawing number (0, 1, 2);
* the other pixels are seeded noise.

Run it from anywhere (``python tests/data/make_thirdparty_shards.py``); the same seed gives the
same bytes for a given Pillow/zlib. The output is committed beside this script.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

SEED = 0
NUM_CLASSES = 8
DRAWINGS = 3
SIZE = 8
NUM_SHARDS = 2
OUT = Path(__file__).resolve().parent / "thirdparty"


def class_ids() -> list[int]:
    """The (non-contiguous) class ids of the set."""
    return [3 + 7 * k for k in range(NUM_CLASSES)]


def make_image(rng: np.random.Generator, class_id: int, drawing: int) -> np.ndarray:
    """One 8x8 ``uint8`` image labelled in its first two pixels."""
    img = rng.integers(0, 256, size=(SIZE, SIZE), dtype=np.uint8)
    img[0, 0] = class_id
    img[0, 1] = drawing
    return img


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible bytes
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def main() -> None:
    rng = np.random.default_rng(SEED)
    samples = [(cid, d, make_image(rng, cid, d)) for cid in class_ids() for d in range(DRAWINGS)]
    order = rng.permutation(len(samples))
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.glob("*.tar"):
        old.unlink()
    per_shard = -(-len(samples) // NUM_SHARDS)
    for s in range(NUM_SHARDS):
        with tarfile.open(OUT / f"shard-{s:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for j in order[s * per_shard : (s + 1) * per_shard]:
                cid, d, img = samples[int(j)]
                key = f"sample{int(j):06d}"
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="PNG")
                _add(tar, f"{key}.png", buf.getvalue())
                _add(tar, f"{key}.cls", str(cid).encode())
                if int(j) % 5 == 0:
                    _add(tar, f"{key}.json", json.dumps({"source": "make_thirdparty_shards", "drawing": d}).encode())
    total = sum(p.stat().st_size for p in OUT.glob("*.tar"))
    print(f"wrote {NUM_SHARDS} shards, {len(samples)} samples, {total} bytes to {OUT}")


if __name__ == "__main__":
    main()
