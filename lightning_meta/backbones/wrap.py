"""Use any torchvision-style classifier (ResNet, ViT, EfficientNet, ...) as a meta-learning body."""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_meta.errors import MetaConfigError

__all__ = ["HEAD_NAMES", "TorchvisionBackbone", "import_object"]

#: attribute names tried, in order, for the classification head to strip (torchvision's conventions:
#: ResNet/RegNet/GoogLeNet ``fc``, Swin ``head``, ViT ``heads``, VGG/EfficientNet/MobileNet/ConvNeXt ``classifier``)
HEAD_NAMES = ("fc", "head", "heads", "classifier")


def import_object(path: str) -> Any:
    """Import the object named by ``package.module.attribute`` (or ``package.module:attribute``).

    Example:
        >>> import_object("torch.nn.Linear") is nn.Linear
        True

    """
    module_name, sep, attr = path.partition(":") if ":" in path else path.rpartition(".")
    if not sep or not module_name or not attr:
        raise MetaConfigError(f"model={path!r} is not an import path; write 'package.module.name', "
                              "e.g. 'torchvision.models.resnet18'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise MetaConfigError(f"model={path!r}: cannot import {module_name!r} ({e}); install the package that "
                              "provides it (lightning-meta does not depend on torchvision)") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MetaConfigError(f"model={path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class TorchvisionBackbone(nn.Module):
    """A classifier with its classification head replaced by the identity, exposing ``out_features``.

    Works with any ``nn.Module`` whose head is an attribute (torchvision's ``fc``, ``head``,
    ``heads`` or ``classifier``; or name it with ``head``). ``out_features`` is the input size of the
    first ``nn.Linear`` of the removed head, or given explicitly. When the head is an
    ``nn.Sequential``, its layers before that Linear stay (Dropout excepted): ConvNeXt's final
    LayerNorm and MaxViT's pooling and LayerNorm are part of the features. Outputs are flattened to
    ``[b, out_features]``; tuple outputs (GoogLeNet/Inception auxiliary logits in training) keep
    their first element. torchvision is not a dependency of lightning-meta: install it to wrap its
    models. Nothing is downloaded: load pre-trained weights from a local file with ``weights_path``.

    From YAML, ``model`` is an import path (with ``model_kwargs``) or a nested ``class_path``::

        backbone:
          class_path: lightning_meta.backbones.TorchvisionBackbone
          init_args:
            model: torchvision.models.resnet18
            model_kwargs: {weights: null}
            weights_path: /data/resnet18.pth   # optional, a local state dict

    Args:
        model: the classifier, or the import path of a module instance, a class or a factory
            function (called with ``model_kwargs``).
        model_kwargs: keyword arguments of the class or factory named by ``model``.
        head: attribute (dotted path allowed, e.g. ``heads.head``) holding the head to strip;
            default the first of :data:`HEAD_NAMES` that exists.
        out_features: the feature size after stripping; inferred when the head contains an
            ``nn.Linear``.
        weights_path: a local state dict (``torch.save(model.state_dict())``, or a checkpoint with a
            ``state_dict`` entry) loaded, strictly, into the full model before the head is removed.
        freeze: set ``requires_grad=False`` on every parameter and keep the BatchNorm layers in
            evaluation mode, their running statistics fixed (a fixed pre-trained body; pair it
            with :class:`~lightning_meta.backbones.adapters.LoRABackbone` or
            :class:`~lightning_meta.backbones.adapters.FiLMBackbone` adapters, or ANIL).

    Raises:
        MetaConfigError: the path cannot be imported, the head is missing, or ``out_features``
            cannot be inferred.

    Example:
        >>> net = nn.Sequential()
        >>> net.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        >>> net.fc = nn.Linear(8, 1000)
        >>> body = TorchvisionBackbone(net)
        >>> body(torch.zeros(2, 3, 16, 16)).shape, body.out_features, body.stripped
        (torch.Size([2, 8]), 8, 'fc')

    """

    def __init__(
        self,
        model: nn.Module | str,
        model_kwargs: dict[str, Any] | None = None,
        head: str | None = None,
        out_features: int | None = None,
        weights_path: str | None = None,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        net = self._build(model, model_kwargs)
        if weights_path is not None:
            self._load(net, weights_path)
        name, removed = self._find_head(net, head)
        inferred = next((m.in_features for m in removed.modules() if isinstance(m, nn.Linear)), None)
        if out_features is None:
            if inferred is None:
                raise MetaConfigError(
                    f"cannot infer out_features of {type(net).__name__}: its head {name!r} ({type(removed).__name__}) "
                    "has no nn.Linear; set out_features to the size of the features the body returns"
                )
            out_features = inferred
        elif out_features < 1:
            raise MetaConfigError(f"out_features={out_features} must be >= 1")
        kept = self._feature_layers(removed)
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child,
                nn.Sequential(OrderedDict(kept)) if kept else nn.Identity())
        if freeze:
            net.requires_grad_(False)
        self.model = net
        self.stripped = name
        self.freeze = bool(freeze)
        self.out_features = int(out_features)
        self.train(self.training)

    @staticmethod
    def _feature_layers(head: nn.Module) -> list[tuple[str, nn.Module]]:
        """The layers of a sequential head before its first ``nn.Linear``, Dropout left out.

        They compute the features that the first Linear reads (ConvNeXt's channels-first LayerNorm
        and Flatten, MaxViT's pooling and LayerNorm), so they stay, under their original names (a
        state dict of the full model still fits them).
        """
        if not isinstance(head, nn.Sequential) or not any(isinstance(m, nn.Linear) for m in head.modules()):
            return []  # no Linear (e.g. SqueezeNet's convolutional classifier): the whole head goes
        kept = []
        for child_name, layer in head.named_children():
            if any(isinstance(m, nn.Linear) for m in layer.modules()):
                break
            if not isinstance(layer, nn.modules.dropout._DropoutNd):
                kept.append((child_name, layer))
        return kept

    def train(self, mode: bool = True) -> TorchvisionBackbone:
        """As ``nn.Module.train``; a frozen body keeps its BatchNorm layers in evaluation mode.

        With ``freeze=True`` the running statistics are part of the fixed pre-trained body: they
        normalise in training too and are never updated.
        """
        super().train(mode)
        if getattr(self, "freeze", False):
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.train(False)
        return self

    @staticmethod
    def _build(model: nn.Module | str, model_kwargs: Mapping[str, Any] | None) -> nn.Module:
        if isinstance(model, nn.Module):
            if model_kwargs:
                raise MetaConfigError("model_kwargs apply only when model is an import path; the model given is "
                                      f"already a {type(model).__name__} instance")
            return model
        if not isinstance(model, str):
            raise MetaConfigError(f"model must be an nn.Module or an import path, got {type(model).__name__}")
        obj = import_object(model)
        if isinstance(obj, nn.Module):
            if model_kwargs:
                raise MetaConfigError(f"model={model!r} is a module instance; model_kwargs cannot apply to it")
            return obj
        if not callable(obj):
            raise MetaConfigError(f"model={model!r} is a {type(obj).__name__}, not a module, class or factory")
        try:
            net = obj(**dict(model_kwargs or {}))
        except TypeError as e:
            raise MetaConfigError(
                f"model={model!r} does not accept model_kwargs={dict(model_kwargs or {})} ({e})"
            ) from e
        if not isinstance(net, nn.Module):
            raise MetaConfigError(f"model={model!r} returned a {type(net).__name__}, not an nn.Module")
        return net

    @staticmethod
    def _load(net: nn.Module, path: str) -> None:
        import pickle

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as e:
            raise MetaConfigError(f"weights_path={path!r} cannot be read as a PyTorch state dict ({e})") from e
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping):
            raise MetaConfigError(f"weights_path={path!r} holds a {type(state).__name__}, not a state dict "
                                  "(a mapping of parameter names to tensors)")
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise MetaConfigError(f"weights_path={path!r} does not fit {type(net).__name__} "
                                  f"({str(e).splitlines()[0]}); check the model and model_kwargs") from e

    @staticmethod
    def _find_head(net: nn.Module, head: str | None) -> tuple[str, nn.Module]:
        names = (head,) if head is not None else HEAD_NAMES
        for name in names:
            try:
                module = net.get_submodule(name)
            except AttributeError:
                continue
            if name and not isinstance(module, nn.Identity):
                return name, module
        children = [n for n, _ in net.named_children()]
        which = f"head={head!r} is not a submodule" if head is not None else f"none of {list(HEAD_NAMES)} is a head"
        raise MetaConfigError(f"{type(net).__name__}: {which} (its children: {children}); set head to the "
                              "attribute holding the classification layer")

    def forward(self, x: Tensor) -> Tensor:
        """``[b, C, H, W] -> [b, out_features]``."""
        out = self.model(x)
        if isinstance(out, tuple):
            out = out[0]
        out = out.flatten(1)
        if out.shape[-1] != self.out_features:
            raise MetaConfigError(
                f"{type(self.model).__name__} without its head {self.stripped!r} returns {out.shape[-1]} features, "
                f"not out_features={self.out_features}; set out_features={out.shape[-1]}"
            )
        return out
