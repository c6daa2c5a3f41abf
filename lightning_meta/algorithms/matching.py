"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu and Wierstra, 2016)."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.episode import Episode
from lightning_meta.errors import MetaConfigError, require_positive
from lightning_meta.functional.metric import cosine_similarity

__all__ = ["AttentionLSTM", "MatchingNet", "MatchingState", "SupportLSTM", "matching_attention", "matching_log_probs"]


def matching_attention(query: Tensor, support: Tensor, temperature: float = 1.0) -> Tensor:
    """Attention ``a(x, x_i)``: softmax over the support of the cosine similarities.

    Args:
        query: ``[..., m, d]`` query embeddings ``f(x)``.
        support: ``[..., n, d]`` support embeddings ``g(x_i)``.
        temperature: similarities are divided by it before the softmax (1 in the paper).

    Returns:
        ``[..., m, n]`` attention weights; each row sums to one. The similarities are computed in
        float32 for bf16/fp16 inputs and under autocast, and the weights come back in float32.

    Example:
        >>> matching_attention(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
        tensor([[0.7311, 0.2689]])

    """
    sim = cosine_similarity(query, support)
    return torch.softmax(sim / temperature, dim=-1)


def matching_log_probs(
    query: Tensor, support: Tensor, support_y: Tensor, ways: int, temperature: float = 1.0
) -> Tensor:
    """Log class probabilities ``log sum_i a(x, x_i) y_i`` of the attention-weighted support labels.

    Computed as a log-sum-exp over each class' support examples of the log attention, which is
    exact and stays finite where the plain probabilities would underflow.

    Args:
        query: ``[..., m, d]`` query embeddings.
        support: ``[..., n, d]`` support embeddings.
        support_y: ``[..., n]`` labels in ``0..ways-1``.
        ways: number of classes ``N``.
        temperature: see :func:`matching_attention`.

    Returns:
        ``[..., m, N]`` log probabilities (``exp`` of each row sums to one), in float32 for
        bf16/fp16 inputs and under autocast (the cosine similarities are computed in float32).

    """
    sim = cosine_similarity(query, support)
    log_a = torch.log_softmax(sim / temperature, dim=-1)  # [..., m, n]
    member = F.one_hot(support_y, ways).to(torch.bool)  # [..., n, N]
    mask = torch.zeros(member.shape, dtype=log_a.dtype, device=log_a.device).masked_fill(~member, float("-inf"))
    return torch.logsumexp(log_a.unsqueeze(-1) + mask.unsqueeze(-3), dim=-2)  # [..., m, N]


class SupportLSTM(nn.Module):
    """Full-context support embedding ``g``: a bidirectional LSTM over the support set.

    ``g(x_i, S) = h_i(forward) + h_i(backward) + g'(x_i)`` (Vinyals et al. 2016, appendix A.2),
    with ``g'`` the backbone embedding; the support set is read in the order it is given.

    Args:
        dim: embedding size ``d`` (each direction's hidden size is ``d`` too).

    Example:
        >>> SupportLSTM(8)(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])

    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.dim = dim

    def forward(self, support: Tensor) -> Tensor:
        """``[B, n, d] -> [B, n, d]``."""
        out, _ = self.lstm(support)
        return support + out[..., : self.dim] + out[..., self.dim :]


class AttentionLSTM(nn.Module):
    """Full-context query embedding ``f``: an LSTM with read-attention over the support, K steps.

    With ``f'(x)`` the backbone embedding and ``g`` the support embeddings (appendix A.1)::

        h_0 = f'(x),  c_0 = 0
        r_{k-1} = sum_i softmax_i(h_{k-1} . g(x_i)) g(x_i)
        h^_k, c_k = LSTM(f'(x), [h_{k-1}, r_{k-1}], c_{k-1})
        h_k = h^_k + f'(x)                       f(x, S) = h_K

    The LSTM's recurrent input ``[h, r]`` is implemented by feeding ``[f'(x), r]`` as the cell
    input and ``h`` as its hidden state: the gates are linear in the concatenation either way.

    Args:
        dim: embedding size ``d``.
        steps: processing steps ``K >= 1``.

    Example:
        >>> AttentionLSTM(8, steps=3)(torch.randn(2, 7, 8), torch.randn(2, 5, 8)).shape
        torch.Size([2, 7, 8])

    """

    def __init__(self, dim: int, steps: int = 3) -> None:
        super().__init__()
        if steps < 1:
            raise MetaConfigError(f"fce_steps={steps} must be >= 1 (processing steps of the attention LSTM)")
        self.cell = nn.LSTMCell(2 * dim, dim)
        self.steps = steps

    def forward(self, query: Tensor, support: Tensor) -> Tensor:
        """``[B, m, d]`` queries read ``[B, n, d]`` support embeddings; returns ``[B, m, d]``."""
        b, m, d = query.shape
        x = query.reshape(b * m, d)
        h, c = x, torch.zeros_like(x)
        for _ in range(self.steps):
            att = torch.softmax(h.view(b, m, d) @ support.transpose(-1, -2), dim=-1)  # [B, m, n]
            r = (att @ support).reshape(b * m, d)
            h_hat, c = self.cell(torch.cat([x, r], dim=-1), (h, c))
            h = h_hat + x
        return h.view(b, m, d)


class MatchingState(NamedTuple):
    """What :meth:`MatchingNet.adapt` returns: the task's support set in embedding space."""

    support: Tensor  # [n, d] support embeddings g(x_i, S)
    labels: Tensor  # [n] support labels
    ways: int


class MatchingNet(MetaLearner):
    """Classifies a query by attention over the labelled support set (Matching Networks).

    ``P(y | x, S) = sum_i a(x, x_i) y_i`` with ``a`` the softmax over the support of the cosine
    similarity between the query embedding ``f(x)`` and the support embeddings ``g(x_i)``; the
    loss is the negative log of that probability. Without full-context embeddings ``f = g =``
    the backbone; with ``fce=True`` ``g`` is a bidirectional LSTM over the support set
    (:class:`SupportLSTM`) and ``f`` an attention LSTM reading it for ``fce_steps`` steps
    (:class:`AttentionLSTM`). ``predict`` returns the log probabilities as logits.

    Each task is embedded in one backbone forward of its own (support and queries together), so
    BatchNorm statistics are per task and results do not depend on how tasks are split across
    devices. Way and shot may differ between training and evaluation.

    Args:
        backbone: embedding network mapping images to ``[b, d]``.
        fce: use full-context embeddings.
        fce_steps: processing steps ``K`` of the attention LSTM (with ``fce``).
        embedding_dim: ``d``, needed by ``fce``; ``None`` reads the backbone's ``out_features``.
        temperature: cosine similarities are divided by it before the softmax (1 in the paper); > 0.

    Example:
        >>> from lightning_meta.backbones import Conv4
        >>> from lightning_meta import Episode
        >>> model = MatchingNet(Conv4(1, 16, 28), fce=True)
        >>> ep = Episode(torch.randn(5, 1, 28, 28), torch.arange(5), torch.randn(10, 1, 28, 28),
        ...              torch.arange(5).repeat(2), torch.arange(5))
        >>> model.predict(model.adapt(ep), ep.query_x).exp().sum(-1).shape
        torch.Size([10])

    """

    def __init__(
        self,
        backbone: nn.Module,
        fce: bool = False,
        fce_steps: int = 3,
        embedding_dim: int | None = None,
        temperature: float = 1.0,
        ways: int = 5,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        per_task_backward: bool = False,
    ) -> None:
        super().__init__(
            ways=ways, task="classification", lr=lr, weight_decay=weight_decay, per_task_backward=per_task_backward
        )
        require_positive("temperature", temperature, "similarities are divided by it")
        if fce and fce_steps < 1:
            raise MetaConfigError(f"fce_steps={fce_steps} must be >= 1 with fce=True (or set fce=False)")
        if embedding_dim is None:
            embedding_dim = getattr(backbone, "out_features", None)
        if fce and (embedding_dim is None or embedding_dim < 1):
            raise MetaConfigError(
                f"fce=True needs the embedding size: {type(backbone).__name__} has no out_features attribute and "
                f"embedding_dim={embedding_dim}; pass embedding_dim (the backbone's output size)"
            )
        self.save_hyperparameters(ignore=["backbone"])
        self.backbone = backbone
        self.fce = fce
        self.embedding_dim = embedding_dim
        self._temperature = float(temperature)
        if fce:
            self.support_lstm = SupportLSTM(embedding_dim)
            self.query_lstm = AttentionLSTM(embedding_dim, fce_steps)

    # ------------------------------------------------------------ helpers
    @property
    def temperature(self) -> float:
        """The softmax temperature; setting it checks it and updates ``hparams`` (checkpoints keep it)."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = require_positive("temperature", value, "similarities are divided by it")
        self.hparams["temperature"] = self._temperature  # a checkpoint rebuilds the model from its hyperparameters

    def _check_embedding(self, emb: Tensor) -> None:
        if self.fce and (emb.dim() != 2 or emb.shape[-1] != self.embedding_dim):
            raise MetaConfigError(
                f"the backbone returns embeddings of shape {tuple(emb.shape)} but the FCE LSTMs were built for "
                f"embedding_dim={self.embedding_dim}; set embedding_dim={emb.shape[-1]} (or fix the backbone's "
                "image_size)"
            )

    def _support_context(self, support: Tensor) -> Tensor:
        """``g``: ``[B, n, d]`` support embeddings in the context of their set."""
        return self.support_lstm(support) if self.fce else support

    def _query_context(self, query: Tensor, support: Tensor) -> Tensor:
        """``f``: ``[B, m, d]`` query embeddings, reading the support embeddings ``g``."""
        return self.query_lstm(query, support) if self.fce else query

    def _batched_log_probs(self, batch: Episode) -> Tensor:
        """Query log probabilities ``[B, nq, N]``; each task's images are embedded in their own forward."""
        ns = batch.support_y.shape[1]
        s_emb, q_emb = [], []
        for i in range(batch.num_tasks):
            emb = self.backbone(torch.cat([batch.support_x[i], batch.query_x[i]]))
            self._check_embedding(emb)
            s_emb.append(emb[:ns])
            q_emb.append(emb[ns:])
        g = self._support_context(torch.stack(s_emb))
        f = self._query_context(torch.stack(q_emb), g)
        return matching_log_probs(f, g, batch.support_y, batch.ways, self.temperature)

    # ------------------------------------------------------------ hooks
    def adapt(self, episode: Episode) -> MatchingState:
        """Embeds the support set of one episode: ``g(x_i, S)`` and the labels."""
        emb = self.backbone(episode.support_x)
        self._check_embedding(emb)
        return MatchingState(self._support_context(emb.unsqueeze(0))[0], episode.support_y, episode.ways)

    def predict(self, state: MatchingState, x: Tensor) -> Tensor:
        """Log probabilities ``[m, N]`` of the queries ``x`` (usable as logits)."""
        emb = self.backbone(x)
        self._check_embedding(emb)
        f = self._query_context(emb.unsqueeze(0), state.support.unsqueeze(0))[0]
        return matching_log_probs(f, state.support, state.labels, state.ways, self.temperature)

    def _batched_query_outputs(self, batch: Episode) -> Tensor | None:
        """The log probabilities :meth:`evaluate` scores (None when a subclass overrides the hooks)."""
        if self._overrides_hooks_of(MatchingNet):
            return None
        with torch.no_grad():
            return self._batched_log_probs(batch)

    def meta_loss(self, batch: Episode) -> Tensor:
        """Negative log-likelihood of the query labels over all tasks.

        A subclass that overrides :meth:`adapt` or :meth:`predict` trains through them instead
        (the generic per-task path of :class:`~lightning_meta.algorithms.MetaLearner`, with
        :meth:`loss_fn`, the cross-entropy of ``predict``'s outputs).
        """
        if self._overrides_hooks_of(MatchingNet):
            return MetaLearner.meta_loss(self, batch)
        log_p = self._batched_log_probs(batch)
        self._train_scores = self.per_task_score(log_p.detach(), batch.query_y)
        # cross-entropy of log probabilities is their negative log-likelihood (log_softmax leaves them)
        return self.per_task_loss(log_p, batch.query_y).mean()

    def evaluate(self, batch: Episode) -> dict[str, Tensor]:
        """Per-episode query accuracy (through :meth:`adapt` / :meth:`predict` when a subclass overrides them)."""
        if self._overrides_hooks_of(MatchingNet):
            return MetaLearner.evaluate(self, batch)
        with torch.no_grad():
            log_p = self._batched_log_probs(batch)
        return {self.score_name: self.per_task_score(log_p, batch.query_y)}
