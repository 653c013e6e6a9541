"""Damped Gauss-Newton: ``(J~^T J~ + lambda D^2) delta = -g``, the Levenberg-Marquardt step.

``lambda`` comes from the search's region (0 for plain Gauss-Newton), ``D^2`` from a
:class:`~diffrender.solvers.descent.scaling.DiagonalScaling` (``None``: ``D = I``). Solved by Cholesky on
the assembled ``J~^T J~`` for small ``n``, or by matrix-free PCG with the problem's preconditioner (or
Jacobi on ``diag(J~^T J~) + lambda D^2``) truncated by the Nash-Sofer rule. The predicted decrease is that
of the Gauss-Newton model ``1/2 ||r~ + J~ delta||^2``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrender.linalg.solve import LinearSolve, solve_spd
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


def normal_solver(loop: SecondOrderSolver, problem: Problem, state: SolverState, ws: Workspace,
                  damping: Tensor | None) -> Callable[[Tensor], tuple[Tensor, LinearSolve]]:
    """``b -> (J~^T J~ + diag(damping))^-1 b`` (dense Cholesky or PCG as the loop chooses), with the solve's
    record; ``damping=None``: the undamped Gauss-Newton system (the dogleg's GN point)."""
    lin = ws.lin
    assert lin is not None
    o = loop.options
    if loop.use_dense(lin.op.n):
        a = lin.dense_jtj() if damping is None else lin.dense_jtj() + torch.diag(damping)

        def dense(b: Tensor) -> tuple[Tensor, LinearSolve]:
            sol = solve_spd(b, matrix=a)
            return sol.x, sol

        return dense
    diag = loop.diagonal(state, ws)
    pre = problem.make_preconditioner(PreconditionerInfo(state.x, ws.ctx, problem.layout(state.x), diag,
                                                         torch.zeros_like(diag) if damping is None else damping))
    jtj = loop.curvature(problem, state, ws)
    matvec = jtj if damping is None else (lambda v: jtj(v) + damping * v)
    cap = loop.cg_cap(state)

    def cg(b: Tensor) -> tuple[Tensor, LinearSolve]:
        sol = solve_spd(b, matvec=matvec, precond=pre or jacobi(diag if damping is None else diag + damping),
                        max_iterations=cap, rtol=o.cg_rtol, eta=o.eta if o.eta > 0 else None)
        return sol.x, sol

    return cg


class DampedGaussNewton(Descent):
    """The (damped) Gauss-Newton step; ``scaling=None`` damps with the identity (and GN uses ``lambda = 0``)."""

    def __init__(self, scaling: DiagonalScaling | None = None, geodesic_alpha: float = 0.0,
                 geodesic_h: float = 0.1) -> None:
        self.scaling = scaling
        self.geodesic_alpha, self.geodesic_h = geodesic_alpha, geodesic_h

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
        solve = normal_solver(loop, problem, state, ws, damping)
        delta, sol = solve(-g)
        if loop.use_dense(lin.op.n):
            pred = lin.model_decrease(delta)
        elif o.exact_model_decrease:
            pred = lin.model_decrease(delta, lin.op.jvp(delta))
        else:  # -Q(delta) of the damped system minus the damping's share: no extra product
            pred = sol.model_decrease + 0.5 * float(delta @ (damping * delta))
        iterations = sol.iterations
        if not bool(torch.isfinite(delta).all()):
            return Step(None, float("nan"), cg_iterations=iterations)
        if self.geodesic_alpha > 0:
            d = self.scaling(loop, state, ws).sqrt() if self.scaling is not None else torch.ones_like(delta)
            accel = self._acceleration(problem, state, ws, delta, solve, d)
            if accel is not None:  # else the correction is too large to trust: the plain step
                delta = delta + 0.5 * accel[0]
                iterations += accel[1]
                pred = lin.model_decrease(delta, lin.op.jvp(delta))
        norm = float(torch.linalg.vector_norm(delta * self.scaling(loop, state, ws).sqrt())) \
            if self.scaling is not None and region.damping > 0 else float(torch.linalg.vector_norm(delta))
        # the model's decrease is -g.delta - |J~ delta|^2 / 2, so its curvature along the step costs one dot
        jd2 = -2.0 * (float(g @ delta) + pred)
        curvature = jd2 / norm ** 2 if norm > 0 and jd2 >= 0 else float("nan")
        return Step(delta, pred, norm=norm, cg_iterations=iterations, curvature=curvature)

    def _acceleration(self, problem: Problem, state: SolverState, ws: Workspace, v: Tensor,
                      solve: Callable[[Tensor], tuple[Tensor, LinearSolve]], d: Tensor) -> tuple[Tensor, int] | None:
        """Geodesic acceleration (Transtrum & Sethna 2012): ``a = -(J~^T J~ + lambda D^2)^-1 J~^T r_vv`` with
        the residuals' second directional derivative ``r_vv ~ (2/h) ((r(x + h v) - r(x)) / h - J v)``; the
        step becomes ``v + a/2``. ``None`` when ``2 ||D a|| / ||D v|| > alpha`` (the correction would
        dominate, so the truncated expansion is not to be trusted; ``D`` the damping's scaling): the step stays
        ``v``, where Transtrum & Sethna reject it, which on MGH made Meyer's valley exhaust 400 iterations."""
        lin = ws.lin
        assert lin is not None
        h = self.geodesic_h
        layout = problem.layout(state.x)
        with torch.no_grad():
            x_h = layout.retract(state.x, h * v)
            raw = problem.residual_blocks(x_h, problem.prepare_context(x_h))
            r_h = torch.cat([b.reshape(-1) for b in raw.values()])
        problem.counters.residual_evals += 1
        scale = getattr(lin.op, "row_scale", None)
        r_h = r_h if scale is None else r_h * scale
        r0 = lin.op.value if scale is None else lin.op.value * scale
        rvv = (2.0 / h) * ((r_h - r0) / h - lin.op.jvp(v))
        a, sol = solve(-lin.op.vjp(rvv))
        if not bool(torch.isfinite(a).all()):
            return None
        if 2.0 * float((d * a).norm()) > self.geodesic_alpha * float((d * v).norm()):
            return None
        return a, sol.iterations
