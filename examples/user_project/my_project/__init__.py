"""An example user project: its own learners, backbone and datamodule, run by ``lightning-meta``.

Nothing here is installed: put the folder that holds ``my_project/`` on ``PYTHONPATH`` (or run from
it) and name the classes by their import path, e.g. ``--model my_project.ShrinkageProtoNet``.
"""

from my_project.backbones import SmallConvNet
from my_project.data import PatternDataModule, PatternSource
from my_project.learners import LabelSmoothedMAML, ShrinkageProtoNet

__all__ = ["LabelSmoothedMAML", "PatternDataModule", "PatternSource", "ShrinkageProtoNet", "SmallConvNet"]
