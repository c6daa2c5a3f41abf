"""Fixes from the ninth session's reviews of the data layer, the metrics and the callbacks.

Each test here failed before its fix (checked by reverting the fix and running it).
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightning_meta.algorithms import MAML
from lightning_meta.backbones import MLP
from lightning_meta.datamodules import SinusoidDataModule


def _trainer(root, **kw):
    kw.setdefault("max_steps", 2)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, **kw)


def test_fit_after_validate_on_the_same_model(tmp_path):
    """``validate`` resets the metric states inside inference mode; ``fit`` must still update them."""
    torch.manual_seed(0)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.01)
    dm = SinusoidDataModule(meta_batch_size=2, train_episodes=4, val_episodes=2, eval_meta_batch_size=2)
    before = _trainer(tmp_path).validate(model, dm, verbose=False)[0]["val/mse"]
    trainer = _trainer(tmp_path, val_check_interval=2)
    trainer.fit(model, dm)
    assert trainer.global_step == 2
    after = trainer.callback_metrics["val/mse"].item()
    assert after != before and torch.isfinite(torch.tensor(after))


def test_preemption_inside_an_accumulation_window_saves_after_the_stepping_batch(tmp_path):
    """A checkpoint taken between two accumulated batches lost the first one's gradient on resume."""
    import os
    import signal

    from lightning.pytorch.callbacks import Callback

    from lightning_meta.callbacks import PreemptionCheckpoint

    class SignalAtBatch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:  # the first batch of the second window of two
                os.kill(os.getpid(), signal.SIGUSR1)

    def fit(root, callbacks, ckpt_path=None):
        torch.manual_seed(0)
        model = MAML(MLP(1, [8]), task="regression", inner_lr=0.01)
        dm = SinusoidDataModule(meta_batch_size=2, train_episodes=16, val_episodes=2, eval_meta_batch_size=2)
        trainer = _trainer(root, max_steps=6, accumulate_grad_batches=2, limit_val_batches=0, callbacks=callbacks)
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return trainer, model

    cb = PreemptionCheckpoint(requeue=False)
    stopped, _ = fit(tmp_path / "run", [cb, SignalAtBatch()])
    assert stopped.global_step == 2  # saved after batch 3, which stepped, not after batch 2
    assert torch.load(cb.saved_path, weights_only=False)["global_step"] == 2
    _, resumed = fit(tmp_path / "run", [PreemptionCheckpoint(requeue=False)], ckpt_path=cb.saved_path)
    _, full = fit(tmp_path / "full", [])
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_result_writer_step_follows_the_weights_an_earlier_test_loaded(tmp_path):
    import json

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_meta.callbacks import TestResultWriter

    torch.manual_seed(0)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.05, lr=0.05)
    dm = SinusoidDataModule(meta_batch_size=2, train_episodes=4, val_episodes=2, test_episodes=4,
                            eval_meta_batch_size=2)
    ckpts = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer = L.Trainer(max_steps=6, logger=CSVLogger(tmp_path), enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[ckpts, TestResultWriter()])
    trainer.fit(model, dm)
    results = lambda: json.loads((tmp_path / "lightning_logs" / "version_0" / "results.json").read_text())  # noqa: E731
    trainer.test(model, dm, verbose=False)
    assert results()["global_step"] == 6
    trainer.test(model, dm, ckpt_path=str(tmp_path / "ck" / "step=2.ckpt"), verbose=False)
    at_two = results()
    assert at_two["global_step"] == 2
    trainer.test(model, dm, verbose=False)  # the model now holds the step-2 weights
    again = results()
    assert again["metrics"] == at_two["metrics"] and again["global_step"] == 2
    other = MAML(MLP(1, [8]), task="regression", inner_lr=0.05)
    trainer.test(other, dm, verbose=False)  # a module this trainer neither trained nor loaded
    assert results()["global_step"] is None


def test_throughput_monitor_leaves_checkpoint_saving_out_of_the_data_wait(tmp_path):
    import time

    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_meta.callbacks import ThroughputMonitor

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))

        def training_step(self, batch, batch_idx):
            time.sleep(0.02)
            return (self.w - batch[0]).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class SlowSave(Callback):  # a slow checkpoint write (large model, network file system)
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            time.sleep(0.1)

    monitor = ThroughputMonitor(log_every_n_steps=6)
    trainer = L.Trainer(max_steps=8, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path, limit_val_batches=0,
                        callbacks=[monitor, ModelCheckpoint(every_n_train_steps=1, save_top_k=-1), SlowSave()])
    trainer.fit(Model(), DataLoader(TensorDataset(torch.zeros(8, 2)), batch_size=1))
    # the saves took 5x the step: counted as waiting for data they made the fraction about 0.8
    assert monitor.last["throughput/data_wait_frac"] < 0.4
    assert monitor.last["throughput/step_s"] < 0.07
    assert "save_checkpoint" not in vars(trainer)  # the timing wrapper is removed after fit


def test_validate_runs_always_report_and_leave_the_training_count_alone(tmp_path):
    """every_n_val throttles the validations of training; it made `validate` runs report at random."""
    from test_callbacks import Flat, image_dm

    from lightning_meta.callbacks import InnerLoopMonitor

    torch.manual_seed(0)
    model = MAML(Flat(), ways=2, inner_lr=0.5, inner_steps=1)
    inner = InnerLoopMonitor(num_episodes=2, every_n_val=2)
    trainer = _trainer(tmp_path, callbacks=[inner], num_sanity_val_steps=0)
    for _ in range(3):
        inner.last = {}
        trainer.validate(model, datamodule=image_dm(), verbose=False)
        assert inner.last  # reported every time (it used to report only on the 2nd)
    assert inner.val_runs == 0


def test_derivative_order_annealing_keeps_its_switch_step_through_a_resume(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_meta.callbacks import DerivativeOrderAnnealing

    def fit(root, callbacks, ckpt_path=None):
        torch.manual_seed(0)
        model = MAML(MLP(1, [8]), task="regression", inner_lr=0.05, first_order=True)
        dm = SinusoidDataModule(meta_batch_size=2, train_episodes=8, val_episodes=2, eval_meta_batch_size=2)
        _trainer(root, max_steps=5, limit_val_batches=0, enable_checkpointing=True, callbacks=callbacks).fit(
            model, dm, ckpt_path=ckpt_path)

    full = DerivativeOrderAnnealing(first_order_steps=2, verbose=False)
    fit(tmp_path, [full, ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=3, save_top_k=-1,
                                         filename="{step}")])
    assert full.switched_at_step == 2
    resumed = DerivativeOrderAnnealing(first_order_steps=2, verbose=False)
    fit(tmp_path / "b", [resumed], ckpt_path=str(tmp_path / "ck" / "step=3.ckpt"))
    assert resumed.switched_at_step == 2  # the checkpoint's, not the resumed run's first step (3)
    fit(tmp_path / "c", [full])  # the same callback in a new fit records that fit's switch again
    assert full.switched_at_step == 2


def test_index_beside_symlinks_into_a_content_addressed_store_is_used(tmp_path):
    """Hugging Face hub / git-annex / DVC layout: shard links whose targets are blobs named by hash.

    The index beside the links used to be missed (the links were resolved first), so the shards
    were scanned as third-party ones: class names lost, and splits drawn at random, which put
    meta-test classes into training.
    """
    import hashlib
    import os

    from episode_fixtures import write_tiny_shards

    from lightning_meta.data.shards import load_index

    real = tmp_path / "real"
    write_tiny_shards(real)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev1"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    for f in sorted(os.listdir(real)):
        data = (real / f).read_bytes()
        blob = blobs / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f).symlink_to(os.path.relpath(blob, snapshot))
    reference = load_index(str(real), verify="size")
    linked = load_index(str(snapshot), verify="size")
    assert str(linked.path) == str(snapshot / "index.json")
    summary = lambda ix: sorted((c.name, c.split, c.count) for c in ix.classes)  # noqa: E731
    assert summary(linked) == summary(reference)


@pytest.mark.parametrize("spell", ["same", "slash", "glob"])
def test_a_shard_set_given_twice_as_sources_is_refused(tmp_path, spell):
    from episode_fixtures import write_tiny_shards

    from lightning_meta.datamodules import ShardDataModule
    from lightning_meta.errors import MetaConfigError

    write_tiny_shards(tmp_path / "a")
    second = {"same": str(tmp_path / "a"), "slash": f"{tmp_path / 'a'}/", "glob": str(tmp_path / "a" / "*.tar")}[spell]
    dm = ShardDataModule(sources=[str(tmp_path / "a"), second], ways=3, shots=1, queries=2, meta_batch_size=2,
                         train_episodes=4, val_episodes=2, test_episodes=2, eval_meta_batch_size=2, verify="size")
    with pytest.raises(MetaConfigError, match=r"sources 0 .* and 1 .* both hold the shard"):
        dm.setup("fit")


def test_samples_read_counts_consumed_batches_whatever_the_workers_prefetch(tmp_path):
    """Workers decode batches ahead; the count saved in checkpoints used to include them."""
    from episode_fixtures import write_tiny_shards
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn

    from lightning_meta.algorithms import ProtoNet
    from lightning_meta.datamodules import ShardDataModule

    write_tiny_shards(tmp_path / "shards")
    per_batch = 2 * 3 * (1 + 2)  # meta-batch 2, 3 ways, 1 shot + 2 queries

    def fit(root, max_steps, ckpt_path=None, every=None):
        torch.manual_seed(0)
        dm = ShardDataModule(shards=str(tmp_path / "shards"), ways=3, shots=1, queries=2, eval_queries=2,
                             meta_batch_size=2, train_episodes=8, val_episodes=2, eval_meta_batch_size=2,
                             num_workers=2, verify="size")
        callbacks = [ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1, filename="{step}")] \
            if every else []
        model = ProtoNet(nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 8)), ways=3)
        _trainer(root, max_steps=max_steps, limit_val_batches=0, enable_checkpointing=bool(every),
                 callbacks=callbacks).fit(model, dm, ckpt_path=ckpt_path)
        return dm.state_dict()["samples_read"]

    assert fit(tmp_path / "full", 6) == 6 * per_batch  # 2 workers had decoded more than that
    fit(tmp_path / "a", 3, every=3)
    saved = torch.load(tmp_path / "a" / "step=3.ckpt", weights_only=False)["ShardDataModule"]["samples_read"]
    assert saved == 3 * per_batch
    assert fit(tmp_path / "b", 6, ckpt_path=str(tmp_path / "a" / "step=3.ckpt")) == 6 * per_batch


def test_sources_may_use_the_attribute_names_episodes_and_counter_for_other_things(tmp_path):
    from test_callbacks import Flat, ImageSource, TinyImageDM

    from lightning_meta.data.sampling import FixedShape

    class Busy(ImageSource):
        def __init__(self, *args):
            super().__init__(*args)
            self.episodes = []  # a user's own list, not the optional batched method
            self.counter = 0

    class DM(TinyImageDM):
        def setup(self, stage=None):
            super().setup(stage)
            self.sources["train"] = Busy(FixedShape(self.ways, self.shots, self.queries), list(range(10)))

    dm = DM(ways=2, shots=1, queries=2, eval_queries=3, meta_batch_size=2, eval_meta_batch_size=2,
            train_episodes=4, val_episodes=4, test_episodes=4)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(MAML(Flat(), ways=2, inner_lr=0.5), dm)
    assert trainer.global_step == 2


def test_a_datamodule_without_a_validation_source_names_the_way_out(tmp_path):
    from test_callbacks import Flat, TinyImageDM

    from lightning_meta.errors import MetaConfigError

    class NoVal(TinyImageDM):
        def setup(self, stage=None):
            super().setup(stage)
            del self.sources["val"]

    kw = dict(ways=2, shots=1, queries=2, eval_queries=3, meta_batch_size=2, eval_meta_batch_size=2,
              train_episodes=4, val_episodes=4, test_episodes=4)
    with pytest.raises(MetaConfigError, match=r"did not create a source for split 'val'.*limit_val_batches 0"):
        _trainer(tmp_path, max_steps=2).fit(MAML(Flat(), ways=2, inner_lr=0.5), NoVal(**kw))
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(MAML(Flat(), ways=2, inner_lr=0.5), NoVal(**kw))
    assert trainer.global_step == 2


def test_result_writer_times_an_evaluation_only_run_from_its_start(tmp_path):
    import json
    import time

    from lightning.pytorch.loggers import CSVLogger

    from lightning_meta.callbacks import TestResultWriter

    writer = TestResultWriter()
    time.sleep(1.0)  # the callback is built long before the run (e.g. while a config is parsed)
    dm = SinusoidDataModule(meta_batch_size=2, train_episodes=4, val_episodes=2, test_episodes=2,
                            eval_meta_batch_size=2)
    trainer = L.Trainer(logger=CSVLogger(tmp_path), enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[writer])
    trainer.test(MAML(MLP(1, [8]), task="regression", inner_lr=0.01), dm, verbose=False)
    record = json.loads((tmp_path / "lightning_logs" / "version_0" / "results.json").read_text())
    assert record["evaluation_only"] is True and record["wall_time_s"] < 0.9


def test_a_modules_own_batch_transfer_hook_still_runs_with_shard_data(tmp_path):
    """The decode-count tally must not take Lightning's on_before_batch_transfer away from the module."""
    from episode_fixtures import write_tiny_shards
    from torch import nn

    from lightning_meta.algorithms import ProtoNet
    from lightning_meta.datamodules import ShardDataModule

    calls = []

    class Hooked(ProtoNet):
        def on_before_batch_transfer(self, batch, dataloader_idx):
            calls.append(dataloader_idx)
            return batch

    write_tiny_shards(tmp_path / "shards")
    dm = ShardDataModule(shards=str(tmp_path / "shards"), ways=3, shots=1, queries=2, eval_queries=2,
                         meta_batch_size=2, train_episodes=4, val_episodes=2, eval_meta_batch_size=2, verify="size")
    _trainer(tmp_path, max_steps=2, limit_val_batches=0).fit(Hooked(nn.Sequential(nn.Flatten(), nn.Linear(784, 8)),
                                                                    ways=3), dm)
    assert len(calls) == 2
    assert dm.state_dict()["samples_read"] == 2 * 2 * 3 * 3  # still counted per consumed batch


def test_progress_bar_and_throughput_windows_follow_epochs_and_optimizer_steps(tmp_path):
    from lightning.pytorch.callbacks import Callback

    from lightning_meta.callbacks import MetaProgressBar, ThroughputMonitor

    bar, monitor = MetaProgressBar(window=50), ThroughputMonitor(log_every_n_steps=2)
    seen, logged = [], []

    class Watch(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                seen.append(len(bar._marks))  # the episodes/s window at the start of each epoch

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if monitor.last and (not logged or logged[-1][2] is not monitor.last):
                logged.append((trainer.current_epoch, batch_idx, monitor.last))

    torch.manual_seed(0)
    dm = SinusoidDataModule(meta_batch_size=2, train_episodes=16, val_episodes=2, eval_meta_batch_size=2)
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_model_summary=False,
                        limit_val_batches=0, accumulate_grad_batches=2, default_root_dir=tmp_path,
                        callbacks=[bar, monitor, Watch()])
    trainer.fit(MAML(MLP(1, [8]), task="regression", inner_lr=0.01), dm)
    assert seen == [0, 0]  # cleared at every epoch start (the second used to start with the first's marks)
    # 8 batches per epoch, the first of each uncounted: logged after 4 counted batches (2 optimizer steps
    # of 2 batches), i.e. at batch 4 of epoch 0 and batch 1 of epoch 1; not after every 2 batches
    assert [(epoch, b) for epoch, b, _ in logged] == [(0, 4), (1, 1), (1, 5)]
