"""Implicit meta-gradients (iMAML, Rajeswaran et al. 2019): conjugate gradient on Hessian-vector products."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_meta.errors import require_non_negative

__all__ = ["CGInfo", "conjugate_gradient", "implicit_meta_gradient"]

Vec = list[Tensor]


def _dot(a: Vec, b: Vec) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


@dataclass(frozen=True)
class CGInfo:
    """How a :func:`conjugate_gradient` solve ended.

    Attributes:
        iterations: matrix-vector products computed.
        relative_residual: ``||b - A x|| / ||b||`` of the returned ``x`` (0 when ``b`` is 0).
        stop: ``"tol"`` (the residual reached ``tol``), ``"steps"`` (the iteration budget ran out),
            ``"curvature"`` (a direction with ``p^T A p <= 0``: ``A`` is not positive definite) or
            ``"zero"`` (``b`` is 0).

    """

    iterations: int
    relative_residual: float
    stop: str


def conjugate_gradient(matvec: Callable[[Vec], Vec], b: Vec, steps: int, tol: float = 1e-5,
                       return_info: bool = False) -> Vec | tuple[Vec, CGInfo]:
    """Approximately solves ``A x = b`` for symmetric positive-definite ``A`` given as ``matvec``.

    Starts from ``x = 0`` and stops after ``steps`` iterations, once the residual norm has fallen
    to ``tol`` times its starting value ``||b||`` (a relative test, so the solution scales with
    ``b`` however small ``b`` is; a ``tol`` below the dtype's machine epsilon, such as 0, means
    that epsilon: the solve runs to working precision), or on a direction of
    non-positive curvature (``p^T A p <= 0``: ``A`` is not positive definite there; the current
    iterate is returned). Exact in at most ``dim`` iterations in exact arithmetic. With
    ``return_info=True`` it returns ``(x, CGInfo)``.

    Args:
        matvec: ``v -> A v`` on lists of tensors.
        b: the right-hand side, a list of tensors.
        steps: the most iterations (each one ``matvec`` call).
        tol: relative residual norm at which to stop.
        return_info: also return a :class:`CGInfo`.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> x = conjugate_gradient(lambda v: [A @ v[0]], [torch.tensor([1.0, 2.0])], steps=2)
        >>> torch.allclose(A @ x[0], torch.tensor([1.0, 2.0]), atol=1e-5)
        True
        >>> x, info = conjugate_gradient(lambda v: [A @ v[0]], [torch.tensor([1.0, 2.0])], steps=1, return_info=True)
        >>> info.iterations, info.stop
        (1, 'steps')

    """
    tol = require_non_negative("tol", tol, "the relative residual at which to stop; 0 solves to working precision")
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r)
    start = rs.item()
    floor = max(tol, torch.finfo(b[0].dtype).eps) if b[0].is_floating_point() else tol
    stop = floor * floor * start
    done, reason = 0, ("zero" if start == 0.0 else None)
    while reason is None:
        if rs.item() <= stop:  # one host sync per iteration for the stopping test
            reason = "tol"
        elif done == steps:
            reason = "steps"
        else:
            ap = matvec(p)
            done += 1
            curvature = _dot(p, ap)
            if curvature.item() <= 0.0:
                reason = "curvature"
                break
            alpha = rs / curvature
            x = [xi + alpha * pi for xi, pi in zip(x, p, strict=True)]
            r = [ri - alpha * api for ri, api in zip(r, ap, strict=True)]
            rs_new = _dot(r, r)
            p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p, strict=True)]
            rs = rs_new
    if not return_info:
        return x
    relative = math.sqrt(rs.item() / start) if start > 0.0 else 0.0
    return x, CGInfo(iterations=done, relative_residual=relative, stop=reason)


def implicit_meta_gradient(
    support_loss: Callable[[Vec], Tensor], adapted: Vec, query_grad: Vec, lam: float, cg_steps: int,
    tol: float = 1e-5, return_info: bool = False, damping: float = 0.0, lam_damping: float = 0.0,
) -> Vec | tuple[Vec, CGInfo]:
    """``(I + H / lam)^{-1} g`` with ``H`` the Hessian of ``support_loss`` at ``adapted``, ``g = query_grad``.

    This is the gradient of the query loss with respect to the meta-parameters ``theta`` when
    ``adapted`` minimises ``support_loss(phi) + lam / 2 * ||phi - theta||^2`` (iMAML, eq. 6). The
    Hessian is only touched through Hessian-vector products, so memory does not grow with the
    number of inner steps that produced ``adapted``.

    Args:
        support_loss: the (unregularised) support loss as a function of the adapted tensors.
        adapted: the adapted tensors ``phi``.
        query_grad: ``g``, the gradient of the query loss at ``phi`` (one tensor per entry of ``adapted``).
        lam: the proximal strength lambda.
        cg_steps: conjugate-gradient iterations.
        tol: relative residual of ``(I + H / lam) x = g`` at which the solve stops (see
            :func:`conjugate_gradient`).
        return_info: also return the solve's :class:`CGInfo`.
        damping: solve ``((1 + damping) I + H / (lam + lam_damping)) x = g`` instead, the damped
            system of the iMAML authors' code (which uses ``damping=1``); 0 is the paper's.
        lam_damping: added to ``lam`` in the system's Hessian term (the authors' code: 10; 0 is the paper's).

    Example:
        >>> a = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)  # H of 0.5 p^T A p
        >>> g = [torch.tensor([1.0, -1.0], dtype=torch.float64)]
        >>> x = implicit_meta_gradient(lambda p: 0.5 * p[0] @ a @ p[0], [torch.zeros(2, dtype=torch.float64)], g,
        ...                            lam=1.0, cg_steps=2, tol=0.0)
        >>> torch.allclose(x[0], torch.linalg.solve(torch.eye(2, dtype=torch.float64) + a, g[0]))
        True

    """
    phi = [a.detach().requires_grad_(True) for a in adapted]
    with torch.enable_grad():
        grads = torch.autograd.grad(support_loss(phi), phi, create_graph=True)

    scale, curvature = 1.0 + damping, lam + lam_damping

    def matvec(v: Vec) -> Vec:
        hv = torch.autograd.grad(grads, phi, grad_outputs=v, retain_graph=True)
        return [scale * vi + hvi / curvature for vi, hvi in zip(v, hv, strict=True)]

    x, info = conjugate_gradient(matvec, [g.detach() for g in query_grad], cg_steps, tol=tol, return_info=True)
    x = [t.detach() for t in x]
    return (x, info) if return_info else x
