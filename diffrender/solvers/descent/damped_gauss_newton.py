"""Damped Gauss-Newton: ``(J~^T J~ + lambda D^2) delta = -g``, the Levenberg-Marquardt step.

``lambda`` comes from the search's region (0 for plain Gauss-Newton), ``D^2`` from a
:class:`~diffrender.solvers.descent.scaling.DiagonalScaling` (``None``: ``D = I``). Solved by Cholesky on
the assembled ``J~^T J~`` for small ``n``, or by matrix-free PCG with the problem's preconditioner (or
Jacobi on ``diag(J~^T J~) + lambda D^2``) truncated by the Nash-Sofer rule. The predicted decrease is that
of the Gauss-Newton model ``1/2 ||r~ + J~ delta||^2``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrender.linalg.solve import solve_spd
from diffrender.problem import PreconditionerInfo, Problem
from diffrender.solvers.descent.base import Descent, Region, Step
from diffrender.solvers.descent.scaling import DiagonalScaling
from diffrender.solvers.records import SolverState

if TYPE_CHECKING:
    from diffrender.solvers.base import Workspace
    from diffrender.solvers.loop import SecondOrderSolver

__all__ = ["DampedGaussNewton", "jacobi"]


def jacobi(diag: Tensor) -> object:
    """``v -> v / diag`` (entries that are zero or not finite act as 1)."""
    inv = 1.0 / diag.clamp_min(torch.finfo(diag.dtype).tiny)
    inv = torch.where(torch.isfinite(inv), inv, torch.ones_like(inv))
    return lambda v: inv * v


class DampedGaussNewton(Descent):
    """The (damped) Gauss-Newton step; ``scaling=None`` damps with the identity (and GN uses ``lambda = 0``)."""

    def __init__(self, scaling: DiagonalScaling | None = None) -> None:
        self.scaling = scaling

    def damping(self, loop: SecondOrderSolver, state: SolverState, ws: Workspace, region: Region) -> Tensor:
        """The diagonal added to ``J~^T J~``: ``lambda D^2`` as a vector ``(n,)``."""
        assert ws.lin is not None
        if region.damping == 0.0:
            return torch.zeros_like(ws.lin.gradient)
        d2 = self.scaling(loop, state, ws) if self.scaling is not None else torch.ones_like(ws.lin.gradient)
        return region.damping * d2

    def step(self, loop: SecondOrderSolver, problem: Problem, state: SolverState, ws: Workspace,
             region: Region) -> Step:
        lin = ws.lin
        assert lin is not None
        o = loop.options
        g = lin.gradient
        damping = self.damping(loop, state, ws, region)
        if loop.use_dense(lin.op.n):
            h = lin.dense_jtj()
            sol = solve_spd(-g, matrix=h + torch.diag(damping))
            delta = sol.x
            pred = -float(g @ delta + 0.5 * delta @ (h @ delta))
        else:
            op = lin.op
            diag = loop.diagonal(state, ws)
            pre = problem.make_preconditioner(PreconditionerInfo(state.x, ws.ctx, problem.layout(state.x),
                                                                 diag, damping))
            jtj = loop.curvature(problem, state, ws)
            sol = solve_spd(-g, matvec=lambda v: jtj(v) + damping * v, precond=pre or jacobi(diag + damping),
                            max_iterations=o.max_cg_iterations, rtol=o.cg_rtol, eta=o.eta if o.eta > 0 else None)
            delta = sol.x
            if o.exact_model_decrease:
                jd = op.jvp(delta)
                pred = -float(g @ delta + 0.5 * op.dot(jd, jd))
            else:  # -Q(delta) of the damped system minus the damping's share: no extra product
                pred = sol.model_decrease + 0.5 * float(delta @ (damping * delta))
        if not bool(torch.isfinite(delta).all()):
            return Step(None, float("nan"), cg_iterations=sol.iterations)
        norm = float(torch.linalg.vector_norm(delta * self.scaling(loop, state, ws).sqrt())) \
            if self.scaling is not None and region.damping > 0 else float(torch.linalg.vector_norm(delta))
        return Step(delta, pred, norm=norm, cg_iterations=sol.iterations)
