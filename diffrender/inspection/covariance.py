"""Parameter uncertainty at a fitted point: the covariance ``(J~^T J~)^-1`` as Ceres' ``Covariance`` computes it.

With whitened residuals of unit covariance, the Gauss-Newton (Laplace) approximation of the estimate's
covariance is ``C = (J~^T J~)^-1`` (Ceres' convention: weights and robust-loss corrections are in ``J~``).
When the residual noise is unknown, ``C`` is scaled by ``sigma^2 = 2 cost / (m - n)`` (the residual variance
of a linear least-squares fit).  Only the residual blocks named in ``blocks`` count (e.g. the data terms
and not the regularizers): the other rows of ``J~`` are zeroed.

Small ``n`` (``<= dense_max``): ``J~^T J~`` is formed (from the explicit ``J~``, forward or reverse mode,
whichever side is smaller, or column by column when ``J~`` would be too large) and eigendecomposed in
float64.  Eigenvalues below ``rank_rtol * lambda_max`` are a
null space (a gauge freedom, or parameters no counted residual sees): ``C`` is then the pseudo-inverse on
the observable subspace (Ceres' ``DENSE_SVD`` with its ``min_reciprocal_condition_number``), and the
result says so and carries the null-space directions.

Large ``n``: ``diag(C)`` by Hutchinson's estimator with solves, ``diag(A^-1) ~ mean_k z_k * A^-1 z_k`` for
random signs ``z_k`` (Bekas, Kokiopoulou & Saad 2007), each solve by PCG with the solver's preconditioner.
Lanczos first looks for null directions; when it finds one the diagonal is not computed (it would be
infinite along them) and the directions are reported instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffrender.inspection.conditioning import conditioning, default_rank_rtol, solver_preconditioner
from diffrender.inspection.jacobian import Jacobian, RowMaskedOperator, check_names
from diffrender.linalg.cg import pcg
from diffrender.problem import ParamLayout, Problem

__all__ = ["Uncertainty", "covariance"]


@dataclass
class Uncertainty:
    """Covariance of the parameters (in tangent coordinates) at a point.

    ``variance: (n,)`` the diagonal of ``scale * (J~^T J~)^-1`` (``None`` when a large problem is rank
    deficient); ``covariance: (n, n)`` the full matrix (dense method only); ``scale``: 1, or the residual
    variance ``sigma2`` when asked to scale by it; ``sigma2 = 2 cost / (m - n)`` over the counted blocks
    (``nan`` when ``m <= n``); ``m``: counted residuals; ``null_space: (n, d)`` orthonormal directions of
    (near-)zero curvature; ``null_fraction: (n,)`` how much of each coordinate lies in that null space (1:
    unobservable; dense method only); ``std_error: (n,)`` the Hutchinson estimate's standard error of
    ``variance``; ``cond``: ``lambda_max / lambda_min`` of ``J~^T J~`` (dense) or the Lanczos estimate for
    the preconditioned operator (Hutchinson; a lower bound unless Lanczos converged), ``inf`` when rank
    deficient.
    """

    layout: ParamLayout
    blocks: tuple[str, ...]
    method: str
    variance: Tensor | None
    covariance: Tensor | None
    scale: float
    sigma2: float
    m: int
    n: int
    rank: int | None
    null_space: Tensor
    null_fraction: Tensor | None
    std_error: Tensor | None
    cond: float
    products: int
    message: str

    @property
    def rank_deficient(self) -> bool:
        return self.null_space.shape[1] > 0

    def std(self) -> dict[str, Tensor] | None:
        """Standard deviation per parameter, shaped like the parameter where its tangent has as many
        elements (``None`` when the variance was not computed)."""
        if self.variance is None:
            return None
        return self.layout.split(self.variance.clamp_min(0).sqrt())


def covariance(problem: Problem, x: dict[str, Tensor], ctx: Any = None, *, blocks: Sequence[str] | None = None,
               residual_variance: bool = False, dense_max: int = 2000, probes: int = 32,
               max_cg_iterations: int = 200, cg_rtol: float | None = None, lanczos_steps: int = 40,
               rank_rtol: float | None = None, seed: int = 0, chunk: int = 16,
               max_elements: int = 2**25) -> Uncertainty:
    """Covariance of the parameters of ``problem`` at ``x`` (``ctx`` from ``problem.prepare_context(x)``,
    computed when not given).

    ``blocks``: residual blocks that count (default all); ``residual_variance``: scale by ``sigma2``;
    ``dense_max``: largest ``n`` done densely (``J~`` itself is formed only up to ``max_elements`` entries,
    else ``J~^T J~`` column by column); ``probes``, ``max_cg_iterations``, ``cg_rtol`` (default
    ``max(1e-6, 100 eps)``) and ``seed``: the Hutchinson estimate for larger ``n``; ``lanczos_steps``: its
    search for null directions; ``rank_rtol``: relative eigenvalue threshold of the null space (default
    ``10 eps`` of the dtype).
    """
    jac = Jacobian(problem, x, ctx)
    op = jac.op
    names = jac.residuals.names
    counted = tuple(names) if blocks is None else tuple(blocks)
    check_names(counted, names, "residual block")
    if not counted:
        raise ValueError("covariance: no residual blocks selected")
    if set(counted) != set(names):  # zero the rows of the other blocks
        jac.op = op = RowMaskedOperator(op, jac.residuals.mask(counted, op.x0))
    sl = jac.residuals.slices()
    rows = [i for b in counted for i in range(sl[b].start, sl[b].stop)]
    m, n = len(rows), op.n
    cost = sum(jac.lin.evaluation.block_costs[b] for b in counted)
    sigma2 = 2 * cost / (m - n) if m > n else math.nan
    scale = sigma2 if residual_variance else 1.0
    if residual_variance and not m > n:
        raise ValueError(f"covariance: the residual variance 2 cost / (m - n) needs more counted residuals "
                         f"than parameters (m = {m}, n = {n})")
    rtol = default_rank_rtol(op.x0.dtype) if rank_rtol is None else float(rank_rtol)
    products0 = op.counters.jvps + op.counters.vjps
    common = dict(layout=jac.params, blocks=counted, scale=scale, sigma2=sigma2, m=m, n=n)
    if n <= dense_max:
        gram, how = jac.gram(rows, max_elements=max_elements, chunk=chunk)
        evals, evecs = torch.linalg.eigh(gram)
        lam_max = float(evals[-1]) if n else 0.0
        keep = evals > rtol * lam_max if lam_max > 0 else torch.zeros_like(evals, dtype=torch.bool)
        v = evecs[:, keep]
        cov = (v / evals[keep]) @ v.T * scale
        null = evecs[:, ~keep]
        rank = int(keep.sum())
        cond = lam_max / float(evals[keep][0]) if rank == n else math.inf
        msg = f"dense JᵀJ from {how}" + ("" if rank == n else (
            f"; rank deficient: rank {rank} of {n}; {n - rank} null direction(s) (eigenvalues <= {rtol:.1e} x "
            f"lambda_max); the covariance is the pseudo-inverse on the observable subspace"))
        dt = op.x0.dtype
        return Uncertainty(**common, method="dense", variance=cov.diagonal().to(dt), covariance=cov.to(dt),
                           rank=rank, null_space=null.to(dt), null_fraction=(null * null).sum(1).to(dt),
                           std_error=None, cond=cond, products=op.counters.jvps + op.counters.vjps - products0,
                           message=msg)

    precond, _ = solver_preconditioner(problem, jac.x, jac.ctx, op, seed=seed)
    cnd = conditioning(op, precond=precond, steps=lanczos_steps, rank_rtol=rtol, seed=seed)
    if cnd.rank_deficient:
        d = cnd.null_directions.shape[1]
        return Uncertainty(**common, method="hutchinson", variance=None, covariance=None, rank=None,
                           null_space=cnd.null_directions, null_fraction=None, std_error=None, cond=math.inf,
                           products=op.counters.jvps + op.counters.vjps - products0,
                           message=f"rank deficient: Lanczos found {d} null direction(s) (eigenvalue <= "
                                   f"{rtol:.1e} x lambda_max of the preconditioned operator), and there may be "
                                   "more; the variances would be infinite along them and were not computed")
    eps = torch.finfo(op.x0.dtype).eps
    rtol_cg = max(1e-6, 100 * eps) if cg_rtol is None else float(cg_rtol)
    gen = torch.Generator().manual_seed(seed + 1)
    samples = []
    unconverged = 0
    for _ in range(probes):
        z = (2 * torch.randint(0, 2, (n,), generator=gen) - 1).to(device=op.x0.device, dtype=op.x0.dtype)
        res = pcg(op.jtj, z, precond=precond, max_iterations=max_cg_iterations, rtol=rtol_cg, eta=None)
        unconverged += res.termination != "converged"
        samples.append(z * res.x)
    s = torch.stack(samples)
    var = s.mean(0) * scale
    err = s.std(0) / math.sqrt(probes) * scale if probes > 1 else torch.full_like(var, math.nan)
    msg = (f"diag of the inverse from {probes} Hutchinson probes; cond >= {cnd.cond:.3e} of the preconditioned "
           f"operator")
    if unconverged:
        msg += f"; {unconverged} of {probes} PCG solves stopped before rtol {rtol_cg:.1e}"
    return Uncertainty(**common, method="hutchinson", variance=var, covariance=None, rank=None,
                       null_space=op.x0.new_zeros(n, 0), null_fraction=None, std_error=err,
                       cond=cnd.cond, products=op.counters.jvps + op.counters.vjps - products0, message=msg)
