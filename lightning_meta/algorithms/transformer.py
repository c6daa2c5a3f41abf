"""An in-context learner: a Transformer encoder reads the labelled support set and the unlabelled queries."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_meta.algorithms._sequence import SequenceLearner
from lightning_meta.algorithms.base import TaskKind
from lightning_meta.errors import MetaConfigError
from lightning_meta.functional.sequence import support_query_mask

__all__ = ["TransformerICL"]


class TransformerICL(SequenceLearner):
    """Transformer in-context learner over support pairs and query inputs.

    Tokens: a support example is ``W_x e + W_y enc(y)`` (its embedding ``e`` and label encoding,
    one-hot of size ``ways`` or ``(y, 1)`` for regression), a query is ``W_x e + u`` with a learned
    "unknown label" token ``u`` (a linear map of the concatenation embedding ⊕ label, with the
    query's label slot learned). A pre-norm Transformer encoder reads the ``S + Q`` tokens of a
    task under an attention mask: support tokens attend to the support set only, each query to
    the support set and itself (never to other queries). A linear head reads the query tokens.
    The encoder thus never mixes queries, but the backbone embeds a task's support and queries in
    one forward pass: with a BatchNorm that uses batch statistics (training mode, or
    ``norm="batch_no_stats"``) they are normalised together and a query's prediction depends on
    the other queries of its task (transductive, as in ProtoNet and MAML's reference code); with
    running statistics or no BatchNorm it does not.

    There is no positional encoding, so the predictions are invariant to the order of the support
    examples (up to floating-point rounding). ``max_len`` (support examples + 1) is only a guard
    here: the architecture itself has no length limit.

    Args:
        backbone: embedding network with an ``out_features`` attribute (Conv4 for images, MLP for
            sinusoid x values).
        ways: classes per episode (linked from the datamodule); sizes the label one-hot and the output.
        task: ``classification`` or ``regression``.
        max_len: longest accepted support set + 1.
        d_model: token width.
        num_heads: attention heads (must divide ``d_model``).
        num_layers: encoder layers.
        dim_feedforward: hidden width of each layer's feed-forward block.
        dropout: dropout inside the encoder layers.
        per_task_backward: one backward per task, see :class:`~lightning_meta.algorithms.MetaLearner`.

    Example:
        >>> from lightning_meta.backbones import MLP
        >>> from lightning_meta import Episode
        >>> model = TransformerICL(MLP(1, [32]), task="regression", d_model=32, num_heads=2, num_layers=2)
        >>> ep = Episode(torch.randn(10, 1), torch.randn(10, 1), torch.randn(7, 1), torch.randn(7, 1),
        ...              torch.zeros(0, dtype=torch.long))
        >>> model.predict(model.adapt(ep), ep.query_x).shape
        torch.Size([7, 1])

    """

    def __init__(
        self,
        backbone: nn.Module,
        ways: int = 5,
        task: TaskKind = "classification",
        max_len: int = 26,
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 4,
        dim_feedforward: int = 256,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        per_task_backward: bool = False,
    ) -> None:
        super().__init__(backbone, max_len=max_len, ways=ways, task=task, lr=lr, weight_decay=weight_decay,
                         per_task_backward=per_task_backward)
        if d_model < 1 or num_heads < 1 or d_model % num_heads:
            raise MetaConfigError(
                f"d_model={d_model} must be a positive multiple of num_heads={num_heads}; e.g. d_model 128, num_heads 4"
            )
        if num_layers < 1 or dim_feedforward < 1:
            raise MetaConfigError(f"num_layers={num_layers} and dim_feedforward={dim_feedforward} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise MetaConfigError(f"dropout={dropout} must lie in [0, 1)")
        self.save_hyperparameters(ignore=["backbone"])
        self.input_proj = nn.Linear(self.embed_dim, d_model)
        self.label_proj = nn.Linear(self.label_dim, d_model, bias=False)
        self.unknown = nn.Parameter(0.02 * torch.randn(d_model))
        layer = nn.TransformerEncoderLayer(
            d_model, num_heads, dim_feedforward, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.head = nn.Linear(d_model, self.out_dim)

    def tokens(self, support: Tensor, labels: Tensor, queries: Tensor) -> Tensor:
        """Tokens ``[B, S+Q, d_model]``: labelled support tokens, then query tokens with the unknown label."""
        x = self.input_proj(torch.cat([support, queries], dim=1))
        s = support.shape[1]
        return torch.cat([x[:, :s] + self.label_proj(labels), x[:, s:] + self.unknown], dim=1)

    def sequence_outputs(self, support: Tensor, labels: Tensor, queries: Tensor) -> Tensor:
        """Query outputs ``[B, Q, out]`` (all queries of a task in one masked pass)."""
        s, q = support.shape[1], queries.shape[1]
        blocked = ~support_query_mask(s, q, device=support.device)  # nn.Transformer masks: True = not allowed
        h = self.encoder(self.tokens(support, labels, queries), mask=blocked)
        return self.head(h[:, s:])
