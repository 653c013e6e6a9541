"""Levenberg-Marquardt as Ceres does it: a gain-ratio trust region (Nielsen's damping update) over the
damped Gauss-Newton step ``(J~^T J~ + lambda D^2) delta = -g``, ``D^2 = clamp(diag J~^T J~, 1e-6, 1e32)``.

See :mod:`diffrender.solvers.search.trust_region` and :mod:`diffrender.solvers.descent.damped_gauss_newton`;
this module only names the composition and its options. Two deliberate departures from Ceres, both
switchable and justified by the MGH test set: ``monotone_diagonal=True`` keeps ``D^2`` as the running max of
``diag J^T J`` (Moré 1978 / MINPACK), and a tiny step ends the solve only when it is also rejected.
"""

from __future__ import annotations

from typing import ClassVar

from diffrender.solvers.descent import DampedGaussNewton, DiagonalScaling, IdentityScaling
from diffrender.solvers.loop import SecondOrderSolver
from diffrender.solvers.options import LevenbergMarquardtOptions
from diffrender.solvers.search import NielsenDamping, TrustRegion

__all__ = ["LevenbergMarquardt", "LevenbergMarquardtOptions"]


class LevenbergMarquardt(SecondOrderSolver):
    """``LevenbergMarquardt(max_iterations=50, linear_solver="auto", ...).solve(problem, x0)``."""

    Options: ClassVar[type] = LevenbergMarquardtOptions

    def make_search(self) -> TrustRegion:
        o = self.options
        return TrustRegion(NielsenDamping(o.initial_damping, o.min_damping, o.max_damping,
                                          o.rejection_curvature_floor), o.min_relative_decrease)

    def make_descent(self) -> DampedGaussNewton:
        o = self.options
        scaling = IdentityScaling() if o.damping_scaling == "identity" else \
            DiagonalScaling(o.min_diagonal, o.max_diagonal, o.monotone_diagonal)
        return DampedGaussNewton(scaling, geodesic_alpha=o.geodesic_acceleration)

    def validate_options(self) -> None:
        super().validate_options()
        if self.options.damping_scaling not in ("jacobi", "identity"):
            raise ValueError(f"LevenbergMarquardt: damping_scaling must be 'jacobi' or 'identity', "
                             f"got {self.options.damping_scaling!r}")
