"""Dogleg: a gain-ratio trust region of radius ``Delta`` over Powell's dogleg step (Ceres' ``DOGLEG``).

Cheaper per rejected step than Levenberg-Marquardt (the Cauchy and Gauss-Newton points are computed once
per linearization, a smaller radius only moves along the dogleg path), at the price of steps restricted to
that path. See :mod:`diffrender.solvers.descent.dogleg`.
"""

from __future__ import annotations

from typing import ClassVar

from diffrender.solvers.descent import DiagonalScaling
from diffrender.solvers.descent import Dogleg as DoglegDescent
from diffrender.solvers.loop import SecondOrderSolver
from diffrender.solvers.options import DoglegOptions, RadiusOptions
from diffrender.solvers.search import ClassicalRadius, TrustRegion

__all__ = ["Dogleg", "DoglegOptions", "RadiusOptions"]


def radius_search(o: RadiusOptions) -> TrustRegion:
    return TrustRegion(ClassicalRadius(o.initial_radius, o.min_radius, o.max_radius), o.min_relative_decrease)


def radius_scaling(o: RadiusOptions) -> DiagonalScaling | None:
    return DiagonalScaling(o.min_diagonal, o.max_diagonal, o.monotone_diagonal) if o.jacobi_scaling else None


class Dogleg(SecondOrderSolver):
    """``Dogleg(max_iterations=50, ...).solve(problem, x0)``."""

    Options: ClassVar[type] = DoglegOptions

    def make_search(self) -> TrustRegion:
        return radius_search(self.options)

    def make_descent(self) -> DoglegDescent:
        return DoglegDescent(radius_scaling(self.options))
