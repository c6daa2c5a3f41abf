"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio and Vinyals, 2020)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_meta.algorithms.base import TaskKind
from lightning_meta.algorithms.maml import MAML, EvalMode
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional import BNPolicy, Params, inner_adapt
from lightning_meta.functional.inner_loop import PER_STEP_POLICIES

__all__ = ["ANIL"]


def _strip(params: Params, prefix: str) -> Params:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


class ANIL(MAML):
    """MAML where only the linear head adapts; the body is learned in the outer loop only.

    The body runs once per task on the support set and once on the query set; the inner loop
    then touches only the head, on those cached features. Its meta-gradient equals
    ``MAML(adapt_filter="head")`` (tested), at a fraction of the cost and memory, for a body
    without randomness: with dropout in the body, ANIL draws one mask per task (the features are
    computed once) where ``MAML(adapt_filter="head")`` draws one per inner step.

    The arguments are :class:`MAML`'s (described there), less ``adapt_filter`` (always the head).

    Args:
        bn: as in :class:`MAML`, but not a per-step policy: the body runs once per task, outside
            the inner loop.
        activation_checkpointing: as in :class:`MAML`; it covers only the head's inner steps.
        eval_mode: as in :class:`MAML`: ``nil`` evaluates with the paper's NIL (no inner loop, no
            head: cosine similarity of the body's features to the support set's).

    Example:
        >>> from lightning_meta.backbones import Conv4
        >>> model = ANIL(Conv4(1, 16, 28, norm="batch_no_stats"), ways=5, inner_lr=0.4, inner_steps=5)
        >>> model.adapted_names
        ['head.weight', 'head.bias']

    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int = 5,
        inner_lr: float = 0.4,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        task_batching: Literal["loop", "vmap"] = "loop",
        vmap_chunk_size: int | None = None,
        bn: BNPolicy = "transductive",
        eval_report_steps: Sequence[int] | None = None,
        task: TaskKind = "classification",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        per_task_backward: bool = False,
        activation_checkpointing: bool = False,
        eval_mode: EvalMode = "adapt",
    ) -> None:
        if bn in PER_STEP_POLICIES:
            raise MetaConfigError(
                f"ANIL with bn={bn!r}: the body runs once per task, outside the inner loop, so it has no per-step "
                "BatchNorm; use bn='transductive' or 'frozen' (or MAML / MAMLPlusPlus for per-step BatchNorm)"
            )
        super().__init__(backbone, ways=ways, inner_lr=inner_lr, inner_steps=inner_steps,
                         eval_inner_steps=eval_inner_steps, first_order=first_order, adapt_filter="head",
                         task_batching=task_batching, vmap_chunk_size=vmap_chunk_size, bn=bn,
                         eval_report_steps=eval_report_steps, task=task, lr=lr, weight_decay=weight_decay,
                         per_task_backward=per_task_backward, activation_checkpointing=activation_checkpointing,
                         eval_mode=eval_mode)
        self.save_hyperparameters(ignore=["backbone"])

    def task_query_outputs(
        self,
        adapted: Params,
        frozen: Params,
        buffers: Params,
        sx: Tensor,
        sy: Tensor,
        qx: Tensor,
        steps: int,
        first_order: bool,
        report: Sequence[int] = (),
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """Body features once per task, then a head-only inner loop on them."""
        body = (_strip(frozen, "backbone."), _strip(buffers, "backbone."))
        fs = functional_call(self.model.backbone, body, (sx,))
        fq = functional_call(self.model.backbone, body, (qx,))
        head = _strip(adapted, "head.")
        outs: dict[int, Tensor] = {}

        def monitor(step: int, fast: Params) -> None:
            if step + 1 in report:
                with torch.no_grad():
                    outs[step + 1] = functional_call(self.model.head, fast, (fq,))

        lrs = self._step_rates()
        if isinstance(lrs, dict):
            lrs = _strip(lrs, "head.")
        fast = inner_adapt(self.model.head, head, {}, fs, sy, self.loss_fn, lrs, steps, first_order,
                           callback=monitor if report else None, checkpoint=self.activation_checkpointing)
        return functional_call(self.model.head, fast, (fq,)), outs
