"""Memory-augmented neural network with least-recently-used access (Santoro et al., 2016)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_meta.algorithms._sequence import SequenceLearner, SupportOrder
from lightning_meta.algorithms.base import TaskKind
from lightning_meta.errors import MetaConfigError, require_positive
from lightning_meta.functional.sequence import cosine_read_weights, least_used

__all__ = ["MANN", "MemoryState"]


class MemoryState(NamedTuple):
    """Recurrent state of :class:`MANN` for ``b`` sequences (``R`` read heads, ``N`` slots, width ``W``).

    ``h, c [b, hidden]`` LSTM state; ``memory [b, N, W]``; ``usage [b, N]``; ``read_weights
    [b, R, N]`` and ``reads [b, R*W]`` of the last step; ``lru [b, R, N]`` one-hot least-used slots.
    """

    h: Tensor
    c: Tensor
    memory: Tensor
    usage: Tensor
    read_weights: Tensor
    reads: Tensor
    lru: Tensor

    def expand(self, n: int) -> MemoryState:
        """Each of the ``b`` states repeated ``n`` times (``[b*n, ...]``, state ``i`` at rows ``i*n .. i*n+n-1``)."""
        return MemoryState(*(t.repeat_interleave(n, dim=0) for t in self))


class MANN(SequenceLearner):
    """An LSTM controller with an external memory read by content and written to least-used slots.

    Step ``t`` (Santoro et al. 2016, §3): the controller LSTM reads the input embedding, a label
    encoding and the previous step's read vectors, and emits one key ``k`` per read head and a
    write gate ``alpha``. Reads: ``w_r = softmax(s * cosine(k, M))``, ``r = w_r M``. Writes: the
    least-used slot of each head is cleared, then ``M += w_w^T k`` with ``w_w = sigmoid(alpha)
    w_r(t-1) + (1 - sigmoid(alpha)) w_lu(t-1)``. Usage decays: ``u = gamma u + w_r + w_w``; the
    ``R`` least used slots (one per head) become ``w_lu``. The output is a linear map of ``[h, r]``.

    Choices not fixed by the paper, documented here:

    - A step reads the memory *before* its own write (the paper reads after writing, which lets a
      step retrieve its own key). Queries only read, so they never change the memory.
    - The cosine similarities are multiplied by a learned sharpness ``s`` (initialised to
      ``sharpness``; the paper uses 1) so that the softmax over many slots can focus.
    - With several heads, head ``h`` writes to the ``h``-th least-used slot.

    Sequence and labels: the support examples in their given order, then each query on its own
    (the state after the support set is copied for every query, so the sequence model never lets
    one query see another; a BatchNorm backbone using batch statistics still normalises a task's
    support and queries together, see :class:`~lightning_meta.algorithms._sequence.SequenceLearner`). With
    ``label_offset=True`` (the paper's scheme), the label of step ``t`` is presented with input
    ``t + 1``: support step ``t`` gets the previous support label (zeros at the first step), and
    the last support label comes with one extra writing step whose input embedding is zero, so it
    is bound in memory like the others (a query step only reads, so it could not write it). With
    ``label_offset=False`` every support example carries its own label (the SNAIL scheme; easier
    to train). Queries carry a zero label either way. The controller and the memory read the support sequence in
    order; by default (``support_order="shuffled"``) it is read in an order drawn from the
    episode's class ids rather than the datamodules' grouped-by-label order (see ``support_order``).

    Args:
        backbone: embedding network with an ``out_features`` attribute (Conv4 for images, MLP for
            sinusoid x values; the paper used raw pixels).
        ways: classes per episode (linked from the datamodule); sizes the label one-hot and the output.
        task: ``classification`` or ``regression``.
        max_len: longest accepted support set + 1.
        hidden_size: LSTM controller units (200 in the paper).
        memory_slots: memory rows ``N`` (128 in the paper).
        memory_width: memory row width ``W`` (40 in the paper).
        read_heads: read heads ``R`` (4 in the paper).
        usage_decay: ``gamma`` in ``[0, 1]``.
        sharpness: initial multiplier of the cosine similarities (> 0).
        label_offset: present the label of step ``t`` with input ``t + 1`` (see above).
        per_task_backward: one backward per task, see :class:`~lightning_meta.algorithms.MetaLearner`.
        support_order: ``shuffled`` (default; classification) reads each support set sorted by label
            and then permuted by the episode's class ids, so that positions carry no label
            information and the model must read the labels (the paper presents examples in random
            order); ``given`` reads them as the episode lists them. See
            :class:`~lightning_meta.algorithms._sequence.SequenceLearner`.

    Example:
        >>> from lightning_meta.backbones import MLP
        >>> from lightning_meta import Episode
        >>> model = MANN(MLP(784, [32]), ways=5, hidden_size=32, memory_slots=16, memory_width=8, read_heads=2)
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
        hidden_size: int = 200,
        memory_slots: int = 128,
        memory_width: int = 40,
        read_heads: int = 4,
        usage_decay: float = 0.95,
        sharpness: float = 10.0,
        label_offset: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        per_task_backward: bool = False,
        support_order: SupportOrder = "shuffled",
    ) -> None:
        super().__init__(backbone, max_len=max_len, ways=ways, task=task, lr=lr, weight_decay=weight_decay,
                         per_task_backward=per_task_backward, support_order=support_order)
        for name, value in (("hidden_size", hidden_size), ("memory_width", memory_width), ("read_heads", read_heads)):
            if value < 1:
                raise MetaConfigError(f"{name}={value} must be >= 1")
        if memory_slots < read_heads:
            raise MetaConfigError(
                f"memory_slots={memory_slots} must be >= read_heads={read_heads} (each head writes its own slot)"
            )
        if not 0.0 <= usage_decay <= 1.0:
            raise MetaConfigError(f"usage_decay={usage_decay} must lie in [0, 1] (0.95 is typical)")
        require_positive("sharpness", sharpness, "1 reproduces the paper's plain cosine softmax")
        self.save_hyperparameters(ignore=["backbone"])
        self.hidden_size = hidden_size
        self.memory_slots = memory_slots
        self.memory_width = memory_width
        self.read_heads = read_heads
        self.usage_decay = usage_decay
        self.label_offset = label_offset
        reads = read_heads * memory_width
        self.controller = nn.LSTMCell(self.embed_dim + self.label_dim + reads, hidden_size)
        self.key = nn.Linear(hidden_size, reads)
        self.write_gate = nn.Linear(hidden_size, read_heads)
        self.log_sharpness = nn.Parameter(torch.tensor(math.log(sharpness)))
        self.head = nn.Linear(hidden_size + reads, self.out_dim)

    def initial_state(self, batch: int, like: Tensor) -> MemoryState:
        """Empty memory (rows of 1e-6 so cosines are defined), zero usage and reads, LSTM zeros."""
        n, w, r = self.memory_slots, self.memory_width, self.read_heads
        z = like.new_zeros
        usage = z(batch, n)
        return MemoryState(
            h=z(batch, self.hidden_size), c=z(batch, self.hidden_size), memory=like.new_full((batch, n, w), 1e-6),
            usage=usage, read_weights=z(batch, r, n), reads=z(batch, r * w), lru=least_used(usage, r),
        )

    def step(self, x: Tensor, label: Tensor, state: MemoryState, write: bool = True) -> tuple[Tensor, MemoryState]:
        """One time step: outputs ``[b, out]`` and the next state (memory unchanged when ``write=False``)."""
        h, c = self.controller(torch.cat([x, label, state.reads], dim=-1), (state.h, state.c))
        keys = torch.tanh(self.key(h)).view(-1, self.read_heads, self.memory_width)  # [b, R, W]
        w_r = cosine_read_weights(keys, state.memory, self.log_sharpness.exp())  # [b, R, N]
        reads = torch.einsum("brn,bnw->brw", w_r, state.memory).flatten(1)  # [b, R*W]
        out = self.head(torch.cat([h, reads], dim=-1))
        if not write:
            return out, state._replace(h=h, c=c, read_weights=w_r, reads=reads)
        alpha = torch.sigmoid(self.write_gate(h))[..., None]  # [b, R, 1]
        w_w = alpha * state.read_weights + (1 - alpha) * state.lru  # [b, R, N]
        cleared = state.memory * (1 - state.lru.sum(1).clamp(max=1))[..., None]
        memory = cleared + torch.einsum("brn,brw->bnw", w_w, keys)
        usage = self.usage_decay * state.usage + w_r.sum(1) + w_w.sum(1)
        return out, MemoryState(h, c, memory, usage, w_r, reads, least_used(usage, self.read_heads))

    def run(self, x: Tensor, labels: Tensor, state: MemoryState | None = None) -> tuple[Tensor, MemoryState]:
        """Read a whole sequence: ``x [b, T, d]`` and the label inputs ``[b, T, L]`` of each step.

        Returns the outputs of every step ``[b, T, out]`` (step ``t`` depends on steps ``<= t``
        only) and the final state. Label inputs are used as given (no offset is applied here).
        """
        state = self.initial_state(x.shape[0], x) if state is None else state
        outs = []
        for t in range(x.shape[1]):
            out, state = self.step(x[:, t], labels[:, t], state)
            outs.append(out)
        return torch.stack(outs, dim=1), state

    def sequence_outputs(self, support: Tensor, labels: Tensor, queries: Tensor) -> Tensor:
        """Query outputs ``[B, Q, out]``: the support sequence once, then one read-only step per query."""
        b, q = queries.shape[:2]
        if self.label_offset:  # label t arrives with input t+1
            support_labels = torch.cat([torch.zeros_like(labels[:, :1]), labels[:, :-1]], dim=1)
            _, state = self.run(support, support_labels)
            # the last support label arrives with one more writing step (no input), so that it is
            # written to memory like every other label
            _, state = self.step(torch.zeros_like(support[:, 0]), labels[:, -1], state)
        else:
            _, state = self.run(support, labels)
        query_labels = torch.zeros_like(labels[:, 0]).repeat_interleave(q, dim=0)  # [B*Q, L]: unknown
        out, _ = self.step(queries.flatten(0, 1), query_labels, state.expand(q), write=False)
        return out.view(b, q, -1)
