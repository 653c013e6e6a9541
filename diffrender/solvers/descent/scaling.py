"""Marquardt's diagonal scaling ``D^2 = clamp(diag(J~^T J~), min, max)`` of damped and radius descents.

With ``monotone=True`` ``D^2`` is the running maximum over the accepted points (Moré 1978, MINPACK)
instead of Ceres' fresh diagonal each iteration: on MGH it solves Brown-Dennis and finds Biggs EXP6's
global minimum. The running maximum lives in ``state.extra["d2_max"]`` so a resumed solve continues it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from diffrender.problem import Linearization
from diffrender.solvers.records import SolverState

if TYPE_CHECKING:
    from diffrender.solvers.base import Workspace
    from diffrender.solvers.loop import SecondOrderSolver

__all__ = ["DiagonalScaling", "IdentityScaling"]


class DiagonalScaling:
    """``D^2: (n,)`` at the current linearization, folded into the running maximum once per point."""

    def __init__(self, min_diagonal: float = 1e-6, max_diagonal: float = 1e32, monotone: bool = True) -> None:
        self.min_diagonal, self.max_diagonal, self.monotone = min_diagonal, max_diagonal, monotone
        self._memo: tuple[Linearization, Tensor] | None = None

    def __call__(self, loop: SecondOrderSolver, state: SolverState, ws: Workspace) -> Tensor:
        lin = ws.lin
        if self._memo is not None and self._memo[0] is lin:
            return self._memo[1]
        d2 = loop.diagonal(state, ws).clamp(self.min_diagonal, self.max_diagonal)
        if self.monotone:
            prev = state.extra.get("d2_max")
            state.extra["d2_max"] = d2 if prev is None or prev.shape != d2.shape else torch.maximum(prev, d2)
            d2 = state.extra["d2_max"]
        assert lin is not None
        self._memo = (lin, d2)
        return d2


class IdentityScaling:
    """``D^2 = s I`` with ``s = max diag(J~^T J~)`` at the first linearization, kept for the whole solve
    (in ``state.extra["identity_scale"]``): Levenberg's damping, with Nielsen's (1999) ``tau * max diag``
    scale so that the damping parameter is the dimensionless ``tau``."""

    def __call__(self, loop: SecondOrderSolver, state: SolverState, ws: Workspace) -> Tensor:
        assert ws.lin is not None
        if "identity_scale" not in state.extra:
            state.extra["identity_scale"] = float(loop.diagonal(state, ws).max().clamp_min(1e-300))
        return torch.full_like(ws.lin.gradient, state.extra["identity_scale"])
