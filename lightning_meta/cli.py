"""The ``lightning-meta`` command: LightningCLI with meta-learning defaults.

``lightning-meta fit|validate|test|predict --config CONFIG [--key value ...]``. Models and
datamodules are chosen by class name (``--model MAML``, ``--data ShardDataModule``) or by a full
``class_path`` for classes in your own project. ``data.ways`` is linked to ``model.ways``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

import lightning_meta.algorithms  # noqa: F401  - registers the short class names
import lightning_meta.backbones  # noqa: F401
import lightning_meta.callbacks  # noqa: F401
import lightning_meta.datamodules  # noqa: F401
import lightning_meta.strategies  # noqa: F401  - registers deepspeed_meta_stage_* / deepspeed_cpu_stage_*
from lightning_meta.algorithms import MetaLearner
from lightning_meta.datamodules import EpisodicDataModule
from lightning_meta.errors import MetaConfigError

__all__ = ["MetaCLI", "main"]


class MetaCLI(LightningCLI):
    """LightningCLI with the data/model links and the ``--test_after_fit`` option."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: D102
        parser.link_arguments("data", "model.init_args.ways", compute_fn=lambda dm: dm.ways, apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="After `fit`, run `test` on the final model (the meta-test accuracy ± 95% CI is logged and printed).",
        )

    def after_fit(self) -> None:
        """Runs the meta-test when ``--test_after_fit true``."""
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
                old = {c.id: {"name": c.name, "split": c.split, "group": c.group} for c in _parse_index(Path(out)).classes}
            except MetaConfigError:
                old = {}
        index = build_index(paths, class_meta=old, meta={"source": "lightning-meta index"})
        index.save(out)
    except MetaConfigError as e:
        print(f"lightning-meta index: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {out}: {len(index.classes)} classes in {len(paths)} shard(s)")


def console_main(argv: list[str] | None = None) -> None:
    """The ``lightning-meta`` console script (returns nothing, so the exit status is 0 on success).

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
