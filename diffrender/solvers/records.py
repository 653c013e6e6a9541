"""What a solve leaves behind: per-iteration records, the resumable state, and the result with its report.

Plain data shared by every solver; the report follows Ceres' iteration table and summary.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from diffrender.linalg.operator import Counters

__all__ = ["IterationRecord", "SolverState", "Result", "CONVERGED"]

# termination reasons that mean "converged"
CONVERGED = ("function_tolerance", "gradient_tolerance", "parameter_tolerance")


@dataclass
class IterationRecord:
    """One outer iteration (one attempted step).  Iteration 0 is the start point.

    ``cost``: cost at the current point after the iteration; ``cost_change``: old cost minus trial cost
    (of the attempted step, accepted or not); ``gradient_norm``: max-norm of the gradient at the point
    the step was computed from; ``rho``: actual / predicted decrease; ``damping``: LM's lambda
    (``1/mu``); product counts and ``seconds`` are for this iteration only.
    """

    iteration: int
    cost: float
    cost_change: float = 0.0
    gradient_norm: float = math.nan
    step_norm: float = 0.0
    rho: float = math.nan
    damping: float = math.nan
    cg_iterations: int = 0
    jvps: int = 0
    vjps: int = 0
    residual_evals: int = 0
    seconds: float = 0.0
    accepted: bool = True
    block_costs: dict[str, float] = field(default_factory=dict)
    line_search_steps: int = 0
    linearizations: int = 0
    hvps: int = 0
    radius: float = math.nan


@dataclass
class SolverState:
    """Everything needed to resume a solve exactly: ``solve(problem, state.x, state=state)``.

    Picklable by ``torch.save`` (and loadable by ``torch.load`` with the default ``weights_only=True``).
    ``x`` is the current point (for LM/GN also the best); ``damping``/``nu`` or ``radius``: the trust
    region's state; ``linearized_at`` seeds the Hutchinson probes so a rebuilt linearization is
    bit-identical; ``extra`` holds solver-specific data (Adam's moments, LM's running scaling).
    """

    x: dict[str, Tensor]
    iteration: int = 0
    cost: float = math.nan
    block_costs: dict[str, float] = field(default_factory=dict)
    damping: float = math.nan
    nu: float = 2.0
    linearized_at: int = 0
    seconds: float = 0.0
    radius: float = math.nan
    solver: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


torch.serialization.add_safe_globals([SolverState])


@dataclass
class Result:
    """Outcome of :meth:`Solver.solve`.  ``x``/``cost``: best point seen; ``state``: resumable state."""

    x: dict[str, Tensor]
    cost: float
    termination: str
    message: str
    records: list[IterationRecord]
    state: SolverState
    initial_cost: float
    solver: str
    options: dict[str, Any]
    counters: Counters
    seconds: float
    timings: dict[str, float]
    n: int = 0
    m: int = 0

    @property
    def converged(self) -> bool:
        """True when a convergence tolerance (function, gradient, parameter) stopped the solve."""
        return self.termination in CONVERGED

    @property
    def iterations(self) -> int:
        """Number of outer iterations (attempted steps) in this call."""
        return sum(1 for r in self.records if r.iteration > 0)

    def report(self) -> str:
        """A Ceres-style table of the iterations followed by a summary."""
        by_radius = any(math.isfinite(r.radius) for r in self.records)
        region = "radius" if by_radius else "lambda"
        head = (
            f"{'iter':>4} {'cost':>13} {'cost_change':>11} {'|gradient|':>10} {'|step|':>10} {'rho':>10} "
            f"{region:>9} {'cg':>4} {'jvps':>5} {'vjps':>5} {'evals':>5} {'iter_time':>9}"
        )
        lines = [head]
        for r in self.records:
            lines.append(
                f"{r.iteration:>4d} {r.cost:>13.6e} {r.cost_change:>11.2e} {r.gradient_norm:>10.2e} "
                f"{r.step_norm:>10.2e} {r.rho:>10.2e} {r.radius if by_radius else r.damping:>9.2e} "
                f"{r.cg_iterations:>4d} {r.jvps:>5d} {r.vjps:>5d} {r.residual_evals:>5d} {r.seconds:>9.2e}"
                + ("" if r.accepted else "  (rejected)")
            )
        steps = [r for r in self.records if r.iteration > 0]
        ok = sum(r.accepted for r in steps)
        c = self.counters
        opts = textwrap.fill(", ".join(f"{k}={v}" for k, v in self.options.items()), 100,
                             subsequent_indent="    ")
        lines += [
            "",
            f"Solver summary ({self.solver}: {opts})",
            f"  Parameters (tangent)     {self.n:>14d}",
            f"  Residuals                {self.m:>14d}",
            f"  Initial cost             {self.initial_cost:>14.6e}",
            f"  Final cost               {self.cost:>14.6e}",
            f"  Change                   {self.initial_cost - self.cost:>14.6e}",
            f"  Steps  successful        {ok:>14d}",
            f"         unsuccessful      {len(steps) - ok:>14d}",
            f"  Residual evaluations     {c.residual_evals:>14d}",
            f"  Linearizations           {c.linearizations:>14d}",
            f"  JVPs / VJPs              {c.jvps:>6d} / {c.vjps:<6d}",
            *([f"  Hessian-vector products  {c.hvps:>14d}"] if c.hvps else []),
            f"  CG iterations            {sum(r.cg_iterations for r in steps):>14d}",
            f"  Time: evaluate           {self.timings.get('evaluate', 0.0):>13.3f}s",
            f"        linearize          {self.timings.get('linearize', 0.0):>13.3f}s",
            f"        linear solve       {self.timings.get('linear_solve', 0.0):>13.3f}s",
            f"        total              {self.seconds:>13.3f}s",
            f"Termination: {self.termination.upper()} ({self.message})",
        ]
        return "\n".join(lines)


def one_line(r: IterationRecord) -> str:
    """One iteration as one line (``verbose=True``)."""
    region = f"radius {r.radius:.2e}" if math.isfinite(r.radius) else f"lambda {r.damping:.2e}"
    return (
        f"iter {r.iteration:4d}  cost {r.cost:.6e}  change {r.cost_change:.2e}  |g| {r.gradient_norm:.2e}  "
        f"|step| {r.step_norm:.2e}  rho {r.rho:.2e}  {region}  cg {r.cg_iterations}  "
        f"{'ok' if r.accepted else 'rejected'}  {r.seconds:.2e}s"
    )
