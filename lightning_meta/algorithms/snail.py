"""SNAIL: a simple neural attentive meta-learner (Mishra, Rohaninejad, Chen and Abbeel, 2018)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.algorithms._sequence import SequenceLearner, SupportOrder
from lightning_meta.algorithms.base import TaskKind
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional.sequence import causal_conv1d, causal_mask

__all__ = ["SNAIL", "SNAILNet"]


class _DenseBlock(nn.Module):
    """Dilated causal convolution (kernel 2) with a gated activation, concatenated to its input."""

    def __init__(self, in_channels: int, filters: int, dilation: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, 2 * filters, kernel_size=2)
        self.dilation = dilation
        self.out_channels = in_channels + filters

    def forward(self, x: Tensor) -> Tensor:
        """``[b, T, c] -> [b, T, c + filters]``."""
        h = causal_conv1d(x.transpose(1, 2), self.conv.weight, self.conv.bias, self.dilation).transpose(1, 2)
        f, g = h.chunk(2, dim=-1)
        return torch.cat([x, torch.tanh(f) * torch.sigmoid(g)], dim=-1)


class _AttentionBlock(nn.Module):
    """Causal single-head soft attention whose read is concatenated to its input."""

    def __init__(self, in_channels: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.query = nn.Linear(in_channels, key_size)
        self.key = nn.Linear(in_channels, key_size)
        self.value = nn.Linear(in_channels, value_size)
        self.out_channels = in_channels + value_size

    def forward(self, x: Tensor) -> Tensor:
        """``[b, T, c] -> [b, T, c + value_size]``; position ``t`` reads positions ``<= t`` only."""
        allowed = causal_mask(x.shape[1], device=x.device)
        read = F.scaled_dot_product_attention(self.query(x), self.key(x), self.value(x), attn_mask=allowed)
        return torch.cat([x, read], dim=-1)


class SNAILNet(nn.Module):
    """The SNAIL sequence network: attention blocks interleaved with temporal-convolution blocks.

    ``attention[0]``, TC block, ``attention[1]``, TC block, ..., ``attention[-1]``, then a linear
    output layer (the paper's 1x1 convolution). A TC block is a stack of dense blocks with
    dilations ``1, 2, 4, ..., 2^(k-1)``, ``k = ceil(log2 max_len)``, so its receptive field
    ``2^k`` covers the whole sequence (the paper's pseudo-code starts at dilation 2, which only
    reaches even offsets). Every block is causal: output ``t`` depends on inputs ``<= t``.

    Args:
        in_channels: features per sequence position.
        out_features: outputs per position.
        max_len: longest sequence (sets the TC block depth).
        tc_filters: filters of each dense block.
        attention: ``(key_size, value_size)`` of each attention block; at least one.

    """

    def __init__(
        self,
        in_channels: int,
        out_features: int,
        max_len: int,
        tc_filters: int,
        attention: Sequence[tuple[int, int]],
    ) -> None:
        super().__init__()
        depth = max(1, math.ceil(math.log2(max_len)))
        blocks: list[nn.Module] = []
        c = in_channels
        for i, (key_size, value_size) in enumerate(attention):
            if i > 0:
                for j in range(depth):
                    blocks.append(_DenseBlock(c, tc_filters, 2**j))
                    c = blocks[-1].out_channels
            blocks.append(_AttentionBlock(c, key_size, value_size))
            c = blocks[-1].out_channels
        self.blocks = nn.Sequential(*blocks)
        self.out = nn.Linear(c, out_features)

    def forward(self, x: Tensor) -> Tensor:
        """``[b, T, in_channels] -> [b, T, out_features]`` (causal)."""
        return self.out(self.blocks(x))


class SNAIL(SequenceLearner):
    """SNAIL: temporal convolutions and causal attention over the support set, then each query.

    The sequence is the support pairs ``(embedding, label encoding)`` in their given order, then
    a query ``(embedding, zeros)``; the output at the query's position is its prediction. Label
    encodings are one-hot of size ``ways`` (classification) or ``(y, 1)`` (regression, see
    :func:`~lightning_meta.functional.sequence.encode_labels`).

    Each query is appended to the support sequence on its own (the ``Q`` queries of a task form a
    batch of ``Q`` sequences of length ``S + 1``), so the sequence network never mixes queries.
    The backbone embeds a task's support and queries in one forward pass, though: with a
    BatchNorm that uses batch statistics (training mode, or ``norm="batch_no_stats"``) they are
    normalised together and a query's prediction depends on the other queries of its task
    (transductive, as in ProtoNet and MAML's reference code); with running statistics or no
    BatchNorm it does not. The convolutions and the causal attention read the support sequence in
    order. The datamodules present support examples grouped by class in label order, from which a
    model could learn "position i has label i" and ignore the labels; by default
    (``support_order="shuffled"``) each support set is therefore read in an order drawn from its
    episode's class ids (the same for the same episode everywhere).

    Args:
        backbone: embedding network with an ``out_features`` attribute (Conv4 for images, MLP for
            sinusoid x values).
        ways: classes per episode (linked from the datamodule); sizes the label one-hot and the output.
        task: ``classification`` or ``regression``.
        max_len: longest sequence, support examples + 1 (the paper's ``T = N*K + 1``).
        tc_filters: filters per dense block (128 in the paper).
        attention: ``(key_size, value_size)`` per attention block; the paper's Omniglot model is
            ``[[64, 32], [256, 128], [512, 256]]`` with a TC block between consecutive ones.
        per_task_backward: one backward per task, see :class:`~lightning_meta.algorithms.MetaLearner`.
        support_order: ``shuffled`` (default; classification) reads each support set sorted by label
            and then permuted by the episode's class ids, so that positions carry no label
            information and the model must read the labels (the paper presents examples in random
            order); ``given`` reads them as the episode lists them. See
            :class:`~lightning_meta.algorithms._sequence.SequenceLearner`.

    Example:
        >>> from lightning_meta.backbones import Conv4
        >>> from lightning_meta import Episode
        >>> model = SNAIL(Conv4(1, 16, 28), ways=5, max_len=6, tc_filters=16, attention=[(16, 8), (16, 8)])
        >>> ep = Episode(torch.randn(5, 1, 28, 28), torch.arange(5), torch.randn(10, 1, 28, 28),
        ...              torch.arange(5).repeat(2), torch.arange(5))
        >>> model.predict(model.adapt(ep), ep.query_x).shape
        torch.Size([10, 5])

    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int = 5,
        task: TaskKind = "classification",
        max_len: int = 26,
        tc_filters: int = 128,
        attention: Sequence[tuple[int, int]] = ((64, 32), (256, 128), (512, 256)),
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        per_task_backward: bool = False,
        support_order: SupportOrder = "shuffled",
    ) -> None:
        super().__init__(backbone, max_len=max_len, ways=ways, task=task, lr=lr, weight_decay=weight_decay,
                         per_task_backward=per_task_backward, support_order=support_order)
        attention = [tuple(a) for a in attention]
        if tc_filters < 1:
            raise MetaConfigError(f"tc_filters={tc_filters} must be >= 1 (the paper uses 128)")
        if not attention or any(len(a) != 2 or min(a) < 1 for a in attention):
            raise MetaConfigError(
                f"attention={attention} must be a non-empty list of positive (key_size, value_size) pairs, "
                "e.g. [[64, 32], [256, 128], [512, 256]]"
            )
        self.save_hyperparameters(ignore=["backbone"])
        self.net = SNAILNet(self.embed_dim + self.label_dim, self.out_dim, max_len, tc_filters, attention)

    def sequence_outputs(self, support: Tensor, labels: Tensor, queries: Tensor) -> Tensor:
        """Query outputs ``[B, Q, out]``: one sequence ``support + query`` per query, read at its last position."""
        b, s, _ = support.shape
        q = queries.shape[1]
        sup = torch.cat([support, labels], dim=-1)  # [B, S, C]
        qry = torch.cat([queries, queries.new_zeros(b, q, labels.shape[-1])], dim=-1)  # [B, Q, C]
        seq = torch.cat([sup[:, None].expand(b, q, s, sup.shape[-1]), qry[:, :, None]], dim=2)  # [B, Q, S+1, C]
        out = self.net(seq.flatten(0, 1))[:, -1]  # [B*Q, out]
        return out.view(b, q, -1)
