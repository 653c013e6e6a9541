"""Powell's dogleg (as Ceres' ``DOGLEG`` trust-region strategy), matrix-free.

Within ``||D delta|| <= radius`` (``D^2`` Marquardt's scaling, or ``I``) the step runs along the dogleg path
from the origin to the Cauchy point ``delta_c = -alpha D^-2 g`` (the minimizer of the Gauss-Newton model
along the scaled steepest descent; ``alpha = g^T D^-2 g / ||J~ D^-2 g||^2``, one JVP) and on to the
Gauss-Newton point ``delta_gn`` (``J~^T J~ delta = -g`` by Cholesky or PCG): the Gauss-Newton point when
it lies inside, the steepest-descent step cut at the radius when even the Cauchy point lies outside,
else the point where the second leg crosses the boundary (Nocedal & Wright, sec. 4.1). Both points are
computed once per linearization, so a rejected step costs no product at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrender.problem import Linearization, Problem
from diffrender.solvers.descent.base import Descent, Region, Step
from diffrender.solvers.descent.damped_gauss_newton import normal_solver
from diffrender.solvers.descent.scaling import DiagonalScaling
from diffrender.solvers.records import SolverState

if TYPE_CHECKING:
    from diffrender.solvers.base import Workspace
    from diffrender.solvers.loop import SecondOrderSolver

__all__ = ["Dogleg"]


@dataclass
class _Points:
    lin: Linearization
    d: Tensor  # D: (n,)
    cauchy: Tensor  # delta_c (or the scaled steepest-descent direction when the model has no curvature on it)
    j_cauchy: Tensor | None  # J~ delta_c (None on the dense path)
    cauchy_bounded: bool  # False: no curvature along -D^-2 g, so the Cauchy point is at infinity
    gn: Tensor | None  # delta_gn (None when its solve failed)
    j_gn: Tensor | None
    cg_iterations: int


class Dogleg(Descent):
    """Powell's dogleg step; ``scaling=None`` measures the radius in the plain 2-norm."""

    def __init__(self, scaling: DiagonalScaling | None = None) -> None:
        self.scaling = scaling
        self._points: _Points | None = None

    def _compute(self, loop: SecondOrderSolver, problem: Problem, state: SolverState, ws: Workspace) -> _Points:
        lin = ws.lin
        assert lin is not None
        g, op = lin.gradient, lin.op
        d2 = self.scaling(loop, state, ws) if self.scaling is not None else torch.ones_like(g)
        p = g / d2
        dense = loop.use_dense(op.n)
        if dense:
            h = lin.dense_jtj()
            curv = float(p @ (h @ p))
            jp = None
        else:
            jp = op.jvp(p)
            curv = float(op.dot(jp, jp))
        gp = float(g @ p)
        bounded = curv > 0 and math.isfinite(curv)
        alpha = gp / curv if bounded else 1.0
        cauchy = -alpha * p
        j_cauchy = None if jp is None else -alpha * jp
        gn, sol = normal_solver(loop, problem, state, ws, None)(-g)
        j_gn = op.jvp(gn) if not dense and bool(torch.isfinite(gn).all()) else None
        if not bool(torch.isfinite(gn).all()) or not float(g @ gn) < 0:
            gn, j_gn = None, None
        return _Points(lin, d2.sqrt(), cauchy, j_cauchy, bounded, gn, j_gn, sol.iterations)

    def step(self, loop: SecondOrderSolver, problem: Problem, state: SolverState, ws: Workspace,
             region: Region) -> Step:
        first = self._points is None or self._points.lin is not ws.lin
        if first:
            self._points = self._compute(loop, problem, state, ws)
        pts = self._points
        assert pts is not None and ws.lin is not None
        radius = region.radius
        norm_c = float(torch.linalg.vector_norm(pts.d * pts.cauchy))
        norm_gn = float(torch.linalg.vector_norm(pts.d * pts.gn)) if pts.gn is not None else math.inf
        if pts.gn is not None and norm_gn <= radius:
            delta, j_delta, on_boundary = pts.gn, pts.j_gn, False
        elif not pts.cauchy_bounded or norm_c >= radius or pts.gn is None:
            scale = radius / norm_c if norm_c > 0 else 0.0
            if pts.cauchy_bounded and pts.gn is None and norm_c < radius:
                scale = 1.0  # no Gauss-Newton point: the Cauchy point itself
            delta = scale * pts.cauchy
            j_delta = None if pts.j_cauchy is None else scale * pts.j_cauchy
            on_boundary = scale != 1.0
        else:
            # ||D (c + tau (gn - c))|| = radius, tau in [0, 1]: a tau^2 + b tau + c0 = 0
            dc, dd = pts.d * pts.cauchy, pts.d * (pts.gn - pts.cauchy)
            a, b, c0 = float(dd @ dd), 2 * float(dc @ dd), float(dc @ dc) - radius * radius
            tau = (-b + math.sqrt(max(b * b - 4 * a * c0, 0.0))) / (2 * a) if a > 0 else 0.0
            delta = pts.cauchy + tau * (pts.gn - pts.cauchy)
            j_delta = None if pts.j_cauchy is None else pts.j_cauchy + tau * (pts.j_gn - pts.j_cauchy)
            on_boundary = True
        pred = ws.lin.model_decrease(delta, j_delta)
        norm = float(torch.linalg.vector_norm(pts.d * delta))
        return Step(delta, pred, norm=norm, cg_iterations=pts.cg_iterations if first else 0,
                    on_boundary=on_boundary)
