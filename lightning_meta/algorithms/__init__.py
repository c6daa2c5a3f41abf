"""Meta-learning algorithms as LightningModules on the shared :class:`MetaLearner` base."""

from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.algorithms.maml import MAML, BackboneWithHead
from lightning_meta.algorithms.protonet import ProtoNet

__all__ = ["MAML", "BackboneWithHead", "MetaLearner", "ProtoNet"]
