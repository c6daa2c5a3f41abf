"""The monitoring callbacks and the progress bar (issue 7, items 1 and 2).

Each callback is tested with a tiny module that logs or returns a scripted sequence (as
Lightning's own callback tests do) and, where cheap, with a real tiny MAML / Meta-SGD / MAML++
run on the sinusoid datamodule or on a small in-memory image datamodule defined here. Expected
values are computed independently (plain autograd loops, numpy statistics, pixel colours).
"""

from __future__ import annotations

import glob
import io
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from ports import launch_env
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from lightning_meta.algorithms import ANIL, MAML, MAMLPlusPlus, MetaLearner, MetaSGD, ProtoNet, Reptile
from lightning_meta.backbones import MLP, Conv4
from lightning_meta.callbacks.monitors import (
    HELDOUT_EPOCH,
    RIGHT_COLOUR,
    SUPPORT_COLOUR,
    WRONG_COLOUR,
    DerivativeOrderAnnealing,
    EpisodeGallery,
    InnerLoopMonitor,
    LearnedLRMonitor,
    MetaOverfittingMonitor,
    ThroughputMonitor,
    episode_grid,
)
from lightning_meta.callbacks.progress import MetaProgressBar, format_score
from lightning_meta.data.sampling import SPLIT_CODES, FixedShape
from lightning_meta.datamodules import EpisodicDataModule, SinusoidDataModule
from lightning_meta.episode import Episode, collate_episodes
from lightning_meta.errors import MetaConfigError

# --------------------------------------------------------------------------- fixtures


def trainer(tmp_path, callbacks, logger=False, **kw) -> L.Trainer:
    args = dict(accelerator="cpu", devices=1, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, default_root_dir=tmp_path, num_sanity_val_steps=0, max_epochs=1)
    args.update(kw)
    return L.Trainer(callbacks=callbacks, **args)


class ImageSource:
    """Seeded N-way K-shot episodes of 8x8 grey images: class ``c`` is a fixed pattern plus noise."""

    def __init__(self, shape: FixedShape, classes: list[int], seed: int = 0) -> None:
        self.shape, self.classes, self.seed = shape, list(classes), seed

    def episode(self, split: str, epoch: int, index: int) -> Episode:
        g = torch.Generator().manual_seed(self.seed * 7919 + SPLIT_CODES[split] * 1_000_003 + epoch * 101 + index)
        n, k, q = self.shape.ways, self.shape.shots, self.shape.queries
        picked = torch.randperm(len(self.classes), generator=g)[:n]
        ids = torch.tensor([self.classes[i] for i in picked])
        xs = []
        for c in ids.tolist():
            base = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(c))
            xs.append(base + 0.3 * torch.randn(k + q, 1, 8, 8, generator=g))
        x = torch.stack(xs)  # [n, k+q, 1, 8, 8]
        return Episode(x[:, :k].flatten(0, 1), torch.arange(n).repeat_interleave(k), x[:, k:].flatten(0, 1),
                       torch.arange(n).repeat_interleave(q), ids)


class TinyImageDM(EpisodicDataModule):
    """Classes 0-9 train, 10-15 val/test; the training shape may differ from the evaluation shape."""

    def setup(self, stage: str | None = None) -> None:
        self.sources["train"] = ImageSource(FixedShape(self.ways, self.shots, self.queries), list(range(10)))
        for split in ("val", "test"):
            self.sources[split] = ImageSource(FixedShape(self.eval_ways, self.eval_shots, self.eval_queries),
                                              list(range(10, 16)))


def image_dm(**kw) -> TinyImageDM:
    args = dict(ways=2, shots=1, queries=2, eval_queries=3, meta_batch_size=2, eval_meta_batch_size=2,
                train_episodes=4, val_episodes=4, test_episodes=4)
    args.update(kw)
    return TinyImageDM(**args)


def sine_dm(**kw) -> SinusoidDataModule:
    args = dict(shots=5, queries=5, eval_queries=7, meta_batch_size=2, eval_meta_batch_size=3, train_episodes=4,
                val_episodes=6, test_episodes=6)
    args.update(kw)
    return SinusoidDataModule(**args)


class Flat(nn.Module):
    """Flatten + linear body with ``out_features`` (what BackboneWithHead needs)."""

    def __init__(self, d_in: int = 64, d_out: int = 6) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.out_features = d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x.flatten(1)))


class ScriptedLearner(MetaLearner):
    """Predicts ``predict_class`` for every query; optionally logs a scripted ``val/acc`` per epoch and
    returns a scripted training-class accuracy from ``evaluate`` (indexed by the current epoch)."""

    def __init__(self, ways: int = 2, predict_class: int = 0, val_script: list[float] | None = None,
                 train_script: list[float] | None = None) -> None:
        super().__init__(ways=ways)
        self.w = nn.Parameter(torch.zeros(()))
        self.predict_class = predict_class
        self.val_script, self.train_script = val_script, train_script
        self.evaluated: list[Episode] = []

    def adapt(self, episode: Episode) -> None:
        return None

    def predict(self, state, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], self.ways, device=x.device)
        logits[:, self.predict_class] = 1.0
        return logits + 0 * self.w

    def meta_loss(self, batch: Episode) -> torch.Tensor:
        return (self.w - 1) ** 2

    def validation_step(self, batch, batch_idx):
        if self.val_script is None:
            return super().validation_step(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        if self.val_script is None:
            return super().on_validation_epoch_end()
        self.log("val/acc", self.val_script[self.current_epoch])
        self.log("val/acc_ci95", 0.01)

    def evaluate(self, batch: Episode):
        if self.train_script is None:
            return super().evaluate(batch)
        self.evaluated.append(batch)
        return {"acc": torch.full((batch.num_tasks,), self.train_script[self.current_epoch])}


def tb_events(folder) -> list[str]:
    return glob.glob(str(Path(folder) / "**" / "events.out.tfevents.*"), recursive=True)


def tb_accumulator(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accs = []
    for ev in tb_events(folder):
        acc = EventAccumulator(ev, size_guidance={"images": 0, "histograms": 0, "scalars": 0})
        acc.Reload()
        accs.append(acc)
    return accs


def first_val_episodes(dm: EpisodicDataModule, n: int) -> list[Episode]:
    dm.setup("fit")
    out: list[Episode] = []
    for batch in dm.val_dataloader():
        out += batch.tasks()
        if len(out) >= n:
            break
    return out[:n]


# --------------------------------------------------------------------------- EpisodeGallery


def test_episode_grid_layout_and_colours():
    ep = ImageSource(FixedShape(3, 2, 2), list(range(10))).episode("val", 0, 0)
    # queries are ordered by class (0, 0, 1, 1, 2, 2): right, right, wrong, right, right, wrong
    preds = torch.tensor([0, 0, 2, 1, 2, 0])
    border, gap, h = 2, 4, 8
    img = episode_grid(ep, preds, max_queries_per_class=5, border=border, gap=gap)
    ch = h + 2 * border
    assert img.shape == (3, 2 * 3 * ch + gap, 2 * ch)
    assert float(img.min()) >= 0.0 and float(img.max()) <= 1.0

    def colour(y, x):
        return tuple(round(float(v), 3) for v in img[:, y, x])

    rnd = lambda c: tuple(round(v, 3) for v in c)  # noqa: E731
    for row in range(3):
        for col in range(2):
            assert colour(row * ch, col * ch) == rnd(SUPPORT_COLOUR)
    top = 3 * ch + gap
    expected = {(0, 0): RIGHT_COLOUR, (0, 1): RIGHT_COLOUR, (1, 0): WRONG_COLOUR, (1, 1): RIGHT_COLOUR,
                (2, 0): RIGHT_COLOUR, (2, 1): WRONG_COLOUR}
    for (row, col), c in expected.items():
        assert colour(top + row * ch, col * ch) == rnd(c), (row, col)
    # image content: rescaled pixels of support image 0 (grey -> three equal channels)
    lo = min(ep.support_x.min(), ep.query_x.min())
    hi = max(ep.support_x.max(), ep.query_x.max())
    inner = img[:, border:border + h, border:border + h]
    np.testing.assert_allclose(inner[0].numpy(), ((ep.support_x[0, 0] - lo) / (hi - lo)).numpy(), atol=1e-6)
    assert torch.equal(inner[0], inner[2])
    regression = Episode(torch.zeros(5, 1), torch.zeros(5, 1), torch.zeros(5, 1), torch.zeros(5, 1),
                         torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="classification episode of images"):
        episode_grid(regression)


def test_episode_gallery_draws_right_and_wrong_queries_in_tensorboard(tmp_path):
    model = ScriptedLearner(ways=2, predict_class=0)
    gallery = EpisodeGallery(num_episodes=3, every_n_val=2, border=2)
    logger = TensorBoardLogger(tmp_path, name="g")
    trainer(tmp_path, [gallery], logger=logger, max_epochs=4).fit(model, datamodule=image_dm())
    assert gallery.val_runs == 4 and gallery.images_logged == 6  # runs 2 and 4, three episodes each
    from PIL import Image

    images = {}
    for acc in tb_accumulator(tmp_path):
        for tag in acc.Tags()["images"]:
            images[tag] = acc.Images(tag)
    assert sorted(images) == ["gallery/episode_0", "gallery/episode_1", "gallery/episode_2"]
    assert [e.step for e in images["gallery/episode_0"]] == [3, 7]  # two steps per epoch; val/* steps
    pic = np.asarray(Image.open(io.BytesIO(images["gallery/episode_0"][-1].encoded_image_string)).convert("RGB"))
    ch = 8 + 4
    top = 2 * ch + 4
    # everything is predicted as class 0: its queries are framed green, class 1's red
    for (y, x), c in {(top, 0): RIGHT_COLOUR, (top + ch, 0): WRONG_COLOUR, (0, 0): SUPPORT_COLOUR}.items():
        np.testing.assert_allclose(pic[y, x], 255 * np.array(c), atol=1.01)
    assert pic.shape == (2 * 2 * ch + 4, 3 * ch, 3)  # 3 queries per class shown


def test_episode_gallery_refuses_more_episodes_than_validation_has(tmp_path):
    with pytest.raises(MetaConfigError, match=r"num_episodes=5.*val_episodes=4.*num_episodes <= 4"):
        trainer(tmp_path, [EpisodeGallery(num_episodes=5)]).fit(ScriptedLearner(), datamodule=image_dm())
    # fast_dev_run validates one batch of 2 episodes
    with pytest.raises(MetaConfigError, match=r"num_episodes <= 2"):
        trainer(tmp_path, [EpisodeGallery(num_episodes=3)], fast_dev_run=1).fit(ScriptedLearner(),
                                                                                 datamodule=image_dm())
    # raw dataloaders: the datamodule cannot say; refused at the end of the first validation run
    dm = image_dm()
    dm.setup("fit")
    model = ScriptedLearner()
    with pytest.raises(MetaConfigError, match=r"num_episodes=4.*had on rank 0 \(2\)"):
        trainer(tmp_path, [EpisodeGallery(num_episodes=4)], limit_val_batches=1).fit(
            model, train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())
    assert model.trainer.global_step == 2  # the first validation (end of epoch 0)
    for bad in (dict(num_episodes=0), dict(every_n_val=0), dict(max_queries_per_class=0), dict(border=0)):
        with pytest.raises(MetaConfigError, match=f"{next(iter(bad))}=0"):
            EpisodeGallery(**bad)


def test_episode_gallery_skips_without_tensorboard_or_images(tmp_path):
    gallery = EpisodeGallery(num_episodes=2)
    with pytest.warns(UserWarning, match="no TensorBoard logger") as rec:
        trainer(tmp_path, [gallery], logger=CSVLogger(tmp_path), max_epochs=2).fit(ScriptedLearner(),
                                                                                   datamodule=image_dm())
    assert gallery.images_logged == 0
    assert sum("EpisodeGallery" in str(w.message) for w in rec) == 1
    # regression (sinusoid): nothing to draw, one warning, training unaffected
    gallery = EpisodeGallery(num_episodes=2)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.01)
    with pytest.warns(UserWarning, match="regression") as rec:
        trainer(tmp_path, [gallery], logger=TensorBoardLogger(tmp_path, name="s"), max_epochs=2).fit(
            model, datamodule=sine_dm())
    assert gallery.images_logged == 0 and gallery.val_runs == 2
    assert sum("EpisodeGallery" in str(w.message) for w in rec) == 1


def test_episode_gallery_refuses_a_module_without_adapt_predict(tmp_path):
    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def training_step(self, batch, idx):
            return self.w**2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(MetaConfigError, match="EpisodeGallery needs a lightning_meta MetaLearner"):
        trainer(tmp_path, [EpisodeGallery(1)]).fit(Plain(), train_dataloaders=DataLoader(torch.zeros(2, 1)))


# ------------------------------------------------------------------------- InnerLoopMonitor


def manual_curves(model: MAML, episodes: list[Episode], steps: int, lr: float, classification: bool):
    """Plain autograd SGD from the meta-learned weights; loss/acc on support and query before/after each step."""
    params = {k: v.detach().clone() for k, v in model.model.named_parameters()}
    loss_fn = nn.functional.cross_entropy if classification else nn.functional.mse_loss
    sums: dict[str, float] = {}
    for ep in episodes:
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        for k in range(steps + 1):
            for part, x, y in (("support", ep.support_x, ep.support_y), ("query", ep.query_x, ep.query_y)):
                out = functional_call(model.model, p, (x,))
                sums[f"{part}_loss_step{k}"] = sums.get(f"{part}_loss_step{k}", 0.0) + loss_fn(out, y).item()
                if classification:
                    acc = (out.argmax(-1) == y).float().mean().item()
                    sums[f"{part}_acc_step{k}"] = sums.get(f"{part}_acc_step{k}", 0.0) + acc
            if k < steps:
                grads = torch.autograd.grad(loss_fn(functional_call(model.model, p, (ep.support_x,)), ep.support_y),
                                            list(p.values()))
                p = {n: (v - lr * g).detach().requires_grad_(True) for (n, v), g in zip(p.items(), grads, strict=True)}
    return {f"inner/{k}": v / len(episodes) for k, v in sums.items()}


def test_inner_loop_monitor_regression_matches_manual_sgd(tmp_path):
    torch.manual_seed(0)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.05, inner_steps=2, lr=1e-2)
    monitor = InnerLoopMonitor(num_episodes=4, steps=3)
    dm = sine_dm()
    trainer(tmp_path, [monitor]).fit(model, datamodule=dm)
    expected = manual_curves(model, first_val_episodes(sine_dm(), 4), 3, 0.05, classification=False)
    got = {k: v for k, v in monitor.last.items() if "gain" not in k}
    assert sorted(got) == sorted(expected) and len(got) == 8  # support/query x steps 0..3
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    assert monitor.last["inner/query_gain"] == pytest.approx(expected["inner/query_loss_step0"]
                                                             - expected["inner/query_loss_step3"], rel=1e-4)
    logged = float(model.trainer.callback_metrics["inner/query_loss_step3"])
    assert logged == pytest.approx(got["inner/query_loss_step3"])
    # the support loss falls with every step (gradient descent on it)
    s = [got[f"inner/support_loss_step{k}"] for k in range(4)]
    assert s[0] > s[1] > s[2] > s[3]


def test_inner_loop_monitor_classification_and_tensorboard_layout(tmp_path):
    torch.manual_seed(1)
    model = MAML(Flat(), ways=2, inner_lr=0.5, inner_steps=1, eval_inner_steps=2)
    monitor = InnerLoopMonitor(num_episodes=3, every_n_val=2)
    trainer(tmp_path, [monitor], logger=TensorBoardLogger(tmp_path, name="i"), max_epochs=2).fit(
        model, datamodule=image_dm())
    expected = manual_curves(model, first_val_episodes(image_dm(), 3), 2, 0.5, classification=True)
    assert len(monitor.last) == 2 * 2 * 3 + 1  # (support, query) x (loss, acc) x steps 0..2, + gain
    for k, v in expected.items():
        assert monitor.last[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k
    scalars, tensors = set(), set()
    for acc in tb_accumulator(tmp_path):
        scalars |= set(acc.Tags()["scalars"])
        tensors |= set(acc.Tags()["tensors"])
    assert {"inner/query_acc_step0", "inner/query_acc_step2", "inner/support_loss_step1"} <= scalars
    assert "custom_scalars__config__" in tensors  # the chart layout (all steps of a quantity in one chart)


def test_inner_loop_monitor_follows_anil_and_metasgd(tmp_path):
    torch.manual_seed(2)
    for model in (ANIL(Flat(), ways=2, inner_lr=0.5, inner_steps=2), MetaSGD(Flat(), ways=2, inner_lr=0.5,
                                                                          inner_steps=2)):
        monitor = InnerLoopMonitor(num_episodes=2, steps=2)
        trainer(tmp_path, [monitor]).fit(model, datamodule=image_dm())
        model.eval()
        eps = first_val_episodes(image_dm(), 2)
        # the final-step query accuracy equals the model's own evaluation of the same episodes
        evaluated = model.evaluate(collate_episodes(eps))["acc"]
        assert monitor.last["inner/query_acc_step2"] == pytest.approx(evaluated.mean().item())
        assert monitor.last["inner/support_loss_step2"] < monitor.last["inner/support_loss_step0"]


def test_inner_loop_monitor_follows_mamlpp_beyond_its_trained_steps(tmp_path):
    """Steps past ``inner_steps`` reuse MAML++'s last learned rate, as its evaluation does."""
    torch.manual_seed(0)
    model = MAMLPlusPlus(MLP(1, [8]), task="regression", msl_anneal_epochs=0, learn_inner_lrs=False,
                         inner_lr=0.05, inner_steps=2, lr=1e-2)
    monitor = InnerLoopMonitor(num_episodes=2, steps=4)
    trainer(tmp_path, [monitor]).fit(model, datamodule=sine_dm())
    expected = manual_curves(model, first_val_episodes(sine_dm(), 2), 4, 0.05, classification=False)
    for k, v in expected.items():
        assert monitor.last[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_inner_loop_monitor_refusals(tmp_path):
    with pytest.raises(MetaConfigError, match="InnerLoopMonitor needs a gradient-based learner.*ProtoNet"):
        trainer(tmp_path, [InnerLoopMonitor(1)]).fit(ProtoNet(Flat()), datamodule=image_dm())
    with pytest.raises(MetaConfigError, match=r"InnerLoopMonitor\(num_episodes=7\).*num_episodes <= 6"):
        trainer(tmp_path, [InnerLoopMonitor(7)]).fit(MAML(MLP(1, [4]), task="regression"), datamodule=sine_dm())
    with pytest.raises(MetaConfigError, match="steps=0"):
        InnerLoopMonitor(steps=0)


# --------------------------------------------------------------------- MetaOverfittingMonitor


def test_meta_overfitting_stops_when_gap_grows_while_validation_stalls(tmp_path):
    val = [0.50, 0.60, 0.60, 0.60, 0.60, 0.60]
    train = [0.55, 0.70, 0.80, 0.90, 1.00, 1.00]
    model = ScriptedLearner(val_script=val, train_script=train)
    mon = MetaOverfittingMonitor(episodes=3, early_stopping=True, patience=2)
    trainer(tmp_path, [mon], max_epochs=6).fit(model, datamodule=image_dm())
    # epoch 1 is the best (0.60, gap 0.10); epochs 2 and 3 stall with a larger gap -> stop after epoch 3
    assert mon.stopped_epoch == 3 and model.trainer.current_epoch == 4
    assert mon.best == pytest.approx(0.60) and mon.gap_at_best == pytest.approx(0.10)
    assert mon.last["meta_overfit/gap"] == pytest.approx(0.30)
    assert mon.last["meta_overfit/train_acc"] == pytest.approx(0.90)
    assert float(model.trainer.callback_metrics["meta_overfit/gap"]) == pytest.approx(0.30)
    # training-class episodes: 3 per check, validation shape, not drawn from the training stream
    assert all(b.ways == 2 and b.query_x.shape[1] == 2 * 3 for b in model.evaluated)


def test_meta_overfitting_does_not_stop_on_a_plain_plateau_or_while_improving(tmp_path):
    # validation stalls but the gap stays where it was at the best score: not meta-overfitting
    model = ScriptedLearner(val_script=[0.5, 0.6, 0.6, 0.6, 0.6], train_script=[0.6, 0.7, 0.7, 0.69, 0.7])
    mon = MetaOverfittingMonitor(episodes=2, early_stopping=True, patience=2)
    trainer(tmp_path, [mon], max_epochs=5).fit(model, datamodule=image_dm())
    assert mon.stopped_epoch is None and model.trainer.current_epoch == 5
    # the gap grows but validation keeps improving by more than min_delta
    model = ScriptedLearner(val_script=[0.5, 0.6, 0.7, 0.8], train_script=[0.5, 0.7, 0.9, 1.0])
    mon = MetaOverfittingMonitor(episodes=2, early_stopping=True, patience=1, min_delta=0.05)
    trainer(tmp_path, [mon], max_epochs=4).fit(model, datamodule=image_dm())
    assert mon.stopped_epoch is None and mon.wait == 0
    # early_stopping=False only logs
    model = ScriptedLearner(val_script=[0.5, 0.5, 0.5], train_script=[0.6, 0.8, 1.0])
    mon = MetaOverfittingMonitor(episodes=2, patience=1)
    trainer(tmp_path, [mon], max_epochs=3).fit(model, datamodule=image_dm())
    assert model.trainer.current_epoch == 3 and mon.last["meta_overfit/gap"] == pytest.approx(0.5)


def test_meta_overfitting_state_survives_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    # from epoch 2 on validation stalls at 0.6 with a gap of 0.2, above the 0.1 it had at the best score
    val = [0.50, 0.60, 0.60, 0.60, 0.60, 0.60, 0.60]
    train = [0.55, 0.70, 0.80, 0.80, 0.80, 0.80, 0.80]
    mon = MetaOverfittingMonitor(episodes=2, early_stopping=True, patience=2)
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer(tmp_path, [mon, ckpts], max_epochs=3, enable_checkpointing=True).fit(
        ScriptedLearner(val_script=val, train_script=train), datamodule=image_dm())
    assert mon.wait == 1 and mon.stopped_epoch is None
    ckpt = next((tmp_path / "ckpt").glob("epoch=2-*.ckpt"))  # saved after the check of epoch 2
    for restore in (True, False):
        fresh = MetaOverfittingMonitor(episodes=2, early_stopping=True, patience=2)
        if not restore:  # control: the same resumed run without the saved state
            fresh.load_state_dict = lambda state: None
        t2 = trainer(tmp_path, [fresh], max_epochs=7)
        t2.fit(ScriptedLearner(val_script=val, train_script=train), datamodule=image_dm(), ckpt_path=ckpt)
        if restore:  # the first check after resuming is the second bad one in a row: stop, as without the break
            assert fresh.val_runs == 4 and fresh.wait == 2 and fresh.stopped_epoch is not None
        else:  # without the state the best is re-learned at the stalled value, so the gap never "grows"
            assert fresh.stopped_epoch is None and fresh.wait == 0


def test_meta_overfitting_never_logged_monitor_is_refused_before_training(tmp_path):
    model = ScriptedLearner()
    with pytest.raises(MetaConfigError, match=r"monitor='val/accuracy'.*never logs.*'val/acc'"):
        trainer(tmp_path, [MetaOverfittingMonitor(episodes=2, monitor="val/accuracy", early_stopping=True)],
                num_sanity_val_steps=1).fit(model, datamodule=image_dm())
    assert model.trainer.global_step == 0  # caught by the sanity check, before any training step
    model = ScriptedLearner()
    with pytest.raises(MetaConfigError, match="never logs"):
        trainer(tmp_path, [MetaOverfittingMonitor(episodes=2, monitor="val/accuracy")]).fit(
            model, datamodule=image_dm())
    assert model.trainer.global_step == 2  # without a sanity check: at the first validation end


def test_meta_overfitting_bad_input(tmp_path):
    for bad, name in ((dict(episodes=0), "episodes=0"), (dict(patience=0), "patience=0"),
                      (dict(min_delta=-1.0), "min_delta=-1.0"), (dict(mode="up"), "mode='up'")):
        with pytest.raises(MetaConfigError, match=name):
            MetaOverfittingMonitor(**bad)
    # training classes too small for the validation shape (3 examples each, 1 shot + 3 queries needed)
    class SmallTrain(TinyImageDM):
        def setup(self, stage=None):
            super().setup(stage)
            self.sources["train"].counts = [3] * 10

    with pytest.raises(MetaConfigError, match=r"1 shots \+ 3 queries.*as few as 3 examples"):
        trainer(tmp_path, [MetaOverfittingMonitor(episodes=2)]).fit(ScriptedLearner(), datamodule=SmallTrain(
            ways=2, shots=1, queries=2, eval_queries=3, train_episodes=4, val_episodes=4, meta_batch_size=2))
    dm = image_dm()
    dm.setup("fit")
    with pytest.raises(MetaConfigError, match="has none; use a lightning_meta EpisodicDataModule"):
        trainer(tmp_path, [MetaOverfittingMonitor(episodes=2)]).fit(
            ScriptedLearner(), train_dataloaders=dm.train_dataloader(), val_dataloaders=dm.val_dataloader())


def test_meta_overfitting_real_maml_on_sinusoid_scores_held_out_training_episodes(tmp_path):
    torch.manual_seed(3)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.05, lr=1e-2)
    mon = MetaOverfittingMonitor(episodes=5)
    dm = sine_dm(eval_shots=3)
    trainer(tmp_path, [mon]).fit(model, datamodule=dm)
    # independent: the same five episodes from a source of the evaluation shape, scored by evaluate()
    from lightning_meta.datamodules.sinusoid import SinusoidSource

    src = SinusoidSource(3, 7, dm.seed, dm.amplitude, dm.phase, dm.x_range)
    eps = [src.episode("train", HELDOUT_EPOCH, i) for i in range(5)]
    model.eval()
    scores = model.evaluate(collate_episodes(eps))["mse"].double().numpy()
    assert mon.last["meta_overfit/train_mse"] == pytest.approx(scores.mean(), rel=1e-5)
    assert mon.last["meta_overfit/train_mse_ci95"] == pytest.approx(1.96 * scores.std(ddof=1) / math.sqrt(5), rel=1e-5)
    val = float(model.trainer.callback_metrics["val/mse"])
    assert mon.last["meta_overfit/gap"] == pytest.approx(val - scores.mean(), rel=1e-5)
    # not an episode of the training stream
    stream = src.episodes("train", 0, tuple(range(4)))
    assert not any(torch.equal(e.support_x, s) for e in eps for s in stream.support_x)


# ------------------------------------------------------------------ DerivativeOrderAnnealing


class RecordingMAML(MAML):
    """Records the ``first_order`` flag seen by every training step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[bool] = []

    def meta_loss(self, batch: Episode) -> torch.Tensor:
        self.seen.append(bool(self.first_order))
        return super().meta_loss(batch)


def recording_maml(**kw) -> RecordingMAML:
    torch.manual_seed(0)
    return RecordingMAML(MLP(1, [4]), task="regression", inner_lr=0.01, **kw)


def test_derivative_order_annealing_by_epochs_and_steps(tmp_path):
    model = recording_maml()
    cb = DerivativeOrderAnnealing(first_order_epochs=2)
    trainer(tmp_path, [cb], max_epochs=3, limit_val_batches=0).fit(model, datamodule=sine_dm())
    assert model.seen == [True, True, True, True, False, False]  # 2 steps per epoch
    assert cb.switched_at_step == 4 and float(model.trainer.callback_metrics["train/second_order"]) == 1.0
    model = recording_maml(first_order=True)
    trainer(tmp_path, [DerivativeOrderAnnealing(first_order_steps=3)], max_epochs=3, limit_val_batches=0).fit(
        model, datamodule=sine_dm())
    assert model.seen == [True, True, True, False, False, False]
    model = recording_maml()
    trainer(tmp_path, [DerivativeOrderAnnealing(first_order_epochs=0)], max_epochs=1, limit_val_batches=0).fit(
        model, datamodule=sine_dm())
    assert model.seen == [False, False]


def test_derivative_order_annealing_second_order_changes_the_meta_gradient(tmp_path):
    """The flag the callback sets is the one MAML uses: gradients equal first-order, then second-order MAML."""
    dm = sine_dm()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    model = recording_maml()
    grads = {}
    for fo in (True, False):
        model.zero_grad()
        model.first_order = fo
        model.meta_loss(batch).backward()
        grads[fo] = [p.grad.clone() for p in model.model.parameters()]
    assert any(not torch.allclose(a, b) for a, b in zip(grads[True], grads[False], strict=True))
    cb = DerivativeOrderAnnealing(first_order_steps=1)
    probe = recording_maml()

    class GradProbe(L.Callback):
        def __init__(self):
            self.flags = []

        def on_before_backward(self, trainer, pl_module, loss):
            self.flags.append(pl_module.first_order)

    g = GradProbe()
    trainer(tmp_path, [cb, g], max_steps=2, limit_val_batches=0).fit(probe, datamodule=sine_dm())
    assert g.flags == [True, False]


def test_derivative_order_annealing_resumes_in_the_right_regime(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    model = recording_maml()
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer(tmp_path, [DerivativeOrderAnnealing(first_order_epochs=2), ckpts], max_steps=3, max_epochs=3,
            limit_val_batches=0, enable_checkpointing=True).fit(model, datamodule=sine_dm())
    resumed = recording_maml()  # built first-order=False: the callback must switch it back to first order
    cb = DerivativeOrderAnnealing(first_order_epochs=2)
    trainer(tmp_path, [cb], max_epochs=3, limit_val_batches=0).fit(resumed, datamodule=sine_dm(),
                                                                    ckpt_path=tmp_path / "ckpt" / "step=3.ckpt")
    assert model.seen + resumed.seen == [True, True, True, True, False, False]  # 2 steps per epoch
    assert cb.state_dict() == {"switched_at_step": 4}


def test_derivative_order_annealing_refusals(tmp_path):
    with pytest.raises(MetaConfigError, match="exactly one of first_order_epochs"):
        DerivativeOrderAnnealing()
    with pytest.raises(MetaConfigError, match="exactly one of first_order_epochs"):
        DerivativeOrderAnnealing(first_order_epochs=1, first_order_steps=1)
    with pytest.raises(MetaConfigError, match="first_order_steps=-1"):
        DerivativeOrderAnnealing(first_order_steps=-1)
    cases = [
        (ProtoNet(Flat()), image_dm(), "needs a gradient-based learner"),
        (MAMLPlusPlus(MLP(1, [4]), task="regression", msl_anneal_epochs=0, inner_lr=0.01, inner_steps=2), sine_dm(),
         "set model.first_order_epochs"),
        (Reptile(MLP(1, [4]), task="regression"), sine_dm(), "Reptile never back-propagates"),
    ]
    for model, dm, msg in cases:
        with pytest.raises(MetaConfigError, match=msg):
            trainer(tmp_path, [DerivativeOrderAnnealing(first_order_epochs=1)], limit_val_batches=0).fit(
                model, datamodule=dm)


def test_derivative_order_annealing_switches_vmap_through_batchnorm_to_second_order(tmp_path):
    """Second order under vmap through BatchNorm weights is exact (decomposed norms), so annealing into it runs."""
    model = MAML(Conv4(1, 4, 8, norm="batch", pool_blocks=3), ways=2, first_order=True, task_batching="vmap")
    anneal = DerivativeOrderAnnealing(first_order_steps=1)
    trainer(tmp_path, [anneal], limit_val_batches=0, max_steps=2).fit(model, datamodule=image_dm())
    assert anneal.switched_at_step == 1 and model.first_order is False


# ------------------------------------------------------------------------ ThroughputMonitor


class SleepyData(Dataset):
    def __init__(self, n: int, delay: float) -> None:
        self.n, self.delay = n, delay

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        time.sleep(self.delay)
        return torch.zeros(2)


class SleepyModule(L.LightningModule):
    def __init__(self, delay: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(2))
        self.delay = delay

    def training_step(self, batch, idx):
        time.sleep(self.delay)
        return (self.w - batch).pow(2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("data_s", "step_s", "frac"), [(0.02, 0.02, 0.72), (0.0, 0.05, 0.0)])
def test_throughput_monitor_measures_data_wait(tmp_path, data_s, step_s, frac):
    mon = ThroughputMonitor(log_every_n_steps=7)
    loader = DataLoader(SleepyData(24, data_s), batch_size=3)  # 8 steps of 3 episodes, 7 counted
    trainer(tmp_path, [mon], logger=CSVLogger(tmp_path)).fit(SleepyModule(step_s), train_dataloaders=loader)
    # 7 counted steps; Lightning prefetches one batch, so they hold 6 fetches of 3 x data_s
    expected_step = (6 * 3 * data_s + 7 * step_s) / 7
    got = mon.last
    # loop overhead (a few ms per step on a loaded machine) counts as waiting: a one-sided margin
    assert frac - 0.1 <= got["throughput/data_wait_frac"] <= frac + 0.2
    assert got["throughput/step_s"] == pytest.approx(expected_step, rel=0.4)
    assert got["throughput/episodes_per_s"] == pytest.approx(3 / got["throughput/step_s"], rel=1e-6)
    rows = Path(glob.glob(str(tmp_path / "lightning_logs" / "version_*" / "metrics.csv"))[0]).read_text()
    assert "throughput/episodes_per_s" in rows.splitlines()[0]


def test_throughput_monitor_excludes_validation_and_refuses_bad_interval(tmp_path):
    class SlowVal(ScriptedLearner):
        def validation_step(self, batch, idx):
            time.sleep(0.3)

    mon = ThroughputMonitor(log_every_n_steps=3)
    trainer(tmp_path, [mon], max_epochs=1, val_check_interval=2).fit(SlowVal(), datamodule=image_dm(
        train_episodes=8))
    assert mon.last["throughput/step_s"] < 0.2  # the 0.3 s validation pause is not counted as a step
    with pytest.raises(MetaConfigError, match="log_every_n_steps=0"):
        ThroughputMonitor(log_every_n_steps=0)


# ------------------------------------------------------------------------- LearnedLRMonitor


def test_learned_lr_monitor_metasgd_histograms_and_summary(tmp_path):
    torch.manual_seed(4)
    model = MetaSGD(MLP(1, [8]), task="regression", inner_lr=0.01, init_range=(0.005, 0.1), lr=1e-2)
    mon = LearnedLRMonitor(every_n_steps=2, per_parameter=True)
    trainer(tmp_path, [mon], logger=TensorBoardLogger(tmp_path, name="m"), max_epochs=2,
            limit_val_batches=0).fit(model, datamodule=sine_dm())
    alphas = np.concatenate([a.detach().numpy().ravel() for a in model.alphas.values()])
    assert mon.last["learned_lr/mean"] == pytest.approx(alphas.mean(), rel=1e-5)
    assert mon.last["learned_lr/min"] == pytest.approx(alphas.min(), rel=1e-5)
    assert mon.last["learned_lr/max"] == pytest.approx(alphas.max(), rel=1e-5)
    assert mon.last["learned_lr/std"] == pytest.approx(alphas.std(), rel=1e-4)
    assert mon.last["learned_lr/negative_frac"] == pytest.approx((alphas < 0).mean())
    head = model.alphas["head__weight"].detach().numpy()
    assert mon.last["learned_lr/head.weight_mean"] == pytest.approx(head.mean(), rel=1e-5)
    hist_tags, steps = set(), set()
    for acc in tb_accumulator(tmp_path):
        for tag in acc.Tags()["histograms"]:
            hist_tags.add(tag)
            steps |= {e.step for e in acc.Histograms(tag)}
    assert {"learned_lr/all", "learned_lr/head.weight", "learned_lr/backbone.net.0.bias"} <= hist_tags
    assert steps == {1, 3}


def test_learned_lr_monitor_mamlpp_per_step_rates(tmp_path):
    torch.manual_seed(5)
    model = MAMLPlusPlus(MLP(1, [4]), task="regression", msl_anneal_epochs=0, inner_lr=0.02, inner_steps=3, lr=1e-2)
    mon = LearnedLRMonitor(every_n_steps=1)
    with pytest.warns(UserWarning, match="no TensorBoard logger"):
        trainer(tmp_path, [mon], logger=CSVLogger(tmp_path), max_epochs=1, limit_val_batches=0).fit(
            model, datamodule=sine_dm())
    rates = torch.stack([v.detach() for v in model.step_lrs.values()])  # [params, steps]
    for k in range(3):
        assert mon.last[f"learned_lr/step{k}_mean"] == pytest.approx(rates[:, k].mean().item(), rel=1e-5)
    assert mon.last["learned_lr/mean"] == pytest.approx(rates.mean().item(), rel=1e-5)
    assert not torch.allclose(rates, torch.full_like(rates, 0.02))  # they were learned


def test_learned_lr_monitor_refuses_fixed_rates(tmp_path):
    cases = [(MAML(MLP(1, [4]), task="regression"), "MAML has none"),
             (MAMLPlusPlus(MLP(1, [4]), task="regression", msl_anneal_epochs=0, inner_steps=2,
                           learn_inner_lrs=False), "MAMLPlusPlus"),
             (ProtoNet(Flat()), "ProtoNet has none")]
    for model, msg in cases:
        dm = image_dm() if isinstance(model, ProtoNet) else sine_dm()
        with pytest.raises(MetaConfigError, match=f"LearnedLRMonitor needs .*{msg}"):
            trainer(tmp_path, [LearnedLRMonitor()]).fit(model, datamodule=dm)
    with pytest.raises(MetaConfigError, match="every_n_steps=0"):
        LearnedLRMonitor(every_n_steps=0)


# ------------------------------------------------------------------------- MetaProgressBar


def test_format_score():
    assert format_score("acc", 0.63214, 0.01449) == "63.2±1.4%"
    assert format_score("acc", 1.0, None) == "100.0%"
    assert format_score("mse", 0.51234, 0.0312) == "0.512±0.031"


def test_progress_bar_shows_episodes_per_second_and_validation_ci(tmp_path):
    torch.manual_seed(6)
    bar = MetaProgressBar(window=3)
    model = MAML(MLP(1, [4]), task="regression", inner_lr=0.01)
    t = trainer(tmp_path, [bar], enable_progress_bar=True, max_epochs=2)
    t.fit(model, datamodule=sine_dm(train_episodes=8))
    items = bar.get_metrics(t, model)
    m = t.callback_metrics
    assert items["val_mse"] == format_score("mse", float(m["val/mse"]), float(m["val/mse_ci95"]))
    assert float(items["eps/s"]) > 0
    # the validation bar's running score: after the last batch it equals the logged result
    assert bar.val_progress_bar.postfix == f"mse={format_score('mse', float(m['val/mse']), float(m['val/mse_ci95']))}"
    # classification shows percent
    bar = MetaProgressBar()
    model = ScriptedLearner(val_script=[0.5, 0.75], train_script=[0.5, 0.5])
    t = trainer(tmp_path, [bar], enable_progress_bar=True, max_epochs=2)
    t.fit(model, datamodule=image_dm())
    assert bar.get_metrics(t, model)["val_acc"] == "75.0±1.0%"
    with pytest.raises(MetaConfigError, match="window=1"):
        MetaProgressBar(window=1)


def test_progress_bar_episode_rate_matches_the_step_rate(tmp_path):
    class Clock(L.Callback):
        def __init__(self):
            self.ends = []

        def on_train_batch_end(self, *args):
            self.ends.append(time.perf_counter())

    bar, clock = MetaProgressBar(window=5), Clock()
    loader = DataLoader(SleepyData(18, 0.0), batch_size=3)
    t = trainer(tmp_path, [bar, clock], enable_progress_bar=True)
    t.fit(SleepyModule(0.02), train_dataloaders=loader)
    # the last 5 step ends span 4 steps of 3 episodes
    assert bar.episodes_per_s == pytest.approx(4 * 3 / (clock.ends[-1] - clock.ends[-5]), rel=0.1)
    assert bar.episodes_per_s < 3 / 0.02  # each step sleeps 20 ms


# ---------------------------------------------------------------------------------- CLI


CLI_CONFIG = """
seed_everything: 0
trainer:
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {save_dir: lightning_logs}
  callbacks:
    - class_path: lightning_meta.callbacks.monitors.EpisodeGallery
      init_args: {num_episodes: 1, every_n_val: 1}
    - class_path: lightning_meta.callbacks.monitors.InnerLoopMonitor
      init_args: {num_episodes: 2, steps: 2}
    - class_path: lightning_meta.callbacks.monitors.MetaOverfittingMonitor
      init_args: {episodes: 3, early_stopping: true, patience: 2, min_delta: 0.01}
    - class_path: lightning_meta.callbacks.monitors.DerivativeOrderAnnealing
      init_args: {first_order_steps: 1}
    - class_path: lightning_meta.callbacks.monitors.ThroughputMonitor
      init_args: {log_every_n_steps: 1}
    - class_path: lightning_meta.callbacks.monitors.LearnedLRMonitor
      init_args: {every_n_steps: 1, per_parameter: true}
    - class_path: lightning_meta.callbacks.progress.MetaProgressBar
      init_args: {window: 5}
model:
  class_path: lightning_meta.algorithms.MetaSGD
  init_args:
    backbone:
      class_path: lightning_meta.backbones.MLP
      init_args: {in_features: 1, hidden: [8]}
    task: regression
    inner_lr: 0.01
data:
  class_path: lightning_meta.datamodules.SinusoidDataModule
  init_args: {meta_batch_size: 2, eval_meta_batch_size: 2, train_episodes: 4, val_episodes: 4}
"""


def test_every_callback_is_configurable_from_yaml(tmp_path, monkeypatch):
    from lightning_meta.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "callbacks.yaml"
    cfg.write_text(CLI_CONFIG)
    with pytest.warns(UserWarning, match="EpisodeGallery draws nothing"):
        cli = main(["fit", "--config", str(cfg), "--trainer.fast_dev_run", "1"])
    names = {type(c).__name__ for c in cli.trainer.callbacks}
    assert {"EpisodeGallery", "InnerLoopMonitor", "MetaOverfittingMonitor", "DerivativeOrderAnnealing",
            "ThroughputMonitor", "LearnedLRMonitor", "MetaProgressBar"} <= names
    metrics = cli.trainer.callback_metrics
    for key in ("inner/query_loss_step2", "meta_overfit/gap", "learned_lr/mean", "train/second_order"):
        assert key in metrics, key
    inner = next(c for c in cli.trainer.callbacks if isinstance(c, InnerLoopMonitor))
    assert inner.steps == 2 and inner.num_episodes == 2


def test_unknown_callback_argument_is_refused_at_parse_time(tmp_path, monkeypatch, capsys):
    from lightning_meta.cli import main

    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(CLI_CONFIG.replace("{num_episodes: 1, every_n_val: 1}", "{num_episodez: 1}"))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg), "--trainer.fast_dev_run", "1"])
    assert e.value.code != 0
    assert "num_episodez" in capsys.readouterr().err


# --------------------------------------------------------------------------------- DDP

DDP_SCRIPT = '''
import sys, json
import lightning as L
import torch
from lightning_meta.algorithms import MAML
from lightning_meta.backbones import MLP
from lightning_meta.callbacks.monitors import InnerLoopMonitor, MetaOverfittingMonitor
from lightning_meta.datamodules import SinusoidDataModule


class Capture(L.Callback):
    def __init__(self):
        self.values = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.values.append({k: float(v) for k, v in trainer.callback_metrics.items()
                                if k.startswith(("meta_overfit/", "val/", "inner/"))})


world, out = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
L.seed_everything(0, verbose=False)
dm = SinusoidDataModule(meta_batch_size=4, train_episodes=8, val_episodes=6, eval_meta_batch_size=2)
model = MAML(MLP(1, [8]), task="regression", inner_lr=0.01, lr=0.01).double()
model.on_before_batch_transfer = lambda batch, idx: batch.to(torch.float64)
cap = Capture()
mon = MetaOverfittingMonitor(episodes=5)
trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_epochs=2,
                    logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                    num_sanity_val_steps=0, callbacks=[mon, InnerLoopMonitor(num_episodes=2), cap])
trainer.fit(model, dm)
with open(f"{out}.{trainer.global_rank}.json", "w") as f:
    json.dump(cap.values, f)
'''


@pytest.mark.slow
def test_meta_overfitting_is_identical_on_every_rank_and_equal_to_one_process(tmp_path):
    import json
    import subprocess
    import sys

    script = tmp_path / "ddp_callbacks.py"
    script.write_text(DDP_SCRIPT)
    results = {}
    for world in (1, 2):
        env = launch_env()
        proc = subprocess.run([sys.executable, str(script), str(world), str(tmp_path / f"w{world}")], env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[world] = [json.loads((tmp_path / f"w{world}.{r}.json").read_text()) for r in range(world)]
    one, (rank0, rank1) = results[1][0], results[2]
    assert len(one) == len(rank0) == len(rank1) == 2  # two validation runs
    for a, b, c in zip(one, rank0, rank1, strict=True):
        for key in ("meta_overfit/train_mse", "meta_overfit/train_mse_ci95", "meta_overfit/gap"):
            assert b[key] == pytest.approx(c[key], abs=1e-9), key  # the same on both ranks (5 episodes, split 3/2)
            assert b[key] == pytest.approx(a[key], rel=1e-6), key  # and equal to one process
        # the inner-loop curves are computed on rank 0 from its own first episodes and shared with every rank
        # (so ModelCheckpoint/EarlyStopping monitoring them work on every rank)
        assert b["inner/query_loss_step1"] == c["inner/query_loss_step1"]
        assert b["inner/query_gain"] == c["inner/query_gain"]


def test_rank_zero_only_forwards_are_refused_under_zero3():
    from types import SimpleNamespace

    from lightning_meta.callbacks.monitors import _refuse_zero3

    with pytest.raises(MetaConfigError, match="InnerLoopMonitor runs extra forward passes on rank 0 alone.*stage 2"):
        _refuse_zero3("InnerLoopMonitor", SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=True)))
    _refuse_zero3("InnerLoopMonitor", SimpleNamespace(strategy=SimpleNamespace(zero_stage_3=False)))
    _refuse_zero3("InnerLoopMonitor", SimpleNamespace(strategy=object()))  # DDP, single device: nothing to refuse
