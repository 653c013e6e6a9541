"""One call for the symmetric positive (semi-)definite solves of the second-order solvers.

``solve_spd(b, matrix=A)`` factors a small dense ``A`` (Cholesky; when ``A`` is singular, the
minimum-norm solution through ``eigh`` with eigenvalues below ``n eps max|lambda|`` dropped);
``solve_spd(b, matvec=v -> A v)`` runs matrix-free PCG (:func:`diffrender.linalg.cg.pcg`). Either way the
result carries the solution, the iterations and the decrease of ``Q(x) = 1/2 x^T A x - b^T x``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from diffrender.linalg.cg import pcg

__all__ = ["LinearSolve", "solve_spd"]


@dataclass
class LinearSolve:
    """``x: (n,)``; ``iterations`` (0 for a factorization); ``model_decrease = -Q(x)``; ``termination``:
    ``"cholesky"``, ``"min-norm"`` (singular ``A``) or the CG reason."""

    x: Tensor
    iterations: int
    model_decrease: float
    termination: str


def solve_spd(
    b: Tensor,
    *,
    matrix: Tensor | None = None,
    matvec: Callable[[Tensor], Tensor] | None = None,
    precond: Callable[[Tensor], Tensor] | None = None,
    max_iterations: int = 100,
    rtol: float = 1e-10,
    eta: float | None = 0.1,
) -> LinearSolve:
    """Solve ``A x = b`` (``b: (n,)``) with ``A`` given densely (``matrix: (n, n)``) or as a product."""
    if (matrix is None) == (matvec is None):
        raise ValueError("solve_spd: give exactly one of matrix= or matvec=")
    if matrix is not None:
        chol, info = torch.linalg.cholesky_ex(matrix)
        if int(info) == 0 and bool(torch.isfinite(chol).all()):
            x = torch.cholesky_solve(b[:, None], chol)[:, 0]
            how = "cholesky"
        else:
            evals, evecs = torch.linalg.eigh(matrix)
            cutoff = evals.abs().max() * matrix.shape[0] * torch.finfo(matrix.dtype).eps
            inv = torch.where(evals > cutoff, 1 / evals.clamp_min(cutoff), torch.zeros_like(evals))
            x = evecs @ (inv * (evecs.T @ b))
            how = "min-norm"
        return LinearSolve(x, 0, float(b @ x - 0.5 * x @ (matrix @ x)), how)
    res = pcg(matvec, b, precond=precond, max_iterations=max_iterations, rtol=rtol, eta=eta)
    return LinearSolve(res.x, res.iterations, res.model_decrease, res.termination)
