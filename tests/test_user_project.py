"""The example user project (examples/user_project): its own learners, backbone and datamodule, found on
PYTHONPATH from a temporary copy (not installed), run through ``lightning-meta fit --model my_project.X``."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "user_project"
FEW_STEPS = [
    "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
    "--data.init_args.meta_batch_size", "2", "--data.init_args.val_episodes", "8",
    "--data.init_args.test_episodes", "8", "--data.init_args.eval_meta_batch_size", "8",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
]


@pytest.fixture
def project(tmp_path) -> Path:
    """A copy of the example in a temporary folder, as a user's own checkout would be."""
    dst = tmp_path / "user_project"
    shutil.copytree(EXAMPLE, dst, ignore=shutil.ignore_patterns("__pycache__", "lightning_logs", "*.png"))
    return dst


@pytest.fixture
def my_project(project, monkeypatch):
    """``import my_project`` from the temporary copy (and forget it afterwards)."""
    assert importlib.util.find_spec("my_project") is None, "my_project must not be importable without PYTHONPATH"
    monkeypatch.syspath_prepend(str(project))
    import my_project

    yield my_project
    for name in [m for m in sys.modules if m == "my_project" or m.startswith("my_project.")]:
        del sys.modules[name]


def _fit(project: Path, *extra: str, on_path: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    paths = ([str(project)] if on_path else []) + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    script = Path(sys.executable).parent / "lightning-meta"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lightning_meta"]
    return subprocess.run([*cmd, "fit", "--config", "config.yaml", *FEW_STEPS, *extra], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)


def _scalars(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for ev in sorted(glob.glob(str(run / "events.out.tfevents.*"))):
        acc = EventAccumulator(ev)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(s.value for s in acc.Scalars(tag))
    return out


def test_example_layout():
    text = (EXAMPLE / "config.yaml").read_text()
    assert text.startswith("#") and all(k in text for k in ("Purpose:", "Launch:", "Override:", "Devices:"))
    readme = (EXAMPLE / "README.md").read_text()
    assert "lightning-meta fit --config config.yaml" in readme and "--model my_project." in readme


def test_fit_label_smoothed_maml_from_user_project(project):
    out = _fit(project)  # config.yaml names my_project.LabelSmoothedMAML and my_project.PatternDataModule
    assert out.returncode == 0, out.stderr[-3000:]
    run = project / "lightning_logs" / "my_project" / "version_0"
    config = (run / "config.yaml").read_text()
    assert "class_path: my_project.LabelSmoothedMAML" in config and "class_path: my_project.PatternDataModule" in config
    tags = _scalars(run)
    assert "train/query_ce" in tags  # only LabelSmoothedMAML.meta_loss logs it
    assert "val/acc" in tags and "test/acc" in tags
    assert json.loads((run / "results.json").read_text())["algorithm"] == "LabelSmoothedMAML"


def test_fit_shrinkage_protonet_from_user_project(project):
    out = _fit(project, "--model", "my_project.ShrinkageProtoNet", "--model.init_args.prior_strength", "1.0")
    assert out.returncode == 0, out.stderr[-3000:]
    run = project / "lightning_logs" / "my_project" / "version_0"
    tags = _scalars(run)
    kappa = tags["train/prior_strength"]  # only ShrinkageProtoNet.meta_loss logs it
    assert kappa[0] == pytest.approx(1.0)
    assert abs(kappa[-1] - 1.0) > 1e-4  # the prior strength is learned: gradients flow through the overridden adapt
    assert "val/acc" in tags and "test/acc" in tags
    assert json.loads((run / "results.json").read_text())["algorithm"] == "ShrinkageProtoNet"


def test_project_missing_from_pythonpath_is_named(project, tmp_path):
    # run from another folder without PYTHONPATH: the user's package cannot be imported
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(project / "config.yaml", elsewhere / "config.yaml")
    out = _fit(elsewhere, on_path=False)
    assert out.returncode != 0
    assert "my_project" in out.stderr and "No module named 'my_project'" in out.stderr


def _batch(my_project, ways=3, shots=2, queries=2, tasks=2):
    from lightning_meta import collate_episodes

    src = my_project.PatternSource(list(range(10)), ways, shots, queries, image_size=16, noise=0.5, seed=0)
    return collate_episodes([src.episode("train", 0, i) for i in range(tasks)])


def test_shrinkage_prototypes_match_the_formula(my_project):
    torch.manual_seed(0)
    model = my_project.ShrinkageProtoNet(my_project.SmallConvNet(1, 8, 16), prior_strength=3.0)
    ep = _batch(my_project).task(0)
    with torch.no_grad():
        emb = model.backbone(ep.support_x)
        means = torch.stack([emb[ep.support_y == c].mean(0) for c in range(3)])
        expected = (2 * means + 3.0 * means.mean(0)) / (2 + 3.0)  # K = 2 shots, kappa = 3
        got = model.adapt(ep)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, means, atol=1e-4)  # shrinkage really moves the prototypes


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_label_smoothed_meta_loss(my_project):
    from lightning_meta.algorithms import MAML

    batch = _batch(my_project)
    torch.manual_seed(0)
    model = my_project.LabelSmoothedMAML(my_project.SmallConvNet(1, 8, 16), ways=3, inner_lr=0.1,
                                         label_smoothing=0.0)
    # no smoothing: the same loss as the library's MAML meta-loss (its own, vmap-free code path)
    torch.testing.assert_close(model.meta_loss(batch), MAML.meta_loss(model, batch), rtol=1e-5, atol=1e-6)
    model.label_smoothing = 0.2
    losses = []
    for ep in batch.tasks():
        logits = model.predict(model.adapt(ep), ep.query_x)
        logp = F.log_softmax(logits, -1)
        nll = -logp.gather(1, ep.query_y[:, None]).squeeze(1)
        losses.append((0.8 * nll - 0.2 * logp.mean(-1)).mean())  # (1 - eps) * CE + eps * CE to uniform
    smoothed = model.meta_loss(batch)
    torch.testing.assert_close(smoothed, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(smoothed, MAML.meta_loss(model, batch))
    smoothed.backward()  # second order through the inner loop: the backbone gets a gradient
    assert all(p.grad is not None for p in model.model.backbone.parameters())


def test_pattern_episodes_are_pure_and_split(my_project):
    dm = my_project.PatternDataModule(num_classes=20, ways=3, shots=1, queries=2, eval_ways=2)
    dm.setup("fit")
    a, b = dm.sources["train"].episode("train", 0, 5), dm.sources["train"].episode("train", 0, 5)
    torch.testing.assert_close(a.support_x, b.support_x)
    assert not torch.equal(a.support_x, dm.sources["train"].episode("train", 0, 6).support_x)
    assert set(a.classes.tolist()) <= set(range(12))
    val = dm.sources["val"].episode("val", 0, 0)
    assert set(val.classes.tolist()) <= set(range(12, 16)) and val.ways == 2
    with pytest.raises(ValueError, match="num_classes=5"):
        my_project.PatternDataModule(num_classes=5, ways=5)
