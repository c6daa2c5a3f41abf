"""Training strategies; importing this package registers their names with Lightning.

Registered names (usable as ``Trainer(strategy=...)`` or ``--trainer.strategy`` in the CLI):
``deepspeed_meta_stage_{1,2,3}`` and ``deepspeed_meta_stage_2_offload`` (CUDA GPUs),
``deepspeed_cpu_stage_{0,1,2,3}`` (CPU processes with gloo; for tests). Registration does not
import DeepSpeed; building a strategy without it installed raises an error naming
``pip install lightning-meta[deepspeed]``.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_meta.strategies.deepspeed import (
    CPUDeepSpeedStrategy,
    DeepSpeedNotInstalledError,
    MetaDeepSpeedStrategy,
    check_zero3_compatible,
    prepare_zero3_adapted,
)

__all__ = [
    "CPUDeepSpeedStrategy",
    "DeepSpeedNotInstalledError",
    "MetaDeepSpeedStrategy",
    "check_zero3_compatible",
    "prepare_zero3_adapted",
]

MetaDeepSpeedStrategy.register_strategies(StrategyRegistry)
CPUDeepSpeedStrategy.register_strategies(StrategyRegistry)
