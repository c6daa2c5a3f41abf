"""Compile the meta-learner's training loss with ``torch.compile``."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

__all__ = ["CompileMetaLoss"]


class CompileMetaLoss(Callback):
    """Runs ``pl_module.meta_loss`` through ``torch.compile`` during fitting.

    Small meta-learning models (the sinusoid MLP, a Conv-4 on 28x28 glyphs) spend most of each
    step dispatching hundreds of tiny operators of the inner loop, its vmap and its double
    backward; compiling the meta-loss can fuse them. Measure before relying on it
    (``benchmarks/sinusoid_overhead.py --variants vmap vmap+compile``): on the project's shared
    2-core CPU it gave no speed-up inside Lightning (``benchmarks/README.md``). Only the training
    loss is compiled: validation and test adapt with other step counts and shapes and stay eager, so they never trigger
    recompilation. The module is left untouched (the compiled function is an attribute of the
    instance, removed again when fitting ends), so checkpoints are identical with and without it.
    The first training step pays the compilation (tens of seconds on a CPU).

    Args:
        backend: ``torch.compile`` backend; ``inductor`` generates fused kernels, ``eager`` only
            traces (useful to check a model compiles without paying for code generation).
        mode: ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``) or null.
        dynamic: passed to ``torch.compile``; null lets it decide after the first shape change.
        fullgraph: fail instead of splitting the graph where tracing stops.

    Example:
        >>> callback = CompileMetaLoss(backend="eager")  # fitting then trains through torch.compile
        >>> callback.backend
        'eager'

    In a config (YAML)::

        trainer:
          callbacks:
            - class_path: lightning_meta.callbacks.CompileMetaLoss
              init_args: {backend: inductor}

    """

    def __init__(self, backend: str = "inductor", mode: str | None = None, dynamic: bool | None = None,
                 fullgraph: bool = False) -> None:
        super().__init__()
        known = set(torch._dynamo.list_backends()) | {"inductor", "eager", "aot_eager"}
        if backend not in known:
            raise ValueError(f"backend={backend!r} is not a torch.compile backend; use one of {sorted(known)}")
        if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"mode={mode!r} is not a torch.compile mode; use null, 'default' or 'max-autotune'")
        self.backend = backend
        self.mode = mode
        self.dynamic = dynamic
        self.fullgraph = fullgraph
        self._installed = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        if stage != "fit" or self._installed:
            return
        if not callable(getattr(pl_module, "meta_loss", None)):
            raise ValueError(
                "CompileMetaLoss needs a lightning_meta MetaLearner (a module with meta_loss); "
                f"got {type(pl_module).__name__}"
            )
        kwargs: dict[str, Any] = {"backend": self.backend, "dynamic": self.dynamic, "fullgraph": self.fullgraph}
        if self.mode is not None:
            kwargs["mode"] = self.mode
        eager = pl_module.meta_loss  # bound method of the class
        pl_module.meta_loss = torch.compile(eager, **kwargs)  # instance attribute shadows the method
        self._installed = True

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:  # noqa: D102
        if self._installed and "meta_loss" in vars(pl_module):
            del pl_module.meta_loss
        self._installed = False

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Remove the compiled ``meta_loss`` when ``fit`` fails too (Lightning then calls no ``teardown``)."""
        self.teardown(trainer, pl_module, "fit")
