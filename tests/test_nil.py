"""NIL evaluation (Raghu et al. 2020, section 5): no inner loop, no head, cosine attention over the support set.

The reference below is written differently from the library: the body module is called directly
(not through ``functional_call``), the cosine similarities come from explicit norms, the softmax
from ``exp`` and a sum, and the labels are weighted with a one-hot matrix product, in
probabilities rather than log-probabilities.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from episode_fixtures import cls_batch

from lightning_meta.algorithms import ANIL, IMAML, MAML, MAMLPlusPlus, MetaSGD, Reptile
from lightning_meta.backbones import Conv4
from lightning_meta.errors import MetaConfigError

ROOT = Path(__file__).resolve().parents[1]


def reference_nil_probs(body: torch.nn.Module, sx, sy, qx, ways: int) -> torch.Tensor:
    """Class probabilities of NIL for one task, the body used as a plain module."""
    with torch.no_grad():
        fs, fq = body(sx).flatten(1), body(qx).flatten(1)
    fs = fs / fs.norm(dim=1, keepdim=True)
    fq = fq / fq.norm(dim=1, keepdim=True)
    w = torch.exp(fq @ fs.T)
    attention = w / w.sum(dim=1, keepdim=True)
    return attention @ F.one_hot(sy, ways).to(attention.dtype)


def body(norm="batch_no_stats"):
    torch.manual_seed(0)
    return Conv4(1, 8, 16, norm=norm).double()


@pytest.mark.parametrize("cls", [MAML, ANIL])
@pytest.mark.parametrize("norm", ["batch_no_stats", "batch"])
def test_nil_equals_a_written_out_reference(cls, norm):
    """bn='transductive' (the default): each set normalised with its own statistics, also in eval mode."""
    batch = cls_batch(tasks=2, ways=3, shots=2, queries=4)
    model = cls(body(norm), ways=3, eval_mode="nil").double().eval()
    out = model.query_outputs(batch)
    assert out.shape == (2, 12, 3)
    twin = copy.deepcopy(model.model.backbone).train()  # batch statistics (its running ones are not used)
    refs = [reference_nil_probs(twin, ep.support_x, ep.support_y, ep.query_x, 3) for ep in batch.tasks()]
    for i in range(2):
        torch.testing.assert_close(out[i].exp(), refs[i], rtol=0, atol=1e-12)
    acc = model.evaluate(batch)["acc"]
    expected = [(refs[i].argmax(1) == batch.query_y[i]).double().mean() for i in range(2)]
    torch.testing.assert_close(acc.double(), torch.stack(expected))


def test_nil_ignores_the_head_and_adapt_mode_does_not():
    batch = cls_batch(tasks=1, ways=3, shots=2, queries=4)
    nil = MAML(body(), ways=3, inner_lr=0.5, eval_mode="nil").double().eval()
    adapt = MAML(body(), ways=3, inner_lr=0.5).double().eval()
    adapt.load_state_dict(nil.state_dict())
    before_nil, before_adapt = nil.query_outputs(batch), adapt.query_outputs(batch)
    with torch.no_grad():
        for m in (nil, adapt):
            m.model.head.weight.mul_(-3.0).add_(0.7)
            m.model.head.bias.add_(1.0)
    torch.testing.assert_close(nil.query_outputs(batch), before_nil, rtol=0, atol=0)
    assert not torch.allclose(adapt.query_outputs(batch), before_adapt)


def test_nil_is_the_same_for_every_learner_of_the_family():
    batch = cls_batch(tasks=2, ways=3, shots=1, queries=2)
    ref = MAML(body(), ways=3, eval_mode="nil").double().eval().query_outputs(batch)
    learners = [(ANIL, {}), (MetaSGD, {}), (IMAML, {}), (Reptile, {}), (MAMLPlusPlus, {"bn": "per_step_transductive"})]
    for cls, kw in learners:
        model = cls(body(), ways=3, eval_mode="nil", **kw).double().eval()
        torch.testing.assert_close(model.query_outputs(batch), ref, rtol=0, atol=1e-12, msg=cls.__name__)


def test_training_is_unchanged_by_eval_mode():
    batch = cls_batch(tasks=2, ways=3, shots=1, queries=2)
    grads = []
    for mode in ("adapt", "nil"):
        model = MAML(body(), ways=3, inner_lr=0.5, eval_mode=mode).double().train()
        model.meta_loss(batch).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_nil_uses_the_bn_policy_frozen_running_statistics():
    batch = cls_batch(tasks=1, ways=3, shots=2, queries=3)
    model = MAML(body(norm="batch"), ways=3, bn="frozen", eval_mode="nil").double().eval()
    with torch.no_grad():  # running statistics away from (0, 1), so batch statistics would differ
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    saved = copy.deepcopy(model.state_dict())
    ep = batch.task(0)
    ref = reference_nil_probs(model.model.backbone.eval(), ep.support_x, ep.support_y, ep.query_x, 3)
    torch.testing.assert_close(model.query_outputs(batch)[0].exp(), ref, rtol=0, atol=1e-12)
    for k, v in model.state_dict().items():  # evaluation leaves the running statistics alone
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)


def test_nil_with_per_step_batchnorm_uses_the_first_step():
    """MAML++'s per-step BatchNorm: NIL normalises with the first inner step's running statistics and weights."""
    batch = cls_batch(tasks=1, ways=3, shots=2, queries=3)
    model = MAMLPlusPlus(body(norm="batch"), ways=3, inner_steps=3, bn="per_step", eval_mode="nil").double().eval()
    plain = body(norm="batch").eval()
    with torch.no_grad():
        pairs = [(a, b) for a, b in zip(model.model.backbone.modules(), plain.modules(), strict=True)]
        for per_step, bn in ((a, b) for a, b in pairs if isinstance(b, torch.nn.BatchNorm2d)):
            per_step.running_mean.uniform_(-0.5, 0.5)
            per_step.running_var.uniform_(0.5, 2.0)
            per_step.weight.uniform_(0.5, 1.5)
            per_step.bias.uniform_(-0.2, 0.2)
            bn.running_mean.copy_(per_step.running_mean[0])
            bn.running_var.copy_(per_step.running_var[0])
            bn.weight.copy_(per_step.weight[0])
            bn.bias.copy_(per_step.bias[0])
        for a, b in pairs:
            if isinstance(b, torch.nn.Conv2d):
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
    ep = batch.task(0)
    ref = reference_nil_probs(plain, ep.support_x, ep.support_y, ep.query_x, 3)
    torch.testing.assert_close(model.query_outputs(batch)[0].exp(), ref, rtol=0, atol=1e-12)


def test_nil_evaluates_another_number_of_ways_than_training():
    model = ANIL(body(), ways=5, eval_mode="nil").double().eval()
    batch = cls_batch(tasks=2, ways=3, shots=2, queries=2)
    assert model.evaluate(batch)["acc"].shape == (2,)
    assert model.predict_step(batch, 0)["labels"].max() <= 2
    with pytest.raises(MetaConfigError, match="3-way"):  # the inner loop needs the head's ways
        ANIL(body(), ways=5).double().eval().evaluate(batch)
    model.train()
    with pytest.raises(MetaConfigError, match="3-way"):  # training still adapts the 5-way head
        model.meta_loss(batch)


@pytest.mark.parametrize("kwargs, message", [
    ({"eval_mode": "none"}, "eval_mode='none' is not supported"),
    ({"eval_mode": "nil", "task": "regression"}, "needs task='classification'"),
    ({"eval_mode": "nil", "eval_report_steps": [1]}, "drop eval_report_steps"),
])
def test_bad_eval_mode_is_refused_at_construction(kwargs, message):
    with pytest.raises(MetaConfigError, match=message):
        MAML(body(), ways=3, **kwargs)


def test_nil_from_the_command_line_on_another_way(tmp_path, monkeypatch):
    from lightning_meta.cli import main

    monkeypatch.chdir(tmp_path)
    cli = main(["fit", "--config", str(ROOT / "configs" / "anil_glyphs.yaml"), "--trainer.fast_dev_run", "1",
                "--data.init_args.meta_batch_size", "2", "--data.init_args.eval_meta_batch_size", "2",
                "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
                "--model.init_args.eval_mode", "nil", "--data.init_args.eval_ways", "3"])
    assert cli.model.eval_mode == "nil" and cli.model.ways == 5
    result = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    assert 0.0 <= result["test/acc"] <= 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nil_with_low_precision_weights_and_running_statistics(dtype):
    """bf16-true / fp16 weights with bn='frozen': the body runs with its own-dtype buffers (was a dtype clash)."""
    batch = cls_batch(tasks=2, ways=3, shots=2, queries=3, dtype=torch.float32)
    full = MAML(body(norm="batch").float(), ways=3, bn="frozen", eval_mode="nil").eval()
    low = copy.deepcopy(full).to(dtype)
    ref = full.query_outputs(batch).exp()
    out = low.query_outputs(batch.to(dtype)).exp()
    assert out.dtype == torch.float32  # the cosine attention runs in float32
    torch.testing.assert_close(out, ref, rtol=0, atol=0.05)


def test_nil_in_training_mode_evaluates_and_restores_the_mode():
    """Called in training mode, NIL still evaluates: MAML++'s per-step statistics are not collected."""
    batch = cls_batch(tasks=1, ways=3, shots=2, queries=3)
    model = MAMLPlusPlus(body(norm="batch"), ways=3, inner_steps=2, bn="per_step", eval_mode="nil").double()
    saved = copy.deepcopy(model.state_dict())
    model.train()
    train_out = model.nil_query_outputs(batch)
    assert model.training and model.model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    torch.testing.assert_close(train_out, model.eval().nil_query_outputs(batch), rtol=0, atol=0)


def test_command_line_model_settings_win_over_the_checkpoints(tmp_path, monkeypatch):
    """``test --ckpt_path CKPT --model.init_args.eval_mode nil``: Lightning loads the checkpoint's hyperparameters
    after parsing and let them override the command line, so NIL (or another eval_inner_steps) was silently
    not used. The command line wins now; a config file still gives way to the checkpoint, as in Lightning."""
    from lightning_meta.cli import main

    monkeypatch.chdir(tmp_path)
    quiet = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
             "--data.init_args.meta_batch_size", "2", "--data.init_args.eval_meta_batch_size", "2"]
    config = str(ROOT / "configs" / "anil_glyphs.yaml")  # inner_lr 0.4, eval_inner_steps 10, eval_mode adapt
    fit = main(["fit", "--config", config, "--trainer.fast_dev_run", "1", "--model.init_args.inner_lr", "0.3", *quiet])
    fit.trainer.save_checkpoint(tmp_path / "anil.ckpt")
    cli = main(["test", "--config", config, "--ckpt_path", str(tmp_path / "anil.ckpt"), "--trainer.limit_test_batches",
                "2", "--model.init_args.eval_mode", "nil", "--model.eval_inner_steps", "3",
                "--data.init_args.eval_ways", "3", *quiet])
    assert (cli.model.eval_mode, cli.model.eval_inner_steps) == ("nil", 3)  # the command line's
    assert cli.model.inner_lr == 0.3  # the checkpoint's, over the config file's 0.4
    assert 0.0 <= cli.trainer.callback_metrics["test/acc"] <= 1.0  # 3-way episodes: only NIL can test them

    # the class written another way, values as a JSON mapping
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main(["test", "--config", config, "--ckpt_path", str(tmp_path / "anil.ckpt"),
                    "--trainer.limit_test_batches", "1", "--model", "lightning_meta.algorithms.anil.ANIL",
                    "--model.init_args", '{"eval_mode": "nil", "eval_inner_steps": 4}', *quiet])
    assert (type(cli.model).__name__, cli.model.eval_mode, cli.model.eval_inner_steps) == ("ANIL", "nil", 4)
    assert not [w for w in caught if "holds a" in str(w.message)]  # the same class: no warning
    # a checkpoint of another class: built as the checkpoint's class (Lightning's rule), with a warning;
    # the command line's values that class takes are kept
    maml = str(ROOT / "configs" / "maml_glyphs.yaml")
    with pytest.warns(UserWarning, match=r"holds a lightning_meta\.algorithms\.ANIL model, not the configured"):
        cli = main(["test", "--config", maml, "--ckpt_path", str(tmp_path / "anil.ckpt"),
                    "--trainer.limit_test_batches", "1", "--model.init_args.eval_mode", "nil", *quiet])
    assert (type(cli.model).__name__, cli.model.eval_mode) == ("ANIL", "nil")


@pytest.mark.parametrize("argv, keys", [
    (["--model.init_args.eval_mode", "nil"], {"eval_mode"}),
    (["--model.eval_mode=nil", "--model.eval_inner_steps", "3"], {"eval_mode", "eval_inner_steps"}),
    (["--model.init_args", '{"eval_mode": "nil", "lr": 0.1}'], {"eval_mode", "lr"}),
    (["--model.init_args={lr: 0.1}"], {"lr"}),
    (["--model", '{"class_path": "ANIL", "init_args": {"eval_mode": "nil"}}'], {"eval_mode"}),
    (["--model", "ANIL", "--model.init_args.backbone.init_args.hidden", "8"], {"backbone"}),
    (["--model", "model.yaml"], set()),  # a config file: the checkpoint's values win over it
    (["--modelx", "1", "--data.init_args.ways", "3"], set()),
])
def test_model_arguments_found_on_the_command_line(argv, keys):
    from types import SimpleNamespace

    from lightning_meta.cli import MetaCLI, _command_line_tokens

    assert MetaCLI._model_args_on_command_line(SimpleNamespace(_argv=_command_line_tokens(argv))) == keys


def test_arguments_given_as_a_mapping_are_not_a_command_line():
    from jsonargparse import Namespace

    from lightning_meta.cli import _command_line_tokens

    assert _command_line_tokens({"model": {"init_args": {"eval_mode": "nil"}}}) == []
    assert _command_line_tokens(Namespace(model=Namespace(eval_mode="nil"))) == []  # was a crash
