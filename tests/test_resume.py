"""Kill-and-resume through a real Lightning checkpoint continues the identical episode stream."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_meta.algorithms import MAML
from lightning_meta.backbones import MLP
from lightning_meta.datamodules import SinusoidDataModule


class Recorder(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen.append((trainer.global_step, float(batch.support_x.sum()) + float(batch.query_y.sum())))


def _run(tmp_path, max_steps, ckpt_path=None, every=None, num_workers=0):
    torch.manual_seed(0)
    dm = SinusoidDataModule(meta_batch_size=4, train_episodes=20, val_episodes=4, eval_meta_batch_size=4,
                            num_workers=num_workers)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.01)
    rec = Recorder()
    callbacks = [rec]
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=every, save_top_k=-1,
                                         filename="{step}"))
    trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=callbacks, enable_checkpointing=bool(every),
                        default_root_dir=tmp_path)
    trainer.fit(model, dm, ckpt_path=ckpt_path)
    return rec.seen, model


@pytest.mark.parametrize("stop", [3, 5, 7])  # mid-epoch (epochs hold 5 meta-batches) and at an epoch end
def test_resume_continues_identical_episodes(tmp_path, stop):
    full, full_model = _run(tmp_path / "full", max_steps=12)
    first, _ = _run(tmp_path / "a", max_steps=stop, every=stop)
    ckpt = tmp_path / "a" / f"step={stop}.ckpt"
    assert ckpt.exists()
    second, resumed_model = _run(tmp_path / "b", max_steps=12, ckpt_path=str(ckpt))
    assert first == full[:stop]
    assert [s for _, s in second] == [s for _, s in full[stop:]]
    for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resume_in_a_later_epoch_with_worker_processes(tmp_path):
    """A resumed fit iterates the loader before its first ``set_epoch``; workers draw keys at once.

    The sampler used to start from epoch 0 there, so with ``num_workers > 0`` the rest of the
    resumed epoch replayed epoch 0's episodes (epoch 0 itself looked exact: both are 0).
    """
    full, full_model = _run(tmp_path / "full", max_steps=9, num_workers=2)
    _run(tmp_path / "a", max_steps=7, every=7, num_workers=2)  # epoch 1, batch 2 of 5
    second, resumed_model = _run(tmp_path / "b", max_steps=9, ckpt_path=str(tmp_path / "a" / "step=7.ckpt"),
                                 num_workers=2)
    assert [s for _, s in second] == [s for _, s in full[7:]]
    for a, b in zip(full_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("validate", [False, True])
def test_resume_from_epoch_end_checkpoint(tmp_path, validate):
    """A checkpoint written at the end of an epoch (Lightning's default ModelCheckpoint) resumes into the
    next epoch with its full set of episodes, not an empty epoch."""

    def run(root, max_epochs, ckpt_path=None, save=False):
        torch.manual_seed(0)
        dm = SinusoidDataModule(meta_batch_size=2, train_episodes=4, val_episodes=2, eval_meta_batch_size=2)
        model = MAML(MLP(1, [4]), task="regression", inner_lr=0.01)
        rec = Recorder()
        callbacks = [rec]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}"))
        trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=1 if validate else 0,
                            callbacks=callbacks, enable_checkpointing=save, default_root_dir=root)
        trainer.fit(model, dm, ckpt_path=ckpt_path)
        return rec.seen, trainer.global_step

    full, full_steps = run(tmp_path / "full", 4)
    run(tmp_path / "a", 2, save=True)
    second, steps = run(tmp_path / "b", 4, ckpt_path=str(tmp_path / "a" / "epoch=1.ckpt"))
    assert full_steps == steps == 8  # 4 epochs of 2 meta-batches
    assert [s for _, s in second] == [s for _, s in full[4:]]


class _Seen(Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append((trainer.current_epoch, round(float(batch.support_x.sum()), 4)))


def _epochs(root, max_epochs, ckpt=None, save=None):
    torch.manual_seed(0)
    dm = SinusoidDataModule(meta_batch_size=2, train_episodes=6, val_episodes=2, eval_meta_batch_size=2)
    model = MAML(MLP(1, [4]), task="regression", inner_lr=0.01)
    seen = _Seen()
    trainer = L.Trainer(max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[seen], enable_checkpointing=False,
                        default_root_dir=root)
    trainer.fit(model, dm, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return seen.seen, trainer


def test_resume_from_a_checkpoint_saved_after_fit(tmp_path):
    """After fit returns, Lightning's `completed` epoch is already the next one; the stream must not skip it."""
    full, _ = _epochs(tmp_path / "full", 4)
    first, _ = _epochs(tmp_path / "a", 2, save=tmp_path / "after_fit.ckpt")
    state = torch.load(tmp_path / "after_fit.ckpt", weights_only=False)["SinusoidDataModule"]
    assert (state["epoch"], state["batches"]) == (1, 3)  # epoch 1 was consumed whole
    second, trainer = _epochs(tmp_path / "b", 4, ckpt=tmp_path / "after_fit.ckpt")
    assert first == full[:6] and second == full[6:] and trainer.global_step == 12


class _ValidationSteps(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.steps.append(trainer.global_step)


def _steps(root, ckpt=None, save=None, validate_every=None, callbacks=(), **limits):
    torch.manual_seed(0)
    dm = SinusoidDataModule(meta_batch_size=4, train_episodes=20, val_episodes=4, eval_meta_batch_size=4)
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.01)
    rec, val = Recorder(), _ValidationSteps()
    extra = {"limit_val_batches": 0}
    if validate_every == "epoch":
        extra = {"limit_val_batches": 1}
    elif validate_every:
        extra = {"val_check_interval": validate_every, "limit_val_batches": 1}
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=[rec, val, *callbacks], enable_checkpointing=bool(callbacks), default_root_dir=root,
                        **extra, **limits)
    trainer.fit(model, dm, ckpt_path=ckpt)
    if save:
        trainer.save_checkpoint(save)
    return [s for _, s in rec.seen], val.steps, trainer.global_step, model


@pytest.mark.parametrize("validate_every", [None, 3])
@pytest.mark.parametrize("stop", [3, 5, 7])  # epochs hold 5 meta-batches: mid-epoch, at the end, mid second epoch
def test_resume_after_fit_stopped_by_max_steps(tmp_path, stop, validate_every):
    """fit(max_steps=N), save_checkpoint, fit(max_steps=12, ckpt_path): the stream and the weights of one run.

    Without `repair_fit_progress`, Lightning 2.6 skips the rest of the interrupted epoch here.
    """
    full, full_val, _, full_model = _steps(tmp_path / "full", validate_every=validate_every, max_steps=12)
    first, first_val, _, _ = _steps(tmp_path / "a", save=tmp_path / "after.ckpt", validate_every=validate_every,
                                    max_steps=stop)
    second, second_val, steps, resumed = _steps(tmp_path / "b", ckpt=tmp_path / "after.ckpt",
                                                validate_every=validate_every, max_steps=12)
    assert first + second == full and steps == 12
    assert first_val + second_val == full_val
    for a, b in zip(full_model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_resume_after_fit_stopped_by_max_epochs_under_max_steps(tmp_path):
    full, _, _, _ = _steps(tmp_path / "full", max_steps=12)
    first, _, _, _ = _steps(tmp_path / "a", save=tmp_path / "after.ckpt", max_epochs=1)
    second, _, steps, _ = _steps(tmp_path / "b", ckpt=tmp_path / "after.ckpt", max_steps=12)
    assert first + second == full and steps == 12


def test_repair_leaves_in_training_checkpoints_alone(tmp_path):
    from lightning_meta.fit_progress import repair_fit_progress

    _steps(tmp_path / "a", save=tmp_path / "after.ckpt", max_steps=3)
    after = torch.load(tmp_path / "after.ckpt", weights_only=False)
    _steps(tmp_path / "b", max_steps=7,
           callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1, filename="{step}")])
    for step in range(1, 8):  # every batch end of a plain run, epoch ends (5) included
        during = torch.load(tmp_path / f"step={step}.ckpt", weights_only=False)
        before = repr(during["loops"])
        assert repair_fit_progress(during) is None and repr(during["loops"]) == before
    assert repair_fit_progress({"state_dict": {}}) is None  # weights-only: nothing to do
    during = torch.load(tmp_path / "step=3.ckpt", weights_only=False)
    assert "after fit returned" in repair_fit_progress(after)
    # the repaired after-fit state is the in-training checkpoint's, counter for counter
    assert after["loops"]["fit_loop"] == during["loops"]["fit_loop"] and after["epoch"] == during["epoch"]


@pytest.mark.parametrize("first, second", [(5, 7), (5, 10), (10, 11), (3, 5), (2, 8)])
def test_resume_twice_after_fit(tmp_path, first, second):
    """Two stop/save/resume cycles; a first stop at an epoch's last batch (5, 10) used to derail the second resume."""
    full, _, _, full_model = _steps(tmp_path / "full", max_steps=12)
    a, _, _, _ = _steps(tmp_path / "a", save=tmp_path / "a.ckpt", max_steps=first)
    b, _, _, _ = _steps(tmp_path / "b", ckpt=tmp_path / "a.ckpt", save=tmp_path / "b.ckpt", max_steps=second)
    c, _, steps, resumed = _steps(tmp_path / "c", ckpt=tmp_path / "b.ckpt", max_steps=12)
    assert a + b + c == full and steps == 12
    for x, y in zip(full_model.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.parametrize("validate_every", [None, 5])
def test_resume_chain_of_model_checkpoints_through_an_epoch_end(tmp_path, validate_every):
    """Lightning alone (ModelCheckpoint files, no save after fit): 5 -> 10 -> 12 with 5-batch epochs.

    Resuming from the last batch of epoch 0 leaves Lightning's epoch counters one behind; the
    step-10 checkpoint of that run used to resume into the wrong epoch.
    """
    def every(n, name):
        return [ModelCheckpoint(dirpath=tmp_path / name, every_n_train_steps=n, save_top_k=-1, filename="{step}")]

    full, full_val, _, _ = _steps(tmp_path / "full", validate_every=validate_every, max_steps=12)
    a, a_val, _, _ = _steps(tmp_path / "a", validate_every=validate_every, callbacks=every(5, "ca"), max_steps=5)
    b, b_val, _, _ = _steps(tmp_path / "b", ckpt=tmp_path / "ca" / "step=5.ckpt", validate_every=validate_every,
                            callbacks=every(5, "cb"), max_steps=10)
    c, c_val, steps, _ = _steps(tmp_path / "c", ckpt=tmp_path / "cb" / "step=10.ckpt",
                                validate_every=validate_every, max_steps=12)
    assert a + b + c == full and steps == 12 and a_val + b_val + c_val == full_val


@pytest.mark.parametrize("validate", [None, "epoch"])
@pytest.mark.parametrize("stop", [3, 5, 7])
def test_resume_under_max_steps_from_an_epoch_end_checkpoint(tmp_path, stop, validate):
    """Lightning's default ModelCheckpoint saves at the epoch's end, also when max_steps stops it early (3, 7).

    Lightning 2.6 resumed such a checkpoint under max_steps into a shortened next epoch, whole epoch (5) or not.
    """
    full, full_val, _, _ = _steps(tmp_path / "full", validate_every=validate, max_steps=12)
    a, a_val, _, _ = _steps(tmp_path / "a", validate_every=validate, max_steps=stop,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path / "c", filename="end")])
    b, b_val, steps, _ = _steps(tmp_path / "b", ckpt=tmp_path / "c" / "end.ckpt", validate_every=validate,
                                max_steps=12)
    assert a + b == full and steps == 12 and a_val + b_val == full_val


def test_evaluation_only_runs_ignore_the_saved_training_stream(tmp_path):
    """validate/test with ckpt_path under another data seed, meta-batch size or training shape: no refusal.

    Only resuming ``fit`` needs the checkpoint's episode stream; evaluating its weights does not.
    """
    from lightning_meta.errors import MetaConfigError

    _run(tmp_path, max_steps=3, every=3)
    ckpt = str(tmp_path / "step=3.ckpt")
    model = MAML(MLP(1, [8]), task="regression", inner_lr=0.01)
    kw = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path}
    other = {"meta_batch_size": 2, "train_episodes": 40, "val_episodes": 4, "test_episodes": 4,
             "eval_meta_batch_size": 4, "seed": 3}
    val = L.Trainer(**kw).validate(model, SinusoidDataModule(**other), ckpt_path=ckpt, verbose=False)[0]
    test = L.Trainer(**kw).test(model, SinusoidDataModule(**other), ckpt_path=ckpt, verbose=False)[0]
    assert val["val/mse"] > 0 and test["test/mse"] > 0
    with pytest.raises(MetaConfigError, match="meta_batch_size"):  # resuming fit is still checked
        L.Trainer(max_steps=6, limit_val_batches=0, **kw).fit(
            model, SinusoidDataModule(**{**other, "seed": 0}), ckpt_path=ckpt)
