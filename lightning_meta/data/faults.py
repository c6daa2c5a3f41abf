"""Corrupt samples: skip with a warning, count, and stop only past a configured fraction.

A sample that cannot be decoded (a damaged PNG, a garbled ``.npy``) in the middle of a long run
should not end it. Readers report every decoded sample and every skipped one to a
:class:`SampleCounter`; the counter warns for each skip and raises once the skipped fraction
exceeds ``max_fraction``. The counts live in a small shared-memory tensor with one row per
dataloader worker (row 0 is the main process), so the datamodule in the main process sees the
totals of all its workers without any message passing.
"""

from __future__ import annotations

import warnings
import zlib

import torch
from PIL import Image
from torch.utils.data import get_worker_info

from lightning_meta.errors import ShardError

__all__ = ["CORRUPT_FLOOR", "DECODE_ERRORS", "CorruptSampleWarning", "SampleCounter"]

#: the skipped fraction is computed over at least this many samples, so that one bad sample at
#: the very start of a run does not count as 100% of it
CORRUPT_FLOOR = 100

#: errors raised by the image decoders (PIL, numpy) for damaged bytes; a damaged header can claim
#: a size past Pillow's limit (``DecompressionBombError``, not an ``OSError``)
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError)


class CorruptSampleWarning(UserWarning):
    """A sample could not be decoded and was skipped."""


class SampleCounter:
    """Samples decoded and skipped by one episode source, shared by its dataloader workers.

    Args:
        max_fraction: the run fails once ``skipped > max_fraction * max(read, CORRUPT_FLOOR)``;
            0 fails on the first corrupt sample.
        slots: rows of the shared table, at least ``num_workers + 1``.
        where: the data set, named in messages.

    Example:
        >>> c = SampleCounter(max_fraction=0.5)
        >>> c.read(10); c.totals()
        (10, 0)

    """

    def __init__(self, max_fraction: float = 0.01, slots: int = 1, where: str = "the shards") -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction={max_fraction} must be in [0, 1]")
        self.max_fraction = float(max_fraction)
        self.where = where
        self.counts = torch.zeros(max(1, slots), 2, dtype=torch.int64)
        self.counts.share_memory_()

    def _row(self) -> int:
        info = get_worker_info()
        return 0 if info is None else (info.id + 1) % self.counts.shape[0]

    def read(self, n: int = 1) -> None:
        """Count ``n`` decoded samples."""
        self.counts[self._row(), 0] += n

    def local_totals(self) -> tuple[int, int]:
        """``(read, skipped)`` counted by this process (one worker, or the main process) alone."""
        row = self.counts[self._row()]
        return int(row[0]), int(row[1])

    def totals(self) -> tuple[int, int]:
        """``(read, skipped)`` over all workers."""
        s = self.counts.sum(0)
        return int(s[0]), int(s[1])

    def restore(self, read: int, skipped: int) -> None:
        """Set the totals (resume from a checkpoint); all of it goes to row 0."""
        self.counts.zero_()
        self.counts[0, 0] = int(read)
        self.counts[0, 1] = int(skipped)

    def skip(self, what: str, error: BaseException) -> None:
        """Count a skipped sample, warn, and raise when the skipped fraction passes the threshold.

        Raises:
            ShardError: naming the counts, the threshold and the fix.

        """
        self.counts[self._row(), 1] += 1
        warnings.warn(f"skipping corrupt sample {what}: {type(error).__name__}: {error}", CorruptSampleWarning,
                      stacklevel=3)
        read, skipped = self.totals()
        if skipped > self.max_fraction * max(read, CORRUPT_FLOOR):
            if self.max_fraction == 0:
                rule = f"max_corrupt_fraction={self.max_fraction} (stop at the first one)"
            elif read < CORRUPT_FLOOR:
                rule = (f"max_corrupt_fraction={self.max_fraction} of at least {CORRUPT_FLOOR} samples (fewer were "
                        "read so far)")
            else:
                rule = f"max_corrupt_fraction={self.max_fraction} of the samples read"
            raise ShardError(
                f"{skipped} corrupt sample(s) skipped out of {read} read in {self.where} (last: {what}), more than "
                f"{rule}; the shards are damaged: re-create them (`lightning-meta convert`), or raise "
                "max_corrupt_fraction to train on what is left"
            )
