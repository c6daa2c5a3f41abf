"""Re-evaluate a MAML sinusoid checkpoint independently of the library's evaluation path.

Plain float64 PyTorch: the MLP forward is written out by hand, each test task is fine-tuned with
explicit SGD steps (``torch.autograd.grad``) on its K support points, and the MSE on the query
points is recorded after 1, 5 and 10 steps. The test tasks are the ones ``lightning-meta test``
uses (``SinusoidDataModule``'s fixed test split), so the means must equal the library's
``test/mse_step{1,5,10}``; the script also prints the median and the tasks whose error after
10 steps exceeds ``--diverged`` (their support inputs and largest |y|), which shows whether a
large mean comes from a few diverging tasks.

``--tasks N --data-seed S`` evaluates on N fresh tasks drawn with another data seed instead of
the fixed 600: a low-noise estimate of the checkpoint's expected error, which tells a hard
600-task test set apart from a worse model. Tasks are fine-tuned in batches (each task has its
own copy of the weights; the batched loss is a sum of per-task losses, so autograd gives each task
its own gradient).

Example (numbers in benchmarks/sinusoid_reproduction.md)::

    OMP_NUM_THREADS=1 python benchmarks/sinusoid_reeval.py \\
        lightning_logs/maml_sinusoid/version_0/checkpoints/epoch=6-step=70000.ckpt --inner-lr 0.01 --shots 5
"""

from __future__ import annotations

import argparse
import math

import torch

from lightning_meta.algorithms import MAML
from lightning_meta.backbones import MLP
from lightning_meta.datamodules import SinusoidDataModule

REPORT = (1, 5, 10)


def batched_mlp_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ReLU MLP (last layer linear) for a batch of tasks: every parameter has a leading task dimension.

    ``params`` maps the Linear layers' ``.weight``/``.bias`` names, in order, to ``[tasks, ...]`` tensors;
    ``x`` is ``[tasks, points, in_features]``.
    """
    layers = [name[: -len(".weight")] for name in params if name.endswith(".weight")]
    h = x
    for i, layer in enumerate(layers):
        h = torch.baddbmm(params[layer + ".bias"].unsqueeze(1), h, params[layer + ".weight"].transpose(1, 2))
        if i < len(layers) - 1:
            h = torch.relu(h)
    return h


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a MAML checkpoint of configs/maml_sinusoid.yaml (1-40-40-1 MLP)")
    p.add_argument("--inner-lr", type=float, required=True, help="the run's inner learning rate")
    p.add_argument("--shots", type=int, default=5, help="K support points per test task (default 5)")
    p.add_argument("--hidden", type=int, nargs="+", default=[40, 40])
    p.add_argument("--diverged", type=float, default=5.0, help="print tasks whose 10-step MSE exceeds this")
    p.add_argument("--tasks", type=int, default=600, help="test tasks (default 600, the library's test split)")
    p.add_argument("--data-seed", type=int, default=0, help="the data module's seed (0: the library's test tasks)")
    args = p.parse_args()
    torch.set_num_threads(1)

    model = MAML(MLP(1, args.hidden), task="regression")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    init = {k: v.detach().double() for k, v in model.model.named_parameters()}

    dm = SinusoidDataModule(shots=10, queries=10, eval_shots=args.shots, eval_queries=100,
                            test_episodes=args.tasks, seed=args.data_seed)
    dm.setup("test")
    errors: dict[int, list[float]] = {s: [] for s in REPORT}
    for batch in dm.test_dataloader():
        sx, sy, qx, qy = (t.double() for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))
        n = sx.shape[0]
        fast = {k: v.expand(n, *v.shape).clone().requires_grad_(True) for k, v in init.items()}
        for step in range(1, max(REPORT) + 1):
            per_task = ((batched_mlp_forward(fast, sx) - sy) ** 2).flatten(1).mean(1)
            grads = torch.autograd.grad(per_task.sum(), list(fast.values()))
            fast = {k: (v - args.inner_lr * g).detach().requires_grad_(True)
                    for (k, v), g in zip(fast.items(), grads, strict=True)}
            if step in errors:
                with torch.no_grad():
                    errors[step].extend(((batched_mlp_forward(fast, qx) - qy) ** 2).flatten(1).mean(1).tolist())
        for b in range(n):
            last = errors[max(REPORT)][-n + b]
            if last > args.diverged:
                xs = [round(v, 2) for v in sorted(sx[b].flatten().tolist())]
                print(f"task {len(errors[max(REPORT)]) - n + b}: 10-step MSE {last:.3g}; support x {xs}, "
                      f"max |y| {sy[b].abs().max().item():.2f}")
    print(f"| steps | tasks | mean MSE ± 95% CI | median | tasks above {args.diverged:g} |")
    print("|---|---|---|---|---|")
    for step, values in errors.items():
        t = torch.tensor(values)
        ci = 1.96 * t.std().item() / math.sqrt(len(values))
        print(f"| {step} | {len(values)} | {t.mean().item():.4g} ± {ci:.3g} | {t.median().item():.4g} | "
              f"{int((t > args.diverged).sum())} |")


if __name__ == "__main__":
    main()
