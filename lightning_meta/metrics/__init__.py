"""torchmetrics metrics for episodic evaluation."""

from lightning_meta.metrics.episodic import EpisodicMean

__all__ = ["EpisodicMean"]
