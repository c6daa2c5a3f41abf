"""The ``lightning-meta`` command: LightningCLI with meta-learning defaults.

``lightning-meta fit|validate|test|predict --config CONFIG [--key value ...]``. Models and
datamodules are chosen by class name (``--model MAML``, ``--data ShardDataModule``) or by a full
``class_path`` for classes in your own project. ``data.ways`` is linked to ``model.ways``.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import os
import sys
import warnings
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import lightning_meta.algorithms  # noqa: F401  - registers the short class names
import lightning_meta.backbones  # noqa: F401
import lightning_meta.callbacks  # noqa: F401
import lightning_meta.datamodules  # noqa: F401
import lightning_meta.strategies  # noqa: F401  - registers deepspeed_meta_stage_* / deepspeed_cpu_stage_*
from lightning_meta.algorithms import MetaLearner
from lightning_meta.datamodules import EpisodicDataModule
from lightning_meta.errors import MetaConfigError

__all__ = ["MetaCLI", "check_slurm_settings", "main"]


def check_slurm_settings(num_devices: int | None = None, num_nodes: int | None = None) -> None:
    """Refuses a Trainer whose ``devices`` / ``num_nodes`` differ from the Slurm job it runs in.

    Under ``srun`` every Slurm task is one rank, so ``--ntasks-per-node`` must equal
    ``trainer.devices`` and ``--nodes`` must equal ``trainer.num_nodes`` (DESIGN §5). Lightning
    checks this only when its DDP launcher starts, not at all for a single-device Trainer (two
    tasks would then train the same model side by side and overwrite each other's checkpoints),
    and as a traceback. Called by :class:`MetaCLI` after the Trainer is built, before any process
    group starts; outside Slurm (no ``SLURM_NTASKS``, a job named ``bash``/``interactive`` as
    Lightning treats it, or under torchrun) it does nothing. ``None`` skips that comparison.

    Raises:
        MetaConfigError: the numbers differ; the message names both values and the fix.

    Example:
        >>> check_slurm_settings(num_devices=4, num_nodes=1)  # not in a Slurm job: nothing to check

    """
    from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    if TorchElasticEnvironment.detect() or not SLURMEnvironment.detect():
        return
    ntasks = int(os.environ["SLURM_NTASKS"])
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE")
    if per_node is None:
        if ntasks > 1:
            raise MetaConfigError(
                f"this Slurm job has SLURM_NTASKS={ntasks} but no --ntasks-per-node, which Lightning needs to place "
                f"ranks; use `#SBATCH --ntasks-per-node=<devices per node>` (and --nodes) instead of --ntasks={ntasks}"
            )
    elif num_devices is not None and per_node.isdigit() and int(per_node) != num_devices:
        raise MetaConfigError(
            f"Slurm starts --ntasks-per-node={per_node} tasks per node (SLURM_NTASKS_PER_NODE) but the Trainer uses "
            f"devices={num_devices}; each Slurm task is one rank, so they must be equal: pass --trainer.devices "
            f"{per_node} (the sbatch templates pass --trainer.devices \"$SLURM_NTASKS_PER_NODE\") or set "
            f"#SBATCH --ntasks-per-node={num_devices}"
        )
    nnodes = os.environ.get("SLURM_NNODES") or os.environ.get("SLURM_JOB_NUM_NODES")
    if num_nodes is not None and nnodes is not None and nnodes.isdigit() and int(nnodes) != num_nodes:
        raise MetaConfigError(
            f"Slurm runs this job on --nodes={nnodes} nodes (SLURM_NNODES) but the Trainer uses num_nodes={num_nodes}; "
            f"they must be equal: pass --trainer.num_nodes {nnodes} (the sbatch templates pass --trainer.num_nodes "
            f"\"$SLURM_NNODES\") or set #SBATCH --nodes={num_nodes}"
        )


_SPECIAL_CKPT = ("best", "last", "hpc", "registry")


def _config_inputs(config) -> set[str]:
    """Real paths of the ``--config`` files a run was started with."""
    paths = config.get("config") if hasattr(config, "get") else None
    out = set()
    for p in paths or []:
        path = getattr(p, "absolute", None) or getattr(p, "relative", None) or str(p)
        out.add(os.path.realpath(str(path)))
    return out


class MetaSaveConfig(SaveConfigCallback):
    """Lightning's resolved-config saving, except that it never overwrites a config it did not write.

    With a logger the resolved ``config.yaml`` goes into the run's version folder, as in
    Lightning. Without one (``--trainer.logger false``) Lightning writes it into
    ``default_root_dir`` (by default the working directory), where it would replace the user's own
    ``config.yaml``, possibly the very file given to ``--config``. This callback skips the save,
    with a warning naming the file, when the target is one of the ``--config`` inputs or an
    existing file without the ``# lightning.pytorch==`` header Lightning writes.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:  # noqa: D102
        if self.already_saved or not self.save_to_log_dir:
            return super().setup(trainer, pl_module, stage)
        log_dir = trainer.log_dir  # a collective call: every rank
        reason = None
        if trainer.is_global_zero and log_dir is not None:
            target = os.path.realpath(os.path.join(log_dir, self.config_filename))
            if target in _config_inputs(self.config):
                reason = f"{target} is the --config file of this run"
            elif os.path.isfile(target):
                with open(target, encoding="utf-8", errors="replace") as f:
                    first = f.readline()
                if not first.startswith("# lightning.pytorch=="):
                    reason = f"{target} exists and was not written by lightning-meta/LightningCLI"
        reason = trainer.strategy.broadcast(reason)
        if reason is None:
            return super().setup(trainer, pl_module, stage)
        rank_zero_warn(
            f"not saving the resolved config: {reason}. Keep a logger on (each run then gets its own version "
            "folder) or set --trainer.default_root_dir to a run folder"
        )
        self.already_saved = True


def _command_line_tokens(args) -> list[str]:
    """The command line LightningCLI parses: ``args`` as a list, ``sys.argv`` when None; none for a dict/Namespace.

    Example:
        >>> _command_line_tokens(["test", "--model.eval_mode", "nil"]), _command_line_tokens({"model": {}})
        (['test', '--model.eval_mode', 'nil'], [])

    """
    from jsonargparse import Namespace

    if isinstance(args, (dict, Namespace)):  # a configuration, not a command line
        return []
    return [str(a) for a in (sys.argv[1:] if args is None else args)]


def _mapping(value: str) -> dict | None:
    """``value`` read as a JSON/YAML mapping (``'{"eval_mode": "nil"}'``), else None."""
    if not value.lstrip().startswith("{"):
        return None
    import yaml

    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _import_class(path: str | None):
    """The class a ``class_path`` names, or None when it cannot be imported."""
    if not isinstance(path, str) or "." not in path:
        return None
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None


def _check_linked_ways(cfg) -> None:
    """Refuse an explicit ``model.init_args.ways`` that the link from ``data`` would silently replace.

    A value other than the model class's default and the data's ways can only come from the user
    (a value equal to the default cannot be told apart from an unset one and is replaced quietly).
    """
    get = getattr(cfg, "get", None)
    if get is None:
        return
    model_ways, data_ways, class_path = get("model.init_args.ways"), get("data.init_args.ways"), get("model.class_path")
    if not isinstance(model_ways, int) or not isinstance(data_ways, int) or not isinstance(class_path, str):
        return
    cls = _import_class(class_path)
    try:
        default = inspect.signature(cls).parameters["ways"].default
    except (KeyError, ValueError, TypeError):  # no class, or no ways argument
        return
    if model_ways not in (default, data_ways):
        raise MetaConfigError(
            f"model.init_args.ways={model_ways} differs from data.init_args.ways={data_ways}, and the model's ways are "
            f"always taken from the data (the head must match the episodes); set --data.init_args.ways {model_ways} "
            "instead (and eval_ways for evaluation episodes)"
        )


class MetaCLI(LightningCLI):
    """LightningCLI with the data/model links, the ``--test_after_fit`` option and Slurm checks.

    Under Slurm the Trainer's ``devices`` and ``num_nodes`` are checked against the job
    (:func:`check_slurm_settings`) as soon as the Trainer is built, before any process group starts.
    """

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments("data", "model.init_args.ways", compute_fn=lambda dm: dm.ways, apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="After `fit`, run `test` on the final model (the meta-test accuracy ± 95% CI is logged and printed).",
        )

    def _subcommand_config(self):
        """The parsed configuration of the running subcommand (the whole one without subcommands)."""
        subcommand = getattr(self, "subcommand", None) or self.config.get("subcommand")  # set after parsing
        return self.config.get(subcommand, {}) if subcommand else self.config

    def before_instantiate_classes(self) -> None:  # noqa: D102
        check_slurm_settings()  # before Lightning's SLURMEnvironment raises its own --ntasks error as a traceback
        cfg = self._subcommand_config()
        _check_linked_ways(cfg)
        ckpt = cfg.get("ckpt_path") if hasattr(cfg, "get") else None
        if (isinstance(ckpt, str) and ckpt not in _SPECIAL_CKPT and not ckpt.startswith("registry:")
                and "://" not in ckpt and not os.path.exists(ckpt)):
            raise MetaConfigError(
                f"ckpt_path={ckpt!r} does not exist; give a checkpoint file (a DeepSpeed checkpoint is a folder), "
                "or 'last' / 'hpc' / 'best' for Lightning's own lookup"
            )

    def _check_last_checkpoint(self, fn: str) -> None:
        """Refuse ``--ckpt_path last`` when Lightning would find no checkpoint and start untrained.

        Lightning only warns then (fit trains from step 0, test evaluates a fresh model). With the
        shipped configs' TensorBoardLogger every run logs to a new ``version_N`` folder, where no
        ``last.ckpt`` exists yet, so the error names the newest one of the earlier versions.
        """
        cfg = self._subcommand_config()
        if (cfg.get("ckpt_path") if hasattr(cfg, "get") else None) != "last":
            return
        from lightning.pytorch.trainer.states import TrainerFn

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = self.trainer._checkpoint_connector._parse_ckpt_path(TrainerFn(fn), "last", model_provided=True,
                                                                        model_connected=True)
        if found is not None:
            return
        earlier = []
        logger = self.trainer.logger
        if logger is not None and getattr(logger, "root_dir", None):
            earlier = sorted(Path(logger.root_dir).glob("version_*/checkpoints/last*.ckpt"), key=os.path.getmtime)
        hint = (f"the newest earlier one is {earlier[-1]}: pass it as --ckpt_path" if earlier else
                "no earlier version folder of this logger holds one either; pass a checkpoint file as --ckpt_path")
        raise MetaConfigError(
            f"--ckpt_path last found no last checkpoint (Lightning looks in this run's own checkpoint folder, and "
            f"each run logs to a new version folder), so {fn} would start from an untrained model; {hint}, or drop "
            "--ckpt_path to start a new run"
        )

    def _check_checkpoint_file(self) -> None:
        """Refuse a local ``--ckpt_path`` that is a folder or not a checkpoint archive, before any work.

        ``torch.save`` writes a zip archive; a truncated copy (no central directory), a text file or
        a folder otherwise end in unpickler or zip tracebacks that name neither the argument nor the fix.
        """
        cfg = self._subcommand_config()
        path = cfg.get("ckpt_path") if hasattr(cfg, "get") else None
        if not isinstance(path, (str, os.PathLike)) or str(path) in ("last", "best", "hpc", "registry"):
            return
        if self.__dict__.get("_checked_ckpt") == path:
            return  # checked after parsing already (Lightning >= 2.5); the before_* hooks cover older ones
        self._checked_ckpt = path
        if "://" in str(path) or not os.path.exists(path):
            return  # remote paths are Lightning's to read; a missing file has Lightning's own message
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "latest")) or os.path.isdir(os.path.join(path, "checkpoint")):
                return  # a DeepSpeed checkpoint (a folder), read by the DeepSpeed strategies
            raise MetaConfigError(f"--ckpt_path {path} is a folder but not a DeepSpeed checkpoint; pass a checkpoint "
                                  f"file in it (e.g. {os.path.join(path, 'last.ckpt')}), or 'last'")
        import zipfile

        if zipfile.is_zipfile(path):
            return
        import torch

        try:  # torch.save's legacy (non-zip) format still loads; anything else is not a checkpoint
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any failure to read means the same to the user
            raise MetaConfigError(f"--ckpt_path {path} is not a readable checkpoint ({type(e).__name__}): it is "
                                  "truncated (a copy or a save that did not finish), corrupt, or another kind of "
                                  "file; pass another checkpoint (the run's checkpoints/ folder holds the others)"
                                  ) from None

    def parse_arguments(self, parser, args) -> None:  # noqa: D102
        self._argv = _command_line_tokens(args)
        super().parse_arguments(parser, args)

    def _model_args_on_command_line(self) -> set[str]:
        """The model's init arguments set on the command line.

        ``--model.init_args.X V``, ``--model.X V`` (also with ``=``), ``--model.init_args '{X: V}'``
        and ``--model '{class_path: ..., init_args: {X: V}}'``; a class name or a file given to
        ``--model`` names no argument (a file is a config file).
        """
        argv = getattr(self, "_argv", [])
        keys: set[str] = set()
        for i, token in enumerate(argv):
            name, sep, value = token.partition("=")
            if name != "--model" and not name.startswith("--model."):
                continue
            if not sep:
                value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            path = [p for p in name[len("--model"):].split(".") if p]
            named = path[1:] if path[:1] == ["init_args"] else path
            if named:  # --model.init_args.X or --model.X
                keys.add(named[0])
                continue
            mapping = _mapping(value)
            if mapping is not None and path == ["init_args"]:
                keys |= {str(k) for k in mapping}
            elif mapping is not None and isinstance(mapping.get("init_args"), dict):
                keys |= {str(k) for k in mapping["init_args"]}
        return keys

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` first, then let the command line's model settings win over the checkpoint's.

        Lightning (>= 2.5) loads the checkpoint's hyperparameters right after parsing and lets them
        override everything, so ``test --ckpt_path CKPT --model.init_args.eval_mode nil`` (or
        ``eval_inner_steps``) was silently tested with the checkpoint's values (Lightning issue
        20801, PR 21455). The values given on the command line are put back; those of config
        files (and of ``args`` given as a dict) still give way to the checkpoint's, as in
        Lightning. The model's class is the checkpoint's (Lightning's rule); when it differs from
        the configured one, a warning names both, and the command line's values the checkpoint's
        class does not take are named as dropped.
        """
        self._check_checkpoint_file()
        parent = getattr(super(), "_parse_ckpt_path", None)
        if parent is None:
            return
        subcommand = self.config.get("subcommand")
        model = self.config[subcommand].get("model") if subcommand else None
        init_args = model.get("init_args") if model is not None and hasattr(model, "get") else None
        given = {k: copy.deepcopy(init_args[k]) for k in self._model_args_on_command_line()
                 if init_args is not None and k in init_args}
        before = model.get("class_path") if given else None
        parent()
        model = self.config[subcommand].get("model") if subcommand else None
        if not given or model is None:
            return
        after = model.get("class_path")
        after_cls = _import_class(after)
        same = after == before or (after_cls is not None and after_cls is _import_class(before))
        accepted = set(inspect.signature(after_cls.__init__).parameters) if after_cls is not None else set(given)
        kept = {k: v for k, v in given.items() if same or k in accepted}
        for k, v in kept.items():
            model["init_args"][k] = v
        if not same:
            dropped = sorted(set(given) - set(kept))
            rank_zero_warn(f"--ckpt_path holds a {after} model, not the configured {before}: it is built as {after} "
                           f"(the checkpoint's class); the command line's {sorted(kept)} are applied to it"
                           + (f", {dropped} do not apply" if dropped else ""))

    def _run_subcommand(self, subcommand: str) -> None:
        """Name the checkpoint and the fix when its weights do not fit the configured model."""
        try:
            super()._run_subcommand(subcommand)
        except RuntimeError as e:
            cfg = self._subcommand_config()
            path = cfg.get("ckpt_path") if hasattr(cfg, "get") else None
            if path is None or "Error(s) in loading state_dict" not in str(e):
                raise
            first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")
            raise MetaConfigError(
                f"--ckpt_path {path} holds weights of another model than this configuration builds ({first}); "
                "evaluate a checkpoint with the configuration it was trained with: --config <run folder>/config.yaml "
                "(saved beside the checkpoints' folder)"
            ) from e

    def before_fit(self) -> None:
        """Check ``--ckpt_path``, and a learner's schedule against the run length before the data is set up."""
        self._check_checkpoint_file()
        self._check_last_checkpoint("fit")
        check = getattr(self.model, "check_schedule_before_fit", None)
        if callable(check):
            check(self.trainer, self.datamodule)

    def before_validate(self) -> None:  # noqa: D102
        self._check_checkpoint_file()
        self._check_last_checkpoint("validate")

    def before_test(self) -> None:  # noqa: D102
        self._check_checkpoint_file()
        self._check_last_checkpoint("test")

    def before_predict(self) -> None:
        """Check ``--ckpt_path last``; add a :class:`~lightning_meta.callbacks.PredictionWriter` if none is set.

        LightningCLI discards what ``trainer.predict`` returns, so without a writer the command
        would compute the predictions and keep nothing.
        """
        from lightning.pytorch.callbacks import BasePredictionWriter

        from lightning_meta.callbacks import PredictionWriter

        self._check_checkpoint_file()
        self._check_last_checkpoint("predict")
        if not any(isinstance(cb, BasePredictionWriter) for cb in self.trainer.callbacks):
            self.trainer.callbacks.append(PredictionWriter())

    def after_predict(self) -> None:  # noqa: D102
        from lightning_meta.callbacks import PredictionWriter

        for cb in self.trainer.callbacks:
            if isinstance(cb, PredictionWriter) and cb.path is not None:
                rank_zero_info(f"predictions written to {cb.path}")

    def instantiate_trainer(self, **kwargs) -> Trainer:  # noqa: D102
        trainer = super().instantiate_trainer(**kwargs)
        check_slurm_settings(trainer.num_devices, trainer.num_nodes)
        return trainer

    def after_fit(self) -> None:
        """Run the meta-test when ``--test_after_fit true`` and training ran to its end.

        A run stopped by :class:`~lightning_meta.callbacks.PreemptionCheckpoint` (or interrupted)
        is not tested: its model is partly trained, and the requeued job tests when it finishes.
        """
        if not self._subcommand_config().get("test_after_fit", False):
            return
        preempted = [cb.saved_path for cb in self.trainer.callbacks if getattr(cb, "saved_path", None)]
        if preempted or self.trainer.interrupted:
            why = f"it was preempted (checkpoint {preempted[0]})" if preempted else "it was interrupted"
            rank_zero_info(f"skipping --test_after_fit: training did not finish, {why}")
            return
        self.trainer.test(self.model, datamodule=self.datamodule)


_EPILOG = ("other commands: `lightning-meta index SHARDS` (build a shard index), `lightning-meta convert ...` "
           "(image folders to shards), `lightning-meta report RUNS` (tables and plots of runs); each has --help")


def main(args: list[str] | None = None, run: bool = True) -> MetaCLI:
    """Entry point of ``lightning-meta`` and ``python -m lightning_meta``; tests call it in-process.

    Configuration errors (:class:`~lightning_meta.errors.MetaConfigError`) are printed as one
    line and exit with status 2; set ``LIGHTNING_META_DEBUG=1`` to see the traceback.
    """
    MetaConfigError.last = None
    try:
        return MetaCLI(
            MetaLearner,
            EpisodicDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            parser_kwargs={"parser_mode": "omegaconf", "default_env": False, "epilog": _EPILOG},
            save_config_callback=MetaSaveConfig,
            save_config_kwargs={"overwrite": True},
        )
    except Exception as e:
        cause = e if isinstance(e, MetaConfigError) else MetaConfigError.last
        if os.environ.get("LIGHTNING_META_DEBUG") or cause is None or str(cause) not in str(e):
            raise
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        if getattr(rank_zero_only, "rank", 0) == 0:  # the same error on every process: print it once
            print(f"lightning-meta: error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def index_main(argv: list[str]) -> None:
    """``lightning-meta index SHARDS``: (re)builds ``index.json`` for a folder or pattern of shards."""
    import argparse

    from lightning_meta.data.shards import INDEX_NAME, build_index, resolve_shards

    p = argparse.ArgumentParser(prog="lightning-meta index", description=index_main.__doc__)
    p.add_argument("shards", help="a folder of .tar shards, a brace pattern or a glob")
    p.add_argument("--output", help="index path (default: index.json beside the shards)")
    a = p.parse_args(argv)
    try:
        paths = resolve_shards(a.shards)
        out = a.output or os.path.join(os.path.dirname(paths[0]), INDEX_NAME)
        if os.path.isdir(out):
            raise MetaConfigError(f"--output {out} is a folder; give the index file's path, e.g. "
                                  f"{os.path.join(out, INDEX_NAME)}")
        old = {}
        if os.path.exists(out):  # keep names/splits of an index written by the converter
            from lightning_meta.data.shards import _parse_index

            try:
                previous = _parse_index(Path(out))
            except MetaConfigError:
                previous = None  # unreadable or another format: rebuilt from scratch
            if previous is not None:
                given = {os.path.realpath(p) for p in paths}
                dropped = [s for s in previous.shards if os.path.exists(s) and os.path.realpath(s) not in given]
                if dropped and a.output is None:
                    raise MetaConfigError(
                        f"{out} also lists {len(dropped)} shard(s) that {a.shards!r} does not match (e.g. "
                        f"{os.path.basename(dropped[0])}); rebuilding it from this subset would drop them with their "
                        f"class names and splits. Index the whole set (`lightning-meta index "
                        f"{os.path.dirname(out) or '.'}`), or write the subset's index elsewhere with --output"
                    )
                old = {c.id: {"name": c.name, "split": c.split, "group": c.group} for c in previous.classes}
        index = build_index(paths, class_meta=old, meta={"source": "lightning-meta index"})
        index.save(out)
    except MetaConfigError as e:
        print(f"lightning-meta index: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as e:
        print(f"lightning-meta index: error: {e.strerror or e} ({e.filename}); --output must be a file path you can "
              "write to (default: index.json beside the shards)", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}: {len(index.classes)} classes in {len(paths)} shard(s)")


def console_main(argv: list[str] | None = None) -> None:
    """Run the ``lightning-meta`` console script (returns nothing, so the exit status is 0 on success).

    ``fit|validate|test|predict`` go to LightningCLI; ``index`` rebuilds a shard index,
    ``convert`` turns image folders into shards (see ``lightning-meta convert --help``) and
    ``report`` tabulates and plots the results of run directories (``lightning-meta report --help``).
    """
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "index":
        return index_main(argv[1:])
    if argv and argv[0] == "report":
        from lightning_meta.report import main as report_main

        return report_main(argv[1:])
    if argv and argv[0] == "convert":
        from lightning_meta.data.convert import main as convert_main

        return convert_main(argv[1:])
    main(None if from_command_line else argv)  # None: LightningCLI reads sys.argv itself (no args= warning)
