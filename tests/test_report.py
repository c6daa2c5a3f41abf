"""``lightning-meta report``: table and plot of two real short runs, and clear errors for bad input."""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path

import numpy as np
import pytest
from episode_fixtures import write_tiny_shards
from PIL import Image

from lightning_meta.cli import console_main, main
from lightning_meta.errors import MetaConfigError
from lightning_meta.report import collect_runs, load_run, markdown_table, plot_validation

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> dict[str, Path]:
    """Two real runs of `lightning-meta fit --test_after_fit true`: MAML on sinusoids and ProtoNet on tiny shards."""
    tmp = tmp_path_factory.mktemp("report_runs")
    logs = tmp / "lightning_logs"
    main(["fit", "--config", str(ROOT / "configs" / "maml_sinusoid.yaml"), *QUIET,
          "--trainer.max_steps", "10", "--trainer.val_check_interval", "5", "--trainer.log_every_n_steps", "2",
          "--trainer.logger.init_args.save_dir", str(logs),
          "--data.init_args.meta_batch_size", "4", "--data.init_args.val_episodes", "20",
          "--data.init_args.test_episodes", "30", "--data.init_args.eval_meta_batch_size", "10"])
    shards = tmp / "shards"
    write_tiny_shards(shards)
    main(["fit", "--config", str(ROOT / "configs" / "protonet_glyphs.yaml"), *QUIET,
          "--trainer.max_steps", "6", "--trainer.val_check_interval", "3", "--trainer.log_every_n_steps", "1",
          "--trainer.logger.init_args.save_dir", str(logs),
          "--model.init_args.backbone.init_args.hidden", "8",
          "--data.init_args.shards", str(shards), "--data.init_args.ways", "4", "--data.init_args.shots", "1",
          "--data.init_args.queries", "2", "--data.init_args.eval_ways", "3", "--data.init_args.eval_shots", "1",
          "--data.init_args.eval_queries", "3", "--data.init_args.meta_batch_size", "2",
          "--data.init_args.eval_meta_batch_size", "4", "--data.init_args.train_episodes", "40",
          "--data.init_args.val_episodes", "8", "--data.init_args.test_episodes", "12"])
    runs = {"maml": logs / "maml_sinusoid" / "version_0", "protonet": logs / "protonet_glyphs" / "version_0"}
    for run in runs.values():
        assert (run / "results.json").is_file() and glob.glob(str(run / "events.out.tfevents.*"))
    return runs


def _last_val(run: Path, tag: str) -> tuple[float, float, int]:
    """Last validation (mean, ci95, step) read straight from the event files, as the reference."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for ev in glob.glob(str(run / "events.out.tfevents.*")):
        acc = EventAccumulator(ev)
        acc.Reload()
        for t in (tag, f"{tag}_ci95"):
            if t in acc.Tags()["scalars"]:
                found[t] = acc.Scalars(t)
    return found[tag][-1].value, found[f"{tag}_ci95"][-1].value, found[tag][-1].step


def _row(table: str, name: str) -> list[str]:
    rows = [line for line in table.splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1, table
    return [c.strip() for c in rows[0].strip("|").split(" | ")]


def test_report_command_on_two_real_runs(two_runs, tmp_path, capsys):
    png, md = tmp_path / "out" / "val.png", tmp_path / "out" / "table.md"
    console_main(["report", str(two_runs["maml"]), str(two_runs["protonet"]), "--out-png", str(png),
                  "--out-md", str(md)])
    out = capsys.readouterr()
    table = out.out
    assert md.read_text() == table
    assert table.splitlines()[0].startswith("| run | algorithm |")

    # MAML on sinusoids: regression, MSE; 10 steps x meta-batch 4 = 40 training episodes
    res = json.loads((two_runs["maml"] / "results.json").read_text())
    row = _row(table, "maml_sinusoid/version_0")
    assert row[1] == res["algorithm"] == "MAML"
    assert row[2] == "10-shot" and row[3] == f"{res['eval_shots']}-shot"
    assert row[4] == str(res["global_step"] * 4) == "40"
    m, h, n = res["metrics"]["test/mse"], res["metrics"]["test/mse_ci95"], int(res["metrics"]["test/episodes"])
    assert n == 30
    assert row[6] == f"MSE {m:.3f} ± {h:.3f} (30)"
    vm, vh, _ = _last_val(two_runs["maml"], "val/mse")
    assert row[5] == f"MSE {vm:.3f} ± {vh:.3f} (20)"
    wall = res["wall_time_s"]
    assert row[7] == (f"{wall:.1f} s" if wall < 60 else f"{int(round(wall)) // 60} min {int(round(wall)) % 60:02d} s")

    # ProtoNet on the tiny shards: 4-way training, 3-way evaluation, accuracy in percent
    res = json.loads((two_runs["protonet"] / "results.json").read_text())
    row = _row(table, "protonet_glyphs/version_0")
    assert row[1] == res["algorithm"] == "ProtoNet"
    assert row[2] == "4-way 1-shot" and row[3] == "3-way 1-shot" == f"{res['eval_ways']}-way {res['eval_shots']}-shot"
    assert row[4] == str(6 * 2)
    m, h = res["metrics"]["test/acc"], res["metrics"]["test/acc_ci95"]
    assert row[6] == f"{100 * m:.2f}% ± {100 * h:.2f}% (12)"
    vm, vh, _ = _last_val(two_runs["protonet"], "val/acc")
    assert row[5] == f"{100 * vm:.2f}% ± {100 * vh:.2f}% (8)"

    # a real PNG with two panels (accuracy and MSE) that is not blank
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        w, h_px = img.size
        pixels = np.asarray(img.convert("L"))
    assert w > 2 * h_px > 0  # two panels side by side
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.005
    assert str(png) in out.err


def test_validation_curve_counts_training_episodes(two_runs):
    runs = collect_runs([two_runs["maml"], two_runs["protonet"]])
    maml, proto = runs
    # validation every 5 optimizer steps with meta-batch 4 -> after 20 and 40 episodes
    assert maml.score == "mse" and maml.val_training_episodes == [20, 40]
    assert proto.score == "acc" and proto.val_training_episodes == [6, 12]
    vm, vh, step = _last_val(two_runs["maml"], "val/mse")
    assert maml.val_mean[-1] == pytest.approx(vm) and maml.val_ci95[-1] == pytest.approx(vh)
    assert maml.val_steps[-1] == step + 1 == 10  # Lightning logs fit-time validation at (steps done - 1)
    assert proto.test is not None and 0.0 <= proto.test[0] <= 1.0 and proto.test[2] == 12


def test_parent_folder_expands_to_its_versions(two_runs, capsys):
    logs = two_runs["maml"].parents[1]
    console_main(["report", str(logs), "--no-plot"])
    table = capsys.readouterr().out
    assert "| maml_sinusoid/version_0 |" in table and "| protonet_glyphs/version_0 |" in table


def _fake_run(folder: Path, metrics: list[tuple[int, dict[str, float]]], version: int = 0) -> Path:
    """A run directory with only the given scalars (what a plain ``L.Trainer`` without LightningCLI leaves).

    With no metrics it is what a run stopped by a config error at setup (or still before its first
    validation) leaves: a version folder holding an event file and nothing else.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(str(folder), name="plain", version=version, default_hp_metric=False)
    logger.experiment.flush()  # the event file exists even when nothing is logged
    for step, values in metrics:
        logger.log_metrics(values, step=step)
    logger.finalize("success")
    return Path(logger.log_dir)


_VAL = [(1, {"val/acc": 0.5, "val/acc_ci95": 0.1, "val/episodes": 10.0}),
        (3, {"val/acc": 0.6, "val/acc_ci95": 0.1, "val/episodes": 10.0})]


def test_missing_path_is_named(tmp_path, capsys):
    bad = tmp_path / "nope"
    with pytest.raises(SystemExit) as e:
        console_main(["report", str(bad), "--no-plot"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "does not exist" in err and "Traceback" not in err


def test_folder_without_event_files_is_refused(tmp_path, capsys):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("hello")
    with pytest.raises(SystemExit) as e:
        console_main(["report", str(tmp_path / "empty")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "empty") in err and "events.out.tfevents" in err and "version_N" in err


def test_run_without_validation_or_test_is_refused(tmp_path):
    run = _fake_run(tmp_path, [(0, {"train/loss": 1.0}), (1, {"train/loss": 0.5})])
    with pytest.raises(MetaConfigError, match=re.escape(str(run)) + ".*val/acc or val/mse"):
        load_run(run)


def test_tested_run_without_validation_is_tabled_but_not_plotted(tmp_path, capsys):
    # e.g. configs/protonet_omniglot_minimal.yaml (limit_val_batches: 0): the table, a warning, no plot, exit 0
    run = _fake_run(tmp_path, [(0, {"train/loss": 1.0}), (7, {"test/acc": 0.75, "test/acc_ci95": 0.05,
                                                              "test/episodes": 40.0})])
    md = tmp_path / "t.md"
    console_main(["report", str(run), "--out-png", str(tmp_path / "p.png"), "--out-md", str(md)])
    out = capsys.readouterr()
    assert "logged no validation" in out.err and str(run) in out.err and "no validation to plot" in out.err
    assert "no plot was written" in out.err and "saved the validation plot" not in out.err
    assert not (tmp_path / "p.png").exists()
    assert _row(out.out, "plain/version_0")[6] == "75.00% ± 5.00% (40)" and md.read_text() == out.out
    console_main(["report", str(run), "--no-plot"])
    row = _row(capsys.readouterr().out, "plain/version_0")
    assert row[5] == "—" and row[6] == "75.00% ± 5.00% (40)"
    assert row[4] == "?" or row[4].startswith("? (")  # no config.yaml: the meta-batch size is unknown


def test_meta_batch_size_fallback_and_resumed_steps(tmp_path):
    # a resumed run logs step 3 twice: the later value wins
    run = _fake_run(tmp_path, [(1, {"val/acc": 0.5, "val/acc_ci95": 0.1, "val/episodes": 10.0}),
                               (3, {"val/acc": 0.6, "val/acc_ci95": 0.1, "val/episodes": 10.0}),
                               (3, {"val/acc": 0.7, "val/acc_ci95": 0.1, "val/episodes": 10.0})])
    r = load_run(run)
    assert r.val_mean == pytest.approx([0.5, 0.7])
    with pytest.raises(MetaConfigError, match="meta-batch-size"):
        plot_validation([r], tmp_path / "x.png")
    r = load_run(run, meta_batch_size=8)
    assert r.val_training_episodes == [16, 32] and r.training_episodes == 32
    assert r.steps_lower_bound and "| ≥ 32 |" in markdown_table([r])
    assert plot_validation([r], tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"


def test_run_without_results_json_falls_back_to_event_files(two_runs, tmp_path):
    import shutil

    copy = tmp_path / "copied" / "version_0"
    shutil.copytree(two_runs["maml"], copy)
    (copy / "results.json").unlink()
    res = json.loads((two_runs["maml"] / "results.json").read_text())
    r = load_run(copy)
    assert r.algorithm == "MAML"  # from config.yaml
    assert r.steps == res["global_step"] == 10 and r.training_episodes == 40
    assert r.test[0] == pytest.approx(res["metrics"]["test/mse"]) and r.test[2] == 30
    assert r.wall_time_s is not None and r.wall_time_s >= 0


# ----------------------------------------------------------------------------- runs without results
def test_folder_with_an_empty_run_reports_the_others(tmp_path, capsys):
    good = _fake_run(tmp_path, [*_VAL, (3, {"test/acc": 0.7, "test/acc_ci95": 0.05, "test/episodes": 20.0})])
    empty = _fake_run(tmp_path, [], version=1)  # a config error at setup, or a run before its first validation
    png = tmp_path / "p.png"
    console_main(["report", str(tmp_path), "--meta-batch-size", "2", "--out-png", str(png)])  # exit 0
    out = capsys.readouterr()
    assert "| plain/version_0 |" in out.out and "version_1" not in out.out
    assert _row(out.out, "plain/version_0")[4] == "≥ 8"  # at least (3 + 1) steps x 2 (no checkpoint)
    notes = [line for line in out.err.splitlines() if "version_1" in line]
    assert len(notes) == 1 and "note: skipped" in notes[0] and str(empty) in notes[0]
    assert "no validation or test results" in notes[0]
    assert png.read_bytes()[:4] == b"\x89PNG" and str(png) in out.err
    # in Python: a warning by default, or the on_skip callback
    with pytest.warns(UserWarning, match="skipped .*version_1"):
        assert [r.path for r in collect_runs([tmp_path])] == [good]
    skipped = []
    assert len(collect_runs([tmp_path], on_skip=lambda d, why: skipped.append(d))) == 1 and skipped == [empty]


def test_only_empty_runs_is_an_error(tmp_path, capsys):
    for version in (0, 1):
        _fake_run(tmp_path, [(0, {"train/loss": 1.0})] if version else [], version=version)
    with pytest.raises(SystemExit) as e:
        console_main(["report", str(tmp_path), "--no-plot"])
    assert e.value.code == 2
    out = capsys.readouterr()
    assert out.out == "" and "none of the 2 runs" in out.err and str(tmp_path) in out.err
    assert out.err.count("note: skipped") == 2 and "Traceback" not in out.err

    # an explicitly named single run without results stays an error that names it
    run = tmp_path / "plain" / "version_1"
    with pytest.raises(SystemExit) as e:
        console_main(["report", str(run), "--no-plot"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"run {str(run)!r} has no validation or test results" in err and "note:" not in err


# ----------------------------------------------------------------------------- evaluation-only runs
def test_evaluation_only_runs_report_the_checkpoints_training_episodes(two_runs, tmp_path, capsys):
    """`lightning-meta test|validate --ckpt_path` of a checkpoint trained 10 steps x meta-batch 4 = 40 episodes."""
    import torch

    from lightning_meta.callbacks.episode_logger import checkpoint_global_step

    (ckpt,) = (two_runs["maml"] / "checkpoints").glob("*.ckpt")
    assert checkpoint_global_step(ckpt) == 10
    # a checkpoint without callback states (save_weights_only) never reaches the callbacks' on_load_checkpoint:
    # the step is read from the file instead
    bare = torch.load(ckpt, map_location="cpu", weights_only=True)
    del bare["callbacks"]
    torch.save(bare, tmp_path / "bare.ckpt")
    logs = tmp_path / "logs"
    common = ["--config", str(ROOT / "configs" / "maml_sinusoid.yaml"), *QUIET,
              "--trainer.logger.init_args.save_dir", str(logs), "--data.init_args.meta_batch_size", "4",
              "--data.init_args.val_episodes", "10", "--data.init_args.test_episodes", "10",
              "--data.init_args.eval_meta_batch_size", "10"]
    main(["test", *common, "--ckpt_path", str(ckpt)])
    main(["validate", *common, "--ckpt_path", str(ckpt)])
    main(["test", *common, "--ckpt_path", str(tmp_path / "bare.ckpt")])
    runs = [logs / "maml_sinusoid" / f"version_{v}" for v in range(3)]
    for run in runs:
        res = json.loads((run / "results.json").read_text())
        assert res["global_step"] == 10 and res["evaluation_only"] is True, res
    assert json.loads((runs[1] / "results.json").read_text())["stage"] == "validate"

    capsys.readouterr()
    png = tmp_path / "p.png"
    console_main(["report", str(logs), "--out-png", str(png)])
    out = capsys.readouterr()
    for v in range(3):
        assert _row(out.out, f"maml_sinusoid/version_{v}")[4] == "40"
    assert "MSE" in _row(out.out, "maml_sinusoid/version_1")[5] and _row(out.out, "maml_sinusoid/version_1")[6] == "—"
    assert "MSE" in _row(out.out, "maml_sinusoid/version_0")[6]
    assert png.read_bytes()[:4] == b"\x89PNG" and "version_1" not in out.err  # the validation is plotted
    # the validation of the checkpoint sits where the checkpoint's training ended
    assert collect_runs([runs[1]])[0].val_training_episodes == [40]

    # the fit run itself is unchanged: its own steps, validations after 5 and 10 steps
    fit = load_run(two_runs["maml"])
    assert fit.steps == 10 and not fit.evaluation_only and fit.val_training_episodes == [20, 40]


def test_checkpoint_global_step_is_unknown_when_unreadable(tmp_path):
    import torch

    from lightning_meta.callbacks.episode_logger import checkpoint_global_step

    torch.save({"global_step": 7, "state_dict": {"w": torch.zeros(2)}}, tmp_path / "a.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "nostep.ckpt")
    assert checkpoint_global_step(tmp_path / "a.ckpt") == 7
    assert checkpoint_global_step(str(tmp_path / "a.ckpt")) == 7
    for path in (tmp_path / "junk.ckpt", tmp_path / "nostep.ckpt", tmp_path, tmp_path / "missing.ckpt", None):
        assert checkpoint_global_step(path) is None


def test_unknown_checkpoint_step_is_a_question_mark_not_a_number(tmp_path, capsys):
    """Runs written before the fix: results.json with global_step 0, and a validate run without results.json."""
    import yaml

    tested = _fake_run(tmp_path, [(0, {"test/acc": 0.75, "test/acc_ci95": 0.05, "test/episodes": 40.0})])
    (tested / "results.json").write_text(json.dumps({"algorithm": "MAML", "global_step": 0, "metrics": {
        "test/acc": 0.75, "test/acc_ci95": 0.05, "test/episodes": 40.0}}))
    validated = _fake_run(tmp_path, _VAL[:1], version=1)
    validated_at_0 = _fake_run(tmp_path, [(0, _VAL[0][1])], version=2)
    for run in (tested, validated, validated_at_0):
        (run / "config.yaml").write_text(yaml.safe_dump({"ckpt_path": "/x/epoch=0-step=4.ckpt",
                                                         "data": {"init_args": {"meta_batch_size": 8}}}))
    new = _fake_run(tmp_path, [(0, {"test/acc": 0.75})], version=3)  # the fixed TestResultWriter: step unknown
    (new / "results.json").write_text(json.dumps({"global_step": None, "evaluation_only": True, "metrics": {}}))

    r = {run.name: load_run(run) for run in (tested, validated, validated_at_0, new)}
    assert r["version_0"].steps is None and r["version_0"].evaluation_only
    assert r["version_1"].steps == 2 and not r["version_1"].evaluation_only  # validated after 2 steps of a fit
    assert r["version_2"].steps is None and r["version_2"].val_steps == [] and r["version_2"].val_mean == [0.5]
    assert r["version_3"].steps is None
    console_main(["report", str(tmp_path), "--out-png", str(tmp_path / "p.png")])
    out = capsys.readouterr()
    for v, episodes in ((0, "?"), (1, "≥ 16"), (2, "?"), (3, "?")):
        assert _row(out.out, f"plain/version_{v}")[4] == episodes
    assert "version_2 validated a checkpoint whose training step is unknown" in out.err
    assert (tmp_path / "p.png").is_file()  # version_1 is plotted


@pytest.mark.parametrize(("content", "cell"), [("[1, 2]", None),
                                                ('{"metrics": {"test/acc": null}}', "n/a (0)"),
                                                ('{"metrics": {"test/acc": 0.5, "test/episodes": NaN}}', "50.00% (0)")])
def test_odd_results_json_is_refused_or_read_without_a_traceback(tmp_path, capsys, content, cell):
    run = _fake_run(tmp_path, _VAL)
    (run / "results.json").write_text(content)
    if cell is None:
        with pytest.raises(SystemExit) as e:
            console_main(["report", str(run), "--no-plot"])
        assert e.value.code == 2
        assert "holds a JSON list, not an object" in capsys.readouterr().err
    else:
        console_main(["report", str(run), "--no-plot"])
        assert cell in _row(capsys.readouterr().out, "plain/version_0")


@pytest.mark.parametrize("flag", ["--out-png", "--out-md"])
def test_an_output_path_that_is_a_folder_is_an_error_after_the_table(tmp_path, capsys, flag):
    run = _fake_run(tmp_path, _VAL)
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(SystemExit) as e:
        console_main(["report", str(run), "--meta-batch-size", "2", flag, str(folder),
                      *(["--no-plot"] if flag == "--out-md" else [])])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert "plain/version_0" in out  # the table was printed
    assert f"cannot write {folder}" in err and "Traceback" not in err
