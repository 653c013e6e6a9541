"""What a search (globalization) is: given the loop, decide what to do with the descent's steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from diffrender.problem import Problem
from diffrender.solvers.records import IterationRecord, SolverState

if TYPE_CHECKING:
    from diffrender.solvers.base import Workspace
    from diffrender.solvers.loop import SecondOrderSolver

__all__ = ["Search"]


class Search:
    """A globalization strategy (trust region, line search).

    ``init_state(state)`` sets its fields of a fresh state (damping, radius); ``iterate(loop, problem,
    state, ws)`` does one outer iteration at the linearization ``ws.lin``: ask ``loop.descent`` for steps,
    evaluate trials with ``loop.evaluate_trial``, move with ``loop.accept``, use the loop's convergence
    tests, and return ``(record, termination or None)``.
    """

    def init_state(self, state: SolverState) -> None:
        """Fill this search's fields of a fresh state."""

    def iterate(
        self, loop: SecondOrderSolver, problem: Problem, state: SolverState, ws: Workspace
    ) -> tuple[IterationRecord, str | None]:
        raise NotImplementedError
