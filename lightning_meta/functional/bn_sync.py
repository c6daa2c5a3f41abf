"""BatchNorm running statistics under data parallelism, equal to those of one process.

Under DDP every rank normalises its own tasks and updates its BatchNorm running statistics with
them only (and DDP copies rank 0's buffers to the others at every forward), so after training the
running statistics are not those of one process that saw every task of every meta-batch, although
the weights are. One process applies one exponential-moving-average (EMA) update per training
forward of a BatchNorm layer, in task order; the meta-batch sampler gives rank ``r`` the ``r``-th
contiguous block of each global meta-batch, so the one-process order is rank 0's updates, then
rank 1's, and so on.

:class:`RunningStatsSync` records, during a training step, the batch statistics every layer
folded into its running statistics and the statistics before the step; after the step it gathers
every rank's sequence and replays all of them in rank order from the statistics before the step
(:func:`replay_running_stats`), so every rank ends with the buffers of one process.

The batch statistics are read off each update rather than recomputed from the layer input: with
``f`` the update's factor, ``running = (1 - f) * old + f * stat`` gives ``stat = (running - (1 - f)
* old) / f`` (in float64), which costs ``O(channels)`` per forward (recomputing a per-channel
variance costs about three BatchNorm forwards on a CPU). The error this back-out adds to ``stat``
is about ``ulp(running) / f``, and the replay multiplies ``stat`` by ``f`` again, so replayed
statistics differ from one process by a few units in the last place of the running statistics,
the size of the rounding the updates themselves make.

Nothing here depends on Lightning: the caller passes a ``gather`` function (``tensor ->
[world_size, *tensor.shape]``, e.g. ``LightningModule.all_gather``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_meta.functional.inner_loop import PerStepBatchNorm, _recomputing

__all__ = ["RunningStatsSync", "replay_running_stats", "tracked_norm_layers"]

Gather = Callable[[Tensor], Tensor]


def replay_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    means: Tensor,
    variances: Tensor,
    momentum: float | None,
    num_batches_tracked: int | Tensor | None = None,
    rows: Sequence[int] | Tensor | None = None,
) -> tuple[Tensor, Tensor, int | None]:
    """Apply BatchNorm's running-statistics updates for a sequence of batches; returns new tensors.

    Update ``j`` (in order) does ``running = (1 - f) * running + f * batch_stat`` with
    ``f = momentum``, or ``f = 1 / (num_batches_tracked + j + 1)`` (the cumulative average of
    :class:`torch.nn.BatchNorm2d` with ``momentum=None``), on the whole ``[C]`` buffer, or on row
    ``rows[j]`` of a ``[steps, C]`` buffer (:class:`PerStepBatchNorm`). Updates are computed in
    float64 and rounded to the buffer's dtype after each one, as the buffer stores them.

    Args:
        running_mean: the running mean before the updates, ``[C]`` or ``[steps, C]``.
        running_var: the running variance before the updates, the same shape.
        means: ``[K, C]`` batch means, in update order.
        variances: ``[K, C]`` unbiased batch variances, in update order.
        momentum: the layer's momentum, or ``None`` for a cumulative average.
        num_batches_tracked: batches counted before the updates (needed when ``momentum`` is None).
        rows: for 2-d buffers, the row each update goes to.

    Returns:
        ``(running_mean, running_var, num_batches_tracked + K)`` (the count is ``None`` if not given).

    Example:
        >>> bn = torch.nn.BatchNorm1d(2, momentum=None).double()
        >>> xs = [torch.randn(6, 2, dtype=torch.float64) for _ in range(3)]
        >>> means, variances = torch.stack([x.mean(0) for x in xs]), torch.stack([x.var(0) for x in xs])
        >>> mean, var, n = replay_running_stats(bn.running_mean, bn.running_var, means, variances, None, 0)
        >>> for x in xs:
        ...     _ = bn(x)
        >>> bool(torch.allclose(mean, bn.running_mean)), n
        (True, 3)

    """
    if means.shape != variances.shape or means.dim() != 2:
        raise ValueError(f"means and variances must both be [K, C], got {tuple(means.shape)} and "
                         f"{tuple(variances.shape)}")
    if means.shape[1] != running_mean.shape[-1] or running_var.shape != running_mean.shape:
        raise ValueError(f"means/variances of {means.shape[1]} channels do not fit running statistics of shape "
                         f"{tuple(running_mean.shape)} (mean) and {tuple(running_var.shape)} (var)")
    if running_mean.dim() == 2 and rows is None:
        raise ValueError("rows are required for [steps, C] running statistics")
    if rows is not None:
        steps = running_mean.shape[0] if running_mean.dim() == 2 else 1
        bad = [int(r) for r in rows if not 0 <= int(r) < steps]
        if len(rows) != means.shape[0] or bad:
            raise ValueError(f"rows must give one row in 0..{steps - 1} for each of the {means.shape[0]} updates, got "
                             f"{[int(r) for r in rows]}")
    if momentum is None and num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    dtype = running_mean.dtype
    wide = torch.promote_types(dtype, torch.float64)  # each update is computed wide, then stored as the buffer is
    mean, var = running_mean.detach().to(wide, copy=True), running_var.detach().to(wide, copy=True)
    means = means.to(device=mean.device, dtype=wide)
    variances = variances.to(device=var.device, dtype=wide)
    count = None if num_batches_tracked is None else int(num_batches_tracked)
    row_list = None if rows is None else [int(r) for r in rows]
    for j in range(means.shape[0]):
        f = momentum if momentum is not None else 1.0 / float(count + j + 1)  # type: ignore[operator]
        m = mean if row_list is None else mean[row_list[j]]
        v = var if row_list is None else var[row_list[j]]
        m.copy_((means[j] * f + m * (1.0 - f)).to(dtype))
        v.copy_((variances[j] * f + v * (1.0 - f)).to(dtype))
    mean, var = mean.to(dtype), var.to(dtype)
    return mean, var, None if count is None else count + means.shape[0]


def tracked_norm_layers(module: nn.Module) -> list[nn.Module]:
    """Return the layers of ``module`` whose running statistics :class:`RunningStatsSync` handles, in module order.

    Every :class:`torch.nn.modules.batchnorm._BatchNorm` with running statistics (BatchNorm1d/2d/3d,
    but not :class:`torch.nn.SyncBatchNorm`, whose statistics are already global) and every
    :class:`PerStepBatchNorm`.
    """
    layers: list[nn.Module] = []
    for m in module.modules():
        if isinstance(m, PerStepBatchNorm):
            layers.append(m)
        elif (isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, nn.SyncBatchNorm)
              and m.running_mean is not None and m.running_var is not None):
            layers.append(m)
    return layers


class RunningStatsSync:
    """Makes BatchNorm running statistics under data parallelism equal to those of one process.

    Registers a forward pre-hook and a forward hook on each layer of :func:`tracked_norm_layers`.
    Between :meth:`begin` and :meth:`sync` (one training step), each forward that updates the
    layer's own running statistics is recorded: the batch statistics it folded in (read off the
    update, see the module docstring), its row for per-step layers, and, at the first one, the
    statistics before the step. A forward updates them in training mode, with
    ``track_running_stats`` for BatchNorm, outside the recomputation of a checkpointed forward for
    :class:`PerStepBatchNorm`, and only when the layer holds its registered buffers (not copies
    passed to ``torch.func.functional_call``, nor per-task copies under ``vmap``; ``torch.func``
    transforms cannot update captured buffers in place). :meth:`sync` gathers every rank's records
    and rewrites the buffers (running mean, variance and ``num_batches_tracked``) as one process
    applying rank 0's updates, then rank 1's, ... would have left them (:func:`replay_running_stats`).

    Exact (to rounding) when one process would run the same forwards in that order: each rank runs
    the contiguous block ``rank`` of the global meta-batch, and a task's forwards all happen before
    the next task's (per-task loops, the case of every shipped algorithm). Not exact when a single
    forward normalises several tasks together (its statistics mix tasks), nor when BatchNorm
    updates happen in the backward pass of a step that processed several tasks (a checkpointed
    ``nn.BatchNorm`` forward recomputed with tracking on).

    Args:
        module: the model whose BatchNorm layers to follow (the same structure on every rank).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> sync = RunningStatsSync(net)
        >>> sync.begin()
        >>> _ = net(torch.randn(8, 3))
        >>> sync.pending()
        1
        >>> sync.sync(lambda t: t.unsqueeze(0))  # one process: gather adds a world dimension of 1
        1
        >>> sync.remove()

    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = tracked_norm_layers(module)
        self.active = False
        self._handles = []
        for i, m in enumerate(self.layers):
            self._handles.append(m.register_forward_pre_hook(functools.partial(self._pre_hook, i)))
            self._handles.append(m.register_forward_hook(functools.partial(self._post_hook, i)))
        n = len(self.layers)
        self._refs: list[tuple[Tensor, Tensor] | None] = [None] * n
        self._before: list[tuple[Tensor, Tensor, int | None] | None] = [None] * n
        self._open: list[tuple[int, Tensor, Tensor, float] | None] = [None] * n
        self._records: list[list[Tensor]] = [[] for _ in range(n)]

    # ------------------------------------------------------------------ recording
    def begin(self) -> None:
        """Start recording a training step (forgets anything recorded and not synchronised)."""
        for i, m in enumerate(self.layers):
            self._refs[i] = (m._buffers["running_mean"], m._buffers["running_var"])
            self._before[i] = None
            self._open[i] = None
            self._records[i] = []
        self.active = True

    def pending(self) -> int:
        """Return the number of running-statistics updates recorded on this rank since :meth:`begin`."""
        return sum(len(r) for r in self._records)

    @staticmethod
    def _updates(m: nn.Module, x: Any) -> bool:
        """Tell whether a forward of ``m`` on ``x`` updates the running statistics ``m`` holds now."""
        if not isinstance(x, Tensor) or torch._C._functorch.is_functorch_wrapped_tensor(x):
            return False  # in-place buffer updates are impossible under torch.func transforms
        if isinstance(m, PerStepBatchNorm):
            return m.training and not _recomputing()
        return bool(m.training and m.track_running_stats)

    def _pre_hook(self, index: int, m: nn.Module, args: tuple[Any, ...]) -> None:
        self._open[index] = None
        if not self.active or not args or not self._updates(m, args[0]):
            return
        ref = self._refs[index]
        if ref is None or m.running_mean is not ref[0] or m.running_var is not ref[1]:
            return  # the forward updates copies of the buffers, not the layer's own statistics
        nbt = getattr(m, "num_batches_tracked", None)
        count = None if nbt is None else int(nbt)
        if self._before[index] is None:
            self._before[index] = (ref[0].detach().clone(), ref[1].detach().clone(), count)
        if isinstance(m, PerStepBatchNorm):
            row, factor = min(m.step, m.steps - 1), float(m.momentum)
        elif m.momentum is not None:
            row, factor = 0, float(m.momentum)
        else:  # cumulative average: the forward counts the batch first, then uses 1 / count
            row, factor = 0, 0.0 if count is None else 1.0 / float(count + 1)
        old_mean = ref[0][row] if isinstance(m, PerStepBatchNorm) else ref[0]
        old_var = ref[1][row] if isinstance(m, PerStepBatchNorm) else ref[1]
        self._open[index] = (row, old_mean.detach().to(torch.float64, copy=True),
                             old_var.detach().to(torch.float64, copy=True), factor)

    def _post_hook(self, index: int, m: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        opened, self._open[index] = self._open[index], None
        if opened is None:
            return
        row, old_mean, old_var, f = opened
        ref = self._refs[index]
        assert ref is not None
        new_mean = ref[0][row] if isinstance(m, PerStepBatchNorm) else ref[0]
        new_var = ref[1][row] if isinstance(m, PerStepBatchNorm) else ref[1]
        with torch.no_grad():
            if f > 0:
                mean = (new_mean.detach().to(torch.float64) - old_mean * (1.0 - f)) / f
                var = (new_var.detach().to(torch.float64) - old_var * (1.0 - f)) / f
            else:  # a zero factor leaves the statistics alone: any value replays the same
                mean, var = torch.zeros_like(old_mean), torch.zeros_like(old_var)
            self._records[index].append(torch.cat([old_mean.new_tensor([row]), mean, var]))

    # ------------------------------------------------------------------ synchronisation
    def sync(self, gather: Gather) -> int:
        """Replay every rank's recorded updates in rank order; returns how many updates were replayed (all layers).

        Must be called on every rank (it runs two collective gathers, one when nothing was
        recorded anywhere). ``gather`` maps a tensor to ``[world_size, *shape]``, e.g.
        ``LightningModule.all_gather``. Ends the recording started by :meth:`begin`.
        """
        self.active = False
        if not self.layers:
            return 0
        device = self.layers[0].running_mean.device
        lengths = torch.tensor([len(r) for r in self._records], dtype=torch.int64, device=device)
        all_lengths = gather(lengths).reshape(-1, len(self.layers)).cpu()  # [W, L]
        kmax = all_lengths.max(0).values.tolist()
        applied = 0
        if sum(kmax) > 0:
            pieces = []
            for i, m in enumerate(self.layers):
                if kmax[i] == 0:
                    continue
                width = 2 * m.running_mean.shape[-1] + 1  # [row, mean (C), variance (C)] per update
                block = torch.zeros(kmax[i], width, dtype=torch.float64, device=device)
                if self._records[i]:
                    block[: len(self._records[i])] = torch.stack(self._records[i]).to(device)
                pieces.append(block.flatten())
            gathered = gather(torch.cat(pieces)).reshape(all_lengths.shape[0], -1)  # [W, P]
            offset = 0
            for i, m in enumerate(self.layers):
                if kmax[i] == 0:
                    continue
                channels = m.running_mean.shape[-1]
                width = 2 * channels + 1
                seg = gathered[:, offset : offset + kmax[i] * width].reshape(-1, kmax[i], width)
                offset += kmax[i] * width
                seq = torch.cat([seg[r, : int(all_lengths[r, i])] for r in range(seg.shape[0])])
                applied += seq.shape[0]
                self._apply(i, m, seq, channels)
        self._records = [[] for _ in self.layers]
        self._before = [None] * len(self.layers)
        return applied

    def _apply(self, index: int, m: nn.Module, seq: Tensor, channels: int) -> None:
        before = self._before[index]
        if before is None:  # no update on this rank: its buffers are still those before the step
            nbt = getattr(m, "num_batches_tracked", None)
            before = (m.running_mean.detach().clone(), m.running_var.detach().clone(),
                      None if nbt is None else int(nbt))
        mean0, var0, count = before
        momentum = m.momentum
        rows = seq[:, 0].round().long().tolist() if isinstance(m, PerStepBatchNorm) else None
        if momentum is None and count is None:
            momentum = 0.0  # BatchNorm without a batch counter and momentum=None never moves its statistics
        mean, var, count = replay_running_stats(mean0, var0, seq[:, 1 : 1 + channels], seq[:, 1 + channels :],
                                                momentum, count, rows)
        with torch.no_grad():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            nbt = getattr(m, "num_batches_tracked", None)
            if nbt is not None and count is not None:
                nbt.fill_(count)

    def remove(self) -> None:
        """Remove the hooks (recording stops for good)."""
        self.active = False
        for h in self._handles:
            h.remove()
        self._handles = []
