"""The outer driver every solver shares: options, the start point, best-point tracking, callbacks, limits.

A concrete solver subclasses :class:`Solver`, declares its options as a dataclass ``Options`` (flat keyword
arguments, so ``hydra.utils.instantiate`` works) and implements two hooks:

* ``init_state(problem, state)``: fill solver-specific fields of a fresh :class:`SolverState`;
* ``iterate(problem, state, ws) -> (record | None, termination | None)``: one outer iteration.

The base class owns everything else: evaluation of the start point, best-point tracking, callbacks,
stopping on max iterations / time limit / KeyboardInterrupt, and the :class:`Result`. Second-order
solvers are compositions of a search and a descent over one loop (:mod:`diffrender.solvers.loop`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from diffrender.problem import Linearization, Problem
from diffrender.solvers.options import SolverOptions
from diffrender.solvers.records import IterationRecord, Result, SolverState, one_line

__all__ = ["Solver", "SolverOptions", "Workspace", "Callback", "CallbackList", "as_callback"]


@dataclass
class Workspace:
    """Per-solve scratch that is *not* part of the state (rebuilt deterministically on resume).

    ``ctx``: the prepared context at ``state.x``; ``lin``: the linearization there (``None`` until built,
    and again after every accepted step); ``evaluated``: the iteration's lowest trial ``(x, cost)``, for
    best-point tracking; ``message``: the termination message a hook left; ``m``: residual count once known.
    """

    ctx: Any = None
    lin: Linearization | None = None
    timings: dict[str, float] = field(
        default_factory=lambda: {"evaluate": 0.0, "linearize": 0.0, "linear_solve": 0.0})
    evaluated: tuple[dict[str, Tensor], float] | None = None
    message: str = ""
    m: int = 0
    start_gradient_norm: float | None = None  # max|g| at x0, once a second-order solver linearized there


Callback = Callable[[IterationRecord, dict[str, Tensor], SolverState], "bool | None"]


class CallbackList:
    """Several callbacks behind the one-callable interface: each is called every iteration, in order, and
    the solve stops when any of them returns True (so a logger still sees the iteration a stopper ends).
    A plain callable, so it also serves solvers that take a single ``callback=``."""

    def __init__(self, callbacks: Sequence[Callback | None] = ()) -> None:
        self.callbacks = [c for c in callbacks if c is not None]

    def __call__(self, record: IterationRecord, x: dict[str, Tensor], state: SolverState) -> bool:
        stop = False
        for cb in self.callbacks:
            stop = bool(cb(record, x, state)) or stop
        return stop


class _timed:
    """A callback that keeps the seconds spent in it, so that ``max_seconds`` limits the solver's own time:
    logging or metrics in a callback do not use up a solve's time budget."""

    def __init__(self, callback: Callback) -> None:
        self.callback, self.seconds = callback, 0.0

    def __call__(self, record: IterationRecord, x: dict[str, Tensor], state: SolverState) -> bool | None:
        t = time.perf_counter()
        try:
            return self.callback(record, x, state)
        finally:
            self.seconds += time.perf_counter() - t


def as_callback(callback: Callback | Sequence[Callback] | None) -> Callback | None:
    """``None``, one callable, or a sequence of callables -> one callable (or ``None``)."""
    if callback is None or callable(callback):
        return callback
    return CallbackList(list(callback))


class Solver:
    """Base class of all solvers: ``Solver(**options).solve(problem, x0, callback=None, state=None)``."""

    Options: ClassVar[type] = SolverOptions

    def __init__(self, **options: Any) -> None:
        names = {f.name for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(
                f"{type(self).__name__}: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(names))}"
            )
        self.options = self.Options(**options)
        self.validate_options()

    def __getattr__(self, name: str) -> Any:
        """Options read as attributes too: ``solver.max_iterations``."""
        options = self.__dict__.get("options")
        if options is not None and name in {f.name for f in dataclasses.fields(options)}:
            return getattr(options, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    # ---------------------------------------------------------------- hooks for subclasses
    def validate_options(self) -> None:
        o = self.options
        if o.max_iterations < 0:
            raise ValueError(f"{type(self).__name__}: max_iterations must be >= 0, got {o.max_iterations}")

    def make_workspace(self) -> Workspace:
        """A fresh workspace per solve (subclasses may return a subclass with typed fields of their own)."""
        return Workspace()

    def init_state(self, problem: Problem, state: SolverState) -> None:
        """Fill solver-specific fields of a fresh state (damping, optimizer moments...)."""

    def iterate(
        self, problem: Problem, state: SolverState, ws: Workspace
    ) -> tuple[IterationRecord | None, str | None]:
        """Do one outer iteration, updating ``state`` in place.  Return the record (``None`` if the solve
        stops before a step is attempted) and a termination reason (``None`` to go on)."""
        raise NotImplementedError

    def first_gradient_norm(self, ws: Workspace) -> float | None:
        """The gradient norm at the start point once the first iteration has computed it (for record 0)."""
        return None

    def finalize(self, problem: Problem, state: SolverState, ws: Workspace) -> None:
        """Called once when the solve ends (e.g. to store optimizer state)."""

    # ---------------------------------------------------------------- the outer loop
    def solve(
        self,
        problem: Problem,
        x0: dict[str, Tensor],
        callback: Callback | Sequence[Callback] | None = None,
        state: SolverState | None = None,
    ) -> Result:
        """Minimize ``problem``'s cost from ``x0`` (or resume from ``state``); never raises on a bad step.

        ``callback(record, x, state)`` (or a list of them, see :class:`CallbackList`) is called after the
        start point and after every iteration; returning True stops the solve."""
        callback = as_callback(callback)
        if callback is not None:
            callback = _timed(callback)
        o = self.options
        name = type(self).__name__
        start = time.perf_counter()
        counters0 = problem.counters.snapshot()
        layout = problem.layout(x0)
        x = {k: v.detach().clone() for k, v in x0.items()}
        ws = self.make_workspace()
        records: list[IterationRecord] = []
        termination: str | None = None
        message = ""
        if state is not None:
            if set(state.x) != set(x):
                raise ValueError(f"{name}: state parameters {sorted(state.x)} do not match x0 {sorted(x)}")
            if state.solver and state.solver != name:
                raise ValueError(f"{name}: cannot resume a state saved by {state.solver}")
            state = dataclasses.replace(state, x=x, extra=copy.deepcopy(state.extra),
                                        block_costs=dict(state.block_costs))
        best_x, best_cost = x, math.inf
        initial_cost = math.nan
        try:
            t = time.perf_counter()
            ws.ctx = problem.prepare_context(x)
            if state is None:
                ev = problem.evaluate(x, ws.ctx)
                ws.timings["evaluate"] += time.perf_counter() - t
                state = SolverState(x=x, cost=ev.cost, block_costs=ev.block_costs, solver=name)
                self.init_state(problem, state)
                rec = IterationRecord(0, ev.cost, block_costs=ev.block_costs, damping=state.damping,
                                      radius=state.radius, residual_evals=1, seconds=time.perf_counter() - start)
                records.append(rec)
                if not math.isfinite(ev.cost):
                    termination = "failure"
                    message = f"initial cost is not finite ({ev.cost}); check the residuals at x0"
                elif callback is not None and callback(rec, state.x, state):
                    termination, message = "callback", "the callback asked to stop"
            initial_cost = state.cost
            if math.isfinite(state.cost):
                best_x, best_cost = state.x, state.cost
            while termination is None:
                if state.iteration >= o.max_iterations:
                    termination, message = "max_iterations", f"reached max_iterations = {o.max_iterations}"
                    break
                own = time.perf_counter() - start - (callback.seconds if callback is not None else 0.0)
                if o.max_seconds is not None and own >= o.max_seconds:
                    termination, message = "time_limit", f"reached max_seconds = {o.max_seconds}"
                    break
                t_iter = time.perf_counter()
                snap = problem.counters.snapshot()
                ws.evaluated = None
                rec, termination = self.iterate(problem, state, ws)
                g0 = self.first_gradient_norm(ws)
                if len(records) == 1 and records[0].iteration == 0 and g0 is not None:
                    records[0].gradient_norm = g0  # the first linearization was at x0
                if ws.evaluated is not None and math.isfinite(ws.evaluated[1]) and ws.evaluated[1] < best_cost:
                    best_x, best_cost = ws.evaluated
                if rec is None:
                    break
                state.iteration += 1
                dt = time.perf_counter() - t_iter
                state.seconds += dt
                d = problem.counters.snapshot() - snap
                rec.iteration, rec.seconds = state.iteration, dt
                rec.jvps, rec.vjps, rec.residual_evals, rec.linearizations, rec.hvps = (
                    d.jvps, d.vjps, d.residual_evals, d.linearizations, d.hvps)
                records.append(rec)
                if o.verbose:
                    print(one_line(rec), flush=True)
                # every iteration reaches the callback, the one that ends the solve included
                if callback is not None and callback(rec, state.x, state) and termination is None:
                    termination, message = "callback", "the callback asked to stop"
        except KeyboardInterrupt:
            termination, message = "interrupted", "KeyboardInterrupt; returning the best point so far"
            if state is None:
                state = SolverState(x=x, solver=name)
        self.finalize(problem, state, ws)
        if not message:
            message = ws.message or termination or ""
        if best_cost == math.inf:
            best_x, best_cost = state.x, state.cost
        m = ws.lin.op.m if ws.lin is not None else ws.m
        return Result(
            x=best_x, cost=best_cost, termination=termination or "unknown", message=message, records=records,
            state=state, initial_cost=initial_cost, solver=name, options=dataclasses.asdict(self.options),
            counters=problem.counters.snapshot() - counters0, seconds=time.perf_counter() - start,
            timings=dict(ws.timings), n=layout.n, m=m,
        )
