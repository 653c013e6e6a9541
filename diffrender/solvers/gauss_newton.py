"""Gauss-Newton with a backtracking (Armijo) line search.

Each iteration solves ``J~^T J~ delta = -g`` (dense: Cholesky, or the minimum-norm solution when ``J~``
is rank deficient; matrix-free: PCG, which stays finite on a singular system because ``g`` lies in the
range of ``J~^T``), then halves the step length ``t`` until
``cost(x (+) t delta) <= cost(x) + c t g^T delta`` (non-finite trial costs count as failures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from diffrender.problem import Problem
from diffrender.solvers.base import (
    IterationRecord,
    SecondOrderOptions,
    SecondOrderSolver,
    SolverState,
    Workspace,
)

__all__ = ["GaussNewton", "GaussNewtonOptions"]


@dataclass
class GaussNewtonOptions(SecondOrderOptions):
    armijo: float = 1e-4  # sufficient-decrease constant c
    backtrack: float = 0.5  # step-length factor per rejected trial
    max_line_search_steps: int = 30


class GaussNewton(SecondOrderSolver):
    """``GaussNewton(max_iterations=50, linear_solver="auto", ...).solve(problem, x0)``."""

    Options: ClassVar[type] = GaussNewtonOptions

    def iterate(
        self, problem: Problem, state: SolverState, ws: Workspace
    ) -> tuple[IterationRecord | None, str | None]:
        o = self.options
        term = self.ensure_linearization(problem, state, ws)
        if term is not None:
            return None, term
        g = ws.cache["g"]
        delta, pred, cg_it = self.solve_linear(problem, state, ws, torch.zeros_like(g))
        slope = float(g @ delta) if delta is not None else math.nan
        if delta is None or not slope < 0:  # not a descent direction (numerically): fall back to -g
            delta = -g
            slope = -float(g @ g)
            pred = -slope
        rec = IterationRecord(state.iteration + 1, state.cost, gradient_norm=ws.cache["gnorm"],
                              cg_iterations=cg_it, accepted=False, block_costs=state.block_costs)
        rec.step_norm = float(delta.norm())
        if self.step_too_small(problem, state, rec.step_norm):
            ws.cache["message"] = f"|step| = {rec.step_norm:.3e} <= parameter_tolerance * (|x| + tol)"
            return rec, "parameter_tolerance"
        t = 1.0
        for k in range(1, o.max_line_search_steps + 1):
            x_new, ctx_new, cost_new, blocks_new = self.evaluate_trial(problem, state, ws, t * delta)
            rec.line_search_steps = k
            if math.isfinite(cost_new) and cost_new <= state.cost + o.armijo * t * slope:
                change = state.cost - cost_new
                # predicted decrease of the GN model along t * delta (quadratic in t)
                model = -t * slope + t * t * (pred + slope)
                rec.rho = change / model if model > 0 else math.nan
                rec.cost_change, rec.step_norm = change, t * rec.step_norm
                rec.accepted, rec.cost, rec.block_costs = True, cost_new, blocks_new
                ws.evaluated = (x_new, cost_new)
                state.x, state.cost, state.block_costs = x_new, cost_new, blocks_new
                ws.ctx, ws.lin = ctx_new, None
                state.linearized_at = state.iteration + 1
                if abs(change) <= o.function_tolerance * (state.cost + change):
                    ws.cache["message"] = f"|cost_change| / cost <= {o.function_tolerance:.1e}"
                    return rec, "function_tolerance"
                return rec, None
            t *= o.backtrack
        ws.cache["message"] = f"no sufficient decrease after {o.max_line_search_steps} backtracking steps"
        rec.cost_change = math.nan
        return rec, "line_search_failure"
