"""Re-evaluate a MAML sinusoid checkpoint independently of the library's evaluation path.

Plain float64 PyTorch: the MLP forward is written out by hand, each test task is fine-tuned with
explicit SGD steps (``torch.autograd.grad``) on its K support points, and the MSE on the query
points is recorded after 1, 5 and 10 steps. The test tasks are the ones ``lightning-meta test``
uses (``SinusoidDataModule``'s fixed test split), so the means must equal the library's
``test/mse_step{1,5,10}``; the script also prints the median and the tasks whose error after
10 steps exceeds ``--diverged`` (their support inputs and largest |y|), which shows whether a
large mean comes from a few diverging tasks.

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


def mlp_forward(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """ReLU MLP from a flat name -> tensor dict whose Linear layers appear in order (last one linear)."""
    layers = [name[: -len(".weight")] for name in params if name.endswith(".weight")]
    h = x
    for i, layer in enumerate(layers):
        h = h @ params[layer + ".weight"].T + params[layer + ".bias"]
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
    args = p.parse_args()
    torch.set_num_threads(1)

    model = MAML(MLP(1, args.hidden), task="regression")
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    init = {k: v.detach().double() for k, v in model.model.named_parameters()}

    dm = SinusoidDataModule(shots=10, queries=10, eval_shots=args.shots, eval_queries=100, test_episodes=600)
    dm.setup("test")
    errors: dict[int, list[float]] = {s: [] for s in REPORT}
    for batch in dm.test_dataloader():
        for b in range(batch.support_x.shape[0]):
            sx, sy, qx, qy = (t[b].double() for t in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))
            fast = {k: v.clone().requires_grad_(True) for k, v in init.items()}
            for step in range(1, max(REPORT) + 1):
                loss = ((mlp_forward(fast, sx).reshape(sy.shape) - sy) ** 2).mean()
                grads = torch.autograd.grad(loss, list(fast.values()))
                fast = {k: (v - args.inner_lr * g).detach().requires_grad_(True)
                        for (k, v), g in zip(fast.items(), grads, strict=True)}
                if step in errors:
                    with torch.no_grad():
                        errors[step].append(((mlp_forward(fast, qx).reshape(qy.shape) - qy) ** 2).mean().item())
            if errors[max(REPORT)][-1] > args.diverged:
                print(f"task {len(errors[max(REPORT)]) - 1}: 10-step MSE {errors[max(REPORT)][-1]:.3g}; support x "
                      f"{[round(v, 2) for v in sorted(sx.flatten().tolist())]}, max |y| {sy.abs().max().item():.2f}")
    print(f"| steps | tasks | mean MSE ± 95% CI | median | tasks above {args.diverged:g} |")
    print("|---|---|---|---|---|")
    for step, values in errors.items():
        t = torch.tensor(values)
        ci = 1.96 * t.std().item() / math.sqrt(len(values))
        print(f"| {step} | {len(values)} | {t.mean().item():.4g} ± {ci:.3g} | {t.median().item():.4g} | "
              f"{int((t > args.diverged).sum())} |")


if __name__ == "__main__":
    main()
