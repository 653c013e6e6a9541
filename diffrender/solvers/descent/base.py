"""What a descent is: a step from the linearization, within what the search allows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from diffrender.problem import Problem
from diffrender.solvers.records import SolverState

if TYPE_CHECKING:
    from diffrender.solvers.base import Workspace
    from diffrender.solvers.loop import SecondOrderSolver

__all__ = ["Descent", "Region", "Step"]


@dataclass(frozen=True)
class Region:
    """What the search allows this step: a damping ``lambda`` (for damped descents, ``(J^T J + lambda D^2)``)
    and the equivalent trust-region radius (for radius descents, ``||D delta|| <= radius``). A search keeps
    one of them natively and gives the other as its reciprocal."""

    damping: float
    radius: float


@dataclass
class Step:
    """A proposed step ``delta: (n,)`` (``None``: the descent failed, e.g. a non-finite solve), the decrease
    its model predicts (``> 0`` for a valid step), the step's length in the trust-region norm, CG
    iterations, whether it ended on the trust-region boundary, and the model's curvature along it in that
    norm, ``||J~ delta||^2 / ||D delta||^2`` (nan where the descent does not know it)."""

    delta: Tensor | None
    predicted: float
    norm: float = float("nan")
    cg_iterations: int = 0
    on_boundary: bool = False
    curvature: float = float("nan")

    @property
    def valid(self) -> bool:
        return self.delta is not None and self.predicted > 0


class Descent:
    """A direction computation: ``step(loop, problem, state, ws, region) -> Step`` at ``ws.lin``.

    The descent may keep per-linearization work (a factorization, a Gauss-Newton point) for the next call
    at the same point, which a trust region makes after a rejected step; ``ws.lin`` is a new object
    after every accepted step.
    """

    def step(self, loop: SecondOrderSolver, problem: Problem, state: SolverState, ws: Workspace,
             region: Region) -> Step:
        raise NotImplementedError
