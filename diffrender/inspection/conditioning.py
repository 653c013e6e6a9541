"""Conditioning of the Gauss-Newton matrix ``J~^T J~`` and of the preconditioned operator that PCG sees.

Extreme eigenvalues come from Lanczos (:func:`diffrender.linalg.lanczos.lanczos`) on products only: each
step is one JVP and one VJP (plus one preconditioner application).  The largest eigenvalue converges in a
few steps; the smallest one converges slowly when the spectrum is dense near zero, and until it does the
smallest Ritz value is an upper bound on ``lambda_min`` (Ritz values interlace), so ``cond`` is then a lower
bound -- ``converged`` says which.  An eigenvalue below ``rank_rtol * lambda_max`` is reported as a null
direction (rank deficiency: a gauge freedom, or parameters the residuals do not see), and ``cond`` is
``inf`` instead of a huge number made of rounding errors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffrender.inspection.jacobian import ProductOperator
from diffrender.linalg.lanczos import lanczos
from diffrender.problem import PreconditionerInfo, Problem

__all__ = ["Conditioning", "conditioning", "default_rank_rtol", "solver_preconditioner"]


def default_rank_rtol(dtype: torch.dtype) -> float:
    """Eigenvalues below this fraction of the largest count as zero: ``10 eps`` of the products' dtype.
    Products of ``J~^T J~`` carry absolute errors of order ``eps ||J~||^2``, so smaller eigenvalues are
    rounding noise (Ceres' covariance uses 1e-14 in double precision, about 45 eps; in float32, 100 eps
    would already call the cow_shape fit's well-defined lambda_min / lambda_max = 2.6e-6 zero)."""
    return 10 * torch.finfo(dtype).eps


@dataclass
class Conditioning:
    """Extreme eigenvalues of ``J~^T J~`` (or of ``M^-1 J~^T J~``) from Lanczos.

    ``smallest_values: (k,)`` ascending and ``smallest_vectors: (n, k)`` (unit norm): the directions the
    residuals constrain least; ``null_directions: (n, d)`` those among them below ``rank_rtol * eig_max``.
    ``cond = eig_max / eig_min`` (``inf`` when rank deficient); ``converged``: the extreme Ritz pairs met the
    tolerance (or the Krylov space was exhausted), else ``eig_min`` is only an upper bound.
    ``preconditioner``: ``"none"``, ``"jacobi"`` or ``"problem"`` (the problem's own factory).
    """

    eig_min: float
    eig_max: float
    cond: float
    rank_deficient: bool
    smallest_values: Tensor
    smallest_vectors: Tensor
    null_directions: Tensor
    converged: bool
    steps: int
    products: int
    seconds: float
    preconditioner: str

    def scalars(self) -> dict[str, float]:
        """``eig_min``, ``eig_max``, ``cond`` (for logging)."""
        return {"eig_min": self.eig_min, "eig_max": self.eig_max, "cond": self.cond}


def solver_preconditioner(problem: Problem, x: dict[str, Tensor], ctx: Any, op: ProductOperator, *,
                          dense_threshold: int = 64, probes: int = 16,
                          seed: int = 0) -> tuple[Callable[[Tensor], Tensor], str]:
    """``M^-1`` as the second-order solvers' CG builds it at ``x``, with zero damping: the problem's factory
    fed ``diag(J~^T J~)`` (exact from ``n`` JVPs up to ``dense_threshold``, else ``probes`` Hutchinson VJPs,
    as the solvers do), or Jacobi ``1 / diag`` when it has none.  Returns ``(apply, "problem" | "jacobi")``.

    Unlike the solver (whose damping keeps the diagonal positive), Jacobi floors the diagonal at
    ``eps * max(diag)``, so a parameter the residuals do not see keeps a finite scale.
    """
    if op.n <= dense_threshold:
        diag = op.diag_exact()
    else:
        diag = op.diag_hutchinson(probes, torch.Generator().manual_seed(seed))
    layout = problem.layout(x)
    apply = problem.make_preconditioner(PreconditionerInfo(x, ctx, layout, diag, torch.zeros_like(diag)))
    if apply is not None:
        return apply, "problem"
    floor = float(diag.max()) * torch.finfo(diag.dtype).eps if diag.numel() else 0.0
    inv = 1.0 / diag.clamp_min(max(floor, torch.finfo(diag.dtype).tiny))
    return (lambda v: inv * v), "jacobi"


def conditioning(op: ProductOperator, *, precond: Callable[[Tensor], Tensor] | None = None,
                 preconditioner: str | None = None, steps: int = 30, want: int = 3, tol: float = 1e-6,
                 rank_rtol: float | None = None, seed: int = 0) -> Conditioning:
    """Extreme eigenvalues, condition number and least-constrained directions of ``J~^T J~`` (of
    ``M^-1 J~^T J~`` when ``precond`` applies ``M^-1``) by at most ``steps`` Lanczos steps, stopping early
    once the ``want`` smallest and largest Ritz pairs have relative residual ``<= tol``.  The start vector is
    drawn from a CPU generator seeded with ``seed``, so results do not depend on the global RNG."""
    t0 = time.perf_counter()
    x0 = op.x0
    start = torch.randn(op.n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    res = lanczos(op.jtj, start.to(device=x0.device, dtype=x0.dtype), steps, precond=precond, want=want,
                  tol=tol)
    rtol = default_rank_rtol(x0.dtype) if rank_rtol is None else float(rank_rtol)
    values = res.values
    eig_max = float(values[-1])
    eig_min = float(values[0])
    k = min(want, values.numel())
    small_vals, small_vecs = res.smallest(k)
    norms = torch.linalg.vector_norm(small_vecs, dim=0).clamp_min(torch.finfo(small_vecs.dtype).tiny)
    small_vecs = small_vecs / norms
    null = values <= rtol * max(eig_max, 0.0)
    rank_deficient = bool(null.any()) or eig_max <= 0
    null_vecs = res.vectors[:, null]
    if null_vecs.numel():
        null_vecs = null_vecs / torch.linalg.vector_norm(null_vecs, dim=0)
    cond = math.inf if rank_deficient else eig_max / eig_min
    return Conditioning(eig_min=eig_min, eig_max=eig_max, cond=cond, rank_deficient=rank_deficient,
                        smallest_values=small_vals, smallest_vectors=small_vecs, null_directions=null_vecs,
                        converged=res.converged or res.exhausted, steps=res.steps, products=res.products,
                        seconds=time.perf_counter() - t0,
                        preconditioner=preconditioner or ("none" if precond is None else "custom"))
