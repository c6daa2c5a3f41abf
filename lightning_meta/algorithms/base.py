"""The shared base of every meta-learner: episode handling, metrics, evaluation protocol, optimizer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError, require_int, require_non_negative, require_positive
from lightning_meta.fit_progress import repair_fit_progress
from lightning_meta.functional.bn_sync import RunningStatsSync
from lightning_meta.metrics import EpisodicMean

__all__ = ["MetaLearner", "TaskKind"]

TaskKind = Literal["classification", "regression"]


class MetaLearner(L.LightningModule):
    """Base LightningModule for meta-learning algorithms.

    Subclasses implement three public hooks (DESIGN §3):

    - :meth:`adapt` ``(episode) -> state``: task-specific adaptation (fast weights, prototypes, ...).
    - :meth:`predict` ``(state, x) -> outputs``: logits (classification) or values (regression).
    - :meth:`meta_loss` ``(batch) -> Tensor``: the outer loss of a meta-batch; the default adapts
      and predicts each task and averages the query losses.

    The base runs evaluation with gradients enabled even though Lightning validates and tests
    under ``torch.inference_mode`` (gradient-based learners must adapt at test time), and logs
    ``{split}/acc`` (or ``{split}/mse``) with its 95% CI half-width ``{split}/acc_ci95``
    (``{split}/mse_ci95``) over
    episodes, computed from sufficient statistics so the value is exact under DDP.

    Under DDP (or DeepSpeed) with more than one process, BatchNorm running statistics (and the
    per-step ones of :class:`~lightning_meta.functional.inner_loop.PerStepBatchNorm`) end every
    training step equal on all ranks to those of one process that ran the whole global
    meta-batch (:class:`~lightning_meta.functional.bn_sync.RunningStatsSync`); set the class
    attribute ``sync_running_stats = False`` to keep per-rank statistics. Subclasses overriding
    ``on_train_batch_start``, ``on_after_backward``, ``on_train_batch_end``, ``on_train_end`` or
    ``configure_callbacks`` must call ``super()``.

    Args:
        ways: classes per episode (the output size of a task head); linked from the datamodule.
        task: ``classification`` (cross-entropy, accuracy) or ``regression`` (MSE).
        lr: outer (meta) learning rate of Adam.
        weight_decay: Adam weight decay.
        per_task_backward: back-propagate each task of a meta-batch on its own (its graph is freed
            before the next task runs), so memory no longer grows with the meta-batch size; the
            gradient is the same mean over tasks. Uses manual optimisation; under DDP the
            gradients are synchronised once, after the last task. Learning-rate schedulers are
            stepped by Lightning's rules (``interval``, ``frequency``); ``ReduceLROnPlateau``
            (whose monitor Lightning drops under manual optimisation),
            ``Trainer(gradient_clip_val=...)`` and ``accumulate_grad_batches`` are refused.


    Example:
        >>> from lightning_meta import Episode
        >>> class NearestMean(MetaLearner):  # a learner without weights: class means of the support set
        ...     def adapt(self, episode):
        ...         return torch.stack([episode.support_x[episode.support_y == c].mean(0) for c in range(self.ways)])
        ...     def predict(self, state, x):
        ...         return -torch.cdist(x, state)
        >>> ep = Episode(torch.tensor([[0.0], [10.0]]), torch.tensor([0, 1]), torch.tensor([[9.0], [1.0]]),
        ...              torch.tensor([1, 0]), torch.tensor([4, 2]))
        >>> model = NearestMean(ways=2)
        >>> model.predict(model.adapt(ep), ep.query_x).argmax(1)
        tensor([1, 0])

    """

    #: synchronise BatchNorm running statistics across ranks after every training step (see above)
    sync_running_stats: bool = True

    def __init__(self, ways: int = 5, task: TaskKind = "classification", lr: float = 1e-3, weight_decay: float = 0.0,
                 per_task_backward: bool = False):
        super().__init__()
        if task not in ("classification", "regression"):
            raise MetaConfigError(f"task={task!r} is not supported; use 'classification' or 'regression'")
        if task == "classification":
            require_int("ways", ways, 2, "classification needs at least two classes")
        elif ways is not None:
            require_int("ways", ways, 0, "unused by regression")
        for one, batched in (("loss_fn", "per_task_loss"), ("score_fn", "per_task_score")):
            if self._overridden_below(batched, one):
                raise MetaConfigError(
                    f"{type(self).__name__} overrides {batched} but not {one}; the per-task paths (the task loop, "
                    f"evaluation, adapt/predict overrides) call {one}, so the two would differ: override {one} (and "
                    f"{batched} too only as a faster batched form of it)"
                )
        lr = require_positive("lr", lr, "typical values are 1e-3 with Adam")
        weight_decay = require_non_negative("weight_decay", weight_decay, "Adam weight decay; 0 disables it")
        self.ways = ways
        self.task = task
        self.lr = lr
        self.weight_decay = weight_decay
        self.score_name = "acc" if task == "classification" else "mse"
        self.per_task_backward = per_task_backward
        self.automatic_optimization = not per_task_backward
        self.val_metric = EpisodicMean()
        self.test_metric = EpisodicMean()
        self.extra_val_metrics = torch.nn.ModuleDict()
        self.extra_test_metrics = torch.nn.ModuleDict()

    # ------------------------------------------------------------------ hooks
    def adapt(self, episode: Episode) -> Any:
        """Task-specific adaptation of one (unbatched) episode; returns the state ``predict`` needs."""
        raise NotImplementedError(f"{type(self).__name__} must implement adapt(episode)")

    def predict(self, state: Any, x: Tensor) -> Tensor:
        """Return the outputs for inputs ``x`` of the task described by ``state``."""
        raise NotImplementedError(f"{type(self).__name__} must implement predict(state, x)")

    def meta_loss(self, batch: Episode) -> Tensor:
        """Mean query loss over the tasks of a meta-batch (the training objective)."""
        losses, scores = [], []
        for ep in batch.tasks():
            out = self.predict(self.adapt(ep), ep.query_x)
            losses.append(self.loss_fn(out, ep.query_y))
            scores.append(self.score_fn(out.detach(), ep.query_y))
        self._train_scores = torch.stack(scores)
        return torch.stack(losses).mean()

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        """Per-episode scores ``{name: [B]}`` for validation/test; ``name`` = ``acc`` or ``mse`` at least."""
        scores = []
        for ep in batch.tasks():
            out = self.predict(self.adapt(ep), ep.query_x)
            scores.append(self.score_fn(out.detach(), ep.query_y))
        return {self.score_name: torch.stack(scores)}

    # --------------------------------------------------------------- losses
    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Cross-entropy for classification, mean squared error for regression."""
        if self.task == "classification":
            return F.cross_entropy(outputs, targets)
        return F.mse_loss(outputs, targets)

    def score_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Accuracy (classification) or MSE (regression) of one episode, a 0-d tensor."""
        if self.task == "classification":
            return (outputs.argmax(-1) == targets).to(torch.float32).mean()
        return F.mse_loss(outputs, targets)

    def _overridden_below(self, hook: str, batched: str) -> bool:
        """Tell whether ``type(self)`` defines ``hook`` in a subclass of the class defining ``batched``.

        A subclass that overrides :meth:`loss_fn` (or :meth:`score_fn`) alone must not be bypassed
        by the batched :meth:`per_task_loss` (:meth:`per_task_score`) written for the default.
        """
        mro = type(self).__mro__
        where = {name: next(i for i, c in enumerate(mro) if name in c.__dict__) for name in (hook, batched)}
        return where[hook] < where[batched]

    def per_task_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``[B]`` losses of ``B`` tasks at once (equal to :meth:`loss_fn` per task).

        A subclass that overrides :meth:`loss_fn` but not this method gets its ``loss_fn`` called
        on each task.
        """
        if self._overridden_below("loss_fn", "per_task_loss"):
            return torch.stack([self.loss_fn(o, t) for o, t in zip(outputs, targets, strict=True)])
        if self.task == "classification":
            b = outputs.shape[0]
            ce = F.cross_entropy(outputs.flatten(0, 1), targets.flatten(), reduction="none")
            return ce.view(b, -1).mean(1)
        return (outputs - targets).pow(2).flatten(1).mean(1)

    def per_task_score(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``[B]`` scores of ``B`` tasks at once (equal to :meth:`score_fn` per task).

        A subclass that overrides :meth:`score_fn` but not this method gets its ``score_fn``
        called on each task.
        """
        if self._overridden_below("score_fn", "per_task_score"):
            return torch.stack([self.score_fn(o, t) for o, t in zip(outputs, targets, strict=True)])
        if self.task == "classification":
            return (outputs.argmax(-1) == targets).to(torch.float32).flatten(1).mean(1)
        return (outputs - targets).pow(2).flatten(1).mean(1)

    def check_batch(self, batch: Episode) -> None:
        """Refuses batches that do not fit the model, with a message naming the fix."""
        if not isinstance(batch, Episode):
            raise MetaConfigError(
                f"{type(self).__name__} expects lightning_meta.Episode batches, got {type(batch).__name__}; "
                "use a lightning_meta datamodule or collate_episodes"
            )
        if not batch.is_batched:
            raise MetaConfigError(
                f"{type(self).__name__} takes meta-batches (a leading task axis), got a single episode; collate it "
                "with lightning_meta.collate_episodes([episode]) (the datamodules already do)"
            )
        is_regression = batch.ways == 0
        if not is_regression:
            for name in ("support_y", "query_y"):
                y = getattr(batch, name)
                if y.dtype != torch.long:
                    raise MetaConfigError(
                        f"classification labels must be torch.long (int64), got {name} of dtype {y.dtype}; convert "
                        f"them with .long() where the episodes are built"
                    )
        for part in ("support", "query"):
            x, y = getattr(batch, f"{part}_x"), getattr(batch, f"{part}_y")
            lead = y.dim() - 1 if is_regression else y.dim()  # regression targets end in [..., 1]
            if x.shape[:lead] != y.shape[:lead]:
                raise MetaConfigError(
                    f"{part}_x of shape {list(x.shape)} does not match {part}_y of shape {list(y.shape)}: every "
                    f"{part} example needs one label (the first {lead} dimensions must be equal); check how the "
                    "episodes are built"
                )
        if is_regression != (self.task == "regression"):
            raise MetaConfigError(
                f"model task={self.task!r} but the datamodule produces "
                f"{'regression' if is_regression else 'classification'} episodes; set model task accordingly"
            )
        if is_regression:
            for name, y in (("support_y", batch.support_y), ("query_y", batch.query_y)):
                if y.dim() < 2 or y.shape[-1] != 1:
                    raise MetaConfigError(
                        f"regression episodes need one target value per example, {name} of shape [..., n, 1]; got "
                        f"{name} of shape {list(y.shape)}; add the last dimension (y.unsqueeze(-1)) or predict one "
                        "output at a time"
                    )

    # ------------------------------------------------------------ input shape
    def input_backbone(self) -> tuple[nn.Module, str] | None:
        """Return the network that receives the episode images and its ``--model.init_args`` path (for messages).

        The default finds ``self.backbone`` (metric- and model-based learners) or
        ``self.model.backbone`` (the MAML family), looking through ``torch.compile`` wrappers and
        the LoRA/FiLM adapters; None when there is none. Override it when the images go elsewhere.
        """
        from lightning_meta.backbones.adapters import FiLMBackbone, LoRABackbone

        net = getattr(self, "backbone", None)
        if net is None:
            net = getattr(getattr(self, "model", None), "backbone", None)
        if not isinstance(net, nn.Module):
            return None
        path = "backbone"
        while True:
            inner = getattr(net, "_orig_mod", None)  # torch.compile's OptimizedModule
            if isinstance(inner, nn.Module):
                net = inner
            elif isinstance(net, (LoRABackbone, FiLMBackbone)):
                net, path = net.body, f"{path}.init_args.backbone"
            else:
                return net, path

    def check_input_shape(self, shape: Sequence[int], what: str = "the images") -> None:
        """Refuse images of shape ``[C, H, W]`` that the backbone does not declare it takes.

        Only what the backbone declares is compared: ``in_channels`` (an int) with ``C``,
        ``image_size`` (an int for square images, or ``(height, width)``) with ``H, W``, and for
        :class:`~lightning_meta.backbones.MLP` the size of its first layer with ``C * H * W``. A
        backbone without these attributes (a wrapped torchvision model, most user networks) is
        not checked. Datamodules call this before training, validation, test or prediction starts.

        Raises:
            MetaConfigError: the images do not fit; the message names both shapes and the fix.

        """
        shape = tuple(int(s) for s in shape)
        found = self.input_backbone()
        if len(shape) != 3 or found is None:  # not images, or no backbone to ask
            return
        net, path = found
        c, h, w = shape
        wrong: list[str] = []  # what the backbone declares, that the images contradict
        args: list[tuple[str, Any]] = []  # the constructor arguments that would fit the images
        notes: list[str] = []
        channels = getattr(net, "in_channels", None)
        if isinstance(channels, int) and not isinstance(channels, bool) and channels != c:
            wrong.append(f"in_channels={channels}")
            args.append(("in_channels", c))
        size = getattr(net, "image_size", None)
        side: tuple[int, int] | None = None
        if isinstance(size, int) and not isinstance(size, bool):
            side = (size, size)
        elif (isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2
              and all(isinstance(v, int) for v in size)):
            side = (int(size[0]), int(size[1]))
        if side is not None and side != (h, w):
            wrong.append(f"image_size={size if isinstance(size, int) else list(size)}")
            if not isinstance(size, int):
                args.append(("image_size", [h, w]))
            elif h == w:
                args.append(("image_size", h))
            else:
                notes.append(f"{type(net).__name__} takes square images: resize them to one side")
        from lightning_meta.backbones.mlp import MLP

        first = net.net[0] if isinstance(net, MLP) and isinstance(net.net[0], nn.Linear) else None
        if first is not None and first.in_features != c * h * w:
            wrong.append(f"in_features={first.in_features} (the flattened image size)")
            args.append(("in_features", math.prod(shape)))
        if not wrong:
            return
        name = type(net).__name__
        fix = ""
        if args:
            python = ", ".join(f"{k}={v}" for k, v in args)
            cli = " ".join(f"--model.init_args.{path}.init_args.{k} {str(v).replace(' ', '')}" for k, v in args)
            fix = f"build the backbone for these images ({name}({python}); on the command line {cli}), or "
        raise MetaConfigError(
            f"{what} are {c}x{h}x{w} (channels x height x width) but the backbone {name} of {type(self).__name__} "
            f"expects {' and '.join(wrong)}; {'; '.join(notes) + '; ' if notes else ''}{fix}convert the data to "
            "what the backbone takes (`lightning-meta convert ... --image-size N`; imagefolder also has --channels)"
        )

    # -------------------------------------------------------------- Lightning
    def training_step(self, batch: Episode, batch_idx: int) -> Tensor:  # noqa: D102
        self.check_batch(batch)
        self._train_scores = None
        self._display_loss = None
        bs = batch.num_tasks
        log_now = self._log_this_step()  # before the per-task path's optimizer step moves global_step
        if self.per_task_backward:
            loss = self._per_task_step(batch)
        elif self._splits_tasks(batch):
            loss = self._task_split_loss(batch)
        else:
            loss = self.meta_loss(batch)
        if log_now:
            shown = loss.detach() if self._display_loss is None else self._display_loss.detach()
            self.log("train/loss", shown, prog_bar=True, batch_size=bs)
            if self._train_scores is not None:
                self.log(f"train/{self.score_name}", self._train_scores.mean(), prog_bar=True, batch_size=bs)
        if self.per_task_backward:  # every backward of the step has run: synchronise before any callback saves
            self._sync_running_stats()
        return loss

    def on_after_backward(self) -> None:
        """Synchronise BatchNorm running statistics across ranks once the step's backward has run.

        Done here, not in ``on_train_batch_end``: Lightning calls the callbacks' ``on_train_batch_end``
        (``ModelCheckpoint``, ``PreemptionCheckpoint``) before the module's, and they would save
        unsynchronised statistics; and not in ``training_step``, whose backward still needs the
        statistics a frozen BatchNorm normalised with. (The per-task path syncs at the end of its
        ``training_step``, after its own backwards.)
        """
        if not self.per_task_backward:
            self._sync_running_stats()

    def _sync_running_stats(self) -> None:
        sync = self.__dict__.get("_running_stats_sync")
        if sync is not None and sync.active:
            sync.sync(self.all_gather)

    #: Learners whose meta-loss is the mean of independent per-task terms set this: their default
    #: training step then takes each task's gradient on its own (see :meth:`_task_split_loss`).
    _split_tasks_in_training = False

    def _splits_tasks(self, batch: Episode) -> bool:
        """Whether this training step takes the meta-gradient task by task (:meth:`_task_split_loss`).

        Only for learners that declare their meta-loss a mean of per-task terms, with the library's
        own ``meta_loss`` (a subclass's override may couple the tasks), no gradient hook on a
        parameter (``register_hook``: it would see each task's gradient and then their sum), more
        than one task, and a
        strategy and precision under which the returned loss is backpropagated as is: one device or
        DDP, not DeepSpeed (its engine runs the backward and partitions weights) and no gradient
        scaler (fp16).
        """
        if not self._split_tasks_in_training or batch.num_tasks < 2:
            return False
        if not type(self).meta_loss.__module__.startswith("lightning_meta."):
            return False
        if any(getattr(p, "_backward_hooks", None) for p in self.parameters() if p.requires_grad):
            return False  # a tensor hook would run on every task's gradient and again on their sum
        trainer = self._trainer
        if trainer is not None:
            from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

            strategy = trainer.strategy
            if "deepspeed" in type(strategy).__name__.lower():
                return False
            if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
                return False  # e.g. FSDP shards the parameters this differentiates against
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                return False
        return True

    def _task_split_loss(self, batch: Episode) -> Tensor:
        """The meta-loss, with its gradient computed one task at a time.

        Each task's share ``meta_loss(task) / B`` is differentiated with ``torch.autograd.grad``
        right away, so only one task's graph (its inner loop and query forward) is held at a time,
        as with ``per_task_backward`` but under automatic optimisation. The returned tensor has
        the meta-loss as its value and the summed gradients as its gradient (``sum(p * g)``), so
        Lightning's backward, DDP's gradient averaging, gradient accumulation and clipping apply
        to it unchanged. On a CPU this is faster than one backward over the whole meta-batch's
        graph (whose activations all stay allocated; ``benchmarks/inner_loop.md``) and holds
        about ``1/B`` of its activation memory.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        grads: list[Tensor | None] = [None] * len(params)
        total = torch.zeros((), device=self.device)
        scores, shown = [], []
        # closing: an error between two tasks leaves the generator's BatchNorm policy at once, not when
        # the traceback that holds this frame is freed
        self._train_scores, self._display_loss = None, None
        with contextlib.closing(self._task_losses(batch)) as task_losses:
            for loss in task_losses:
                got = (torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad
                       else [None] * len(params))
                for k, g in enumerate(got):
                    if g is not None:
                        grads[k] = g if grads[k] is None else grads[k] + g
                total = total + loss.detach()
                if self._train_scores is not None:
                    scores.append(self._train_scores)
                if self._display_loss is not None:
                    shown.append(self._display_loss)
                self._train_scores, self._display_loss = None, None  # what the next task sets
        self._train_scores = torch.cat(scores) if scores else None
        self._display_loss = torch.stack(shown).mean() if shown else None
        surrogate = sum(((p * g).sum() for p, g in zip(params, grads, strict=True) if g is not None),
                        torch.zeros((), device=self.device))
        return surrogate - surrogate.detach() + total

    def _task_losses(self, batch: Episode) -> Iterator[Tensor]:
        """Each task's share ``meta_loss(task) / B`` of the meta-loss, in order, one at a time.

        :meth:`_task_split_loss` differentiates each before asking for the next, and reads
        ``_train_scores`` / ``_display_loss`` after each. A learner whose :meth:`meta_loss` has
        per-call setup may override this to do it once per meta-batch, yielding the same values.
        """
        for i in range(batch.num_tasks):
            yield self.meta_loss(batch.select(i)) / batch.num_tasks

    def _per_task_step(self, batch: Episode) -> Tensor:
        """One optimizer step with a backward per task; returns the (detached) meta-loss."""
        opt = self.optimizers()
        self._check_per_task_schedulers()
        opt.zero_grad()
        strategy = self.trainer.strategy
        total, scores, shown = torch.zeros((), device=self.device), [], []
        for i in range(batch.num_tasks):
            last = i == batch.num_tasks - 1
            sync = contextlib.nullcontext()
            boundary = getattr(strategy, "set_task_boundary", None)
            if boundary is not None:  # DeepSpeed: only the last task's backward is an accumulation boundary
                boundary(last)
            elif not last and hasattr(strategy, "block_backward_sync"):
                sync = strategy.block_backward_sync()  # DDP: accumulate locally, reduce after the last task
            with sync:
                self._train_scores, self._display_loss = None, None
                loss = self.meta_loss(batch.select(i)) / batch.num_tasks
                self.manual_backward(loss)
            total = total + loss.detach()
            if self._train_scores is not None:
                scores.append(self._train_scores)
            if self._display_loss is not None:
                shown.append(self._display_loss)
        opt.step()
        self._step_lr_schedulers("step")
        if self.trainer.fit_loop.epoch_loop._num_ready_batches_reached():  # the epoch's last batch, as Lightning
            self._step_lr_schedulers("epoch")
        self._train_scores = torch.cat(scores) if scores else None
        self._display_loss = torch.stack(shown).mean() if shown else None
        return total

    # ------------------------------------------ per-task backward: what Lightning does in automatic mode
    def configure_callbacks(self) -> list[L.Callback]:
        """Refuse, before ``fit`` starts, Trainer settings that ``per_task_backward`` cannot honour.

        Lightning runs this hook before it checks the Trainer against manual optimisation, so the
        error names the setting the user chose (``per_task_backward``) instead of manual optimisation.
        Returns no callbacks.
        """
        trainer = self._trainer
        if not self.per_task_backward or trainer is None or trainer.state.fn != "fit":
            return []
        name = type(self).__name__
        clip = trainer.gradient_clip_val
        if clip is not None and clip > 0:
            raise MetaConfigError(
                f"Trainer(gradient_clip_val={clip}) cannot act with {name}(per_task_backward=True): one backward per "
                "task steps the optimizer itself (Lightning's manual optimisation, which has no automatic clipping); "
                "remove gradient_clip_val, or set per_task_backward=False (one backward per meta-batch)"
            )
        if trainer.accumulate_grad_batches != 1:
            raise MetaConfigError(
                f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) cannot act with "
                f"{name}(per_task_backward=True), which steps the optimizer itself after every meta-batch; it already "
                "accumulates over the tasks with flat memory, so raise the datamodule's meta_batch_size instead, or "
                "set per_task_backward=False"
            )
        return []

    def _check_per_task_schedulers(self) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                raise MetaConfigError(
                    f"ReduceLROnPlateau is not supported with {type(self).__name__}(per_task_backward=True): Lightning "
                    "drops a scheduler's monitor under the manual optimisation that one backward per task uses, so "
                    "the scheduler would get no metric; use per_task_backward=False, or a schedule without a metric "
                    "(StepLR, CosineAnnealingLR, ...)"
                )

    def _step_lr_schedulers(self, interval: str) -> None:
        """Step the schedulers of ``interval`` as Lightning's automatic optimisation does (``per_task_backward``).

        Manual optimisation leaves every scheduler to the module. This follows Lightning's rule:
        each scheduler of the Trainer's ``lr_scheduler_configs`` with this ``interval`` is stepped
        (through :meth:`lr_scheduler_step`) every ``frequency`` batches (``step``, after the
        optimizer step) or epochs (``epoch``, after the epoch's last batch).
        """
        trainer = self.trainer
        for config in trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            index = trainer.fit_loop.epoch_loop.batch_idx if interval == "step" else trainer.current_epoch
            if (index + 1) % config.frequency == 0:
                self.lr_scheduler_step(config.scheduler, None)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Repair the loop counters of checkpoints that Lightning 2.6 would resume at the wrong batch.

        See :func:`lightning_meta.fit_progress.repair_fit_progress` (checkpoints saved after ``fit``
        returned, chains of resumes through an epoch's last batch, epoch-end checkpoints of a run
        stopped mid-epoch); other checkpoints are left as they are.
        """
        repair = repair_fit_progress(checkpoint)
        if repair is not None:
            rank_zero_info(f"lightning-meta: {repair}")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Count the batch's decoded samples (shard datamodules) and start recording BatchNorm statistics.

        The running-statistics updates are recorded when training with several processes.
        """
        trainer = self._trainer
        tally = getattr(getattr(trainer, "datamodule", None), "consumed_batch", None)
        if callable(tally):  # ShardDataModule: a checkpoint saves the samples of consumed batches only
            tally(batch)
        wanted = self.sync_running_stats and trainer is not None and trainer.world_size > 1
        sync = self.__dict__.get("_running_stats_sync")
        if not wanted:
            if sync is not None:  # left by an interrupted multi-process fit
                self._drop_running_stats_sync()
            return
        if sync is None:
            sync = self._running_stats_sync = RunningStatsSync(self)
        sync.begin()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Give every rank the running statistics of one process that ran the whole global meta-batch.

        Normally done already, after the backward (:meth:`on_after_backward`), before the callbacks'
        hooks (checkpoints) ran; this catches a step without backward (``training_step`` returned None).
        """
        self._sync_running_stats()

    def on_train_end(self) -> None:  # noqa: D102
        self._drop_running_stats_sync()

    def _drop_running_stats_sync(self) -> None:
        sync = self.__dict__.pop("_running_stats_sync", None)
        if sync is not None:
            sync.remove()

    def _overrides_hooks_of(self, batched: type) -> bool:
        """Tell whether ``type(self)`` overrides :meth:`adapt` or :meth:`predict` below ``batched``.

        Learners with a batched fast path that never calls those hooks (``MAML``, ``ProtoNet``,
        ``MatchingNet``, ``RelationNet``, ``MetaOptNet``, the sequence learners) use the generic
        per-task path of this class instead when a subclass overrides them.
        """
        cls = type(self)
        return cls.adapt is not batched.adapt or cls.predict is not batched.predict

    def _log_this_step(self) -> bool:
        """Tell whether this step is one the logger writes (every ``log_every_n_steps``) and the first one.

        ``self.log`` costs about a millisecond in Lightning; for tiny models (sinusoid) calling
        it on steps whose values are never written would double the step time.
        """
        trainer = self._trainer
        if trainer is None:
            return True
        every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        return self.global_step == 0 or (self.global_step + 1) % every == 0

    def _eval_step(self, batch: Episode, stage: str) -> None:
        self.check_batch(batch)
        # Lightning evaluates under torch.inference_mode(); adaptation needs autograd, so leave it
        # and copy the batch into ordinary tensors.
        with torch.inference_mode(False), torch.enable_grad():
            batch = batch.clone()
            members = self.__dict__.get("_test_ensemble") if stage == "test" else None
            scores = self._ensemble_scores(members, batch) if members else self.evaluate(batch)
        main = self.val_metric if stage == "val" else self.test_metric
        extras = self.extra_val_metrics if stage == "val" else self.extra_test_metrics
        for name, values in scores.items():
            if name == self.score_name:
                main.update(values)
            else:
                if name not in extras:
                    extras[name] = EpisodicMean().to(self.device)
                extras[name].update(values)

    def validation_step(self, batch: Episode, batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch, "val")

    def test_step(self, batch: Episode, batch_idx: int) -> None:  # noqa: D102
        self._eval_step(batch, "test")

    def query_outputs(self, batch: Episode) -> Tensor:
        """Query outputs ``[B, nq, ...]`` of a meta-batch (logits or values), as :meth:`evaluate` scores them.

        The learner's batched path where it has one (:meth:`_batched_query_outputs`), else
        :meth:`adapt` and :meth:`predict` task by task. Needs autograd for the adaptation (call it
        outside ``torch.inference_mode``).
        """
        out = self._batched_query_outputs(batch)
        if out is None:
            out = torch.stack([self.predict(self.adapt(ep), ep.query_x).detach() for ep in batch.tasks()])
        return out.detach()

    def _ensemble_scores(self, members: Sequence[MetaLearner], batch: Episode) -> dict[str, Tensor]:
        """Per-episode scores of the members' averaged predictions (``CheckpointEnsemble``).

        Classification averages the members' softmax probabilities, regression their outputs.
        """
        outs = [m.query_outputs(batch) for m in members]
        outs = [o.float() if o.dtype in (torch.float16, torch.bfloat16) else o for o in outs]
        if self.task == "classification":
            mean = torch.stack([o.softmax(-1) for o in outs]).mean(0)
        else:
            mean = torch.stack(outs).mean(0)
        return {self.score_name: self.per_task_score(mean, batch.query_y)}

    def _batched_query_outputs(self, batch: Episode) -> Tensor | None:
        """Query outputs ``[B, nq, ...]`` of a meta-batch computed exactly as :meth:`evaluate` scores them.

        Learners whose :meth:`evaluate` runs a batched path that embeds each task's support and
        queries in one backbone pass (``ProtoNet``, ``MatchingNet``, ``RelationNet``,
        ``MetaOptNet``, the sequence learners) return that path's outputs here, so
        :meth:`predict_step` returns what ``validate``/``test`` scored: with a BatchNorm that uses
        batch statistics (training mode, or ``norm="batch_no_stats"`` in any mode) the support and
        the queries of a task are normalised together, which per-task ``adapt`` + ``predict``
        would not reproduce. None (the default, and whenever a subclass overrides :meth:`adapt`
        or :meth:`predict`) means :meth:`evaluate` goes through those hooks task by task, and so
        does :meth:`predict_step`.
        """
        return None

    def predict_step(self, batch: Episode, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Query predictions of each task: class ids (classification) or values (regression).

        The outputs are those :meth:`evaluate` scores: the learner's batched path where it has one
        (see :meth:`_batched_query_outputs`), else :meth:`adapt` and :meth:`predict` per task.
        """
        self.check_batch(batch)
        with torch.inference_mode(False), torch.enable_grad():
            out = self.query_outputs(batch.clone())
        if self.task == "classification":
            labels = out.argmax(-1)
            return {"labels": labels, "classes": torch.gather(batch.classes, 1, labels)}
        return {"values": out}

    def _log_epoch(self, stage: str) -> None:
        main = self.val_metric if stage == "val" else self.test_metric
        extras = self.extra_val_metrics if stage == "val" else self.extra_test_metrics
        results = {}
        if main.update_count > 0 or stage == "test":
            r = main.compute()
            results[f"{stage}/{self.score_name}"] = r["mean"].float()
            results[f"{stage}/{self.score_name}_ci95"] = r["ci95"].float()
            results[f"{stage}/episodes"] = r["n"].float()
        for name, metric in extras.items():
            r = metric.compute()
            results[f"{stage}/{name}"] = r["mean"].float()
            results[f"{stage}/{name}_ci95"] = r["ci95"].float()
            metric.reset()
        main.reset()
        if results:
            self.log_dict(results, sync_dist=False)  # already synchronised by the metrics
            if stage == "test":
                m, h = results[f"test/{self.score_name}"].item(), results[f"test/{self.score_name}_ci95"].item()
                n = int(results["test/episodes"].item())
                scale, unit = (100.0, "%") if self.task == "classification" else (1.0, "")
                rank_zero_info(
                    f"meta-test {self.score_name}: {m * scale:.2f}{unit} ± {h * scale:.2f}{unit} (95% CI, {n} episodes)"
                )

    def on_validation_epoch_end(self) -> None:  # noqa: D102
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:  # noqa: D102
        self._log_epoch("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam over all trainable parameters (override with LightningCLI's ``--optimizer``)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
