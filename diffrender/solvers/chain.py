"""One solver after another: the second starts from the first's best point when the first stalls.

Levenberg-Marquardt can stop short where one stiff residual block bounds every step (README, "Why LM stopped
short": the shape scenes' normal term at sliver faces, before its normals were softened): the model allows a
decrease of ~1e-8 of the cost per step and the function tolerance ends the solve with the gradient far from
zero, while Adam's fixed-size steps go on from there. ``Chain(first=LevenbergMarquardt(...),
then=Adam(...))`` runs ``first`` until it stops by :data:`HANDOFF` (its accepted steps no longer lower the
cost) and gives ``then`` the rest of the budget; any other stop ends the chain there. With
``patience > 0``, ``then`` stops when its best cost has not fallen by more than ``patience_tolerance`` x the
initial cost in ``patience`` iterations.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from diffrender.problem import Problem
from diffrender.solvers.base import Callback, Solver, as_callback
from diffrender.solvers.options import ChainOptions
from diffrender.solvers.records import IterationRecord, Result, SolverState

__all__ = ["Chain", "ChainOptions", "HANDOFF"]

# the terminations that hand the solve on: accepted steps that no longer lower the cost (LM on the shape
# scenes). Not a tiny rejected step (parameter tolerance) or a region that cannot shrink: there the model
# has resolved a minimum (LM on teapot_pose and lights_albedo ends so), and a first-order solver only
# wanders around it; nor the gradient test, a limit, a callback, an interruption or a failure.
HANDOFF = ("function_tolerance",)


class Chain(Solver):
    """``Chain(first=solver_a, then=solver_b, max_iterations=500, max_seconds=None).solve(problem, x0)``.

    The budgets (``max_iterations``, ``max_seconds``) are the chain's and are shared: each solver gets what
    is left of them (their own limits are overridden). The records are numbered on from one solver to the
    next (the second's start point, the first's best point, is not repeated), the result's ``x`` is the best
    point of either, and a ``state`` saved by either solver (``state.extra["chain"]`` says which, and where
    the chain's numbering stood) resumes that solver and the chain after it."""

    Options: ClassVar[type] = ChainOptions

    def __init__(self, *, first: Solver, then: Solver, **options: Any) -> None:
        super().__init__(**options)
        for key, solver in (("first", first), ("then", then)):
            if not isinstance(solver, Solver):
                raise TypeError(f"Chain: {key} must be a diffrender Solver, got {type(solver).__name__}")
        self.solvers = [first, then]

    def validate_options(self) -> None:
        super().validate_options()
        o = self.options
        if o.patience < 0 or not o.patience_tolerance >= 0:
            raise ValueError(f"Chain: patience and patience_tolerance must be >= 0 (0: off), got {o.patience} "
                             f"and {o.patience_tolerance}")

    def solve(self, problem: Problem, x0: dict[str, Tensor], callback: Callback | Sequence[Callback] | None = None,
              state: SolverState | None = None) -> Result:
        """Run ``first``, then (on a stop in :data:`HANDOFF`) ``then`` from its best point; see the class."""
        user = as_callback(callback)
        o = self.options
        start, counters0 = time.perf_counter(), problem.counters.snapshot()
        names = [type(s).__name__ for s in self.solvers]
        begin, offset, initial = 0, 0, math.nan
        if state is not None:  # resume the solver that saved the state, numbered on where the chain was
            info = state.extra.get("chain") or {}
            begin, offset, initial = info.get("phase"), info.get("offset", 0), info.get("initial", math.nan)
            if begin is None and state.solver in names:
                begin = names.index(state.solver)
            if begin is None or begin >= len(names) or names[begin] != state.solver:
                raise ValueError(f"Chain({', '.join(names)}): cannot resume a state saved by {state.solver!r}")
        # the chain's iterations so far, the callbacks' seconds (left out of the time budget, as every solver
        # does), the number of the last record reported, and the chain's start cost (the patience test's scale)
        spent = {"iterations": offset + (state.iteration if state is not None else 0), "callbacks": 0.0,
                 "last": offset, "initial": initial}
        results: list[Result] = []
        x = x0
        for k in range(begin, len(self.solvers)):
            solver = self.solvers[k]
            resumed = state if k == begin else None
            left_it = o.max_iterations - spent["iterations"]
            own = time.perf_counter() - start - spent["callbacks"]
            left_s = None if o.max_seconds is None else o.max_seconds - own
            if results and (left_it <= 0 or (left_s is not None and left_s <= 0)):
                break
            done = resumed.iteration if resumed is not None else 0
            inner = dataclasses.replace(solver.options, max_iterations=done + max(left_it, 0), max_seconds=left_s)
            offset = spent["last"]  # where the numbering stands (the resumed offset for the first solver run)

            watch = {"best": math.inf, "since": 0, "stalled": False, "user": False}

            def forward(rec: IterationRecord, xk: dict[str, Tensor], st: SolverState, k: int = k,
                        offset: int = offset, watch: dict = watch) -> bool:
                if rec.iteration == 0 and k == 0:
                    spent["initial"] = rec.cost
                st.extra["chain"] = {"phase": k, "offset": offset, "initial": spent["initial"]}  # for a resume
                if rec.iteration == 0 and k > begin:
                    watch["best"] = rec.cost
                    return False  # the previous solver's best point, already reported
                spent["iterations"] += 1 if rec.iteration > 0 else 0
                rec.iteration += offset
                spent["last"] = rec.iteration
                if k > 0 and o.patience > 0 and math.isfinite(spent["initial"]):
                    if rec.cost < watch["best"] - o.patience_tolerance * spent["initial"]:
                        watch["best"], watch["since"] = rec.cost, 0
                    else:
                        watch["since"] += 1
                    watch["stalled"] = watch["since"] >= o.patience
                stop = False
                if user is not None:
                    t = time.perf_counter()
                    try:
                        stop = watch["user"] = bool(user(rec, xk, st))
                    finally:
                        spent["callbacks"] += time.perf_counter() - t
                return stop or watch["stalled"]

            saved, solver.options = solver.options, inner
            try:
                res = solver.solve(problem, x, callback=forward, state=resumed)
            finally:
                solver.options = saved
            if watch["stalled"] and not watch["user"] and res.termination == "callback":
                res.termination = "function_tolerance"
                res.message = (f"its best cost fell by at most {o.patience_tolerance:.1e} x the initial cost "
                               f"({spent['initial']:.6e}) in {o.patience} iterations")
            results.append(res)
            x = res.x
            if res.termination not in HANDOFF:
                break
        return self._merge(results, names[begin:begin + len(results)], problem, counters0, start)

    def _merge(self, results: list[Result], names: list[str], problem: Problem, counters0: Any,
               start: float) -> Result:
        """One result from the solvers' results: the best point, the records numbered on, summed timings."""
        best = min(results, key=lambda r: r.cost if math.isfinite(r.cost) else math.inf)
        # a later solver's first record is its start point, the previous solver's best: not repeated
        records = [rec for i, r in enumerate(results) for rec in (r.records if i == 0 else r.records[1:])]
        timings: dict[str, float] = {}
        for r in results:
            for key, v in r.timings.items():
                timings[key] = timings.get(key, 0.0) + v
        last = results[-1]
        message = "; then ".join(f"{name}: {r.termination} ({r.message})" for name, r in zip(names, results,
                                                                                              strict=True))
        return Result(x=best.x, cost=best.cost, termination=last.termination, message=message, records=records,
                      state=last.state, initial_cost=results[0].initial_cost, solver=f"Chain({', '.join(names)})",
                      options=dataclasses.asdict(self.options), counters=problem.counters.snapshot() - counters0,
                      seconds=time.perf_counter() - start, timings=timings, n=last.n, m=max(r.m for r in results))
