"""Implicit meta-gradients (iMAML, Rajeswaran et al. 2019): conjugate gradient on Hessian-vector products."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["conjugate_gradient", "implicit_meta_gradient"]

Vec = list[Tensor]


def _dot(a: Vec, b: Vec) -> Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


def conjugate_gradient(matvec: Callable[[Vec], Vec], b: Vec, steps: int, tol: float = 1e-10) -> Vec:
    """Approximately solves ``A x = b`` for symmetric positive-definite ``A`` given as ``matvec``.

    Starts from ``x = 0`` and stops after ``steps`` iterations, or once the squared residual has
    fallen to ``tol`` times its starting value ``||b||^2`` (a relative test, so the solution scales
    with ``b`` however small ``b`` is), or on a direction of non-positive curvature
    (``p^T A p <= 0``: ``A`` is not positive definite there; the current iterate is returned).
    Exact in at most ``dim`` iterations in exact arithmetic.

    Example:
        >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]])
        >>> x = conjugate_gradient(lambda v: [A @ v[0]], [torch.tensor([1.0, 2.0])], steps=2)
        >>> torch.allclose(A @ x[0], torch.tensor([1.0, 2.0]), atol=1e-5)
        True

    """
    x = [torch.zeros_like(t) for t in b]
    r = [t.clone() for t in b]
    p = [t.clone() for t in b]
    rs = _dot(r, r)
    stop = tol * rs.item()
    for _ in range(steps):
        residual = rs.item()  # one host sync per iteration for the stopping test
        if residual <= stop or residual == 0.0:
            break
        ap = matvec(p)
        curvature = _dot(p, ap)
        if curvature.item() <= 0.0:
            break
        alpha = rs / curvature
        x = [xi + alpha * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - alpha * api for ri, api in zip(r, ap, strict=True)]
        rs_new = _dot(r, r)
        p = [ri + (rs_new / rs) * pi for ri, pi in zip(r, p, strict=True)]
        rs = rs_new
    return x


def implicit_meta_gradient(
    support_loss: Callable[[Vec], Tensor], adapted: Vec, query_grad: Vec, lam: float, cg_steps: int
) -> Vec:
    """``(I + H / lam)^{-1} g`` with ``H`` the Hessian of ``support_loss`` at ``adapted``, ``g = query_grad``.

    This is the gradient of the query loss with respect to the meta-parameters ``theta`` when
    ``adapted`` minimises ``support_loss(phi) + lam / 2 * ||phi - theta||^2`` (iMAML, eq. 6). The
    Hessian is only touched through Hessian-vector products, so memory does not grow with the
    number of inner steps that produced ``adapted``.
    """
    phi = [a.detach().requires_grad_(True) for a in adapted]
    with torch.enable_grad():
        grads = torch.autograd.grad(support_loss(phi), phi, create_graph=True)

    def matvec(v: Vec) -> Vec:
        hv = torch.autograd.grad(grads, phi, grad_outputs=v, retain_graph=True)
        return [vi + hvi / lam for vi, hvi in zip(v, hv, strict=True)]

    return [t.detach() for t in conjugate_gradient(matvec, [g.detach() for g in query_grad], cg_steps)]
