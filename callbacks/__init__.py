"""Lightning callbacks for meta-learning (installed as ``lightning_meta.callbacks``)."""

from lightning_meta.callbacks.compile import CompileMetaLoss
from lightning_meta.callbacks.episode_logger import TestResultWriter
from lightning_meta.callbacks.preemption import PreemptionCheckpoint

__all__ = ["CompileMetaLoss", "PreemptionCheckpoint", "TestResultWriter"]
