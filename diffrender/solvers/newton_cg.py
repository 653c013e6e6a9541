"""Newton-CG: a gain-ratio trust region over Steihaug-Toint CG on the cost's exact Hessian.

The Hessian ``J^T J + sum_i r_i grad^2 r_i`` is applied by forward-over-reverse products only. Where
residuals stay large at the optimum the dropped second term matters and Newton converges where Gauss-
Newton crawls (MGH: Jennrich-Sampson, Brown-Dennis); on zero-residual problems it is Gauss-Newton with
costlier products. See :mod:`diffrender.solvers.descent.steihaug`.
"""

from __future__ import annotations

from typing import ClassVar

from diffrender.solvers.descent import SteihaugNewton
from diffrender.solvers.dogleg import radius_scaling, radius_search
from diffrender.solvers.loop import SecondOrderSolver
from diffrender.solvers.options import NewtonCGOptions
from diffrender.solvers.search import TrustRegion

__all__ = ["NewtonCG", "NewtonCGOptions"]


class NewtonCG(SecondOrderSolver):
    """``NewtonCG(max_iterations=50, ...).solve(problem, x0)``; ``max_cg_iterations`` caps the HVPs per step."""

    Options: ClassVar[type] = NewtonCGOptions

    def make_search(self) -> TrustRegion:
        return radius_search(self.options)

    def make_descent(self) -> SteihaugNewton:
        return SteihaugNewton(radius_scaling(self.options))
