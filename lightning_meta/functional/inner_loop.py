"""The functional inner loop shared by gradient-based meta-learners.

Everything here takes parameters as a ``{name: tensor}`` dict and returns new dicts; no module
is mutated. The same code runs per task in a Python loop or batched over tasks with
``torch.func.vmap``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

__all__ = [
    "BNPolicy",
    "PER_STEP_POLICIES",
    "Params",
    "PerStepBatchNorm",
    "bn_policy",
    "checkpointed",
    "convert_per_step_norm",
    "inner_adapt",
    "norm_step",
    "sgd_step",
]

Params = dict[str, Tensor]
BNPolicy = Literal["transductive", "frozen", "per_step", "per_step_transductive"]
PER_STEP_POLICIES = ("per_step", "per_step_transductive")
LossFn = Callable[[Tensor, Tensor], Tensor]


def sgd_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: float | Mapping[str, Tensor]) -> Params:
    """``params - lr * grads``; ``lr`` may be a float or a per-parameter mapping (Meta-SGD)."""
    if isinstance(lr, Mapping):
        return {k: p - lr[k] * grads[k] for k, p in params.items()}
    return {k: p - lr * grads[k] for k, p in params.items()}


# ------------------------------------------------------------------ recomputation and checkpointing
_state = threading.local()


def _recomputing() -> bool:
    """Tell whether :func:`checkpointed` is re-running a forward during the backward pass."""
    return getattr(_state, "recomputing", False)


def _module_modes(module: nn.Module | None) -> list[tuple[nn.Module, dict[str, Any]]]:
    """Record the mode attributes a forward depends on: ``training``, BatchNorm and per-step BatchNorm settings."""
    if module is None:
        return []
    modes = []
    for m in module.modules():
        mode: dict[str, Any] = {"training": m.training}
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            mode["track_running_stats"] = m.track_running_stats
        elif isinstance(m, PerStepBatchNorm):
            mode["step"] = m.step
            mode["eval_running_stats"] = m.eval_running_stats
        modes.append((m, mode))
    return modes


def _apply_modes(modes: list[tuple[nn.Module, dict[str, Any]]]) -> None:
    for m, mode in modes:
        for k, v in mode.items():
            setattr(m, k, v)


class _RecomputeContext:
    """Recomputation context: marks it, and puts ``module`` back in the modes it had during the forward.

    The backward runs after context managers such as :func:`bn_policy` have exited, so without
    this a recomputed forward would see other BatchNorm settings than the original one.
    Re-enterable, since one checkpoint may be recomputed more than once.
    """

    def __init__(self, module: nn.Module | None) -> None:
        self._forward_modes = _module_modes(module)
        self._module = module
        self._saved: list[tuple[bool, list[tuple[nn.Module, dict[str, Any]]]]] = []

    def __enter__(self) -> None:
        self._saved.append((_recomputing(), _module_modes(self._module)))
        _state.recomputing = True
        _apply_modes(self._forward_modes)

    def __exit__(self, *exc: object) -> None:
        flag, modes = self._saved.pop()
        _apply_modes(modes)
        _state.recomputing = flag


def checkpointed(fn: Callable[..., Any], *args: Any, module: nn.Module | None = None) -> Any:
    """``fn(*args)`` under non-reentrant activation checkpointing.

    Only the inputs are kept for the backward pass; ``fn`` runs again when the backward needs its
    activations. Uses ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`` (reentrant
    checkpointing breaks under ``torch.autograd.grad``). While ``fn`` is being recomputed,
    :class:`PerStepBatchNorm` layers do not update their running statistics a second time.
    ``fn`` may call ``torch.autograd.grad`` (``create_graph=True``) but not ``torch.func``
    transforms: those refuse the saved-tensor hooks that checkpointing relies on (PyTorch 2.13).

    Pass the ``module`` that ``fn`` runs: the recomputation happens during the outer backward,
    after context managers like :func:`bn_policy` and :func:`norm_step` have restored the module,
    so its train/eval and BatchNorm modes at the time of the forward are recorded and put back
    while ``fn`` is recomputed.

    Example:
        >>> w = torch.randn(3, requires_grad=True)
        >>> y = checkpointed(lambda v: (v.sin() * 2).sum(), w)
        >>> torch.allclose(torch.autograd.grad(y, w)[0], 2 * w.cos())
        True

    """
    return _torch_checkpoint(fn, *args, use_reentrant=False,
                             context_fn=lambda: (contextlib.nullcontext(), _RecomputeContext(module)))


# ------------------------------------------------------------------ per-step BatchNorm (MAML++)
class PerStepBatchNorm(nn.Module):
    """BatchNorm with its own affine weights and running statistics for every inner step (MAML++).

    Antoniou et al. (2019) give each inner step ``s`` its own BatchNorm bias and scale (BNWB) and
    its own running statistics (BNRS). This layer stores them as ``[steps, C]`` tensors and uses
    row ``min(step, steps - 1)``, where ``step`` is set by :func:`norm_step` (the inner loop does
    it), so steps beyond the trained ones (evaluation with more inner steps) reuse the last row.

    - Training: normalises with the batch statistics and updates row ``step`` of the running
      statistics with
      ``momentum`` (unbiased variance, as :class:`torch.nn.BatchNorm2d`); the recomputation of a
      :func:`checkpointed` forward does not update them again. The update is in place,
      so it cannot run under ``torch.func`` transforms; the inner loop switches to
      ``torch.autograd.grad`` when a layer is training.
    - Evaluation: normalises with row ``step`` of the running statistics when
      ``eval_running_stats`` is true (the paper's BNRS), else with the batch statistics (the
      released MAML++ code, which always passes ``training=True``).

    Args:
        num_features: channels ``C`` (dimension 1 of the input).
        steps: number of per-step rows (the training inner steps).
        eps, momentum: as in :class:`torch.nn.BatchNorm2d` (``momentum`` must be a float).
        affine: learn per-step weights and biases.
        eval_running_stats: use the running statistics in evaluation mode.

    Example:
        >>> bn = PerStepBatchNorm(4, steps=3)
        >>> with norm_step(bn, 1):
        ...     out = bn(torch.randn(8, 4, 5, 5))
        >>> bn.weight.shape, bool(bn.running_mean[0].eq(0).all()), bool(bn.running_mean[1].ne(0).any())
        (torch.Size([3, 4]), True, True)

    """

    def __init__(self, num_features: int, steps: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 eval_running_stats: bool = True) -> None:
        super().__init__()
        if steps < 1:
            raise ValueError(f"PerStepBatchNorm needs steps >= 1, got {steps}")
        if not isinstance(momentum, float) or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"PerStepBatchNorm needs a float momentum in [0, 1], got {momentum!r}")
        self.num_features = num_features
        self.steps = steps
        self.eps = eps
        self.momentum = momentum
        self.eval_running_stats = eval_running_stats
        self.step = 0
        if affine:
            self.weight = nn.Parameter(torch.ones(steps, num_features))
            self.bias = nn.Parameter(torch.zeros(steps, num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(steps, num_features))
        self.register_buffer("running_var", torch.ones(steps, num_features))

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm, steps: int,
                       eval_running_stats: bool = True) -> PerStepBatchNorm:
        """Build a per-step copy of ``bn``: every row starts from its affine weights and running statistics.

        ``bn.momentum=None`` (a cumulative average in PyTorch) becomes the default 0.1: per-step
        statistics are exponential moving averages only.
        """
        momentum = 0.1 if bn.momentum is None else float(bn.momentum)
        new = cls(bn.num_features, steps, eps=bn.eps, momentum=momentum, affine=bn.affine,
                  eval_running_stats=eval_running_stats)
        ref = next((t for t in (bn.weight, bn.bias, bn.running_mean) if t is not None), None)
        new = new.to(device=ref.device if ref is not None else None,
                     dtype=ref.dtype if ref is not None else None)
        if bn.affine and bn.weight is None:  # an offset without a scale (Conv4 norm_scale=False)
            new.register_parameter("weight", None)
        with torch.no_grad():
            if bn.affine:
                if bn.weight is not None:
                    new.weight.copy_(bn.weight.detach().expand(steps, -1))
                new.bias.copy_(bn.bias.detach().expand(steps, -1))
            if bn.running_mean is not None:
                new.running_mean.copy_(bn.running_mean.expand(steps, -1))
                new.running_var.copy_(bn.running_var.expand(steps, -1))
        new.train(bn.training)
        return new

    def extra_repr(self) -> str:  # noqa: D102
        return (f"{self.num_features}, steps={self.steps}, eps={self.eps}, momentum={self.momentum}, "
                f"eval_running_stats={self.eval_running_stats}")

    def forward(self, x: Tensor) -> Tensor:
        """Normalises ``[b, C, ...]`` with the statistics and affine weights of the current step."""
        s = min(self.step, self.steps - 1)
        b = None if self.bias is None else self.bias[s]
        # an offset without a scale: a constant scale of ones, which batch_norm's double backward needs
        w = (None if b is None else torch.ones_like(b)) if self.weight is None else self.weight[s]
        if not self.training and self.eval_running_stats:
            return F.batch_norm(x, self.running_mean[s], self.running_var[s], w, b, False, 0.0, self.eps)
        if self.training and not _recomputing():
            with torch.no_grad():
                dims = [0, *range(2, x.dim())]
                xd = x.detach()
                if xd.dtype in (torch.float16, torch.bfloat16):  # autocast: statistics in float32, as BatchNorm's
                    xd = xd.float()
                n = xd.numel() // xd.shape[1]
                mean = xd.mean(dims)
                var = xd.var(dims, correction=1 if n > 1 else 0)
                self.running_mean[s].mul_(1 - self.momentum).add_(mean, alpha=self.momentum)
                self.running_var[s].mul_(1 - self.momentum).add_(var, alpha=self.momentum)
        return F.batch_norm(x, None, None, w, b, True, 0.0, self.eps)


def per_step_layers(net: nn.Module) -> list[PerStepBatchNorm]:
    """Return the :class:`PerStepBatchNorm` layers of ``net``, in module order."""
    return [m for m in net.modules() if isinstance(m, PerStepBatchNorm)]


@contextlib.contextmanager
def norm_step(net: nn.Module | Sequence[PerStepBatchNorm], step: int) -> Iterator[None]:
    """Select inner step ``step`` in every :class:`PerStepBatchNorm` of ``net`` (restored afterwards).

    ``net`` may be a module or an already collected list of layers. A no-op without such layers.
    """
    layers = per_step_layers(net) if isinstance(net, nn.Module) else list(net)
    saved = [m.step for m in layers]
    for m in layers:
        m.step = step
    try:
        yield
    finally:
        for m, s in zip(layers, saved, strict=True):
            m.step = s


def convert_per_step_norm(net: nn.Module, steps: int, eval_running_stats: bool = True) -> list[str]:
    """Replace every ``nn.BatchNorm{1,2,3}d`` of ``net`` in place by a :class:`PerStepBatchNorm`.

    Returns the qualified names of the replaced layers (empty when ``net`` has no BatchNorm).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        >>> convert_per_step_norm(net, steps=5)
        ['1']
        >>> net[1].weight.shape
        torch.Size([5, 4])

    """
    replaced = []
    for parent_name, parent in list(net.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                new = PerStepBatchNorm.from_batchnorm(child, steps, eval_running_stats)
                _move_attachments(child, new)
                setattr(parent, child_name, new)
                replaced.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return replaced


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _move_attachments(old: nn.Module, new: nn.Module) -> None:
    """Carry the children and forward hooks of a replaced layer over to its replacement.

    A FiLM ``modulation`` child and its forward hook (:func:`lightning_meta.backbones.add_film`)
    then keep acting after the layer becomes a :class:`PerStepBatchNorm`.
    """
    for name, sub in old.named_children():
        new.add_module(name, sub)
    for attr in _HOOK_DICTS:
        src, dst = getattr(old, attr, None), getattr(new, attr, None)
        if src and dst is not None:
            dst.update(src)


def _compiling() -> bool:
    """Whether ``torch.compile`` is tracing: its AOT autograd cannot run ``autograd.grad``'s double backward."""
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling and is_compiling())


def inside_func_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ...) is active around this call.

    ``True`` on a PyTorch that cannot tell, so that callers keep the transform-safe path.
    """
    level = getattr(torch._C._functorch, "maybe_current_level", None)
    return True if level is None else level() is not None


def _autograd_step(
    support_loss: Callable[[Params], Tensor],
    fast: Params,
    lr: float | Mapping[str, Tensor],
    first_order: bool,
    use_checkpoint: bool,
    layers: Sequence[PerStepBatchNorm],
    step: int,
    net: nn.Module,
) -> Params:
    """One inner step with ``torch.autograd.grad`` (optionally checkpointed as a whole)."""
    names = list(fast)

    def one_step(*tensors: Tensor) -> tuple[Tensor, ...]:
        # second order only where an outer graph exists: weights that do not require grad (evaluation,
        # detached meta-parameters) get plain gradients, as torch.func.grad gives them
        create_graph = not first_order and torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        with torch.enable_grad():
            leaves = [t if t.requires_grad else t.detach().requires_grad_(True) for t in tensors]
            with norm_step(layers, step):
                loss = support_loss(dict(zip(names, leaves, strict=True)))
            grads = torch.autograd.grad(loss, leaves, create_graph=create_graph, allow_unused=True)
        # a weight the loss does not use gets a zero gradient, as torch.func.grad (the vmap engine) gives it
        grads = tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors, strict=True))
        new = sgd_step(dict(zip(names, tensors, strict=True)), dict(zip(names, grads, strict=True)), lr)
        return tuple(new[k] for k in names)

    tensors = tuple(fast.values())
    if use_checkpoint and not first_order and torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out = checkpointed(one_step, *tensors, module=net)
    else:
        out = one_step(*tensors)
    return dict(zip(names, out, strict=True))


def inner_adapt(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    lr: float | Mapping[str, Tensor] | Callable[[int], float | Mapping[str, Tensor]],
    steps: int,
    first_order: bool = False,
    frozen: Mapping[str, Tensor] | None = None,
    callback: Callable[[int, Params], None] | None = None,
    checkpoint: bool = False,
    penalty: Callable[[Params], Tensor] | None = None,
) -> Params:
    """Run ``steps`` gradient steps of ``loss_fn(net(x), y)`` on ``params`` and return the fast weights.

    Gradients come from :func:`torch.func.grad`, so the result stays differentiable with respect
    to the incoming ``params`` (second-order MAML) unless ``first_order`` is set, in which case
    every inner gradient is detached (first-order MAML: the outer gradient flows only through the
    identity path ``theta' = theta - lr * stop_grad(g)``). Works inside ``torch.func.vmap``.

    Two gradient engines give the same numbers (tested): :func:`torch.func.grad`, used inside a
    ``torch.func`` transform such as ``vmap`` (the one that composes with them), and
    ``torch.autograd.grad(create_graph=not first_order)``, used everywhere else except under
    ``torch.compile`` (whose AOT autograd has no double backward): outside any transform it skips
    ``torch.func``'s per-operation wrapping (a few percent on a CPU, ``benchmarks/inner_engine.py``)
    and lets non-reentrant checkpointing (e.g. ``ViT(checkpoint=True)``) run in the inner loop. The
    autograd engine is also what ``checkpoint``, a training :class:`PerStepBatchNorm` layer (its
    in-place running-statistics update is not allowed under ``torch.func`` transforms) and DeepSpeed
    ZeRO-3 parameters in ``frozen``/``buffers`` (gathered by module hooks that ``torch.func``
    transforms cannot run) need; none of these cases works under ``vmap``, and callers refuse that
    combination.

    With ``checkpoint`` each second-order step (forward, inner backward, update) runs under
    :func:`checkpointed`: the outer graph keeps only each step's input weights and recomputes the
    step during the outer backward, so memory grows by one copy of the adapted weights per step
    instead of one step's activations and inner-gradient graph. First-order steps keep nothing
    for the outer backward, so ``checkpoint`` changes nothing there.

    Args:
        net: the module evaluated with :func:`torch.func.functional_call`.
        params: the parameters that adapt.
        buffers: buffers (and any parameters that do not adapt, see ``frozen``).
        x: support inputs of one task.
        y: support targets of one task.
        loss_fn: ``loss_fn(outputs, y) -> scalar``.
        lr: inner learning rate: a float, a per-parameter mapping of tensors (Meta-SGD), or a
            callable ``lr(step)`` returning either (per-step rates, MAML++).
        steps: number of inner steps (0 returns ``params`` unchanged).
        first_order: detach the inner gradients.
        frozen: parameters passed to the module but not adapted (e.g. the body in ANIL).
        callback: called as ``callback(step, params)`` after every step (monitoring), with
            :func:`norm_step` set to ``step``.
        checkpoint: non-reentrant activation checkpointing of every second-order step.
        penalty: a term ``penalty(fast_weights)`` added to the support loss at every step (iMAML's
            proximal regulariser ``lambda / 2 * ||phi - theta||^2``).

    Example:
        >>> net = nn.Linear(2, 1)
        >>> p = dict(net.named_parameters())
        >>> x, y = torch.randn(8, 2), torch.randn(8, 1)
        >>> fast = inner_adapt(net, p, {}, x, y, nn.functional.mse_loss, lr=0.1, steps=2)
        >>> sorted(fast), fast["weight"].requires_grad
        (['bias', 'weight'], True)

    """
    fixed = dict(buffers)
    if frozen:
        fixed.update(frozen)

    def support_loss(p: Params) -> Tensor:
        loss = loss_fn(functional_call(net, (p, fixed), (x,)), y)
        return loss if penalty is None else loss + penalty(p)

    layers = per_step_layers(net)
    # DeepSpeed ZeRO-3 parameters (tagged ``ds_id``) are gathered by module hooks that must not run
    # under torch.func transforms (segfaults, functorch asserts); autograd.grad runs them as usual
    zero3 = any(hasattr(t, "ds_id") for t in fixed.values())
    use_autograd = checkpoint or zero3 or any(m.training for m in layers) or not (
        inside_func_transform() or _compiling())
    fast = dict(params)
    for step in range(steps):
        step_lr = lr(step) if callable(lr) else lr
        if use_autograd:
            fast = _autograd_step(support_loss, fast, step_lr, first_order, checkpoint, layers, step, net)
        else:
            with norm_step(layers, step):
                g = grad(support_loss)(fast)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            fast = sgd_step(fast, g, step_lr)
        if callback is not None:
            with norm_step(layers, step):
                callback(step, fast)
    return fast


def _norm_layers(net: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield m


@contextlib.contextmanager
def bn_policy(net: nn.Module, policy: BNPolicy) -> Iterator[None]:
    """Set how BatchNorm layers behave inside a functional inner loop, restoring them afterwards.

    - ``transductive``: every task normalises with its own batch statistics, in training and in
      evaluation, and running statistics are never updated (MAML's original behaviour; the only
      choice that is safe under ``vmap``).
    - ``frozen``: running statistics are used and never updated (useful with a pre-trained body).
    - ``per_step`` / ``per_step_transductive`` (MAML++ BNRS + BNWB): the network's BatchNorm
      layers must already be :class:`PerStepBatchNorm` (see :func:`convert_per_step_norm`); they
      follow the module's train/eval mode, collect per-step running statistics in training, and
      in evaluation normalise with them (``per_step``) or with the batch statistics
      (``per_step_transductive``, the released MAML++ code). Needs the per-task loop, not ``vmap``.
    """
    if policy not in ("transductive", "frozen", *PER_STEP_POLICIES):
        raise ValueError(
            f"bn_policy={policy!r} is not supported; "
            "use 'transductive', 'frozen', 'per_step' or 'per_step_transductive'"
        )
    if policy in PER_STEP_POLICIES:
        with _per_step_policy(net, policy):
            yield
        return
    layers = list(_norm_layers(net))
    saved = [(m.training, m.track_running_stats) for m in layers]
    try:
        for m in layers:
            if policy == "transductive":
                m.train(True)
                m.track_running_stats = False  # batch statistics, no in-place running-stat update
            else:
                if m.running_mean is None:
                    raise ValueError(
                        f"bn_policy='frozen' needs running statistics but {type(m).__name__} has none; "
                        "use bn_policy='transductive'"
                    )
                m.train(False)
        yield
    finally:
        for m, (training, track) in zip(layers, saved, strict=True):
            m.train(training)
            m.track_running_stats = track


@contextlib.contextmanager
def _per_step_policy(net: nn.Module, policy: BNPolicy) -> Iterator[None]:
    plain = [type(m).__name__ for m in _norm_layers(net)]
    layers = per_step_layers(net)
    if plain or not layers:
        raise ValueError(
            f"bn_policy={policy!r} needs every BatchNorm layer converted to PerStepBatchNorm "
            f"(found {len(layers)} converted, unconverted: {plain}); call convert_per_step_norm(net, steps) first"
        )
    saved = [m.eval_running_stats for m in layers]
    try:
        for m in layers:
            m.eval_running_stats = policy == "per_step"
        yield
    finally:
        for m, keep in zip(layers, saved, strict=True):
            m.eval_running_stats = keep
