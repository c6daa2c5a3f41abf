"""iMAML: meta-learning with implicit gradients (Rajeswaran, Finn, Kakade and Levine, 2019)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.func import functional_call

from lightning_meta.algorithms.base import TaskKind
from lightning_meta.algorithms.maml import MAML, EvalMode
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError, require_int, require_non_negative, require_positive
from lightning_meta.functional import BNPolicy, Params, bn_policy
from lightning_meta.functional.implicit import implicit_meta_gradient
from lightning_meta.functional.inner_loop import PER_STEP_POLICIES, inner_adapt

__all__ = ["IMAML"]


class IMAML(MAML):
    """iMAML: the inner problem is proximally regularised, the meta-gradient is implicit.

    Each task solves ``min_phi L_support(phi) + lam / 2 * ||phi - theta||^2`` approximately by
    ``inner_steps`` of gradient descent from ``theta``, without keeping a graph. The
    meta-gradient ``(I + H / lam)^{-1} grad L_query(phi)`` is then obtained by ``cg_steps`` of
    conjugate gradient on Hessian-vector products, so memory does not depend on ``inner_steps``.
    It is applied as the gradient of a surrogate loss (averaged over tasks and, under DDP, ranks).
    The logged ``train/loss`` is the mean query loss at the adapted weights.

    **The authors' released code** (github.com/aravindr93/imaml_dev) departs from the paper in three
    ways, each available here: ``inner_solver="pull_back"`` (``inner_steps`` of plain gradient
    descent on the support loss, then one step ``phi <- phi - inner_lr * lam * (phi - theta)``),
    ``cg_damping=1.0, lam_damping=10.0`` (it solves ``((1 + cg_damping) I + H / (lam +
    lam_damping)) x = g``), and evaluation by plain gradient descent, ``eval_lam=0.0`` with
    ``eval_inner_steps=16`` (its ``measure_accuracy.py --lam 0 --n_steps 16``). Its outer Adam uses
    ``eps=1e-3`` (LightningCLI: ``--optimizer Adam --optimizer.eps 0.001``). With one CG step it
    uses the query gradient itself where this class takes one CG iteration (a multiple of it).

    The other arguments are :class:`MAML`'s (described there). iMAML has no
    ``activation_checkpointing``: its inner loop keeps no graph, so its memory is already flat in
    ``inner_steps``.

    Args:
        lam: proximal regularisation strength lambda (> 0); larger keeps ``phi`` closer to ``theta``.
        cg_steps: conjugate-gradient iterations (>= 1).
        cg_tol: the solve stops early once its residual ``||g - (I + H / lam) x||`` is ``cg_tol``
            times ``||g||`` (1e-5 by default, so the meta-gradient is accurate to about that relative
            error when the solve converges; 0 solves to the dtype's working precision). The mean relative residual over
            the meta-batch's tasks is logged as ``train/cg_residual``; a solve that meets a direction
            of non-positive curvature (``I + H / lam`` is not positive definite: the support loss
            has curvature below ``-lam`` there) stops early with a one-time warning.
        inner_lr: step size of the inner gradient descent on the regularised support loss.
        inner_solver: ``proximal`` (the paper: every inner step descends the support loss plus
            ``lam / 2 * ||phi - theta||^2``) or ``pull_back`` (the authors' code: plain steps on the
            support loss, then one step on the proximal term alone).
        cg_damping: adds ``cg_damping * x`` to the conjugate-gradient system (0: the paper's; the
            authors' code uses 1).
        lam_damping: the system's Hessian term is ``H / (lam + lam_damping)`` (0: the paper's; the
            authors' code uses 10).
        eval_lam: the proximal strength of the inner problem at evaluation (validation, test and
            :meth:`adapt` outside training); ``None`` uses the training inner problem, ``0`` plain
            gradient descent on the support loss, as the authors' evaluation script does.
        bn: as in :class:`MAML`, but not a per-step policy: the implicit gradient assumes one fixed
            inner objective.
        task_batching: ``loop`` only (the conjugate-gradient solve runs task by task).
        first_order: must stay ``False``; iMAML has no first-order variant, ``True`` is refused with
            a message naming the alternatives.

    Example:
        >>> from lightning_meta.backbones import MLP
        >>> m = IMAML(MLP(1, [40, 40]), task="regression", inner_lr=0.01, inner_steps=10, lam=1.0, cg_steps=5)
        >>> m.lam, m.cg_steps
        (1.0, 5)

    """

    # its meta-loss already runs task by task without holding a graph across tasks
    _split_tasks_in_training = False

    def __init__(
        self,
        backbone: nn.Module,
        ways: int = 5,
        inner_lr: float = 0.1,
        inner_steps: int = 10,
        eval_inner_steps: int | None = None,
        lam: float = 1.0,
        cg_steps: int = 5,
        cg_tol: float = 1e-5,
        adapt_filter: str = "all",
        bn: BNPolicy = "transductive",
        eval_report_steps: Sequence[int] | None = None,
        task: TaskKind = "classification",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        task_batching: Literal["loop"] = "loop",
        first_order: bool = False,
        inner_solver: Literal["proximal", "pull_back"] = "proximal",
        cg_damping: float = 0.0,
        lam_damping: float = 0.0,
        eval_lam: float | None = None,
        eval_mode: EvalMode = "adapt",
    ) -> None:
        if first_order:
            raise MetaConfigError(
                "IMAML with first_order=True: iMAML's meta-gradient is implicit (conjugate gradient on "
                "Hessian-vector products) and never differentiates through the inner loop, so there is no "
                "first-order variant of it; drop first_order (its memory is already flat in inner_steps), or use "
                "MAML with first_order=True for first-order MAML"
            )
        if task_batching != "loop":
            raise MetaConfigError(f"task_batching={task_batching!r}: IMAML supports only 'loop'")
        if bn in PER_STEP_POLICIES:
            raise MetaConfigError(
                f"IMAML with bn={bn!r}: the implicit meta-gradient assumes the same inner objective at every step, "
                "which per-step BatchNorm breaks; use bn='transductive' or 'frozen'"
            )
        super().__init__(backbone, ways=ways, inner_lr=inner_lr, inner_steps=inner_steps,
                         eval_inner_steps=eval_inner_steps, first_order=True, adapt_filter=adapt_filter,
                         task_batching="loop", bn=bn, eval_report_steps=eval_report_steps, task=task, lr=lr,
                         weight_decay=weight_decay,
                         eval_mode=eval_mode)
        require_positive("lam", lam, "the proximal regularisation; the paper uses 0.5-2")
        require_int("cg_steps", cg_steps, 1, "the paper uses 5")
        cg_tol = require_non_negative("cg_tol", cg_tol, "the relative residual at which conjugate gradient stops; "
                                      "1e-5 by default, 0 solves to working precision")
        self._refuse_hooks_training_ignores(IMAML, "its implicit meta-gradient (proximal inner loop and conjugate "
                                                   "gradient)")
        if inner_solver not in ("proximal", "pull_back"):
            raise MetaConfigError(f"inner_solver={inner_solver!r} is not supported; use 'proximal' (the paper's) or "
                                  "'pull_back' (the authors' code)")
        cg_damping = require_non_negative("cg_damping", cg_damping, "0 is the paper's system, the authors' code uses 1")
        lam_damping = require_non_negative("lam_damping", lam_damping,
                                           "0 is the paper's system, the authors' code uses 10")
        if eval_lam is not None:
            eval_lam = require_non_negative("eval_lam", eval_lam, "the evaluation's proximal strength; 0 is plain "
                                            "gradient descent, None the training inner problem")
        self.save_hyperparameters(ignore=["backbone"])
        self.lam = lam
        self.cg_steps = cg_steps
        self.cg_tol = cg_tol
        self.inner_solver = inner_solver
        self.cg_damping = cg_damping
        self.lam_damping = lam_damping
        self.eval_lam = eval_lam
        self._cg_residuals: list[float] = []  # relative residual of each solve of the last meta_loss
        self._warned_curvature = False

    def _regularised_support(self, theta: Params, frozen: Params, buffers: Params, x: Tensor, y: Tensor):
        names = list(theta)

        def loss(phi: list[Tensor]) -> Tensor:
            p = dict(zip(names, phi, strict=True))
            out = functional_call(self.model, ({**frozen, **p}, buffers), (x,))
            return self.loss_fn(out, y)

        return names, loss

    def _inner_loop(self, adapted: Params, frozen: Params, buffers: Params, sx: Tensor, sy: Tensor, steps: int,
                    first_order: bool, callback=None) -> Params:
        """Gradient descent on the proximally regularised support loss from ``theta`` (no graph kept).

        Used by training, evaluation and :meth:`adapt` alike (``first_order`` is moot: nothing is
        differentiated through these steps).
        """
        theta = {k: v.detach() for k, v in adapted.items()}
        frozen = {k: v.detach() for k, v in frozen.items()}
        evaluating = not self.training and self.eval_lam is not None
        lam = self.eval_lam if evaluating else self.lam
        pull_back = self.inner_solver == "pull_back" and not evaluating

        def proximal(phi: Params) -> Tensor:
            return sum(((phi[k] - theta[k]) ** 2).sum() for k in theta) * (lam / 2)

        penalty = None if pull_back or lam == 0 else proximal

        def pulled(params: Params) -> Params:  # one gradient step on lam / 2 * ||phi - theta||^2 alone
            return {k: v.detach() - self.inner_lr * lam * (v.detach() - theta[k]) for k, v in params.items()}

        report = callback
        if pull_back and callback is not None:  # the last step's report sees the weights after the pull-back
            def report(step: int, params: Params) -> None:
                callback(step, pulled(params) if step == steps - 1 else params)

        with torch.enable_grad():  # the shared inner loop; first order: no graph is kept through the steps
            fast = inner_adapt(self.model, theta, buffers, sx, sy, self.loss_fn, self.inner_lr, steps,
                               first_order=True, frozen=frozen, callback=report, penalty=penalty)
        return pulled(fast) if pull_back else {k: v.detach() for k, v in fast.items()}

    def _system_name(self) -> str:
        """The matrix of the conjugate-gradient system, as the warnings name it."""
        if self.cg_damping == 0 and self.lam_damping == 0:
            return "I + H / lam"
        return f"{1 + self.cg_damping:g} I + H / (lam + {self.lam_damping:g})"

    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:  # noqa: D102
        self._cg_residuals = []
        log_now = self._log_this_step()  # before the step moves global_step (as the base does)
        loss = super().training_step(batch, batch_idx)
        if log_now and self._cg_residuals:
            mean = sum(self._cg_residuals) / len(self._cg_residuals)
            self.log("train/cg_residual", mean, batch_size=batch.num_tasks)
        return loss

    def meta_loss(self, batch: Episode) -> Tensor:
        """Surrogate whose gradient is the mean over tasks of the implicit meta-gradient.

        Parameters excluded by ``adapt_filter`` receive the ordinary (first-order) gradient of the
        query loss at the adapted weights.
        """
        self.check_batch(batch)  # also when called directly; a subclass may relax it
        adapted, frozen = self.split_parameters()
        theta = {k: v.detach() for k, v in adapted.items()}
        frozen_d = {k: v.detach() for k, v in frozen.items()}
        buffers = self.model_buffers()
        names = list(adapted)
        total = [torch.zeros_like(theta[k]) for k in names]
        frozen_loss: Tensor | float = 0.0
        losses, scores, residuals = [], [], []
        with bn_policy(self.model, self.bn):
            for ep in batch.tasks():
                phi = self._inner_loop(adapted, frozen_d, buffers, ep.support_x, ep.support_y, self.inner_steps,
                                       True)
                with torch.enable_grad():
                    leaf = [phi[k].requires_grad_(True) for k in names]
                    out = self.forward_fast(dict(zip(names, leaf, strict=True)), frozen, buffers, ep.query_x)
                    q_loss = self.loss_fn(out, ep.query_y)
                    q_grad = torch.autograd.grad(q_loss, leaf, retain_graph=bool(frozen))
                if frozen:
                    frozen_loss = frozen_loss + q_loss / batch.num_tasks
                _, s_loss = self._regularised_support(theta, frozen_d, buffers, ep.support_x, ep.support_y)
                g, info = implicit_meta_gradient(s_loss, [phi[k] for k in names], list(q_grad), self.lam,
                                                 self.cg_steps, tol=self.cg_tol, return_info=True,
                                                 damping=self.cg_damping, lam_damping=self.lam_damping)
                residuals.append(info.relative_residual)
                if info.stop == "curvature" and not self._warned_curvature:
                    self._warned_curvature = True
                    rank_zero_warn(
                        f"IMAML: conjugate gradient met a direction of non-positive curvature after "
                        f"{info.iterations} step(s) ({self._system_name()} is not positive definite at the adapted "
                        f"weights, lam={self.lam}); that task's meta-gradient is the partial solve (relative residual "
                        f"{info.relative_residual:.3g}). Raise lam, run more inner steps, or use bn='frozen' "
                        "(batch-statistics BatchNorm makes the support loss non-convex). Warned once per model."
                    )
                total = [t + gi / batch.num_tasks for t, gi in zip(total, g, strict=True)]
                losses.append(q_loss.detach())
                scores.append(self.score_fn(out.detach(), ep.query_y))
        self._display_loss = torch.stack(losses).mean()
        self._train_scores = torch.stack(scores)
        self._cg_residuals = residuals
        return sum((adapted[k] * t).sum() for k, t in zip(names, total, strict=True)) + frozen_loss
