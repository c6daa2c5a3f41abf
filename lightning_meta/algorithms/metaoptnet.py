"""MetaOptNet with the ridge-regression head, MetaOptNet-RR (Lee, Maji, Ravichandran and Soatto, 2019)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError, require_positive
from lightning_meta.functional.precision import in_float32
from lightning_meta.functional.ridge import ridge_logits, ridge_regression

__all__ = ["MetaOptNet"]


@in_float32
def _apply_ridge(x: Tensor, weights: Tensor) -> Tensor:
    """``x @ weights`` in float32 with autocast off, as :func:`ridge_logits` computes the batched path."""
    return x @ weights


_RIDGE_WHY = "it keeps the support system invertible; the authors use 50 with ResNet-12 features"


class MetaOptNet(MetaLearner):
    """Fits a ridge-regression classifier to each task's support embeddings, in closed form.

    For a task with support embeddings ``X [n, d]`` and one-hot labels ``Y [n, N]`` the base
    learner is ``W = X^T (X X^T + lambda I)^{-1} Y`` (the dual form: an ``n x n`` solve, cheap
    because ``n`` is a few shots times the way while ``d`` is the embedding size), and the query
    logits are ``scale * Q W``. The solve is differentiable, so the embedding is trained through
    it with cross-entropy; ``scale`` is learned as in the paper (the ridge outputs are close to
    0/1, too flat for a softmax on their own). See :func:`lightning_meta.functional.ridge.ridge_regression`.

    Each task is embedded in one backbone forward of its own, so BatchNorm statistics are per
    task. Way and shot may differ between training and evaluation (the paper trains with more
    shots than it tests).

    Args:
        backbone: embedding network mapping images to ``[b, d]`` (ResNet-12 in the paper).
        ridge_lambda: the ridge penalty ``lambda > 0`` (50 in the authors' code, for ResNet-12).
        scale: initial value of the logit scale.
        learn_scale: learn the scale with the other weights (the paper does).

    Example:
        >>> from lightning_meta.backbones import Conv4
        >>> from lightning_meta import Episode
        >>> model = MetaOptNet(Conv4(1, 16, 28), ridge_lambda=1.0)
        >>> ep = Episode(torch.randn(5, 1, 28, 28), torch.arange(5), torch.randn(10, 1, 28, 28),
        ...              torch.arange(5).repeat(2), torch.arange(5))
        >>> model.predict(model.adapt(ep), ep.query_x).shape
        torch.Size([10, 5])

    """

    def __init__(
        self,
        backbone: nn.Module,
        ridge_lambda: float = 50.0,
        scale: float = 1.0,
        learn_scale: bool = True,
        ways: int = 5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        per_task_backward: bool = False,
    ) -> None:
        super().__init__(
            ways=ways, task="classification", lr=lr, weight_decay=weight_decay, per_task_backward=per_task_backward
        )
        require_positive("ridge_lambda", ridge_lambda, _RIDGE_WHY)
        require_positive("scale", scale, "logits are scale * ridge predictions")
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self._ridge_lambda = float(ridge_lambda)
        self.learn_scale = learn_scale
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))

    @property
    def ridge_lambda(self) -> float:
        """The ridge penalty; setting it checks it and updates ``hparams`` (checkpoints keep it)."""
        return self._ridge_lambda

    @ridge_lambda.setter
    def ridge_lambda(self, value: float) -> None:
        self._ridge_lambda = require_positive("ridge_lambda", value, _RIDGE_WHY)
        self.hparams["ridge_lambda"] = self._ridge_lambda  # a checkpoint rebuilds the model from its hyperparameters

    def _embed(self, x: Tensor) -> Tensor:
        emb = self.backbone(x)
        if emb.dim() != 2:
            raise MetaConfigError(
                f"MetaOptNet needs flat embeddings [b, d] but the backbone returns shape {tuple(emb.shape)}; "
                "use a backbone that flattens its output (e.g. Conv4 or ResNet12 with flatten=True)"
            )
        return emb

    def _batched_logits(self, batch: Episode) -> Tensor:
        """Query logits ``[B, nq, N]``; each task's images are embedded in their own forward."""
        ns = batch.support_y.shape[1]
        s_emb, q_emb = [], []
        for i in range(batch.num_tasks):
            emb = self._embed(torch.cat([batch.support_x[i], batch.query_x[i]]))
            s_emb.append(emb[:ns])
            q_emb.append(emb[ns:])
        support, query = torch.stack(s_emb), torch.stack(q_emb)
        targets = F.one_hot(batch.support_y, batch.ways).to(support.dtype)
        return self.scale * ridge_logits(query, support, targets, self.ridge_lambda)

    def adapt(self, episode: Episode) -> Tensor:
        """Ridge-regression weights ``[d, N]`` fitted to the support set."""
        support = self._embed(episode.support_x)
        targets = F.one_hot(episode.support_y, episode.ways).to(support.dtype)
        return ridge_regression(support, targets, self.ridge_lambda)

    def predict(self, state: Tensor, x: Tensor) -> Tensor:
        """Logits ``[m, N]`` = ``scale * embedding @ W``.

        The product is computed in float32 with autocast off, like the batched path: ``W`` from
        :meth:`adapt` is float32 (the ridge solve has no bf16 kernel), and bf16 embeddings
        (``precision="bf16-true"``) are cast to float32 first; the logits come back in float32.
        """
        return self.scale * _apply_ridge(self._embed(x), state)

    def _batched_query_outputs(self, batch: Episode) -> Tensor | None:
        """The logits :meth:`evaluate` scores (None when a subclass overrides the hooks): used by ``predict_step``."""
        if self._overrides_hooks_of(MetaOptNet):
            return None
        with torch.no_grad():
            return self._batched_logits(batch)

    def meta_loss(self, batch: Episode) -> Tensor:
        """Cross-entropy of the queries of all tasks.

        A subclass that overrides :meth:`adapt` or :meth:`predict` trains through them instead
        (the generic per-task path of :class:`~lightning_meta.algorithms.MetaLearner`).
        """
        if self._overrides_hooks_of(MetaOptNet):
            return MetaLearner.meta_loss(self, batch)
        logits = self._batched_logits(batch)
        self._train_scores = self.per_task_score(logits.detach(), batch.query_y)
        return self.per_task_loss(logits, batch.query_y).mean()

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        """Per-episode query accuracy (through :meth:`adapt` / :meth:`predict` when a subclass overrides them)."""
        if self._overrides_hooks_of(MetaOptNet):
            return MetaLearner.evaluate(self, batch)
        with torch.no_grad():
            logits = self._batched_logits(batch)
        return {self.score_name: self.per_task_score(logits, batch.query_y)}
