"""Regression tests for bugs found by the eighth session's reviews of the functional helpers, metrics,
strategies and callbacks. Each test fails without its fix (checked by reverting the fix).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F


def test_no_episodes_give_a_nan_interval_not_zero():
    from lightning_meta.metrics import EpisodicMean

    metric = EpisodicMean()
    result = metric.compute()
    values = list(result.values()) if isinstance(result, dict) else list(result)
    assert len(values) >= 2 and all(math.isnan(float(v)) for v in values[:2]), result


def test_decomposed_batch_norm_refuses_what_the_fused_one_refuses():
    from lightning_meta.functional.norms import decomposed_norms

    one_per_channel = torch.randn(1, 3)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(one_per_channel, None, None, training=True)
    with decomposed_norms(True), pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(one_per_channel, None, None, training=True)
    with decomposed_norms(True), pytest.raises(ValueError, match="running_mean and running_var"):
        F.batch_norm(torch.randn(4, 3), None, None, training=False)
    x = torch.randn(4, 3, dtype=torch.float64)
    with decomposed_norms(True):  # the accepted cases still equal the fused kernel
        got = F.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(got, F.batch_norm(x, None, None, training=True))


def test_accuracy_refuses_labels_that_would_broadcast():
    from lightning_meta.functional.metric import accuracy

    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    assert float(accuracy(logits, torch.tensor([0, 1, 0]))) == 1.0
    with pytest.raises(ValueError, match="labels of shape"):
        accuracy(logits, torch.tensor([[0], [1], [0]]))


def test_one_preemption_signal_saves_and_requeues_once_even_if_training_goes_on(tmp_path, monkeypatch):
    """With min_steps not reached, Lightning ignores should_stop; every later batch used to save and requeue again."""
    import glob
    import os
    import signal
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import MLP
    from lightning_meta.callbacks import PreemptionCheckpoint
    from lightning_meta.datamodules import SinusoidDataModule

    class SendSignal(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    log, stub = tmp_path / "requeue.log", tmp_path / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    stub.chmod(0o755)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    trainer = L.Trainer(max_steps=8, min_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                        callbacks=[PreemptionCheckpoint(requeue_command=f"{stub} requeue {{job_id}}"), SendSignal()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(MAML(MLP(1, [8]), task="regression", inner_lr=0.01),
                    SinusoidDataModule(meta_batch_size=4, train_episodes=48, val_episodes=4))
    assert len(glob.glob(str(tmp_path / "hpc_ckpt_*.ckpt"))) == 1
    assert log.read_text().count("requeue 77") == 1
    assert any("min_steps=6" in str(w.message) for w in caught)


@pytest.mark.parametrize(("kwargs", "match"), [({"signal_name": "SIG_IGN"}, "not a signal this process can catch"),
                                               ({"signal_name": "SIGKILL"}, "cannot be caught"),
                                               ({"requeue_command": "scontrol requeue ${SLURM_JOB_ID}"}, "template")])
def test_preemption_checkpoint_refuses_bad_settings_at_construction(kwargs, match):
    from lightning_meta.callbacks import PreemptionCheckpoint

    with pytest.raises(ValueError, match=match):
        PreemptionCheckpoint(**kwargs)


def test_deepspeed_strategy_keeps_the_users_config_dict_unchanged():
    """Lightning and check_meta_module write into the strategy's config; it was the user's own dict."""
    pytest.importorskip("deepspeed")
    import copy

    from lightning_meta.strategies import CPUDeepSpeedStrategy

    cfg = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    before = copy.deepcopy(cfg)
    strategy = CPUDeepSpeedStrategy(stage=3, config=cfg)
    assert strategy.config is not cfg
    strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] = 32
    assert cfg == before


def test_compile_callback_is_removed_when_fit_fails_and_compiles_the_next_module():
    import warnings

    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import MLP
    from lightning_meta.callbacks.compile import CompileMetaLoss
    from lightning_meta.datamodules import SinusoidDataModule

    class Boom(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                raise RuntimeError("boom")

    seen = {}

    class Probe(Callback):
        def on_train_start(self, trainer, pl_module):
            seen["compiled"] = "meta_loss" in vars(pl_module)

    callback = CompileMetaLoss(backend="eager")

    def fit(model, extra):
        trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, callbacks=[callback, *extra])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, SinusoidDataModule(meta_batch_size=4, train_episodes=16, val_episodes=4))

    first = MAML(MLP(1, [8]), task="regression", inner_lr=0.01)
    with pytest.raises(RuntimeError, match="boom"):
        fit(first, [Boom()])
    assert "meta_loss" not in vars(first)
    fit(MAML(MLP(1, [8]), task="regression", inner_lr=0.01), [Probe()])
    assert seen["compiled"]


def test_replay_running_stats_refuses_statistics_that_do_not_fit():
    from lightning_meta.functional.bn_sync import replay_running_stats

    mean, var = torch.zeros(4), torch.ones(4)
    with pytest.raises(ValueError, match="1 channels do not fit"):
        replay_running_stats(mean, var, torch.rand(2, 1), torch.rand(2, 1), 0.1)
    with pytest.raises(ValueError, match="rows must give one row"):
        replay_running_stats(torch.zeros(3, 4), torch.ones(3, 4), torch.rand(2, 4), torch.rand(2, 4), 0.1, rows=[0, -1])
    out, _, _ = replay_running_stats(mean, var, torch.ones(1, 4), torch.ones(1, 4), 0.5)
    torch.testing.assert_close(out, torch.full((4,), 0.5))


def test_least_used_refuses_more_rows_than_slots():
    from lightning_meta.functional.sequence import least_used

    usage = torch.tensor([[0.3, 0.1, 0.2]])
    assert least_used(usage, 2).argmax(-1).tolist() == [[1, 2]]
    with pytest.raises(ValueError, match="n=4 slots"):
        least_used(usage, 4)


@pytest.mark.parametrize("name", ["Conv4", "ResNet12"])
def test_flattening_backbones_refuse_images_of_another_size(name):
    """Used directly, a Conv4(image_size=28) fed 84x84 images returned 200 features while out_features said 8."""
    import lightning_meta.backbones as backbones

    if name == "Conv4":
        net = backbones.Conv4(1, 2, image_size=28)
    else:
        net = backbones.ResNet12(1, channels=(2, 2, 2, 2), image_size=28)
    assert net(torch.zeros(1, 1, 28, 28)).shape == (1, net.out_features)
    with pytest.raises(ValueError, match="image_size matching the data"):
        net(torch.zeros(1, 1, 84, 84))


def test_a_checkout_without_an_editable_install_finds_datamodules_and_callbacks():
    """``python -m lightning_meta`` from the repository root after a non-editable install.

    The checkout's ``lightning_meta/`` then shadows the installed package and has no
    ``datamodules``/``callbacks`` folders of its own. ``python -S`` reproduces that: no ``.pth``
    file runs, so the editable install's finder is absent, while ``PYTHONPATH`` still offers the
    environment's packages (torch, lightning).
    """
    import os
    import site
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(site.getsitepackages())}
    probe = (
        "import lightning_meta.datamodules as d, lightning_meta.callbacks as c;"
        "from lightning_meta.datamodules import SinusoidDataModule;"
        "print(d.__file__); print(c.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-S", "-c", probe], cwd=root, env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(root / "datamodules" / "__init__.py"), str(root / "callbacks" / "__init__.py")]
    cli = subprocess.run(
        [sys.executable, "-S", "-m", "lightning_meta", "fit", "--help"],
        cwd=root, env=env, capture_output=True, text=True, timeout=120,
    )
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "--trainer" in cli.stdout
