"""DeepSpeed strategies: registration, ZeRO-3 checks, and exact ZeRO-0/1/2/3 meta-training on CPU (gloo).

The slow tests run tests/deepspeed_script.py in subprocesses (Lightning re-launches it for rank 1)
and compare the final weights with one plain process over the same global meta-batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("deepspeed")

import lightning as L  # noqa: E402
from ports import launch_env  # noqa: E402

from lightning_meta.algorithms import ANIL, MAML, ProtoNet  # noqa: E402
from lightning_meta.backbones import MLP, Conv4  # noqa: E402
from lightning_meta.errors import MetaConfigError  # noqa: E402
from lightning_meta.strategies import (  # noqa: E402
    CPUDeepSpeedStrategy,
    DeepSpeedNotInstalledError,
    MetaDeepSpeedStrategy,
    check_zero3_compatible,
)

SCRIPT = Path(__file__).with_name("deepspeed_script.py")
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ fast tests
def test_importing_strategies_does_not_import_deepspeed():
    code = ("import sys, lightning_meta.strategies; from lightning.pytorch.strategies import StrategyRegistry; "
            "assert 'deepspeed_cpu_stage_2' in StrategyRegistry; print('deepspeed' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("name", "cls", "stage"), [
    ("deepspeed_cpu_stage_0", CPUDeepSpeedStrategy, 0),
    ("deepspeed_cpu_stage_1", CPUDeepSpeedStrategy, 1),
    ("deepspeed_cpu_stage_2", CPUDeepSpeedStrategy, 2),
    ("deepspeed_meta_stage_2", MetaDeepSpeedStrategy, 2),
    ("deepspeed_meta_stage_3", MetaDeepSpeedStrategy, 3),
])
def test_registered_names_build_the_strategy(name, cls, stage):
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = StrategyRegistry.get(name)
    assert type(strategy) is cls and strategy.zero_stage == stage
    if cls is CPUDeepSpeedStrategy:
        trainer = L.Trainer(accelerator="cpu", devices=1, strategy=name, logger=False)
        assert type(trainer.strategy) is CPUDeepSpeedStrategy and trainer.strategy.zero_stage == stage
        assert trainer.strategy.process_group_backend == "gloo"


def test_missing_deepspeed_names_the_extra(monkeypatch):
    import lightning_meta.strategies.deepspeed as mod

    monkeypatch.setattr(mod, "_DEEPSPEED_AVAILABLE", False)
    for cls in (MetaDeepSpeedStrategy, CPUDeepSpeedStrategy):
        with pytest.raises(DeepSpeedNotInstalledError, match=r"pip install lightning-meta\[deepspeed\]") as e:
            cls(stage=2)
        assert isinstance(e.value, ImportError) and isinstance(e.value, MetaConfigError)


def test_bad_stage_is_refused():
    with pytest.raises(MetaConfigError, match="stage=4"):
        CPUDeepSpeedStrategy(stage=4)


def _maml(adapt_filter="all"):
    return MAML(MLP(1, [32, 32]), task="regression", adapt_filter=adapt_filter)


def test_zero3_refuses_full_adaptation():
    for model in (_maml(), _maml("weight"), ProtoNet(Conv4(1, 8, 16))):
        with pytest.raises(MetaConfigError, match="ZeRO stage 3") as e:
            check_zero3_compatible(model)
        assert "stage 2" in str(e.value) and "adapt_filter" in str(e.value)
    strategy = MetaDeepSpeedStrategy(stage=3)
    with pytest.raises(MetaConfigError, match=r"adapts 6 of 6 parameter tensors"):
        strategy.check_meta_module(_maml())


def test_zero3_accepts_partial_adaptation_and_keeps_it_whole():
    from lightning_meta.backbones.adapters import FiLMBackbone

    assert check_zero3_compatible(_maml("head")) == ["model.head.weight", "model.head.bias"]
    first = check_zero3_compatible(_maml(r"net\.0\.|head"))  # whole layers chosen by a regular expression
    assert first == ["model.backbone.net.0.weight", "model.backbone.net.0.bias", "model.head.weight",
                     "model.head.bias"]
    for context_dim in (0, 4):  # FiLM layers own only their modulation parameters (plain or a CAVIA context)
        film = MAML(FiLMBackbone(MLP(1, [32, 32]), target=r"net\.0$", context_dim=context_dim), task="regression",
                    adapt_filter="film")
        assert check_zero3_compatible(film) == film_names(context_dim)
    # LoRA factors sit in their own module (LoRALinear.lora_factors), apart from the partitioned base weight
    from lightning_meta.backbones.adapters import LoRABackbone

    lora = MAML(LoRABackbone(MLP(1, [32, 32]), rank=2, freeze="none"), task="regression", adapt_filter="lora")
    assert check_zero3_compatible(lora) == [f"model.backbone.body.net.{i}.lora_factors.{m}" for i in (0, 2)
                                            for m in "AB"]
    anil = ANIL(MLP(1, [32, 32]), task="regression")
    strategy = MetaDeepSpeedStrategy(stage=3)
    strategy.check_meta_module(anil)
    assert strategy.config["zero_optimization"]["stage3_param_persistence_threshold"] >= 32  # head.weight [1, 32]
    # stages 0-2 accept full second-order adaptation (exact, see the slow tests)
    MetaDeepSpeedStrategy(stage=2).check_meta_module(_maml())


def test_zero3_check_reads_partitioned_sizes():
    # a second Trainer call (test after fit) checks a module ZeRO-3 already partitioned: its
    # tensors are empty and ds_numel holds the real size; reading numel() refused ANIL as 100% adapted
    anil = ANIL(MLP(1, [32, 32]), task="regression")
    for p in anil.parameters():
        p.ds_numel, p.data = p.numel(), torch.empty(0)
    assert check_zero3_compatible(anil) == ["model.head.weight", "model.head.bias"]


def film_names(context_dim: int) -> list[str]:
    layer = "model.backbone.body.net.0.modulation."
    return [layer + "context"] if context_dim else [layer + "film_scale", layer + "film_shift"]


def _zero3_refusals():
    from lightning_meta.algorithms import IMAML, MAMLPlusPlus, MetaSGD, Reptile

    head = {"task": "regression", "adapt_filter": "head"}
    return [
        # adapted tensors inside modules that also hold partitioned weights
        ("bias", lambda: _maml("bias"), r"adapt_filter='bias'\): module 'backbone.net.0' holds adapted "
                                         r"\['backbone.net.0.bias'\] next to partitioned \['backbone.net.0.weight'\]"),
        ("vmap", lambda: MAML(MLP(1, [32, 32]), task_batching="vmap", **head), r"task_batching='vmap'"),
        ("per task", lambda: ANIL(MLP(1, [32, 32]), task="regression", per_task_backward=True),
         r"per_task_backward=True\) gives wrong meta-gradients"),
        ("checkpointing", lambda: MAML(MLP(1, [32, 32]), activation_checkpointing=True, **head),
         r"activation_checkpointing=True"),
        *[(cls.__name__, lambda cls=cls: cls(MLP(1, [32, 32]), **head), rf"{cls.__name__} is not one of the learners")
          for cls in (IMAML, MAMLPlusPlus, MetaSGD)],
        # Reptile needs every trainable weight adapted: a frozen body with an adapted head
        ("Reptile", lambda: Reptile(MLP(1, [32, 32]).requires_grad_(False), **head),
         r"Reptile is not one of the learners"),
    ]


def test_zero3_refuses_unsupported_partial_adaptation():
    for label, make, message in _zero3_refusals():
        with pytest.raises(MetaConfigError, match=message) as e:
            check_zero3_compatible(make())
        assert "ZeRO stage 2" in str(e.value), label  # the fix is named
    with pytest.raises(MetaConfigError, match=r"add FiLM layers \(lightning_meta.backbones.add_film\)"):
        check_zero3_compatible(_maml("bias"))  # the ZeRO-3 alternative to BitFit is named
    # the same preset (bias) is fine with ZeRO-2
    MetaDeepSpeedStrategy(stage=2).check_meta_module(_maml("bias"))


@pytest.mark.parametrize(("adapt_filter", "message"), [("all", "ZeRO stage 3 cannot run MAML"),
                                                        ("bias", "adapt_filter='bias'")])
def test_zero3_refused_at_fit_setup(tmp_path, adapt_filter, message):
    from lightning_meta.datamodules import SinusoidDataModule

    before = {k: os.environ.get(k) for k in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    trainer = L.Trainer(accelerator="cpu", devices=1, strategy="deepspeed_cpu_stage_3", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)
    dm = SinusoidDataModule(meta_batch_size=2, train_episodes=4, val_episodes=2, eval_meta_batch_size=2)
    model = _maml(adapt_filter)
    with pytest.raises(MetaConfigError, match=message):
        trainer.fit(model, dm)
    assert trainer.global_step == 0
    # the rendezvous variables of the in-process run are restored (later DDP launches depend on it)
    assert {k: os.environ.get(k) for k in before} == before


def test_a_shard_checkpoint_is_evaluated_under_deepspeed(tmp_path):
    """test(ckpt_path=...) with a ShardDataModule: DeepSpeed's batch-size probe used to ask for the
    training loader, which a datamodule set up for test does not have."""
    from lightning_meta.datamodules import ShardDataModule

    shards = _shards(tmp_path)

    def data():
        return ShardDataModule(shards=shards, ways=3, shots=1, queries=2, eval_queries=2, meta_batch_size=2,
                               eval_meta_batch_size=2, train_episodes=4, val_episodes=2, test_episodes=2)

    kw = dict(accelerator="cpu", devices=1, strategy="deepspeed_cpu_stage_2", logger=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path, limit_val_batches=0)
    trainer = L.Trainer(max_steps=1, enable_checkpointing=False, **kw)
    trainer.fit(MAML(Conv4(1, 8, 16), ways=3, inner_lr=0.4, lr=0.01), data())
    trainer.save_checkpoint(tmp_path / "ds.ckpt")
    results = L.Trainer(**kw).test(MAML(Conv4(1, 8, 16), ways=3, inner_lr=0.4, lr=0.01), data(),
                                   ckpt_path=str(tmp_path / "ds.ckpt"))
    assert 0.0 <= results[0]["test/acc"] <= 1.0


def test_nil_validation_under_zero3_equals_plain(tmp_path, monkeypatch):
    """NIL runs the body module itself, so ZeRO-3 gathers its partitioned weights (a detached copy has none)."""
    from lightning_meta.datamodules import ShardDataModule

    # ZeRO-3 replaces torch.nn.functional.linear for the rest of the process ("persists unless manually
    # reset", DeepSpeed says), which breaks torch.compile in later tests: restore it afterwards
    monkeypatch.setattr(torch.nn.functional, "linear", torch.nn.functional.linear)

    shards = _shards(tmp_path)
    scores = {}
    for strategy in ("deepspeed_cpu_stage_3", "auto"):
        dm = ShardDataModule(shards=shards, ways=3, shots=1, queries=2, eval_queries=2, meta_batch_size=2,
                             eval_meta_batch_size=2, train_episodes=4, val_episodes=4, test_episodes=2)
        torch.manual_seed(0)
        model = ANIL(Conv4(1, 32, 16), ways=3, inner_lr=0.4, lr=0.01, eval_mode="nil")
        trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        scores[strategy] = trainer.validate(model, dm, verbose=False)[0]["val/acc"]
    assert scores["deepspeed_cpu_stage_3"] == pytest.approx(scores["auto"], abs=1e-6)



def test_cpu_strategy_runs_where_deepspeed_picked_cuda(tmp_path):
    """On a machine with a GPU, DeepSpeed's process-wide accelerator is CUDA and its engine moved the model there
    while Lightning kept deepspeed_cpu's batches on the CPU: every step failed with a device mismatch (seen on an
    H200). Faked here by installing DeepSpeed's CUDA accelerator: the strategy trains on the CPU as the plain run
    does and keeps the CPU accelerator afterwards (ZeRO-3 parameters on the CPU are gathered through it); the CUDA
    strategy installs a CUDA one again when it sets up."""
    from deepspeed.accelerator import get_accelerator, set_accelerator
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    from lightning_meta.datamodules import SinusoidDataModule

    weights = {}
    original = get_accelerator()
    try:
        for strategy in ("deepspeed_cpu_stage_2", "auto"):
            set_accelerator(CUDA_Accelerator())
            torch.manual_seed(0)
            model = MAML(MLP(1, [8]), task="regression", inner_lr=0.01, lr=0.01)
            trainer = L.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_steps=2, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                limit_val_batches=0, default_root_dir=tmp_path)
            trainer.fit(model, SinusoidDataModule(meta_batch_size=2, train_episodes=4))
            assert trainer.global_step == 2
            weights[strategy] = torch.cat([p.detach().flatten() for p in model.parameters()])
            if strategy != "auto":
                assert get_accelerator().device_name() == "cpu"
                gpu = MetaDeepSpeedStrategy(stage=2, parallel_devices=[torch.device("cuda", 0)])
                with pytest.raises(RuntimeError, match="only supported on CUDA"):  # no GPU here, after the swap
                    gpu.setup_environment()
                assert get_accelerator().device_name() == "cuda"
    finally:
        set_accelerator(original)
    assert weights["auto"].device.type == "cpu"
    torch.testing.assert_close(weights["deepspeed_cpu_stage_2"], weights["auto"], rtol=0, atol=1e-6)


def test_cpu_strategy_refuses_a_gpu_device():
    strategy = CPUDeepSpeedStrategy(stage=2, parallel_devices=[torch.device("cuda", 0)])
    with pytest.raises(MetaConfigError, match=r"cuda:0.*--trainer.accelerator cpu.*deepspeed_meta_stage_2"):
        strategy.setup_environment()


# ------------------------------------------------------------------ slow tests
def _shards(tmp_path: Path) -> str:
    from lightning_meta.data.glyphs import generate_glyphs

    out = tmp_path / "glyphs"
    generate_glyphs(out, seed=3, alphabets=6, chars_per_alphabet=(4, 5), drawings=6, size=16, splits=(4, 1, 1))
    return str(out)


def _run(algo: str, mode: str, world: int, out: Path, shards: str = "") -> dict:
    env = launch_env()
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, str(SCRIPT), algo, mode, str(world), str(out), shards], env=env,
                          capture_output=True, text=True, timeout=600, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = np.load(out)
    return {k: data[k] for k in data.files}


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "mode"), [("maml", "zero2"), ("maml", "zero1"), ("anil", "zero2"),
                                            ("protonet", "zero2")])
def test_zero_two_ranks_equal_one_plain_rank(tmp_path, algo, mode):
    shards = _shards(tmp_path) if algo == "protonet" else ""
    one = _run(algo, "plain", 1, tmp_path / "one" / "w.npz", shards)
    two = _run(algo, mode, 2, tmp_path / "two" / "w.npz", shards)
    assert int(one["world"]) == 1 and int(two["world"]) == 2
    assert int(one["step"]) == int(two["step"]) == 6
    assert one["weights"].shape == two["weights"].shape
    np.testing.assert_allclose(two["weights"], one["weights"], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("algo", "world"), [("anil", 1), ("mamlhead", 1), ("anil", 2), ("mamlhead", 2),
                                             ("mamlfirst", 2), ("film", 2), ("cavia", 2), ("lora", 2)])
def test_zero3_partial_adaptation_equals_one_plain_rank(tmp_path, algo, world):
    # ZeRO-3 keeps the adapted whole modules unpartitioned and strips their hooks; the rest is partitioned
    one = _run(algo, "plain", 1, tmp_path / "one" / "w.npz")
    zero3 = _run(algo, "zero3", world, tmp_path / "z3" / "w.npz")
    assert int(zero3["world"]) == world and int(one["step"]) == int(zero3["step"]) == 6
    assert np.abs(one["weights"] - one["init"]).max() > 1e-2  # training moved the weights
    np.testing.assert_allclose(zero3["init"], one["init"], rtol=0, atol=0)
    np.testing.assert_allclose(zero3["weights"], one["weights"], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_zero3_validation_and_resume_equal_one_plain_rank(tmp_path):
    # validation adapts with the partitioned body left attached (MAML.split_parameters(detach=True))
    one = _run("mamlhead", "plain_val", 1, tmp_path / "one" / "w.npz")
    val = _run("mamlhead", "zero3_val", 2, tmp_path / "val" / "w.npz")
    assert np.isfinite(one["val"]) and abs(float(val["val"]) - float(one["val"])) < 1e-5
    np.testing.assert_allclose(val["weights"], one["weights"], rtol=0, atol=1e-5)
    resumed = _run("mamlhead", "zero3_resume", 2, tmp_path / "resume" / "w.npz")
    assert int(resumed["step"]) == 6 and (tmp_path / "resume" / "ckpt" / "step=3.ckpt" / "checkpoint").is_dir()
    np.testing.assert_allclose(resumed["weights"], one["weights"], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "world"), [("zero3_evalckpt", 1), ("zero3_evalckpt", 2), ("zero2_evalckpt", 2)])
def test_validate_from_a_deepspeed_checkpoint_equals_plain(tmp_path, mode, world):
    # DeepSpeed's inference engine cannot load ZeRO-3 weights (they live in the optimizer
    # partitions); the strategy rebuilds them, so validation scores equal a plain checkpoint's
    one = _run("mamlhead", "plain_evalckpt", 1, tmp_path / "one" / "w.npz")
    ds = _run("mamlhead", mode, world, tmp_path / "ds" / "w.npz")
    assert int(ds["world"]) == world and (tmp_path / "ds" / "ckpt" / "step=3.ckpt").exists()
    assert np.abs(one["weights"] - one["init"]).max() > 1e-3  # the checkpoint holds trained weights
    np.testing.assert_allclose(ds["weights"], one["weights"], rtol=0, atol=1e-5)
    assert np.isfinite(one["val"]) and abs(float(ds["val"]) - float(one["val"])) < 1e-5


@pytest.mark.slow
def test_vit_lora_config_runs_under_zero3(tmp_path):
    # configs/vit_lora_zero2.yaml (LoRA factors + head adapt) shrunk for CPU, under ZeRO-3: fit, then test
    vit = "--model.init_args.backbone.init_args.backbone.init_args."
    args = [sys.executable, "-c", "from lightning_meta.cli import console_main; console_main()", "fit",
            "--config", str(ROOT / "configs" / "vit_lora_zero2.yaml"),
            "--trainer.accelerator", "cpu", "--trainer.strategy", "deepspeed_cpu_stage_3", vit + "dim", "32",
            vit + "depth", "2", vit + "heads", "2", "--trainer.fast_dev_run", "2", "--trainer.enable_progress_bar",
            "false"]
    env = launch_env()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "keeping the" in out and "adapted parameter tensors unpartitioned" in out and "meta-test acc" in out


@pytest.mark.slow
def test_zero3_refuses_to_evaluate_a_checkpoint_of_another_stage(tmp_path):
    out = tmp_path / "w.npz"
    env = launch_env()
    proc = subprocess.run([sys.executable, str(SCRIPT), "mamlhead", "zero2_evalckpt3", "1", str(out)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode != 0 and not out.exists()
    assert "is not a ZeRO-3 DeepSpeed checkpoint folder" in proc.stderr
    assert "load_full_weights=True" in proc.stderr  # the fix is named


@pytest.mark.slow
def test_per_task_backward_needs_and_gets_the_boundary(tmp_path):
    one = _run("maml", "plain", 1, tmp_path / "one" / "w.npz")
    per_task = _run("maml", "zero2_pertask", 2, tmp_path / "pt" / "w.npz")
    np.testing.assert_allclose(per_task["weights"], one["weights"], rtol=0, atol=1e-5)
    # without set_gradient_accumulation_boundary the meta-gradient is silently wrong (DESIGN §5)
    wrong = _run("maml", "zero2_pertask_noboundary", 2, tmp_path / "nb" / "w.npz")
    assert np.abs(wrong["weights"] - one["weights"]).max() > 1e-3


@pytest.mark.slow
def test_zero2_checkpoint_resume_equals_uninterrupted(tmp_path):
    one = _run("maml", "plain", 1, tmp_path / "one" / "w.npz")
    resumed = _run("maml", "zero2_resume", 2, tmp_path / "resume" / "w.npz")
    assert int(resumed["step"]) == 6
    assert (tmp_path / "resume" / "ckpt" / "step=3.ckpt" / "checkpoint").is_dir()  # a DeepSpeed checkpoint folder
    np.testing.assert_allclose(resumed["weights"], one["weights"], rtol=0, atol=1e-5)


def test_config_runs_with_registered_strategy_name(tmp_path, monkeypatch):
    from lightning_meta.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(ROOT / "configs" / "deepspeed_cpu_maml_sinusoid.yaml"),
                "--trainer.strategy", "deepspeed_cpu_stage_1", "--trainer.fast_dev_run", "1",
                "--data.init_args.meta_batch_size", "2", "--data.init_args.eval_meta_batch_size", "2",
                "--trainer.enable_progress_bar", "false", "--test_after_fit", "false"])
    assert type(cli.trainer.strategy) is CPUDeepSpeedStrategy and cli.trainer.strategy.zero_stage == 1
    assert cli.trainer.global_step == 1
