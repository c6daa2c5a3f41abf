"""The lightning-meta command: every shipped config runs, errors are clear, TensorBoard gets the result."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from lightning_meta.cli import console_main, main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "**" / "*.yaml"), recursive=True))

# small overrides that keep each config's structure but make it run in seconds
FAST = [
    "--trainer.fast_dev_run", "1",
    "--data.init_args.meta_batch_size", "2",
    "--data.init_args.eval_meta_batch_size", "2",
    "--trainer.enable_progress_bar", "false",
    "--trainer.enable_model_summary", "false",
]

# GPU-only configs: without a GPU they run with the CPU smoke-test overrides their header documents
_VIT = "--model.init_args.backbone.init_args.backbone.init_args."
CPU_OVERRIDES = {
    "vit_lora_zero2.yaml": ["--trainer.accelerator", "cpu", "--trainer.strategy", "deepspeed_cpu_stage_2",
                            _VIT + "dim", "32", _VIT + "depth", "2", _VIT + "heads", "2"],
}


def test_configs_found():
    assert len(CONFIGS) >= 4, CONFIGS


@pytest.mark.parametrize("config", CONFIGS, ids=[os.path.relpath(c, ROOT / "configs") for c in CONFIGS])
def test_config_header_and_fast_run(config, tmp_path, monkeypatch):
    text = Path(config).read_text()
    assert text.startswith("#"), "each config opens with a comment block"
    assert "Launch:" in text and "Override:" in text and "Purpose:" in text
    monkeypatch.chdir(tmp_path)
    if "../shared/data/omniglot" in text:  # the real-data benchmark config: paths are relative to the repository
        if not (ROOT.parent / "shared" / "data" / "omniglot").exists():
            pytest.skip("../shared/data/omniglot is absent (the project never needs it at run time)")
        monkeypatch.chdir(ROOT)
        main(["fit", "--config", config, *FAST, "--trainer.default_root_dir", str(tmp_path),
              "--trainer.logger.init_args.save_dir", str(tmp_path / "lightning_logs")])
        return
    if os.sep + "slurm" + os.sep in config:  # an overlay: compose it with a full config under a faked Slurm job
        for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0",
                           "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost",
                           "SLURM_JOB_ID": "1", "SLURM_JOB_NAME": "test"}.items():
            monkeypatch.setenv(key, value)
        main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--config", config, *FAST])
        return
    import torch

    cpu = [] if torch.cuda.is_available() else CPU_OVERRIDES.get(os.path.basename(config), [])
    main(["fit", "--config", config, *FAST, *cpu])


def test_unknown_config_key_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", CONFIGS[0], "--data.init_args.wayz", "5"])
    assert e.value.code != 0
    err = capsys.readouterr().err
    assert "wayz" in err


def test_bad_value_is_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = str(ROOT / "configs" / "maml_glyphs.yaml")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", cfg, "--model.init_args.inner_lr", "-0.5", *FAST])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "inner_lr=-0.5" in err and "Traceback" not in err


def test_ways_are_linked_from_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = str(ROOT / "configs" / "maml_glyphs.yaml")
    cli = main(["--config", cfg, "--data.init_args.ways", "3", "--data.init_args.meta_batch_size", "2"],
               run=False)
    assert cli.model.ways == 3 and cli.model.model.head.out_features == 3


def test_quickstart_logs_test_accuracy_to_tensorboard(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs" / "quickstart.yaml"), "--trainer.max_steps", "30",
          "--trainer.val_check_interval", "15", "--data.init_args.val_episodes", "16",
          "--data.init_args.test_episodes", "40", "--trainer.enable_progress_bar", "false"])
    events = glob.glob(str(tmp_path / "lightning_logs" / "quickstart" / "version_*" / "events.out.tfevents.*"))
    assert events
    scalars = {}
    for ev in events:
        acc = EventAccumulator(ev)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = acc.Scalars(tag)[-1].value
    assert "test/acc" in scalars and "test/acc_ci95" in scalars
    assert scalars["test/acc"] > 0.3  # chance is 0.2 for 5-way
    assert (tmp_path / "lightning_logs" / "quickstart").exists()
    results = glob.glob(str(tmp_path / "lightning_logs" / "quickstart" / "version_*" / "results.json"))
    assert results


def test_index_subcommand(tmp_path, capsys):
    import numpy as np

    from lightning_meta.data.shards import ShardWriter, load_index

    with ShardWriter(tmp_path, max_samples=4) as w:
        for c in range(3):
            w.add_class(c, [np.full((8, 8), c * 40, np.uint8)] * 4, name=f"c{c}", split="train")
    os.remove(tmp_path / "index.json")
    console_main(["index", str(tmp_path)])
    assert "3 classes" in capsys.readouterr().out
    assert len(load_index(str(tmp_path)).classes) == 3


def test_python_dash_m_help():
    out = subprocess.run([sys.executable, "-m", "lightning_meta", "fit", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--test_after_fit" in out.stdout


def test_import_does_not_import_deepspeed():
    code = "import sys, lightning_meta, lightning_meta.cli; print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_predict_subcommand(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = main(["predict", "--config", str(ROOT / "configs" / "quickstart.yaml"), *FAST])
    preds = cli.trainer.predict_loop.predictions
    assert preds and preds[0]["labels"].shape == (2, 75)  # 2 episodes of 5-way 15-query
    assert preds[0]["classes"].shape == (2, 75)
    # the command keeps them: a PredictionWriter is added, one JSON line per task
    from lightning_meta.callbacks import PredictionWriter

    writer = next(cb for cb in cli.trainer.callbacks if isinstance(cb, PredictionWriter))
    rows = [json.loads(line) for line in open(writer.path)]
    assert len(rows) == sum(p["labels"].shape[0] for p in preds)
    assert rows[1]["labels"] == preds[0]["labels"][1].tolist() and rows[1]["classes"] == preds[0]["classes"][1].tolist()
    assert (rows[1]["batch"], rows[1]["task"]) == (0, 1)


# ---------------------------------------------------------------- review fixes (fourth session)
QUICK = str(ROOT / "configs" / "quickstart.yaml")
TINY = ["--data.init_args.meta_batch_size", "2", "--data.init_args.eval_meta_batch_size", "2",
        "--data.init_args.test_episodes", "4", "--trainer.limit_val_batches", "0",
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


class SendSignal(Callback):
    """Sends SIGUSR1 to this process at a training step (a scheduler's preemption warning)."""

    def __init__(self, at_step: int = 2) -> None:
        self.at_step = at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_a_run_without_logger_never_overwrites_the_input_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "config.yaml"
    own.write_text(Path(QUICK).read_text())
    before = own.read_bytes()
    with pytest.warns(UserWarning, match="not saving the resolved config: .*is the --config file"):
        main(["fit", "--config", "config.yaml", "--trainer.logger", "false", "--trainer.max_steps", "2", *TINY])
    assert own.read_bytes() == before
    # another config.yaml that Lightning did not write is kept as well
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.yaml").write_text("my notes\n")
    with pytest.warns(UserWarning, match="was not written by lightning-meta"):
        main(["fit", "--config", QUICK, "--trainer.logger", "false", "--trainer.max_steps", "2",
              "--trainer.default_root_dir", str(other), *TINY])
    assert (other / "config.yaml").read_text() == "my notes\n"


def test_test_after_fit_is_skipped_for_a_preempted_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", QUICK, "--trainer.max_steps", "6", *TINY,
                "--trainer.callbacks+=lightning_meta.callbacks.PreemptionCheckpoint",
                "--trainer.callbacks.requeue=false",
                "--trainer.callbacks+=test_cli.SendSignal", "--trainer.callbacks.at_step=2",
                "--trainer.default_root_dir", str(tmp_path / "run")])
    assert cli.trainer.global_step == 3  # stopped after the flagged batch
    assert (tmp_path / "run" / "hpc_ckpt_1.ckpt").exists()
    assert "test/acc" not in cli.trainer.callback_metrics  # the partly trained model was not meta-tested


def test_missing_checkpoint_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["test", "--config", QUICK, "--ckpt_path", str(tmp_path / "nope.ckpt")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nope.ckpt' does not exist" in err and "Traceback" not in err


def test_top_level_help_lists_the_other_commands():
    out = subprocess.run([sys.executable, "-m", "lightning_meta", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lightning-meta index" in out.stdout and "lightning-meta report" in out.stdout
    out = subprocess.run([sys.executable, "-m", "lightning_meta", "fit", "--config", QUICK, "--print_config"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "args parameter" not in out.stderr  # the command line is read, not passed


def test_index_refuses_to_drop_shards_of_the_folder_index(tmp_path, capsys):
    import numpy as np

    from lightning_meta.data.shards import ShardWriter, load_index

    with ShardWriter(tmp_path, prefix="d", max_samples=4) as w:  # one class per shard
        for c in range(6):
            w.add_class(c, [np.full((8, 8), c * 40, np.uint8)] * 4, name=f"c{c}", split="train" if c < 3 else "val")
    full = load_index(str(tmp_path))
    assert len(full.shards) == 6
    before = (tmp_path / "index.json").read_bytes()
    subset = str(tmp_path / "d-train-*.tar")
    with pytest.raises(SystemExit) as e:
        console_main(["index", subset])
    assert e.value.code == 2
    assert "does not match" in capsys.readouterr().err and (tmp_path / "index.json").read_bytes() == before
    console_main(["index", subset, "--output", str(tmp_path / "sub" / "index.json")])
    console_main(["index", str(tmp_path)])  # the whole folder: names and splits kept
    again = load_index(str(tmp_path))
    assert [(c.name, c.split) for c in again.classes] == [(c.name, c.split) for c in full.classes]


@pytest.mark.slow
def test_results_are_written_after_a_two_process_test(tmp_path):
    """TestResultWriter under DDP: every rank joins Trainer.log_dir's broadcast (rank 0 alone crashed the run)."""
    from ports import launch_env

    env = launch_env()
    out = subprocess.run([sys.executable, "-m", "lightning_meta", "fit", "--config", QUICK, *TINY,
                          "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp", "--trainer.devices", "2",
                          "--trainer.max_steps", "2", "--test_after_fit", "true",
                          "--trainer.callbacks+=TestResultWriter"],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    results = glob.glob(str(tmp_path / "lightning_logs" / "quickstart" / "version_*" / "results.json"))
    assert len(results) == 1 and '"test/acc"' in Path(results[0]).read_text()


def test_configuration_errors_are_printed_by_rank_zero_only(tmp_path, monkeypatch, capsys):
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rank_zero_only, "rank", 1, raising=False)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "configs" / "maml_glyphs.yaml"), "--model.init_args.inner_lr", "-0.5"])
    assert e.value.code == 2 and "inner_lr" not in capsys.readouterr().err  # rank 0 prints it


# ---------------------------------------------------------------- review fixes (eighth session)
def test_ckpt_path_last_that_finds_nothing_is_an_error_naming_the_earlier_checkpoint(tmp_path, monkeypatch, capsys):
    """Lightning only warned and started untrained: fit retrained from step 0, test scored a fresh model."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:  # nothing saved anywhere yet
        main(["test", "--config", QUICK, "--ckpt_path", "last", *TINY])
    assert e.value.code == 2
    assert "found no last checkpoint" in capsys.readouterr().err
    main(["fit", "--config", QUICK, "--trainer.max_steps", "2", *TINY,
          "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.save_last=true"])
    saved = sorted(tmp_path.glob("lightning_logs/*/version_0/checkpoints/last.ckpt"))
    assert saved
    for command in ("test", "fit"):
        with pytest.raises(SystemExit) as e:  # the new run logs to version_1, where Lightning looks
            main([command, "--config", QUICK, "--ckpt_path", "last", "--trainer.max_steps", "4", *TINY])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert str(saved[-1].relative_to(tmp_path)) in err and "Traceback" not in err


def test_an_explicit_model_ways_that_the_data_link_would_replace_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", QUICK, "--model.init_args.ways", "7", "--trainer.max_steps", "1", *TINY])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--data.init_args.ways 7" in err and "Traceback" not in err
    cli = main(["fit", "--config", QUICK, "--model.init_args.ways", "20", "--trainer.max_steps", "1", *TINY])
    assert cli.model.ways == 20  # the same as the data's (quickstart trains 20-way): accepted
