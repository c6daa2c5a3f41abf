"""Episodic LightningDataModules (installed as ``lightning_meta.datamodules``)."""

from lightning_meta.datamodules.base import EpisodeLoader, EpisodeSource, EpisodicDataModule, MetaBatchSampler
from lightning_meta.datamodules.omniglot_runs import OmniglotRunsDataModule, OmniglotRunsError, OmniglotRunsSource
from lightning_meta.datamodules.shards import (
    MultiSourceEpisodes,
    ShardDataModule,
    ShardEpisodeSource,
    SkippedSamplesLogger,
    StreamingEpisodeSource,
)
from lightning_meta.datamodules.sinusoid import SinusoidDataModule, SinusoidSource

__all__ = [
    "EpisodeLoader",
    "EpisodeSource",
    "EpisodicDataModule",
    "MetaBatchSampler",
    "MultiSourceEpisodes",
    "OmniglotRunsDataModule",
    "OmniglotRunsError",
    "OmniglotRunsSource",
    "ShardDataModule",
    "ShardEpisodeSource",
    "SinusoidDataModule",
    "SinusoidSource",
    "SkippedSamplesLogger",
    "StreamingEpisodeSource",
]
