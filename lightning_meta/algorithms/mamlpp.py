"""MAML++ (Antoniou, Edwards and Storkey, 2019): "How to train your MAML"."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_meta.algorithms.base import TaskKind
from lightning_meta.algorithms.maml import MAML, EvalMode, parameter_keys
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional import BNPolicy, Params, bn_policy
from lightning_meta.functional.inner_loop import checkpointed, norm_step

__all__ = ["MAMLPlusPlus", "msl_weights"]


def msl_weights(steps: int, epoch: int, anneal_epochs: int) -> list[float]:
    """Multi-step loss importance of each inner step at ``epoch`` (MAML++ §4, "MSL").

    Starts uniform (``1/steps`` each); non-final steps decay linearly to ``0.03/steps`` over
    ``anneal_epochs`` epochs while the final step gains the rest; from ``anneal_epochs`` on, only
    the final step counts. The weights always sum to 1.

    Example:
        >>> msl_weights(4, 0, 10)
        [0.25, 0.25, 0.25, 0.25]
        >>> msl_weights(4, 10, 10)
        [0.0, 0.0, 0.0, 1.0]

    """
    if anneal_epochs <= 0 or epoch >= anneal_epochs or steps == 1:
        return [0.0] * (steps - 1) + [1.0]
    uniform = 1.0 / steps
    floor = 0.03 / steps
    decay = uniform / anneal_epochs
    early = [max(uniform - epoch * decay, floor) for _ in range(steps - 1)]
    return early + [1.0 - sum(early)]


def _drop_untrained_step_lrs(module: nn.ParameterDict, state_dict: dict, prefix: str, *args) -> None:
    """Load pre-hook of ``MAMLPlusPlus.step_lrs``: cut rates saved for steps beyond ``inner_steps``.

    Checkpoints of earlier versions kept ``max(inner_steps, eval_inner_steps)`` rates per tensor;
    the rates after ``inner_steps`` were never trained (no gradient reaches them), so dropping
    them loses nothing and lets such checkpoints load.
    """
    for key, own in module.items():
        saved = state_dict.get(prefix + key)
        if saved is not None and saved.dim() == 1 and saved.shape[0] > own.shape[0]:
            state_dict[prefix + key] = saved[: own.shape[0]]


class MAMLPlusPlus(MAML):
    """MAML with the MAML++ fixes: LSLR, MSL, derivative-order annealing and per-step BatchNorm.

    Learned per-layer per-step inner rates (LSLR), multi-step loss with annealing (MSL),
    derivative-order annealing (DA) and, with ``bn="per_step"``, per-step BatchNorm (BNRS + BNWB).

    - LSLR: every adapted parameter tensor has its own learned step size for each inner step
      (initialised to ``inner_lr``); evaluation steps beyond ``inner_steps`` reuse the last one.
    - MSL: the outer loss is the importance-weighted sum of the query losses after every inner
      step (:func:`msl_weights`), annealed towards the final step over ``msl_anneal_epochs`` epochs.
    - DA: first-order for the first ``first_order_epochs`` epochs, second order afterwards.

    - BNRS + BNWB: ``bn="per_step"`` gives every BatchNorm layer per-step running statistics
      (used at evaluation) and per-step weights and biases (learned in the outer loop only), see
      :class:`~lightning_meta.functional.inner_loop.PerStepBatchNorm`; ``bn="per_step_transductive"``
      keeps batch statistics at evaluation, as the released MAML++ code does. The default
      ``transductive`` uses each step's batch statistics with shared weights (MAML's behaviour).
      The support forward of step ``s`` and the query forward after it use row ``s``; during
      training both update it (query forwards are run only for steps whose MSL weight is non-zero).

    Schedules must fit the run: ``msl_anneal_epochs`` above the number of epochs the trainer will
    run, or ``first_order_epochs`` (when > 0) not below it, is refused (the number of epochs comes
    from ``max_epochs`` and/or ``max_steps`` and the epoch length): by ``lightning-meta fit``
    before the data is set up (:meth:`check_schedule_before_fit`, for episodic datamodules), and
    in any case at the start of training.

    The other arguments are :class:`MAML`'s (described there).

    Args:
        msl_anneal_epochs: epochs of multi-step loss (0 disables MSL).
        first_order_epochs: epochs trained first-order before switching to second order.
        learn_inner_lrs: learn the per-layer per-step rates (LSLR); otherwise they stay at ``inner_lr``.
        activation_checkpointing: as in :class:`MAML`; the per-step query forwards of the
            multi-step loss are checkpointed as well.

    Example:
        >>> from lightning_meta.backbones import MLP
        >>> m = MAMLPlusPlus(MLP(1, [8]), task="regression", inner_lr=0.01, inner_steps=3)
        >>> m.step_lrs["head__weight"].shape
        torch.Size([3])

    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int = 5,
        inner_lr: float = 0.1,
        inner_steps: int = 5,
        eval_inner_steps: int | None = None,
        msl_anneal_epochs: int = 10,
        first_order_epochs: int = 0,
        learn_inner_lrs: bool = True,
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
                         eval_inner_steps=eval_inner_steps, first_order=False, adapt_filter=adapt_filter,
                         task_batching=task_batching, vmap_chunk_size=vmap_chunk_size, bn=bn,
                         eval_report_steps=eval_report_steps, task=task, lr=lr, weight_decay=weight_decay,
                         per_task_backward=per_task_backward, activation_checkpointing=activation_checkpointing,
                         eval_mode=eval_mode)
        if msl_anneal_epochs < 0 or first_order_epochs < 0:
            raise MetaConfigError(
                f"msl_anneal_epochs={msl_anneal_epochs} and first_order_epochs={first_order_epochs} must be >= 0"
            )
        self._refuse_hooks_training_ignores(MAMLPlusPlus, "its multi-step loss, which runs the inner loop itself")
        self.save_hyperparameters(ignore=["backbone"])
        self.msl_anneal_epochs = msl_anneal_epochs
        self.first_order_epochs = first_order_epochs
        self._lr_names = parameter_keys(self.adapted_names)
        self.step_lrs = nn.ParameterDict({
            key: nn.Parameter(torch.full((self.inner_steps,), float(inner_lr)), requires_grad=learn_inner_lrs)
            for key in self._lr_names
        })
        self.step_lrs.register_load_state_dict_pre_hook(_drop_untrained_step_lrs)

    def inner_lrs(self):
        """Return a callable ``step -> {parameter name: rate}`` (the LSLR rates of that step).

        Steps beyond ``inner_steps`` (evaluation with ``eval_inner_steps`` > ``inner_steps``) reuse
        the last trained rate, as the per-step BatchNorm layers reuse their last row.
        """
        lrs = {self._lr_names[k]: v for k, v in self.step_lrs.items()}
        last = self.inner_steps - 1
        return lambda step: {k: v[min(step, last)] for k, v in lrs.items()}

    @property
    def current_epoch_or_zero(self) -> int:
        """The trainer's epoch, or 0 outside a trainer."""
        return self.trainer.current_epoch if self._trainer is not None else 0

    def use_first_order(self) -> bool:
        """Derivative-order annealing: first order during the first ``first_order_epochs`` epochs."""
        return self.current_epoch_or_zero < self.first_order_epochs

    def step_weights(self) -> list[float]:
        """MSL importance of each training inner step at the current epoch."""
        return msl_weights(self.inner_steps, self.current_epoch_or_zero, self.msl_anneal_epochs)

    def _query_at_step(self, step: int, fast: Params, frozen: Params, buffers: Params, qx: Tensor) -> Tensor:
        with norm_step(self.model, step):
            return self.forward_fast(fast, frozen, buffers, qx)

    def _task_step_outputs(self, adapted, frozen, buffers, sx, sy, qx, first_order: bool,
                           weights: Sequence[float] | None = None) -> list[Tensor | None]:
        """Query outputs after every inner step (``None`` where ``weights`` gives the step no weight)."""
        outs: list[Tensor | None] = []

        def keep(step: int, fast: Params) -> None:
            if weights is not None and weights[step] == 0:
                outs.append(None)
            elif self.activation_checkpointing and torch.is_grad_enabled():
                outs.append(checkpointed(self._query_at_step, step, fast, frozen, buffers, qx, module=self.model))
            else:
                outs.append(self._query_at_step(step, fast, frozen, buffers, qx))

        self._inner_loop(adapted, frozen, buffers, sx, sy, self.inner_steps, first_order, keep)
        return outs

    def meta_loss(self, batch: Episode) -> Tensor:
        """Importance-weighted query losses of every inner step (MSL), or the final step's alone."""
        self.check_batch(batch)  # also when called directly; a subclass may relax it
        weights = self.step_weights()
        first_order = self.use_first_order()
        adapted, frozen = self.split_parameters()
        buffers = self.model_buffers()
        with bn_policy(self.model, self.bn):
            if self.task_batching == "vmap":
                fn = lambda a, f, b, sx, sy, qx: self._task_step_outputs(a, f, b, sx, sy, qx, first_order)  # noqa: E731
                per_step = self._vmap_tasks(fn, adapted, frozen, buffers, batch, first_order)
                per_task = [[s[i] for s in per_step] for i in range(batch.num_tasks)]
            else:
                per_task = [self._task_step_outputs(adapted, frozen, buffers, ep.support_x, ep.support_y,
                                                    ep.query_x, first_order, weights) for ep in batch.tasks()]
        losses = []
        for i, outs in enumerate(per_task):
            weighted = zip(weights, outs, strict=True)
            losses.append(sum(w * self.loss_fn(o, batch.query_y[i]) for w, o in weighted if w > 0))
        self._train_scores = torch.stack([self.score_fn(outs[-1].detach(), batch.query_y[i])
                                          for i, outs in enumerate(per_task)])
        return torch.stack(losses).mean()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Also cut the optimizer state of rates that earlier checkpoints kept for evaluation steps.

        ``_drop_untrained_step_lrs`` trims the rates themselves; their Adam moments (``exp_avg``,
        ``exp_avg_sq``) had the same length, and resuming ``fit`` would fail at the first step.
        Done for the default optimizer (every trainable parameter, in module order); a custom
        optimizer's state is left as saved.
        """
        super().on_load_checkpoint(checkpoint)
        names = [n for n, p in self.named_parameters() if p.requires_grad]
        rate_positions = {i for i, n in enumerate(names) if n.startswith("step_lrs.")}
        for opt_state in checkpoint.get("optimizer_states", []):
            ids = [i for group in opt_state.get("param_groups", []) for i in group.get("params", [])]
            if len(ids) != len(names):
                continue
            for pos in rate_positions:
                state = opt_state.get("state", {}).get(ids[pos], {})
                for key, value in state.items():
                    if torch.is_tensor(value) and value.dim() == 1 and value.shape[0] > self.inner_steps:
                        state[key] = value[: self.inner_steps]

    def training_epochs(self, trainer: Any = None, batches: float | None = None) -> int | None:
        """Epochs ``trainer`` (default: the attached one) will run, or ``None`` if unbounded.

        From ``max_epochs`` and ``max_steps`` with ``batches`` training batches per epoch (default:
        the trainer's ``num_training_batches``, known once the dataloader exists).
        """
        trainer = self._trainer if trainer is None else trainer
        if trainer is None:
            return None
        bounds = []
        if trainer.max_epochs is not None and trainer.max_epochs >= 0:
            bounds.append(int(trainer.max_epochs))
        batches = trainer.num_training_batches if batches is None else batches
        if trainer.max_steps is not None and trainer.max_steps > 0 and 0 < batches < math.inf:
            per_epoch = batches if self.per_task_backward else math.ceil(batches / trainer.accumulate_grad_batches)
            bounds.append(math.ceil(trainer.max_steps / per_epoch))
        return min(bounds) if bounds else None

    def check_schedule_before_fit(self, trainer: Any, datamodule: Any) -> None:
        """The schedule check of :meth:`on_train_start`, made before the data is set up (``lightning-meta fit``).

        The epoch length is ``train_episodes // meta_batch_size`` meta-batches of an
        :class:`~lightning_meta.datamodules.EpisodicDataModule` (cut by ``limit_train_batches``);
        other datamodules are left to :meth:`on_train_start`.
        """
        episodes, size = getattr(datamodule, "train_episodes", None), getattr(datamodule, "meta_batch_size", None)
        if trainer.fast_dev_run or not isinstance(episodes, int) or not isinstance(size, int) or size < 1:
            return
        batches = episodes // size
        limit = trainer.limit_train_batches
        if isinstance(limit, int) and not isinstance(limit, bool):
            batches = min(batches, limit)
        elif isinstance(limit, float):
            batches = int(batches * limit)
        self._check_schedule(self.training_epochs(trainer, batches))

    def on_train_start(self) -> None:
        """Refuses MSL / derivative-order schedules longer than the run (skipped under ``fast_dev_run``)."""
        if self.trainer.fast_dev_run:
            return
        self._check_schedule(self.training_epochs())

    def _check_schedule(self, epochs: int | None) -> None:
        if epochs is None:
            return
        if self.msl_anneal_epochs > epochs:
            raise MetaConfigError(
                f"msl_anneal_epochs={self.msl_anneal_epochs} is longer than the {epochs} epoch(s) this run trains "
                "(from trainer max_epochs / max_steps and the epoch length); lower msl_anneal_epochs, train longer, "
                "or shorten the epochs (fewer train_episodes per epoch)"
            )
        if 0 < epochs <= self.first_order_epochs:
            raise MetaConfigError(
                f"first_order_epochs={self.first_order_epochs} covers all {epochs} epoch(s) this run trains, so "
                "second-order MAML++ never starts; lower first_order_epochs, train longer, or shorten the epochs"
            )
