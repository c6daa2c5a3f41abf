"""Images that do not fit the backbone are refused before any forward, naming both shapes and the fix."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_meta.algorithms import MAML, ProtoNet
from lightning_meta.backbones import MLP, Conv4, FiLMBackbone
from lightning_meta.cli import main
from lightning_meta.data.shards import ShardWriter
from lightning_meta.datamodules import EpisodicDataModule, ShardDataModule
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_META_CACHE", str(tmp_path / "cache"))


def _shards(folder: Path, shape: tuple[int, ...], classes: tuple[int, int, int] = (4, 3, 3)) -> Path:
    """Tiny labelled shards (4 images per class) whose images have ``shape`` (``(H, W)`` or ``(H, W, C)``)."""
    rng = np.random.default_rng(0)
    with ShardWriter(folder, prefix="tiny") as w:
        cid = 0
        for split, n in zip(("train", "val", "test"), classes, strict=True):
            for _ in range(n):
                imgs = [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(4)]
                w.add_class(cid, imgs, name=f"c{cid}", split=split)
                cid += 1
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("shape_shards")
    return {"gray16": _shards(root / "gray16", (16, 16)), "rgb16": _shards(root / "rgb16", (16, 16, 3)),
            "gray32": _shards(root / "gray32", (32, 32)), "rgb32": _shards(root / "rgb32", (32, 32, 3)),
            "rgb16b": _shards(root / "rgb16b", (16, 16, 3))}


def _dm(shards, **kw) -> ShardDataModule:
    args = dict(ways=3, shots=1, queries=1, eval_queries=1, meta_batch_size=2, eval_meta_batch_size=2,
                train_episodes=4, val_episodes=2, test_episodes=2)
    args.update(kw)
    return ShardDataModule(shards=str(shards), **args)


def _trainer(tmp_path, steps: int = 2) -> L.Trainer:
    return L.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1,
                     default_root_dir=tmp_path)


def _count_forwards(net: nn.Module) -> list[int]:
    calls = [0]

    def hook(*_):
        calls[0] += 1

    net.register_forward_pre_hook(hook)
    return calls


def test_wrong_channels_are_refused_before_any_forward(data, tmp_path):
    body = Conv4(1, 4, 16)
    calls = _count_forwards(body)
    with pytest.raises(MetaConfigError) as e:
        _trainer(tmp_path).fit(ProtoNet(body, ways=3), datamodule=_dm(data["rgb16"]))
    msg = str(e.value)
    assert "3x16x16" in msg and "in_channels=1" in msg and "image_size" not in msg
    assert "Conv4(in_channels=3)" in msg and "--model.init_args.backbone.init_args.in_channels 3" in msg
    assert str(data["rgb16"]) in msg and "\n" not in msg
    assert calls[0] == 0


def test_wrong_size_is_refused_naming_image_size(data, tmp_path):
    model = MAML(Conv4(1, 4, 16, norm="batch_no_stats"), ways=3, first_order=True)
    with pytest.raises(MetaConfigError) as e:
        _trainer(tmp_path).fit(model, datamodule=_dm(data["gray32"]))
    msg = str(e.value)
    assert "1x32x32" in msg and "image_size=16" in msg and "in_channels" not in msg
    assert "--model.init_args.backbone.init_args.image_size 32" in msg


def test_both_mismatches_are_named_in_one_message(data, tmp_path):
    with pytest.raises(MetaConfigError) as e:
        _trainer(tmp_path).fit(ProtoNet(Conv4(1, 4, 16), ways=3), datamodule=_dm(data["rgb32"]))
    msg = str(e.value)
    assert "in_channels=1 and image_size=16" in msg and "Conv4(in_channels=3, image_size=32)" in msg


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_entry_points_check_too(data, tmp_path, stage):
    body = Conv4(1, 4, 16)
    calls = _count_forwards(body)
    with pytest.raises(MetaConfigError, match="in_channels=1"):
        getattr(_trainer(tmp_path), stage)(ProtoNet(body, ways=3), datamodule=_dm(data["rgb16"]))
    assert calls[0] == 0


def test_separate_test_shards_are_checked(data, tmp_path):
    dm = _dm(data["gray16"], test_shards=str(data["gray32"]))
    with pytest.raises(MetaConfigError, match=r"the test images \(of .*gray32\) are 1x32x32"):
        _trainer(tmp_path).test(ProtoNet(Conv4(1, 4, 16), ways=3), datamodule=dm)


@pytest.mark.parametrize("kind", ["streaming", "sources"])
def test_streaming_reader_and_multiple_sources_are_checked(data, tmp_path, kind):
    if kind == "streaming":
        dm = _dm(data["rgb16"], reader="streaming", verify="none")
    else:
        dm = ShardDataModule(sources=[str(data["rgb16"]), str(data["rgb16b"])], ways=3, shots=1, queries=1,
                             eval_queries=1, meta_batch_size=2, eval_meta_batch_size=2, train_episodes=4,
                             val_episodes=2, test_episodes=2)
    with pytest.raises(MetaConfigError, match="in_channels=1"):
        _trainer(tmp_path).fit(ProtoNet(Conv4(1, 4, 16), ways=3), datamodule=dm)
    if kind == "streaming":  # the shape probe closed its stream; a matching model then trains normally
        trainer = _trainer(tmp_path, steps=1)
        trainer.fit(ProtoNet(Conv4(3, 4, 16), ways=3), datamodule=_dm(data["rgb16"], reader="streaming",
                                                                      verify="none"))
        assert trainer.global_step == 1


@pytest.mark.parametrize("make", [
    lambda: ProtoNet(Conv4(3, 4, 16), ways=3),
    lambda: MAML(Conv4(3, 4, 16, norm="batch_no_stats"), ways=3, first_order=True),
    lambda: MAML(MLP(3 * 16 * 16, [8]), ways=3, first_order=True),
], ids=["protonet", "maml", "mlp"])
def test_matching_setup_trains(data, tmp_path, make):
    trainer = _trainer(tmp_path)
    trainer.fit(make(), datamodule=_dm(data["rgb16"]))
    assert trainer.global_step == 2


class _Undeclared(nn.Module):
    """A user backbone that takes any image size and channel count and says nothing about either."""

    out_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.LazyConv2d(4, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(-2, -1))


def test_backbone_without_declared_expectations_is_not_checked(data, tmp_path):
    model = ProtoNet(_Undeclared(), ways=3)
    model.check_input_shape((3, 99, 7))  # nothing declared: nothing refused
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(model, datamodule=_dm(data["rgb32"]))
    assert trainer.global_step == 1


def test_wrapped_backbone_and_mlp_name_their_own_arguments(tmp_path):
    film = MAML(FiLMBackbone(Conv4(1, 4, 16)), ways=3)
    with pytest.raises(MetaConfigError, match=r"--model\.init_args\.backbone\.init_args\.backbone\.init_args\."
                                              r"in_channels 3"):
        film.check_input_shape((3, 16, 16))
    mlp = MAML(MLP(784, [8]), ways=3)
    mlp.check_input_shape((1, 28, 28))
    with pytest.raises(MetaConfigError, match=r"in_features=784 .*in_features 768"):
        mlp.check_input_shape((3, 16, 16))
    model = ProtoNet(Conv4(1, 4, 16), ways=3)
    model.check_input_shape((5,))  # not an image (regression inputs): not checked
    model.backbone.image_size = (16, 20)  # a backbone declaring height and width
    model.check_input_shape((1, 16, 20))
    with pytest.raises(MetaConfigError, match=r"image_size=\[16, 20\].*image_size \[20,16\]"):
        model.check_input_shape((1, 20, 16))


class _Source:
    def __init__(self, shape):
        self.shape = shape

    def first_image_shape(self):
        return self.shape

    def episode(self, split, epoch, index):
        g = torch.Generator().manual_seed(index)
        y = torch.arange(3)
        return Episode(torch.rand(3, *self.shape, generator=g), y, torch.rand(3, *self.shape, generator=g), y,
                       torch.arange(3))


class _PlainDM(EpisodicDataModule):
    """A user datamodule whose setup knows nothing about the check: its dataloaders still run it."""

    def setup(self, stage=None):
        self.sources = {s: _Source((3, 16, 16)) for s in ("train", "val", "test")}


def test_any_episodic_datamodule_is_checked_when_its_loaders_are_made(tmp_path):
    dm = _PlainDM(ways=3, shots=1, queries=1, meta_batch_size=2, train_episodes=4, val_episodes=2, test_episodes=2)
    with pytest.raises(MetaConfigError, match="the training images are 3x16x16"):
        _trainer(tmp_path).fit(ProtoNet(Conv4(1, 4, 16), ways=3), datamodule=dm)
    trainer = _trainer(tmp_path, steps=1)
    trainer.fit(ProtoNet(Conv4(3, 4, 16), ways=3), datamodule=dm)
    assert trainer.global_step == 1


def test_cli_prints_the_mismatch_as_one_line(data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--data.init_args.shards",
              str(data["rgb32"]), "--data.init_args.ways", "3", "--data.init_args.eval_ways", "3",
              "--data.init_args.queries", "1",
              "--data.init_args.eval_queries", "1", "--trainer.max_steps", "1", "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false"])
    assert e.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lightning-meta: error:")]
    assert len(err) == 1 and "Traceback" not in err[0]
    assert "3x32x32" in err[0] and "in_channels=1 and image_size=28" in err[0]
    assert "--model.init_args.backbone.init_args.in_channels 3 --model.init_args.backbone.init_args.image_size 32" \
        in err[0]
