"""The measuring tools in ``benchmarks/inner_loop.py``: its FLOP formula and its per-task meta-gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("inner_loop")


def _flops(fn, formula=None) -> int:
    mapping = {torch.ops.aten.convolution_backward: formula} if formula else None
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    with counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_backward_formula_equals_torch_without_groups(bench, transposed, stride):
    torch.manual_seed(0)
    x = torch.randn(3, 4, 9, 9, requires_grad=True)
    if transposed:
        w = torch.randn(4, 5, 3, 3, requires_grad=True)
        fn = lambda: F.conv_transpose2d(x, w, stride=stride).sum().backward()  # noqa: E731
    else:
        w = torch.randn(5, 4, 3, 3, requires_grad=True)
        fn = lambda: F.conv2d(x, w, stride=stride).sum().backward()  # noqa: E731
    ours = _flops(fn, bench.conv_backward_flops)
    assert ours == _flops(fn) > 0


def test_conv_backward_formula_counts_vmap_over_tasks_like_the_loop(bench):
    """vmap runs per-task convolutions as one grouped convolution: same work as a loop over tasks."""
    torch.manual_seed(0)
    tasks = 4
    x, w = torch.randn(tasks, 5, 3, 8, 8), torch.randn(tasks, 6, 3, 3, 3)

    def loss(w_, x_):
        return F.conv2d(x_, w_, padding=1).pow(2).sum()

    batched = _flops(lambda: vmap(grad(loss))(w, x), bench.conv_backward_flops)
    looped = _flops(lambda: [grad(loss)(w[i], x[i]) for i in range(tasks)], bench.conv_backward_flops)
    assert batched == looped > 0
    # torch's own formula counts the grouped weight gradient once per group too many
    assert _flops(lambda: vmap(grad(loss))(w, x)) > batched


def test_per_task_step_gives_the_whole_batch_meta_gradient(bench):
    """The benchmark's per-task row computes the same meta-gradient as the default row."""
    torch.manual_seed(0)
    from lightning_meta.algorithms import MAML
    from lightning_meta.backbones import MLP
    from lightning_meta.episode import Episode, collate_episodes

    def make(per_task):
        torch.manual_seed(1)
        return MAML(MLP(4, [8]), ways=3, inner_lr=0.1, inner_steps=2, per_task_backward=per_task).double()

    g = torch.Generator().manual_seed(2)
    batch = collate_episodes([
        Episode(torch.randn(6, 4, generator=g), torch.arange(3).repeat(2), torch.randn(9, 4, generator=g),
                torch.arange(3).repeat(3), torch.arange(3))
        for _ in range(3)]).to(torch.float64)
    whole, per_task, default = make(False), make(True), make(False)
    bench.one_backward_step(whole)(batch)
    bench.per_task_step(per_task)(batch)
    bench.default_step(default)(batch)  # the task-by-task gradient of the default training step
    for a, b, c in zip(whole.parameters(), per_task.parameters(), default.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-10, atol=1e-12)


def test_task_split_overhead_script_runs_and_times_three_variants():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "task_split_overhead.py"
    out = subprocess.run([sys.executable, str(script), "--meta-batch", "2", "--steps", "1", "--rounds", "1"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms per" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["per-call", "setup once", "one backward"], out
    assert rows[0].endswith("| 1.000x |")
