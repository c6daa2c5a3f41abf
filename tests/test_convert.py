"""``lightning-meta convert`` (ImageFolder, Omniglot, miniImageNet) and the Omniglot one-shot runs datamodule.

The inputs are the committed fake trees of ``tests/data/fake_trees`` (made by
``tests/data/make_fake_trees.py``); tests that read the real minimal Omniglot release in
``../shared/data/omniglot`` skip when it is absent.
"""

from __future__ import annotations

import shutil
import zipfile
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lightning_meta.algorithms import ProtoNet
from lightning_meta.backbones import Conv4
from lightning_meta.cli import console_main
from lightning_meta.data.augment import AffineAugmentedSource, random_affine
from lightning_meta.data.convert import (
    assign_alphabets,
    assign_characters,
    convert_imagefolder,
    convert_miniimagenet,
    convert_omniglot,
    main,
    omniglot_image,
)
from lightning_meta.data.shards import IndexedReader, decode_image, load_index
from lightning_meta.datamodules import OmniglotRunsDataModule, ShardDataModule
from lightning_meta.datamodules.omniglot_runs import AlphabetEpisodeSource, load_omniglot_runs
from lightning_meta.errors import MetaConfigError

FAKE = Path(__file__).resolve().parent / "data" / "fake_trees"
OMNI = FAKE / "omniglot" / "images_background_fake"
RUNS = FAKE / "omniglot_runs"
IMAGEFOLDER = FAKE / "imagefolder"
MINI = FAKE / "miniimagenet"
ALPHABETS = ["Alpha_(fake)", "Beta", "Delta", "Gamma"]
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
needs_real = pytest.mark.skipif(not (REAL / "all_runs.zip").is_file(), reason="../shared/data/omniglot is absent")


def _images(index, reader: IndexedReader, pos: int) -> list[np.ndarray]:
    out = []
    for m in range(index.classes[pos].count):
        data, ext = reader.read_bytes(pos, m)
        out.append(decode_image(data, ext))
    return out


def _zip_tree(folder: Path, dest: Path, with_dirs: bool = True) -> Path:
    """Zips ``folder`` the way the Omniglot release is zipped: the folder itself is the top entry."""
    with zipfile.ZipFile(dest, "w") as zf:
        for p in sorted(folder.rglob("*")):
            arc = p.relative_to(folder.parent).as_posix()
            if p.is_dir():
                if with_dirs:
                    zf.writestr(arc + "/", b"")
            else:
                zf.write(p, arc)
    return dest


# --------------------------------------------------------------------------- Omniglot
def test_omniglot_counts_groups_and_preprocessing(tmp_path):
    index = convert_omniglot(OMNI, tmp_path / "out", val_alphabets=["Beta"], test_alphabets=["Gamma"])
    assert len(index.classes) == 4 * 4
    assert {c.group for c in index.classes} == set(ALPHABETS)
    for c in index.classes:
        assert c.count == 4 and c.name.startswith(c.group + "/character")
        assert c.split == {"Beta": "val", "Gamma": "test"}.get(c.group, "train")
    loaded = load_index(str(tmp_path / "out"))
    assert [c.name for c in loaded.classes] == [c.name for c in index.classes]
    assert loaded.meta["layout"] == "omniglot" and loaded.meta["image_size"] == 28
    reader = IndexedReader(loaded)
    img = _images(loaded, reader, 0)[0]
    assert img.shape == (28, 28) and img.dtype == np.uint8
    # inverted: the background (white paper) is 0, ink is bright
    src = sorted((OMNI / loaded.classes[0].name).glob("*.png"))[0]
    expected = omniglot_image(src.read_bytes(), 28)
    np.testing.assert_array_equal(img, expected)
    assert img[0, 0] == 0 and img.max() > 200 and (img > 127).mean() < 0.5
    assert np.asarray(Image.open(src).convert("L"))[0, 0] == 255  # the source really is ink-on-white


def test_omniglot_split_by_alphabet_fraction_is_seeded_and_disjoint(tmp_path):
    index = convert_omniglot(OMNI, tmp_path / "a", val_fraction=0.25, test_fraction=0.25, seed=3)
    split_of = {}
    for c in index.classes:
        assert split_of.setdefault(c.group, c.split) == c.split, f"alphabet {c.group} is in two splits"
    assert sorted(split_of.values()) == ["test", "train", "train", "val"]
    again = convert_omniglot(OMNI, tmp_path / "b", val_fraction=0.25, test_fraction=0.25, seed=3)
    assert [(c.name, c.split) for c in again.classes] == [(c.name, c.split) for c in index.classes]
    assert index.meta["alphabet_splits"] == split_of
    other = [assign_alphabets(ALPHABETS, val_fraction=0.25, seed=s) for s in range(8)]
    assert len({tuple(sorted(d.items())) for d in other}) > 1, "the seed must change the split"


def test_omniglot_zip_equals_folder(tmp_path):
    z = _zip_tree(OMNI, tmp_path / "images_background_fake.zip")
    a = convert_omniglot(OMNI, tmp_path / "from_folder", rotations=True, fmt="npy")
    b = convert_omniglot(z, tmp_path / "from_zip", rotations=True, fmt="npy")
    assert [(c.name, c.split, c.group, c.count) for c in a.classes] == [
        (c.name, c.split, c.group, c.count) for c in b.classes]
    ra = IndexedReader(load_index(str(tmp_path / "from_folder")))
    rb = IndexedReader(load_index(str(tmp_path / "from_zip")))
    for pos in (0, 5, 17, 63):
        for x, y in zip(_images(ra.index, ra, pos), _images(rb.index, rb, pos), strict=True):
            np.testing.assert_array_equal(x, y)
    # a zip without directory entries works too
    z2 = _zip_tree(OMNI, tmp_path / "nodirs.zip", with_dirs=False)
    assert len(convert_omniglot(z2, tmp_path / "nodirs").classes) == 16


def test_rotations_expand_classes_with_rotated_pixels(tmp_path):
    plain = convert_omniglot(OMNI, tmp_path / "plain", val_alphabets=["Delta"])
    rot = convert_omniglot(OMNI, tmp_path / "rot", rotations=True, val_alphabets=["Delta"])
    assert len(rot.classes) == 4 * len(plain.classes)
    reader = IndexedReader(load_index(str(tmp_path / "rot")))
    by_name = {c.name: i for i, c in enumerate(reader.index.classes)}
    base_name = "Beta/character03"
    base = _images(reader.index, reader, by_name[f"{base_name}/rot000"])
    assert not np.array_equal(base[0], np.rot90(base[0], 2)), "fixture drawings must not be symmetric"
    for k, angle in enumerate((0, 90, 180, 270)):
        pos = by_name[f"{base_name}/rot{angle:03d}"]
        assert reader.index.classes[pos].group == "Beta"
        for img, b in zip(_images(reader.index, reader, pos), base, strict=True):
            np.testing.assert_array_equal(img, np.rot90(b, k))
    # the unrotated class equals the plain conversion
    preader = IndexedReader(load_index(str(tmp_path / "plain")))
    ppos = [c.name for c in preader.index.classes].index(base_name)
    for a, b in zip(_images(preader.index, preader, ppos), base, strict=True):
        np.testing.assert_array_equal(a, b)
    # ids are unique and rotated classes never cross splits
    assert len({c.id for c in rot.classes}) == len(rot.classes)
    only_train = convert_omniglot(OMNI, tmp_path / "rot_train", rotations=True, rotation_splits=["train"],
                                  val_alphabets=["Delta"])
    counts = {s: sum(c.split == s for c in only_train.classes) for s in ("train", "val")}
    assert counts == {"train": 3 * 4 * 4, "val": 4}


def test_npy_and_png_decode_to_identical_arrays(tmp_path):
    png = convert_omniglot(OMNI, tmp_path / "png", image_size=20)
    convert_omniglot(OMNI, tmp_path / "npy", image_size=20, fmt="npy")
    rp, rn = IndexedReader(load_index(str(tmp_path / "png"))), IndexedReader(load_index(str(tmp_path / "npy")))
    assert {c.ext for c in rp.index.classes} == {"png"} and {c.ext for c in rn.index.classes} == {"npy"}
    for pos in range(len(png.classes)):
        for a, b in zip(_images(rp.index, rp, pos), _images(rn.index, rn, pos), strict=True):
            assert a.shape == (20, 20)
            np.testing.assert_array_equal(a, b)
        torch.testing.assert_close(rp.image(pos, 0), rn.image(pos, 0), rtol=0, atol=0)
    # RGB too (imagefolder)
    p3 = convert_imagefolder(IMAGEFOLDER, tmp_path / "p3")
    n3 = convert_imagefolder(IMAGEFOLDER, tmp_path / "n3", fmt="npy")
    r1, r2 = IndexedReader(load_index(str(tmp_path / "p3"))), IndexedReader(load_index(str(tmp_path / "n3")))
    for pos in range(len(p3.classes)):
        np.testing.assert_array_equal(_images(r1.index, r1, pos)[1], _images(r2.index, r2, pos)[1])
    assert len(n3.classes) == 5


def test_converted_shards_give_valid_episodes(tmp_path):
    convert_omniglot(OMNI, tmp_path / "s", rotations=True, val_alphabets=["Beta"], test_alphabets=["Gamma"],
                     fmt="npy")
    dm = ShardDataModule(shards=str(tmp_path / "s"), ways=5, shots=2, queries=2, eval_ways=3, eval_shots=1,
                         eval_queries=3, meta_batch_size=2, train_episodes=4, val_episodes=4, test_episodes=4)
    dm.prepare_data()
    dm.setup()
    assert dm.split_sizes == {"train": 2 * 4 * 4, "val": 4 * 4, "test": 4 * 4}
    index = dm._reader(str(tmp_path / "s")).index
    split_ids = {s: {c.id for c in index.classes if c.split == s} for s in ("train", "val", "test")}
    batch = next(iter(dm.train_dataloader()))
    assert batch.support_x.shape == (2, 10, 1, 28, 28) and batch.query_x.shape == (2, 10, 1, 28, 28)
    assert set(batch.classes.flatten().tolist()) <= split_ids["train"]
    for ep in batch.tasks():
        assert torch.equal(ep.support_y, torch.arange(5).repeat_interleave(2))
        assert len(set(ep.classes.tolist())) == 5
        assert 0.0 <= ep.support_x.min() and ep.support_x.max() <= 1.0 and ep.support_x.max() > 0.5
    test_batch = next(iter(dm.test_dataloader()))
    assert set(test_batch.classes.flatten().tolist()) <= split_ids["test"]
    assert test_batch.query_x.shape[1:] == (9, 1, 28, 28)


# --------------------------------------------------------------------------- ImageFolder, miniImageNet
def test_imagefolder_classes_channels_and_ratio_split(tmp_path):
    index = convert_imagefolder(IMAGEFOLDER, tmp_path / "a")
    assert [c.name for c in index.classes] == [f"class_{k}" for k in range(5)]
    assert all(c.split is None and c.count == 3 for c in index.classes)
    reader = IndexedReader(load_index(str(tmp_path / "a")))
    means = []
    for pos in range(5):
        imgs = _images(reader.index, reader, pos)
        assert all(i.shape == (10, 10, 3) for i in imgs)  # grayscale and JPEG classes become RGB
        means.append(np.mean(imgs, axis=(0, 1, 2)))
    src = np.asarray(Image.open(IMAGEFOLDER / "class_0" / "img0.png"))
    np.testing.assert_array_equal(_images(reader.index, reader, 0)[0], src)
    split = convert_imagefolder(IMAGEFOLDER, tmp_path / "b", split_ratios=(0.6, 0.2, 0.2), image_size=16, seed=1)
    assert sorted(c.split for c in split.classes) == ["test", "train", "train", "train", "val"]
    assert IndexedReader(load_index(str(tmp_path / "b"))).image(0, 0).shape == (3, 16, 16)
    zipped = convert_imagefolder(_zip_tree(IMAGEFOLDER, tmp_path / "imagefolder.zip"), tmp_path / "z")
    assert [c.name for c in zipped.classes] == [c.name for c in index.classes]
    gray = convert_imagefolder(IMAGEFOLDER, tmp_path / "g", channels="1")
    assert IndexedReader(load_index(str(tmp_path / "g"))).image(2, 0).shape == (1, 10, 10)
    assert len(gray.classes) == 5


def test_imagefolder_split_folders(tmp_path):
    tree = tmp_path / "tree"
    for k, split in enumerate(["train", "train", "train", "val", "test"]):
        shutil.copytree(IMAGEFOLDER / f"class_{k}", tree / split / f"class_{k}")
    index = convert_imagefolder(tree, tmp_path / "out", split_folders=True)
    assert [(c.name, c.split) for c in index.classes] == [
        ("train/class_0", "train"), ("train/class_1", "train"), ("train/class_2", "train"),
        ("val/class_3", "val"), ("test/class_4", "test")]
    (tree / "extra").mkdir()
    shutil.copytree(IMAGEFOLDER / "class_0", tree / "extra" / "c")
    with pytest.raises(MetaConfigError, match="'extra' .* not a split name"):
        convert_imagefolder(tree, tmp_path / "out2", split_folders=True)


def test_miniimagenet_split_files(tmp_path):
    index = convert_miniimagenet(MINI, tmp_path / "mini")
    assert [(c.name, c.split) for c in index.classes] == [
        ("n01000001", "train"), ("n01000002", "train"), ("n01000003", "train"),
        ("n02000001", "val"), ("n02000002", "val"), ("n03000001", "test"), ("n03000002", "test")]
    assert all(c.count == 3 for c in index.classes)
    reader = IndexedReader(load_index(str(tmp_path / "mini")))
    assert reader.image(6, 2).shape == (3, 84, 84)
    dm = ShardDataModule(shards=str(tmp_path / "mini"), ways=2, shots=1, queries=2, eval_queries=2,
                         meta_batch_size=1, train_episodes=2, val_episodes=2, test_episodes=2)
    dm.setup("fit")
    ep = next(iter(dm.train_dataloader()))
    assert ep.support_x.shape == (1, 2, 3, 84, 84)
    # images stored per class (images/<label>/<file>) are found too
    alt = tmp_path / "alt"
    shutil.copytree(MINI, alt)
    for f in sorted((alt / "images").glob("*.jpg")):
        (alt / "images" / f.name[:9]).mkdir(exist_ok=True)
        f.rename(alt / "images" / f.name[:9] / f.name)
    assert len(convert_miniimagenet(alt, tmp_path / "mini2").classes) == 7


# --------------------------------------------------------------------------- errors and atomicity
def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(MetaConfigError, match="does not exist"):
        convert_omniglot(tmp_path / "nope", tmp_path / "o")
    with pytest.raises(MetaConfigError, match="does not have the omniglot layout"):
        convert_omniglot(IMAGEFOLDER.parent / "imagefolder", tmp_path / "o")  # <class>/<img>: too shallow
    with pytest.raises(MetaConfigError, match="one-shot runs"):
        convert_omniglot(RUNS, tmp_path / "o")
    with pytest.raises(MetaConfigError, match="'Klingon' is not in the data set; available: Alpha"):
        convert_omniglot(OMNI, tmp_path / "o", val_alphabets=["Klingon"])
    with pytest.raises(MetaConfigError, match="listed for two splits"):
        convert_omniglot(OMNI, tmp_path / "o", val_alphabets=["Beta"], test_alphabets=["Beta"])
    with pytest.raises(MetaConfigError, match="val_fraction=1.5"):
        convert_omniglot(OMNI, tmp_path / "o", val_fraction=1.5)
    with pytest.raises(MetaConfigError, match="split ratios"):
        convert_imagefolder(IMAGEFOLDER, tmp_path / "o", split_ratios=(0.5, 0.2, 0.2))
    # an empty class folder
    tree = tmp_path / "omni"
    shutil.copytree(OMNI, tree)
    (tree / "Beta" / "character09").mkdir()
    with pytest.raises(MetaConfigError, match="character09.* holds no images"):
        convert_omniglot(tree, tmp_path / "o")
    shutil.copytree(IMAGEFOLDER, tmp_path / "if")
    (tmp_path / "if" / "class_empty").mkdir()
    with pytest.raises(MetaConfigError, match="'class_empty' .* holds no images"):
        convert_imagefolder(tmp_path / "if", tmp_path / "o")
    # images of different sizes without --image-size
    Image.new("RGB", (7, 5)).save(tmp_path / "if" / "class_empty" / "odd.png")
    with pytest.raises(MetaConfigError, match="image-size"):
        convert_imagefolder(tmp_path / "if", tmp_path / "o")
    # miniImageNet: missing csv, missing image, class in two splits
    mini = tmp_path / "mini"
    shutil.copytree(MINI, mini)
    (mini / "images" / "n020000010002.jpg").unlink()
    with pytest.raises(MetaConfigError, match=r"n020000010002.jpg \(listed in .*val.csv:3\)"):
        convert_miniimagenet(mini, tmp_path / "o")
    (mini / "val.csv").write_text("filename,label\nn010000010001.jpg,n01000001\n")
    with pytest.raises(MetaConfigError, match="'n01000001' is in both train.csv and val.csv"):
        convert_miniimagenet(mini, tmp_path / "o")
    (mini / "test.csv").unlink()
    with pytest.raises(MetaConfigError, match="test.csv is missing"):
        convert_miniimagenet(mini, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_output_is_atomic_and_not_overwritten(tmp_path):
    tree = tmp_path / "omni"
    shutil.copytree(OMNI, tree)
    (tree / "Gamma" / "character04" / "0404_02.png").write_bytes(b"not a png")  # fails late, in the last alphabet
    with pytest.raises(MetaConfigError, match="0404_02.png is not a readable image"):
        convert_omniglot(tree, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["omni"], "no output and no temporary folder remain"
    convert_omniglot(OMNI, tmp_path / "out")
    before = (tmp_path / "out" / "index.json").read_bytes()
    with pytest.raises(MetaConfigError, match="pass --overwrite"):
        convert_omniglot(OMNI, tmp_path / "out", rotations=True)
    assert (tmp_path / "out" / "index.json").read_bytes() == before
    with pytest.raises(MetaConfigError):  # a failing overwrite keeps the old output
        convert_omniglot(tree, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "index.json").read_bytes() == before
    assert len(convert_omniglot(OMNI, tmp_path / "out", rotations=True, overwrite=True).classes) == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["omni", "out"]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "parent", "inside"])
def test_output_overlapping_the_input_is_refused_and_keeps_the_sources(tmp_path, where):
    raw = tmp_path / "data" / "raw"
    shutil.copytree(IMAGEFOLDER, raw)
    out, relation = {"same": (raw, "is"), "parent": (raw.parent, "contains"),
                     "inside": (raw / "shards", "lies inside")}[where]
    before = _snapshot(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(MetaConfigError, match=f"{relation} the input") as e:
            convert_imagefolder(raw, out, image_size=8, overwrite=overwrite)
        msg = str(e.value)
        assert repr(str(out)) in msg and repr(str(raw)) in msg and "choose an output folder outside the input" in msg
        assert _snapshot(tmp_path) == before, "the source images and nothing else are still there"
    # the other converters refuse the same way, before reading anything
    with pytest.raises(MetaConfigError, match=f"{relation} the input"):
        convert_omniglot(raw, out, overwrite=True)
    with pytest.raises(MetaConfigError, match=f"{relation} the input"):
        convert_miniimagenet(raw, out, overwrite=True)
    assert _snapshot(tmp_path) == before
    assert not (raw / "shards").exists() and sorted(p.name for p in raw.parent.iterdir()) == ["raw"]


def test_cli_convert_into_the_parent_of_the_input_deletes_nothing(tmp_path, capsys):
    """The reported data loss: ``convert imagefolder data/raw data --overwrite`` deleted data/raw."""
    raw = tmp_path / "data" / "raw"
    shutil.copytree(IMAGEFOLDER, raw)
    before = _snapshot(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["imagefolder", str(raw), str(raw.parent), "--image-size", "28", "--overwrite"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "contains the input" in err and str(raw) in err and "outside the input" in err and err.count("\n") == 1
    assert _snapshot(tmp_path) == before


def test_output_overlap_follows_symlinks_zips_and_miniimagenet_images(tmp_path):
    raw = tmp_path / "data" / "raw"
    shutil.copytree(IMAGEFOLDER, raw)
    (tmp_path / "link").symlink_to(raw, target_is_directory=True)
    with pytest.raises(MetaConfigError, match=r"'.*link' \(really '.*raw'\)"):  # the real paths are compared
        convert_imagefolder(tmp_path / "link", raw, overwrite=True)
    with pytest.raises(MetaConfigError, match="is the input"):
        convert_imagefolder(raw, tmp_path / "data" / "x" / ".." / "raw", overwrite=True)
    # a zip input: an output folder above the zip would delete it
    (tmp_path / "zips").mkdir()
    zipped = _zip_tree(OMNI, tmp_path / "zips" / "omni.zip")
    with pytest.raises(MetaConfigError, match="contains the input"):
        convert_omniglot(zipped, tmp_path / "zips", overwrite=True)
    assert zipped.is_file()
    # miniImageNet: the csv root and a separate images folder are both inputs
    mini = tmp_path / "mini"
    shutil.copytree(MINI, mini)
    images = tmp_path / "elsewhere" / "images"
    shutil.move(mini / "images", images)
    with pytest.raises(MetaConfigError, match="contains the input"):
        convert_miniimagenet(mini, tmp_path, images=images, overwrite=True)
    with pytest.raises(MetaConfigError, match=r"lies inside the input '.*images'"):
        convert_miniimagenet(mini, images / "out", images=images)
    assert len(convert_miniimagenet(mini, tmp_path / "ok", images=images).classes) == 7  # sibling folders are fine
    assert len(list(images.iterdir())) == len(list(MINI.joinpath("images").iterdir()))


def test_cli_convert_and_one_line_errors(tmp_path, capsys):
    console_main(["convert", "omniglot", str(OMNI), str(tmp_path / "o"), "--rotations", "--val-alphabets", "Beta",
                  "--format", "npy", "--image-size", "16"])
    out = capsys.readouterr().out
    assert "64 classes (train 48, val 16)" in out and "npy" in out
    assert load_index(str(tmp_path / "o")).classes[0].ext == "npy"
    main(["imagefolder", str(IMAGEFOLDER), str(tmp_path / "i"), "--split-ratios", "0.6", "0.2", "0.2"])
    assert "5 classes" in capsys.readouterr().out
    main(["miniimagenet", str(MINI), str(tmp_path / "m"), "--image-size", "32"])
    assert IndexedReader(load_index(str(tmp_path / "m"))).image(0, 0).shape == (3, 32, 32)
    main(["miniimagenet", str(MINI), str(tmp_path / "m2"), "--image-size", "32", "--workers", "2"])
    assert load_index(str(tmp_path / "m2")).sha256 == load_index(str(tmp_path / "m")).sha256  # same bytes
    with pytest.raises(SystemExit) as e:
        main(["omniglot", str(tmp_path / "missing.zip"), str(tmp_path / "x")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lightning-meta convert: error: omniglot source") and "missing.zip" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as e:  # unknown layout: argparse's own usage error
        main(["cifar", str(OMNI), str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'cifar'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the one-shot runs
def test_load_runs_folder_and_zip(tmp_path):
    runs = load_omniglot_runs(RUNS, image_size=16)
    assert [r.name for r in runs] == ["run01", "run02", "run03"]
    z = _zip_tree(RUNS, tmp_path / "all_runs.zip")
    zruns = load_omniglot_runs(z, image_size=16)
    for r, zr in zip(runs, zruns, strict=True):
        assert r.support_x.shape == (5, 1, 16, 16) and r.query_x.shape == (5, 1, 16, 16)
        assert sorted(r.query_y.tolist()) == list(range(5))
        torch.testing.assert_close(r.query_x, zr.query_x)
        assert torch.equal(r.query_y, zr.query_y)
        # the labels are right: each test item is nearest (pixels) to its own training drawing
        full = load_omniglot_runs(RUNS, image_size=None)[runs.index(r)]
        d = torch.cdist(full.query_x.flatten(1), full.support_x.flatten(1))
        assert torch.equal(d.argmin(1), full.query_y)
    line = (RUNS / "run02" / "class_labels.txt").read_text().splitlines()[2].split()
    assert runs[1].query_y[2].item() == int(line[1][-6:-4]) - 1
    # same preprocessing as the converter: inverted, area-averaged
    raw = (RUNS / "run01" / "training" / "class01.png").read_bytes()
    np.testing.assert_allclose(runs[0].support_x[0, 0].numpy(), omniglot_image(raw, 16) / 255.0, atol=1e-7)
    with pytest.raises(MetaConfigError, match="holds no runNN/class_labels.txt"):
        load_omniglot_runs(OMNI)


def test_alphabet_episode_source_stays_within_one_alphabet(tmp_path):
    convert_omniglot(OMNI, tmp_path / "s", rotations=True)
    reader = IndexedReader(load_index(str(tmp_path / "s")))
    from lightning_meta.data.sampling import FixedShape

    src = AlphabetEpisodeSource(reader, range(len(reader.index.classes)), FixedShape(6, 1, 2), seed=0)
    group_of = {c.id: c.group for c in reader.index.classes}
    seen = set()
    for i in range(12):
        ep = src.episode("train", 0, i)
        groups = {group_of[int(c)] for c in ep.classes}
        assert len(groups) == 1
        seen |= groups
        assert torch.equal(ep.support_x, src.episode("train", 0, i).support_x)
    assert len(seen) > 1
    with pytest.raises(MetaConfigError, match="need an alphabet with 17 characters"):
        AlphabetEpisodeSource(reader, range(len(reader.index.classes)), FixedShape(17, 1, 1), seed=0)


def test_affine_augmentation_is_a_pure_function_of_the_episode(tmp_path):
    x = torch.rand(6, 1, 20, 20)
    torch.testing.assert_close(random_affine(x, np.random.default_rng(0)), x)
    a = random_affine(x, np.random.default_rng(1), degrees=15, translate=0.1, scale=0.1, shear=0.1)
    b = random_affine(x, np.random.default_rng(1), degrees=15, translate=0.1, scale=0.1, shear=0.1)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, x)
    convert_omniglot(OMNI, tmp_path / "s", rotations=True)
    reader = IndexedReader(load_index(str(tmp_path / "s")))
    from lightning_meta.data.sampling import FixedShape
    from lightning_meta.datamodules.shards import ShardEpisodeSource

    base = ShardEpisodeSource(reader, range(64), FixedShape(4, 1, 1), seed=0)
    aug = AffineAugmentedSource(base, seed=0, degrees=10, translate=0.05)
    e1, e2, e3 = aug.episode("train", 1, 3), aug.episode("train", 1, 3), aug.episode("train", 1, 4)
    torch.testing.assert_close(e1.support_x, e2.support_x)
    assert not torch.allclose(e1.support_x, base.episode("train", 1, 3).support_x)
    assert not torch.equal(e1.classes, e3.classes) or not torch.allclose(e1.support_x, e3.support_x)
    torch.testing.assert_close(aug.episode("val", 0, 0).support_x, base.episode("val", 0, 0).support_x)
    with pytest.raises(MetaConfigError, match="degrees=200"):
        AffineAugmentedSource(base, seed=0, degrees=200)


def _fit_and_test(tmp_path, **kw):
    dm = OmniglotRunsDataModule(runs=str(RUNS), background=str(OMNI), image_size=16, ways=8, shots=1, queries=2,
                                eval_ways=4, eval_shots=1, eval_queries=2, train_episodes=6, val_episodes=4,
                                val_fraction=0.25, **kw)
    model = ProtoNet(Conv4(1, 16, 16), ways=8)
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=dm)
    val = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    return dm, model, trainer, val, result


def test_runs_datamodule_trains_and_reports_error_per_run(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))
    dm, model, trainer, val, result = _fit_and_test(tmp_path, affine_degrees=5.0)
    assert dm.test_episodes == 3 and 0.0 <= val["val/acc"] <= 1.0
    assert dm.split_sizes["val"] == 4 and dm.split_sizes["train"] == 3 * 4 * 4  # rotations on training classes only
    # REFERENCE §6: per run wrong/items, averaged over runs; every run has 5 items so it equals 1 - acc
    model.eval()
    per_run = []
    with torch.no_grad():
        for r in dm.run_list:
            logits = model.predict(model.backbone(r.support_x), r.query_x)
            per_run.append((logits.argmax(1) != r.query_y).float().mean().item())
    assert result["test/error"] == pytest.approx(float(np.mean(per_run)), abs=1e-6)
    assert result["test/error"] == pytest.approx(1.0 - result["test/acc"], abs=1e-6)
    assert result["test/episodes"] == 3
    preds = torch.cat([b["labels"] for b in trainer.predict(model, datamodule=dm)])
    assert (preds != dm.runs_query_labels()).float().mean(1).mean().item() == pytest.approx(result["test/error"])
    # the conversion is cached: a second datamodule with the same options reuses the folder
    again = OmniglotRunsDataModule(runs=str(RUNS), background=str(OMNI), image_size=16, val_fraction=0.25)
    assert again.background_shards() == dm.background_shards()
    assert len([p for p in (tmp_path / "cache" / "omniglot").iterdir() if p.is_dir()]) == 1  # + its lock file


def test_runs_datamodule_test_only_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))
    dm = OmniglotRunsDataModule(runs=str(RUNS), image_size=16)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    result = trainer.test(ProtoNet(Conv4(1, 8, 16)), datamodule=dm, verbose=False)[0]
    assert 0.0 <= result["test/error"] <= 1.0
    with pytest.raises(MetaConfigError, match="needs training data"):
        dm.setup("fit")
    with pytest.raises(MetaConfigError, match="both background and shards"):
        OmniglotRunsDataModule(runs=str(RUNS), background=str(OMNI), shards="x")
    with pytest.raises(MetaConfigError, match="runs='/nowhere.zip' does not exist"):
        OmniglotRunsDataModule(runs="/nowhere.zip").prepare_data()
    convert_omniglot(OMNI, tmp_path / "s16", image_size=16)
    with pytest.raises(MetaConfigError, match="image_size=28"):  # shards converted at another size
        OmniglotRunsDataModule(runs=str(RUNS), shards=str(tmp_path / "s16"), image_size=28).setup("fit")
    with pytest.raises(MetaConfigError, match="within-alphabet 5-way val episodes need an alphabet with 5"):
        OmniglotRunsDataModule(runs=str(RUNS), background=str(OMNI), image_size=16, val_fraction=0.5, ways=4,
                               queries=1, eval_ways=5, eval_queries=1).setup("fit")


# --------------------------------------------------------------------------- the real minimal release
@needs_real
def test_real_runs_load():
    runs = load_omniglot_runs(REAL / "all_runs.zip")
    assert len(runs) == 20
    for r in runs:
        assert r.support_x.shape == (20, 1, 28, 28) and r.query_x.shape == (20, 1, 28, 28)
        assert sorted(r.query_y.tolist()) == list(range(20))  # one test item per class
        assert r.support_x[:, :, 0, :].max() < 0.5 and 0.02 < r.support_x.mean() < 0.3  # ink is 1, mostly background


@needs_real
def test_real_background_small1_converts_by_alphabet(tmp_path):
    index = convert_omniglot(REAL / "images_background_small1.zip", tmp_path / "s1", val_fraction=0.2, fmt="npy")
    assert len(index.classes) == 136 and sum(c.count for c in index.classes) == 2720
    assert {c.group for c in index.classes} == {"Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"}
    assert sum(1 for a, s in index.meta["alphabet_splits"].items() if s == "val") == 1
    with zipfile.ZipFile(REAL / "images_background_small1.zip") as zf:
        raw = zf.read("images_background_small1/Greek/character01/" +
                      sorted(n for n in zf.namelist() if "/Greek/character01/" in n and n.endswith(".png"))[0]
                      .rsplit("/", 1)[1])
    reader = IndexedReader(load_index(str(tmp_path / "s1")))
    pos = [c.name for c in reader.index.classes].index("Greek/character01")
    data, ext = reader.read_bytes(pos, 0)
    np.testing.assert_array_equal(decode_image(data, ext), omniglot_image(raw, 28))


def test_imagefolder_follows_symlinked_class_folders_without_looping(tmp_path):
    import os

    for c in ("a", "b", "c"):
        (tmp_path / "store" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / "store" / c / f"{i}.png")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(tmp_path / "store" / "a", root / "a")  # a linked class folder
    (root / "b").mkdir()
    for p in sorted((tmp_path / "store" / "b").iterdir()):  # linked files
        os.symlink(p, root / "b" / p.name)
    os.symlink(tmp_path / "store" / "c", root / "c")
    os.symlink(root, root / "b" / "loop")  # a link back to the root must not recurse forever
    index = convert_imagefolder(root, tmp_path / "out")
    assert sorted((c.name, c.count) for c in index.classes) == [("a", 3), ("b", 3), ("c", 3)]


class _EndsRng:
    """A stand-in generator whose uniform draws all return one end of the range."""

    def __init__(self, high: bool) -> None:
        self.high = high

    def uniform(self, low, high, size):
        return np.full(size, high if self.high else low, dtype=float)


def _ink_side(img: torch.Tensor) -> int:
    rows = (img[0, 0] > 0.5).any(1).nonzero()
    return int(rows.max() - rows.min() + 1)


@pytest.mark.parametrize("high, side", [(True, 24), (False, 8)])
def test_affine_scale_enlarges_by_the_documented_factor(high, side):
    # per-axis scale U(1 - s, 1 + s): s = 0.5 at its ends must make a 16-pixel square 24 or 8 pixels wide
    x = torch.zeros(1, 1, 64, 64)
    x[..., 24:40, 24:40] = 1.0
    out = random_affine(x, _EndsRng(high), scale=0.5)
    assert abs(_ink_side(out) - side) <= 1


def test_affine_shift_and_shear_move_the_content_as_documented():
    x = torch.zeros(1, 1, 64, 64)
    x[..., 30:34, 30:34] = 1.0
    moved = random_affine(x, _EndsRng(True), translate=0.25)  # +0.25 of the side on both axes: 16 pixels
    cols = (moved[0, 0] > 0.5).any(0).nonzero()
    assert abs(int(cols.min()) - 46) <= 1


@pytest.mark.parametrize("n, ratios, expected", [
    (5, (0.5, 0.5, 0.0), {"train": 3, "val": 2}),  # a split with ratio 0 gets no class
    (4, (0.64, 0.16, 0.2), {"train": 2, "val": 1, "test": 1}),  # every positive split gets one
    (1, (0.5, 0.5, 0.0), {"train": 1}),
    (10, (0.64, 0.16, 0.2), {"train": 6, "val": 2, "test": 2}),
    (3, (0.98, 0.01, 0.01), {"train": 1, "val": 1, "test": 1}),
    (100, (0.64, 0.16, 0.2), {"train": 64, "val": 16, "test": 20}),
])
def test_ratio_split_counts(n, ratios, expected):
    from lightning_meta.data.convert import _ratio_split

    assert dict(Counter(_ratio_split(n, ratios, seed=0))) == expected


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_16_bit_grayscale_is_scaled_not_clipped(mode):
    import io

    from lightning_meta.data.convert import ImageRecipe

    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 4096, 16384, 32768, 65535]], dtype=np.uint16)).save(buf, format="PNG")
    out = ImageRecipe(mode=mode)(buf.getvalue())
    values = out if mode == "L" else out[..., 0]
    assert values.tolist() == [[0, 16, 64, 128, 255]]


def test_a_failed_publish_puts_the_previous_output_back(tmp_path, monkeypatch):
    import os

    from lightning_meta.data.convert import _atomic_output

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    real_replace = os.replace

    def failing_replace(src, dst):
        if str(src).endswith(".partial"):  # the new output's rename fails (disk full, permissions, ...)
            raise OSError("simulated failure")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        with _atomic_output(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (out / "keep.txt").read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .partial or .old folder left


# --------------------------------------------------------------------------- ninth-session review fixes
def test_split_folders_refuse_a_class_in_two_splits(tmp_path):
    tree = tmp_path / "tree"
    for k, split in enumerate(["train", "train", "val", "test"]):
        shutil.copytree(IMAGEFOLDER / f"class_{k}", tree / split / f"class_{k}")
    shutil.copytree(IMAGEFOLDER / "class_0", tree / "val" / "class_0")  # also a meta-validation class
    with pytest.raises(MetaConfigError, match=r"class 'class_0' is in the train and the val folders"):
        convert_imagefolder(tree, tmp_path / "out", split_folders=True)
    assert not (tmp_path / "out").exists()


def test_an_unreadable_input_file_is_a_clear_error(tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(IMAGEFOLDER, tree)
    (tree / "class_1" / "zz.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link
    with pytest.raises(MetaConfigError, match=r"cannot read .*class_1/zz\.png \(No such file or directory\)"):
        convert_imagefolder(tree, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_sigterm_during_a_conversion_removes_the_partial_output(tmp_path):
    """kill, timeout and Slurm send SIGTERM; it used to end the process with the .partial folder left."""
    import signal
    import subprocess
    import sys

    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from lightning_meta.data.convert import _atomic_output\n"
        "with _atomic_output(Path(sys.argv[1]) / 'out', overwrite=False) as tmp:\n"
        "    (tmp / 'shard-000000.tar').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    signal.pause()\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]  # SystemExit, not death by the signal
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def _png_claiming_size(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header (with a correct CRC) claims another size."""
    import io
    import struct
    import zlib

    buf = io.BytesIO()
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 4  # signature, chunk length
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])) & 0xFFFFFFFF)
    return bytes(data)


def test_a_header_claiming_a_huge_image_is_a_decode_error():
    from lightning_meta.data.convert import ImageRecipe
    from lightning_meta.data.faults import DECODE_ERRORS

    bomb = _png_claiming_size(60000, 60000)
    with pytest.raises(DECODE_ERRORS):  # skipped as a corrupt sample by the readers, not the end of the run
        decode_image(bomb, "png")
    with pytest.raises(MetaConfigError, match="is not a readable image"):
        ImageRecipe(mode="L")(bomb, "bomb.png")


def test_auto_channels_pick_rgb_when_any_class_starts_in_color(tmp_path):
    tree = tmp_path / "tree"
    for k in range(3):
        (tree / f"c{k}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * k + i, np.uint8)).save(tree / f"c{k}" / f"{i}.png")
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(tree / "c0" / "0-gray.png")  # sorted first
    index = convert_imagefolder(tree, tmp_path / "out")
    assert index.meta["mode"] == "RGB"
    gray = tmp_path / "gray"
    for k in range(3):
        (gray / f"c{k}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * k + i, np.uint8)).save(gray / f"c{k}" / f"{i}.png")
    assert convert_imagefolder(gray, tmp_path / "out_gray").meta["mode"] == "L"


# --------------------------------------------------------------------------- Omniglot by character, several sets
def _second_set(tmp_path: Path) -> Path:
    """A copy of the fake set with renamed alphabets, standing in for images_evaluation."""
    dest = tmp_path / "images_evaluation_fake"
    for a in ALPHABETS:
        shutil.copytree(OMNI / a, dest / f"{a.split('_')[0]}_eval")
    return dest


def test_omniglot_split_by_character_counts_seed_and_groups(tmp_path):
    index = convert_omniglot(OMNI, tmp_path / "a", split_by="character", val_characters=3, test_characters=5,
                             seed=4)
    splits = {c.name: c.split for c in index.classes}
    assert len(splits) == 16 and Counter(splits.values()) == {"train": 8, "val": 3, "test": 5}
    assert {c.group for c in index.classes} == set(ALPHABETS)  # the alphabet stays the group
    per_alphabet = {a: {s for n, s in splits.items() if n.startswith(a + "/")} for a in ALPHABETS}
    assert any(len(s) > 1 for s in per_alphabet.values())  # characters of one alphabet in several splits
    assert load_index(str(tmp_path / "a")).meta["split_by"] == "character"
    again = convert_omniglot(OMNI, tmp_path / "b", split_by="character", val_characters=3, test_characters=5, seed=4)
    assert {c.name: c.split for c in again.classes} == splits
    other = convert_omniglot(OMNI, tmp_path / "c", split_by="character", val_characters=3, test_characters=5, seed=5)
    assert {c.name: c.split for c in other.classes} != splits
    assert assign_characters(sorted(splits), 3, 5, seed=4) == splits  # the function the converter uses


def test_omniglot_several_sets_are_merged(tmp_path):
    second = _second_set(tmp_path)
    index = convert_omniglot([OMNI, second], tmp_path / "o", split_by="character", val_characters=4,
                             test_characters=10, rotations=True, rotation_splits=["train"], fmt="npy")
    names = {c.name.rsplit("/rot", 1)[0] for c in index.classes}
    assert len(names) == 32 and Counter(c.split for c in index.classes) == {"train": 18 * 4, "val": 4, "test": 10}
    reader = IndexedReader(index)  # a class from the second set holds that set's drawings
    pos = next(i for i, c in enumerate(index.classes) if c.name == "Beta_eval/character02")
    src = sorted((second / "Beta_eval" / "character02").glob("*.png"))
    assert index.classes[pos].count == len(src)
    np.testing.assert_array_equal(_images(index, reader, pos)[0], omniglot_image(src[0].read_bytes(), 28))
    assert load_index(str(tmp_path / "o")).meta["input"] == [str(OMNI), str(second)]
    by_alphabet = convert_omniglot([OMNI, second], tmp_path / "p", test_alphabets=["Beta_eval", "Beta"])
    assert Counter(c.split for c in by_alphabet.classes) == {"train": 24, "test": 8}


def test_omniglot_character_split_refuses_bad_options(tmp_path):
    with pytest.raises(MetaConfigError, match=r"alphabet 'Alpha_\(fake\)' is in .* and in"):
        convert_omniglot([OMNI, OMNI], tmp_path / "o")
    with pytest.raises(MetaConfigError, match="add split_by='character'"):
        convert_omniglot(OMNI, tmp_path / "o", test_characters=4)
    with pytest.raises(MetaConfigError, match="drop the alphabet options"):
        convert_omniglot(OMNI, tmp_path / "o", split_by="character", test_alphabets=["Beta"])
    with pytest.raises(MetaConfigError, match="exceeds the 16 characters"):
        convert_omniglot(OMNI, tmp_path / "o", split_by="character", val_characters=10, test_characters=7)
    with pytest.raises(MetaConfigError, match="must be an integer >= 0"):
        convert_omniglot(OMNI, tmp_path / "o", split_by="character", val_characters=-1)
    with pytest.raises(MetaConfigError, match="use 'alphabet' or 'character'"):
        convert_omniglot(OMNI, tmp_path / "o", split_by="stroke")
    assert not (tmp_path / "o").exists()


def test_cli_convert_omniglot_two_sets_by_character(tmp_path, capsys):
    second = _second_set(tmp_path)
    main(["omniglot", str(OMNI), str(second), str(tmp_path / "o"), "--split-by", "character",
          "--val-characters", "2", "--test-characters", "6", "--seed", "1"])
    assert "32 classes (train 24, val 2, test 6)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["omniglot", str(OMNI), str(tmp_path / "x"), "--test-characters", "3"])
    assert e.value.code == 2 and "--split-by character" in capsys.readouterr().err
