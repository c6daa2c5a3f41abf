"""Shared base of the model-based (black-box) learners: embed, encode labels, read the support set as a sequence.

A subclass implements one method, :meth:`SequenceLearner.sequence_outputs`, mapping support
embeddings, their label encodings and query embeddings of ``B`` tasks to query outputs. The
base handles per-task embedding (one backbone pass per task, support and queries together, so
BatchNorm statistics are per task), the sequence-length limit, the label one-hot size and the
losses.

Given the embeddings, the sequence model never lets one query's output depend on the other
queries. The embeddings themselves do when the backbone has a BatchNorm that uses batch
statistics (training mode, or ``norm="batch_no_stats"`` in any mode): a task's support and
queries are then normalised together, so each prediction depends on the whole query set
(transductive, as in ProtoNet and MAML's reference code). With running statistics
(``norm="batch"`` in evaluation mode) or no BatchNorm, a query's prediction depends on the
support set and that query only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner, TaskKind
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional.sequence import encode_labels, label_dim

__all__ = ["SequenceContext", "SequenceLearner", "SupportOrder", "support_permutation"]

SupportOrder = Literal["given", "shuffled"]


def support_permutation(support_y: Tensor, classes: Tensor) -> Tensor:
    """A reading order of one support set: sorted by label, then permuted by the episode's class ids.

    ``support_y [S]`` labels, ``classes [ways]`` the data set's class id of each label. The result
    ``[S]`` (indices into the support set) is a pure function of the labels and class ids, so the
    same episode is read in the same order everywhere, while over episodes with different classes
    every position holds every label equally often.

    Example:
        >>> y = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> order = support_permutation(y, torch.tensor([7, 3, 9]))
        >>> sorted(order.tolist()) == list(range(6))
        True
        >>> torch.equal(order, support_permutation(y, torch.tensor([7, 3, 9])))
        True

    """
    by_label = torch.argsort(support_y, stable=True)
    seed = 0x9E3779B97F4A7C15
    for c in classes.tolist():  # FNV-style mix of the class ids, kept within 63 bits
        seed = ((seed ^ (int(c) & 0xFFFFFFFFFFFF)) * 0x100000001B3) % (1 << 63)
    perm = torch.randperm(len(support_y), generator=torch.Generator().manual_seed(seed))
    return by_label[perm]


@dataclass
class SequenceContext:
    """What a black-box learner keeps of a support set: ``adapt``'s result.

    Shapes: ``support [S, d]`` embeddings, ``labels [S, L]`` label encodings
    (:func:`~lightning_meta.functional.sequence.encode_labels`), ``ways`` the episode's way
    (0 for regression).
    """

    support: Tensor
    labels: Tensor
    ways: int


class SequenceLearner(MetaLearner):
    """Base of learners that read the support set in one forward pass and predict the queries.

    Not instantiated directly: subclasses define :meth:`sequence_outputs` and call
    ``self.save_hyperparameters(ignore=["backbone"])`` in their own ``__init__``.

    Args:
        backbone: embedding network with a positive integer ``out_features`` attribute.
        max_len: longest sequence the model accepts: support examples + 1 query. Longer episodes
            are refused with a :class:`~lightning_meta.errors.MetaConfigError`.
        ways: classes per episode; sizes the label one-hot and the output (classification).
            Episodes with fewer classes use the first outputs; episodes with more are refused.
        support_order: ``given`` reads the support examples in the episode's order (the datamodules
            give them grouped by class in label order, so an order-dependent model can learn
            "position i has label i" and ignore the labels); ``shuffled`` (classification) first
            sorts them by label, then permutes them with a permutation drawn from the episode's
            class ids (:func:`support_permutation`), so the positions carry no label information,
            the same episode is always read the same way (training, evaluation, ``predict``,
            resumes, any number of processes) and the given order does not matter except within
            a class.

    """

    def __init__(
        self,
        backbone: nn.Module,
        max_len: int,
        ways: int = 5,
        task: TaskKind = "classification",
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        per_task_backward: bool = False,
        support_order: SupportOrder = "given",
    ) -> None:
        super().__init__(ways=ways, task=task, lr=lr, weight_decay=weight_decay, per_task_backward=per_task_backward)
        name = type(self).__name__
        if support_order not in ("given", "shuffled"):
            raise MetaConfigError(f"{name}: support_order={support_order!r}; choose 'given' or 'shuffled'")
        self.support_order = support_order
        if max_len < 2:
            raise MetaConfigError(f"{name}: max_len={max_len} must be >= 2 (at least one support example + 1 query)")
        d = getattr(backbone, "out_features", None)
        if not isinstance(d, int) or d <= 0:
            raise MetaConfigError(
                f"{name}: backbone {type(backbone).__name__} has no positive integer attribute 'out_features'; "
                "set backbone.out_features to its embedding size"
            )
        self.backbone = backbone
        self.max_len = max_len
        self.embed_dim = d
        self.label_ways = ways if task == "classification" else 0
        self.label_dim = label_dim(self.label_ways)
        self.out_dim = ways if task == "classification" else 1

    # ------------------------------------------------------------- the hook
    def sequence_outputs(self, support: Tensor, labels: Tensor, queries: Tensor) -> Tensor:
        """Query outputs ``[B, Q, out_dim]`` from ``support [B, S, d]``, ``labels [B, S, L]``, ``queries [B, Q, d]``.

        Each query's output must depend on the support set and on that query's embedding only
        (the embeddings may still share BatchNorm batch statistics, see the module docstring).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement sequence_outputs")

    # --------------------------------------------------------------- checks
    def check_sizes(self, num_support: int, ways: int) -> None:
        """Refuses episodes longer than ``max_len`` or with more classes than ``ways``."""
        name = type(self).__name__
        if num_support + 1 > self.max_len:
            raise MetaConfigError(
                f"{name} reads sequences of at most max_len={self.max_len} (support examples + 1 query), but this "
                f"episode has {num_support} support examples (length {num_support + 1}); set model max_len to at "
                f"least {num_support + 1} (--model.init_args.max_len {num_support + 1}) or use fewer ways/shots"
            )
        if self.task == "classification" and ways > self.ways:
            raise MetaConfigError(
                f"{name} has ways={self.ways} label slots and outputs, but this episode is {ways}-way; set model "
                f"ways (linked from data.ways) to at least {ways}, i.e. train with the largest way and keep "
                "eval_ways <= ways"
            )

    def check_batch(self, batch: Episode) -> None:
        """Run the base checks, then refuse too long or too wide episodes (at the first batch, before any work)."""
        super().check_batch(batch)
        self.check_sizes(batch.support_y.shape[1 if batch.is_batched else 0], batch.ways)

    # ------------------------------------------------------------ the hooks
    def adapt(self, episode: Episode) -> SequenceContext:
        """Embeds and label-encodes the support set of one episode (no learning happens here)."""
        self.check_sizes(episode.support_x.shape[0], episode.ways)
        emb = self.backbone(episode.support_x)
        labels = encode_labels(episode.support_y, self.label_ways, emb.dtype)
        order = self._support_orders(episode.support_y[None], episode.classes[None])
        if order is not None:
            emb, labels = emb[order[0]], labels[order[0]]
        return SequenceContext(emb, labels, episode.ways)

    def _support_orders(self, support_y: Tensor, classes: Tensor) -> Tensor | None:
        """Per-task reading orders ``[B, S]`` of the support sets (None: as given)."""
        if self.support_order == "given" or self.task != "classification":
            return None
        ys, cs = support_y.detach().cpu(), classes.detach().cpu()
        orders = [support_permutation(y, c) for y, c in zip(ys, cs, strict=True)]
        return torch.stack(orders).to(support_y.device)

    def predict(self, state: SequenceContext, x: Tensor) -> Tensor:
        """Predicts queries ``x``: logits ``[m, ways]`` of the episode's way, or values ``[m, 1]``."""
        out = self.sequence_outputs(state.support[None], state.labels[None], self.backbone(x)[None])[0]
        return out[..., : state.ways] if self.task == "classification" else out

    def batched_outputs(self, batch: Episode) -> Tensor:
        """Query outputs ``[B, Q, ways | 1]`` of a meta-batch.

        Each task's support and query inputs go through the backbone in one forward pass of their
        own (per-task BatchNorm statistics, as ``ProtoNet._batched_logits``); the sequence model
        then runs on all tasks at once. With BatchNorm batch statistics (training mode, or
        ``norm="batch_no_stats"``) the support and queries of a task are normalised together,
        so a query's output depends on the other queries of its task; :meth:`adapt` +
        :meth:`predict` (separate passes) then differ from this path, which is the one
        ``fit``, ``validate``, ``test`` and ``predict`` use.
        """
        ns = batch.support_y.shape[1]
        self.check_sizes(ns, batch.ways)
        emb = torch.stack(
            [self.backbone(torch.cat([batch.support_x[i], batch.query_x[i]])) for i in range(batch.num_tasks)]
        )  # [B, S+Q, d]
        labels = encode_labels(batch.support_y, self.label_ways, emb.dtype)
        support = emb[:, :ns]
        order = self._support_orders(batch.support_y, batch.classes)
        if order is not None:
            support = torch.gather(support, 1, order[..., None].expand_as(support))
            labels = torch.gather(labels, 1, order[..., None].expand_as(labels))
        out = self.sequence_outputs(support, labels, emb[:, ns:])
        return out[..., : batch.ways] if self.task == "classification" else out

    def _batched_query_outputs(self, batch: Episode) -> Tensor | None:
        """The outputs :meth:`evaluate` scores (None when a subclass overrides the hooks): used by ``predict_step``."""
        if self._overrides_hooks_of(SequenceLearner):
            return None
        with torch.no_grad():
            return self.batched_outputs(batch)

    def meta_loss(self, batch: Episode) -> Tensor:
        """Mean query loss over the tasks (cross-entropy or MSE).

        A subclass that overrides :meth:`adapt` or :meth:`predict` trains through them instead
        (the generic per-task path of :class:`~lightning_meta.algorithms.MetaLearner`).
        """
        if self._overrides_hooks_of(SequenceLearner):
            return MetaLearner.meta_loss(self, batch)
        out = self.batched_outputs(batch)
        self._train_scores = self.per_task_score(out.detach(), batch.query_y)
        return self.per_task_loss(out, batch.query_y).mean()

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        """Per-episode query accuracy or MSE (no gradients: nothing adapts by gradient).

        Through :meth:`adapt` / :meth:`predict` when a subclass overrides them.
        """
        if self._overrides_hooks_of(SequenceLearner):
            return MetaLearner.evaluate(self, batch)
        with torch.no_grad():
            out = self.batched_outputs(batch)
        return {self.score_name: self.per_task_score(out, batch.query_y)}
