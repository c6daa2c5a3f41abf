"""Our own learners: subclasses of lightning-meta's MAML and ProtoNet that override its public hooks.

- :class:`LabelSmoothedMAML` keeps MAML's inner loop (``adapt``) and changes the outer objective
  (``meta_loss``): the query cross-entropy after adaptation uses label smoothing.
- :class:`ShrinkageProtoNet` changes ``adapt``: each class mean is pulled toward the mean of all
  classes of the episode by a learned prior strength, the posterior mean of a Gaussian prior
  centred on the episode: ``p_c = (K * mean_c + kappa * mean_all) / (K + kappa)``. With few shots
  (small ``K``) noisy prototypes move more than with many.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta import Episode
from lightning_meta.algorithms import MAML, ProtoNet
from lightning_meta.errors import MetaConfigError

__all__ = ["LabelSmoothedMAML", "ShrinkageProtoNet"]


class LabelSmoothedMAML(MAML):
    """Second-order MAML whose meta-loss is the label-smoothed query cross-entropy.

    The inner loop still minimises the plain support cross-entropy (``MAML.adapt`` is reused);
    only the outer objective changes. Logs ``train/query_ce`` (the unsmoothed query loss, for
    comparison with ``train/loss``) and ``train/acc``.

    Args:
        backbone: the body (a linear head with ``ways`` outputs is added by MAML).
        label_smoothing: weight of the uniform target in the query cross-entropy, in ``[0, 1)``.
        ways, inner_lr, inner_steps, eval_inner_steps, first_order, lr: see
            :class:`lightning_meta.algorithms.MAML`.

    Example:
        >>> from my_project.backbones import SmallConvNet
        >>> model = LabelSmoothedMAML(SmallConvNet(1, 8, 16), ways=3, label_smoothing=0.1)
        >>> model.label_smoothing
        0.1

    """

    def __init__(
        self,
        backbone: nn.Module,
        label_smoothing: float = 0.1,
        ways: int = 5,
        inner_lr: float = 0.4,
        inner_steps: int = 1,
        eval_inner_steps: int | None = None,
        first_order: bool = False,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(backbone, ways=ways, inner_lr=inner_lr, inner_steps=inner_steps,
                         eval_inner_steps=eval_inner_steps, first_order=first_order, lr=lr)
        if not 0.0 <= label_smoothing < 1.0:
            raise MetaConfigError(f"label_smoothing={label_smoothing} must lie in [0, 1); 0.1 is common")
        self.save_hyperparameters(ignore=["backbone"])  # in the leaf class, so our own argument is saved too
        self.label_smoothing = label_smoothing

    def meta_loss(self, batch: Episode) -> Tensor:
        """Mean label-smoothed query cross-entropy after adaptation, over the tasks of the meta-batch."""
        smoothed, plain, acc = [], [], []
        for ep in batch.tasks():
            logits = self.predict(self.adapt(ep), ep.query_x)  # MAML's inner loop, then the adapted network
            smoothed.append(F.cross_entropy(logits, ep.query_y, label_smoothing=self.label_smoothing))
            with torch.no_grad():
                plain.append(F.cross_entropy(logits, ep.query_y))
                acc.append((logits.argmax(-1) == ep.query_y).float().mean())
        self.log("train/query_ce", torch.stack(plain).mean(), batch_size=batch.num_tasks)
        self.log("train/acc", torch.stack(acc).mean(), prog_bar=True, batch_size=batch.num_tasks)
        return torch.stack(smoothed).mean()


class ShrinkageProtoNet(ProtoNet):
    """Prototypical Networks with prototypes shrunk toward the episode mean by a learned prior strength.

    ``adapt`` returns ``(K * mean_c + kappa * mean_all) / (K + kappa)`` for each class ``c`` (``K``
    shots); ``kappa > 0`` is learned as its logarithm. ``meta_loss`` and ``evaluate`` go through
    ``adapt``/``predict`` task by task (ProtoNet's own batched fast path computes plain prototypes
    without calling ``adapt``). Logs ``train/prior_strength``.

    Args:
        backbone: embedding network.
        prior_strength: initial ``kappa`` (> 0), in units of shots.
        distance, temperature, ways, lr: see :class:`lightning_meta.algorithms.ProtoNet`.

    Example:
        >>> from my_project.backbones import SmallConvNet
        >>> model = ShrinkageProtoNet(SmallConvNet(1, 8, 16), prior_strength=2.0)
        >>> round(float(model.prior_strength), 4)
        2.0

    """

    def __init__(
        self,
        backbone: nn.Module,
        prior_strength: float = 1.0,
        distance: Literal["euclidean", "cosine"] = "euclidean",
        temperature: float = 1.0,
        ways: int = 5,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(backbone, distance=distance, temperature=temperature, ways=ways, lr=lr)
        if not prior_strength > 0:
            raise MetaConfigError(f"prior_strength={prior_strength} must be > 0 (it is learned as its logarithm)")
        self.save_hyperparameters(ignore=["backbone"])
        self.log_prior_strength = nn.Parameter(torch.tensor(math.log(prior_strength)))

    @property
    def prior_strength(self) -> Tensor:
        """The current ``kappa`` (a positive 0-d tensor)."""
        return self.log_prior_strength.exp()

    def adapt(self, episode: Episode) -> Tensor:
        """Shrunk prototypes ``[N, d]`` of one episode."""
        means = super().adapt(episode)  # ProtoNet: class means of the support embeddings
        shots = episode.support_y.shape[0] / episode.ways
        kappa = self.prior_strength
        return (shots * means + kappa * means.mean(0, keepdim=True)) / (shots + kappa)

    def meta_loss(self, batch: Episode) -> Tensor:
        """Mean query cross-entropy over the tasks, with the shrunk prototypes."""
        losses, acc = [], []
        for ep in batch.tasks():
            logits = self.predict(self.adapt(ep), ep.query_x)
            losses.append(F.cross_entropy(logits, ep.query_y))
            acc.append((logits.detach().argmax(-1) == ep.query_y).float().mean())
        self.log("train/acc", torch.stack(acc).mean(), prog_bar=True, batch_size=batch.num_tasks)
        self.log("train/prior_strength", self.prior_strength.detach(), batch_size=batch.num_tasks)
        return torch.stack(losses).mean()

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        """Per-episode query accuracy with the shrunk prototypes."""
        with torch.no_grad():
            acc = [(self.predict(self.adapt(ep), ep.query_x).argmax(-1) == ep.query_y).float().mean()
                   for ep in batch.tasks()]
        return {"acc": torch.stack(acc)}
