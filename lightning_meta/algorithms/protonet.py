"""Prototypical Networks (Snell, Swersky and Zemel, 2017)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError, require_positive
from lightning_meta.functional import pairwise_distance, prototypes

__all__ = ["ProtoNet"]


class ProtoNet(MetaLearner):
    """Classifies queries by their distance to per-class mean embeddings (prototypes).

    The way may differ between training and evaluation (the paper trains 60-way on Omniglot and
    tests 5-way): the model has no task head, so ``ways`` is informative only.

    Args:
        backbone: embedding network (any ``nn.Module`` mapping images to ``[b, d]``).
        distance: ``euclidean`` (squared, as in the paper) or ``cosine``.
        temperature: logits are ``-distance / temperature``; must be > 0. With
            ``learn_temperature`` it is the initial value.
        learn_temperature: learn the temperature with the other weights (useful with ``cosine``,
            whose distances lie in ``[0, 2]``). It is stored as its logarithm
            (``log_temperature``), so it stays > 0 whatever the optimizer does.

    The number of shots may differ between training and evaluation as well: prototypes are
    means, so they do not depend on how many examples each class has.

    Example:
        >>> from lightning_meta.backbones import Conv4
        >>> from lightning_meta import Episode
        >>> model = ProtoNet(Conv4(1, 16, 28))
        >>> ep = Episode(torch.randn(5, 1, 28, 28), torch.arange(5), torch.randn(10, 1, 28, 28),
        ...              torch.arange(5).repeat(2), torch.arange(5))
        >>> model.predict(model.adapt(ep), ep.query_x).shape
        torch.Size([10, 5])

    """

    def __init__(
        self,
        backbone: nn.Module,
        distance: Literal["euclidean", "cosine"] = "euclidean",
        temperature: float = 1.0,
        ways: int = 5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        learn_temperature: bool = False,
        per_task_backward: bool = False,
    ) -> None:
        super().__init__(
            ways=ways, task="classification", lr=lr, weight_decay=weight_decay, per_task_backward=per_task_backward
        )
        if distance not in ("euclidean", "cosine"):
            raise MetaConfigError(f"distance={distance!r} is not supported; use 'euclidean' or 'cosine'")
        require_positive("temperature", temperature, "logits are -distance / temperature")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.distance = distance
        self.learn_temperature = learn_temperature
        self._fixed_temperature = float(temperature)
        if learn_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    @property
    def temperature(self) -> Tensor | float:
        """The current temperature: a positive 0-d tensor when learned, else the configured float."""
        return self.log_temperature.exp() if self.learn_temperature else self._fixed_temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        require_positive("temperature", value, "logits are -distance / temperature")
        if self.learn_temperature:
            with torch.no_grad():
                self.log_temperature.fill_(math.log(value))
        else:
            self._fixed_temperature = float(value)
            if "temperature" in self.hparams:  # a checkpoint rebuilds the model from its hyperparameters
                self.hparams["temperature"] = float(value)

    def adapt(self, episode: Episode) -> Tensor:
        """Prototypes ``[N, d]`` of the support set."""
        return prototypes(self.backbone(episode.support_x), episode.support_y, episode.ways)

    def predict(self, state: Tensor, x: Tensor) -> Tensor:
        """Logits ``[m, N]`` = negative distance to each prototype, divided by the temperature."""
        return -pairwise_distance(self.backbone(x), state, self.distance) / self.temperature

    def _batched_logits(self, batch: Episode) -> Tensor:
        """Query logits ``[B, nq, N]`` of every task of a meta-batch.

        Each task's support and query images go through the backbone in one forward pass of their
        own, so BatchNorm statistics are per task: results then do not depend on how a meta-batch
        is split across devices (2 ranks with B/2 tasks each equal 1 rank with B tasks).
        """
        ns = batch.support_y.shape[1]
        logits = []
        for i in range(batch.num_tasks):
            emb = self.backbone(torch.cat([batch.support_x[i], batch.query_x[i]]))
            protos = prototypes(emb[:ns], batch.support_y[i], batch.ways)  # [N, d]
            logits.append(-pairwise_distance(emb[ns:], protos, self.distance) / self.temperature)
        return torch.stack(logits)

    def meta_loss(self, batch: Episode) -> Tensor:
        """Cross-entropy of the queries of all tasks (tasks embedded together).

        A subclass that overrides :meth:`adapt` or :meth:`predict` trains through them instead
        (the generic per-task path of :class:`~lightning_meta.algorithms.MetaLearner`).
        """
        if self._overrides_hooks_of(ProtoNet):
            return MetaLearner.meta_loss(self, batch)
        logits = self._batched_logits(batch)
        self._train_scores = self.per_task_score(logits.detach(), batch.query_y)
        return self.per_task_loss(logits, batch.query_y).mean()

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        """Per-episode query accuracy (through :meth:`adapt` / :meth:`predict` when a subclass overrides them)."""
        if self._overrides_hooks_of(ProtoNet):
            return MetaLearner.evaluate(self, batch)
        with torch.no_grad():
            logits = self._batched_logits(batch)
        return {self.score_name: self.per_task_score(logits, batch.query_y)}

    def _batched_query_outputs(self, batch: Episode) -> Tensor | None:
        """The logits :meth:`evaluate` scores (None when a subclass overrides the hooks): used by ``predict_step``."""
        if self._overrides_hooks_of(ProtoNet):
            return None
        with torch.no_grad():
            return self._batched_logits(batch)
