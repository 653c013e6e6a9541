"""Trust-region globalization by the gain ratio, with two ways of sizing the region.

Each iteration asks the descent for a step within the current region, evaluates the cost there and
compares the actual decrease with the model's, ``rho = (cost - cost_new) / predicted``: accept when
``rho > min_relative_decrease``, and resize the region (Ceres' TrustRegionMinimizer; its
TrustRegionStrategy's StepAccepted / StepRejected / invalid-step split is the policy below). A non-finite
trial cost, a failed linear solve or a non-positive model decrease is a rejected step, never an exception;
rejected steps reuse the linearization.

Policies:

* :class:`NielsenDamping` keeps a damping ``lambda`` (the radius is ``1/lambda``): Nielsen (1999), as
  Ceres' Levenberg-Marquardt strategy: on accept ``lambda <- lambda max(1/3, 1 - (2 rho - 1)^3)``,
  ``nu = 2``; on reject ``lambda <- max(lambda nu, c)``, ``nu <- 2 nu``, where ``c`` is the model's
  curvature along the rejected step (``curvature_floor``; Nielsen and Ceres: ``c = 0``).
* :class:`ClassicalRadius` keeps a radius ``Delta`` (the damping is ``1/Delta``): on ``rho < 1/4``
  shrink to a fraction of the step's length, on ``rho > 3/4`` grow to ``max(Delta, 3 ||step||)``
  (Ceres' dogleg strategy; Nocedal & Wright, Algorithm 4.1).

The parameter tolerance stops the solve only on a tiny step that is also rejected: a tiny accepted step
that still lowers the cost by more than ``function_tolerance`` is progress on badly scaled problems (MGH 4,
Brown badly scaled). Ceres stops on any tiny step.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

from diffrender.problem import Problem
from diffrender.solvers.descent.base import Region, Step
from diffrender.solvers.records import IterationRecord, SolverState
from diffrender.solvers.search.base import Search

if TYPE_CHECKING:
    from torch import Tensor

    from diffrender.solvers.base import Workspace
    from diffrender.solvers.loop import SecondOrderSolver, Trial

__all__ = ["TrustRegion", "RegionPolicy", "NielsenDamping", "ClassicalRadius"]


class RegionPolicy:
    """How a trust region is sized: its state fields, the :class:`Region` it allows now, and its update
    after an accepted step (with the gain ratio), a rejected one, or an invalid one (no usable step).
    ``rejected`` returns a termination message when the region cannot shrink any further."""

    def init(self, state: SolverState) -> None:
        raise NotImplementedError

    def region(self, state: SolverState) -> Region:
        raise NotImplementedError

    def accepted(self, state: SolverState, rho: float, step: Step) -> None:
        raise NotImplementedError

    def rejected(self, state: SolverState, step: Step) -> str | None:
        raise NotImplementedError

    def record(self, rec: IterationRecord, region: Region) -> None:
        """Note the region used in the iteration record (``damping`` or ``radius`` column)."""


class NielsenDamping(RegionPolicy):
    """Nielsen's damping update in ``lambda`` form (Ceres' LM strategy: ``lambda = 1 / mu``)."""

    def __init__(self, initial_damping: float = 1e-4, min_damping: float = 1e-16, max_damping: float = 1e32,
                 curvature_floor: bool = True):
        self.initial_damping, self.min_damping, self.max_damping = initial_damping, min_damping, max_damping
        self.curvature_floor = curvature_floor

    def init(self, state: SolverState) -> None:
        state.damping = self.initial_damping
        state.nu = 2.0

    def region(self, state: SolverState) -> Region:
        return Region(damping=state.damping, radius=1.0 / state.damping)

    def accepted(self, state: SolverState, rho: float, step: Step) -> None:
        factor = max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3)
        state.damping = max(self.min_damping, state.damping * factor)
        state.nu = 2.0

    def rejected(self, state: SolverState, step: Step) -> str | None:
        # A damping far below the model's curvature along the rejected step leaves the next step the same
        # (a truncated CG step does not see it at all), and Nielsen's doubling takes many rejections to
        # climb from 1e-16; at least that curvature halves the step along its own direction (Moré 1978
        # shrinks the radius to at most half the rejected step's length for the same reason).
        floor = step.curvature if self.curvature_floor and math.isfinite(step.curvature) else 0.0
        state.damping = max(state.damping * state.nu, floor)
        state.nu *= 2.0
        if state.damping > self.max_damping:
            return f"lambda = {state.damping:.3e} > max_damping = {self.max_damping:.1e}"
        return None

    def record(self, rec: IterationRecord, region: Region) -> None:
        rec.damping = region.damping


class ClassicalRadius(RegionPolicy):
    """A radius in the descent's (scaled) norm: shrink on poor agreement, grow on good agreement."""

    def __init__(self, initial_radius: float = 1e4, min_radius: float = 1e-32, max_radius: float = 1e16,
                 decrease_threshold: float = 0.25, increase_threshold: float = 0.75):
        self.initial_radius, self.min_radius, self.max_radius = initial_radius, min_radius, max_radius
        self.decrease_threshold, self.increase_threshold = decrease_threshold, increase_threshold

    def init(self, state: SolverState) -> None:
        state.radius = self.initial_radius

    def region(self, state: SolverState) -> Region:
        return Region(damping=1.0 / state.radius, radius=state.radius)

    def _length(self, state: SolverState, step: Step) -> float:
        return min(state.radius, step.norm) if math.isfinite(step.norm) and step.norm > 0 else state.radius

    def accepted(self, state: SolverState, rho: float, step: Step) -> None:
        if rho < self.decrease_threshold:
            state.radius = 0.5 * self._length(state, step)
        elif rho > self.increase_threshold and math.isfinite(step.norm):
            state.radius = min(self.max_radius, max(state.radius, 3.0 * step.norm))

    def rejected(self, state: SolverState, step: Step) -> str | None:
        state.radius = 0.25 * self._length(state, step)
        if state.radius < self.min_radius:
            return f"radius = {state.radius:.3e} < min_radius = {self.min_radius:.1e}"
        return None

    def record(self, rec: IterationRecord, region: Region) -> None:
        rec.radius = region.radius


class TrustRegion(Search):
    """Gain-ratio trust region over any descent; ``policy`` sizes the region."""

    def __init__(self, policy: RegionPolicy | None = None, min_relative_decrease: float = 1e-3) -> None:
        self.policy = policy if policy is not None else NielsenDamping()
        self.min_relative_decrease = min_relative_decrease

    def init_state(self, state: SolverState) -> None:
        self.policy.init(state)

    def iterate(
        self, loop: SecondOrderSolver, problem: Problem, state: SolverState, ws: Workspace
    ) -> tuple[IterationRecord, str | None]:
        assert ws.lin is not None
        region = self.policy.region(state)
        t = time.perf_counter()
        step = loop.descent.step(loop, problem, state, ws, region)
        ws.timings["linear_solve"] += time.perf_counter() - t
        rec = IterationRecord(state.iteration + 1, state.cost, gradient_norm=ws.lin.gradient_norm,
                              cg_iterations=step.cg_iterations, accepted=False, block_costs=state.block_costs)
        self.policy.record(rec, region)
        if not step.valid:  # invalid step: a rejection (Ceres' HandleInvalidStep)
            rec.cost_change, rec.rho = math.nan, math.nan
            self._adapt_cg_cap(loop, state, step, -math.inf)
            return rec, self._reject(state, ws, step)
        delta, pred = step.delta, step.predicted
        assert delta is not None
        rec.step_norm = float(delta.norm())
        tiny = loop.step_converged(problem, state, rec.step_norm)
        trial = loop.evaluate_trial(problem, state, ws, delta, linearize=loop.options.linearize_trials)
        change = state.cost - trial.cost
        rec.cost_change = change
        finite = math.isfinite(trial.cost)
        rho = change / pred if finite else -math.inf
        rec.rho = rho
        termination = None
        if finite and (msg := loop.function_converged(state.cost, change, pred)) is not None:
            ws.message, termination = msg, "function_tolerance"
        if finite and rho > self.min_relative_decrease:
            o = loop.options
            if o.extend_truncated > 0 and termination is None and rho > o.extend_truncated and \
                    self._model_limited(loop, state, step, region, delta):
                trial = self._extend(loop, problem, state, ws, delta, trial, rec)
            self._adapt_cg_cap(loop, state, step, rho)
            loop.accept(state, ws, trial)
            self.policy.accepted(state, rho, step)
            rec.accepted, rec.cost, rec.block_costs = True, trial.cost, trial.block_costs
            return rec, termination
        self._adapt_cg_cap(loop, state, step, -math.inf)  # a rejection resets, a NaN rho (0 / 0) too
        if tiny is not None and termination is None:
            ws.message, termination = tiny, "parameter_tolerance"
        return rec, termination or self._reject(state, ws, step)

    @staticmethod
    def _adapt_cg_cap(loop: SecondOrderSolver, state: SolverState, step: Step, rho: float) -> None:
        """``max_cg_iterations_grown``: double the next step's CG cap after a step that CG cut short and whose
        gain ratio says the Gauss-Newton model held, ``0.75 <= rho < extend_truncated`` (a truncated step in
        an accurate model: more Krylov directions will pay, as Eisenstat & Walker (1996) tighten an inexact
        Newton solve where the linear model has just agreed with the function); back to
        ``max_cg_iterations`` when the model failed (``rho < 1/4``, a rejection) or under-predicted
        (``rho >= extend_truncated``, where forward tracking lengthens the step instead)."""
        o = loop.options
        if o.max_cg_iterations_grown <= o.max_cg_iterations:
            return
        cap = loop.cg_cap(state)
        high = o.extend_truncated if o.extend_truncated > 0 else math.inf
        if 0.75 <= rho < high and step.cg_iterations >= cap:
            state.extra["cg_cap"] = min(2 * cap, o.max_cg_iterations_grown)
        elif rho < 0.25 or rho >= high:
            state.extra["cg_cap"] = o.max_cg_iterations

    @staticmethod
    def _model_limited(loop: SecondOrderSolver, state: SolverState, step: Step, region: Region,
                       delta: Tensor) -> bool:
        """Whether the step's length was set by something other than the region: CG stopped at its cap, or
        the damping adds less than ``extend_damping_share`` to the model's curvature along the step,
        ``lambda ||D delta||^2 < share ||J~ delta||^2`` (i.e. ``lambda < share * step.curvature``), so the
        step is the model's own minimizer, not the region's. Only such a step may be extended: one the region
        cut short was cut for a reason (teapot_pose's first step, extended, lands in the false basin)."""
        o = loop.options
        if step.cg_iterations >= loop.cg_cap(state) and not loop.use_dense(delta.numel()):
            return True
        return o.extend_damping_share > 0 and region.damping < o.extend_damping_share * step.curvature

    @staticmethod
    def _extend(loop: SecondOrderSolver, problem: Problem, state: SolverState, ws: Workspace, delta: Tensor,
                trial: Trial, rec: IterationRecord) -> Trial:
        """Forward tracking along an accepted step that the model limited (``_model_limited``), ``t delta`` for
        ``t = 2, 4, ...`` (at most ``max_extensions`` trials) while the cost keeps falling; the lowest trial,
        noted in ``rec``.

        ``extension_rule="quadratic"`` picks each next ``t`` by safeguarded extrapolation (Nocedal & Wright,
        sec. 3.5): the minimizer of the quadratic through ``f(0)``, ``f'(0) = g.delta`` and ``f(t)``,
        clamped to ``[1.5 t, 2 t]``, and stops where it lies short of ``1.25 t``."""
        o = loop.options
        factor, norm = 1.0, rec.step_norm
        if o.extension_rule == "quadratic":
            assert ws.lin is not None
            slope = float(ws.lin.gradient @ delta)  # f'(0) along delta
        for _ in range(o.max_extensions):
            t = 2.0 * factor
            if o.extension_rule == "quadratic":
                curvature = (trial.cost - state.cost - slope * factor) / factor ** 2
                if curvature > 0:
                    t_min = -slope / (2.0 * curvature)
                    if t_min < 1.25 * factor:
                        break
                    t = min(max(t_min, 1.5 * factor), t)
            far = loop.evaluate_trial(problem, state, ws, t * delta, linearize=o.linearize_trials)
            rec.line_search_steps += 1
            if not (math.isfinite(far.cost) and far.cost < trial.cost):
                break
            trial, factor = far, t
        rec.step_norm, rec.cost_change = factor * norm, state.cost - trial.cost
        return trial

    def _reject(self, state: SolverState, ws: Workspace, step: Step) -> str | None:
        msg = self.policy.rejected(state, step)
        if msg is not None:
            ws.message = msg
            return "min_trust_region"
        return None
