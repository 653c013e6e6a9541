"""Truncated Newton on the exact Hessian: Steihaug-Toint CG inside a trust region.

Minimize the Newton model ``m(p) = g^T p + 1/2 p^T H p`` over ``||D p|| <= radius`` by CG preconditioned
with ``D^2`` (so the region is the preconditioner's norm, in which CG's iterates grow monotonically;
Steihaug 1983, Toint 1981, Nocedal & Wright Algorithm 7.2). ``H`` is the cost's true Hessian
``J^T J + sum_i r_i grad^2 r_i`` applied by Hessian-vector products (forward over reverse), never formed.
CG stops at the boundary, on non-positive curvature (following it to the boundary), or when the model
gradient's ``D^-1`` norm falls below ``min(1/2, sqrt(||g||)) ||g||`` (superlinear forcing).

The CG path does not depend on the radius until it leaves the region, so it is kept per linearization:
after a rejected step (a smaller radius) the new step is read off the stored path without new products.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrender.problem import Linearization, Problem
from diffrender.solvers.descent.base import Descent, Region, Step
from diffrender.solvers.descent.scaling import DiagonalScaling
from diffrender.solvers.records import SolverState

if TYPE_CHECKING:
    from diffrender.solvers.base import Workspace
    from diffrender.solvers.loop import SecondOrderSolver

__all__ = ["SteihaugNewton"]


@dataclass
class _Leg:
    p: Tensor  # the iterate at the start of this leg
    d: Tensor  # the search direction
    q: float  # the model value m(p)
    rd: float  # r^T d, r = g + H p the model gradient at p
    dhd: float  # d^T H d
    alpha: float  # the unconstrained CG step along d (inf on non-positive curvature)


@dataclass
class _Path:
    lin: Linearization
    m_inv: Tensor  # D^-2: (n,)
    d2: Tensor  # D^2
    legs: list[_Leg] = field(default_factory=list)
    end: tuple[Tensor, float] | None = None  # the interior end point (p, m(p)) once CG converged or stopped
    closed: bool = False  # the last leg has non-positive curvature: every step ends on it
    # CG's running state, to continue the path on demand
    p: Tensor | None = None
    r: Tensor | None = None
    z: Tensor | None = None
    d: Tensor | None = None
    rz: float = 0.0
    q: float = 0.0
    tol: float = 0.0
    cap: int = 0  # CG legs allowed on this path: the loop's cap when it started (max_cg_iterations_grown)


class SteihaugNewton(Descent):
    """Steihaug-Toint truncated Newton-CG on the exact Hessian; ``scaling=None`` uses the 2-norm."""

    def __init__(self, scaling: DiagonalScaling | None = None) -> None:
        self.scaling = scaling
        self._path: _Path | None = None

    def _start(self, loop: SecondOrderSolver, state: SolverState, ws: Workspace) -> _Path:
        lin = ws.lin
        assert lin is not None
        g = lin.gradient
        d2 = self.scaling(loop, state, ws) if self.scaling is not None else torch.ones_like(g)
        path = _Path(lin, 1.0 / d2, d2, cap=loop.cg_cap(state))
        path.p, path.r = torch.zeros_like(g), g.clone()
        path.z = path.m_inv * path.r
        path.d = -path.z
        path.rz = float(path.r @ path.z)
        gnorm = math.sqrt(max(path.rz, 0.0))
        # superlinear forcing min(1/2, sqrt(||g|| / ||g_0||)) ||g||, relative to the first gradient so that
        # it does not depend on the residuals' scale
        g0 = state.extra.setdefault("newton_gradient_scale", gnorm)
        path.tol = min(0.5, math.sqrt(gnorm / g0) if g0 > 0 else 0.0) * gnorm
        if gnorm == 0.0:
            path.end = (path.p, 0.0)
        return path

    def _extend(self, loop: SecondOrderSolver, path: _Path) -> bool:
        """One more CG leg; False once the path has ended."""
        if path.end is not None or path.closed:
            return False
        if len(path.legs) >= path.cap:
            path.end = (path.p, path.q)
            return False
        hess = path.lin.hessian()
        d, p, r = path.d, path.p, path.r
        hd = hess.hvp(d)
        dhd = float(d @ hd)
        rd = float(r @ d)
        if not dhd > 0.0:  # non-positive curvature (or NaN): follow d to the boundary
            path.legs.append(_Leg(p, d, path.q, rd, dhd, math.inf))
            path.closed = True
            return True
        alpha = path.rz / dhd
        path.legs.append(_Leg(p, d, path.q, rd, dhd, alpha))
        path.q = path.q + alpha * rd + 0.5 * alpha * alpha * dhd
        path.p = p + alpha * d
        path.r = r + alpha * hd
        path.z = path.m_inv * path.r
        rz_new = float(path.r @ path.z)
        if math.sqrt(max(rz_new, 0.0)) <= path.tol:
            path.end = (path.p, path.q)
        else:
            path.d = -path.z + (rz_new / path.rz) * d
        path.rz = rz_new
        return True

    def step(self, loop: SecondOrderSolver, problem: Problem, state: SolverState, ws: Workspace,
             region: Region) -> Step:
        if self._path is None or self._path.lin is not ws.lin:
            self._path = self._start(loop, state, ws)
        path = self._path
        hvps0 = problem.counters.hvps
        radius = region.radius
        k = 0
        while True:
            if k == len(path.legs) and not self._extend(loop, path):
                if k == len(path.legs):  # the path ended inside the region
                    assert path.end is not None
                    p, q = path.end
                    return self._finish(problem, path, p, -q, False, hvps0)
            leg = path.legs[k]
            k += 1
            end = leg.p + leg.alpha * leg.d if math.isfinite(leg.alpha) else None
            if end is None or self._norm(path, end) >= radius:
                tau = self._to_boundary(path, leg.p, leg.d, radius)
                q = leg.q + tau * leg.rd + 0.5 * tau * tau * leg.dhd
                return self._finish(problem, path, leg.p + tau * leg.d, -q, True, hvps0)

    def _finish(self, problem: Problem, path: _Path, p: Tensor, pred: float, on_boundary: bool,
                hvps0: int) -> Step:
        used = problem.counters.hvps - hvps0
        if not bool(torch.isfinite(p).all()):
            return Step(None, math.nan, cg_iterations=used)
        return Step(p, pred, norm=self._norm(path, p), cg_iterations=used, on_boundary=on_boundary)

    @staticmethod
    def _norm(path: _Path, p: Tensor) -> float:
        return float(torch.sqrt((path.d2 * p * p).sum()))

    @staticmethod
    def _to_boundary(path: _Path, p: Tensor, d: Tensor, radius: float) -> float:
        """The tau >= 0 with ``||D (p + tau d)|| = radius``."""
        a = float((path.d2 * d * d).sum())
        b = 2 * float((path.d2 * p * d).sum())
        c = float((path.d2 * p * p).sum()) - radius * radius
        if a <= 0:
            return 0.0
        return (-b + math.sqrt(max(b * b - 4 * a * c, 0.0))) / (2 * a)
