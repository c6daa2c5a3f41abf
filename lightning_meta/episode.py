"""Episode containers: one few-shot task, or a meta-batch of tasks stacked on a leading axis."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

__all__ = ["Episode", "collate_episodes"]


@dataclass
class Episode:
    """One few-shot task, or a meta-batch of ``B`` tasks when every field has a leading task axis.

    Shapes for a single N-way K-shot task with Q queries per class (images ``[C, H, W]``)::

        support_x  [N*K, C, H, W]     support_y  [N*K]  (long, labels 0..N-1)
        query_x    [N*Q, C, H, W]     query_y    [N*Q]
        classes    [N]                original class ids, ``classes[label]`` is the source class

    Regression tasks (sinusoid) use ``support_x [K, 1]``, ``support_y [K, 1]`` (float) and
    ``classes`` of shape ``[0]``. A meta-batch built by :func:`collate_episodes` prepends ``B``
    to every shape. The dataclass is not frozen so that Lightning can move it between devices.

    Args:
        support_x: the support inputs.
        support_y: their labels (``0..N-1``, long) or regression targets.
        query_x: the query inputs.
        query_y: their labels or targets.
        classes: the original class id of each label (``[0]`` for regression).

    Example:
        >>> ep = Episode(torch.zeros(5, 1, 28, 28), torch.arange(5), torch.zeros(10, 1, 28, 28),
        ...              torch.arange(5).repeat(2), torch.tensor([3, 9, 4, 1, 7]))
        >>> ep.ways, ep.is_batched
        (5, False)
        >>> batch = collate_episodes([ep, ep])
        >>> batch.num_tasks, batch.support_x.shape
        (2, torch.Size([2, 5, 1, 28, 28]))

    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor

    @property
    def is_batched(self) -> bool:
        """True when the fields carry a leading task axis (``support_y`` is 2-D for classification)."""
        return self.classes.dim() == 2

    @property
    def num_tasks(self) -> int:
        """Number of tasks in a meta-batch (1 for a single episode)."""
        return self.classes.shape[0] if self.is_batched else 1

    @property
    def ways(self) -> int:
        """Number of classes per task (0 for regression tasks)."""
        return self.classes.shape[-1]

    def task(self, i: int) -> Episode:
        """The ``i``-th task of a meta-batch."""
        if not self.is_batched:
            raise IndexError("task(i) needs a meta-batch built by collate_episodes; this is a single episode")
        return Episode(*(getattr(self, f.name)[i] for f in fields(self)))

    def select(self, i: int) -> Episode:
        """Task ``i`` as a meta-batch of one (the leading axis is kept)."""
        if not self.is_batched:
            raise IndexError("select(i) needs a meta-batch built by collate_episodes; this is a single episode")
        return Episode(*(getattr(self, f.name)[i : i + 1] for f in fields(self)))

    def tasks(self) -> list[Episode]:
        """All tasks of a meta-batch, in order (a single episode returns ``[self]``)."""
        return [self.task(i) for i in range(self.num_tasks)] if self.is_batched else [self]

    def to(self, *args, **kwargs) -> Episode:
        """Moves/casts the tensors like :meth:`torch.Tensor.to`; labels and class ids keep their dtype."""
        out = {}
        for f in fields(self):
            t: Tensor = getattr(self, f.name)
            if t.is_floating_point():
                out[f.name] = t.to(*args, **kwargs)
            else:  # only move integer tensors, never cast them to a float dtype
                dev = _device_argument(args, kwargs)
                out[f.name] = t.to(dev) if dev is not None else t
        moved = Episode(**out)
        if "_samples" in self.__dict__:  # a shard batch's decode counts (ShardDataModule.consumed_batch)
            moved._samples = self._samples
        return moved

    def clone(self) -> Episode:
        """A copy whose tensors are ordinary (not inference-mode) tensors."""
        return Episode(*(getattr(self, f.name).clone() for f in fields(self)))


def _device_argument(args: tuple, kwargs: dict) -> torch.device | str | int | None:
    """The device that ``Tensor.to(*args, **kwargs)`` would move to, or ``None`` when it names none.

    A device may come as ``device=``, a string, a :class:`torch.device`, a CUDA index (``to(0)``)
    or a tensor whose device to match.
    """
    if "device" in kwargs:
        return kwargs["device"]
    for a in args:
        if isinstance(a, Tensor):
            return a.device
        if isinstance(a, (str, torch.device)) or (isinstance(a, int) and not isinstance(a, bool)):
            return a
    return None


def collate_episodes(episodes: Sequence[Episode]) -> Episode:
    """Stacks single episodes into a meta-batch with a leading task axis ``B``.

    All episodes must have the same shapes (same way, shot and query counts); variable-way
    episodes are consumed one at a time instead.

    Args:
        episodes: single (unbatched) episodes of one shape.

    Raises:
        ValueError: for an empty list, an already batched episode, or mismatched shapes.

    Example:
        >>> ep = Episode(torch.zeros(2, 3), torch.arange(2), torch.zeros(4, 3), torch.arange(2).repeat(2),
        ...              torch.tensor([7, 1]))
        >>> batch = collate_episodes([ep, ep, ep])
        >>> batch.query_x.shape, batch.classes.tolist()
        (torch.Size([3, 4, 3]), [[7, 1], [7, 1], [7, 1]])

    """
    if len(episodes) == 0:
        raise ValueError("collate_episodes needs at least one Episode, got an empty list")
    first = episodes[0]
    for i, ep in enumerate(episodes):
        if not isinstance(ep, Episode):
            raise ValueError(f"collate_episodes expects Episode objects; item {i} is {type(ep).__name__}")
        if ep.is_batched:
            raise ValueError(f"item {i} is already a meta-batch; pass single episodes to collate_episodes")
        for f in fields(Episode):
            a, b = getattr(first, f.name), getattr(ep, f.name)
            if a.shape != b.shape:
                raise ValueError(
                    f"episode {i} has {f.name} of shape {tuple(b.shape)} but episode 0 has {tuple(a.shape)}; "
                    "a meta-batch needs equal way/shot/query counts (use fixed ways/shots, or meta_batch_size=1 "
                    "for variable-way episodes)"
                )
    return Episode(*(torch.stack([getattr(ep, f.name) for ep in episodes]) for f in fields(Episode)))
