"""Preconditioned conjugate gradients for ``A x = b`` with ``A`` symmetric positive (semi-)definite.

``A`` is given as a product ``matvec(v)``.  Besides the usual residual tolerance, CG can stop early by the
Nash-Sofer forcing rule (Nash & Sofer 1990, as in Ceres' inexact LM): with the quadratic model
``Q(x) = 1/2 x^T A x - b^T x`` stop at iteration ``i`` when ``i (Q_i - Q_{i-1}) / Q_i < eta`` -- the
model's relative decrease has stalled, so further iterations buy little for the outer solver.
It also stops on non-positive curvature ``p^T A p <= 0`` without producing NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CGResult", "pcg"]


@dataclass
class CGResult:
    """``x: (n,)`` the solution estimate; ``model_decrease = -Q(x) >= 0``; ``termination`` one of
    ``"converged"``, ``"forcing"`` (Nash-Sofer), ``"max_iterations"``, ``"non-positive curvature"``,
    ``"zero rhs"``."""

    x: Tensor
    iterations: int
    model_decrease: float
    residual_norm: float
    termination: str


def pcg(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    precond: Callable[[Tensor], Tensor] | None = None,
    max_iterations: int = 100,
    rtol: float = 1e-10,
    eta: float | None = 0.1,
) -> CGResult:
    """Solve ``A x = b`` (``b: (n,)``) from ``x0 = 0`` by preconditioned CG.

    ``precond(r)`` applies ``M^-1`` (SPD); stop when ``||r|| <= rtol ||b||``, on the Nash-Sofer rule with
    forcing ``eta`` (``None`` disables it), after ``max_iterations``, or on non-positive curvature.
    """
    x = torch.zeros_like(b)
    b_norm = float(torch.linalg.vector_norm(b))
    if b_norm == 0.0 or max_iterations <= 0:
        return CGResult(x, 0, 0.0, b_norm, "zero rhs" if b_norm == 0.0 else "max_iterations")
    r = b.clone()
    z = precond(r) if precond is not None else r
    p = z.clone()
    rz = float(torch.dot(r, z))
    q = 0.0  # Q(x_0) = 0
    r_norm = b_norm
    termination = "max_iterations"
    it = 0
    for it in range(1, max_iterations + 1):
        ap = matvec(p)
        pap = float(torch.dot(p, ap))
        if not pap > 0.0 or rz <= 0.0:  # also catches NaN
            termination = "non-positive curvature"
            it -= 1
            break
        alpha = rz / pap
        x = x + alpha * p
        r = r - alpha * ap
        q_prev, q = q, q - 0.5 * alpha * rz  # Q(x + a p) = Q(x) - a p^T r + a^2/2 p^T A p, with p^T r = r^T z
        r_norm = float(torch.linalg.vector_norm(r))
        if r_norm <= rtol * b_norm:
            termination = "converged"
            break
        if eta is not None and q < 0.0 and it * (q - q_prev) / q < eta:
            termination = "forcing"
            break
        z = precond(r) if precond is not None else r
        rz_new = float(torch.dot(r, z))
        beta = rz_new / rz
        rz = rz_new
        p = z + beta * p
    return CGResult(x, it, -q, r_norm, termination)
