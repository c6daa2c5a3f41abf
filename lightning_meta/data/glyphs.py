"""The embedded default data set: procedurally drawn "glyph" alphabets, generated offline.

Omniglot-like and download-free: each *alphabet* has its own drawing style (number of strokes,
stroke length and curvature), each *character* is a fixed set of Bezier strokes, and each
*drawing* of a character perturbs the control points, applies a random affine transform and a
random pen width, rendered anti-aliased at 28x28 (ink is white on black). Classes are split into
train/validation/test by alphabet, the way Omniglot splits background and evaluation alphabets.
Everything is a deterministic function of the seed, so every machine generates the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from lightning_meta.data.shards import INDEX_NAME, ShardWriter, cache_dir, cache_lock, publish_permissions

__all__ = ["GLYPHS_VERSION", "default_glyph_shards", "generate_glyphs", "render_character"]

GLYPHS_VERSION = 1
_OVERSAMPLE = 4


def _bezier(ctrl: np.ndarray, n: int = 24) -> np.ndarray:
    t = np.linspace(0.0, 1.0, n)[:, None]
    p0, p1, p2, p3 = ctrl
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def _make_style(rng: np.random.Generator) -> dict[str, float]:
    lo = int(rng.integers(1, 3))
    return {
        "min_strokes": lo,
        "max_strokes": lo + int(rng.integers(1, 3)),
        "length": float(rng.uniform(0.3, 0.6)),
        "curvature": float(rng.uniform(0.0, 0.45)),
        "connect": float(rng.uniform(0.0, 0.8)),  # probability a stroke starts where the last ended
    }


def _make_character(rng: np.random.Generator, style: dict[str, float]) -> list[np.ndarray]:
    n = int(rng.integers(style["min_strokes"], style["max_strokes"] + 1))
    strokes: list[np.ndarray] = []
    for _ in range(n):
        if strokes and rng.random() < style["connect"]:
            p0 = strokes[-1][-1].copy()
        else:
            p0 = rng.uniform(0.2, 0.8, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        length = style["length"] * rng.uniform(0.6, 1.4)
        p3 = np.clip(p0 + length * np.array([np.cos(angle), np.sin(angle)]), 0.12, 0.88)
        normal = np.array([-(p3 - p0)[1], (p3 - p0)[0]])
        bend1, bend2 = rng.normal(0.0, style["curvature"], size=2) * 2.0
        p1 = p0 + (p3 - p0) / 3 + bend1 * normal
        p2 = p0 + 2 * (p3 - p0) / 3 + bend2 * normal
        strokes.append(np.stack([p0, p1, p2, p3]))
    return strokes


def render_character(strokes: list[np.ndarray], rng: np.random.Generator, size: int = 28) -> np.ndarray:
    """One drawing of a character: jittered strokes, random affine, random pen width; ``uint8 [size, size]``."""
    from PIL import Image, ImageDraw

    big = size * _OVERSAMPLE
    theta = rng.normal(0.0, 0.15)
    scale = np.exp(rng.normal(0.0, 0.08))
    shear = rng.normal(0.0, 0.1)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    affine = scale * rot @ np.array([[1.0, shear], [0.0, 1.0]])
    shift = rng.normal(0.0, 0.04, size=2)
    width = rng.uniform(1.4, 2.4) * _OVERSAMPLE
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    for ctrl in strokes:
        ctrl = ctrl + rng.normal(0.0, 0.03, size=ctrl.shape)
        pts = _bezier(ctrl)
        pts = (pts - 0.5) @ affine.T + 0.5 + shift
        xy = [tuple(p) for p in (pts * big)]
        draw.line(xy, fill=255, width=int(round(width)), joint="curve")
        r = width / 2
        for x, y in (xy[0], xy[-1]):
            draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    img = img.resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.uint8)


def generate_glyphs(
    out_dir: str | os.PathLike,
    seed: int = 0,
    alphabets: int = 40,
    chars_per_alphabet: tuple[int, int] = (14, 30),
    drawings: int = 20,
    size: int = 28,
    splits: tuple[int, int, int] = (28, 6, 6),
) -> Path:
    """Generates the glyph data set as class-grouped shards with an index in ``out_dir``.

    Args:
        out_dir: destination folder (written atomically: a temporary folder renamed at the end);
            the folder and its files get the ordinary permissions of the current umask.
        seed: generator seed; the same seed gives the same bytes.
        alphabets: number of alphabets.
        chars_per_alphabet: inclusive range of characters per alphabet.
        drawings: drawings per character.
        size: image side in pixels.
        splits: alphabets in train / val / test (must sum to ``alphabets``).

    Returns:
        ``out_dir``.

    """
    if sum(splits) != alphabets:
        raise ValueError(f"splits={splits} must sum to alphabets={alphabets}")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        root = np.random.SeedSequence([seed, 7261])
        alpha_seeds = root.spawn(alphabets)
        order = np.random.default_rng(root.spawn(1)[0]).permutation(alphabets)
        split_of = {}
        for pos, a in enumerate(order):
            split_of[int(a)] = "train" if pos < splits[0] else ("val" if pos < splits[0] + splits[1] else "test")
        meta = {"source": "lightning-meta embedded glyphs", "version": GLYPHS_VERSION, "seed": seed,
                "image_size": size, "drawings": drawings}
        class_id = 0
        with ShardWriter(tmp, prefix="glyphs", max_samples=4000, meta=meta) as writer:
            for split in ("train", "val", "test"):
                for a in range(alphabets):
                    if split_of[a] != split:
                        continue
                    arng = np.random.default_rng(alpha_seeds[a])
                    style = _make_style(arng)
                    n_chars = int(arng.integers(chars_per_alphabet[0], chars_per_alphabet[1] + 1))
                    for c in range(n_chars):
                        strokes = _make_character(arng, style)
                        drng = np.random.default_rng(np.random.SeedSequence([seed, 7261, a, c]))
                        images = [render_character(strokes, drng, size) for _ in range(drawings)]
                        writer.add_class(class_id, images, name=f"alphabet{a:02d}/character{c:02d}",
                                         split=split, group=f"alphabet{a:02d}")
                        class_id += 1
        (tmp / "README.txt").write_text(
            "Embedded default data set of lightning-meta (procedural glyph alphabets).\n"
            + json.dumps(meta) + "\n")
        publish_permissions(tmp)  # mkdtemp's 0700 -> an ordinary folder's 0o777 & ~umask
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def default_glyph_shards(seed: int = 0) -> Path:
    """Folder of the embedded default shards, generating them on first use (a few seconds)."""
    out = cache_dir() / f"glyphs-v{GLYPHS_VERSION}-seed{seed}"
    if (out / INDEX_NAME).exists():
        return out
    with cache_lock(out.parent / f".{out.name}.lock"):  # another process may be generating it right now
        if not (out / INDEX_NAME).exists():
            generate_glyphs(out, seed=seed)
    return out
