"""Reptile (Nichol, Achiam and Schulman, 2018): move the initialisation towards task-adapted weights."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import vmap

from lightning_meta.algorithms.base import TaskKind
from lightning_meta.algorithms.maml import MAML, EvalMode
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError, require_int, require_non_negative, require_number, require_positive
from lightning_meta.functional import BNPolicy, bn_policy
from lightning_meta.functional.inner_loop import PER_STEP_POLICIES

__all__ = ["Reptile", "cyclic_minibatches", "minibatch_generator"]

Params = dict[str, Tensor]

# the stream of inner mini-batches of evaluation tasks (training tasks use the global step instead)
_EVAL_STREAM = 2**32 - 1


def minibatch_generator(seed: int, step: int, task: int) -> torch.Generator:
    """The random generator that orders one task's inner mini-batches (:func:`cyclic_minibatches`).

    A pure function of ``(seed, step, task)``: in training ``step`` is the global step and ``task``
    the task's index in the whole meta-batch (over all processes), so the order does not depend on
    the device layout and a resumed run draws what the uninterrupted one would have.

    Example:
        >>> a = torch.randperm(5, generator=minibatch_generator(0, 3, 1))
        >>> b = torch.randperm(5, generator=minibatch_generator(0, 3, 1))
        >>> bool((a == b).all())
        True

    """
    state = np.random.SeedSequence([int(seed), int(step), int(task)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def _content_key(x: Tensor, y: Tensor) -> int:
    """A 63-bit key of a support set's bytes (dtype, shape and values of inputs and targets)."""
    digest = hashlib.blake2b(digest_size=8)
    for t in (x, y):
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1


def cyclic_minibatches(n: int, batch_size: int, num_batches: int, generator: torch.Generator) -> list[Tensor]:
    """Indices of ``num_batches`` mini-batches of ``batch_size`` examples out of ``n``, as the Reptile code draws them.

    The examples are visited in a fresh random order on every pass; a mini-batch that reaches the
    end of a pass is completed from the next pass (so a batch larger than ``n`` repeats examples,
    as evaluation with 5 support images and batches of 25 does in the Reptile paper's recipe).

    Example:
        >>> batches = cyclic_minibatches(4, 3, 4, torch.Generator().manual_seed(0))
        >>> [len(b) for b in batches], sorted(torch.cat(batches).tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
        ([3, 3, 3, 3], True)

    """
    order: list[Tensor] = []
    drawn = 0
    while drawn < batch_size * num_batches:
        order.append(torch.randperm(n, generator=generator))
        drawn += n
    flat = torch.cat(order)
    return [flat[i * batch_size:(i + 1) * batch_size] for i in range(num_batches)]


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

    **The paper's recipe** (Nichol et al., 2018, and its released code) differs from plain SGD on the
    whole task in three ways, each an argument here:

    - the inner optimiser is Adam with ``beta1 = 0`` (``inner_optimizer="adam"``, ``inner_lr`` its
      learning rate, e.g. 0.001), whose moment estimates are *not* reset between tasks: they carry
      over from one meta-step to the next (they are buffers of this module, so checkpoints keep
      them). Every task of a meta-batch starts from the state at the start of the step and the
      state after the step is the mean of the tasks' final states, with ``inner_steps`` added to
      its step count (the same over any number of processes). The released code instead runs the
      tasks of a meta-batch one after the other, each continuing from the previous task's state;
      with a meta-batch of one task the two are the same. Evaluation adapts from the current state
      and leaves it unchanged, as the released code does;
    - each inner step uses a mini-batch of ``inner_batch_size`` examples (``eval_inner_batch_size``
      in evaluation), drawn by :func:`cyclic_minibatches` (a fresh random order on every pass over
      the task) with :func:`minibatch_generator` (keyed by the global step and the task's place in the
      meta-batch in training, by the support set's contents in evaluation, so neither depends on
      the number of processes);
    - epsilon decays linearly from ``lr`` towards ``lr_final``: step ``i`` of ``T``
      (``trainer.estimated_stepping_batches``) uses ``lr + (lr_final - lr) * i / T``, as the
      authors' code does (the last step is one ``(lr - lr_final) / T`` above ``lr_final``).

    Training episodes then have more examples per class than test episodes (the paper's
    ``train_shots``): set the datamodule's ``shots + queries`` for training and
    ``eval_shots``/``eval_queries`` for evaluation. ``configs/reptile_paper_glyphs.yaml`` sets all of it.

    The other arguments are :class:`MAML`'s (described there). Reptile has no
    ``activation_checkpointing``: its inner steps are first order and keep no graph.

    Args:
        outer_optimizer: ``sgd`` (the paper's update, ``lr`` = epsilon) or ``adam`` on the Reptile direction.
        inner_optimizer: ``sgd`` (plain steps of ``inner_lr``) or ``adam`` (the paper's, with
            ``inner_betas`` and ``inner_eps``; moment estimates carried across meta-steps, see above).
        inner_betas: Adam's ``(beta1, beta2)`` in the inner loop; the paper uses ``beta1 = 0``.
        inner_eps: Adam's epsilon in the inner loop (added to the root of the bias-corrected second
            moment, as ``torch.optim.Adam`` does).
        inner_batch_size: examples per inner step in training; ``None`` uses all of the task's
            examples in every step.
        eval_inner_batch_size: support examples per inner step in evaluation; ``None`` uses the
            whole support set.
        lr_final: the value the outer learning rate (epsilon) decays towards, linearly over the run
            (see above); ``None`` keeps ``lr`` throughout. The paper uses 0.
        minibatch_seed: seed of the inner mini-batch order (:func:`minibatch_generator`).
        bn: as in :class:`MAML`, but not a per-step policy: the Reptile direction never reaches
            outer-only per-step BatchNorm weights.
        adapt_filter: as in :class:`MAML`, but it must cover every trainable weight (the others would
            never train).

    Example:
        >>> from lightning_meta.backbones import MLP
        >>> m = Reptile(MLP(1, [40, 40]), task="regression", inner_lr=0.02, inner_steps=5, lr=0.1)
        >>> m.configure_optimizers().__class__.__name__
        'SGD'
        >>> paper = Reptile(MLP(1, [40, 40]), task="regression", inner_optimizer="adam", inner_lr=0.001,
        ...                 inner_batch_size=10, lr=1.0, lr_final=0.0)
        >>> paper.inner_adam_v.shape  # the inner Adam's second moment, one entry per adapted weight
        torch.Size([1761])

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
        inner_optimizer: Literal["sgd", "adam"] = "sgd",
        inner_betas: tuple[float, float] = (0.0, 0.999),
        inner_eps: float = 1e-8,
        inner_batch_size: int | None = None,
        eval_inner_batch_size: int | None = None,
        lr_final: float | None = None,
        minibatch_seed: int = 0,
        eval_mode: EvalMode = "adapt",
    ) -> None:
        if inner_optimizer not in ("sgd", "adam"):
            raise MetaConfigError(f"inner_optimizer={inner_optimizer!r} is not supported; use 'sgd' or 'adam'")
        betas = tuple(inner_betas) if isinstance(inner_betas, (tuple, list)) else None
        if betas is None or len(betas) != 2:
            raise MetaConfigError(f"inner_betas={inner_betas!r} must be two numbers (beta1, beta2), e.g. (0.0, 0.999)")
        for name, beta in zip(("inner_betas[0]", "inner_betas[1]"), betas, strict=True):
            if not 0.0 <= require_number(name, beta, "Adam's decay rates") < 1.0:
                raise MetaConfigError(f"{name}={beta} must be in [0, 1) (Adam's decay rate; the paper uses (0, 0.999))")
        inner_eps = require_positive("inner_eps", inner_eps, "Adam's epsilon; torch.optim.Adam's default is 1e-8")
        for name, size in (("inner_batch_size", inner_batch_size), ("eval_inner_batch_size", eval_inner_batch_size)):
            if size is not None:
                require_int(name, size, 1, "examples per inner step, or None for all of them")
        if lr_final is not None:
            lr_final = require_non_negative("lr_final", lr_final, "epsilon at the last step; the paper anneals to 0")
        minibatch_seed = require_int("minibatch_seed", minibatch_seed, 0)
        if task_batching == "vmap" and (inner_optimizer == "adam" or inner_batch_size is not None
                                        or eval_inner_batch_size is not None):
            raise MetaConfigError(
                f"Reptile with task_batching='vmap' and inner_optimizer={inner_optimizer!r}, "
                f"inner_batch_size={inner_batch_size}, eval_inner_batch_size={eval_inner_batch_size}: the inner Adam "
                "and mini-batches run in the per-task loop only; use task_batching='loop'"
            )
        if bn in PER_STEP_POLICIES:
            raise MetaConfigError(
                f"Reptile with bn={bn!r}: per-step BatchNorm weights are outer-only and the Reptile update moves "
                "only adapted weights, so they would never train; use bn='transductive' or 'frozen'"
            )
        super().__init__(backbone, ways=ways, inner_lr=inner_lr, inner_steps=inner_steps,
                         eval_inner_steps=eval_inner_steps, first_order=True, adapt_filter=adapt_filter,
                         task_batching=task_batching, vmap_chunk_size=vmap_chunk_size, bn=bn, task=task, lr=lr,
                         weight_decay=weight_decay, eval_mode=eval_mode)
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
        self.inner_optimizer = inner_optimizer
        self.inner_betas = (float(betas[0]), float(betas[1]))
        self.inner_eps = inner_eps
        self.inner_batch_size = None if inner_batch_size is None else int(inner_batch_size)
        self.eval_inner_batch_size = None if eval_inner_batch_size is None else int(eval_inner_batch_size)
        self.lr_final = lr_final
        self.minibatch_seed = minibatch_seed
        self._inner_calls = 0  # tasks adapted since the last meta_loss/evaluate call (mini-batch order)
        self._tasks_per_rank = 1  # tasks of the meta-batch on this process (set by meta_loss)
        self._adam_finals: list[tuple[Tensor, Tensor]] | None = None
        if inner_optimizer == "adam":
            size = sum(p.numel() for n, p in self.model.named_parameters() if n in adapted)
            self.register_buffer("inner_adam_m", torch.zeros(size if self.inner_betas[0] > 0 else 0))
            self.register_buffer("inner_adam_v", torch.zeros(size))
            self.register_buffer("inner_adam_step", torch.zeros((), dtype=torch.int64))

    def _task_weights(self, adapted, frozen, buffers, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return self._inner_loop(adapted, frozen, buffers, x, y, self.inner_steps, True)

    # ------------------------------------------------------------ the paper's inner loop
    def _inner_loop(self, adapted: Params, frozen: Params, buffers: Params, sx: Tensor, sy: Tensor, steps: int,
                    first_order: bool, callback: Callable[[int, Params], None] | None = None) -> Params:
        """MAML's inner loop, or with ``inner_optimizer="adam"`` / mini-batches the paper's (always first order)."""
        batch_size = self.inner_batch_size if self.training else self.eval_inner_batch_size
        if self.inner_optimizer == "sgd" and batch_size is None:
            return super()._inner_loop(adapted, frozen, buffers, sx, sy, steps, first_order, callback)
        task = self._inner_calls
        self._inner_calls += 1
        if batch_size is None:
            batches: list[Tensor | None] = [None] * steps
        else:
            if self.training:
                generator = minibatch_generator(self.minibatch_seed, self.global_step,
                                                self.global_rank * self._tasks_per_rank + task)
            else:  # keyed by the support set itself: the same order whatever batch or process holds the task
                generator = minibatch_generator(self.minibatch_seed, _EVAL_STREAM, _content_key(sx, sy))
            batches = list(cyclic_minibatches(sx.shape[0], batch_size, steps, generator))
        names = list(adapted)
        fast = {k: v.detach() for k, v in adapted.items()}
        moments = self._start_moments(fast) if self.inner_optimizer == "adam" else None
        beta1, beta2 = self.inner_betas
        step0 = int(self.inner_adam_step) if moments is not None else 0
        for step, idx in enumerate(batches):
            x, y = (sx, sy) if idx is None else (sx[idx.to(sx.device)], sy[idx.to(sx.device)])
            with torch.enable_grad():
                leaves = {k: fast[k].detach().requires_grad_() for k in names}
                loss = self.loss_fn(self.forward_fast(leaves, frozen, buffers, x), y)
                grads = torch.autograd.grad(loss, [leaves[k] for k in names], allow_unused=True)
            # a weight the loss does not use gets a zero gradient, as in MAML's inner loop
            grads = tuple(torch.zeros_like(fast[k]) if g is None else g for k, g in zip(names, grads, strict=True))
            with torch.no_grad():
                if moments is None:
                    fast = {k: fast[k] - self.inner_lr * g for k, g in zip(names, grads, strict=True)}
                else:
                    t = step0 + step + 1
                    correction1, correction2 = 1.0 - beta1**t, 1.0 - beta2**t
                    new = {}
                    for k, g in zip(names, grads, strict=True):
                        m, v = moments[k]  # m is None when beta1 = 0: the first moment is the gradient
                        g = g.to(v.dtype)
                        v = beta2 * v + (1.0 - beta2) * g * g
                        m = g if m is None else beta1 * m + (1.0 - beta1) * g
                        moments[k] = (None if beta1 == 0 else m, v)
                        update = (m / correction1) / ((v / correction2).sqrt() + self.inner_eps)
                        new[k] = fast[k] - (self.inner_lr * update).to(fast[k].dtype)
                    fast = new
            if callback is not None:
                callback(step, fast)
        if moments is not None and self.training and self._adam_finals is not None:
            self._adam_finals.append(self._flatten_moments(names, moments))
        # first order: the result depends on the incoming weights through the identity path only
        # (as MAML's first-order loop; a no-op for Reptile's own training, which passes detached weights)
        return {k: adapted[k] + (fast[k] - adapted[k]).detach() if adapted[k].requires_grad else fast[k]
                for k in names}

    def _start_moments(self, fast: Params) -> dict[str, tuple[Tensor | None, Tensor]]:
        """The inner Adam's moment estimates at the start of a task, one ``(m, v)`` per adapted weight."""
        sizes = [fast[k].numel() for k in fast]
        dtype = torch.promote_types(self.inner_adam_v.dtype, torch.float32)  # at least float32, float64 if so kept
        v_parts = self.inner_adam_v.detach().to(dtype).split(sizes)
        m_parts = self.inner_adam_m.detach().to(dtype).split(sizes) if self.inner_betas[0] > 0 else [None] * len(sizes)
        return {k: (None if m is None else m.view_as(fast[k]), v.view_as(fast[k]))
                for k, m, v in zip(fast, m_parts, v_parts, strict=True)}

    @staticmethod
    def _flatten_moments(names: list[str], moments: dict[str, tuple[Tensor | None, Tensor]]) -> tuple[Tensor, Tensor]:
        v = torch.cat([moments[k][1].reshape(-1) for k in names])
        ms = [moments[k][0] for k in names]
        m = torch.cat([t.reshape(-1) for t in ms]) if ms and ms[0] is not None else v.new_zeros(0)
        return m, v

    def _store_moments(self, finals: list[tuple[Tensor, Tensor]]) -> None:
        """The state after a training step: the mean of the tasks' final moments (over all processes)."""
        m = torch.stack([f[0] for f in finals]).mean(0)
        v = torch.stack([f[1] for f in finals]).mean(0)
        if self._trainer is not None and self.trainer.world_size > 1:
            m = self.trainer.strategy.reduce(m, reduce_op="mean") if m.numel() else m
            v = self.trainer.strategy.reduce(v, reduce_op="mean")
        with torch.no_grad():
            self.inner_adam_m.copy_(m)
            self.inner_adam_v.copy_(v)
            self.inner_adam_step.add_(self.inner_steps)

    def on_fit_start(self) -> None:
        """Also refuses gradient accumulation with the inner Adam or inner mini-batches (see the class notes)."""
        super().on_fit_start()
        accumulate = getattr(self.trainer, "accumulate_grad_batches", 1)
        if accumulate != 1 and (self.inner_optimizer == "adam" or self.inner_batch_size is not None):
            raise MetaConfigError(
                f"Reptile with accumulate_grad_batches={accumulate} and inner_optimizer={self.inner_optimizer!r}, "
                f"inner_batch_size={self.inner_batch_size}: the inner Adam state would advance on every micro-batch "
                "and the inner mini-batch order would repeat within an optimizer step; use a larger "
                "meta_batch_size instead of accumulation (or more processes)"
            )

    def _apply(self, fn: Any, recurse: bool = True) -> Reptile:
        """Keeps the inner Adam's moment estimates in float32 (or float64) when the module is cast to 16 bits.

        A bf16 second moment barely moves: one meta-step changes it by less than bf16's rounding step.
        """
        super()._apply(fn, recurse)
        for name in ("inner_adam_m", "inner_adam_v"):
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = buf.float()
        return self

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:  # noqa: D102
        self._inner_calls = 0
        return super().evaluate(batch)

    def meta_loss(self, batch: Episode) -> Tensor:
        """Surrogate whose gradient is ``theta - mean_i theta'_i`` (the Reptile direction)."""
        self.check_batch(batch)
        self._inner_calls = 0
        self._tasks_per_rank = batch.num_tasks
        self._adam_finals = [] if self.inner_optimizer == "adam" and self.training else None
        try:
            return self._reptile_surrogate(batch)
        finally:
            finals, self._adam_finals = self._adam_finals, None
            if finals:
                self._store_moments(finals)

    def _reptile_surrogate(self, batch: Episode) -> Tensor:
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

    def configure_optimizers(self) -> Any:
        """SGD with ``lr`` = epsilon (the paper's outer update) or Adam on the Reptile direction.

        With ``lr_final`` step ``i`` of ``T = trainer.estimated_stepping_batches`` uses
        ``lr + (lr_final - lr) * i / T``.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        if self.outer_optimizer == "sgd":
            optimizer = torch.optim.SGD(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_final is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else math.inf
        if not math.isfinite(total) or total < 1:
            raise MetaConfigError(
                f"Reptile with lr_final={self.lr_final}: the linear decay needs the run's length, and the trainer "
                f"gives {total} optimizer steps; set trainer.max_steps (or max_epochs with a datamodule of known "
                "length), or drop lr_final"
            )
        ratio = self.lr_final / self.lr

        def factor(step: int) -> float:
            done = min(step / total, 1.0)
            return (1.0 - done) + done * ratio

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
