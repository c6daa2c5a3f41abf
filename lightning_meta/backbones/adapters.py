"""Small adapted subsets for large bodies: LoRA adapters and FiLM / CAVIA context layers.

These modules give a network a few parameters whose names the ``adapt_filter`` presets of
:func:`lightning_meta.algorithms.maml.adapt_filter_fn` select: ``lora`` picks names containing
``lora_`` (:class:`LoRALinear`'s ``lora_factors.A`` and ``lora_factors.B``), ``film`` picks names containing
``film`` or ``context`` (:class:`FiLM`'s ``film_scale`` / ``film_shift``, or its CAVIA
``context`` vector). Both start as the identity, so adding them leaves the network's function
unchanged, and both are plain tensor maths, so they work under ``torch.func`` transforms.

:func:`add_lora` and :func:`add_film` change a module in place; :class:`LoRABackbone` and
:class:`FiLMBackbone` do the same at construction, so YAML configs can wrap any backbone.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_meta.errors import MetaConfigError

__all__ = ["FiLM", "FiLMBackbone", "LoRABackbone", "LoRAFactors", "LoRALinear", "add_film", "add_lora"]

Freeze = Literal["wrapped", "all", "none"]


def _check_rank_alpha(rank: int, alpha: float | None) -> float:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise MetaConfigError(f"LoRA rank={rank!r} must be an integer >= 1 (typical: 4 to 16)")
    alpha = float(rank) if alpha is None else alpha
    if not alpha > 0:
        raise MetaConfigError(f"LoRA alpha={alpha!r} must be > 0 (the update is scaled by alpha / rank); "
                              "leave it unset for alpha = rank")
    return float(alpha)


class LoRAFactors(nn.Module):
    """The two factors of a LoRA update, ``x -> (alpha / rank) * x A^T B^T``, in their own module.

    :class:`LoRALinear` keeps them here rather than next to its base weight so that a module
    holds either adapted or base parameters, never both: ZeRO-3 can then keep the factors whole
    and partition the base weight (see :func:`~lightning_meta.strategies.check_zero3_compatible`).
    ``A`` (``[rank, in]``) starts Kaiming-uniform and ``B`` (``[out, rank]``) at zero.

    Args:
        in_features: input size of the adapted Linear layer.
        out_features: output size of the adapted Linear layer.
        rank: rank of the update.
        scaling: the update's multiplier (``alpha / rank`` in :class:`LoRALinear`).
        device: where to create the factors.
        dtype: the factors' dtype.

    Example:
        >>> f = LoRAFactors(8, 4, rank=2, scaling=0.5)
        >>> f(torch.randn(3, 8)).abs().max().item(), [n for n, _ in f.named_parameters()]
        (0.0, ['A', 'B'])

    """

    def __init__(self, in_features: int, out_features: int, rank: int, scaling: float,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.scaling = scaling
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]``."""
        return F.linear(F.linear(x, self.A), self.B) * self.scaling


class LoRALinear(nn.Linear):
    """``nn.Linear`` plus a low-rank update: ``x W^T + b + (alpha / rank) * x A^T B^T`` (Hu et al. 2022).

    The factors live in the child :class:`LoRAFactors` ``lora_factors`` (parameter names
    ``lora_factors.A`` and ``lora_factors.B``; also reachable as ``lora_A`` and ``lora_B``).
    ``A`` starts Kaiming-uniform and ``B`` at zero, so the layer computes exactly the base layer
    until ``B`` moves. ``weight`` and ``bias`` keep their names (a state dict of the base network
    loads with ``strict=False``, the factors keeping their initial values) and are frozen
    (``requires_grad=False``) unless ``freeze_base=False``. The
    ``lora`` preset of ``adapt_filter`` selects the factors (names containing ``lora_``).

    Args:
        in_features: input size (as :class:`torch.nn.Linear`).
        out_features: output size (as :class:`torch.nn.Linear`).
        bias: whether the base layer has a bias (as :class:`torch.nn.Linear`).
        rank: rank of the update (>= 1).
        alpha: scale numerator; the update is multiplied by ``alpha / rank`` (default ``alpha = rank``).
        freeze_base: set ``requires_grad=False`` on ``weight`` and ``bias``.
        device: where to create the layer and its factors (as :class:`torch.nn.Linear`).
        dtype: their dtype (as :class:`torch.nn.Linear`).

    Raises:
        MetaConfigError: ``rank < 1`` or ``alpha <= 0``.

    Example:
        >>> base = nn.Linear(8, 4)
        >>> lora = LoRALinear.from_linear(base, rank=2)
        >>> x = torch.randn(3, 8)
        >>> torch.equal(lora(x), base(x)), sorted(n for n, p in lora.named_parameters() if p.requires_grad)
        (True, ['lora_factors.A', 'lora_factors.B'])

    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 4,
        alpha: float | None = None,
        bias: bool = True,
        freeze_base: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        alpha = _check_rank_alpha(rank, alpha)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.lora_factors = LoRAFactors(in_features, out_features, rank, self.scaling, device=device, dtype=dtype)
        if freeze_base:
            self.freeze_base()

    @property
    def lora_A(self) -> nn.Parameter:  # noqa: N802
        """The ``[rank, in]`` factor (``lora_factors.A``)."""
        return self.lora_factors.A

    @property
    def lora_B(self) -> nn.Parameter:  # noqa: N802
        """The ``[out, rank]`` factor (``lora_factors.B``), zero at initialisation."""
        return self.lora_factors.B

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int = 4, alpha: float | None = None,
                    freeze_base: bool = True) -> LoRALinear:
        """Build a :class:`LoRALinear` that shares ``linear``'s weight and bias (the same parameter objects)."""
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, rank, alpha, bias=linear.bias is not None,
                  freeze_base=False, device=w.device, dtype=w.dtype)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        if freeze_base:
            new.freeze_base()
        return new

    def freeze_base(self) -> None:
        """Set ``requires_grad=False`` on ``weight`` and ``bias`` (the LoRA factors stay trainable)."""
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        """``[..., in] -> [..., out]``."""
        return F.linear(x, self.weight, self.bias) + self.lora_factors(x)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # state dicts saved before the factors moved into `lora_factors` name them `lora_A` / `lora_B`
        for old, new in (("lora_A", "lora_factors.A"), ("lora_B", "lora_factors.B")):
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}"


def _child_path(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def add_lora(
    module: nn.Module,
    rank: int = 4,
    alpha: float | None = None,
    target: str | None = None,
    freeze_base: bool = True,
) -> list[str]:
    r"""Replace, in place, the ``nn.Linear`` layers of ``module`` matching ``target`` by :class:`LoRALinear`.

    The replacement shares the original weight and bias, so parameter names (and the network's
    function, at initialisation) do not change; each gains ``lora_factors.A`` and ``lora_factors.B``.

    Args:
        module: the network to modify.
        rank: rank of the updates (see :class:`LoRALinear`).
        alpha: scale numerator of the updates (see :class:`LoRALinear`).
        target: regular expression searched (``re.search``) in each Linear's qualified name, e.g.
            ``r"attn\.(qkv|proj)$"`` for the attention projections of :class:`~lightning_meta.backbones.ViT`;
            ``None`` wraps every ``nn.Linear``. The output projection of an ``nn.MultiheadAttention``
            is never wrapped: that module uses its weight directly, so an adapter there would not act.
        freeze_base: freeze the wrapped layers' weight and bias.

    Returns:
        The qualified names of the wrapped layers.

    Raises:
        MetaConfigError: a bad ``rank``/``alpha``/``target``, or no Linear layer matches.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> add_lora(net, rank=2, target=r"^0$")
        ['0']
        >>> [n for n, _ in net.named_parameters()]
        ['0.weight', '0.bias', '0.lora_factors.A', '0.lora_factors.B', '2.weight', '2.bias']

    """
    _check_rank_alpha(rank, alpha)
    pattern = _compile(target, "add_lora")
    # nn.MultiheadAttention reads its out_proj's weight and bias directly, never calling the layer:
    # a LoRA wrapper there would be silently dead, so such layers are never wrapped
    inside_mha = {f"{n}.{c}" if n else c for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)
                  for c, _ in m.named_children()}
    linears = [n for n, m in module.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and n not in inside_mha]
    chosen = [n for n in linears if n and (pattern is None or pattern.search(n))]
    skipped = sorted(n for n in inside_mha if pattern is None or pattern.search(n))
    if skipped and not chosen:
        raise MetaConfigError(
            f"add_lora target={target!r} matches only {_preview(skipped)}, the output projection of an "
            "nn.MultiheadAttention, which calls its weight directly so a LoRA wrapper would never act; adapt "
            "that attention another way (e.g. lightning_meta.backbones.ViT, whose qkv/proj are plain Linears)"
        )
    if not chosen:
        raise MetaConfigError(
            f"add_lora target={target!r} matches no nn.Linear of {type(module).__name__} (its Linear layers: "
            f"{_preview(linears)}); give a regular expression matching some of them, or null for all"
        )
    for name in chosen:
        parent, child = _child_path(module, name)
        setattr(parent, child, LoRALinear.from_linear(getattr(parent, child), rank, alpha, freeze_base))
    return chosen


class FiLM(nn.Module):
    """Feature-wise affine modulation ``x * (1 + scale) + shift`` per channel (Perez et al. 2018).

    Plain form: ``film_scale`` and ``film_shift`` (``[C]``) start at zero (the identity). CAVIA form
    (Zintgraf et al. 2019), ``context_dim > 0``: a ``context`` vector (``[context_dim]``, zero and
    not trained by the outer optimizer: ``requires_grad=False``, as CAVIA resets it for every
    task) goes through a linear ``generator`` (zero-initialised bias) to ``(scale, shift)``; the
    inner loop adapts ``context`` and the outer loop learns ``generator``. The ``film`` preset of
    ``adapt_filter`` selects names containing ``film`` or ``context``: keep the word ``film`` out of
    the attribute name that holds a CAVIA-form layer, or its generator adapts too (:func:`add_film`
    uses ``modulation``).

    Args:
        num_features: channels ``C``.
        channel_dim: the dimension of the input holding the channels (1 for ``[b, C, H, W]`` maps,
            -1 for ``[..., C]`` tokens or features).
        context_dim: size of the CAVIA context vector; 0 for plain FiLM parameters.

    Example:
        >>> film = FiLM(3)
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.equal(film(x), x), [n for n, _ in film.named_parameters()]
        (True, ['film_scale', 'film_shift'])
        >>> [n for n, _ in FiLM(3, context_dim=2).named_parameters()]
        ['context', 'generator.weight', 'generator.bias']

    """

    def __init__(self, num_features: int, channel_dim: int = 1, context_dim: int = 0) -> None:
        super().__init__()
        if num_features < 1:
            raise MetaConfigError(f"FiLM num_features={num_features} must be >= 1")
        if context_dim < 0:
            raise MetaConfigError(f"FiLM context_dim={context_dim} must be >= 0 (0: plain FiLM parameters)")
        self.num_features = num_features
        self.channel_dim = channel_dim
        self.context_dim = context_dim
        if context_dim:
            self.context = nn.Parameter(torch.zeros(context_dim), requires_grad=False)
            self.generator = nn.Linear(context_dim, 2 * num_features)
            nn.init.zeros_(self.generator.bias)
        else:
            self.film_scale = nn.Parameter(torch.zeros(num_features))
            self.film_shift = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        """Modulate ``x`` (any shape); the channel dimension must have ``num_features`` entries."""
        if self.context_dim:
            scale, shift = self.generator(self.context).chunk(2)
        else:
            scale, shift = self.film_scale, self.film_shift
        if x.dim() < 1 or x.shape[self.channel_dim] != self.num_features:
            raise MetaConfigError(
                f"FiLM({self.num_features}, channel_dim={self.channel_dim}) got an output of shape {list(x.shape)}: "
                f"dimension {self.channel_dim} does not hold {self.num_features} channels; place the modulation "
                "after a layer whose channels are in that dimension (add_film target=...)"
            )
        shape = [1] * x.dim()
        shape[self.channel_dim] = self.num_features
        return x * (1 + scale.view(shape)) + shift.view(shape)

    def extra_repr(self) -> str:  # noqa: D102
        return f"{self.num_features}, channel_dim={self.channel_dim}, context_dim={self.context_dim}"


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _channels(m: nn.Module) -> tuple[int, int] | None:
    """``(channels, channel_dim)`` of a layer's output, or None when unknown."""
    if isinstance(m, nn.modules.batchnorm._NormBase):
        return m.num_features, 1
    if isinstance(m, nn.GroupNorm):
        return m.num_channels, 1
    if isinstance(m, nn.LayerNorm):
        shape = tuple(m.normalized_shape)
        if len(shape) != 1:  # normalised over several dimensions: none of them is known to hold channels
            return None
        if type(m).__name__ == "LayerNorm2d":  # torchvision's and timm's: channels-first maps, over C
            return shape[0], 1
        return shape[0], -1  # nn.LayerNorm and its subclasses (e.g. CLIP's fp16 wrapper): the last dimension
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.out_channels, 1
    if isinstance(m, nn.Linear):
        return m.out_features, -1
    return None


def _apply_modulation(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
    return module.modulation(output)


def add_film(module: nn.Module, target: str | None = None, context_dim: int = 0) -> list[str]:
    """Attaches a :class:`FiLM` layer, in place, after every layer of ``module`` whose name matches ``target``.

    Each chosen layer gets a child ``modulation`` (a :class:`FiLM`) and a forward hook applying it
    to the layer's output, so existing parameter names do not change and the network's function
    is unchanged at initialisation. The hook is a module-level function (deep copies and pickling
    work); the ``film`` preset of ``adapt_filter`` then adapts only the FiLM parameters.

    Args:
        module: the network to modify.
        target: regular expression searched in qualified module names; the matching layers must
            be normalisation layers (BatchNorm, GroupNorm, InstanceNorm, LayerNorm), convolutions or
            Linear layers (their output channels are known). ``None``: every normalisation layer.
            A ``LayerNorm`` counts when it normalises one dimension: ``nn.LayerNorm`` modulates the
            last one, a channels-first ``LayerNorm2d`` (torchvision, timm) dimension 1; a LayerNorm
            over several dimensions is refused, since no dimension is known to hold the channels.
        context_dim: 0 for plain FiLM parameters, > 0 for CAVIA context vectors of that size.

    Returns:
        The qualified names of the modulated layers.

    Raises:
        MetaConfigError: nothing matches, or a matching layer has no known channel count.

    Example:
        >>> from lightning_meta.backbones import Conv4
        >>> net = Conv4(1, 8, 28)
        >>> add_film(net)
        ['encoder.1', 'encoder.5', 'encoder.9', 'encoder.13']
        >>> [n for n, _ in net.named_parameters()][2:4]
        ['encoder.1.weight', 'encoder.1.bias']

    """
    pattern = _compile(target, "add_film")
    named = [(n, m) for n, m in module.named_modules() if n and not isinstance(m, FiLM)]
    if pattern is None:
        chosen = [(n, m) for n, m in named if isinstance(m, _NORMS)]
    else:
        chosen = [(n, m) for n, m in named if pattern.search(n)]
    if not chosen:
        layers = [n for n, m in named if _channels(m) is not None]
        raise MetaConfigError(
            f"add_film target={target!r} matches no layer of {type(module).__name__}"
            f"{' (it has no normalisation layer)' if pattern is None else ''}; layers FiLM can follow: "
            f"{_preview(layers)}; give a regular expression matching some of them"
        )
    for name, m in chosen:  # every check before any change: a refused call leaves the module untouched
        if _channels(m) is None:
            why = (f" (a LayerNorm over {list(m.normalized_shape)}: over several dimensions, none of them is known "
                   "to hold the channels)" if isinstance(m, nn.LayerNorm) else "")
            raise MetaConfigError(
                f"add_film target={target!r} matches {name!r} ({type(m).__name__}), whose output channels are "
                f"unknown{why}; match normalisation, convolution or Linear layers only (anchor the expression, "
                "e.g. '$'), or a layer after it whose channels are known"
            )
        if hasattr(m, "modulation"):
            raise MetaConfigError(f"layer {name!r} already has a FiLM modulation; call add_film once per layer")
    for _, m in chosen:
        info = _channels(m)
        # the layer's own tensors, else the network's: a parameter-free layer (InstanceNorm, affine=False)
        # must not leave the FiLM in float32 on the CPU inside a bf16 or GPU network
        ref = next(m.parameters(), None)
        ref = next(m.buffers(), None) if ref is None else ref
        ref = next(module.parameters(), None) if ref is None else ref
        m.modulation = FiLM(info[0], channel_dim=info[1], context_dim=context_dim)
        if ref is not None:
            m.modulation.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        m.register_forward_hook(_apply_modulation)
    return [n for n, _ in chosen]


def _compile(target: str | None, who: str) -> re.Pattern[str] | None:
    if target is None:
        return None
    try:
        return re.compile(target)
    except re.error as e:
        raise MetaConfigError(f"{who} target={target!r} is not a valid regular expression ({e})") from e


def _preview(names: list[str], n: int = 8) -> str:
    return f"{names[:n]}{' ...' if len(names) > n else ''}" if names else "none"


def init_head_like(backbone: nn.Module, head: nn.Linear) -> None:
    """Initialise a learner's linear ``head`` with ``backbone.init_head`` when the backbone has one."""
    init_head = getattr(backbone, "init_head", None)
    if callable(init_head):  # e.g. Conv4(head_init=...), MLP(init="truncated_normal")
        init_head(head)


def _out_features(backbone: nn.Module, who: str) -> int:
    d = getattr(backbone, "out_features", None)
    if not isinstance(d, int) or d <= 0:
        raise MetaConfigError(f"{who} needs a backbone with a positive integer attribute 'out_features'; "
                              f"{type(backbone).__name__} has {d!r}")
    return d


class LoRABackbone(nn.Module):
    r"""Any backbone with LoRA adapters on its Linear layers (:func:`add_lora`), constructible from YAML.

    Parameter names gain a ``body.`` prefix; ``out_features`` is the backbone's. With
    ``MAML(adapt_filter="lora")`` the inner loop adapts only the LoRA factors; add the head with a
    regular expression (``adapt_filter: "lora_|^head\."``) when every task needs its own readout.

    Args:
        backbone: the body to adapt (must have ``out_features``).
        rank: rank of every adapter (>= 1; see :class:`LoRALinear`).
        alpha: scale numerator of every adapter; updates are multiplied by ``alpha / rank``.
        target: which Linear layers get adapters (regular expression on qualified names; ``None`` = all).
        freeze: ``wrapped`` freezes the weights of the wrapped Linear layers (LoRA's usual setting),
            ``all`` freezes every non-LoRA parameter of the backbone (a pre-trained body), ``none``
            freezes nothing (the outer loop meta-learns the whole body; training from scratch).

    Example:
        >>> from lightning_meta.backbones.vit import ViT
        >>> net = LoRABackbone(ViT(1, 28, 7, dim=32, depth=2, heads=2), rank=4, target=r"attn\.(qkv|proj)$")
        >>> net(torch.zeros(2, 1, 28, 28)).shape, sum("lora_" in n for n, _ in net.named_parameters())
        (torch.Size([2, 32]), 8)

    """

    def __init__(
        self,
        backbone: nn.Module,
        rank: int = 4,
        alpha: float | None = None,
        target: str | None = None,
        freeze: Freeze = "wrapped",
    ) -> None:
        super().__init__()
        if freeze not in ("wrapped", "all", "none"):
            raise MetaConfigError(f"LoRABackbone freeze={freeze!r} is not supported; use 'wrapped', 'all' or 'none'")
        self.out_features = _out_features(backbone, "LoRABackbone")
        self.body = backbone
        self.wrapped = add_lora(backbone, rank, alpha, target, freeze_base=freeze == "wrapped")
        if freeze == "all":
            for name, p in backbone.named_parameters():
                if "lora_" not in name:
                    p.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.body(x)

    def init_head(self, head: nn.Linear) -> None:
        """Initialise a learner's task head as the wrapped backbone would (its ``init_head``), if it says how."""
        init_head_like(self.body, head)


class FiLMBackbone(nn.Module):
    """Any backbone with FiLM (or CAVIA context) layers after chosen layers (:func:`add_film`), from YAML.

    Parameter names gain a ``body.`` prefix; ``out_features`` is the backbone's. Use it with
    ``MAML(adapt_filter="film")`` so that the inner loop adapts only the modulation parameters.

    Args:
        backbone: the body (must have ``out_features``).
        target: layers to modulate (regular expression on qualified names; ``None`` = every
            normalisation layer).
        context_dim: 0 for plain FiLM parameters, > 0 for CAVIA context vectors.

    Example:
        >>> from lightning_meta.backbones import Conv4
        >>> net = FiLMBackbone(Conv4(1, 8, 28))
        >>> net.modulated, net(torch.zeros(2, 1, 28, 28)).shape
        (['encoder.1', 'encoder.5', 'encoder.9', 'encoder.13'], torch.Size([2, 8]))

    """

    def __init__(self, backbone: nn.Module, target: str | None = None, context_dim: int = 0) -> None:
        super().__init__()
        self.out_features = _out_features(backbone, "FiLMBackbone")
        self.body = backbone
        self.modulated = add_film(backbone, target, context_dim)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return self.body(x)

    def init_head(self, head: nn.Linear) -> None:
        """Initialise a learner's task head as the wrapped backbone would (its ``init_head``), if it says how."""
        init_head_like(self.body, head)
