"""``lightning-meta report``: a markdown table and a validation plot of finished (or running) runs.

A *run directory* is what ``lightning-meta fit|test`` leaves in the logger's folder
(``lightning_logs/NAME/version_N``): TensorBoard event files, the ``config.yaml`` saved by
LightningCLI, ``hparams.yaml`` and, when the run was tested with
:class:`~lightning_meta.callbacks.TestResultWriter`, ``results.json``. For each run the report
gives the algorithm, the training and evaluation episode shapes, the number of training episodes,
the last validation score and the test score (mean ± 95% CI over episodes) and the wall time; the
plot shows the validation accuracy (MSE for regression) against training episodes, with the CI as a
band, for all runs at once.

Training episodes are ``optimizer steps × meta_batch_size`` (the global meta-batch, read from
``config.yaml``). Lightning logs validation metrics during ``fit`` at the index of the last
training batch, so a validation logged at step ``s`` came after ``s + 1`` optimizer steps. A run of
``lightning-meta test|validate --ckpt_path`` trained nothing itself: its steps are those of the
evaluated checkpoint, which :class:`~lightning_meta.callbacks.TestResultWriter` records in
``results.json`` (``?`` when unknown). A training run without ``results.json`` takes its steps
from its latest checkpoint (the highest ``global_step`` in ``checkpoints/*.ckpt``); without one,
from its last logged ``train/*`` or ``val/*`` step, a lower bound shown as ``≥ N`` (steps after it
may have been neither logged nor validated).

A folder holding several runs may include runs without results yet (a run stopped by a
configuration error at setup, or one still before its first validation): they are left out with
a note, and only a report left with no run at all is an error.

Example:
    ``lightning-meta report lightning_logs/maml_sinusoid/version_0 lightning_logs/quickstart --out-png cmp.png``

    >>> runs = collect_runs(["lightning_logs/quickstart/version_0"])  # doctest: +SKIP
    >>> print(markdown_table(runs))                                  # doctest: +SKIP
    >>> plot_validation(runs, "validation.png")                      # doctest: +SKIP

"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_meta.data.shards import atomic_write_bytes
from lightning_meta.errors import MetaConfigError

__all__ = ["NoResultsError", "RunSummary", "collect_runs", "find_run_dirs", "load_run", "main", "markdown_table",
           "plot_validation"]

EVENT_GLOB = "events.out.tfevents.*"
_EXPECTED = (
    "expected a Lightning log folder such as lightning_logs/NAME/version_N holding TensorBoard event files "
    "(events.out.tfevents.*), as written by `lightning-meta fit`"
)


class NoResultsError(MetaConfigError):
    """A run directory holds no validation or test results (yet).

    Attributes:
        path: the run directory.
        reason: a short, one-line reason, for the note that says the run was skipped.

    """

    def __init__(self, message: str, path: Path, reason: str) -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


@dataclass
class RunSummary:
    """What the report knows about one run directory.

    Attributes:
        path: the run directory.
        name: a short label (``NAME/version_N``), unique among the runs of one report.
        algorithm: the learner's class name (``MAML``, ``ProtoNet``, ...), ``?`` if unknown.
        score: ``acc`` (classification) or ``mse`` (regression).
        ways, shots: training episode shape (``None`` if unknown; ``ways`` is ``None`` for regression).
        eval_ways, eval_shots: validation/test episode shape.
        meta_batch_size: global episodes per optimizer step (``None`` if unknown).
        steps: optimizer steps trained (``None`` if unknown); for an evaluation-only run, those of the
            evaluated checkpoint.
        wall_time_s: seconds from the start of ``fit`` to the end of ``test`` (``results.json``), else
            the span of the event files' timestamps.
        val_steps: optimizer steps done at each validation; empty when unknown (an evaluation-only
            run of a checkpoint whose step was not recorded), so the run cannot be plotted.
        val_mean, val_ci95: validation score and its 95% CI half-width at each validation.
        val_episodes: number of validation episodes (of the last validation).
        test: ``(mean, ci95, episodes)`` of the test, or ``None`` when the run was not tested.
        evaluation_only: the run trained nothing itself (``lightning-meta test|validate``).
        steps_lower_bound: ``steps`` is only a lower bound: the run has neither a ``results.json``
            nor a checkpoint that records its step, so it was read from the last logged step
            (the table shows ``≥ N``).

    """

    path: Path
    name: str
    algorithm: str
    score: str
    ways: int | None = None
    shots: int | None = None
    eval_ways: int | None = None
    eval_shots: int | None = None
    meta_batch_size: int | None = None
    steps: int | None = None
    wall_time_s: float | None = None
    val_steps: list[int] = field(default_factory=list)
    val_mean: list[float] = field(default_factory=list)
    val_ci95: list[float] = field(default_factory=list)
    val_episodes: int | None = None
    test: tuple[float, float, int] | None = None
    evaluation_only: bool = False
    steps_lower_bound: bool = False

    @property
    def training_episodes(self) -> int | None:
        """Episodes seen in training (``steps × meta_batch_size``), ``None`` if either is unknown."""
        if self.steps is None or self.meta_batch_size is None:
            return None
        return self.steps * self.meta_batch_size

    @property
    def val_training_episodes(self) -> list[int]:
        """Training episodes seen before each validation (the plot's x axis)."""
        if self.meta_batch_size is None:
            raise MetaConfigError(
                f"run {str(self.path)!r} has no config.yaml with data.init_args.meta_batch_size (LightningCLI saves "
                "it beside the event files); pass --meta-batch-size N (or meta_batch_size=N) to count its episodes"
            )
        return [s * self.meta_batch_size for s in self.val_steps]


def _write(path: str | os.PathLike, data: bytes) -> Path:
    """Atomic write (with the permissions of an ordinary new file, see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, data)
    return Path(path)


# ----------------------------------------------------------------------------- finding runs
def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run directories named by ``paths``: each path is a run directory or a folder holding some below it.

    ``lightning_logs/quickstart`` expands to its ``version_*`` folders, in natural order.

    Raises:
        MetaConfigError: a path that does not exist or holds no TensorBoard event files.

    """
    found: list[Path] = []
    for p in paths:
        path = Path(os.path.expanduser(os.fspath(p)))
        if not path.exists():
            raise MetaConfigError(f"run directory {str(path)!r} does not exist; {_EXPECTED}")
        if not path.is_dir():
            raise MetaConfigError(f"{str(path)!r} is a file, not a run directory; {_EXPECTED}")
        if any(path.glob(EVENT_GLOB)):
            runs = [path]
        else:
            runs = sorted({f.parent for f in path.rglob(EVENT_GLOB)}, key=_natural_key)
        if not runs:
            raise MetaConfigError(f"{str(path)!r} is not a run directory: it holds no TensorBoard event files; "
                                  f"{_EXPECTED}")
        found += [r for r in runs if r not in found]
    return found


# ----------------------------------------------------------------------------- reading a run
def read_scalars(run_dir: str | os.PathLike) -> dict[str, list[tuple[int, float, float]]]:
    """All scalars of a run's event files: ``{tag: [(step, value, wall_time), ...]}`` sorted by step.

    A run may hold several event files (``fit`` then ``test``, or a resumed run). When a step was
    logged twice (a run resumed from an earlier checkpoint), the later record wins.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    guidance = {ea.SCALARS: 0, ea.IMAGES: 1, ea.HISTOGRAMS: 1, ea.COMPRESSED_HISTOGRAMS: 1, ea.TENSORS: 1,
                ea.AUDIO: 1}
    merged: dict[str, dict[int, tuple[float, float]]] = {}
    for ev in sorted(Path(run_dir).glob(EVENT_GLOB), key=_natural_key):
        acc = ea.EventAccumulator(str(ev), size_guidance=guidance)
        try:
            acc.Reload()
        except Exception as e:  # a truncated or foreign file: name it instead of a protobuf traceback
            raise MetaConfigError(f"cannot read TensorBoard event file {str(ev)!r} ({e}); is it complete?") from e
        for tag in acc.Tags().get("scalars", []):
            per_step = merged.setdefault(tag, {})
            for s in acc.Scalars(tag):
                if s.step not in per_step or s.wall_time >= per_step[s.step][1]:
                    per_step[s.step] = (float(s.value), float(s.wall_time))
    return {tag: [(step, v, t) for step, (v, t) in sorted(d.items())] for tag, d in merged.items()}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise MetaConfigError(f"{str(path)!r} is not valid YAML ({e})") from e
    return data if isinstance(data, dict) else {}


def _init_args(section: Any) -> dict[str, Any]:
    if not isinstance(section, dict):
        return {}
    args = section.get("init_args", section)
    return args if isinstance(args, dict) else {}


def _int_or_none(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError, OverflowError):  # also NaN and infinities
        return None


def _float_or_nan(value: Any) -> float:
    """A number from ``results.json``, NaN when it is missing (``null``) or not a number."""
    if isinstance(value, bool):
        return math.nan
    try:
        return math.nan if value is None else float(value)
    except (TypeError, ValueError):
        return math.nan


def _latest_checkpoint_step(run_dir: Path) -> int | None:
    """The highest ``global_step`` among the run's checkpoint files (``checkpoints/*.ckpt``), else ``None``.

    ``ModelCheckpoint`` saves to ``checkpoints/`` in the logger's run directory by default. The
    highest step rather than the newest file: copying a run folder does not keep the files' times.
    Unreadable files (and DeepSpeed checkpoint folders) are passed over.
    """
    folder = run_dir / "checkpoints"
    if not folder.is_dir():
        return None
    files = [f for f in folder.glob("*.ckpt") if f.is_file()]
    if not files:
        return None
    from lightning_meta.callbacks.episode_logger import checkpoint_global_step

    steps = [s for s in (checkpoint_global_step(f) for f in files) if s is not None]
    return max(steps) if steps else None


def load_run(run_dir: str | os.PathLike, meta_batch_size: int | None = None) -> RunSummary:
    """Read one run directory (event files, ``config.yaml``, ``results.json``) into a :class:`RunSummary`.

    Args:
        run_dir: a run directory (``lightning_logs/NAME/version_N``).
        meta_batch_size: used when the run has no ``config.yaml`` that gives it.

    Raises:
        MetaConfigError: the folder holds no event files, or unreadable files.
        NoResultsError: the run logged neither validation nor test results (yet).

    """
    path = Path(run_dir)
    if not any(path.glob(EVENT_GLOB)):
        raise MetaConfigError(f"{str(path)!r} is not a run directory: it holds no TensorBoard event files; {_EXPECTED}")
    scalars = read_scalars(path)
    config = _read_yaml(path / "config.yaml")
    results: dict[str, Any] = {}
    if (path / "results.json").is_file():
        try:
            results = json.loads((path / "results.json").read_text())
        except json.JSONDecodeError as e:
            raise MetaConfigError(f"{str(path / 'results.json')!r} is not valid JSON ({e})") from e
        if not isinstance(results, dict):
            raise MetaConfigError(
                f"{str(path / 'results.json')!r} holds a JSON {type(results).__name__}, not an object; it should be "
                "the file lightning_meta.callbacks.TestResultWriter writes (delete or move it to report the run "
                "from its event files)"
            )
    metrics = results.get("metrics", {}) if isinstance(results.get("metrics"), dict) else {}

    data_args = _init_args(config.get("data"))
    if "val/acc" in scalars or "test/acc" in metrics or "test/acc" in scalars:
        score = "acc"
    elif "val/mse" in scalars or "test/mse" in metrics or "test/mse" in scalars:
        score = "mse"
    else:
        raise NoResultsError(
            f"run {str(path)!r} has no validation or test results: expected val/acc or val/mse scalars in its "
            "event files (logged every trainer.val_check_interval steps by `lightning-meta fit`) or a results.json "
            "from lightning_meta.callbacks.TestResultWriter; was the run stopped before its first validation, or by "
            "an error at setup?",
            path,
            "no validation or test results (stopped by an error at setup, or still before its first validation?)",
        )

    algorithm = results.get("algorithm")
    if not algorithm:
        class_path = (config.get("model") or {}).get("class_path") if isinstance(config.get("model"), dict) else None
        algorithm = str(class_path).rsplit(".", 1)[-1] if class_path else "?"

    # validation curve, aligned on steps; steps logged during fit are optimizer steps - 1
    val = {s: v for s, v, _ in scalars.get(f"val/{score}", [])}
    ci = {s: v for s, v, _ in scalars.get(f"val/{score}_ci95", [])}
    n_val = scalars.get("val/episodes", [])
    steps_sorted = sorted(val)

    # train/* and val/* are logged during fit at (optimizer steps done - 1); `epoch` is also logged by test
    fit_steps = [s for tag, rows in scalars.items() if tag.startswith(("train/", "val/")) for s, _, _ in rows]
    steps_lower_bound = False
    evaluation_only = results.get("evaluation_only")
    if isinstance(evaluation_only, bool):
        # TestResultWriter: the trainer's steps after fit, or the evaluated checkpoint's (null: unknown)
        steps = _int_or_none(results.get("global_step"))
    elif "global_step" in results:
        # older results.json: trainer.global_step, which is 0 in a `test --ckpt_path` run whatever the checkpoint
        steps = _int_or_none(results["global_step"]) or None
        evaluation_only = steps is None
    elif config.get("ckpt_path") and not any(t.startswith("train/") for t in scalars) and not any(fit_steps):
        # no results.json, a checkpoint given, no training logged and validations (if any) all at step 0:
        # a `validate --ckpt_path` run, which logs at step 0 whatever the checkpoint's step
        steps, evaluation_only = None, True
    else:
        # no step recorded: the run's latest checkpoint knows it; the logs only give a lower bound
        # (the last step logged, if the steps after it were neither logged nor validated)
        logged = max(fit_steps) + 1 if fit_steps else None
        saved = _latest_checkpoint_step(path)
        if saved is not None and (logged is None or saved >= logged):
            steps = saved
        else:
            steps, steps_lower_bound = logged, logged is not None
        evaluation_only = False
    if evaluation_only:  # every validation of the run evaluated the same weights
        val_steps = [] if steps is None else [steps] * len(steps_sorted)
    else:
        val_steps = [s + 1 for s in steps_sorted]

    test: tuple[float, float, int] | None = None
    if f"test/{score}" in metrics:
        test = (_float_or_nan(metrics[f"test/{score}"]), _float_or_nan(metrics.get(f"test/{score}_ci95")),
                _int_or_none(metrics.get("test/episodes", results.get("test_episodes"))) or 0)
    elif f"test/{score}" in scalars:
        last = lambda tag: scalars[tag][-1][1] if tag in scalars else math.nan  # noqa: E731
        n_test = last("test/episodes")
        test = (last(f"test/{score}"), last(f"test/{score}_ci95"), 0 if math.isnan(n_test) else int(n_test))

    wall = _float_or_nan(results.get("wall_time_s"))
    wall = None if math.isnan(wall) else wall
    if wall is None:
        times = [t for rows in scalars.values() for _, _, t in rows]
        wall = max(times) - min(times) if times else None

    mbs = _int_or_none(data_args.get("meta_batch_size")) or meta_batch_size
    regression = score == "mse"
    ways = None if regression else _int_or_none(data_args.get("ways"))
    shots = _int_or_none(data_args.get("shots"))
    eval_ways = None if regression else _int_or_none(results.get("eval_ways", data_args.get("eval_ways") or ways))
    eval_shots = _int_or_none(results.get("eval_shots", data_args.get("eval_shots") or shots))
    return RunSummary(
        path=path,
        name="/".join(path.resolve().parts[-2:]),
        algorithm=str(algorithm),
        score=score,
        ways=ways,
        shots=shots,
        eval_ways=eval_ways,
        eval_shots=eval_shots,
        meta_batch_size=mbs,
        steps=steps,
        wall_time_s=None if wall is None else float(wall),
        val_steps=val_steps,
        val_mean=[val[s] for s in steps_sorted],
        val_ci95=[ci.get(s, math.nan) for s in steps_sorted],
        val_episodes=int(n_val[-1][1]) if n_val else None,
        test=test,
        evaluation_only=evaluation_only,
        steps_lower_bound=steps_lower_bound,
    )


def collect_runs(
    paths: Sequence[str | os.PathLike],
    meta_batch_size: int | None = None,
    on_skip: Callable[[Path, str], object] | None = None,
) -> list[RunSummary]:
    """:func:`load_run` for every run directory under ``paths`` (see :func:`find_run_dirs`).

    Labels are ``NAME/version_N``; where two runs would share a label, their full paths are used.

    When ``paths`` hold several runs, a run without validation or test results (a run stopped by
    an error at setup, or one still before its first validation) is skipped: ``on_skip(run_dir,
    reason)`` is called for it (by default a :class:`UserWarning`). A single run without results,
    or several runs none of which has results, raise :class:`NoResultsError`.

    Example:
        >>> runs = collect_runs(["lightning_logs/maml_sinusoid"])  # doctest: +SKIP
        >>> runs[0].algorithm, runs[0].test                        # doctest: +SKIP
        ('MAML', (0.6, 0.05, 600))

    """
    dirs = find_run_dirs(paths)
    runs: list[RunSummary] = []
    for d in dirs:
        try:
            runs.append(load_run(d, meta_batch_size))
        except NoResultsError as e:
            if len(dirs) == 1:
                raise
            if on_skip is None:
                warnings.warn(f"skipped {d}: {e.reason}", UserWarning, stacklevel=2)
            else:
                on_skip(d, e.reason)
    if not runs:
        named = ", ".join(repr(os.fspath(p)) for p in paths)
        raise NoResultsError(
            f"none of the {len(dirs)} runs under {named} has validation or test results yet: expected val/acc or "
            "val/mse scalars in their event files or a results.json from lightning_meta.callbacks.TestResultWriter",
            Path(os.fspath(paths[0])),
            "no run with results",
        )
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:
            r.name = str(r.path)
    return runs


# ----------------------------------------------------------------------------- table
def _fmt_score(score: str, mean: float, ci: float) -> str:
    if math.isnan(mean):
        return "n/a"
    if math.isnan(ci):  # no CI logged
        return f"{100 * mean:.2f}%" if score == "acc" else f"MSE {mean:.3f}"
    if score == "acc":
        return f"{100 * mean:.2f}% ± {100 * ci:.2f}%"
    return f"MSE {mean:.3f} ± {ci:.3f}"


def _fmt_shape(ways: int | None, shots: int | None) -> str:
    if shots is None:
        return "?"
    return f"{shots}-shot" if ways is None else f"{ways}-way {shots}-shot"


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, s = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {s:02d} s"
    h, m = divmod(minutes, 60)
    return f"{h} h {m:02d} min"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(runs: Sequence[RunSummary]) -> str:
    """Format the runs as a markdown table, one row per run (validation = the run's last validation).

    Accuracies are in percent, MSE as is; ``±`` is the 95% CI half-width over episodes and the
    number in parentheses the number of episodes it was measured on.

    Example:
        >>> r = RunSummary(Path("a"), "demo/version_0", "ProtoNet", "acc", 20, 1, 5, 1, 1, 30, 12.0,
        ...                [15, 30], [0.8, 0.9], [0.02, 0.01], 200, (0.91, 0.012, 600))
        >>> markdown_table([r]).splitlines()[2].split(" | ")[2:]
        ['20-way 1-shot', '5-way 1-shot', '30', '90.00% ± 1.00% (200)', '91.00% ± 1.20% (600)', '12.0 s |']

    """
    header = ["run", "algorithm", "train way/shot", "eval way/shot", "training episodes", "validation (last)",
              "test", "wall time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        bound = "≥ " if r.steps_lower_bound else ""
        if r.training_episodes is not None:
            episodes = f"{bound}{r.training_episodes}"
        else:
            episodes = "?" if r.steps is None else f"? ({bound}{r.steps} steps)"
        val = "—"
        if r.val_mean:
            val = _fmt_score(r.score, r.val_mean[-1], r.val_ci95[-1])
            if r.val_episodes is not None:
                val += f" ({r.val_episodes})"
        test = "—" if r.test is None else f"{_fmt_score(r.score, r.test[0], r.test[1])} ({r.test[2]})"
        row = [r.name, r.algorithm, _fmt_shape(r.ways, r.shots), _fmt_shape(r.eval_ways, r.eval_shots), episodes,
               val, test, _fmt_time(r.wall_time_s)]
        lines.append("| " + " | ".join(_cell(c) for c in row) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot
def plot_validation(runs: Sequence[RunSummary], out_png: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a PNG of validation accuracy (MSE for regression) against training episodes for all runs.

    One panel per score kind (accuracy, MSE); each run is a line with its 95% CI as a band. Runs
    without validation, or whose validations cannot be placed in training episodes (an
    evaluation-only run of a checkpoint whose step is unknown), are left out. Rendered with
    matplotlib's Agg canvas (no display needed) and written atomically.

    Raises:
        MetaConfigError: no run has logged validation, or a run's meta-batch size is unknown.

    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    plotted = [r for r in runs if r.val_mean and r.val_steps]
    if not plotted:
        names = ", ".join(repr(str(r.path)) for r in runs)
        raise MetaConfigError(
            f"no validation to plot: none of the runs {names} logged val/acc or val/mse at a known number of "
            "training episodes (set trainer.val_check_interval below trainer.max_steps, or skip the plot with "
            "--no-plot)"
        )
    kinds = [k for k in ("acc", "mse") if any(r.score == k for r in plotted)]
    fig = Figure(figsize=(6.4 * len(kinds), 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    for i, kind in enumerate(kinds):
        ax = fig.add_subplot(1, len(kinds), i + 1)
        scale = 100.0 if kind == "acc" else 1.0
        for r in (r for r in plotted if r.score == kind):
            x = r.val_training_episodes
            y = [scale * v for v in r.val_mean]
            h = [scale * (0.0 if math.isnan(c) else c) for c in r.val_ci95]
            (line,) = ax.plot(x, y, marker="o", markersize=3, label=f"{r.name} ({r.algorithm})")
            ax.fill_between(x, [a - b for a, b in zip(y, h, strict=True)], [a + b for a, b in zip(y, h, strict=True)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("training episodes (optimizer steps × meta-batch size)")
        ax.set_ylabel("validation accuracy (%)" if kind == "acc" else "validation MSE")
        ax.set_title("validation accuracy ± 95% CI" if kind == "acc" else "validation MSE ± 95% CI")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return _write(out_png, buf.getvalue())


# ----------------------------------------------------------------------------- command
def main(argv: list[str] | None = None) -> None:
    """Run ``lightning-meta report RUN_DIR [RUN_DIR ...]``: print a markdown table, save a validation plot."""
    p = argparse.ArgumentParser(
        prog="lightning-meta report",
        description="Markdown table of the validation/test results of runs, and a PNG plot of validation "
                    "accuracy (MSE for regression) against training episodes.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories (lightning_logs/NAME/version_N) or folders holding them")
    p.add_argument("--out-png", default="report.png", help="where to save the plot (default: report.png)")
    p.add_argument("--no-plot", action="store_true", help="only print the table")
    p.add_argument("--out-md", default=None, help="also write the table to this markdown file")
    p.add_argument("--meta-batch-size", type=int, default=None,
                   help="meta-batch size of runs without a config.yaml that gives it")
    a = p.parse_args(argv)

    def note(message: str) -> None:
        print(f"lightning-meta report: note: {message}", file=sys.stderr)

    try:
        if a.meta_batch_size is not None and a.meta_batch_size < 1:
            raise MetaConfigError(f"--meta-batch-size {a.meta_batch_size} must be >= 1")
        runs = collect_runs(a.runs, a.meta_batch_size, on_skip=lambda d, why: note(f"skipped {d}: {why}"))
        table = markdown_table(runs)
        print(table, end="", flush=True)  # before the files: a bad output path still leaves the table
        out = None
        if not a.no_plot:
            plottable = []
            for r in runs:
                if not r.val_mean:
                    note(f"{r.path} logged no validation (val/{r.score}); it is in the table but not in the plot")
                elif not r.val_steps:
                    note(f"{r.path} validated a checkpoint whose training step is unknown; it is in the table but "
                         "not in the plot")
                elif r.meta_batch_size is None:
                    note(f"{r.path} has no config.yaml with data.init_args.meta_batch_size; it is in the table but "
                         "not in the plot (pass --meta-batch-size N to plot it)")
                else:
                    plottable.append(r)
            if plottable:
                out = plot_validation(plottable, a.out_png)
            else:
                print("lightning-meta report: warning: no validation to plot, so no plot was written: none of the "
                      "runs logged val/acc or val/mse at a known number of training episodes (set "
                      "trainer.val_check_interval below trainer.max_steps to validate during fit, or pass --no-plot)",
                      file=sys.stderr)
        if a.out_md:
            _write(a.out_md, table.encode())
    except MetaConfigError as e:
        print(f"lightning-meta report: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:  # an output path that is a folder, or not writable
        target = getattr(e, "filename2", None) or e.filename  # os.replace(tmp, target): the target
        where = f" {target}" if target else ""
        print(f"lightning-meta report: error: cannot write{where}: {e.strerror or e}; choose another --out-png / "
              "--out-md path", file=sys.stderr)
        raise SystemExit(2) from None
    if out is not None:
        print(f"saved the validation plot to {out}", file=sys.stderr)
    if a.out_md:
        print(f"saved the table to {a.out_md}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    main()
