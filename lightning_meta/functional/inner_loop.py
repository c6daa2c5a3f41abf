"""The functional inner loop shared by gradient-based meta-learners.

Everything here takes parameters as a ``{name: tensor}`` dict and returns new dicts; no module
is mutated. The same code runs per task in a Python loop or batched over tasks with
``torch.func.vmap``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

from torch import Tensor, nn
from torch.func import functional_call, grad

__all__ = ["Params", "inner_adapt", "bn_policy", "BNPolicy", "sgd_step"]

Params = dict[str, Tensor]
BNPolicy = Literal["transductive", "frozen"]
LossFn = Callable[[Tensor, Tensor], Tensor]


def sgd_step(params: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: float | Mapping[str, Tensor]) -> Params:
    """``params - lr * grads``; ``lr`` may be a float or a per-parameter mapping (Meta-SGD)."""
    if isinstance(lr, Mapping):
        return {k: p - lr[k] * grads[k] for k, p in params.items()}
    return {k: p - lr * grads[k] for k, p in params.items()}


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
) -> Params:
    """Runs ``steps`` gradient steps of ``loss_fn(net(x), y)`` on ``params`` and returns the fast weights.

    Gradients come from :func:`torch.func.grad`, so the result stays differentiable with respect
    to the incoming ``params`` (second-order MAML) unless ``first_order`` is set, in which case
    every inner gradient is detached (first-order MAML: the outer gradient flows only through the
    identity path ``theta' = theta - lr * stop_grad(g)``). Works inside ``torch.func.vmap``.

    Args:
        net: the module evaluated with :func:`torch.func.functional_call`.
        params: the parameters that adapt.
        buffers: buffers (and any parameters that do not adapt, see ``frozen``).
        x, y: support inputs and targets of one task.
        loss_fn: ``loss_fn(outputs, y) -> scalar``.
        lr: inner learning rate: a float, a per-parameter mapping of tensors (Meta-SGD), or a
            callable ``lr(step)`` returning either (per-step rates, MAML++).
        steps: number of inner steps (0 returns ``params`` unchanged).
        first_order: detach the inner gradients.
        frozen: parameters passed to the module but not adapted (e.g. the body in ANIL).
        callback: called as ``callback(step, params)`` after every step (monitoring).

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
        return loss_fn(functional_call(net, (p, fixed), (x,)), y)

    fast = dict(params)
    for step in range(steps):
        g = grad(support_loss)(fast)
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        fast = sgd_step(fast, g, lr(step) if callable(lr) else lr)
        if callback is not None:
            callback(step, fast)
    return fast


def _norm_layers(net: nn.Module) -> Iterator[nn.modules.batchnorm._BatchNorm]:
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            yield m


@contextlib.contextmanager
def bn_policy(net: nn.Module, policy: BNPolicy) -> Iterator[None]:
    """Sets how BatchNorm layers behave inside a functional inner loop, restoring them afterwards.

    - ``transductive``: every task normalises with its own batch statistics, in training and in
      evaluation, and running statistics are never updated (MAML's original behaviour; the only
      choice that is safe under ``vmap``).
    - ``frozen``: running statistics are used and never updated (useful with a pre-trained body).
    """
    if policy not in ("transductive", "frozen"):
        raise ValueError(f"bn_policy={policy!r} is not supported; use 'transductive' or 'frozen'")
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
        for m, (training, track) in zip(layers, saved):
            m.train(training)
            m.track_running_stats = track
