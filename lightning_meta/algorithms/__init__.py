"""Meta-learning algorithms as LightningModules on the shared :class:`MetaLearner` base."""

from lightning_meta.algorithms.anil import ANIL
from lightning_meta.algorithms.base import MetaLearner
from lightning_meta.algorithms.imaml import IMAML
from lightning_meta.algorithms.maml import MAML, BackboneWithHead
from lightning_meta.algorithms.mamlpp import MAMLPlusPlus
from lightning_meta.algorithms.mann import MANN
from lightning_meta.algorithms.matching import MatchingNet
from lightning_meta.algorithms.metaoptnet import MetaOptNet
from lightning_meta.algorithms.metasgd import MetaSGD
from lightning_meta.algorithms.protonet import ProtoNet
from lightning_meta.algorithms.relation import RelationNet
from lightning_meta.algorithms.reptile import Reptile
from lightning_meta.algorithms.snail import SNAIL
from lightning_meta.algorithms.transformer import TransformerICL

__all__ = [
    "ANIL",
    "IMAML",
    "MAML",
    "MANN",
    "MAMLPlusPlus",
    "BackboneWithHead",
    "MatchingNet",
    "MetaLearner",
    "MetaOptNet",
    "MetaSGD",
    "ProtoNet",
    "RelationNet",
    "Reptile",
    "SNAIL",
    "TransformerICL",
]
