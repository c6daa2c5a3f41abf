"""Reptile (Nichol, Achiam and Schulman, 2018): move the initialisation towards task-adapted weights."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import vmap

from lightning_meta.algorithms.base import TaskKind
from lightning_meta.algorithms.maml import MAML
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional import BNPolicy, bn_policy
from lightning_meta.functional.inner_loop import PER_STEP_POLICIES

__all__ = ["Reptile"]


class Reptile(MAML):
    """Reptile: ``theta <- theta + epsilon * (mean_i theta'_i - theta)`` over the tasks of a meta-batch.

    ``theta'_i`` is the result of ``inner_steps`` plain SGD steps (step ``inner_lr``) on all of
    task ``i``'s examples (support and query). The update is expressed as the gradient
    ``theta - mean_i theta'_i`` of a surrogate loss, so that Lightning, DDP (which averages it over
    ranks: the mean over all tasks) and any optimiser apply it; with ``outer_optimizer="sgd"`` and
    ``lr = epsilon`` one step is exactly the paper's update. Evaluation adapts on the support set
    like MAML. Reptile minimises no loss; as a progress signal, the logged ``train/loss`` is the loss
    on all query examples of the meta-batch, pooled, of the task-averaged adapted weights
    ``mean_i theta'_i`` (BatchNorm batch statistics are then pooled over the tasks as well).

    The other arguments are :class:`MAML`'s (described there). Reptile has no
    ``activation_checkpointing``: its inner steps are first order and keep no graph.

    Args:
        outer_optimizer: ``sgd`` (the paper's update, ``lr`` = epsilon) or ``adam`` on the Reptile direction.
        bn: as in :class:`MAML`, but not a per-step policy: the Reptile direction never reaches
            outer-only per-step BatchNorm weights.
        adapt_filter: as in :class:`MAML`, but it must cover every trainable weight (the others would
            never train).

    Example:
        >>> from lightning_meta.backbones import MLP
        >>> m = Reptile(MLP(1, [40, 40]), task="regression", inner_lr=0.02, inner_steps=5, lr=0.1)
        >>> m.configure_optimizers().__class__.__name__
        'SGD'

    """

    # its meta-loss keeps no graph through the inner steps and reports a pooled loss: one call per batch
    _split_tasks_in_training = False

    def __init__(
        self,
        backbone: nn.Module,
        ways: int = 5,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        outer_optimizer: Literal["sgd", "adam"] = "sgd",
        adapt_filter: str = "all",
        task_batching: Literal["loop", "vmap"] = "loop",
        vmap_chunk_size: int | None = None,
        bn: BNPolicy = "transductive",
        task: TaskKind = "classification",
        lr: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        if bn in PER_STEP_POLICIES:
            raise MetaConfigError(
                f"Reptile with bn={bn!r}: per-step BatchNorm weights are outer-only and the Reptile update moves "
                "only adapted weights, so they would never train; use bn='transductive' or 'frozen'"
            )
        super().__init__(backbone, ways=ways, inner_lr=inner_lr, inner_steps=inner_steps,
                         eval_inner_steps=eval_inner_steps, first_order=True, adapt_filter=adapt_filter,
                         task_batching=task_batching, vmap_chunk_size=vmap_chunk_size, bn=bn, task=task, lr=lr,
                         weight_decay=weight_decay)
        adapted = set(self.adapted_names)
        idle = [n for n, p in self.model.named_parameters() if p.requires_grad and n not in adapted]
        if idle:
            raise MetaConfigError(
                f"Reptile with adapt_filter={adapt_filter!r}: the Reptile update theta + epsilon * (theta' - theta) "
                f"is zero for weights the inner loop does not adapt, so the trainable weights {idle[:4]}"
                f"{' ...' if len(idle) > 4 else ''} would never train; use adapt_filter='all', or freeze those "
                "weights (requires_grad=False) before building Reptile, or use MAML/ANIL, whose outer loop trains them"
            )
        if outer_optimizer not in ("sgd", "adam"):
            raise MetaConfigError(f"outer_optimizer={outer_optimizer!r} is not supported; use 'sgd' or 'adam'")
        self._refuse_hooks_training_ignores(Reptile, "its own outer update (inner steps on support and query)")
        self.save_hyperparameters(ignore=["backbone"])
        self.outer_optimizer = outer_optimizer

    def _task_weights(self, adapted, frozen, buffers, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return self._inner_loop(adapted, frozen, buffers, x, y, self.inner_steps, True)

    def meta_loss(self, batch: Episode) -> Tensor:
        """Surrogate whose gradient is ``theta - mean_i theta'_i`` (the Reptile direction)."""
        self.check_batch(batch)
        adapted, frozen = self.split_parameters()
        start = {k: v.detach() for k, v in adapted.items()}
        frozen_d = {k: v.detach() for k, v in frozen.items()}
        buffers = self.model_buffers()
        x = torch.cat([batch.support_x, batch.query_x], dim=1)
        y = torch.cat([batch.support_y, batch.query_y], dim=1)
        with bn_policy(self.model, self.bn):
            if self.task_batching == "vmap":
                fast = vmap(self._task_weights, in_dims=(None, None, None, 0, 0), randomness="different",
                            chunk_size=self.vmap_chunk_size)(start, frozen_d, buffers, x, y)
                mean_fast = {k: v.mean(0) for k, v in fast.items()}
            else:
                per_task = [self._task_weights(start, frozen_d, buffers, x[i], y[i]) for i in range(batch.num_tasks)]
                mean_fast = {k: torch.stack([f[k] for f in per_task]).mean(0) for k in start}
            with torch.no_grad():  # for logging only: query loss of the averaged weights
                out = self.forward_fast(mean_fast, frozen_d, buffers, batch.query_x.flatten(0, 1))
                self._display_loss = self.loss_fn(out, batch.query_y.flatten(0, 1))
        direction = {k: (start[k] - mean_fast[k]).detach() for k in start}
        return sum((adapted[k] * direction[k]).sum() for k in adapted)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with ``lr`` = epsilon (the paper's outer update) or Adam on the Reptile direction."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self.outer_optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
