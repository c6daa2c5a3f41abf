"""Repair Lightning 2.6 loop counters that would resume a checkpoint at the wrong meta-batch.

A Lightning checkpoint records the fit loop's progress counters: for the epochs and for the
batches of the current epoch, how many were ``ready``, ``started``, ``processed`` and
``completed``. On resume Lightning reads these counters to decide where it is. It also tells the
sampler which epoch to draw (``set_epoch(processed)``) and how many batches of that epoch remain.
Lightning 2.6 writes three kinds of checkpoint whose counters lead it to the wrong place:

1. **Saved after** ``fit`` **returned** (``trainer.save_checkpoint`` after ``max_steps``,
   ``max_epochs`` or ``should_stop``). Every counter is closed, so a resume under ``max_steps``
   opens a new epoch with the old epoch's batch count. The rest of the interrupted epoch is
   skipped and the next epoch is cut short.
2. **Saved in a run that was itself resumed from the last batch of an epoch.** Lightning's
   "restarted on the last batch" path advances the epoch's ``processed``/``completed`` but not its
   ``ready``/``started``. Every later checkpoint of that run is one epoch behind in those two
   counters, and a second resume draws the wrong epoch. This also happens without any
   ``save_checkpoint`` call, with ``ModelCheckpoint`` files alone.
3. **Saved by an epoch-end hook after** ``max_steps`` **stopped mid-epoch** (Lightning's default
   ``ModelCheckpoint`` saves in ``on_train_epoch_end``). The epoch counts as processed, so the
   resume starts the next epoch.

:func:`repair_fit_progress` rewrites each of these into the state that ``ModelCheckpoint`` writes
at the end of the same meta-batch. Lightning resumes that state exactly. Every other checkpoint,
including weights-only ones and checkpoints from a different Lightning layout, is left untouched.
The counter patterns were read from Lightning 2.6.6 checkpoints. The tests in
``tests/test_resume.py`` compare resumed runs with uninterrupted ones: the same episodes, steps,
validation steps and weights.
"""

from __future__ import annotations

from typing import Any

_KEYS = ("ready", "started", "processed", "completed")


def _counts(progress: dict[str, Any]) -> tuple[int, int, int, int]:
    return tuple(int(progress[k]) for k in _KEYS)  # type: ignore[return-value]


def repair_fit_progress(checkpoint: dict[str, Any]) -> str | None:
    """Rewrite the fit-loop counters of the three checkpoint kinds above; return what was done.

    Returns ``None`` and leaves the checkpoint as it is when it is none of them.

    ``_batches_that_stepped`` (the step loggers use) equals ``global_step`` once the last batch has
    finished. In a checkpoint written by an in-training hook it is still one less. This tells a
    finished fit apart from an in-training checkpoint whose counters look alike. Checkpoints of a
    module that steps its optimizer more than once per batch (``global_step`` then runs ahead of
    both) cannot be told apart this way and are left untouched.

    Example:
        >>> c4 = {"ready": 3, "started": 3, "processed": 3, "completed": 3}
        >>> e1 = {"ready": 1, "started": 1, "processed": 1, "completed": 1}
        >>> ckpt = {"epoch": 1, "global_step": 3, "loops": {"fit_loop": {
        ...     "epoch_progress": {"total": dict(e1), "current": dict(e1)},
        ...     "epoch_loop.batch_progress": {"total": dict(c4), "current": dict(c4), "is_last_batch": False},
        ...     "epoch_loop.state_dict": {"_batches_that_stepped": 3}}}}
        >>> repair_fit_progress(ckpt)
        'reopened the last meta-batch of a checkpoint saved after fit returned'
        >>> ckpt["epoch"], ckpt["loops"]["fit_loop"]["epoch_progress"]["total"]
        (0, {'ready': 1, 'started': 1, 'processed': 0, 'completed': 0})
        >>> repair_fit_progress(ckpt) is None  # now an in-training state: left alone
        True

    """
    fit = (checkpoint.get("loops") or {}).get("fit_loop")
    if not isinstance(fit, dict):
        return None
    try:
        epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
        r, s, p, c = _counts(epochs["total"])
        if _counts(epochs["current"]) != (r, s, p, c):
            return None  # a layout these patterns were not read from
        batch_total, batch_current = _counts(batches["total"]), _counts(batches["current"])
        last_batch = bool(batches["is_last_batch"])
        stepped_state = fit.get("epoch_loop.state_dict") or {}
        stepped = int(stepped_state.get("_batches_that_stepped", -1))
        global_step = int(checkpoint.get("global_step", -1))
    except (KeyError, TypeError, ValueError):
        return None
    if global_step < 1 or batch_total[3] < 1:
        return None
    if stepped not in (global_step, global_step - 1):
        return None  # not one optimizer step per batch (e.g. a learner stepping twice): the patterns do not apply
    batch_closed = len(set(batch_total)) == 1 and batch_current[0] == batch_current[3]
    finished = batch_closed and stepped == global_step  # the last batch ran all its hooks
    done: list[str] = []

    def set_epoch_counts(ready: int, started: int, processed: int, completed: int) -> None:
        for progress in (epochs["total"], epochs["current"]):
            progress.update(ready=ready, started=started, processed=processed, completed=completed)

    # 2. drift left by a resume through an epoch's last batch: ready/started one epoch behind
    if p > s and r == s:
        set_epoch_counts(p, p, p, c)
        r = s = p
        done.append("advanced the epoch counters that a resume through an epoch's last batch left behind")
    elif r == s == p == c and not finished and batch_current[0] >= 1:
        set_epoch_counts(p + 1, p + 1, p, c)
        r = s = p + 1
        done.append("advanced the epoch counters that a resume through an epoch's last batch left behind")

    def reopen_last_batch(what: str) -> None:
        for progress in (batches["total"], batches["current"]):
            progress["completed"] -= 1
        if stepped >= 1:
            stepped_state["_batches_that_stepped"] = stepped - 1
        done.append(what)

    # 1. saved after fit returned: every counter closed
    if r == s == p == c >= 1 and finished:
        set_epoch_counts(r, s, p - 1, c - 1)
        if isinstance(checkpoint.get("epoch"), int) and checkpoint["epoch"] >= 1:
            checkpoint["epoch"] -= 1
        reopen_last_batch("reopened the last meta-batch of a checkpoint saved after fit returned")
    # 3. saved at the end of an epoch (on_train_epoch_end, epoch-end validation), whole or cut short
    elif r == s == p == c + 1 and finished:
        set_epoch_counts(r, s, p - 1, c)
        reopen_last_batch("reopened the last meta-batch of a checkpoint saved at the end of an epoch"
                          + ("" if last_batch else " that max_steps stopped early"))
    return "; ".join(done) or None
