"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr and Hospedales, 2018)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional import prototypes

__all__ = ["RelationModule", "RelationNet", "class_feature_maps", "relation_pairs"]

Aggregation = Literal["sum", "mean"]


def class_feature_maps(maps: Tensor, labels: Tensor, ways: int, aggregation: Aggregation = "sum") -> Tensor:
    """Per-class feature maps: the sum (the paper's K-shot rule) or mean of each class' support maps.

    Args:
        maps: ``[..., n, C, H, W]`` support feature maps.
        labels: ``[..., n]`` labels in ``0..ways-1``.
        ways: number of classes ``N``.
        aggregation: ``sum`` or ``mean`` over the shots of a class.

    Returns:
        ``[..., N, C, H, W]``.

    Example:
        >>> class_feature_maps(torch.ones(3, 1, 1, 1), torch.tensor([0, 1, 0]), 2).flatten()
        tensor([2., 1.])

    """
    if aggregation not in ("sum", "mean"):
        raise ValueError(f"aggregation={aggregation!r} is not supported; use 'sum' or 'mean'")
    shape = maps.shape[-3:]
    flat = prototypes(maps.flatten(-3), labels, ways)  # [..., N, C*H*W] class means
    if aggregation == "sum":
        flat = flat * F.one_hot(labels, ways).to(maps.dtype).sum(-2).unsqueeze(-1)
    return flat.unflatten(-1, shape)


def relation_pairs(class_maps: Tensor, query_maps: Tensor) -> Tensor:
    """Every (query, class) pair concatenated along channels, class first: ``[m, N, 2C, H, W]``.

    Args:
        class_maps: ``[N, C, H, W]``.
        query_maps: ``[m, C, H, W]``.

    """
    m, n = query_maps.shape[0], class_maps.shape[0]
    classes = class_maps.unsqueeze(0).expand(m, *class_maps.shape)
    queries = query_maps.unsqueeze(1).expand(m, n, *query_maps.shape[1:])
    return torch.cat([classes, queries], dim=2)


class RelationModule(nn.Module):
    """The learned similarity ``g_phi``: two conv blocks and two fully connected layers.

    Each block is 3x3 conv (``padding``) -> BatchNorm -> ReLU -> 2x2 max-pool; then
    ``Linear -> ReLU -> Linear(1) -> sigmoid``, a relation score in ``(0, 1)``. The authors' code
    pads by 1 on Omniglot (5x5 maps -> 1x1) and not at all on miniImageNet (19x19 -> 3x3).

    Args:
        in_channels: channels of a concatenated pair (twice the encoder's channels).
        feature_size: side ``H = W`` of the pair's feature maps (at least 4 with padding 1: two
            2x2 poolings).
        channels: channels of the two conv blocks (64 in the paper).
        hidden: width of the hidden FC layer (8 in the paper).
        padding: zero padding of the two 3x3 convolutions (1 keeps the size, 0 trims a pixel per side).

    Example:
        >>> RelationModule(128, feature_size=7)(torch.randn(3, 128, 7, 7)).shape
        torch.Size([3])
        >>> RelationModule(128, feature_size=19, padding=0).fc[0].in_features  # 19 -> 17 -> 8 -> 6 -> 3
        576

    """

    def __init__(self, in_channels: int, feature_size: int, channels: int = 64, hidden: int = 8,
                 padding: int = 1) -> None:
        super().__init__()
        if padding < 0:
            raise MetaConfigError(f"relation_padding={padding} must be >= 0")
        side = feature_size
        for _ in range(2):  # a 3x3 convolution, then a 2x2 max-pool
            side = (side + 2 * padding - 2) // 2
        if side < 1:
            raise MetaConfigError(
                f"feature maps of side {feature_size} are too small for the relation module's two 3x3 convolutions "
                f"(padding {padding}) and 2x2 poolings; use an encoder that keeps larger maps (e.g. Conv4(..., "
                "pool_blocks=2, flatten=False)) or relation_padding=1"
            )
        if channels < 1 or hidden < 1:
            raise MetaConfigError(f"relation_channels={channels} and relation_hidden={hidden} must be >= 1")
        blocks: list[nn.Module] = []
        for c_in in (in_channels, channels):
            conv = nn.Conv2d(c_in, channels, 3, padding=padding, bias=False)  # BatchNorm's shift replaces the bias
            blocks += [conv, nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2)]
        self.convs = nn.Sequential(*blocks)
        self.fc = nn.Sequential(nn.Linear(channels * side * side, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, pairs: Tensor) -> Tensor:
        """``[p, 2C, H, W]`` pairs -> ``[p]`` relation scores in ``(0, 1)``.

        The two small fully connected layers and the sigmoid run without autocast, in the
        parameters' dtype (float32 under ``bf16-mixed``): scores rounded to bf16 near 0.5 are
        2^-8 apart, and most queries of an untrained model then tie for the arg-max.
        """
        h = torch.flatten(self.convs(pairs), 1)
        with torch.autocast(h.device.type, enabled=False):
            logits = self.fc(h.to(self.fc[0].weight.dtype))
        return torch.sigmoid(logits).squeeze(-1)


class RelationNet(MetaLearner):
    """Scores each (query, class) pair with a learned relation module (Relation Networks).

    The encoder keeps spatial feature maps; a class' map is the sum (``aggregation``) of its
    support maps, concatenated along channels with each query's map and scored by
    :class:`RelationModule`. Training regresses the scores onto the one-hot labels (MSE), as in
    the paper; the predicted class is the arg-max score. Each task (its encoder forward and its
    relation-module forward) runs on its own, so BatchNorm statistics are per task.

    Args:
        backbone: encoder returning feature maps ``[b, C, H, W]``, e.g.
            ``Conv4(1, 64, 28, pool_blocks=2, flatten=False)`` (``[b, 64, 7, 7]`` for 28x28 images).
        feature_shape: ``(C, H, W)`` of the encoder's maps; ``None`` reads the backbone's
            ``out_shape``. A shape that does not match the encoder is refused (at construction
            when the backbone declares ``out_shape``, otherwise at the first batch).
        aggregation: ``sum`` (the paper) or ``mean`` of the support maps of a class.
        relation_channels: channels of the relation module's conv blocks (64 in the paper).
        relation_hidden: width of its hidden FC layer (8 in the paper).
        relation_padding: zero padding of its two convolutions (1; the authors use 0 on
            miniImageNet). The paper's networks: encoder ``Conv4(..., pool_blocks=2,
            flatten=False, padding=[0, 0, 1, 1])`` with ``relation_padding=1`` on 28x28 Omniglot,
            ``relation_padding=0`` on 84x84 miniImageNet.

    Example:
        >>> from lightning_meta.backbones import Conv4
        >>> from lightning_meta import Episode
        >>> model = RelationNet(Conv4(1, 16, 28, pool_blocks=2, flatten=False))
        >>> ep = Episode(torch.randn(5, 1, 28, 28), torch.arange(5), torch.randn(10, 1, 28, 28),
        ...              torch.arange(5).repeat(2), torch.arange(5))
        >>> model.predict(model.adapt(ep), ep.query_x).shape
        torch.Size([10, 5])

    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_shape: tuple[int, int, int] | None = None,
        aggregation: Aggregation = "sum",
        relation_channels: int = 64,
        relation_hidden: int = 8,
        relation_padding: int = 1,
        ways: int = 5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        per_task_backward: bool = False,
    ) -> None:
        super().__init__(
            ways=ways, task="classification", lr=lr, weight_decay=weight_decay, per_task_backward=per_task_backward
        )
        if aggregation not in ("sum", "mean"):
            raise MetaConfigError(f"aggregation={aggregation!r} is not supported; use 'sum' or 'mean'")
        if getattr(backbone, "flatten", False) is True:
            raise MetaConfigError(
                f"RelationNet needs feature maps but the {type(backbone).__name__} backbone has flatten=True; "
                "build it with flatten=False (e.g. Conv4(..., pool_blocks=2, flatten=False))"
            )
        declared = getattr(backbone, "out_shape", None)
        declared = tuple(int(v) for v in declared) if declared is not None else None
        if feature_shape is None:
            if declared is None:
                raise MetaConfigError(
                    f"feature_shape=None but {type(backbone).__name__} has no out_shape attribute; pass "
                    "feature_shape=(C, H, W), the shape of the backbone's feature maps for one image"
                )
            feature_shape = declared
        feature_shape = tuple(int(v) for v in feature_shape)
        if len(feature_shape) != 3 or min(feature_shape) < 1:
            raise MetaConfigError(f"feature_shape={feature_shape} must be three positive sizes (C, H, W)")
        if feature_shape[1] != feature_shape[2]:
            raise MetaConfigError(f"feature_shape={feature_shape} must have square maps (H == W)")
        if declared is not None and declared != feature_shape:
            raise MetaConfigError(
                f"feature_shape={feature_shape} does not match the backbone's feature maps {declared}; "
                f"set feature_shape to {list(declared)} (or null to read it from the backbone)"
            )
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.feature_shape = feature_shape
        self.aggregation = aggregation
        self.relation = RelationModule(2 * feature_shape[0], feature_shape[1], relation_channels, relation_hidden,
                                       relation_padding)

    # ------------------------------------------------------------ helpers
    def _encode(self, x: Tensor) -> Tensor:
        maps = self.backbone(x)
        if maps.dim() != 4 or tuple(maps.shape[1:]) != self.feature_shape:
            got = tuple(maps.shape[1:])
            fix = (
                f"set feature_shape to {list(got)} or feed images of the size the encoder was built for"
                if maps.dim() == 4
                else "use an encoder that returns feature maps [b, C, H, W] (e.g. Conv4(..., flatten=False))"
            )
            raise MetaConfigError(
                f"the encoder returns feature maps of shape {got} per image but the relation module expects "
                f"feature_shape={self.feature_shape}; {fix}"
            )
        return maps

    def _scores(self, class_maps: Tensor, query_maps: Tensor) -> Tensor:
        """Relation scores ``[m, N]`` of every query against every class."""
        pairs = relation_pairs(class_maps, query_maps)  # [m, N, 2C, H, W]
        return self.relation(pairs.flatten(0, 1)).view(pairs.shape[0], pairs.shape[1])

    def _batched_scores(self, batch: Episode) -> Tensor:
        """Relation scores ``[B, nq, N]``; each task runs through the encoder and relation module alone."""
        ns = batch.support_y.shape[1]
        scores = []
        for i in range(batch.num_tasks):
            maps = self._encode(torch.cat([batch.support_x[i], batch.query_x[i]]))
            classes = class_feature_maps(maps[:ns], batch.support_y[i], batch.ways, self.aggregation)
            scores.append(self._scores(classes, maps[ns:]))
        return torch.stack(scores)

    # ------------------------------------------------------------ hooks
    def adapt(self, episode: Episode) -> Tensor:
        """Class feature maps ``[N, C, H, W]`` of the support set."""
        return class_feature_maps(self._encode(episode.support_x), episode.support_y, episode.ways, self.aggregation)

    def predict(self, state: Tensor, x: Tensor) -> Tensor:
        """Relation scores ``[m, N]`` in ``(0, 1)`` (arg-max is the predicted class)."""
        return self._scores(state, self._encode(x))

    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Mean squared error between relation scores and one-hot targets (Sung et al. 2018)."""
        return F.mse_loss(outputs, F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype))

    def per_task_loss(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``[B]`` relation-score MSEs of ``B`` tasks at once (:meth:`loss_fn` per task)."""
        if self._overridden_below("loss_fn", "per_task_loss"):
            return super().per_task_loss(outputs, targets)
        one_hot = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
        return (outputs - one_hot).pow(2).flatten(1).mean(1)

    def _batched_query_outputs(self, batch: Episode) -> Tensor | None:
        """The relation scores :meth:`evaluate` scores (None when a subclass overrides the hooks)."""
        if self._overrides_hooks_of(RelationNet):
            return None
        with torch.no_grad():
            return self._batched_scores(batch)

    def meta_loss(self, batch: Episode) -> Tensor:
        """MSE of the relation scores against one-hot query labels, over all tasks.

        A subclass that overrides :meth:`adapt` or :meth:`predict` trains through them instead
        (the generic per-task path of :class:`~lightning_meta.algorithms.MetaLearner`, with
        :meth:`loss_fn`).
        """
        if self._overrides_hooks_of(RelationNet):
            return MetaLearner.meta_loss(self, batch)
        scores = self._batched_scores(batch)
        self._train_scores = self.per_task_score(scores.detach(), batch.query_y)
        return self.per_task_loss(scores, batch.query_y).mean()

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        """Per-episode query accuracy (through :meth:`adapt` / :meth:`predict` when a subclass overrides them)."""
        if self._overrides_hooks_of(RelationNet):
            return MetaLearner.evaluate(self, batch)
        with torch.no_grad():
            scores = self._batched_scores(batch)
        return {self.score_name: self.per_task_score(scores, batch.query_y)}
