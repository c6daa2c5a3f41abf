"""Episodic LightningDataModules (installed as ``lightning_meta.datamodules``)."""

from lightning_meta.datamodules.base import EpisodeSource, EpisodicDataModule, MetaBatchSampler
from lightning_meta.datamodules.shards import ShardDataModule, ShardEpisodeSource
from lightning_meta.datamodules.sinusoid import SinusoidDataModule, SinusoidSource

__all__ = [
    "EpisodeSource",
    "EpisodicDataModule",
    "MetaBatchSampler",
    "ShardDataModule",
    "ShardEpisodeSource",
    "SinusoidDataModule",
    "SinusoidSource",
]
