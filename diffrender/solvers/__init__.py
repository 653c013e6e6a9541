"""Solvers for nonlinear least squares over dicts of tensors, one interface:
``Solver(**options).solve(problem, x0, callback=None, state=None) -> Result``."""

from diffrender.solvers.adam import Adam, AdamOptions
from diffrender.solvers.base import (
    CallbackList,
    IterationRecord,
    Result,
    SecondOrderOptions,
    SecondOrderSolver,
    Solver,
    SolverOptions,
    SolverState,
    Workspace,
)
from diffrender.solvers.gauss_newton import GaussNewton, GaussNewtonOptions
from diffrender.solvers.levenberg_marquardt import LevenbergMarquardt, LevenbergMarquardtOptions

__all__ = [
    "Adam",
    "AdamOptions",
    "CallbackList",
    "GaussNewton",
    "GaussNewtonOptions",
    "IterationRecord",
    "LevenbergMarquardt",
    "LevenbergMarquardtOptions",
    "Result",
    "SecondOrderOptions",
    "SecondOrderSolver",
    "Solver",
    "SolverOptions",
    "SolverState",
    "Workspace",
]
