"""CheckpointEnsemble: the test score of averaged predictions, against a hand-written average."""

from __future__ import annotations

import os
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_meta.algorithms import MAML, ProtoNet
from lightning_meta.backbones import MLP
from lightning_meta.callbacks import CheckpointEnsemble
from lightning_meta.episode import Episode, collate_episodes
from lightning_meta.errors import MetaConfigError


def _batches(n, task, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        eps = []
        for _ in range(3):
            sx = torch.randn(6, 5, generator=g, dtype=torch.float64)
            qx = torch.randn(9, 5, generator=g, dtype=torch.float64)
            if task == "classification":
                eps.append(Episode(sx, torch.arange(3).repeat(2), qx, torch.arange(3).repeat(3), torch.arange(3)))
            else:
                w = torch.randn(5, 1, generator=g, dtype=torch.float64)
                eps.append(Episode(sx, sx @ w, qx, qx @ w, torch.zeros(0, dtype=torch.long)))
        out.append(collate_episodes(eps))
    return out


class _Data(L.LightningDataModule):
    def __init__(self, task):
        super().__init__()
        self.train, self.val, self.test = _batches(4, task, 0), _batches(2, task, 1), _batches(3, task, 2)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.train, batch_size=None)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.val, batch_size=None)

    def test_dataloader(self):
        return torch.utils.data.DataLoader(self.test, batch_size=None)


def _learner(task, cls=MAML):
    torch.manual_seed(0)
    if cls is ProtoNet:
        return ProtoNet(MLP(5, [8]), ways=3).double()
    return MAML(MLP(5, [8]), ways=3, task=task, inner_lr=0.3, eval_inner_steps=2).double()


def _trainer(tmp_path, **kwargs):
    args = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                default_root_dir=tmp_path, num_sanity_val_steps=0)
    return L.Trainer(**{**args, **kwargs})


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _two_checkpoints(task, tmp_path, cls=MAML):
    model = _learner(task, cls)
    paths = []
    for i in range(2):
        trainer = _trainer(tmp_path, max_steps=2 * (i + 1), limit_val_batches=0)
        _quiet(trainer.fit, model, datamodule=_Data(task), ckpt_path=paths[-1] if paths else None)
        paths.append(str(tmp_path / f"m{i}.ckpt"))
        trainer.save_checkpoint(paths[-1])
    return paths


@pytest.mark.parametrize(("task", "cls"), [("classification", MAML), ("regression", MAML),
                                           ("classification", ProtoNet)])
def test_ensemble_score_equals_a_hand_written_average(task, cls, tmp_path):
    paths = _two_checkpoints(task, tmp_path, cls)
    trainer = _trainer(tmp_path, callbacks=[CheckpointEnsemble(checkpoints=paths)])
    metrics = _quiet(trainer.test, _learner(task, cls), datamodule=_Data(task), verbose=False)[0]
    # reference: each member loaded into a fresh learner, adapted and predicted task by task
    members = []
    for p in paths:
        m = _learner(task, cls)
        m.load_state_dict(torch.load(p, weights_only=False)["state_dict"])
        members.append(m.eval())
    scores = []
    for batch in _Data(task).test:
        for ep in batch.tasks():
            outs = [m.predict(m.adapt(ep), ep.query_x).detach() for m in members]
            if task == "classification":
                mean = torch.stack([o.softmax(-1) for o in outs]).mean(0)
                scores.append((mean.argmax(-1) == ep.query_y).double().mean())
            else:
                mean = torch.stack(outs).mean(0)
                scores.append(((mean - ep.query_y) ** 2).mean())
    key = "test/acc" if task == "classification" else "test/mse"
    assert metrics[key] == pytest.approx(torch.stack(scores).mean().item(), rel=1e-6, abs=1e-9)
    assert metrics["test/ensemble_size"] == 2
    # the members differ (else averaging them proves nothing) ...
    a, b = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in members)
    assert (a - b).abs().max() > 1e-4
    if task == "regression":  # ... and the ensemble's score is neither member's (a continuous score)
        single = [_quiet(_trainer(tmp_path).test, _learner(task, cls), datamodule=_Data(task), ckpt_path=p,
                         verbose=False)[0][key] for p in paths]
        assert single[0] != single[1] and metrics[key] not in single


def test_top_k_takes_the_best_checkpoints_of_the_run(tmp_path):
    keeper = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val/mse", mode="min", save_top_k=2, save_last=True)
    ensemble = CheckpointEnsemble(top_k=2)
    trainer = _trainer(tmp_path, max_epochs=4, enable_checkpointing=True, callbacks=[keeper, ensemble])
    model = _learner("regression")
    _quiet(trainer.fit, model, datamodule=_Data("regression"))
    metrics = _quiet(trainer.test, model, datamodule=_Data("regression"), verbose=False)[0]
    best = sorted(keeper.best_k_models.items(), key=lambda kv: float(kv[1]))
    assert ensemble.paths == [p for p, _ in best] and len(ensemble.paths) == 2
    assert metrics["test/ensemble_size"] == 2
    assert "_test_ensemble" not in model.__dict__  # members are dropped after the test
    # validation is not ensembled: the same score as a trainer without the callback
    ensembled = trainer.validate(model, datamodule=_Data("regression"), verbose=False)[0]
    plain = _quiet(_trainer(tmp_path).validate, model, datamodule=_Data("regression"), verbose=False)[0]
    assert ensembled["val/mse"] == plain["val/mse"] and "test/ensemble_size" not in ensembled
    # a later test-only run (lightning-meta test --ckpt_path) finds the same members in the saved state
    again = CheckpointEnsemble(top_k=2)
    later = _quiet(_trainer(tmp_path, callbacks=[again]).test, _learner("regression"),
                   datamodule=_Data("regression"), ckpt_path=keeper.last_model_path, verbose=False)[0]
    assert again.paths == ensemble.paths
    assert later["test/mse"] == pytest.approx(metrics["test/mse"], rel=1e-12)


def test_bad_ensembles_are_refused(tmp_path):
    with pytest.raises(MetaConfigError, match="non-empty list"):
        CheckpointEnsemble(checkpoints=[])
    with pytest.raises(MetaConfigError, match="not both"):
        CheckpointEnsemble(checkpoints=["a.ckpt"], top_k=2)
    with pytest.raises(MetaConfigError, match="top_k=0 must be >= 1"):
        CheckpointEnsemble(top_k=0)
    with pytest.raises(MetaConfigError, match="has no checkpoints"):
        _quiet(_trainer(tmp_path, callbacks=[CheckpointEnsemble(top_k=2)]).test, _learner("regression"),
               datamodule=_Data("regression"))
    with pytest.raises(MetaConfigError, match="is a folder"):
        _quiet(_trainer(tmp_path, callbacks=[CheckpointEnsemble([str(tmp_path)])]).test, _learner("regression"),
               datamodule=_Data("regression"))
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(MetaConfigError, match="cannot be read"):
        _quiet(_trainer(tmp_path, callbacks=[CheckpointEnsemble([str(tmp_path / "text.ckpt")])]).test,
               _learner("regression"), datamodule=_Data("regression"))
    other = str(_two_checkpoints("classification", tmp_path / "cls")[0])
    with pytest.raises(MetaConfigError, match="does not fit the tested model"):
        _quiet(_trainer(tmp_path, callbacks=[CheckpointEnsemble([other])]).test,
               MAML(MLP(5, [16]), ways=3).double(), datamodule=_Data("classification"))


def test_classification_averages_probabilities_not_logits():
    """Two members whose logit average and probability average pick different classes."""
    from types import SimpleNamespace

    a = torch.tensor([[[3.0, 0.0, 0.0]]], dtype=torch.float64)    # confident class 0
    b = torch.tensor([[[-20.0, 2.0, 1.9]]], dtype=torch.float64)  # split between 1 and 2
    members = [SimpleNamespace(query_outputs=lambda batch, o=o: o) for o in (a, b)]
    batch = SimpleNamespace(num_tasks=1, query_y=torch.tensor([[0]]))
    learner = _learner("classification")
    # probabilities: (0.909 + 0.000) / 2 > (0.045 + 0.525) / 2; logits would pick class 1
    assert learner._ensemble_scores(members, batch)["acc"].tolist() == [1.0]
    assert ((a + b) / 2).argmax(-1).item() == 1


def test_testing_the_best_checkpoint_keeps_the_runs_final_members(tmp_path):
    """test(ckpt_path="best") restores the ModelCheckpoint to that epoch's list; the members stay the final top-k."""
    keeper = ModelCheckpoint(dirpath=tmp_path / "ckpts", monitor="val/mse", mode="min", save_top_k=-1)
    ensemble = CheckpointEnsemble(top_k=3)
    trainer = _trainer(tmp_path, max_epochs=4, enable_checkpointing=True, callbacks=[keeper, ensemble])
    model = _learner("regression")
    _quiet(trainer.fit, model, datamodule=_Data("regression"))
    final = [p for p, _ in sorted(keeper.best_k_models.items(), key=lambda kv: float(kv[1]))][:3]
    _quiet(trainer.test, model, datamodule=_Data("regression"), ckpt_path="best", verbose=False)
    assert ensemble.paths == [str(p) for p in final]


def test_a_moved_run_finds_its_checkpoints_beside_the_tested_one(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    keeper = ModelCheckpoint(dirpath="ckpts", monitor="val/mse", mode="min", save_top_k=2, save_last=True)
    trainer = _trainer(run, max_epochs=3, enable_checkpointing=True, callbacks=[keeper])
    _quiet(trainer.fit, _learner("regression"), datamodule=_Data("regression"))
    moved = tmp_path / "moved"
    monkeypatch.chdir(tmp_path)
    os.rename(run, moved)  # the saved state still lists the old places
    assert not any(os.path.exists(p) for p in keeper.best_k_models)
    ensemble = CheckpointEnsemble(top_k=2)
    metrics = _quiet(_trainer(tmp_path, callbacks=[ensemble]).test, _learner("regression"),
                     datamodule=_Data("regression"), ckpt_path=str(moved / "ckpts" / "last.ckpt"), verbose=False)[0]
    assert metrics["test/ensemble_size"] == 2
    assert all(p.startswith(str(moved / "ckpts")) for p in ensemble.paths)


def test_a_failed_ensemble_test_leaves_no_members_behind(tmp_path):
    paths = _two_checkpoints("regression", tmp_path)

    class Boom(L.Callback):
        def on_test_batch_start(self, *args):
            raise RuntimeError("boom")

    model = _learner("regression")
    with pytest.raises(RuntimeError, match="boom"):
        _quiet(_trainer(tmp_path, callbacks=[CheckpointEnsemble(paths), Boom()]).test, model,
               datamodule=_Data("regression"))
    assert "_test_ensemble" not in model.__dict__
