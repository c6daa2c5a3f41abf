"""Episodic LightningDataModules (installed as ``lightning_meta.datamodules``)."""

from lightning_meta.datamodules.base import EpisodeSource, EpisodicDataModule, MetaBatchSampler
from lightning_meta.datamodules.omniglot_runs import OmniglotRunsDataModule, OmniglotRunsError, OmniglotRunsSource
from lightning_meta.datamodules.shards import ShardDataModule, ShardEpisodeSource
from lightning_meta.datamodules.sinusoid import SinusoidDataModule, SinusoidSource

__all__ = [
    "EpisodeSource",
    "EpisodicDataModule",
    "MetaBatchSampler",
    "OmniglotRunsDataModule",
    "OmniglotRunsError",
    "OmniglotRunsSource",
    "ShardDataModule",
    "ShardEpisodeSource",
    "SinusoidDataModule",
    "SinusoidSource",
]
