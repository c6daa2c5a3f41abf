#!/usr/bin/env python3
"""Writes ``tests/data/fake_trees/``: tiny seeded image trees in the layouts ``lightning-meta convert`` reads.

* ``omniglot/images_background_fake/<Alphabet>/<characterNN>/<id>_<drawer>.png``: the Omniglot
  release layout, 4 alphabets x 4 characters x 4 drawings, 24x24 1-bit PNGs, black ink on white.
  Each character is 3 random strokes; a drawing shifts it by up to one pixel, so drawings of one
  character look alike and characters differ. Strokes are not symmetric, so rotations differ.
* ``omniglot_runs/runNN/``: the layout of ``all_runs.zip`` (3 runs of a 5-way one-shot task):
  ``training/classKK.png`` (one drawing per class), ``test/itemKK.png`` (another drawing of a
  shuffled class), ``class_labels.txt`` (``runNN/test/itemKK.png runNN/training/classKK.png``).
  A test item is its class's training drawing shifted by one pixel, so the nearest training
  image in pixel space is always the correct one (tests use this to check the label parsing).
* ``imagefolder/<class>/<image>``: 5 classes x 3 RGB 10x10 images, one class stored as JPEG and
  one as grayscale PNG (converted to RGB); the mean colour of an image identifies its class.
* ``miniimagenet/``: ``train.csv``/``val.csv``/``test.csv`` (``filename,label``, the Ravi &
  Larochelle format) with 3/2/2 classes of 3 images each, and ``images/<wnid><NNNN>.jpg`` (16x12
  RGB JPEGs; the converter resizes them to 84x84).

Run it from anywhere (``python tests/data/make_fake_trees.py``); the same seed gives the same
bytes for a given Pillow/zlib/libjpeg. The output is committed beside this script.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SEED = 0
OUT = Path(__file__).resolve().parent / "fake_trees"
SIDE = 24
ALPHABETS = ["Alpha_(fake)", "Beta", "Gamma", "Delta"]
CHARACTERS = 4
DRAWINGS = 4
RUNS = 3
RUN_WAYS = 5


def _strokes(rng: np.random.Generator, n: int = 3) -> list[tuple[int, int, int, int]]:
    out = []
    for _ in range(n):
        x0, y0, x1, y1 = (int(v) for v in rng.integers(3, SIDE - 3, size=4))
        out.append((x0, y0, x1, y1))
    return out


def _draw(strokes: list[tuple[int, int, int, int]], dx: int, dy: int) -> Image.Image:
    """Black ink (0) on white (1), 1-bit, like the Omniglot PNGs."""
    img = Image.new("1", (SIDE, SIDE), 1)
    d = ImageDraw.Draw(img)
    for x0, y0, x1, y1 in strokes:
        d.line((x0 + dx, y0 + dy, x1 + dx, y1 + dy), fill=0, width=2)
    d.rectangle((strokes[0][0] + dx - 1, strokes[0][1] + dy - 1, strokes[0][0] + dx + 1, strokes[0][1] + dy + 1),
                fill=0)  # a blob at the start of the first stroke: breaks any rotational symmetry
    return img


def make_omniglot(rng: np.random.Generator) -> None:
    root = OUT / "omniglot" / "images_background_fake"
    for a, alphabet in enumerate(ALPHABETS):
        for c in range(1, CHARACTERS + 1):
            strokes = _strokes(rng)
            folder = root / alphabet / f"character{c:02d}"
            folder.mkdir(parents=True)
            image_id = 100 * (a + 1) + c
            for d in range(1, DRAWINGS + 1):
                dx, dy = (int(v) for v in rng.integers(-1, 2, size=2))
                _draw(strokes, dx, dy).save(folder / f"{image_id:04d}_{d:02d}.png")


def make_runs(rng: np.random.Generator) -> None:
    root = OUT / "omniglot_runs"
    for r in range(1, RUNS + 1):
        run = root / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        chars = [_strokes(rng) for _ in range(RUN_WAYS)]
        for k, strokes in enumerate(chars, start=1):
            _draw(strokes, 0, 0).save(run / "training" / f"class{k:02d}.png")
        order = rng.permutation(RUN_WAYS) + 1  # test item i shows class order[i]
        lines = []
        for i, k in enumerate(order, start=1):
            _draw(chars[k - 1], 1, 0).save(run / "test" / f"item{i:02d}.png")
            lines.append(f"run{r:02d}/test/item{i:02d}.png run{r:02d}/training/class{k:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")


def make_imagefolder(rng: np.random.Generator) -> None:
    root = OUT / "imagefolder"
    for k in range(5):
        folder = root / f"class_{k}"
        folder.mkdir(parents=True)
        base = np.array([40 * k + 20, 200 - 30 * k, 60 + 25 * k], dtype=np.int16)
        for i in range(3):
            img = np.clip(base + rng.integers(-10, 11, size=(10, 10, 3)), 0, 255).astype(np.uint8)
            if k == 3:
                Image.fromarray(img).save(folder / f"img{i}.jpg", quality=90)
            elif k == 4:
                Image.fromarray(img).convert("L").save(folder / f"img{i}.png")
            else:
                Image.fromarray(img).save(folder / f"img{i}.png")
    (root / "README.txt").write_text("non-image files at the root are ignored\n")


def make_miniimagenet(rng: np.random.Generator) -> None:
    root = OUT / "miniimagenet"
    (root / "images").mkdir(parents=True)
    splits = {"train": ["n01000001", "n01000002", "n01000003"], "val": ["n02000001", "n02000002"],
              "test": ["n03000001", "n03000002"]}
    for split, wnids in splits.items():
        rows = ["filename,label"]
        for wnid in wnids:
            colour = rng.integers(30, 220, size=3)
            for i in range(1, 4):
                name = f"{wnid}{i:04d}.jpg"
                img = np.clip(colour + rng.integers(-20, 21, size=(12, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / "images" / name, quality=85)
                rows.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    rng = np.random.default_rng(SEED)
    make_omniglot(rng)
    make_runs(rng)
    make_imagefolder(rng)
    make_miniimagenet(rng)
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"wrote {OUT} ({sum(1 for f in OUT.rglob('*') if f.is_file())} files, {total / 1024:.1f} KB)")


if __name__ == "__main__":
    main()
