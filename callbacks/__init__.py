"""Lightning callbacks for meta-learning (installed as ``lightning_meta.callbacks``)."""

from lightning_meta.callbacks.episode_logger import TestResultWriter

__all__ = ["TestResultWriter"]
