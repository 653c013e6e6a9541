"""The one second-order loop: linearize, let the descent propose a step, let the search decide.

Every second-order solver is ``SecondOrderSolver(search=..., descent=...)``: the loop owns the
linearization record (:class:`~diffrender.problem.Linearization`: value, gradient, operator, diagonal),
the trial evaluations, the acceptance of a point, and the convergence tests with their messages; a
*search* (:mod:`diffrender.solvers.search`: trust region, line search) decides what to do with a step;
a *descent* (:mod:`diffrender.solvers.descent`: damped Gauss-Newton, dogleg, Steihaug-Newton) computes
it. Levenberg-Marquardt is trust region + damped Gauss-Newton, Gauss-Newton is line search + undamped
Gauss-Newton, Dogleg is trust region + dogleg, Newton-CG is trust region + Steihaug-Toint CG.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffrender.linalg.operator import StackedOperator
from diffrender.problem import Linearization, Problem
from diffrender.solvers.base import Solver, Workspace
from diffrender.solvers.descent.base import Descent
from diffrender.solvers.options import SecondOrderOptions
from diffrender.solvers.records import IterationRecord, SolverState
from diffrender.solvers.search.base import Search

__all__ = ["SecondOrderOptions", "SecondOrderSolver", "Trial"]


@dataclass
class Trial:
    """A candidate point: parameters, prepared context, cost (may be nan/inf) and per-block costs."""

    x: dict[str, Tensor]
    ctx: Any
    cost: float
    block_costs: dict[str, float]
    lin: Linearization | None = None


class SecondOrderSolver(Solver):
    """``SecondOrderSolver(search=TrustRegion(...), descent=DampedGaussNewton(), **options)``.

    Subclasses (LevenbergMarquardt, GaussNewton, Dogleg, NewtonCG) build their search and descent from
    their flat options in :meth:`make_search` / :meth:`make_descent`, so Hydra can instantiate them.
    """

    Options: ClassVar[type] = SecondOrderOptions

    def __init__(self, *, search: Search | None = None, descent: Descent | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.search = search if search is not None else self.make_search()
        self.descent = descent if descent is not None else self.make_descent()
        if self.search is None or self.descent is None:
            raise TypeError(f"{type(self).__name__}: give search= and descent= (or subclass and make them)")

    def make_search(self) -> Search | None:
        return None

    def make_descent(self) -> Descent | None:
        return None

    def validate_options(self) -> None:
        super().validate_options()
        o = self.options
        name = type(self).__name__
        choices = {"linear_solver": ("auto", "dense", "cg"), "jvp_mode": ("auto", "transpose", "linearize", "jvp"),
                   "gradient_test": ("max_norm", "relative", "cosine"), "function_test": ("ceres", "minpack"),
                   "extension_rule": ("doubling", "quadratic")}
        for key, allowed in choices.items():
            if getattr(o, key) not in allowed:
                raise ValueError(f"{name}: {key} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(o, key)!r}")
        if o.diagonal_every < 1:
            raise ValueError(f"{name}: diagonal_every must be >= 1, got {o.diagonal_every}")
        if not 0.0 < o.curvature_subsample <= 1.0:
            raise ValueError(f"{name}: curvature_subsample must be in (0, 1], got {o.curvature_subsample}")
        if o.hutchinson_probes < 1:
            raise ValueError(f"{name}: hutchinson_probes must be >= 1, got {o.hutchinson_probes}")
        if not o.extend_truncated >= 0.0:
            raise ValueError(f"{name}: extend_truncated must be >= 0 (0: off), got {o.extend_truncated}")
        if not o.extend_damping_share >= 0.0:
            raise ValueError(f"{name}: extend_damping_share must be >= 0 (0: off), got {o.extend_damping_share}")
        if o.max_extensions < 1:
            raise ValueError(f"{name}: max_extensions must be >= 1, got {o.max_extensions}")
        if o.max_cg_iterations_grown < 0:
            raise ValueError(f"{name}: max_cg_iterations_grown must be >= 0 (0: off), got {o.max_cg_iterations_grown}")

    def init_state(self, problem: Problem, state: SolverState) -> None:
        self.search.init_state(state)

    # ---------------------------------------------------------------- one iteration
    def iterate(
        self, problem: Problem, state: SolverState, ws: Workspace
    ) -> tuple[IterationRecord | None, str | None]:
        term = self.linearize(problem, state, ws)
        if term is not None:
            return None, term
        return self.search.iterate(self, problem, state, ws)

    def first_gradient_norm(self, ws: Workspace) -> float | None:
        return ws.start_gradient_norm

    # ---------------------------------------------------------------- the linearization
    def use_dense(self, n: int) -> bool:
        """Dense Cholesky on the assembled ``J~^T J~`` (small ``n``) rather than matrix-free PCG."""
        o = self.options
        return o.linear_solver == "dense" or (o.linear_solver == "auto" and n <= o.dense_threshold)

    def linearize(self, problem: Problem, state: SolverState, ws: Workspace) -> str | None:
        """Build ``ws.lin`` at ``state.x`` unless done; return a termination reason when the gradient test
        is met or the gradient is not finite."""
        if ws.lin is not None and ws.lin.gradient_ready:
            return None
        t = time.perf_counter()
        lin = ws.lin if ws.lin is not None else problem.linearize(state.x, ws.ctx, jvp_mode=self.jvp_mode(),
                                                                       batched_columns=self.options.batched_columns)
        if self.use_dense(lin.op.n):
            lin.dense_jtj()
            if self.options.gradient_from_columns:
                lin.gradient_from_columns()
        lin.gradient  # noqa: B018 - one VJP (unless made above), now, so its time counts as linearization
        ws.timings["linearize"] += time.perf_counter() - t
        ws.lin, ws.m = lin, lin.op.m
        if state.iteration == 0:
            ws.start_gradient_norm = lin.gradient_norm
        return self.gradient_converged(lin, state, ws)

    def cg_cap(self, state: SolverState) -> int:
        """CG iterations allowed for the next step: ``max_cg_iterations``, or what the trust region grew it to
        (``max_cg_iterations_grown``; kept in ``state.extra["cg_cap"]`` so a resumed solve continues it)."""
        return int(state.extra.get("cg_cap", self.options.max_cg_iterations))

    def jvp_mode(self) -> str:
        return "transpose" if self.options.jvp_mode == "auto" else self.options.jvp_mode

    def diagonal(self, state: SolverState, ws: Workspace) -> Tensor:
        """``diag(J~^T J~)`` at the current linearization: from the dense matrix, exactly from ``n``
        columns when ``n <= dense_threshold``, else by Hutchinson probes seeded by (seed, the iteration of
        this linearization) so a resumed solve rebuilds it bit-identically. Computed once per point."""
        lin = ws.lin
        assert lin is not None
        if lin.diagonal is None:
            t = time.perf_counter()
            o = self.options
            if self.use_dense(lin.op.n):
                lin.diagonal = lin.dense_jtj().diagonal().clone()
            elif lin.op.n <= o.dense_threshold:
                lin.diagonal = lin.op.diag_exact()
            elif o.diagonal_every > 1 and state.extra.get("diagonal") is not None and \
                    state.linearized_at - state.extra["diagonal_at"] < o.diagonal_every and \
                    state.extra["diagonal"].shape == (lin.op.n,):
                lin.diagonal = state.extra["diagonal"]  # reused: amortized over diagonal_every points
            else:
                gen = torch.Generator().manual_seed(o.seed * 1_000_003 + state.linearized_at)
                lin.diagonal = lin.op.diag_hutchinson(o.hutchinson_probes, gen)
                if o.diagonal_every > 1:
                    state.extra["diagonal"], state.extra["diagonal_at"] = lin.diagonal, state.linearized_at
            ws.timings["linearize"] += time.perf_counter() - t
        return lin.diagonal

    def curvature(self, problem: Problem, state: SolverState, ws: Workspace) -> Callable[[Tensor], Tensor]:
        """``v -> J~^T J~ v`` for CG: exact, or over a rotating subset of the sampled terms scaled by
        ``|sampled| / |subset|`` (``curvature_subsample < 1``), the other terms always included."""
        op = ws.lin.op
        frac = self.options.curvature_subsample
        if frac >= 1.0 or not isinstance(op, StackedOperator):
            return op.jtj
        sampled = [t for t in problem.sampled_terms if t in op.ops or t in problem.remote_terms]
        fixed = [t for t in [*op.ops, *problem.remote_terms] if t not in sampled]
        if not sampled:
            return op.jtj
        k = max(1, math.ceil(frac * len(sampled)))
        first = (state.linearized_at * k) % len(sampled)
        chosen = [sampled[(first + i) % len(sampled)] for i in range(k)]
        scale = len(sampled) / k

        def matvec(v: Tensor) -> Tensor:
            out = scale * op.jtj(v, chosen)
            return out + op.jtj(v, fixed) if fixed else out

        return matvec

    # ---------------------------------------------------------------- trial points
    def evaluate_trial(self, problem: Problem, state: SolverState, ws: Workspace, delta: Tensor,
                       linearize: bool = False) -> Trial:
        """``x (+) delta``, its prepared context and its cost (nan/inf allowed, never raises on them); with
        ``linearize`` the trial's linearization too (its forward gives the cost)."""
        t = time.perf_counter()
        layout = problem.layout(state.x)
        with torch.no_grad():
            x_new = {k: v.detach() for k, v in layout.retract(state.x, delta).items()}
        ctx = problem.prepare_context(x_new)
        lin = None
        if linearize:
            lin = problem.linearize(x_new, ctx, jvp_mode=self.jvp_mode(),
                                    batched_columns=self.options.batched_columns)
            problem.counters.residual_evals += 1
            ev = lin.evaluation
        else:
            ev = problem.evaluate(x_new, ctx)
        ws.timings["linearize" if linearize else "evaluate"] += time.perf_counter() - t
        # the lowest trial of the iteration (not the last: forward tracking ends on a higher one)
        if ws.evaluated is None or ev.cost < ws.evaluated[1] or not math.isfinite(ws.evaluated[1]):
            ws.evaluated = (x_new, ev.cost)
        return Trial(x_new, ctx, ev.cost, ev.block_costs, lin)

    def accept(self, state: SolverState, ws: Workspace, trial: Trial) -> None:
        """Move to ``trial``: the next iteration linearizes there (or uses the trial's linearization)."""
        state.x, state.cost, state.block_costs = trial.x, trial.cost, trial.block_costs
        ws.ctx, ws.lin = trial.ctx, trial.lin
        state.linearized_at = state.iteration + 1

    # ---------------------------------------------------------------- convergence tests (all of them, here)
    def gradient_converged(self, lin: Linearization, state: SolverState, ws: Workspace) -> str | None:
        o = self.options
        gnorm = lin.gradient_norm
        if not math.isfinite(gnorm):
            ws.message = "the gradient is not finite at the current point"
            return "failure"
        if o.gradient_test == "max_norm":
            if gnorm <= o.gradient_tolerance:
                ws.message = f"max|gradient| = {gnorm:.3e} <= {o.gradient_tolerance:.1e}"
                return "gradient_tolerance"
            return None
        if o.gradient_test == "relative":
            g0 = state.extra.setdefault("gradient_scale", gnorm)
            if gnorm <= o.gradient_tolerance * g0:
                ws.message = f"max|gradient| = {gnorm:.3e} <= {o.gradient_tolerance:.1e} * max|gradient at x0|"
                return "gradient_tolerance"
            return None
        # MINPACK (lmder): max_j |(J^T r)_j| / (||J_j|| ||r||); columns with ||J_j|| = 0 do not count
        rnorm = lin.op.norm(lin.residual)
        col = self.diagonal(state, ws).sqrt()
        cos = torch.where(col > 0, lin.gradient.abs() / (col * max(rnorm, 1e-300)), torch.zeros_like(col))
        worst = float(cos.max()) if cos.numel() else 0.0
        if rnorm == 0.0 or worst <= o.gradient_tolerance:
            ws.message = f"max |cos(residual, J column)| = {worst:.3e} <= {o.gradient_tolerance:.1e}"
            return "gradient_tolerance"
        return None

    def function_converged(self, cost: float, change: float, predicted: float) -> str | None:
        """``|cost_change| / cost <= function_tolerance`` (and, with ``function_test="minpack"``, the
        predicted relative decrease too); ``cost`` is the cost before the step. The message, or None."""
        o = self.options
        tol = o.function_tolerance
        if not abs(change) <= tol * cost:
            return None
        if o.function_test == "minpack" and not predicted <= tol * cost:
            return None
        return f"|cost_change| / cost = {abs(change) / max(cost, 1e-300):.3e} <= {tol:.1e}"

    def step_converged(self, problem: Problem, state: SolverState, step_norm: float) -> str | None:
        """Ceres' parameter tolerance: ``|delta| <= tol (|x| + tol)``. The message, or None."""
        tol = self.options.parameter_tolerance
        x_norm = float(torch.linalg.vector_norm(problem.layout(state.x).flatten(state.x)))
        if step_norm <= tol * (x_norm + tol):
            return f"|step| = {step_norm:.3e} <= parameter_tolerance * (|x| + tol)"
        return None
