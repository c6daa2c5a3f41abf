"""``lightning-meta convert``: image collections to class-grouped shards with an ``index.json``.

Three layouts are understood (each a subcommand, each also a Python function):

- ``imagefolder``: ``<root>/<class>/<image>`` (one folder per class), or with ``--split-folders``
  ``<root>/<train|val|test>/<class>/<image>``; classes may be split by ``--split-ratios``.
- ``omniglot``: ``<root>/<Alphabet>/<characterNN>/<drawing>.png`` as released by Lake et al.,
  read from the folder or straight from the zip (``images_background_small1.zip``), one set or
  several merged; classes are split into train/val/test *by alphabet* (the default) or *by
  character* (``--split-by character``, the MAML authors' protocol); ``--rotations`` adds the
  90/180/270 degree rotations of every character as new classes (x4, as in the MAML and ProtoNet
  papers). Images are inverted (ink = 255, like the embedded glyphs) and shrunk by area averaging
  to ``--image-size``.
- ``miniimagenet``: the Ravi & Larochelle split files ``train.csv``/``val.csv``/``test.csv``
  (columns ``filename,label``) and an ``images/`` folder, resized to 84x84 RGB.

``--format npy`` stores raw ``uint8`` arrays (no decoding cost when training); ``png`` is smaller.
The output folder appears atomically: everything is written to a temporary folder beside it and
renamed at the end, so an interrupted conversion leaves no half-written shard set behind. The
output folder must lie outside the input (it may not be the input, nor a folder above or inside
it): replacing it with ``--overwrite`` would otherwise delete the source images. Output files get
the ordinary permissions of the current umask.

Example:
    ``lightning-meta convert omniglot images_background_small1.zip data/small1 --rotations --val-fraction 0.2``

    ``lightning-meta convert omniglot images_background.zip images_evaluation.zip data/maml --split-by character
    --val-characters 100 --test-characters 423 --rotations`` (1100 / 100 / 423 characters, as MAML)

"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import shutil
import sys
import tempfile
import threading
import zipfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import numpy as np

from lightning_meta.data.faults import DECODE_ERRORS
from lightning_meta.data.shards import INDEX_NAME, ShardIndex, ShardWriter, publish_permissions
from lightning_meta.errors import MetaConfigError, as_integer

__all__ = [
    "ImageRecipe",
    "SourceTree",
    "convert_imagefolder",
    "convert_miniimagenet",
    "convert_omniglot",
    "main",
    "omniglot_image",
]

Format = Literal["png", "npy"]
Resample = Literal["box", "bilinear", "bicubic", "lanczos"]
SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".webp", ".tif", ".tiff")
ROTATIONS = (0, 90, 180, 270)


# --------------------------------------------------------------------------- reading trees

def _loops_back(folder: Path, root: Path) -> bool:
    """Whether ``folder`` (below ``root``, reached through symlinks) resolves to one of its own parents."""
    real = os.path.realpath(folder)
    parent = folder.parent
    while True:
        if os.path.realpath(parent) == real:
            return True
        if parent == root or parent == parent.parent:
            return False
        parent = parent.parent


class SourceTree:
    """A read-only listing of the files under a folder or inside a zip archive, with byte access.

    Paths are POSIX-style and relative to the folder (or the zip root). Hidden entries and the
    ``__MACOSX`` folders that macOS adds to zips are ignored.

    Raises:
        MetaConfigError: when the path does not exist or is neither a folder nor a zip file.

    """

    def __init__(self, path: str | os.PathLike, what: str = "input") -> None:
        self.path = Path(os.path.expanduser(os.fspath(path)))
        self._zip: zipfile.ZipFile | None = None
        if not self.path.exists():
            raise MetaConfigError(f"{what} {str(self.path)!r} does not exist; check the path (a folder or a .zip file)")
        files: list[str] = []
        dirs: set[str] = set()
        if self.path.is_dir():
            # symlinked class folders are followed (data sets are often assembled from links); a link back
            # to a folder above it would loop, so a folder whose real path is one of its parents' is skipped
            for base, dirnames, filenames in os.walk(self.path, followlinks=True):
                if _loops_back(Path(base), self.path):
                    dirnames[:] = []
                    continue
                dirnames[:] = sorted(d for d in dirnames if not _ignored(d))
                rel = PurePosixPath(Path(base).relative_to(self.path).as_posix())
                if str(rel) != ".":
                    dirs.add(str(rel))
                files += [str(rel / f) if str(rel) != "." else f for f in sorted(filenames) if not _ignored(f)]
        elif zipfile.is_zipfile(self.path):
            self._zip = zipfile.ZipFile(self.path)
            for name in self._zip.namelist():
                parts = PurePosixPath(name).parts
                if not parts or any(_ignored(p) for p in parts):
                    continue
                if name.endswith("/"):
                    dirs.add(str(PurePosixPath(*parts)))
                else:
                    files.append(str(PurePosixPath(*parts)))
        else:
            raise MetaConfigError(f"{what} {str(self.path)!r} is neither a folder nor a zip file; "
                                  "extract it or point at the folder that holds the images")
        for f in files:  # zips need not list every folder
            dirs.update(str(p) for p in PurePosixPath(f).parents if str(p) != ".")
        self.files = sorted(files)
        self.dirs = dirs

    def read(self, rel: str) -> bytes:
        """The bytes of one file.

        Raises:
            MetaConfigError: when it cannot be read (a dangling link, no permission, an I/O error, a
                damaged zip member), naming the file.

        """
        try:
            if self._zip is not None:
                return self._zip.read(rel)
            return (self.path / rel).read_bytes()
        except (OSError, zipfile.BadZipFile, zlib.error) as e:
            where = f"{self.path}:{rel}" if self._zip is not None else str(self.path / rel)
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise MetaConfigError(f"cannot read {where} ({why}); fix or remove the file and convert again") from e

    def images(self) -> list[str]:
        """Files with an image suffix."""
        return [f for f in self.files if f.lower().endswith(IMAGE_SUFFIXES)]

    def close(self) -> None:
        """Closes the zip file (if any)."""
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def _ignored(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


# --------------------------------------------------------------------------- image preprocessing
_RESAMPLE = {"box": "BOX", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "lanczos": "LANCZOS"}


@dataclass(frozen=True)
class ImageRecipe:
    """How a stored image is made from a source file: colour mode, inversion, size (picklable).

    Args:
        mode: ``L`` (grayscale) or ``RGB``.
        size: output ``(height, width)``, or None to keep the source size.
        invert: store ``255 - v`` (black ink on white -> ink as 255).
        resample: Pillow filter; ``box`` averages the covered area (best for shrinking line drawings),
            ``lanczos`` is the usual anti-aliased filter for photographs.

    """

    mode: Literal["L", "RGB"] = "RGB"
    size: tuple[int, int] | None = None
    invert: bool = False
    resample: Resample = "lanczos"

    def __call__(self, data: bytes, name: str = "<bytes>") -> np.ndarray:
        """Decodes ``data`` and returns a ``uint8`` array ``[H, W]`` (``L``) or ``[H, W, 3]`` (``RGB``).

        Raises:
            MetaConfigError: when the bytes are not a readable image, naming the file.

        """
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                if im.mode.startswith("I;16") or im.mode == "I":
                    # 16-bit (or 32-bit integer) grayscale: Pillow's convert would clip every value above
                    # 255; scale the 16-bit range to 8 bits instead (values within 0..255 are kept)
                    arr = np.asarray(im).astype(np.float64)
                    if arr.size and arr.max() > 255:
                        arr = arr / 257.0
                    im = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    # composite transparent images on white, not on black
                    rgba = im.convert("RGBA")
                    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                    im = Image.alpha_composite(bg, rgba)
                img = im.convert(self.mode)
        except DECODE_ERRORS as e:  # UnidentifiedImageError is an OSError
            raise MetaConfigError(f"{name} is not a readable image ({e}); remove or replace the file") from e
        if self.invert:
            from PIL import ImageOps

            img = ImageOps.invert(img)
        if self.size is not None and img.size != (self.size[1], self.size[0]):
            img = img.resize((self.size[1], self.size[0]), getattr(Image.Resampling, _RESAMPLE[self.resample]))
        return np.asarray(img, dtype=np.uint8).copy()


def omniglot_image(data: bytes, image_size: int | None = 28, name: str = "<bytes>") -> np.ndarray:
    """The Omniglot preprocessing shared by the converter and the one-shot runs: ``uint8 [s, s]``.

    The 105x105 black-on-white drawing is converted to grayscale, inverted (ink = 255) and
    shrunk by area averaging (Pillow's ``BOX`` filter, i.e. anti-aliased: a pixel's value is the
    ink fraction of the area it covers) to ``image_size`` (None keeps 105x105).
    """
    size = None if image_size is None else (image_size, image_size)
    return ImageRecipe(mode="L", size=size, invert=True, resample="box")(data, name)


def _decode_all(
    tree: SourceTree, files: Sequence[str], recipe: Callable[[bytes, str], np.ndarray], pool: ProcessPoolExecutor | None
) -> list[np.ndarray]:
    """Decodes ``files`` in order (in worker processes when a pool is given)."""
    blobs = [tree.read(f) for f in files]
    names = [f"{tree.path}:{f}" if tree._zip is not None else str(tree.path / f) for f in files]
    if pool is None:
        return [recipe(b, n) for b, n in zip(blobs, names, strict=True)]
    return list(pool.map(recipe, blobs, names, chunksize=max(1, len(files) // 16)))


# --------------------------------------------------------------------------- atomic output
def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def _check_output_outside(out_dir: str | os.PathLike, *sources: str | os.PathLike | None) -> None:
    """Refuse an output folder that is, contains or lies inside one of the ``sources`` (None skipped).

    Replacing the output (``--overwrite``) moves the old folder away and deletes it, and the
    temporary folder is created beside the output: an output equal to or above an input would
    delete the source images, one inside an input would be read back as a class by the next
    conversion. Paths are compared as resolved real paths (``~``, ``..`` and symlinks followed),
    before anything is read or written.

    Raises:
        MetaConfigError: naming the output, the input and the fix.

    """
    out = _real(out_dir)
    for src in sources:
        if src is None:
            continue
        inp = _real(src)
        if out == inp:
            relation = "is"
        elif out in inp.parents:
            relation = "contains"
        elif inp in out.parents:
            relation = "lies inside"
        else:
            continue

        def shown(given: str | os.PathLike, real: Path) -> str:
            text = os.path.expanduser(os.fspath(given))
            return repr(text) if os.path.abspath(text) == str(real) else f"{text!r} (really {str(real)!r})"

        example = f", e.g. {str(inp.parent / (inp.stem + '-shards'))!r}" if inp.parent != inp else ""
        raise MetaConfigError(
            f"output folder {shown(out_dir, out)} {relation} the input {shown(src, inp)}; writing there would "
            f"replace or mix with the source files (and --overwrite would delete them): choose an output folder "
            f"outside the input{example}")


@contextlib.contextmanager
def _atomic_output(
    out_dir: str | os.PathLike, overwrite: bool, sources: Sequence[str | os.PathLike | None] = ()
) -> Iterator[Path]:
    """Yield a temporary folder beside ``out_dir`` that replaces it when the block succeeds.

    ``out_dir`` must lie outside every path of ``sources`` (see :func:`_check_output_outside`).
    The published folder gets the ordinary permissions of the current umask (``mkdtemp`` makes it
    0700); the files in it were written with them already.
    """
    _check_output_outside(out_dir, *sources)
    out = Path(os.path.expanduser(os.fspath(out_dir))).absolute()
    if out.exists() and not out.is_dir():
        raise MetaConfigError(f"output {str(out)!r} exists and is not a folder; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MetaConfigError(f"output folder {str(out)!r} exists and is not empty; pass --overwrite "
                              "(overwrite=True) to replace it, or choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    try:
        with _terminate_as_exit():
            yield tmp
        publish_permissions(tmp)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            try:
                os.replace(out, old / "previous")
            except BaseException:
                shutil.rmtree(old, ignore_errors=True)
                raise
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None and not out.exists():  # put the previous output back: nothing is lost
                os.replace(old / "previous", out)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM (``kill``, ``timeout``, Slurm) into ``SystemExit`` for the block, so cleanup runs.

    Python's default for SIGTERM ends the process at once, leaving the half-written ``.partial``
    folder behind; as an exception it unwinds through the ``finally`` blocks like Ctrl-C does.
    Only the main thread can install signal handlers; elsewhere this does nothing.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        # None: a handler installed from C, which Python cannot reinstall; the default is the closest
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextlib.contextmanager
def _maybe_pool(workers: int) -> Iterator[ProcessPoolExecutor | None]:
    if workers < 0:
        raise MetaConfigError(f"workers={workers} must be >= 0 (0 decodes in this process)")
    if workers == 0:
        yield None
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield pool


@dataclass
class _ClassPlan:
    name: str
    split: str | None
    group: str | None
    files: list[str]
    rotations: tuple[int, ...] = (0,)
    tree: SourceTree | None = None  # where the files are when a converter reads several sources


def _write(
    tree: SourceTree,
    plans: Sequence[_ClassPlan],
    out_dir: str | os.PathLike,
    recipe: Callable[[bytes, str], np.ndarray],
    fmt: Format,
    prefix: str,
    meta: dict[str, Any],
    overwrite: bool,
    max_samples: int,
    workers: int,
) -> ShardIndex:
    """Writes the planned classes (split by split) into ``out_dir`` atomically; returns the index."""
    if fmt not in ("png", "npy"):
        raise MetaConfigError(f"format={fmt!r} is not supported; use 'png' (smaller) or 'npy' (faster to decode)")
    if max_samples < 1:
        raise MetaConfigError(f"max_samples={max_samples} must be >= 1")
    order = {s: i for i, s in enumerate((*SPLITS, None))}
    plans = sorted(plans, key=lambda p: order.get(p.split, len(order)))  # stable: keeps the name order
    shape: tuple[int, ...] | None = None
    first: str | None = None
    # a second guard for every converter (each checks first)
    sources = (tree.path, *(meta.get("input") if isinstance(meta.get("input"), list) else [meta.get("input")]))
    with _atomic_output(out_dir, overwrite, sources) as tmp, _maybe_pool(workers) as pool:
        with ShardWriter(tmp, prefix=prefix, max_samples=max_samples, meta={**meta, "format": fmt}) as writer:
            class_id = 0
            for plan in plans:
                images = _decode_all(plan.tree or tree, plan.files, recipe, pool)
                for img, f in zip(images, plan.files, strict=True):
                    if shape is None:
                        shape, first = img.shape, f
                    elif img.shape != shape:
                        raise MetaConfigError(
                            f"{f} decodes to shape {img.shape} but {first} to {shape}: an episode needs images of "
                            "one size; pass --image-size (image_size=...) to resize every image")
                for angle in plan.rotations:
                    k = angle // 90
                    rotated = [np.ascontiguousarray(np.rot90(img, k)) for img in images] if k else images
                    name = plan.name if len(plan.rotations) == 1 else f"{plan.name}/rot{angle:03d}"
                    writer.add_class(class_id, rotated, name=name, split=plan.split, group=plan.group, ext=fmt)
                    class_id += 1
        index = writer.index
        inputs = meta.get("input", "")
        (tmp / "README.txt").write_text(
            f"Shards written by `lightning-meta convert {meta.get('layout', '')}` from "
            f"{' and '.join(map(str, inputs)) if isinstance(inputs, list) else inputs}.\n"
            f"{len(index.classes)} classes; splits and provenance are in {INDEX_NAME}.\n")
    index.path = str(Path(os.path.expanduser(os.fspath(out_dir))).absolute() / INDEX_NAME)
    index.shards = [str(Path(index.path).parent / Path(p).name) for p in index.shards]
    return index


def _check_class_files(plans: Iterable[_ClassPlan], root: str, layout: str) -> None:
    for p in plans:
        if not p.files:
            raise MetaConfigError(f"class folder {p.name!r} in {root} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                                  f"add images or remove the folder (layout {layout})")


def _split_counts(n: int, ratios: Sequence[float]) -> list[int]:
    """Items per split: largest-remainder rounding of ``ratios * n``.

    A split with ratio 0 gets nothing; when there are at least as many items as splits with a
    positive ratio, each of those gets at least one (taken from the largest split).
    """
    raw = [r * n for r in ratios]
    counts = [int(np.floor(x)) for x in raw]
    positive = [i for i, r in enumerate(ratios) if r > 0]
    by_remainder = sorted(positive, key=lambda i: (-(raw[i] - counts[i]), i))
    for k in range(n - sum(counts)):
        counts[by_remainder[k % len(by_remainder)]] += 1
    if n >= len(positive):
        for i in positive:
            if counts[i] == 0:
                counts[max(range(len(counts)), key=lambda k: counts[k])] -= 1
                counts[i] += 1
    return counts


def _ratio_split(n: int, ratios: Sequence[float], seed: int) -> list[str]:
    """Split name of each of ``n`` items: a seeded permutation cut by ``ratios`` (train/val/test)."""
    if len(ratios) != 3 or any(r < 0 for r in ratios) or not np.isclose(sum(ratios), 1.0):
        raise MetaConfigError(f"split ratios {tuple(ratios)} must be three non-negative fractions "
                              "(train val test) summing to 1, e.g. --split-ratios 0.64 0.16 0.2")
    order = np.random.default_rng(np.random.SeedSequence([seed, 5151])).permutation(n)
    n_train, n_val, _ = _split_counts(n, ratios)
    out = [""] * n
    for pos, i in enumerate(order):
        out[int(i)] = "train" if pos < n_train else ("val" if pos < n_train + n_val else "test")
    return out


# --------------------------------------------------------------------------- ImageFolder
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def _auto_mode(tree: SourceTree, files: Sequence[str]) -> Literal["L", "RGB"]:
    """``RGB`` when any of ``files`` (one per class) is in color, else ``L`` (headers only are decoded)."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(io.BytesIO(tree.read(f))) as im:
                if im.mode not in _GRAY_MODES:
                    return "RGB"
        except DECODE_ERRORS as e:
            raise MetaConfigError(f"{tree.path / f} is not a readable image ({e}); remove or replace the file") from e
    return "L"


def convert_imagefolder(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    split_ratios: Sequence[float] | None = None,
    split_folders: bool = False,
    image_size: int | None = None,
    channels: Literal["auto", "1", "3"] = "auto",
    fmt: Format = "png",
    seed: int = 0,
    overwrite: bool = False,
    max_samples: int = 5000,
    workers: int = 0,
    resample: Resample = "lanczos",
) -> ShardIndex:
    """Converts ``<root>/<class>/**/<image>`` (or ``<root>/<split>/<class>/...``) to shards.

    Args:
        root: the folder (or a zip of it).
        out_dir: destination folder, created atomically.
        split_ratios: train/val/test fractions of the *classes* (seeded by ``seed``); None records no
            split (ShardDataModule then splits with its own ``split_ratios``).
        split_folders: the top folders are the splits (``train``, ``val``, ``test``).
        image_size: square output side; None keeps the source size (all images must then agree).
        channels: ``1`` (grayscale), ``3`` (RGB) or ``auto``: RGB when the first image of any class
            is in color (a grayscale image that happens to come first does not make a color set
            grayscale), else grayscale.
        fmt: ``png`` or ``npy``.
        seed: seed of the ratio split.
        overwrite: replace a non-empty ``out_dir``.
        max_samples: samples per shard.
        workers: decoding processes (0 = this process).
        resample: resize filter.

    Raises:
        MetaConfigError: missing folder, no class folders, an empty class, bad split names or ratios, an
            ``out_dir`` that is, contains or lies inside ``root``.

    """
    _check_output_outside(out_dir, root)
    tree = SourceTree(root, "imagefolder root")
    try:
        if split_folders and split_ratios is not None:
            raise MetaConfigError("split_folders and split_ratios both given; use the top folders as splits "
                                  "(--split-folders) or split classes by ratios (--split-ratios), not both")
        depth = 2 if split_folders else 1
        by_class: dict[tuple[str, ...], list[str]] = defaultdict(list)
        loose = []
        skip = 0
        tops = {PurePosixPath(f).parts[0] for f in tree.images()}
        if tree._zip is not None and len(tops) == 1 and all(len(PurePosixPath(f).parts) > depth + 1
                                                            for f in tree.images()):
            skip = 1  # a zip of the tree folder itself: <tree>/<class>/<image>
        for f in tree.images():
            parts = PurePosixPath(f).parts[skip:]
            if len(parts) <= depth:
                loose.append(f)
                continue
            by_class[parts[:depth]].append(f)
        class_dirs = {tuple(PurePosixPath(d).parts[skip:]) for d in tree.dirs
                      if len(PurePosixPath(d).parts) == depth + skip}
        for d in class_dirs:
            by_class.setdefault(d, [])
        if loose:
            where = "<root>/<split>/<class>/" if split_folders else "<root>/<class>/"
            raise MetaConfigError(f"{loose[0]} in {tree.path} is not inside a class folder; the imagefolder layout "
                                  f"is {where}<image>: move the images into class folders")
        if not by_class:
            raise MetaConfigError(f"no class folders with images found in {str(tree.path)!r}; the imagefolder layout "
                                  "is <root>/<class>/<image> (or <root>/<split>/<class>/<image> with --split-folders)")
        keys = sorted(by_class)
        if split_folders:
            bad = sorted({k[0] for k in keys if k[0] not in SPLITS})
            if bad:
                raise MetaConfigError(f"top folder {bad[0]!r} in {tree.path} is not a split name; with --split-folders "
                                      f"the top folders must be {', '.join(SPLITS)}")
            homes: dict[str, list[str]] = defaultdict(list)
            for k in keys:
                homes[k[1]].append(k[0])
            twice = sorted(c for c, where in homes.items() if len(where) > 1)
            if twice:
                raise MetaConfigError(
                    f"class {twice[0]!r} is in the {' and the '.join(homes[twice[0]])} folders of {tree.path} "
                    f"({len(twice)} class(es) are in more than one split); meta-test classes must be unseen in "
                    "meta-training: keep each class folder in one split"
                )
            splits: list[str | None] = [k[0] for k in keys]
        elif split_ratios is not None:
            splits = list(_ratio_split(len(keys), split_ratios, seed))
        else:
            splits = [None] * len(keys)
        plans = [_ClassPlan("/".join(k), s, None, sorted(by_class[k])) for k, s in zip(keys, splits, strict=True)]
        _check_class_files(plans, str(tree.path), "imagefolder")
        if channels not in ("auto", "1", "3"):
            raise MetaConfigError(f"channels={channels!r} is not supported; use 'auto', '1' or '3'")
        if channels == "auto":
            mode = _auto_mode(tree, [plan.files[0] for plan in plans if plan.files])
        else:
            mode = "L" if channels == "1" else "RGB"
        size = _check_size(image_size)
        recipe = ImageRecipe(mode=mode, size=size, resample=resample)
        meta = {"source": "lightning-meta convert", "layout": "imagefolder", "input": str(tree.path),
                "image_size": image_size, "mode": mode, "split_ratios": list(split_ratios) if split_ratios else None,
                "split_folders": split_folders, "seed": seed}
        return _write(tree, plans, out_dir, recipe, fmt, "imagefolder", meta, overwrite, max_samples, workers)
    finally:
        tree.close()


def _check_size(image_size: int | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if image_size < 1:
        raise MetaConfigError(f"image_size={image_size} must be a positive number of pixels (e.g. 28 or 84)")
    return (image_size, image_size)


# --------------------------------------------------------------------------- Omniglot
def omniglot_alphabets(tree: SourceTree) -> tuple[str, dict[str, dict[str, list[str]]]]:
    """Finds ``<prefix>/<Alphabet>/<character>/<drawing>.png`` in a tree.

    Returns:
        ``(prefix, {alphabet: {character: [files]}})``; empty character folders map to ``[]``.

    Raises:
        MetaConfigError: when the tree does not have the Omniglot layout.

    """
    pngs = [f for f in tree.files if f.lower().endswith(".png")]
    layout = "<root>/<Alphabet>/<characterNN>/<drawing>.png"
    if not pngs:
        raise MetaConfigError(f"no .png drawings found in {str(tree.path)!r}; the omniglot layout is {layout} "
                              "(for example images_background.zip from github.com/brendenlake/omniglot)")
    prefixes = {PurePosixPath(f).parts[:-3] for f in pngs}
    shallow = [f for f in pngs if len(PurePosixPath(f).parts) < 3]
    if shallow or len(prefixes) != 1:
        example = shallow[0] if shallow else ", ".join(sorted("/".join(p) or "." for p in prefixes)[:3])
        raise MetaConfigError(f"{str(tree.path)!r} does not have the omniglot layout {layout} (found {example}); "
                              "point at the folder or zip holding the alphabet folders of ONE set "
                              "(e.g. images_background, not its parent holding several sets)")
    prefix = prefixes.pop()
    if any(PurePosixPath(f).name == "class_labels.txt" for f in tree.files):
        raise MetaConfigError(f"{str(tree.path)!r} holds the one-shot runs (runNN/class_labels.txt), not an alphabet "
                              "set; evaluate on it with lightning_meta.datamodules.OmniglotRunsDataModule(runs=...) "
                              "and convert images_background*/images_evaluation instead")
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for f in pngs:
        *_, alphabet, character, _name = PurePosixPath(f).parts
        out[alphabet][character].append(f)
    n = len(prefix)
    for d in tree.dirs:  # character folders without drawings
        parts = PurePosixPath(d).parts
        if len(parts) == n + 2 and parts[:n] == prefix and parts[n] in out:
            out[parts[n]].setdefault(parts[n + 1], [])
    return "/".join(prefix), {a: {c: sorted(fs) for c, fs in chars.items()} for a, chars in out.items()}


def assign_alphabets(
    alphabets: Sequence[str],
    val_alphabets: Sequence[str] | None = None,
    test_alphabets: Sequence[str] | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
) -> dict[str, str]:
    """Split of each alphabet: explicit lists, or seeded fractions of the alphabets (the rest train).

    A non-zero fraction gives at least one alphabet; explicit lists and fractions of the same
    split cannot be combined.

    Raises:
        MetaConfigError: for unknown names, an alphabet in two lists, or bad fractions.

    """
    alphabets = sorted(alphabets)
    known = set(alphabets)
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value <= 1.0:
            raise MetaConfigError(f"{name}={value} must be in [0, 1] (a fraction of the alphabets)")
    if val_fraction + test_fraction > 1.0 + 1e-9:
        raise MetaConfigError(f"val_fraction + test_fraction = {val_fraction + test_fraction} exceeds 1")
    split = {a: "train" for a in alphabets}
    explicit: set[str] = set()
    for name, names, frac in (("val", val_alphabets, val_fraction), ("test", test_alphabets, test_fraction)):
        if names is None:
            continue
        if frac:
            raise MetaConfigError(f"both {name}_alphabets and {name}_fraction={frac} given; use one of them")
        for a in names:
            if a not in known:
                raise MetaConfigError(f"{name} alphabet {a!r} is not in the data set; "
                                      f"available: {', '.join(alphabets)}")
            if a in explicit:
                raise MetaConfigError(f"alphabet {a!r} is listed for two splits; list it once")
            explicit.add(a)
            split[a] = name
    rest = [a for a in alphabets if a not in explicit]
    order = [rest[i] for i in np.random.default_rng(np.random.SeedSequence([seed, 3301])).permutation(len(rest))]
    pos = 0
    for name, frac in (("val", val_fraction), ("test", test_fraction)):
        k = max(1, int(round(frac * len(alphabets)))) if frac > 0 else 0
        if pos + k > len(order):
            raise MetaConfigError(f"{name}_fraction={frac} asks for {k} alphabet(s) but only {len(order) - pos} "
                                  "remain; lower the fractions")
        for a in order[pos:pos + k]:
            split[a] = name
        pos += k
    return split


def assign_characters(
    characters: Sequence[str], val_characters: int = 0, test_characters: int = 0, seed: int = 0
) -> dict[str, str]:
    """Split of each character: a seeded permutation of the sorted names, ``val`` first, then ``test``.

    The MAML authors' Omniglot split: 1623 characters of both sets shuffled, 1100 train, 100
    validation and 423 test (``val_characters=100, test_characters=423``). Their order came from
    ``os.listdir`` and Python's ``random.shuffle`` with seed 1, which is not reproducible across
    machines, so this split has their sizes, not their characters.

    Example:
        >>> split = assign_characters([f"A/c{i}" for i in range(10)], val_characters=2, test_characters=3)
        >>> sorted(split.values()).count("train"), sorted(split.values()).count("test")
        (5, 3)

    Raises:
        MetaConfigError: for negative counts or counts above the number of characters.

    """
    names = sorted(characters)
    for name, value in (("val_characters", val_characters), ("test_characters", test_characters)):
        if as_integer(value) is None or value < 0:
            raise MetaConfigError(f"{name}={value!r} must be an integer >= 0 (characters in that split)")
    if val_characters + test_characters > len(names):
        raise MetaConfigError(f"val_characters={val_characters} + test_characters={test_characters} exceeds the "
                              f"{len(names)} characters of the source(s); lower the counts")
    order = [names[i] for i in np.random.default_rng(np.random.SeedSequence([seed, 3302])).permutation(len(names))]
    split = {c: "train" for c in names}
    for c in order[:val_characters]:
        split[c] = "val"
    for c in order[val_characters:val_characters + test_characters]:
        split[c] = "test"
    return split


def convert_omniglot(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    image_size: int | None = 28,
    rotations: bool = False,
    rotation_splits: Sequence[str] = SPLITS,
    val_alphabets: Sequence[str] | None = None,
    test_alphabets: Sequence[str] | None = None,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    seed: int = 0,
    fmt: Format = "png",
    overwrite: bool = False,
    max_samples: int = 5000,
    workers: int = 0,
    split_by: Literal["alphabet", "character"] = "alphabet",
    val_characters: int = 0,
    test_characters: int = 0,
) -> ShardIndex:
    """Converts one or more Omniglot sets (folders or zips) to shards split by alphabet or by character.

    Every character is a class whose ``group`` is its alphabet; with ``rotations`` each character
    of the ``rotation_splits`` also gives three more classes, its drawings rotated by 90, 180 and
    270 degrees (``numpy.rot90``, counter-clockwise), named ``<Alphabet>/<character>/rotNNN``.
    Images are stored inverted (ink = 255) at ``image_size`` (see :func:`omniglot_image`).

    Splits: by alphabet (the default; explicit lists or seeded fractions, so test alphabets are
    unseen in training, the Lake et al. protocol), or by character (``split_by="character"``:
    seeded counts of characters, so an alphabet's characters may fall in several splits, the MAML
    authors' protocol: both sets, ``val_characters=100, test_characters=423``, 1100 train).

    Args:
        source: ``images_background*.zip`` / ``images_evaluation.zip`` or an extracted folder, or a
            list of them (their alphabets are merged; an alphabet may appear in one only).
        out_dir: destination folder, created atomically.
        image_size: output side (default 28, as in the few-shot literature); None keeps 105.
        rotations: x4 class expansion.
        rotation_splits: splits whose characters are expanded.
        val_alphabets: explicit alphabet names of the validation split.
        test_alphabets: explicit alphabet names of the test split.
        val_fraction: seeded fraction of the alphabets for validation, instead of a list.
        test_fraction: seeded fraction of the alphabets for test (the remaining alphabets are train).
        seed: seed of the fraction or character split.
        fmt: ``png`` or ``npy``.
        overwrite: replace a non-empty ``out_dir``.
        max_samples: samples per shard.
        workers: decoding processes (0 = this process).
        split_by: ``alphabet`` or ``character`` (see above).
        val_characters: with ``split_by="character"``, characters of the validation split.
        test_characters: with ``split_by="character"``, characters of the test split (the rest train).

    Raises:
        MetaConfigError: missing input, wrong layout, an empty character folder, bad split options, an
            alphabet in two sources, an ``out_dir`` that is, contains or lies inside a source.

    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if not sources:
        raise MetaConfigError("no omniglot source given; pass images_background / images_evaluation (zip or folder)")
    if split_by not in ("alphabet", "character"):
        raise MetaConfigError(f"split_by={split_by!r} is not supported; use 'alphabet' or 'character'")
    if split_by == "alphabet" and (val_characters or test_characters):
        raise MetaConfigError(f"val_characters={val_characters} / test_characters={test_characters} split characters; "
                              "add split_by='character' (--split-by character) or split alphabets instead")
    if split_by == "character" and (val_alphabets or test_alphabets or val_fraction or test_fraction):
        raise MetaConfigError("split_by='character' splits characters by count; drop the alphabet options "
                              "(val/test_alphabets, val/test_fraction) or use split_by='alphabet'")
    _check_output_outside(out_dir, *sources)
    trees: list[SourceTree] = []
    try:
        bad = [s for s in rotation_splits if s not in SPLITS]
        if bad:
            raise MetaConfigError(f"rotation split {bad[0]!r} is not one of {', '.join(SPLITS)}")
        alphabets: dict[str, dict[str, list[str]]] = {}
        home: dict[str, SourceTree] = {}
        prefixes: list[str] = []
        for src in sources:
            tree = SourceTree(src, "omniglot source")
            trees.append(tree)
            prefix, found = omniglot_alphabets(tree)
            prefixes.append(prefix)
            for a, chars in found.items():
                if a in alphabets:
                    raise MetaConfigError(f"alphabet {a!r} is in {home[a].path} and in {tree.path}; give each "
                                          "Omniglot set once (e.g. images_background and images_evaluation)")
                alphabets[a] = chars
                home[a] = tree
        names = [f"{a}/{c}" for a in sorted(alphabets) for c in sorted(alphabets[a])]
        if split_by == "character":
            split_of = assign_characters(names, val_characters, test_characters, seed)
        else:
            by_alpha = assign_alphabets(list(alphabets), val_alphabets, test_alphabets, val_fraction,
                                        test_fraction, seed)
            split_of = {n: by_alpha[n.split("/", 1)[0]] for n in names}
        rot = tuple(ROTATIONS) if rotations else (0,)
        plans = []
        for name in names:
            a, c = name.split("/", 1)
            s = split_of[name]
            plans.append(_ClassPlan(name, s, a, alphabets[a][c], rot if s in rotation_splits else (0,), tree=home[a]))
        for tree, prefix in zip(trees, prefixes, strict=True):
            _check_class_files([p for p in plans if p.tree is tree], f"{tree.path}/{prefix}", "omniglot")
        size = _check_size(image_size)
        recipe = ImageRecipe(mode="L", size=size, invert=True, resample="box")
        inputs = [str(t.path) for t in trees]
        meta = {"source": "lightning-meta convert", "layout": "omniglot",
                "input": inputs[0] if len(inputs) == 1 else inputs,
                "image_size": image_size or 105, "ink": "255 (inverted from black-on-white)",
                "rotations": list(rot), "rotation_splits": list(rotation_splits) if rotations else [],
                "split_by": split_by, "seed": seed}
        if split_by == "alphabet":
            meta["alphabet_splits"] = {a: by_alpha[a] for a in sorted(by_alpha)}
        else:
            meta["character_counts"] = {"val": val_characters, "test": test_characters}
        return _write(trees[0], plans, out_dir, recipe, fmt, "omniglot", meta, overwrite, max_samples, workers)
    finally:
        for tree in trees:
            tree.close()


# --------------------------------------------------------------------------- miniImageNet
def convert_miniimagenet(
    root: str | os.PathLike,
    out_dir: str | os.PathLike,
    images: str | os.PathLike | None = None,
    image_size: int = 84,
    fmt: Format = "png",
    overwrite: bool = False,
    max_samples: int = 5000,
    workers: int = 0,
) -> ShardIndex:
    """Converts miniImageNet with the Ravi & Larochelle split files to 84x84 RGB shards.

    ``root`` holds ``train.csv``, ``val.csv`` and ``test.csv`` (header ``filename,label``); the
    images are in ``images`` (default ``<root>/images``), either flat (``images/<filename>``) or
    per class (``images/<label>/<filename>``). Classes keep their split and their WordNet id as name.

    Raises:
        MetaConfigError: missing csv or image files, a bad header, a class in two splits, an ``out_dir``
            that is, contains or lies inside ``root`` or ``images``.

    """
    root = Path(os.path.expanduser(os.fspath(root)))
    _check_output_outside(out_dir, root, images)
    if not root.is_dir():
        raise MetaConfigError(f"miniimagenet root {str(root)!r} is not a folder; point at the folder holding "
                              "train.csv, val.csv, test.csv and images/")
    tree = SourceTree(images if images is not None else root / "images", "miniimagenet images folder")
    try:
        present = set(tree.files)
        plans: list[_ClassPlan] = []
        seen: dict[str, str] = {}
        for split in SPLITS:
            if not (root / f"{split}.csv").is_file():
                raise MetaConfigError(f"{root / f'{split}.csv'} is missing; miniimagenet needs the Ravi & Larochelle "
                                      "split files train.csv, val.csv and test.csv (columns filename,label) in the "
                                      "root folder")
        for split in SPLITS:
            csv_path = root / f"{split}.csv"
            by_label: dict[str, list[str]] = {}
            with open(csv_path, newline="") as f:
                reader = csv.reader(f)
                header = [h.strip() for h in next(reader, [])]
                if header[:2] != ["filename", "label"]:
                    raise MetaConfigError(f"{csv_path} starts with {header!r}; the split files have the header "
                                          "'filename,label'")
                for line_no, row in enumerate(reader, start=2):
                    if not row or not "".join(row).strip():
                        continue
                    if len(row) < 2:
                        raise MetaConfigError(f"{csv_path}:{line_no} has {len(row)} column(s); expected filename,label")
                    name, label = row[0].strip(), row[1].strip()
                    rel = name if name in present else f"{label}/{name}"
                    if rel not in present:
                        raise MetaConfigError(f"{name} (listed in {csv_path}:{line_no}) is not in {tree.path} "
                                              f"(looked for images/{name} and images/{label}/{name}); "
                                              "restore the image or point --images at the right folder")
                    by_label.setdefault(label, []).append(rel)
            if not by_label:
                raise MetaConfigError(f"{csv_path} lists no images; every split needs classes")
            for label in sorted(by_label):
                if label in seen:
                    raise MetaConfigError(f"class {label!r} is in both {seen[label]}.csv and {split}.csv; "
                                          "few-shot splits must have disjoint classes")
                seen[label] = split
                plans.append(_ClassPlan(label, split, None, by_label[label]))
        size = _check_size(image_size)
        recipe = ImageRecipe(mode="RGB", size=size, resample="lanczos")
        meta = {"source": "lightning-meta convert", "layout": "miniimagenet", "input": str(root),
                "image_size": image_size, "split": "Ravi & Larochelle 2017 (train.csv/val.csv/test.csv)"}
        return _write(tree, plans, out_dir, recipe, fmt, "miniimagenet", meta, overwrite, max_samples, workers)
    finally:
        tree.close()


# --------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lightning-meta convert",
        description="Convert an image collection to class-grouped webdataset shards with an index.json "
                    "(splits, checksums, provenance), written atomically.",
    )
    sub = p.add_subparsers(dest="layout", metavar="LAYOUT", required=True)

    def common(sp: argparse.ArgumentParser, size_default: int | None, size_help: str) -> None:
        sp.add_argument("output", help="destination folder (created atomically)")
        sp.add_argument("--format", choices=["png", "npy"], default="png",
                        help="png (smaller) or npy (raw uint8 arrays, faster to decode); default png")
        sp.add_argument("--image-size", type=int, default=size_default, help=size_help)
        sp.add_argument("--overwrite", action="store_true", help="replace the output folder if it is not empty")
        sp.add_argument("--max-samples", type=int, default=5000, help="samples per shard (default 5000)")
        sp.add_argument("--workers", type=int, default=0, help="decoding processes (default 0: this process)")

    sp = sub.add_parser("imagefolder", help="<root>/<class>/<image> (optionally <root>/<split>/<class>/<image>)")
    sp.add_argument("root", help="the folder (or zip) whose sub-folders are the classes")
    common(sp, None, "square output side in pixels (default: keep; images must then share one size)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--split-ratios", type=float, nargs=3, metavar=("TRAIN", "VAL", "TEST"),
                   help="split the classes by these fractions (seeded); default: no split recorded")
    g.add_argument("--split-folders", action="store_true", help="the top folders are the splits: train, val, test")
    sp.add_argument("--channels", choices=["auto", "1", "3"], default="auto",
                    help="1 = grayscale, 3 = RGB, auto = RGB if the first image of any class is in color (default)")
    sp.add_argument("--resample", choices=list(_RESAMPLE), default="lanczos", help="resize filter (default lanczos)")
    sp.add_argument("--seed", type=int, default=0, help="seed of --split-ratios")

    sp = sub.add_parser("omniglot", help="<root>/<Alphabet>/<characterNN>/*.png, a folder or the release zip")
    sp.add_argument("source", nargs="+",
                    help="images_background*.zip / images_evaluation.zip or extracted folders (several are merged)")
    common(sp, 28, "square output side (default 28; 0 keeps 105x105)")
    sp.add_argument("--rotations", action="store_true",
                    help="x4 classes: add every character rotated by 90, 180 and 270 degrees as new classes")
    sp.add_argument("--rotation-splits", nargs="+", choices=list(SPLITS), default=None,
                    help="splits expanded by --rotations (default: all); needs --rotations")
    sp.add_argument("--val-alphabets", nargs="+", metavar="NAME", help="alphabets of the validation split")
    sp.add_argument("--test-alphabets", nargs="+", metavar="NAME", help="alphabets of the test split")
    sp.add_argument("--val-fraction", type=float, default=0.0, help="seeded fraction of alphabets for validation")
    sp.add_argument("--test-fraction", type=float, default=0.0, help="seeded fraction of alphabets for test")
    sp.add_argument("--split-by", choices=["alphabet", "character"], default="alphabet",
                    help="split alphabets (default; unseen alphabets at test) or characters (the MAML authors' "
                         "protocol: both sets, --val-characters 100 --test-characters 423)")
    sp.add_argument("--val-characters", type=int, default=0, help="with --split-by character: validation characters")
    sp.add_argument("--test-characters", type=int, default=0, help="with --split-by character: test characters")
    sp.add_argument("--seed", type=int, default=0, help="seed of the fraction or character split")

    sp = sub.add_parser("miniimagenet", help="Ravi & Larochelle split csv files + images/, resized to 84x84 RGB")
    sp.add_argument("root", help="folder holding train.csv, val.csv, test.csv and images/")
    common(sp, 84, "square output side (default 84)")
    sp.add_argument("--images", help="image folder (default <root>/images)")
    return p


def main(argv: list[str] | None = None) -> None:
    """``lightning-meta convert LAYOUT INPUT OUTPUT [options]``; errors print as one line (exit status 2)."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.layout == "omniglot" and args.rotation_splits is not None and not args.rotations:
        parser.error(f"--rotation-splits {' '.join(args.rotation_splits)} has no effect without --rotations; "
                     "add --rotations (x4 classes by rotation) or drop --rotation-splits")
    common = {"fmt": args.format, "overwrite": args.overwrite, "max_samples": args.max_samples, "workers": args.workers}
    try:
        if args.layout == "imagefolder":
            index = convert_imagefolder(args.root, args.output, split_ratios=args.split_ratios,
                                        split_folders=args.split_folders, image_size=args.image_size,
                                        channels=args.channels, seed=args.seed, resample=args.resample, **common)
        elif args.layout == "omniglot":
            index = convert_omniglot(args.source, args.output, image_size=args.image_size or None,
                                     rotations=args.rotations, rotation_splits=args.rotation_splits or list(SPLITS),
                                     val_alphabets=args.val_alphabets, test_alphabets=args.test_alphabets,
                                     val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                                     seed=args.seed, split_by=args.split_by, val_characters=args.val_characters,
                                     test_characters=args.test_characters, **common)
        else:
            index = convert_miniimagenet(args.root, args.output, images=args.images, image_size=args.image_size,
                                         **common)
    except MetaConfigError as e:
        if os.environ.get("LIGHTNING_META_DEBUG"):
            raise
        print(f"lightning-meta convert: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # the output cannot be created or written (read errors of inputs are named above)
        if os.environ.get("LIGHTNING_META_DEBUG"):
            raise
        print(f"lightning-meta convert: error: cannot write the output {args.output!r}: {e.strerror or e} "
              f"({e.filename}); choose a folder you can write to", file=sys.stderr)
        raise SystemExit(2) from None
    counts = defaultdict(int)
    images = 0
    for c in index.classes:
        counts[c.split or "unsplit"] += 1
        images += c.count
    per_split = ", ".join(f"{s} {n}" for s, n in counts.items())
    print(f"wrote {args.output}: {len(index.classes)} classes ({per_split}), {images} images "
          f"in {len(index.shards)} shard(s), {args.format}")

