"""Test an ensemble of checkpoints: the MAML++ authors' evaluation protocol."""

from __future__ import annotations

import copy
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_meta.errors import MetaConfigError, require_int

__all__ = ["CheckpointEnsemble"]


class CheckpointEnsemble(Callback):
    """At ``test``, scores the averaged predictions of several checkpoints of the tested model.

    Each test episode is adapted and predicted by every member (the tested learner with a
    checkpoint's weights and buffers); the members' softmax probabilities (classification) or
    outputs (regression) are averaged per query, and the average is scored, so ``test/acc`` (or
    ``test/mse``) and its confidence interval are the ensemble's. The MAML++ authors report the
    ensemble of their five best checkpoints by validation accuracy: with a ``ModelCheckpoint`` that
    keeps them (``monitor: val/acc``, ``mode: max``, ``save_top_k: 5``) and ``top_k=5``, the test
    after ``fit`` (``test_after_fit``) is that protocol; ``lightning-meta test --ckpt_path`` with a
    checkpoint of such a run takes the best ones its saved ``ModelCheckpoint`` state lists. Or name
    the files in ``checkpoints``. ``test/ensemble_size`` is logged. Validation is unchanged.

    Members must be Lightning checkpoint files of the same architecture (DeepSpeed checkpoint
    folders are refused). Report steps (``eval_report_steps``) are not computed for an ensemble.
    Only a ``ModelCheckpoint`` with a ``monitor`` counts; under ``fast_dev_run`` (no checkpoint is
    saved) the model itself is tested, with a warning.

    Args:
        checkpoints: checkpoint files to ensemble; ``None`` takes them from the trainer's
            ``ModelCheckpoint`` (its best ``top_k`` by its monitored score).
        top_k: how many of the ``ModelCheckpoint``'s best checkpoints to use (all it kept if ``None``).

    Example:
        >>> from lightning.pytorch.callbacks import ModelCheckpoint
        >>> callbacks = [ModelCheckpoint(monitor="val/acc", mode="max", save_top_k=5), CheckpointEnsemble(top_k=5)]

    """

    def __init__(self, checkpoints: list[str] | None = None, top_k: int | None = None) -> None:
        super().__init__()
        if checkpoints is not None:
            if isinstance(checkpoints, (str, os.PathLike)) or not len(checkpoints):
                raise MetaConfigError(f"checkpoints={checkpoints!r} must be a non-empty list of checkpoint files, "
                                      "or None to take the ModelCheckpoint's best ones")
            if top_k is not None:
                raise MetaConfigError("give checkpoints or top_k, not both (top_k picks from the ModelCheckpoint)")
        if top_k is not None:
            top_k = require_int("top_k", top_k, 1, "the MAML++ authors ensemble their 5 best checkpoints")
        self.checkpoints = None if checkpoints is None else [os.fspath(c) for c in checkpoints]
        self.top_k = top_k
        self.paths: list[str] = []
        self._at_fit_end: list[tuple[dict[str, Any], str]] = []  # the run's final best, absolute paths

    @staticmethod
    def _keepers(trainer: L.Trainer) -> list[tuple[dict[str, Any], str]]:
        return [({os.path.abspath(p): v for p, v in c.best_k_models.items()}, c.mode) for c in trainer.callbacks
                if isinstance(c, ModelCheckpoint) and c.monitor is not None and c.best_k_models]

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        # a later test(ckpt_path=...) restores the ModelCheckpoint to that checkpoint's (older) state
        self._at_fit_end = self._keepers(trainer)

    def _resolve(self, trainer: L.Trainer) -> list[str]:
        if self.checkpoints is not None:
            return list(self.checkpoints)
        keepers = self._at_fit_end or self._keepers(trainer)
        ckpt = trainer.ckpt_path if isinstance(trainer.ckpt_path, str) and os.path.isfile(trainer.ckpt_path) else None
        if not keepers and ckpt is not None:
            keepers = _saved_keepers(ckpt)  # lightning-meta test --ckpt_path of a finished run
        if not keepers and trainer.fast_dev_run:
            return []  # a smoke run saves no checkpoints: test the model itself
        if not keepers:
            raise MetaConfigError(
                "CheckpointEnsemble has no checkpoints: give checkpoints=[...]; or train in the same run with a "
                "ModelCheckpoint that keeps the best ones (monitor: val/acc, mode: max, save_top_k: 5); or test "
                "with --ckpt_path set to a checkpoint of such a run (its ModelCheckpoint state lists them)"
            )
        best, mode = keepers[0]
        ranked = sorted(best.items(), key=lambda kv: float(kv[1]), reverse=mode == "max")
        paths = [p for p, _ in ranked]
        paths = paths[: self.top_k] if self.top_k is not None else paths
        return [_locate(p, ckpt) for p in paths]

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if not hasattr(pl_module, "_ensemble_scores"):
            raise MetaConfigError(f"CheckpointEnsemble needs a lightning-meta learner, got {type(pl_module).__name__}")
        self.paths = self._resolve(trainer)
        if not self.paths:
            rank_zero_warn("CheckpointEnsemble: fast_dev_run saved no checkpoints; testing the model itself")
            return
        # Lightning runs test hooks under inference mode: tensors made there could never adapt
        with torch.inference_mode(False):
            pl_module.__dict__["_test_ensemble"] = self._members(pl_module)
        rank_zero_info(f"CheckpointEnsemble: testing the average of {len(self.paths)} checkpoint(s): "
                       + ", ".join(os.path.basename(p) for p in self.paths))

    def _members(self, pl_module: L.LightningModule) -> list[L.LightningModule]:
        members = []
        attached, pl_module._trainer = pl_module._trainer, None  # copy the learner, not the trainer
        try:
            template = copy.deepcopy(pl_module)
        finally:
            pl_module._trainer = attached
        for path in self.paths:
            if os.path.isdir(path):
                raise MetaConfigError(f"checkpoint {path!r} is a folder; CheckpointEnsemble takes Lightning "
                                      "checkpoint files (a DeepSpeed checkpoint folder is not supported)")
            if not os.path.isfile(path):
                raise MetaConfigError(f"checkpoint {path!r} does not exist (deleted, or a path relative to "
                                      "another folder?)")
            state = _state_dict(path)
            member = copy.deepcopy(template)
            try:
                member.load_state_dict(state)
            except RuntimeError as e:
                raise MetaConfigError(f"checkpoint {path!r} does not fit the tested model ({str(e).splitlines()[0]}); "
                                      "ensemble checkpoints of the same configuration") from e
            members.append(member.to(pl_module.device).eval())
        return members

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        if self.paths:
            pl_module.log("test/ensemble_size", float(len(self.paths)), sync_dist=False)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:  # noqa: D102
        pl_module.__dict__.pop("_test_ensemble", None)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Drops the members when a test fails, so that later tests of the module score the module."""
        pl_module.__dict__.pop("_test_ensemble", None)


def _locate(path: str, ckpt: str | None) -> str:
    """A listed checkpoint, or the file of the same name beside the tested checkpoint (a moved run, another folder)."""
    if os.path.isfile(path) or ckpt is None:
        return path
    beside = os.path.join(os.path.dirname(os.path.abspath(ckpt)), os.path.basename(path))
    if os.path.isfile(beside):
        return beside
    raise MetaConfigError(
        f"checkpoint {path!r}, one of the best listed by the ModelCheckpoint state in {ckpt!r}, is missing (also "
        f"beside it); that state lists the best checkpoints as of its own epoch, which may have been deleted since: "
        "test with the run's last.ckpt, or give checkpoints=[...]"
    )


def _saved_keepers(path: str) -> list[tuple[dict[str, Any], str]]:
    """``(best_k_models, mode)`` of each monitoring ``ModelCheckpoint`` whose state a checkpoint file holds."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # unreadable: the caller's error names the ways to give checkpoints
        return []
    found = []
    for key, state in (checkpoint.get("callbacks") or {}).items() if isinstance(checkpoint, dict) else ():
        if (isinstance(key, str) and key.startswith("ModelCheckpoint") and isinstance(state, dict)
                and state.get("monitor") is not None and state.get("best_k_models")):
            found.append((dict(state["best_k_models"]), "max" if "'mode': 'max'" in key else "min"))
    return found


def _state_dict(path: str) -> dict[str, Any]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a text file, a truncated download
        raise MetaConfigError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise MetaConfigError(f"checkpoint {path!r} holds no Lightning state_dict")
    return checkpoint["state_dict"]
