"""Regression tests for callback and report fixes.

- InnerLoopMonitor / EpisodeGallery in validate-only runs (episodes captured under inference mode),
- TestResultWriter's step when a checkpoint is evaluated after fit in the same trainer,
- ``lightning-meta report`` steps of a run without results.json (checkpoint, else a lower bound),
- callback scalars on Lightning's own step axis (the step of the train/val records they go with),
- MetaOverfittingMonitor's held-out reads kept out of the training stream's sample counter.

The tiny setups (image / sinusoid datamodules, trainer) are those of ``test_callbacks.py``.
"""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from episode_fixtures import write_tiny_shards
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from test_callbacks import Flat, image_dm, sine_dm, trainer

from lightning_meta.algorithms import MAML, MetaSGD, ProtoNet
from lightning_meta.backbones import MLP, Conv4
from lightning_meta.callbacks import (
    EpisodeGallery,
    InnerLoopMonitor,
    LearnedLRMonitor,
    MetaOverfittingMonitor,
    ThroughputMonitor,
)
from lightning_meta.callbacks import TestResultWriter as ResultWriter  # (a Test* name would be collected)
from lightning_meta.callbacks._common import clone_tasks, logging_step
from lightning_meta.callbacks.monitors import _with_own_counter
from lightning_meta.data.faults import SampleCounter
from lightning_meta.episode import Episode, collate_episodes
from lightning_meta.report import collect_runs, markdown_table, read_scalars


def _steps(scalars, tag) -> list[int]:
    return [s for s, _, _ in scalars.get(tag, [])]


# ------------------------------------------------------------ validate-only runs (inference mode)
def test_clone_tasks_gives_ordinary_tensors_under_inference_mode():
    batch = collate_episodes([Episode(torch.rand(2, 3), torch.arange(2), torch.rand(4, 3), torch.tensor([0, 0, 1, 1]),
                                      torch.tensor([5, 6])) for _ in range(3)])
    with torch.inference_mode():
        inference_batch = batch.clone()  # made under inference mode: inference tensors, as Lightning's batches
        assert inference_batch.support_x.is_inference()
        tasks = clone_tasks(inference_batch, 2)
    assert len(tasks) == 2
    for ep in tasks:
        for t in (ep.support_x, ep.support_y, ep.query_x, ep.query_y, ep.classes):
            assert not t.is_inference()
    assert torch.equal(tasks[1].query_x, batch.query_x[1])
    w = torch.ones(3, requires_grad=True)
    (tasks[0].support_x @ w).sum().backward()  # usable by autograd, as the monitors' re-adaptation needs
    assert w.grad is not None


def test_inner_loop_monitor_and_gallery_run_in_validate_only_runs(tmp_path):
    torch.manual_seed(0)
    model = MAML(Flat(), ways=2, inner_lr=0.5, inner_steps=1)
    inner, gallery = InnerLoopMonitor(num_episodes=2), EpisodeGallery(num_episodes=2)
    t = trainer(tmp_path, [inner, gallery], logger=TensorBoardLogger(tmp_path, name="v"))
    t.validate(model, datamodule=image_dm(), verbose=False)  # Lightning validates under torch.inference_mode
    assert {"inner/query_acc_step0", "inner/query_acc_step1", "inner/query_gain"} <= set(inner.last)
    assert gallery.images_logged == 2
    scalars = read_scalars(t.log_dir)
    # the monitor's values share the step of the val/* records of that validation (0: nothing trained)
    assert _steps(scalars, "inner/query_loss_step1") == _steps(scalars, "val/acc") == [0]
    # trainer.test: the monitors watch validation only; a test run with them in the callbacks is unaffected
    t.test(model, datamodule=image_dm(), verbose=False)
    assert gallery.images_logged == 2 and "test/acc" in t.callback_metrics


# ------------------------------------------------------------ TestResultWriter after fit
def test_result_writer_records_the_evaluated_checkpoints_step_after_fit(tmp_path):
    torch.manual_seed(0)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.05)
    # save_last: `ckpt_path="last"` below must load the step-4 weights (without last.ckpt Lightning
    # loads nothing and the model keeps the step-2 weights of the test before it)
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=2, save_top_k=-1, filename="{step}",
                         save_last=True)
    t = trainer(tmp_path, [ck, ResultWriter()], logger=TensorBoardLogger(tmp_path, name="r"),
                enable_checkpointing=True, max_epochs=2)
    t.fit(model, datamodule=sine_dm())
    assert t.global_step == 4
    first = os.path.join(tmp_path, "ck", "step=2.ckpt")
    results = os.path.join(t.log_dir, "results.json")

    t.test(model, datamodule=sine_dm(), ckpt_path=first, verbose=False)
    rec = json.load(open(results))
    # the weights tested are the checkpoint's (2 steps), not the fit's last ones (4 steps); the trainer did train
    assert rec["global_step"] == 2 and rec["evaluation_only"] is False and rec["ckpt_path"] == first

    t.validate(model, datamodule=sine_dm(), ckpt_path=first, verbose=False)
    rec = json.load(open(results))
    assert rec["stage"] == "validate" and rec["global_step"] == 2 and rec["evaluation_only"] is False

    t.test(model, datamodule=sine_dm(), ckpt_path="last", verbose=False)  # last.ckpt, saved at step 4
    assert json.load(open(results))["global_step"] == 4

    t.test(model, datamodule=sine_dm(), verbose=False)  # the weights in memory: the fit's own count
    rec = json.load(open(results))
    assert rec["global_step"] == 4 and rec["evaluation_only"] is False and rec["ckpt_path"] is None


# ------------------------------------------------------------ report: steps without results.json
def test_report_steps_come_from_the_latest_checkpoint_else_a_lower_bound(tmp_path):
    torch.manual_seed(0)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.05)
    t = trainer(tmp_path, [], logger=TensorBoardLogger(tmp_path, name="r"), max_steps=7, val_check_interval=3,
                check_val_every_n_epoch=None, log_every_n_steps=2)
    t.fit(model, datamodule=sine_dm(train_episodes=100))
    assert t.global_step == 7  # step 7 (index 6) was neither logged nor validated
    run_dir = t.log_dir

    def row(run) -> list[str]:
        return [c.strip() for c in markdown_table([run]).splitlines()[2].split("|")[1:-1]]

    run = collect_runs([run_dir], meta_batch_size=2)[0]
    assert run.steps == 6 and run.steps_lower_bound and row(run)[4] == "≥ 12"  # no checkpoint: at least 6 steps
    assert "≥ 6 steps" in row(collect_runs([run_dir])[0])[4]  # unknown meta-batch size

    ckpts = os.path.join(run_dir, "checkpoints")
    os.makedirs(ckpts)
    torch.save({"global_step": 3}, os.path.join(ckpts, "early.ckpt"))
    (open(os.path.join(ckpts, "junk.ckpt"), "wb")).write(b"not a checkpoint")
    run = collect_runs([run_dir], meta_batch_size=2)[0]
    assert run.steps == 6 and run.steps_lower_bound  # a checkpoint older than the logs: still a lower bound
    torch.save({"global_step": 7}, os.path.join(ckpts, "last.ckpt"))
    run = collect_runs([run_dir], meta_batch_size=2)[0]
    assert run.steps == 7 and not run.steps_lower_bound and row(run)[4] == "14"
    assert run.val_training_episodes == [6, 12]  # the validation curve is unchanged


def test_report_reads_the_step_of_a_real_lightning_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.05)
    # saved after every step, in ModelCheckpoint's default folder (the run directory's checkpoints/)
    t = trainer(tmp_path, [ModelCheckpoint(every_n_train_steps=1)], logger=TensorBoardLogger(tmp_path, name="r"),
                enable_checkpointing=True, max_steps=7, val_check_interval=3, check_val_every_n_epoch=None,
                log_every_n_steps=2)
    t.fit(model, datamodule=sine_dm(train_episodes=100))
    assert glob.glob(os.path.join(t.log_dir, "checkpoints", "*.ckpt"))
    run = collect_runs([t.log_dir], meta_batch_size=2)[0]
    assert run.steps == 7 and not run.steps_lower_bound and run.training_episodes == 14


# ------------------------------------------------------------ step axis
def test_callback_scalars_share_the_step_of_lightnings_records(tmp_path):
    torch.manual_seed(0)
    model = MetaSGD(MLP(1, [8]), task="regression", inner_lr=0.05)
    t = trainer(tmp_path, [InnerLoopMonitor(num_episodes=2), MetaOverfittingMonitor(episodes=4),
                           ThroughputMonitor(log_every_n_steps=1), LearnedLRMonitor(every_n_steps=3)],
                logger=TensorBoardLogger(tmp_path, name="r"), max_steps=4, val_check_interval=2,
                check_val_every_n_epoch=None, log_every_n_steps=1)
    t.fit(model, datamodule=sine_dm(train_episodes=8))
    s = read_scalars(t.log_dir)
    train = _steps(s, "train/loss")
    assert train == [0, 1, 2, 3] and _steps(s, "val/mse") == [1, 3]  # Lightning: after s + 1 optimizer steps
    assert _steps(s, "inner/query_loss_step1") == [1, 3]
    assert _steps(s, "meta_overfit/gap") == [1, 3]
    assert _steps(s, "throughput/episodes_per_s") == [1, 2, 3]  # the first step of an epoch is not timed
    # every 3 steps (after step 3, at index 2) and at the end of training (after step 4, at index 3)
    assert _steps(s, "learned_lr/mean") == [2, 3]
    assert logging_step(t) == t.global_step == 4


# ------------------------------------------------------------ MetaOverfittingMonitor's sample counter
@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """12 classes of 28x28 images (6 train, 3 val, 3 test), 8 each."""
    out = tmp_path_factory.mktemp("shards")
    write_tiny_shards(out)
    return out


@pytest.mark.parametrize("eval_ways", [3, 2])  # the training shape (the source itself) and a copy of it
def test_meta_overfitting_monitor_leaves_the_training_sample_count_alone(tmp_path, tiny_shards, eval_ways):
    from lightning_meta.datamodules import ShardDataModule

    def run(callbacks):
        torch.manual_seed(0)
        model = ProtoNet(Conv4(1, 8, 28))
        dm = ShardDataModule(shards=str(tiny_shards), ways=3, shots=1, queries=2, eval_ways=eval_ways,
                             eval_shots=1, eval_queries=2, meta_batch_size=1, eval_meta_batch_size=2,
                             train_episodes=2, val_episodes=2, test_episodes=2, num_workers=0)
        trainer(tmp_path, callbacks).fit(model, datamodule=dm)
        return dm.state_dict()["samples_read"], dm

    plain, _ = run([])
    monitor = MetaOverfittingMonitor(episodes=4)
    counted, dm = run([monitor])
    assert plain == 2 * 3 * 3  # 2 training episodes of 3 classes x (1 + 2) samples
    assert counted == plain  # the 4 held-out episodes are not training reads
    assert "meta_overfit/gap" in monitor.last
    assert monitor._source.counter is not dm.sources["train"].counter
    assert monitor._source.counter.totals()[0] == 4 * eval_ways * 3  # they count in the monitor's own counter


def test_with_own_counter_copies_every_source_of_a_multi_source_mix():
    class Leaf:
        def __init__(self, counter):
            self.counter = counter

    class Mix:
        def __init__(self, sources):
            self.sources = sources

    shared = SampleCounter(0.2, 3, "the shards")
    mix = Mix([Leaf(shared), Leaf(shared)])
    own = _with_own_counter(mix)
    assert own is not mix and mix.sources[0].counter is shared and mix.sources[1].counter is shared
    a, b = own.sources
    assert a.counter is b.counter and a.counter is not shared
    assert a.counter.max_fraction == 0.2 and "the shards" in a.counter.where
    plain = object()
    assert _with_own_counter(plain) is plain  # sources without a counter (sinusoids, user sources) are kept
