"""Lightning callbacks for meta-learning (installed as ``lightning_meta.callbacks``)."""

from lightning_meta.callbacks.compile import CompileMetaLoss
from lightning_meta.callbacks.ensemble import CheckpointEnsemble
from lightning_meta.callbacks.episode_logger import TestResultWriter
from lightning_meta.callbacks.monitors import (
    DerivativeOrderAnnealing,
    EpisodeGallery,
    InnerLoopMonitor,
    LearnedLRMonitor,
    MetaOverfittingMonitor,
    ThroughputMonitor,
)
from lightning_meta.callbacks.predictions import PredictionWriter
from lightning_meta.callbacks.preemption import PreemptionCheckpoint
from lightning_meta.callbacks.progress import MetaProgressBar

__all__ = [
    "CheckpointEnsemble",
    "CompileMetaLoss",
    "DerivativeOrderAnnealing",
    "EpisodeGallery",
    "InnerLoopMonitor",
    "LearnedLRMonitor",
    "MetaOverfittingMonitor",
    "MetaProgressBar",
    "PredictionWriter",
    "PreemptionCheckpoint",
    "TestResultWriter",
    "ThroughputMonitor",
]
