"""Slurm: settings checked before any process group starts, and a faked ``srun`` job preempted, requeued and resumed.

The slow test runs the real command (``python -m lightning_meta fit`` with the
configs/slurm/trainer_slurm.yaml overlay) as two processes carrying the environment variables
``srun`` gives the tasks of a one-node, two-task job, with a stub ``scontrol`` first on ``PATH``.
Callbacks from tests/slurm_script.py hold both ranks at a known step until the test has sent
them SIGUSR1, and record what each rank saw.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ports import free_port

from lightning_meta.cli import check_slurm_settings, main
from lightning_meta.errors import MetaConfigError

ROOT = Path(__file__).resolve().parents[1]
OVERLAY = ROOT / "configs" / "slurm" / "trainer_slurm.yaml"
JOB_ID = "7770042"
#: variables that would make Lightning pick another cluster environment (torchrun) or a stale rank
FOREIGN = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID",
           "MASTER_ADDR", "MASTER_PORT")

TINY = """\
seed_everything: 0
test_after_fit: false
trainer:
  max_steps: {max_steps}
  limit_val_batches: 0
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  deterministic: true
model:
  class_path: lightning_meta.algorithms.MAML
  init_args:
    backbone:
      class_path: lightning_meta.backbones.MLP
      init_args: {{in_features: 1, hidden: [16, 16]}}
    task: regression
    inner_lr: 0.01
    inner_steps: 2
    lr: 0.01
data:
  class_path: lightning_meta.datamodules.SinusoidDataModule
  init_args: {{meta_batch_size: 4, train_episodes: 32, val_episodes: 4, eval_meta_batch_size: 2}}
"""


def _tiny_config(folder: Path, max_steps: int = 12) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(TINY.format(max_steps=max_steps))
    return path


def _slurm_vars(ntasks_per_node: int, nnodes: int, procid: int = 0, name: str = "lightning-meta") -> dict[str, str]:
    """What ``srun`` sets for task ``procid`` of a job with ``nnodes`` x ``ntasks_per_node`` tasks."""
    return {
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": name, "SLURM_NTASKS": str(ntasks_per_node * nnodes),
        "SLURM_NTASKS_PER_NODE": str(ntasks_per_node), "SLURM_NNODES": str(nnodes), "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % ntasks_per_node), "SLURM_NODEID": str(procid // ntasks_per_node),
        "SLURM_NODELIST": "localhost",
    }


@pytest.fixture
def fake_slurm(monkeypatch):
    """Sets the Slurm variables of one task in this process; returns a function taking ``_slurm_vars``' arguments."""
    for k in list(os.environ):
        if k.startswith("SLURM_") or k in FOREIGN:
            monkeypatch.delenv(k)

    def apply(*args, **kwargs) -> None:
        for k, v in _slurm_vars(*args, **kwargs).items():
            monkeypatch.setenv(k, v)

    return apply


# ------------------------------------------------------------------------------------ mismatched settings
def _cli_fails(tmp_path, capsys, monkeypatch, *overrides: str) -> str:
    import lightning as L

    def no_fit(*args, **kwargs):
        raise AssertionError("Trainer.fit was reached: the settings were not checked before training")

    def no_group(*args, **kwargs):
        raise AssertionError("a process group was started before the settings were checked")

    monkeypatch.setattr(L.Trainer, "fit", no_fit)
    # a test run earlier in this process may have left DeepSpeed's group behind, so spy on the call
    monkeypatch.setattr(torch.distributed, "init_process_group", no_group)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(_tiny_config(tmp_path)), "--config", str(OVERLAY), "--trainer.accelerator", "cpu",
              "--trainer.default_root_dir", str(tmp_path / "run"), *overrides])
    assert e.value.code == 2  # refused, and no_group above proves no process group was started
    return capsys.readouterr().err


@pytest.mark.parametrize(("devices", "strategy"), [("1", "ddp"), ("1", "auto"), ("4", "ddp")])
def test_devices_must_equal_ntasks_per_node(tmp_path, capsys, monkeypatch, fake_slurm, devices, strategy):
    # ("1", "auto"): Lightning has no launcher then and would let both tasks train side by side unchecked
    fake_slurm(ntasks_per_node=2, nnodes=1)
    err = _cli_fails(tmp_path, capsys, monkeypatch, "--trainer.devices", devices, "--trainer.strategy", strategy)
    assert err.startswith("lightning-meta: error: ") and "Traceback" not in err
    assert "--ntasks-per-node=2" in err and f"devices={devices}" in err
    assert "--trainer.devices 2" in err  # the fix


def test_num_nodes_must_equal_slurm_nodes(tmp_path, capsys, monkeypatch, fake_slurm):
    fake_slurm(ntasks_per_node=2, nnodes=2)  # procid 0: a non-zero global rank would silence rank-zero logs later
    err = _cli_fails(tmp_path, capsys, monkeypatch, "--trainer.devices", "2", "--trainer.num_nodes", "1",
                     "--trainer.strategy", "ddp")
    assert "--nodes=2" in err and "num_nodes=1" in err and "--trainer.num_nodes 2" in err


def test_ntasks_without_ntasks_per_node(tmp_path, capsys, monkeypatch, fake_slurm):
    fake_slurm(ntasks_per_node=2, nnodes=1)
    monkeypatch.delenv("SLURM_NTASKS_PER_NODE")
    err = _cli_fails(tmp_path, capsys, monkeypatch, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert "SLURM_NTASKS=2" in err and "--ntasks-per-node" in err


def test_lightning_alone_checks_only_when_its_ddp_launcher_starts(fake_slurm):
    """Why the CLI checks itself: Lightning builds both Trainers without a word."""
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    fake_slurm(ntasks_per_node=2, nnodes=1)
    single = L.Trainer(accelerator="cpu", devices=1, logger=False)  # two tasks would both train as rank 0
    assert single.strategy.launcher is None
    ddp = L.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False)
    assert isinstance(ddp.strategy.cluster_environment, SLURMEnvironment)
    with pytest.raises(ValueError, match="ntasks-per-node=2"):  # only inside trainer.fit, as a traceback
        ddp.strategy.launcher.launch(lambda: None)
    with pytest.raises(MetaConfigError, match="devices=1"):
        check_slurm_settings(single.num_devices, single.num_nodes)


def test_matching_settings_pass_and_use_slurm(tmp_path, monkeypatch, fake_slurm):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    fake_slurm(ntasks_per_node=2, nnodes=1)
    monkeypatch.chdir(tmp_path)

    def no_group(*args, **kwargs):
        raise AssertionError("building the Trainer started a process group")

    monkeypatch.setattr(torch.distributed, "init_process_group", no_group)
    cli = main(["--config", str(_tiny_config(tmp_path)), "--config", str(OVERLAY), "--trainer.accelerator", "cpu",
                "--trainer.devices", "2", "--trainer.num_nodes", "1", "--trainer.strategy", "ddp",
                "--trainer.default_root_dir", str(tmp_path / "run")], run=False)
    env = cli.trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and not env.auto_requeue
    assert cli.trainer.world_size == 2 and cli.trainer.num_devices == 2


def test_no_check_outside_slurm_or_in_interactive_jobs(fake_slurm):
    check_slurm_settings(num_devices=3, num_nodes=5)  # no Slurm variables: nothing to compare
    fake_slurm(ntasks_per_node=2, nnodes=1, name="interactive")  # Lightning's opt-out for hand-launched processes
    check_slurm_settings(num_devices=3, num_nodes=5)
    os.environ["SLURM_JOB_NAME"] = "train"  # fake_slurm's monkeypatch restores it
    with pytest.raises(MetaConfigError, match="num_nodes=5"):
        check_slurm_settings(num_devices=2, num_nodes=5)


# ---------------------------------------------------------------------------------------------- fake srun
def _srun(tmp: Path, run_dir: Path, out: Path, hold_at: int | None = None) -> list[subprocess.Popen]:
    """Starts the two tasks of the job; ``hold_at``: hold both ranks at that step (see slurm_script.Hold)."""
    out.mkdir(parents=True)
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in FOREIGN}
    base.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                PATH=f"{tmp / 'bin'}{os.pathsep}{os.environ['PATH']}",
                PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "lightning_meta", "fit", "--config", str(tmp / "tiny.yaml"), "--config", str(OVERLAY),
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.num_nodes", "1",
           "--trainer.strategy", "ddp", "--trainer.default_root_dir", str(run_dir),
           "--trainer.callbacks+=slurm_script.Record", f"--trainer.callbacks.folder={out}"]
    if hold_at is not None:
        cmd += ["--trainer.callbacks+=slurm_script.Hold", f"--trainer.callbacks.at_step={hold_at}",
                f"--trainer.callbacks.folder={out}"]
    procs = []
    for rank in range(2):
        log = open(out / f"task{rank}.log", "w")  # noqa: SIM115 - closed by _wait
        procs.append(subprocess.Popen(cmd, env={**base, **_slurm_vars(2, 1, rank, name="meta-train")}, cwd=tmp,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs: list[subprocess.Popen], out: Path, timeout: float = 300) -> dict[int, dict]:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    logs = "\n".join((out / f"task{r}.log").read_text()[-3000:] for r in range(2))
    assert [p.returncode for p in procs] == [0, 0], logs
    return {r: dict(np.load(out / f"rank{r}.npz")) for r in range(2)}


@pytest.mark.slow
def test_fake_srun_preempt_requeue_resume(tmp_path):
    (tmp_path / "bin").mkdir()
    requeued = tmp_path / "scontrol_calls.txt"
    stub = tmp_path / "bin" / "scontrol"
    stub.write_text(f'#!/bin/sh\necho "task=$SLURM_PROCID $*" >> {requeued}\n')
    stub.chmod(0o755)
    _tiny_config(tmp_path, max_steps=12)  # 8 meta-batches per epoch: preempted at step 6, the resume crosses an epoch
    run = tmp_path / "run"

    # 1. the job runs; SIGUSR1 reaches both tasks while they are in training step 5
    procs = _srun(tmp_path, run, tmp_path / "first", hold_at=5)
    deadline = time.monotonic() + 300
    while not all((tmp_path / "first" / f"rank{r}.held").exists() for r in range(2)):
        assert all(p.poll() is None for p in procs), (tmp_path / "first" / "task0.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the tasks never reached step 5"
        time.sleep(0.1)
    for p in procs:
        os.kill(p.pid, signal.SIGUSR1)
    first = _wait(procs, tmp_path / "first")
    for r in range(2):
        assert str(first[r]["env"]) == "SLURMEnvironment" and bool(first[r]["detected"])  # detected as a Slurm job
        assert not bool(first[r]["auto_requeue"]) and int(first[r]["world"]) == 2
        assert int(first[r]["first_step"]) == 0 and int(first[r]["last_step"]) == 6  # stopped after the step
    np.testing.assert_array_equal(first[0]["weights"], first[1]["weights"])
    assert sorted(p.name for p in run.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]
    assert torch.load(run / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)["global_step"] == 6
    assert requeued.read_text().splitlines() == [f"task=0 requeue {JOB_ID}"]  # exactly one requeue, by rank 0

    # 2. Slurm requeues the job: the same command resumes from hpc_ckpt_1.ckpt by itself and finishes
    resumed = _wait(_srun(tmp_path, run, tmp_path / "second"), tmp_path / "second")
    for r in range(2):
        assert Path(str(resumed[r]["ckpt_path"])).name == "hpc_ckpt_1.ckpt"
        assert int(resumed[r]["first_step"]) == 6 and int(resumed[r]["last_step"]) == 12
    assert len(requeued.read_text().splitlines()) == 1  # no signal, no further requeue

    # 3. the same job never preempted ends with the same weights
    full = _wait(_srun(tmp_path, tmp_path / "full_run", tmp_path / "full"), tmp_path / "full")
    assert int(full[0]["first_step"]) == 0 and int(full[0]["last_step"]) == 12
    assert np.abs(full[0]["weights"] - first[0]["weights"]).max() > 1e-4  # steps 6..12 changed the weights
    np.testing.assert_allclose(resumed[0]["weights"], full[0]["weights"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(resumed[1]["weights"], full[0]["weights"], rtol=0, atol=1e-6)
