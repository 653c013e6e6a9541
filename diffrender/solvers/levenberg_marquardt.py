"""Levenberg-Marquardt as Ceres does it (trust-region form, Nielsen's damping update).

Each iteration solves ``(J~^T J~ + lambda D^2) delta = -g`` with ``D^2 = clamp(diag J~^T J~, 1e-6, 1e32)``
(``lambda = 1/mu``, ``mu`` Ceres' trust-region radius), by Cholesky on the assembled ``J~^T J~`` (small
``n``) or by matrix-free PCG truncated with the Nash-Sofer rule.  The gain ratio
``rho = (cost - cost_new) / (model decrease)`` decides: accept when ``rho > 1e-3`` (Nielsen 1999:
``lambda <- lambda max(1/3, 1 - (2 rho - 1)^3)``, ``nu = 2``), otherwise reject (``lambda <- lambda nu``,
``nu <- 2 nu``).  A non-finite trial cost, a failed linear solve or a non-positive model decrease is a
rejected step, never an exception.  Rejected steps reuse the linearization.

Two deliberate departures from Ceres, both switchable, both justified by the MGH test set:
``monotone_diagonal=True`` keeps ``D^2`` as the running max of ``diag J^T J`` (Moré 1978 / MINPACK);
and the parameter tolerance stops the solve only on a tiny step that is also rejected (a tiny accepted
step that still lowers the cost by more than ``function_tolerance`` is progress on badly scaled problems).
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

__all__ = ["LevenbergMarquardt", "LevenbergMarquardtOptions"]


@dataclass
class LevenbergMarquardtOptions(SecondOrderOptions):
    """Ceres' defaults: initial trust radius 1e4 (``lambda = 1e-4``), radius in [1e-32, 1e16]."""

    initial_damping: float = 1e-4
    min_damping: float = 1e-16  # = 1 / max_trust_region_radius
    max_damping: float = 1e32  # = 1 / min_trust_region_radius; exceeding it stops the solve
    min_relative_decrease: float = 1e-3
    min_diagonal: float = 1e-6
    max_diagonal: float = 1e32
    # D^2 = running max of diag(J^T J) over the accepted points (Moré 1978, MINPACK) instead of Ceres'
    # fresh diag each iteration: on MGH it solves Brown-Dennis and finds Biggs EXP6's global minimum.
    monotone_diagonal: bool = True


class LevenbergMarquardt(SecondOrderSolver):
    """``LevenbergMarquardt(max_iterations=50, linear_solver="auto", ...).solve(problem, x0)``."""

    Options: ClassVar[type] = LevenbergMarquardtOptions

    def init_state(self, problem: Problem, state: SolverState) -> None:
        state.damping = self.options.initial_damping
        state.nu = 2.0

    def iterate(
        self, problem: Problem, state: SolverState, ws: Workspace
    ) -> tuple[IterationRecord | None, str | None]:
        o = self.options
        term = self.ensure_linearization(problem, state, ws)
        if term is not None:
            return None, term
        d2 = ws.cache["diag"].clamp(o.min_diagonal, o.max_diagonal)
        if o.monotone_diagonal:
            if ws.cache.get("d2_for") != state.linearized_at:  # fold in once per linearization
                prev = state.extra.get("d2_max")
                state.extra["d2_max"] = d2 if prev is None or prev.shape != d2.shape else torch.maximum(prev, d2)
                ws.cache["d2_for"] = state.linearized_at
            d2 = state.extra["d2_max"]
        lam = state.damping
        delta, pred, cg_it = self.solve_linear(problem, state, ws, lam * d2)
        rec = IterationRecord(state.iteration + 1, state.cost, gradient_norm=ws.cache["gnorm"], damping=lam,
                              cg_iterations=cg_it, accepted=False, block_costs=state.block_costs)
        termination = None
        if delta is None or not pred > 0:  # invalid step: treat as rejection (Ceres' HandleInvalidStep)
            rec.cost_change, rec.rho = math.nan, math.nan
            return rec, self._reject(state, ws)
        rec.step_norm = float(delta.norm())
        tiny = self.step_too_small(problem, state, rec.step_norm)
        x_new, ctx_new, cost_new, blocks_new = self.evaluate_trial(problem, state, ws, delta)
        ws.evaluated = (x_new, cost_new)
        change = state.cost - cost_new
        rec.cost_change = change
        rho = change / pred if math.isfinite(cost_new) else -math.inf
        rec.rho = rho
        if math.isfinite(cost_new) and abs(change) <= o.function_tolerance * state.cost:
            ws.cache["message"] = f"|cost_change| / cost = {abs(change) / max(state.cost, 1e-300):.3e} <= " \
                                  f"{o.function_tolerance:.1e}"
            termination = "function_tolerance"
        if math.isfinite(cost_new) and rho > o.min_relative_decrease:
            state.x, state.cost, state.block_costs = x_new, cost_new, blocks_new
            ws.ctx, ws.lin = ctx_new, None
            state.linearized_at = state.iteration + 1
            self.update_damping_accepted(state, rho)
            rec.accepted = True
            rec.cost, rec.block_costs = cost_new, blocks_new
            return rec, termination
        if tiny and termination is None:
            # Ceres stops on any tiny step; we stop only when it also failed, since tiny accepted steps that
            # still reduce the cost by more than function_tolerance are progress (MGH 4, Brown badly scaled).
            ws.cache["message"] = f"|step| = {rec.step_norm:.3e} <= parameter_tolerance * (|x| + tol)"
            termination = "parameter_tolerance"
        return rec, termination or self._reject(state, ws)

    # ---------------------------------------------------------------- damping policy (override to change)
    def update_damping_accepted(self, state: SolverState, rho: float) -> None:
        """Nielsen (1999), in ``lambda = 1/mu`` form: ``lambda <- lambda max(1/3, 1 - (2 rho - 1)^3)``."""
        factor = max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
        state.damping = max(self.options.min_damping, state.damping * factor)
        state.nu = 2.0

    def update_damping_rejected(self, state: SolverState) -> None:
        """Nielsen: ``lambda <- lambda nu``, ``nu <- 2 nu``."""
        state.damping *= state.nu
        state.nu *= 2.0

    def _reject(self, state: SolverState, ws: Workspace) -> str | None:
        self.update_damping_rejected(state)
        if state.damping > self.options.max_damping:
            ws.cache["message"] = (
                f"lambda = {state.damping:.3e} > max_damping = {self.options.max_damping:.1e}")
            return "min_trust_region"
        return None
