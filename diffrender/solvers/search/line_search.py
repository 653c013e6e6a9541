"""Backtracking (Armijo) line search along the descent's step.

Halve the step length ``t`` until ``cost(x (+) t delta) <= cost(x) + c t g^T delta``; non-finite trial
costs count as failures. When the descent's step is not a descent direction (numerically), fall back to
steepest descent ``-g``.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from diffrender.problem import Problem
from diffrender.solvers.descent.base import Region
from diffrender.solvers.records import IterationRecord, SolverState
from diffrender.solvers.search.base import Search

if TYPE_CHECKING:
    from diffrender.solvers.base import Workspace
    from diffrender.solvers.loop import SecondOrderSolver

__all__ = ["ArmijoLineSearch"]


class ArmijoLineSearch(Search):
    """``armijo``: sufficient-decrease constant ``c``; ``backtrack``: step-length factor per failed trial."""

    def __init__(self, armijo: float = 1e-4, backtrack: float = 0.5, max_steps: int = 30) -> None:
        self.armijo, self.backtrack, self.max_steps = armijo, backtrack, max_steps

    def iterate(
        self, loop: SecondOrderSolver, problem: Problem, state: SolverState, ws: Workspace
    ) -> tuple[IterationRecord, str | None]:
        lin = ws.lin
        assert lin is not None
        g = lin.gradient
        t0 = time.perf_counter()
        step = loop.descent.step(loop, problem, state, ws, Region(damping=0.0, radius=math.inf))
        ws.timings["linear_solve"] += time.perf_counter() - t0
        delta, pred = step.delta, step.predicted
        slope = float(g @ delta) if delta is not None else math.nan
        if delta is None or not slope < 0:  # not a descent direction (numerically): fall back to -g
            delta = -g
            slope = -float(g @ g)
            pred = -slope
        rec = IterationRecord(state.iteration + 1, state.cost, gradient_norm=lin.gradient_norm,
                              cg_iterations=step.cg_iterations, accepted=False, block_costs=state.block_costs)
        rec.step_norm = float(delta.norm())
        if (msg := loop.step_converged(problem, state, rec.step_norm)) is not None:
            ws.message = msg
            return rec, "parameter_tolerance"
        t = 1.0
        for k in range(1, self.max_steps + 1):
            trial = loop.evaluate_trial(problem, state, ws, t * delta)
            rec.line_search_steps = k
            if math.isfinite(trial.cost) and trial.cost <= state.cost + self.armijo * t * slope:
                change = state.cost - trial.cost
                model = -t * slope + t * t * (pred + slope)  # the model's decrease along t * delta
                rec.rho = change / model if model > 0 else math.nan
                rec.cost_change, rec.step_norm = change, t * rec.step_norm
                rec.accepted, rec.cost, rec.block_costs = True, trial.cost, trial.block_costs
                cost_before = state.cost
                loop.accept(state, ws, trial)
                if (msg := loop.function_converged(cost_before, change, model)) is not None:
                    ws.message = msg
                    return rec, "function_tolerance"
                return rec, None
            t *= self.backtrack
        ws.message = f"no sufficient decrease after {self.max_steps} backtracking steps"
        rec.cost_change = math.nan
        return rec, "line_search_failure"
