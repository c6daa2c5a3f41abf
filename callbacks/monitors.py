"""Callbacks that show what a meta-learner is doing.

Episode pictures, inner-loop curves, meta-overfitting, derivative-order annealing, throughput
and learned inner learning rates.

Every callback takes flat typed arguments, so LightningCLI configures it from YAML::

    trainer:
      callbacks:
        - class_path: lightning_meta.callbacks.InnerLoopMonitor
          init_args: {num_episodes: 8, steps: 10}

Values are written from global rank zero to every logger (TensorBoard, CSV, ...) and copied
into ``trainer.callback_metrics``, so ``ModelCheckpoint`` / ``EarlyStopping`` can monitor them.
Pictures and histograms need a TensorBoard logger; without one they are skipped with a single
warning.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import replace
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_meta.callbacks._common import (
    clone_tasks,
    eval_grad_context,
    log_scalars,
    logging_step,
    require_meta_learner,
    tensorboard_writer,
    val_episodes_per_run,
)
from lightning_meta.episode import Episode, collate_episodes
from lightning_meta.errors import MetaConfigError, require_non_negative
from lightning_meta.functional import bn_policy, mean_ci95_from_stats

__all__ = [
    "DerivativeOrderAnnealing",
    "EpisodeGallery",
    "InnerLoopMonitor",
    "LearnedLRMonitor",
    "MetaOverfittingMonitor",
    "ThroughputMonitor",
    "episode_grid",
]

SUPPORT_COLOUR = (0.25, 0.45, 1.0)  # blue
RIGHT_COLOUR = (0.0, 0.8, 0.0)  # green
WRONG_COLOUR = (0.9, 0.0, 0.0)  # red
SEPARATOR_COLOUR = 1.0  # white band between the support and the query block
BACKGROUND = 0.1

# the epoch number under which MetaOverfittingMonitor draws its held-out training-class episodes:
# a fixed list that the training stream (epochs 0, 1, 2, ...) never reaches
HELDOUT_EPOCH = 1_000_003


def _positive(name: str, value: int, hint: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MetaConfigError(f"{name}={value!r} must be an integer >= 1{hint}")


def _maml_class() -> type:
    from lightning_meta.algorithms.maml import MAML

    return MAML


def _require_gradient_based(pl_module: L.LightningModule, who: str) -> None:
    if not isinstance(pl_module, _maml_class()):
        raise MetaConfigError(
            f"{who} needs a gradient-based learner (MAML, ANIL, MetaSGD, MAMLPlusPlus, Reptile, IMAML or a subclass), "
            f"but the model is {type(pl_module).__name__}, which does not adapt by inner gradient steps; "
            f"remove {who} from trainer.callbacks for this model"
        )


def _refuse_too_many(who: str, wanted: int, trainer: L.Trainer) -> None:
    available = val_episodes_per_run(trainer)
    if available is not None and wanted > available:
        dm = trainer.datamodule
        raise MetaConfigError(
            f"{who}(num_episodes={wanted}) asks for more validation episodes than one validation run shows on rank 0: "
            f"{available} (data val_episodes={dm.val_episodes}, eval_meta_batch_size={dm.eval_meta_batch_size}, "
            f"world size {trainer.world_size}, limit_val_batches={trainer.limit_val_batches}); "
            f"set num_episodes <= {available} or raise data.val_episodes"
        )


def _refuse_zero3(who: str, trainer: L.Trainer) -> None:
    if getattr(trainer.strategy, "zero_stage_3", False):
        raise MetaConfigError(
            f"{who} runs extra forward passes on rank 0 alone, which DeepSpeed ZeRO-3 cannot do (each forward "
            f"gathers the partitioned weights from every rank, so rank 0 would wait forever); remove {who} from "
            "the callbacks, or use ZeRO stage 2 (deepspeed_meta_stage_2 / deepspeed_cpu_stage_2)"
        )


class _EpisodeCapture(Callback):
    """Keeps the first ``num_episodes`` validation episodes of every ``every_n_val``-th run on rank zero.

    The episodes are captured on rank 0 and :meth:`_report` runs on every rank (so that a subclass
    can share rank 0's result, e.g. for ``ModelCheckpoint(monitor=...)`` on every rank).
    """

    name = "?"

    def __init__(self, num_episodes: int, every_n_val: int) -> None:
        _positive("num_episodes", num_episodes)
        _positive("every_n_val", every_n_val)
        self.num_episodes = num_episodes
        self.every_n_val = every_n_val
        self.val_runs = 0  # completed (non-sanity) validation runs, saved in checkpoints
        self._episodes: list[Episode] = []
        self._capturing = self._reporting = False
        self._active = True
        self._seen = 0  # episodes of the current run on rank zero (for the size check without a datamodule)
        self._size_checked = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(num_episodes=self.num_episodes, every_n_val=self.every_n_val)

    def _due(self, trainer: L.Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        if trainer.state.fn != TrainerFn.FITTING:  # `validate`: the run asked for, always reported
            return True
        return (self.val_runs + 1) % self.every_n_val == 0

    def _accepts(self, batch: Episode) -> bool:
        return True

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._episodes = []
        self._seen = 0
        self._reporting = self._active and self._due(trainer)  # the same on every rank
        self._capturing = self._reporting and trainer.is_global_zero

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx != 0 or not isinstance(batch, Episode):
            return
        self._seen += batch.num_tasks
        if not self._capturing or len(self._episodes) >= self.num_episodes:
            return
        if not self._accepts(batch):
            self._capturing = False
            return
        self._episodes += clone_tasks(batch, self.num_episodes - len(self._episodes))

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if not self._size_checked:
            self._size_checked = True
            seen = trainer.strategy.broadcast(self._seen)  # rank 0's count, so that every rank refuses together
            if seen < self.num_episodes:
                raise MetaConfigError(
                    f"{self.name}(num_episodes={self.num_episodes}) asks for more validation episodes than the "
                    f"validation run had on rank 0 ({seen}); set num_episodes <= {seen} or use more "
                    "validation episodes"
                )
        if getattr(self, "_reporting", False):
            self._report(trainer, pl_module, self._episodes)
        self._episodes = []
        self._capturing = self._reporting = False
        if trainer.state.fn == TrainerFn.FITTING:  # every_n_val counts the validations of training
            self.val_runs += 1

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, episodes: list[Episode]) -> None:
        raise NotImplementedError

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"val_runs": self.val_runs}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_runs = int(state_dict.get("val_runs", 0))


# --------------------------------------------------------------------------- gallery
def _to_rgb(x: Tensor) -> Tensor:
    """``[n, C, H, W]`` -> ``[n, 3, H, W]`` (grey images are repeated, other channel counts averaged)."""
    if x.shape[1] == 3:
        return x
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    return x.expand(-1, 3, -1, -1)


def episode_grid(episode: Episode, predictions: Tensor | None = None, max_queries_per_class: int = 5,
                 border: int = 2, gap: int = 4) -> Tensor:
    """One picture of a classification episode: ``[3, H, W]`` floats in ``[0, 1]``.

    Row ``c`` of the top block shows the support images of class ``c`` (blue frames); row ``c``
    of the bottom block, below a white band, shows up to ``max_queries_per_class`` query images
    whose true class is ``c``, framed green when ``predictions`` got them right and red when
    wrong (grey without predictions). Pixel values are rescaled to ``[0, 1]`` over the episode.

    Args:
        episode: one (unbatched) episode with images ``[n, C, H, W]``.
        predictions: predicted labels of the queries ``[N*Q]``, or ``None``.
        max_queries_per_class: query images shown per class.
        border: frame width in pixels.
        gap: height of the band between the blocks.

    Example:
        >>> ep = Episode(torch.rand(2, 1, 8, 8), torch.arange(2), torch.rand(4, 1, 8, 8),
        ...              torch.tensor([0, 0, 1, 1]), torch.tensor([4, 7]))
        >>> episode_grid(ep, torch.tensor([0, 1, 1, 1])).shape
        torch.Size([3, 52, 24])

    """
    if episode.is_batched or episode.support_x.dim() != 4 or episode.ways == 0:
        raise ValueError(
            "episode_grid draws one classification episode of images [n, C, H, W]; got support_x of shape "
            f"{tuple(episode.support_x.shape)} with {episode.ways} ways"
        )
    sx, qx = episode.support_x.detach().float().cpu(), episode.query_x.detach().float().cpu()
    lo = torch.minimum(sx.min(), qx.min())
    hi = torch.maximum(sx.max(), qx.max())
    scale = (hi - lo).clamp(min=1e-8)
    sx, qx = _to_rgb((sx - lo) / scale), _to_rgb((qx - lo) / scale)
    sy, qy = episode.support_y.cpu(), episode.query_y.cpu()
    preds = None if predictions is None else predictions.detach().cpu().reshape(-1)
    ways = episode.ways
    support_rows = [torch.nonzero(sy == c).flatten().tolist() for c in range(ways)]
    query_rows = [torch.nonzero(qy == c).flatten().tolist()[:max_queries_per_class] for c in range(ways)]
    cols = max(1, max(len(r) for r in support_rows), max(len(r) for r in query_rows))
    h, w = sx.shape[-2:]
    ch, cw = h + 2 * border, w + 2 * border
    canvas = torch.full((3, 2 * ways * ch + gap, cols * cw), BACKGROUND)
    canvas[:, ways * ch: ways * ch + gap] = SEPARATOR_COLOUR

    def put(img: Tensor, row: int, col: int, colour: tuple[float, float, float], top: int) -> None:
        y0, x0 = top + row * ch, col * cw
        canvas[:, y0: y0 + ch, x0: x0 + cw] = torch.tensor(colour).view(3, 1, 1)
        canvas[:, y0 + border: y0 + border + h, x0 + border: x0 + border + w] = img

    for c, items in enumerate(support_rows):
        for j, i in enumerate(items):
            put(sx[i], c, j, SUPPORT_COLOUR, 0)
    for c, items in enumerate(query_rows):
        for j, i in enumerate(items):
            colour = (0.5, 0.5, 0.5) if preds is None else (RIGHT_COLOUR if preds[i] == qy[i] else WRONG_COLOUR)
            put(qx[i], c, j, colour, ways * ch + gap)
    return canvas


class EpisodeGallery(_EpisodeCapture):
    """TensorBoard pictures of a few validation episodes: support set, query set and predictions.

    Every ``every_n_val``-th validation run, the first ``num_episodes`` validation episodes of
    global rank zero are adapted and predicted once more and drawn with :func:`episode_grid`
    (support images in blue frames, one row per class; query images framed green when predicted
    right, red when wrong), under the tags ``{tag}/episode_{i}``. The validation list is fixed,
    so the same episodes appear every time and the pictures show how predictions change.

    Without a TensorBoard logger, or for episodes that are not images (sinusoid regression), it
    draws nothing and warns once.

    Args:
        num_episodes: episodes drawn per run (at most the episodes rank zero validates).
        every_n_val: draw on every N-th validation run of training (the N-th, 2N-th, ...); a
            ``validate`` run always draws.
        max_queries_per_class: query images shown per class.
        border: frame width in pixels.
        tag: TensorBoard tag prefix.

    Raises:
        MetaConfigError: at setup, for non-positive arguments, a model without ``adapt``/``predict``,
            or ``num_episodes`` above the validation episodes of one run.

    Example:
        >>> from lightning.pytorch.loggers import TensorBoardLogger
        >>> trainer = L.Trainer(logger=TensorBoardLogger("logs"),
        ...                     callbacks=[EpisodeGallery(num_episodes=2, every_n_val=5)])

        In YAML: ``- class_path: lightning_meta.callbacks.EpisodeGallery`` with
        ``init_args: {num_episodes: 2, every_n_val: 5}``.

    """

    name = "EpisodeGallery"

    def __init__(self, num_episodes: int = 4, every_n_val: int = 1, max_queries_per_class: int = 5, border: int = 2,
                 tag: str = "gallery") -> None:
        super().__init__(num_episodes, every_n_val)
        _positive("max_queries_per_class", max_queries_per_class)
        _positive("border", border)
        self.max_queries_per_class = max_queries_per_class
        self.border = border
        self.tag = tag
        self.images_logged = 0
        self._warned = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        require_meta_learner(pl_module, self.name, ("adapt", "predict"))
        _refuse_too_many(self.name, self.num_episodes, trainer)
        _refuse_zero3(self.name, trainer)
        self._active = True
        if getattr(pl_module, "task", "classification") != "classification":
            self._skip("the model solves a regression task (there are no classes or images to draw)")
        elif tensorboard_writer(trainer) is None:
            self._skip("no TensorBoard logger is configured (set trainer.logger to a TensorBoardLogger)")

    def _skip(self, why: str) -> None:
        if not self._warned:
            rank_zero_warn(f"EpisodeGallery draws nothing: {why}")
            self._warned = True
        self._active = False

    def _accepts(self, batch: Episode) -> bool:
        if batch.support_x.dim() != 5 or batch.ways == 0:
            self._skip(f"the episodes are not images (support_x has shape {tuple(batch.support_x.shape)})")
            return False
        return True

    @staticmethod
    def _predictions(pl_module: L.LightningModule, ep: Episode) -> Tensor:
        """Query class ids of one episode, as validation scored them (the learner's batched path if it has one)."""
        batched = getattr(pl_module, "_batched_query_outputs", None)
        out = batched(collate_episodes([ep])) if batched is not None else None
        logits = out[0] if out is not None else pl_module.predict(pl_module.adapt(ep), ep.query_x)
        return logits.argmax(-1)

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, episodes: list[Episode]) -> None:
        writer = tensorboard_writer(trainer)
        if writer is None or not trainer.is_global_zero:
            return
        with eval_grad_context():
            for i, ep in enumerate(episodes):
                ep = ep.to(pl_module.device)
                preds = self._predictions(pl_module, ep)
                img = episode_grid(ep, preds, self.max_queries_per_class, self.border)
                writer.add_image(f"{self.tag}/episode_{i}", img, global_step=logging_step(trainer),
                                 dataformats="CHW")
                self.images_logged += 1


# ------------------------------------------------------------------------ inner loop
class InnerLoopMonitor(_EpisodeCapture):
    """Support and query loss (and accuracy) after each inner step, for gradient-based learners.

    Every ``every_n_val``-th validation run, the first ``num_episodes`` validation episodes of
    global rank zero are adapted again for ``steps`` inner steps (the model's own evaluation
    adaptation, :meth:`~lightning_meta.algorithms.MAML.task_query_outputs`, so ANIL, Meta-SGD,
    MAML++ and iMAML are monitored as they evaluate), and the mean over those episodes of

    - ``{prefix}/support_loss_step{k}``, ``{prefix}/query_loss_step{k}`` for ``k = 0..steps``
      (``k = 0`` is the meta-learned initialisation, before any step),
    - ``{prefix}/support_acc_step{k}``, ``{prefix}/query_acc_step{k}`` (classification),
    - ``{prefix}/query_gain``: query accuracy (classification) or minus query loss (regression)
      after the last step minus before the first: what adaptation buys,

    is logged. With TensorBoard, a "Custom Scalars" layout draws all steps of each quantity in
    one chart; a query curve that flattens early says more steps do not help, and a support loss
    that falls while the query loss rises says the inner loop overfits the support set.

    Args:
        num_episodes: validation episodes averaged (at most the episodes rank zero validates).
        every_n_val: compute on every N-th validation run of training; a ``validate`` run always
            computes.
        steps: inner steps to follow (default: the model's ``eval_inner_steps``); may exceed the
            trained number to see where adaptation saturates.
        prefix: metric name prefix.

    Raises:
        MetaConfigError: at setup, when the model is not gradient-based (ProtoNet, SNAIL, ...),
            or ``num_episodes`` is too large. (MAML++ steps beyond its trained ones reuse the last
            learned rate, as its evaluation does.)

    Example:
        >>> trainer = L.Trainer(callbacks=[InnerLoopMonitor(num_episodes=8, steps=10)])

        In YAML: ``- class_path: lightning_meta.callbacks.InnerLoopMonitor`` with
        ``init_args: {num_episodes: 8, steps: 10}``.

    """

    name = "InnerLoopMonitor"

    def __init__(self, num_episodes: int = 8, every_n_val: int = 1, steps: int | None = None,
                 prefix: str = "inner") -> None:
        super().__init__(num_episodes, every_n_val)
        if steps is not None:
            _positive("steps", steps, " (or null for the model's eval_inner_steps)")
        self.steps = steps
        self.prefix = prefix
        self.last: dict[str, float] = {}
        self._layout_written = False

    def _steps(self, pl_module: L.LightningModule) -> int:
        return self.steps if self.steps is not None else int(pl_module.eval_inner_steps)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in ("fit", "validate"):
            return
        _require_gradient_based(pl_module, self.name)
        _refuse_too_many(self.name, self.num_episodes, trainer)
        _refuse_zero3(self.name, trainer)
        writer = tensorboard_writer(trainer)
        if writer is not None and trainer.is_global_zero and not self._layout_written:
            p = self.prefix
            charts = {f"{part} {kind}": ["Multiline", [rf"^{p}/{part}_{kind}_step\d+$"]]
                      for part in ("support", "query") for kind in ("loss", "acc")}
            writer.add_custom_scalars({f"{p}: inner loop by step": charts})
            self._layout_written = True

    def curves(self, pl_module: L.LightningModule, episodes: list[Episode]) -> dict[str, float]:
        """Mean support/query loss (and accuracy) after each inner step over ``episodes``."""
        steps = self._steps(pl_module)
        report = list(range(1, steps + 1))
        sums: dict[str, float] = defaultdict(float)
        classification = pl_module.task == "classification"
        adapted, frozen = pl_module.split_parameters(detach=True)
        buffers = pl_module.model_buffers()
        with eval_grad_context():
            for ep in episodes:
                ep = ep.to(pl_module.device)
                for part, x, y in (("support", ep.support_x, ep.support_y), ("query", ep.query_x, ep.query_y)):
                    with bn_policy(pl_module.model, pl_module.bn):
                        final, outs = pl_module.task_query_outputs(adapted, frozen, buffers, ep.support_x,
                                                                   ep.support_y, x, steps, True, report=report)
                        with torch.no_grad():
                            outs = {0: pl_module.forward_fast(adapted, frozen, buffers, x), **outs}
                    outs[steps] = final
                    for k in range(steps + 1):
                        out = outs[k].detach()
                        sums[f"{part}_loss_step{k}"] += float(pl_module.loss_fn(out, y))
                        if classification:
                            sums[f"{part}_acc_step{k}"] += float(pl_module.score_fn(out, y))
        n = max(1, len(episodes))
        result = {f"{self.prefix}/{k}": v / n for k, v in sums.items()}
        p = self.prefix
        if classification:
            result[f"{p}/query_gain"] = result[f"{p}/query_acc_step{steps}"] - result[f"{p}/query_acc_step0"]
        else:
            result[f"{p}/query_gain"] = result[f"{p}/query_loss_step0"] - result[f"{p}/query_loss_step{steps}"]
        return result

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, episodes: list[Episode]) -> None:
        # computed on rank 0 (its captured episodes), then shared: every rank's callback_metrics get
        # the values, so ModelCheckpoint / EarlyStopping monitoring them agree on every rank
        result = self.curves(pl_module, episodes) if trainer.is_global_zero else None
        self.last = trainer.strategy.broadcast(result)
        log_scalars(trainer, self.last)


# -------------------------------------------------------------------- meta-overfitting
def _eval_shaped(source: Any, dm: Any) -> tuple[Any, bool]:
    """Copy the training source so that it makes episodes of the evaluation shape; ``(source, exact)``."""
    train_shape = (getattr(dm, "ways", None), getattr(dm, "shots", None), getattr(dm, "queries", None))
    eval_shape = (getattr(dm, "eval_ways", None), getattr(dm, "eval_shots", None), getattr(dm, "eval_queries", None))
    if train_shape == eval_shape or None in eval_shape:
        return source, True
    from lightning_meta.data.sampling import FixedShape

    shape = getattr(source, "shape", None)
    if isinstance(shape, FixedShape):
        new = replace(shape, ways=eval_shape[0], shots=eval_shape[1], queries=eval_shape[2])
        counts = getattr(source, "counts", None)
        if counts is not None and (len(counts) < new.ways or min(counts) < new.shots + new.queries):
            raise MetaConfigError(
                f"MetaOverfittingMonitor scores training-class episodes in the validation shape ({new.ways}-way, "
                f"{new.shots} shots + {new.queries} queries per class), but the training split has {len(counts)} "
                f"classes with as few as {min(counts)} examples; lower eval_ways/eval_shots/eval_queries or remove "
                "the callback"
            )
        out = copy.copy(source)
        out.shape = new
        return out, True
    if hasattr(source, "shots") and hasattr(source, "queries"):  # regression sources: no classes
        out = copy.copy(source)
        out.shots, out.queries = eval_shape[1], eval_shape[2]
        return out, True
    return source, False


def _with_own_counter(source: Any) -> Any:
    """A shallow copy of ``source`` whose corrupt-sample counter is its own (``source`` if it counts nothing).

    The datamodule's training source counts the samples it decodes in a counter shared with its
    dataloader workers; the training stream's total is saved in checkpoints and is the denominator
    of the corrupt-sample fraction. Held-out episodes read through a private counter (same
    threshold) leave that total alone. A multi-source training source (``MultiSourceEpisodes``)
    holds one source per data set: each is copied, all sharing the one new counter.
    """
    from lightning_meta.data.faults import SampleCounter

    parts = getattr(source, "sources", None)
    multi = isinstance(parts, list)
    leaves = list(parts) if multi else [source]
    olds = [getattr(leaf, "counter", None) for leaf in leaves]
    first = next((c for c in olds if isinstance(c, SampleCounter)), None)
    if first is None:
        return source
    counter = SampleCounter(first.max_fraction, 1, f"{first.where} (MetaOverfittingMonitor's held-out episodes)")
    copies = []
    for leaf, old in zip(leaves, olds, strict=True):
        if isinstance(old, SampleCounter):
            leaf = copy.copy(leaf)
            leaf.counter = counter
        copies.append(leaf)
    if not multi:
        return copies[0]
    out = copy.copy(source)
    out.sources = copies
    return out


class MetaOverfittingMonitor(Callback):
    """The gap between accuracy on training-class episodes and on validation-class episodes.

    Meta-overfitting (the learner solves new tasks made of the classes it trained on, but not
    tasks made of new classes) shows as a growing gap. At the end of every ``every_n_val``-th
    validation run, ``episodes`` held-out episodes of the *training* classes, in the validation
    shape (``eval_ways``/``eval_shots``/``eval_queries``), are scored with the model's own
    ``evaluate`` (the validation protocol, same inner steps). They come from the datamodule's
    training source under a reserved epoch number, so they are a fixed list, the same at every
    check, and not episodes the training stream draws. Under DDP the list is split over ranks and
    the sums are reduced, so every rank sees the same numbers.

    Logged: ``meta_overfit/train_{acc|mse}`` (± ``_ci95``) and ``meta_overfit/gap`` = train score
    minus ``monitor`` (``mode="max"``, accuracy) or ``monitor`` minus train score (``mode="min"``,
    MSE); positive means better on training classes. Scoring training-class episodes rather than
    averaging ``train/acc`` of the training steps keeps both sides comparable: same shape, same
    evaluation-mode adaptation, same weights, fixed episodes.

    With ``early_stopping=True`` it stops training after ``patience`` consecutive checks in which
    ``monitor`` did not improve on its best by more than ``min_delta`` while the gap exceeded its
    value at that best by more than ``min_delta``. (A plateau with a steady gap is not
    meta-overfitting; use Lightning's ``EarlyStopping`` for that.)

    Args:
        episodes: training-class episodes scored per check.
        monitor: the validation metric compared (default ``val/acc``, or ``val/mse`` for regression).
        mode: ``max`` if higher ``monitor`` is better (default for accuracy), ``min`` otherwise.
        early_stopping: stop when the gap grows while validation stalls.
        patience: consecutive bad checks before stopping.
        min_delta: the smallest change counted as an improvement of ``monitor`` or growth of the gap.
        every_n_val: check on every N-th validation run.
        verbose: report the stop decision.

    Raises:
        MetaConfigError: at setup for bad arguments or a datamodule without a training episode source;
            at the first validation end when ``monitor`` is not logged.

    Example:
        >>> trainer = L.Trainer(callbacks=[MetaOverfittingMonitor(episodes=100, early_stopping=True,
        ...                                                       patience=3)])

        In YAML: ``- class_path: lightning_meta.callbacks.MetaOverfittingMonitor`` with
        ``init_args: {episodes: 100, early_stopping: true, patience: 3}``.

    """

    def __init__(self, episodes: int = 100, monitor: str | None = None, mode: Literal["max", "min"] | None = None,
                 early_stopping: bool = False, patience: int = 3, min_delta: float = 0.0, every_n_val: int = 1,
                 verbose: bool = True) -> None:
        _positive("episodes", episodes)
        _positive("patience", patience)
        _positive("every_n_val", every_n_val)
        if mode not in (None, "max", "min"):
            raise MetaConfigError(f"mode={mode!r} is not supported; use 'max', 'min' or null (from the model's task)")
        require_non_negative("min_delta", min_delta, "the smallest change counted as an improvement")
        self.episodes = episodes
        self.monitor = monitor
        self.mode = mode
        self.early_stopping = early_stopping
        self.patience = patience
        self.min_delta = float(min_delta)
        self.every_n_val = every_n_val
        self.verbose = verbose
        self.val_runs = 0
        self.best: float | None = None
        self.gap_at_best: float | None = None
        self.wait = 0
        self.stopped_epoch: int | None = None
        self.last: dict[str, float] = {}
        self._source: Any = None
        self._key_checked = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, episodes=self.episodes)

    def _monitor(self, pl_module: L.LightningModule) -> str:
        return self.monitor or f"val/{pl_module.score_name}"

    def _mode(self, pl_module: L.LightningModule) -> str:
        return self.mode or ("max" if pl_module.score_name == "acc" else "min")

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        require_meta_learner(pl_module, "MetaOverfittingMonitor", ("evaluate", "score_name"))
        dm = trainer.datamodule
        sources = getattr(dm, "sources", None)
        if not isinstance(sources, Mapping) or "train" not in sources:
            raise MetaConfigError(
                "MetaOverfittingMonitor draws held-out episodes of the training classes from the datamodule's "
                f"training episode source, but the datamodule ({type(dm).__name__}) has none; use a lightning_meta "
                "EpisodicDataModule (ShardDataModule, SinusoidDataModule, ...) with trainer.fit(model, datamodule=...)"
            )
        source, exact = _eval_shaped(sources["train"], dm)
        # its own corrupt-sample counter: the held-out reads must not count as reads of the training stream
        self._source = _with_own_counter(source)
        if not exact:
            rank_zero_warn(
                f"MetaOverfittingMonitor: the training source {type(sources['train']).__name__} cannot make episodes "
                "in the validation shape; training-class episodes keep the training shape, so the gap also reflects "
                "the shape difference"
            )

    def _check_key(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool:
        key = self._monitor(pl_module)
        metrics = trainer.callback_metrics
        if key in metrics:
            self._key_checked = True
            return True
        if trainer.sanity_checking and not any(k.startswith("val") for k in metrics):
            return False  # nothing logged yet in the sanity check: decide at the first real validation
        raise MetaConfigError(
            f"MetaOverfittingMonitor(monitor={key!r}): the model never logs {key!r}; logged metrics are "
            f"{sorted(metrics)}; set monitor to one of them (the validation counterpart of "
            f"{pl_module.score_name!r}, such as val/{pl_module.score_name})"
        )

    def train_class_score(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[float, float]:
        """Mean and 95% CI half-width of the model's score over the held-out training-class episodes."""
        rank, world = trainer.global_rank, max(1, trainer.world_size)
        indices = list(range(rank, self.episodes, world))
        real = len(indices)
        # every rank runs the same number of equal-sized evaluate calls (DeepSpeed ZeRO-3 gathers weights in
        # each forward, collectively): a rank with one episode fewer repeats its first one, excluded below
        indices += indices[:1] * (-(-self.episodes // world) - real)
        bs = int(getattr(trainer.datamodule, "eval_meta_batch_size", 8) or 8)
        stats = torch.zeros(3, dtype=torch.float64)
        with eval_grad_context():
            for s in range(0, len(indices), bs):
                eps = [self._source.episode("train", HELDOUT_EPOCH, i) for i in indices[s: s + bs]]
                # the same transfer hooks a validation batch goes through (user hooks, device, precision)
                batch = collate_episodes(eps)
                before = getattr(pl_module, "_on_before_batch_transfer", None)
                batch = trainer.strategy.batch_to_device(before(batch, dataloader_idx=0) if before else batch)
                scores = pl_module.evaluate(batch)[pl_module.score_name].detach().double().cpu()
                scores = scores[: max(0, min(len(eps), real - s))]  # drop the repeated padding episode
                stats += torch.stack([scores.sum(), (scores**2).sum(), torch.tensor(float(scores.numel()))])
        stats = trainer.strategy.reduce(stats.to(pl_module.device), reduce_op="sum").cpu()
        mean, half = mean_ci95_from_stats(stats[0], stats[1], stats[2])
        return float(mean), float(half)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._key_checked and not self._check_key(trainer, pl_module):
            return
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._source is None:
            return
        self.val_runs += 1
        if self.val_runs % self.every_n_val:
            return
        key, score = self._monitor(pl_module), pl_module.score_name
        val = float(trainer.callback_metrics[key])
        train, half = self.train_class_score(trainer, pl_module)
        gap = train - val if self._mode(pl_module) == "max" else val - train
        self.last = {f"meta_overfit/train_{score}": train, f"meta_overfit/train_{score}_ci95": half,
                     "meta_overfit/gap": gap}
        log_scalars(trainer, self.last)
        if self.early_stopping:
            self._update(trainer, pl_module, val, gap)

    def _update(self, trainer: L.Trainer, pl_module: L.LightningModule, val: float, gap: float) -> None:
        sign = 1.0 if self._mode(pl_module) == "max" else -1.0
        if self.best is None or sign * (val - self.best) > self.min_delta:
            self.best, self.gap_at_best, self.wait = val, gap, 0
        elif gap > self.gap_at_best + self.min_delta:
            self.wait += 1
        else:
            self.wait = 0
        stop = trainer.strategy.reduce_boolean_decision(torch.tensor(self.wait >= self.patience), all=False)
        if stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch
            if self.verbose:
                rank_zero_info(
                    f"MetaOverfittingMonitor: stopping at epoch {trainer.current_epoch}, step {trainer.global_step}: "
                    f"{self._monitor(pl_module)} has not improved on {self.best:.4f} for {self.wait} checks while "
                    f"the train-val gap grew from {self.gap_at_best:.4f} to {gap:.4f}"
                )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"val_runs": self.val_runs, "best": self.best, "gap_at_best": self.gap_at_best, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.val_runs = int(state_dict.get("val_runs", 0))
        self.best = state_dict.get("best")
        self.gap_at_best = state_dict.get("gap_at_best")
        self.wait = int(state_dict.get("wait", 0))
        self.stopped_epoch = state_dict.get("stopped_epoch")


# ------------------------------------------------------------ derivative-order annealing
class DerivativeOrderAnnealing(Callback):
    """First-order meta-gradients for the first epochs (or steps), second order afterwards (MAML++ "DA").

    Sets the learner's ``first_order`` flag before every training batch from the trainer's own
    counters (``current_epoch < first_order_epochs`` or ``global_step < first_order_steps``), so
    a run resumed from a checkpoint continues in the right regime with no state of its own.
    Evaluation is unaffected (it never back-propagates to the initialisation).

    Args:
        first_order_epochs: train first-order while ``current_epoch`` is below this.
        first_order_steps: train first-order while ``global_step`` (optimizer steps) is below this.
            Set exactly one of the two.
        verbose: announce the switch to second order.

    Raises:
        MetaConfigError: for bad arguments; at setup for models that are not MAML-style, that are
            first-order by construction (Reptile, iMAML) or that anneal on their own (MAMLPlusPlus:
            use its ``first_order_epochs``).

    Example:
        >>> trainer = L.Trainer(callbacks=[DerivativeOrderAnnealing(first_order_epochs=50)])

        In YAML: ``- class_path: lightning_meta.callbacks.DerivativeOrderAnnealing`` with
        ``init_args: {first_order_epochs: 50}``.

    """

    def __init__(self, first_order_epochs: int | None = None, first_order_steps: int | None = None,
                 verbose: bool = True) -> None:
        if (first_order_epochs is None) == (first_order_steps is None):
            raise MetaConfigError(
                f"DerivativeOrderAnnealing needs exactly one of first_order_epochs ({first_order_epochs}) and "
                f"first_order_steps ({first_order_steps}); set one, e.g. first_order_epochs: 50"
            )
        for name, value in (("first_order_epochs", first_order_epochs), ("first_order_steps", first_order_steps)):
            if value is not None and (not isinstance(value, int) or value < 0):
                raise MetaConfigError(f"{name}={value!r} must be an integer >= 0")
        self.first_order_epochs = first_order_epochs
        self.first_order_steps = first_order_steps
        self.verbose = verbose
        self.switched_at_step: int | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(first_order_epochs=self.first_order_epochs,
                                        first_order_steps=self.first_order_steps)

    def first_order_now(self, trainer: L.Trainer) -> bool:
        """Whether the current training step is first-order."""
        if self.first_order_epochs is not None:
            return trainer.current_epoch < self.first_order_epochs
        return trainer.global_step < self.first_order_steps

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.switched_at_step = None  # a new fit; a resumed one restores its switch step after this hook
        _require_gradient_based(pl_module, "DerivativeOrderAnnealing")
        from lightning_meta.algorithms import IMAML, MAMLPlusPlus, Reptile

        if isinstance(pl_module, MAMLPlusPlus):
            raise MetaConfigError(
                "DerivativeOrderAnnealing does not drive MAMLPlusPlus, which anneals the derivative order itself; "
                "set model.first_order_epochs instead and remove the callback"
            )
        if isinstance(pl_module, (Reptile, IMAML)):
            raise MetaConfigError(
                f"{type(pl_module).__name__} never back-propagates through the inner loop (it is first-order by "
                "construction), so DerivativeOrderAnnealing has nothing to anneal; remove the callback"
            )

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        first = self.first_order_now(trainer)
        if bool(pl_module.first_order) == first:
            return
        pl_module.first_order = first
        if not first and self.switched_at_step is None:  # a resumed run restored the step of its switch
            self.switched_at_step = trainer.global_step
            if self.verbose:
                rank_zero_info(
                    f"DerivativeOrderAnnealing: second-order meta-gradients from epoch {trainer.current_epoch}, "
                    f"step {trainer.global_step}"
                )
        log_scalars(trainer, {"train/second_order": float(not first)})

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._apply(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._apply(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"switched_at_step": self.switched_at_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switched_at_step = state_dict.get("switched_at_step")


# ------------------------------------------------------------------------ throughput
def _episodes_in(batch: Any) -> int:
    if isinstance(batch, Episode):
        return batch.num_tasks
    try:
        return len(batch)
    except TypeError:
        return 1


class ThroughputMonitor(Callback):
    """Training episodes per second and the fraction of step time spent waiting for data.

    A step's time runs from the end of the previous training batch to the end of this one; the
    *wait* is the part before ``on_train_batch_start`` (fetching the batch, plus other callbacks'
    batch-end work). Validation runs and checkpoint saving (every ``trainer.save_checkpoint``
    call, e.g. by ``ModelCheckpoint``, which Lightning runs after this callback) are left out
    of both: they are neither data loading nor training. Over each logging
    interval it logs ``{prefix}/episodes_per_s`` (global: local episodes x world size),
    ``{prefix}/data_wait_frac`` and ``{prefix}/step_s``. The first step of each epoch has no
    previous end and is not counted. Lightning prefetches one batch, so the fetch measured before
    step ``i`` is that of batch ``i + 1``: the same cost per step over an interval. A wait fraction
    well above zero means the data pipeline is the bottleneck (add ``num_workers`` or store raw
    arrays).

    Args:
        log_every_n_steps: interval in optimizer steps (default: the trainer's ``log_every_n_steps``);
            with ``accumulate_grad_batches=a`` it spans ``a`` times as many batches. ``step_s`` is
            the time per training batch.
        prefix: metric name prefix.

    Example:
        >>> trainer = L.Trainer(callbacks=[ThroughputMonitor(log_every_n_steps=20)])

        In YAML: ``- class_path: lightning_meta.callbacks.ThroughputMonitor`` with
        ``init_args: {log_every_n_steps: 20}``.

    """

    def __init__(self, log_every_n_steps: int | None = None, prefix: str = "throughput") -> None:
        if log_every_n_steps is not None:
            _positive("log_every_n_steps", log_every_n_steps, " (or null for the trainer's)")
        self.log_every_n_steps = log_every_n_steps
        self.prefix = prefix
        self.last: dict[str, float] = {}
        self._reset_window()
        self._last_end: float | None = None
        self._start = 0.0
        self._wait: float | None = None
        self._saving = 0.0  # seconds in trainer.save_checkpoint since the last batch end

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or "save_checkpoint" in vars(trainer):
            return
        save = trainer.save_checkpoint

        def timed_save(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return save(*args, **kwargs)
            finally:
                self._saving += time.perf_counter() - began

        timed_save._throughput_monitor = self  # type: ignore[attr-defined]
        trainer.save_checkpoint = timed_save  # an instance attribute: the class's method is untouched

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if getattr(vars(trainer).get("save_checkpoint"), "_throughput_monitor", None) is self:
            del trainer.save_checkpoint

    def _reset_window(self) -> None:
        self._sum_wait = 0.0
        self._sum_step = 0.0
        self._sum_eps = 0
        self._steps = 0

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_end = None

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._start = time.perf_counter()
        self._wait = None if self._last_end is None else max(self._start - self._last_end - self._saving, 0.0)
        self._saving = 0.0

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        end = time.perf_counter()
        if self._wait is not None:
            self._sum_wait += self._wait
            self._sum_step += self._wait + max(end - self._start - self._saving, 0.0)
            self._sum_eps += _episodes_in(batch) * max(1, trainer.world_size)
            self._steps += 1
        self._last_end = end
        self._saving = 0.0
        every = self.log_every_n_steps or max(1, int(trainer.log_every_n_steps or 1))
        # the interval counts optimizer steps: with accumulate_grad_batches one step takes several batches
        batches = every * max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
        if self._steps >= batches and self._sum_step > 0:
            p = self.prefix
            self.last = {f"{p}/episodes_per_s": self._sum_eps / self._sum_step,
                         f"{p}/data_wait_frac": self._sum_wait / self._sum_step,
                         f"{p}/step_s": self._sum_step / self._steps}
            log_scalars(trainer, self.last)
            self._reset_window()

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_end is not None:
            self._last_end = time.perf_counter()  # do not count the validation run as waiting for data
            self._saving = 0.0


# --------------------------------------------------------------------- learned rates
def learned_rates(pl_module: L.LightningModule) -> dict[str, Tensor]:
    """Return the learned inner learning rates, ``{name: tensor}``; ``{}`` when they are not learned.

    Meta-SGD: one tensor per adapted parameter (its shape). MAML++ (any ``inner_lrs`` that is a
    callable of the step): ``step{k}/{parameter}`` scalars for every trained inner step ``k``.
    """
    inner = getattr(pl_module, "inner_lrs", None)
    if inner is None:
        return {}
    lrs = inner()
    out: dict[str, Tensor] = {}
    if isinstance(lrs, Mapping):
        out = {k: v for k, v in lrs.items() if isinstance(v, Tensor)}
    elif callable(lrs):
        n = int(getattr(pl_module, "inner_steps", 1))  # later evaluation steps reuse the last rate
        for k in range(n):
            try:
                step = lrs(k)
            except (IndexError, KeyError):
                break
            if isinstance(step, Mapping):
                out.update({f"step{k}/{name}": v for name, v in step.items() if isinstance(v, Tensor)})
    if not any(v.requires_grad for v in out.values()):
        return {}
    return out


class LearnedLRMonitor(Callback):
    """Histograms and summary statistics of learned inner learning rates (Meta-SGD, MAML++).

    Every ``every_n_steps`` optimizer steps (and at the end of training) it logs
    ``{prefix}/mean``, ``/min``, ``/max``, ``/std`` and ``/negative_frac`` (Meta-SGD's rates are
    unconstrained; a negative rate climbs the support loss) over all rates, and for per-step rates
    (MAML++) ``{prefix}/step{k}_mean``. With TensorBoard it also writes histograms: one per
    parameter tensor for Meta-SGD (``{prefix}/{parameter}``), one per inner step over the
    parameters for MAML++ (``{prefix}/step{k}``), and ``{prefix}/all``.

    Args:
        every_n_steps: logging interval in optimizer steps.
        per_parameter: also log the mean rate of every parameter tensor (and step) as a scalar.
        prefix: metric/tag name prefix.

    Raises:
        MetaConfigError: at setup for models whose inner rates are not learned (MAML, ANIL,
            ``MAMLPlusPlus(learn_inner_lrs=False)``, metric-based learners).

    Example:
        >>> trainer = L.Trainer(callbacks=[LearnedLRMonitor(every_n_steps=100)])

        In YAML: ``- class_path: lightning_meta.callbacks.LearnedLRMonitor`` with
        ``init_args: {every_n_steps: 100}``.

    """

    def __init__(self, every_n_steps: int = 50, per_parameter: bool = False, prefix: str = "learned_lr") -> None:
        _positive("every_n_steps", every_n_steps)
        self.every_n_steps = every_n_steps
        self.per_parameter = per_parameter
        self.prefix = prefix
        self.last: dict[str, float] = {}
        self._last_step: int | None = None
        self._warned = False

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not learned_rates(pl_module):
            raise MetaConfigError(
                f"LearnedLRMonitor needs a learner with learned inner learning rates (MetaSGD, MAMLPlusPlus with "
                f"learn_inner_lrs=true), but {type(pl_module).__name__} has none to show; remove LearnedLRMonitor "
                "or use such a model"
            )

    def summary(self, pl_module: L.LightningModule) -> tuple[dict[str, float], dict[str, Tensor]]:
        """``(scalars, histograms)`` of the current rates."""
        rates = {k: v.detach().float().flatten().cpu() for k, v in learned_rates(pl_module).items()}
        p = self.prefix
        every = torch.cat(list(rates.values()))
        scalars = {f"{p}/mean": every.mean().item(), f"{p}/min": every.min().item(),
                   f"{p}/max": every.max().item(), f"{p}/std": every.std(unbiased=False).item(),
                   f"{p}/negative_frac": (every < 0).float().mean().item()}
        hists: dict[str, Tensor] = {f"{p}/all": every}
        by_step: dict[str, list[Tensor]] = defaultdict(list)
        for name, v in rates.items():
            if name.startswith("step") and "/" in name:
                by_step[name.split("/", 1)[0]].append(v)
            else:
                hists[f"{p}/{name}"] = v
            if self.per_parameter:
                scalars[f"{p}/{name}_mean"] = v.mean().item()
        for step, values in by_step.items():
            joined = torch.cat(values)
            hists[f"{p}/{step}"] = joined
            scalars[f"{p}/{step}_mean"] = joined.mean().item()
        return scalars, hists

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int | None = None) -> None:
        if self._last_step == trainer.global_step:
            return
        self._last_step = trainer.global_step
        at = logging_step(trainer) if step is None else step  # scalars and histograms share it
        scalars, hists = self.summary(pl_module)
        self.last = scalars
        log_scalars(trainer, scalars, step=at)
        if not trainer.is_global_zero:
            return
        writer = tensorboard_writer(trainer)
        if writer is None:
            if not self._warned:
                rank_zero_warn("LearnedLRMonitor: no TensorBoard logger, so only summary scalars are logged "
                               "(no histograms)")
                self._warned = True
            return
        for tag, values in hists.items():
            writer.add_histogram(tag, values, global_step=at)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the rates after the last step: the step of that batch's train/* records (Lightning's counter has
        # moved past it by now), as in on_train_batch_end
        self._log(trainer, pl_module, step=max(0, logging_step(trainer) - 1))

