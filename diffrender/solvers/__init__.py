"""Solvers for nonlinear least squares over dicts of tensors, one interface:
``Solver(**options).solve(problem, x0, callback=None, state=None) -> Result``.

Second-order solvers are a search (:mod:`~diffrender.solvers.search`) composed with a descent
(:mod:`~diffrender.solvers.descent`) over one loop (:mod:`~diffrender.solvers.loop`). Names are imported on
first use, so that :mod:`diffrender.solvers.options` (plain dataclasses) loads without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Adam": "adam", "AdamWorkspace": "adam", "Chain": "chain", "ChainOptions": "options",
    "Solver": "base", "Workspace": "base", "CallbackList": "base", "as_callback": "base",
    "Dogleg": "dogleg", "GaussNewton": "gauss_newton", "LevenbergMarquardt": "levenberg_marquardt",
    "NewtonCG": "newton_cg", "SecondOrderSolver": "loop", "Trial": "loop",
    "IterationRecord": "records", "Result": "records", "SolverState": "records",
    "SolverOptions": "options", "SecondOrderOptions": "options", "LevenbergMarquardtOptions": "options",
    "GaussNewtonOptions": "options", "RadiusOptions": "options", "DoglegOptions": "options",
    "NewtonCGOptions": "options", "AdamOptions": "options",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"diffrender.solvers.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'diffrender.solvers' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
