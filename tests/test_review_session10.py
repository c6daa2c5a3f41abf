"""Regression tests for findings of the tenth session's reviews.

Each test fails without its fix (checked by reverting the fix).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_meta.algorithms import IMAML
from lightning_meta.episode import Episode, collate_episodes
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional.implicit import CGInfo, conjugate_gradient


class _Tanh(nn.Module):
    """3 -> 4 -> 1 tanh network with ``out_features`` for the learner's regression head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.out_features = 4

    def forward(self, x):
        return self.body(x)


def _regression_batch(tasks=2, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    eps = []
    for _ in range(tasks):
        w = torch.randn(3, 1, generator=g, dtype=torch.float64)
        sx = torch.randn(n, 3, generator=g, dtype=torch.float64)
        qx = torch.randn(n, 3, generator=g, dtype=torch.float64)
        eps.append(Episode(sx, torch.sin(sx @ w), qx, torch.sin(qx @ w), torch.zeros(0, dtype=torch.long)))
    return collate_episodes(eps)


def _exact_implicit_gradient(model: IMAML, batch) -> torch.Tensor:
    """Mean over tasks of (I + H/lam)^-1 grad L_q(phi), H from a dense Hessian; phi by a plain loop."""
    names = [n for n, _ in model.model.named_parameters()]
    theta = [p.detach().clone() for p in model.model.parameters()]
    sizes = [t.numel() for t in theta]

    def unflat(v):
        return dict(zip(names, [c.view_as(t) for c, t in zip(v.split(sizes), theta, strict=True)], strict=True))

    def loss(v, x, y):
        out = torch.func.functional_call(model.model, unflat(v), (x,))
        return ((out - y) ** 2).mean()

    th = torch.cat([t.reshape(-1) for t in theta])
    total = torch.zeros_like(th)
    for i in range(batch.num_tasks):
        sx, sy, qx, qy = batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]
        phi = th.clone()
        for _ in range(model.inner_steps):
            v = phi.clone().requires_grad_(True)
            reg = loss(v, sx, sy) + model.lam / 2 * ((v - th) ** 2).sum()
            phi = phi - model.inner_lr * torch.autograd.grad(reg, v)[0]
        h = torch.autograd.functional.hessian(lambda v, sx=sx, sy=sy: loss(v, sx, sy), phi)
        v = phi.clone().requires_grad_(True)
        gq = torch.autograd.grad(loss(v, qx, qy), v)[0]
        a = torch.eye(len(th), dtype=th.dtype) + h / model.lam
        assert torch.linalg.eigvalsh(a).min() > 0.05  # positive definite: CG converges to the exact solve
        total += torch.linalg.solve(a, gq) / batch.num_tasks
    return total


def _imaml_gradient(model: IMAML, batch) -> torch.Tensor:
    model.zero_grad()
    model.meta_loss(batch).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.model.parameters()])


def test_imaml_cg_tol_zero_gives_the_exact_implicit_gradient():
    """The solve's stopping test was fixed at a 1e-5 relative residual: no cg_steps could do better."""
    torch.manual_seed(0)
    model = IMAML(_Tanh(), task="regression", inner_lr=0.1, inner_steps=3, lam=2.0, cg_steps=200, cg_tol=0.0)
    model = model.double()
    batch = _regression_batch()
    want = _exact_implicit_gradient(model, batch)
    got = _imaml_gradient(model, batch)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    # the default tolerance stops at a relative residual of 1e-5 (and the logged residual says so)
    model.cg_tol = 1e-5
    loose = _imaml_gradient(model, batch)
    assert 0 < max(model._cg_residuals) <= 1e-5
    torch.testing.assert_close(loose, want, rtol=1e-4, atol=1e-7)


def test_conjugate_gradient_reports_how_it_stopped():
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    b = [torch.ones(4, dtype=torch.float64)]
    x, info = conjugate_gradient(lambda v: [a @ v[0]], b, steps=10, tol=0.0, return_info=True)
    assert isinstance(info, CGInfo) and info.stop == "tol" and 4 <= info.iterations <= 5
    assert info.relative_residual < 1e-15
    torch.testing.assert_close(x[0], 1 / torch.diag(a), rtol=1e-12, atol=0)
    _, info = conjugate_gradient(lambda v: [a @ v[0]], b, steps=2, tol=0.0, return_info=True)
    assert info.stop == "steps" and info.iterations == 2 and info.relative_residual > 1e-3
    _, info = conjugate_gradient(lambda v: [a @ v[0]], b, steps=10, tol=0.5, return_info=True)
    assert info.stop == "tol" and info.relative_residual <= 0.5
    _, info = conjugate_gradient(lambda v: [-(a @ v[0])], b, steps=10, return_info=True)
    assert info.stop == "curvature" and info.iterations == 1
    _, info = conjugate_gradient(lambda v: [a @ v[0]], [torch.zeros(4)], steps=3, return_info=True)
    assert info.stop == "zero" and info.relative_residual == 0.0


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf")])
def test_cg_tol_must_be_finite_and_non_negative(bad):
    with pytest.raises(MetaConfigError, match="cg_tol="):
        IMAML(_Tanh(), task="regression", cg_tol=bad)
    with pytest.raises(MetaConfigError, match="tol="):
        conjugate_gradient(lambda v: v, [torch.ones(2)], steps=2, tol=bad)


def test_imaml_warns_once_when_the_solve_meets_negative_curvature():
    """A support loss with curvature below -lam makes I + H/lam indefinite: the partial solve is named."""
    torch.manual_seed(0)
    model = IMAML(_Tanh(), task="regression", inner_lr=0.1, inner_steps=1, lam=1e-3, cg_steps=20).double()
    batch = _regression_batch(seed=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.meta_loss(batch)
        model.meta_loss(batch)
    hits = [w for w in caught if "non-positive curvature" in str(w.message)]
    assert len(hits) == 1 and "Raise lam" in str(hits[0].message)
    assert "(I + H / lam is not positive definite" in str(hits[0].message)


# ------------------------------------------------------------ bad-input review (tenth session)
INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("learner", ["MAML", "ANIL", "MetaSGD", "MAMLPlusPlus", "Reptile", "IMAML"])
def test_infinite_inner_lr_is_refused(learner):
    """``not inner_lr > 0`` refused NaN but let inf through: the run trained to NaN and exited 0."""
    import lightning_meta.algorithms as A
    from lightning_meta.backbones import MLP

    with pytest.raises(MetaConfigError, match="inner_lr=inf must be > 0 and finite"):
        getattr(A, learner)(MLP(1, [4]), task="regression", inner_lr=INF)


def test_infinite_or_nan_backbone_and_learner_constants_are_refused():
    from lightning_meta.algorithms import MANN, MetaSGD
    from lightning_meta.backbones import MLP, Conv4, ResNet12

    with pytest.raises(MetaConfigError, match="sharpness=inf"):
        MANN(Conv4(1, 8, 28), ways=3, sharpness=INF)
    for bad in (INF, NAN, -0.1):
        with pytest.raises(MetaConfigError, match="negative_slope="):
            ResNet12(negative_slope=bad)
    with pytest.raises(MetaConfigError, match="init_std=inf"):
        MLP(1, [4], init="truncated_normal", init_std=INF)
    with pytest.raises(MetaConfigError, match=r"init_range=\[0.01, inf\]"):
        MetaSGD(MLP(1, [4]), task="regression", init_range=(0.01, INF))


@pytest.mark.parametrize("name", ["amplitude", "phase", "x_range"])
@pytest.mark.parametrize("interval", [(0.1, INF), (-INF, 1.0)])
def test_sinusoid_intervals_must_be_finite(name, interval):
    from lightning_meta.datamodules import SinusoidDataModule

    with pytest.raises(MetaConfigError, match=f"{name}=.*must be a finite interval"):
        SinusoidDataModule(**{name: interval})


@pytest.mark.parametrize(("name", "bad"), [("cache_mb", NAN), ("cache_mb", INF), ("cache_mb", -1.0),
                                           ("retry_delay", NAN), ("retry_delay", INF)])
def test_shard_datamodule_numbers_must_be_finite_and_non_negative(name, bad):
    from lightning_meta.datamodules import OmniglotRunsDataModule, ShardDataModule

    with pytest.raises(MetaConfigError, match=f"{name}={bad}"):
        ShardDataModule(**{name: bad})
    if name == "cache_mb":
        with pytest.raises(MetaConfigError, match=f"{name}={bad}"):
            OmniglotRunsDataModule(runs="runs", **{name: bad})


def test_split_ratios_that_no_index_uses_are_refused(tmp_path):
    """An index that assigns splits ignores split_ratios; a non-default value was dropped silently."""
    from episode_fixtures import write_tiny_shards

    from lightning_meta.datamodules import ShardDataModule

    write_tiny_shards(tmp_path)
    dm = ShardDataModule(shards=str(tmp_path), ways=2, shots=1, queries=1, eval_queries=1,
                         split_ratios=(1.0, 0.0, 0.0))
    with pytest.raises(MetaConfigError, match=r"split_ratios=\(1.0, 0.0, 0.0\) would be ignored"):
        dm.setup("fit")
    ShardDataModule(shards=str(tmp_path), ways=2, shots=1, queries=1, eval_queries=1).setup("fit")  # default: fine


def test_maml_refuses_other_evaluation_ways_before_the_first_training_step(tmp_path):
    """Without the sanity check the mismatch surfaced at the first validation, after training steps."""
    import lightning as L
    from episode_fixtures import write_tiny_shards

    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import Conv4
    from lightning_meta.datamodules import ShardDataModule

    write_tiny_shards(tmp_path / "s")
    dm = ShardDataModule(shards=str(tmp_path / "s"), ways=2, eval_ways=3, shots=1, queries=1, eval_queries=1,
                         meta_batch_size=1,
                         eval_meta_batch_size=1, train_episodes=4, val_episodes=1, test_episodes=1)
    model = MAML(Conv4(1, 8, 28, norm="batch_no_stats"), ways=2, inner_steps=1)
    trainer = L.Trainer(max_steps=3, val_check_interval=2, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                        logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    with pytest.raises(MetaConfigError, match="eval_ways=3"):
        trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 0


# ------------------------------------------------------------ bad-input review, round 2
@pytest.mark.parametrize(("kwargs", "match"), [
    ({"inner_steps": 2.5}, "inner_steps=2.5 must be an integer"),
    ({"inner_steps": True}, "inner_steps=True must be an integer"),
    ({"eval_inner_steps": 1.5}, "eval_inner_steps=1.5 must be an integer"),
    ({"eval_inner_steps": 2, "eval_report_steps": [1.5]}, r"eval_report_steps=1.5 must be an integer"),
    ({"eval_inner_steps": 2, "eval_report_steps": [True]}, r"eval_report_steps=True must be an integer"),
    ({"inner_lr": "0.1"}, "inner_lr='0.1' must be a number"),
    ({"inner_lr": True}, "inner_lr=True must be a number"),
    ({"lr": "1e-3"}, "lr='1e-3' must be a number"),
    ({"ways": 2.5}, "ways=2.5 must be an integer"),
    ({"vmap_chunk_size": 1.5}, "vmap_chunk_size=1.5 must be an integer"),
])
def test_maml_refuses_arguments_of_the_wrong_type(kwargs, match):
    """Floats, strings and booleans passed range checks and failed (or meant 1) deep inside training."""
    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import MLP

    with pytest.raises(MetaConfigError, match=match):
        MAML(MLP(2, [4]), **kwargs)


def test_maml_stores_the_inner_rate_as_a_float():
    from lightning_meta.algorithms import MAML, ProtoNet
    from lightning_meta.backbones import MLP

    assert type(MAML(MLP(2, [4]), inner_lr=1).inner_lr) is float
    with pytest.raises(MetaConfigError, match="lr='1e-3' must be a number"):
        ProtoNet(MLP(2, [4]), lr="1e-3")


@pytest.mark.parametrize(("name", "bad"), [
    ("shots", 1.5), ("ways", 3.0), ("eval_ways", 2.5), ("train_episodes", 10.5), ("num_workers", 1.5),
    ("eval_meta_batch_size", 2.5), ("meta_batch_size", True), ("val_episodes", True), ("seed", 1.5),
    ("queries", "5"), ("test_episodes", "600"),
])
def test_datamodule_integer_arguments_must_be_integers(name, bad):
    from lightning_meta.datamodules import ShardDataModule

    with pytest.raises(MetaConfigError, match=f"{name}={bad!r} must be an integer"):
        ShardDataModule(**{name: bad})


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"hidden": 8.0}, "hidden=8.0 must be an integer"),
    ({"hidden": "8"}, "hidden='8' must be an integer"),
    ({"in_channels": 1.5}, "in_channels=1.5 must be an integer"),
    ({"image_size": 28.5}, "image_size=28.5 must be an integer"),
    ({"padding": [0, 0, 1]}, r"padding=\[0, 0, 1\] must be an int >= 0 or four of them"),
    ({"padding": [0, 0, 1, 1.5]}, "must be an int >= 0 or four of them"),
])
def test_conv4_arguments_are_refused_as_configuration_errors(kwargs, match):
    """A ValueError became a two-traceback crash in the CLI; MetaConfigError is printed as one line."""
    from lightning_meta.backbones import Conv4

    with pytest.raises(MetaConfigError, match=match):
        Conv4(**kwargs)


@pytest.mark.parametrize("bad", [".", "..", 3, "", "a/b"])
def test_result_writers_refuse_names_that_are_not_plain_file_names(bad):
    """filename='.' wrote the results over the run folder's own path."""
    from lightning_meta.callbacks import PredictionWriter, TestResultWriter

    for cls in (TestResultWriter, PredictionWriter):
        with pytest.raises(MetaConfigError, match="must be a plain file name"):
            cls(filename=bad)


@pytest.mark.parametrize(("command", "match"), [
    ("", "is empty"), ("   ", "is empty"), ('scontrol requeue "{job_id}', "not a valid template"),
    (None, "not a valid template"),
])
def test_preemption_requeue_command_is_checked_at_construction(command, match):
    """An empty or unbalanced command crashed the job at preemption, after the save."""
    from lightning_meta.callbacks import PreemptionCheckpoint

    with pytest.raises(ValueError, match=match):
        PreemptionCheckpoint(requeue_command=command)


def test_callback_numbers_are_checked():
    from lightning_meta.callbacks import MetaOverfittingMonitor, MetaProgressBar

    for bad, match in (("0.1", "must be a number"), (INF, "must be >= 0 and finite"), (True, "must be a number")):
        with pytest.raises(MetaConfigError, match=f"min_delta=.*{match}"):
            MetaOverfittingMonitor(min_delta=bad)
    for kwargs in ({"refresh_rate": -1}, {"refresh_rate": 1.5}, {"process_position": -1}):
        with pytest.raises(MetaConfigError, match=next(iter(kwargs))):
            MetaProgressBar(**kwargs)


def test_convert_rotation_splits_without_rotations_is_refused(tmp_path, capsys):
    from lightning_meta.data.convert import main as convert_main

    with pytest.raises(SystemExit) as e:
        convert_main(["omniglot", str(tmp_path / "in"), str(tmp_path / "out"), "--rotation-splits", "val"])
    assert e.value.code == 2 and "has no effect without --rotations" in capsys.readouterr().err


def test_convert_and_index_report_unwritable_outputs_in_one_line(tmp_path, capsys):
    import numpy as np
    from episode_fixtures import write_tiny_shards
    from PIL import Image

    from lightning_meta.cli import console_main

    root = tmp_path / "imgs"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8), 40 * i + c, np.uint8)).save(root / f"c{c}" / f"{i}.png")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as e:
        console_main(["convert", "imagefolder", str(root), str(blocker / "sub"), "--image-size", "8"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cannot write the output" in err and "Traceback" not in err
    write_tiny_shards(tmp_path / "shards")
    for out in (tmp_path / "shards", blocker / "index.json"):
        with pytest.raises(SystemExit) as e:
            console_main(["index", str(tmp_path / "shards"), "--output", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and "lightning-meta index: error:" in err and "Traceback" not in err


def test_bad_checkpoint_files_are_one_line_errors(tmp_path, monkeypatch, capsys):
    """A folder, a text file or a truncated checkpoint ended in unpickler/zip tracebacks."""
    from lightning_meta.cli import main

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    quick = str(root / "configs" / "quickstart.yaml")
    monkeypatch.chdir(tmp_path)
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    (tmp_path / "folder").mkdir()
    for path, match in ((text, "is not a readable checkpoint"), (tmp_path / "folder", "is a folder")):
        with pytest.raises(SystemExit) as e:
            main(["test", "--config", quick, "--ckpt_path", str(path), "--trainer.logger", "false"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and match in err and "Traceback" not in err


def test_a_checkpoint_of_another_model_names_the_fix(tmp_path, monkeypatch, capsys):
    from lightning_meta.cli import main

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    quick = str(root / "configs" / "quickstart.yaml")
    monkeypatch.chdir(tmp_path)
    tiny = ["--data.init_args.meta_batch_size", "2", "--data.init_args.eval_meta_batch_size", "2",
            "--data.init_args.test_episodes", "2", "--trainer.limit_val_batches", "0",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path), "--test_after_fit", "false"]
    cli = main(["fit", "--config", quick, "--trainer.max_steps", "1", "--model.init_args.backbone.init_args.hidden",
                "8", *tiny])
    ckpt = tmp_path / "hidden8.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    with pytest.raises(SystemExit) as e:
        main(["test", "--config", quick, "--ckpt_path", str(ckpt), *tiny])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds weights of another model" in err and "config.yaml" in err


# ------------------------------------------------------------ review of this session's own changes
def test_ckpt_check_accepts_deepspeed_folders_and_legacy_checkpoints(tmp_path):
    """A DeepSpeed checkpoint is a folder; torch.save's legacy format is not a zip but loads."""
    import torch

    from lightning_meta.cli import MetaCLI

    ds = tmp_path / "ds.ckpt"
    (ds / "checkpoint").mkdir(parents=True)
    (ds / "latest").write_text("checkpoint")
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, legacy, _use_new_zipfile_serialization=False)
    plain = tmp_path / "plain"
    plain.mkdir()

    class Fake:  # only what _check_checkpoint_file reads
        _subcommand_config = MetaCLI._subcommand_config
        _check_checkpoint_file = MetaCLI._check_checkpoint_file

        def __init__(self, path):
            self.subcommand = "validate"
            self.config = {"validate": {"ckpt_path": str(path)}}

    Fake(ds)._check_checkpoint_file()
    Fake(legacy)._check_checkpoint_file()
    with pytest.raises(MetaConfigError, match="is a folder but not a DeepSpeed checkpoint"):
        Fake(plain)._check_checkpoint_file()


def test_validators_accept_numpy_and_one_element_tensors():
    import numpy as np
    import torch

    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import MLP, Conv4

    Conv4(padding=np.array([1, 1, 1, 1]))
    m = MAML(MLP(2, [4]), ways=torch.tensor(5), inner_lr=torch.tensor(0.4), lr=np.float32(1e-3))
    assert m.inner_lr == pytest.approx(0.4) and type(m.inner_lr) is float
    assert IMAML(_Tanh(), task="regression", cg_tol=np.float32(1e-6)).cg_tol == pytest.approx(1e-6)
    with pytest.raises(MetaConfigError, match="must be an integer"):
        MAML(MLP(2, [4]), inner_steps=torch.tensor(1.5))


def test_preemption_command_is_not_parsed_without_requeue():
    from lightning_meta.callbacks import PreemptionCheckpoint

    PreemptionCheckpoint(requeue=False, requeue_command="")


def test_conjugate_gradient_with_an_integer_right_hand_side():
    a = torch.diag(torch.tensor([2.0, 4.0]))
    x = conjugate_gradient(lambda v: [a @ v[0].float()], [torch.tensor([1, 4])], steps=2)[0]
    torch.testing.assert_close(x.float(), torch.tensor([0.5, 1.0]))


def test_imaml_logs_the_cg_residual_on_logging_steps_only(tmp_path):
    """``self.log`` costs about a millisecond: like train/loss, the residual is logged on logging steps only."""
    import lightning as L

    from lightning_meta.backbones import MLP
    from lightning_meta.datamodules import SinusoidDataModule

    dm = SinusoidDataModule(shots=4, queries=4, meta_batch_size=2, train_episodes=12, val_episodes=2)
    model = IMAML(MLP(1, [8]), task="regression", inner_lr=0.05, inner_steps=2, cg_steps=3)
    logged = []
    original = model.log

    def spy(name, *args, **kwargs):
        logged.append((name, model.global_step))
        return original(name, *args, **kwargs)

    model.log = spy
    trainer = L.Trainer(max_steps=6, log_every_n_steps=3, limit_val_batches=0, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    steps = [step for name, step in logged if name == "train/cg_residual"]
    loss_steps = [step for name, step in logged if name == "train/loss"]
    assert steps == loss_steps and len(steps) == 3  # steps 0, 2 and 5 of 6 (first step, every third)


# ------------------------------------------------------------ streaming walkthrough findings
def test_scanning_a_truncated_streamed_shard_is_an_error(tmp_path):
    """tarfile stops silently at a missing header: the scan indexed only the classes before the cut."""
    from episode_fixtures import write_tiny_shards

    from lightning_meta.data.streaming import load_stream_index
    from lightning_meta.errors import ShardError

    write_tiny_shards(tmp_path / "s")
    shards = sorted((tmp_path / "s").glob("*.tar"))
    urls = [f"pipe:cat {p}" for p in shards]
    whole = load_stream_index(urls, index="scan", retries=0, retry_delay=0.0)
    data = shards[0].read_bytes()
    cut = tmp_path / "cut"
    cut.mkdir()
    for p in shards:
        (cut / p.name).write_bytes(p.read_bytes())
    (cut / shards[0].name).write_bytes(data[: len(data) // 2 // 512 * 512])  # ends at a header boundary
    cut_urls = [f"pipe:cat {cut / p.name}" for p in shards]
    with pytest.raises(ShardError, match="before the tar end-of-archive marker"):
        load_stream_index(cut_urls, index="scan", retries=0, retry_delay=0.0)
    assert sum(c.count for c in whole.classes) == 12 * 8  # the complete set scans whole


def test_the_corrupt_sample_stop_message_states_the_rule_it_applied():
    from lightning_meta.data.faults import SampleCounter
    from lightning_meta.errors import ShardError

    counter = SampleCounter(max_fraction=0.0)
    counter.read(6)
    with warnings.catch_warnings(), pytest.raises(ShardError) as err:
        warnings.simplefilter("ignore")
        counter.skip("x", ValueError("bad"))
    assert "max_corrupt_fraction=0.0 (stop at the first one)" in str(err.value)
    assert "at least 100" not in str(err.value)


def test_mamlpp_schedule_longer_than_the_run_is_refused_before_the_data_is_set_up(tmp_path, monkeypatch, capsys):
    """The check ran at on_train_start, after the shard indices were loaded and verified."""
    from lightning_meta.cli import main
    from lightning_meta.datamodules import ShardDataModule

    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)

    def no_setup(self, stage=None):
        raise AssertionError("the datamodule was set up before the schedule check")

    monkeypatch.setattr(ShardDataModule, "setup", no_setup)
    # 1600 episodes / meta-batch 8 = 200 batches an epoch; 600 steps = 3 epochs < 5
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(root / "configs" / "mamlpp_glyphs.yaml"),
              "--model.init_args.msl_anneal_epochs", "5", "--trainer.logger", "false"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "msl_anneal_epochs=5 is longer than the 3 epoch(s)" in err
    with pytest.raises(SystemExit) as e:  # limit_train_batches shortens the epochs: 600 steps = 6 epochs of 100
        main(["fit", "--config", str(root / "configs" / "mamlpp_glyphs.yaml"), "--trainer.limit_train_batches", "100",
              "--model.init_args.first_order_epochs", "6", "--trainer.logger", "false"])
    assert e.value.code == 2 and "first_order_epochs=6 covers all 6 epoch(s)" in capsys.readouterr().err
