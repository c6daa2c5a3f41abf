"""Meta-SGD (Li, Zhou, Chen and Li, 2017): learn the initialisation and a per-parameter inner step size."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from lightning_meta.algorithms.base import TaskKind
from lightning_meta.algorithms.maml import MAML, EvalMode, parameter_keys
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional import BNPolicy, Params

__all__ = ["MetaSGD"]


class MetaSGD(MAML):
    """MAML whose inner update is ``theta - alpha * grad`` with ``alpha`` a learned tensor per parameter.

    ``alpha`` has the shape of each adapted parameter, starts at ``inner_lr`` (or uniformly in
    ``init_range`` when given, as in the paper's [0.005, 0.1]) and is meta-learned with the
    initialisation by the outer optimiser. It is unconstrained, as in the paper.

    The other arguments are :class:`MAML`'s (described there).

    Args:
        init_range: optional ``(low, high)`` for a uniform initialisation of ``alpha``.

    Example:
        >>> from lightning_meta.backbones import MLP
        >>> m = MetaSGD(MLP(1, [40, 40]), task="regression", inner_lr=0.01)
        >>> sorted(m.inner_lrs())[:2], round(m.inner_lrs()["head.bias"].item(), 6)
        (['backbone.net.0.bias', 'backbone.net.0.weight'], 0.01)

    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int = 5,
        inner_lr: float = 0.01,
        init_range: tuple[float, float] | None = None,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        adapt_filter: str = "all",
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
        super().__init__(backbone, ways=ways, inner_lr=inner_lr, inner_steps=inner_steps,
                         eval_inner_steps=eval_inner_steps, first_order=first_order, adapt_filter=adapt_filter,
                         task_batching=task_batching, vmap_chunk_size=vmap_chunk_size, bn=bn,
                         eval_report_steps=eval_report_steps, task=task, lr=lr, weight_decay=weight_decay,
                         per_task_backward=per_task_backward, activation_checkpointing=activation_checkpointing,
                         eval_mode=eval_mode)
        if init_range is not None:
            bounds = list(init_range)
            if len(bounds) != 2 or not 0 <= bounds[0] < bounds[1] < math.inf:
                raise MetaConfigError(
                    f"init_range={bounds} must be two numbers [low, high] with 0 <= low < high (the Meta-SGD paper "
                    "draws the rates from [0.005, 0.1]); or leave it null to start every rate at inner_lr"
                )
        self.save_hyperparameters(ignore=["backbone"])
        params = dict(self.model.named_parameters())
        self._alpha_names = parameter_keys(self.adapted_names)
        alphas = {}
        for key, name in self._alpha_names.items():
            a = torch.full_like(params[name], inner_lr)
            if init_range is not None:
                a.uniform_(*init_range)
            alphas[key] = nn.Parameter(a)
        self.alphas = nn.ParameterDict(alphas)

    def inner_lrs(self) -> Params:
        """``{parameter name: alpha}`` (alpha has the parameter's shape)."""
        return {self._alpha_names[k]: v for k, v in self.alphas.items()}
