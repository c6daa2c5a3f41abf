"""The ``lightning-meta`` command: LightningCLI with meta-learning defaults.

``lightning-meta fit|validate|test|predict --config CONFIG [--key value ...]``. Models and
datamodules are chosen by class name (``--model MAML``, ``--data ShardDataModule``) or by a full
``class_path`` for classes in your own project. ``data.ways`` is linked to ``model.ways``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

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

    def before_instantiate_classes(self) -> None:  # noqa: D102
        check_slurm_settings()  # before Lightning's SLURMEnvironment raises its own --ntasks error as a traceback

    def instantiate_trainer(self, **kwargs) -> Trainer:  # noqa: D102
        trainer = super().instantiate_trainer(**kwargs)
        check_slurm_settings(trainer.num_devices, trainer.num_nodes)
        return trainer

    def after_fit(self) -> None:
        """Run the meta-test when ``--test_after_fit true``."""
        if self.config.get(self.subcommand, {}).get("test_after_fit", False):
            self.trainer.test(self.model, datamodule=self.datamodule)


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
            parser_kwargs={"parser_mode": "omegaconf", "default_env": False},
            save_config_kwargs={"overwrite": True},
        )
    except Exception as e:
        cause = e if isinstance(e, MetaConfigError) else MetaConfigError.last
        if os.environ.get("LIGHTNING_META_DEBUG") or cause is None or str(cause) not in str(e):
            raise
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
        old = {}
        if os.path.exists(out):  # keep names/splits of an index written by the converter
            from lightning_meta.data.shards import _parse_index

            try:
                old = {c.id: {"name": c.name, "split": c.split, "group": c.group}
                       for c in _parse_index(Path(out)).classes}
            except MetaConfigError:
                old = {}
        index = build_index(paths, class_meta=old, meta={"source": "lightning-meta index"})
        index.save(out)
    except MetaConfigError as e:
        print(f"lightning-meta index: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}: {len(index.classes)} classes in {len(paths)} shard(s)")


def console_main(argv: list[str] | None = None) -> None:
    """Run the ``lightning-meta`` console script (returns nothing, so the exit status is 0 on success).

    ``fit|validate|test|predict`` go to LightningCLI; ``index`` rebuilds a shard index,
    ``convert`` turns image folders into shards (see ``lightning-meta convert --help``) and
    ``report`` tabulates and plots the results of run directories (``lightning-meta report --help``).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "index":
        return index_main(argv[1:])
    if argv and argv[0] == "report":
        from lightning_meta.report import main as report_main

        return report_main(argv[1:])
    if argv and argv[0] == "convert":
        from lightning_meta.data.convert import main as convert_main

        return convert_main(argv[1:])
    main(argv)
