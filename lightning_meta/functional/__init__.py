"""Pure functions with no Lightning dependency: inner loops, metric-space maths, statistics."""

from lightning_meta.functional.bn_sync import RunningStatsSync, replay_running_stats, tracked_norm_layers
from lightning_meta.functional.inner_loop import (
    BNPolicy,
    Params,
    PerStepBatchNorm,
    bn_policy,
    checkpointed,
    convert_per_step_norm,
    inner_adapt,
    norm_step,
    sgd_step,
)
from lightning_meta.functional.metric import accuracy, pairwise_distance, prototypes
from lightning_meta.functional.norms import decomposed_norms
from lightning_meta.functional.precision import low_precision_autocast, upcast_low_precision
from lightning_meta.functional.ridge import ridge_logits, ridge_regression
from lightning_meta.functional.stats import mean_ci95, mean_ci95_from_stats

__all__ = [
    "BNPolicy",
    "Params",
    "PerStepBatchNorm",
    "RunningStatsSync",
    "accuracy",
    "bn_policy",
    "checkpointed",
    "convert_per_step_norm",
    "decomposed_norms",
    "inner_adapt",
    "low_precision_autocast",
    "mean_ci95",
    "mean_ci95_from_stats",
    "norm_step",
    "pairwise_distance",
    "prototypes",
    "replay_running_stats",
    "ridge_logits",
    "ridge_regression",
    "sgd_step",
    "tracked_norm_layers",
    "upcast_low_precision",
]
