"""Gauss-Newton with a backtracking (Armijo) line search: ``J~^T J~ delta = -g``, then halve the step
length until the cost decreases enough.

Dense: Cholesky, or the minimum-norm solution when ``J~`` is rank deficient; matrix-free: PCG, which stays
finite on a singular system because ``g`` lies in the range of ``J~^T``. See
:mod:`diffrender.solvers.search.line_search` and :mod:`diffrender.solvers.descent.damped_gauss_newton`.
"""

from __future__ import annotations

from typing import ClassVar

from diffrender.solvers.descent import DampedGaussNewton
from diffrender.solvers.loop import SecondOrderSolver
from diffrender.solvers.options import GaussNewtonOptions
from diffrender.solvers.search import ArmijoLineSearch

__all__ = ["GaussNewton", "GaussNewtonOptions"]


class GaussNewton(SecondOrderSolver):
    """``GaussNewton(max_iterations=50, linear_solver="auto", ...).solve(problem, x0)``."""

    Options: ClassVar[type] = GaussNewtonOptions

    def make_search(self) -> ArmijoLineSearch:
        o = self.options
        return ArmijoLineSearch(o.armijo, o.backtrack, o.max_line_search_steps)

    def make_descent(self) -> DampedGaussNewton:
        return DampedGaussNewton()
