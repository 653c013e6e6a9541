"""Shared solver machinery: options, per-iteration records, resumable state, the outer loop, the report.

A concrete solver subclasses :class:`Solver`, declares its options as a dataclass ``Options`` (flat keyword
arguments, so ``hydra.utils.instantiate`` works) and implements two hooks:

* ``init_state(problem, state)``: fill solver-specific fields of a fresh :class:`SolverState`;
* ``iterate(problem, state, ws) -> (record | None, termination | None)``: one outer iteration.

The base class owns everything else: evaluation of the start point, best-point tracking, callbacks,
stopping on max iterations / time limit / KeyboardInterrupt, and the :class:`Result`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from diffrender.linalg.cg import pcg
from diffrender.linalg.operator import Counters
from diffrender.problem import Linearization, PreconditionerInfo, Problem

__all__ = ["Solver", "SolverOptions", "SolverState", "IterationRecord", "Result", "Workspace", "Callback",
           "CallbackList", "as_callback"]

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


@dataclass
class SolverState:
    """Everything needed to resume a solve exactly: ``solve(problem, state.x, state=state)``.

    Picklable by ``torch.save`` (and loadable by ``torch.load`` with the default ``weights_only=True``).
    ``x`` is the current point (for LM/GN also the best); ``linearized_at`` seeds the Hutchinson probes
    so a rebuilt linearization is bit-identical; ``extra`` holds solver-specific data (Adam's moments).
    """

    x: dict[str, Tensor]
    iteration: int = 0
    cost: float = math.nan
    block_costs: dict[str, float] = field(default_factory=dict)
    damping: float = math.nan
    nu: float = 2.0
    linearized_at: int = 0
    seconds: float = 0.0
    solver: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


torch.serialization.add_safe_globals([SolverState])


@dataclass
class Workspace:
    """Per-solve scratch that is *not* part of the state (rebuilt deterministically on resume)."""

    ctx: Any = None
    lin: Linearization | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(
        default_factory=lambda: {"evaluate": 0.0, "linearize": 0.0, "linear_solve": 0.0})
    evaluated: tuple[dict[str, Tensor], float] | None = None  # last (x, cost) evaluated, for best tracking


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


def as_callback(callback: Callback | Sequence[Callback] | None) -> Callback | None:
    """``None``, one callable, or a sequence of callables -> one callable (or ``None``)."""
    if callback is None or callable(callback):
        return callback
    return CallbackList(list(callback))


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
        head = (
            f"{'iter':>4} {'cost':>13} {'cost_change':>11} {'|gradient|':>10} {'|step|':>10} {'rho':>10} "
            f"{'lambda':>9} {'cg':>4} {'jvps':>5} {'vjps':>5} {'evals':>5} {'iter_time':>9}"
        )
        lines = [head]
        for r in self.records:
            lines.append(
                f"{r.iteration:>4d} {r.cost:>13.6e} {r.cost_change:>11.2e} {r.gradient_norm:>10.2e} "
                f"{r.step_norm:>10.2e} {r.rho:>10.2e} {r.damping:>9.2e} {r.cg_iterations:>4d} {r.jvps:>5d} "
                f"{r.vjps:>5d} {r.residual_evals:>5d} {r.seconds:>9.2e}"
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
            f"  CG iterations            {sum(r.cg_iterations for r in steps):>14d}",
            f"  Time: evaluate           {self.timings.get('evaluate', 0.0):>13.3f}s",
            f"        linearize          {self.timings.get('linearize', 0.0):>13.3f}s",
            f"        linear solve       {self.timings.get('linear_solve', 0.0):>13.3f}s",
            f"        total              {self.seconds:>13.3f}s",
            f"Termination: {self.termination.upper()} ({self.message})",
        ]
        return "\n".join(lines)


@dataclass
class SolverOptions:
    """Options shared by all solvers (Ceres defaults for the tolerances)."""

    max_iterations: int = 50
    function_tolerance: float = 1e-6  # stop when |cost_change| / cost <= this
    gradient_tolerance: float = 1e-10  # stop when max|gradient| <= this
    parameter_tolerance: float = 1e-8  # stop when |step| <= this * (|x| + this)
    max_seconds: float | None = None  # wall-clock limit for one solve() call
    verbose: bool = False  # print each iteration record


def _finite(v: float) -> bool:
    return math.isfinite(v)


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

    def init_state(self, problem: Problem, state: SolverState) -> None:
        """Fill solver-specific fields of a fresh state (damping, optimizer moments...)."""

    def iterate(
        self, problem: Problem, state: SolverState, ws: Workspace
    ) -> tuple[IterationRecord | None, str | None]:
        """Do one outer iteration, updating ``state`` in place.  Return the record (``None`` if the solve
        stops before a step is attempted) and a termination reason (``None`` to go on)."""
        raise NotImplementedError

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
        o = self.options
        name = type(self).__name__
        start = time.perf_counter()
        counters0 = problem.counters.snapshot()
        layout = problem.layout(x0)
        x = {k: v.detach().clone() for k, v in x0.items()}
        ws = Workspace()
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
                                      residual_evals=1, seconds=time.perf_counter() - start)
                records.append(rec)
                if not _finite(ev.cost):
                    termination = "failure"
                    message = f"initial cost is not finite ({ev.cost}); check the residuals at x0"
                elif callback is not None and callback(rec, state.x, state):
                    termination, message = "callback", "the callback asked to stop"
            initial_cost = state.cost
            if _finite(state.cost):
                best_x, best_cost = state.x, state.cost
            while termination is None:
                if state.iteration >= o.max_iterations:
                    termination, message = "max_iterations", f"reached max_iterations = {o.max_iterations}"
                    break
                if o.max_seconds is not None and time.perf_counter() - start >= o.max_seconds:
                    termination, message = "time_limit", f"reached max_seconds = {o.max_seconds}"
                    break
                t_iter = time.perf_counter()
                snap = problem.counters.snapshot()
                ws.evaluated = None
                rec, termination = self.iterate(problem, state, ws)
                if len(records) == 1 and records[0].iteration == 0 and "gnorm" in ws.cache:
                    records[0].gradient_norm = ws.cache["gnorm"]  # the first linearization was at x0
                if ws.evaluated is not None and _finite(ws.evaluated[1]) and ws.evaluated[1] < best_cost:
                    best_x, best_cost = ws.evaluated
                if rec is None:
                    break
                state.iteration += 1
                dt = time.perf_counter() - t_iter
                state.seconds += dt
                d = problem.counters.snapshot() - snap
                rec.iteration, rec.seconds = state.iteration, dt
                rec.jvps, rec.vjps, rec.residual_evals, rec.linearizations = (
                    d.jvps, d.vjps, d.residual_evals, d.linearizations)
                records.append(rec)
                if o.verbose:
                    print(_one_line(rec), flush=True)
                if termination is None and callback is not None and callback(rec, state.x, state):
                    termination, message = "callback", "the callback asked to stop"
        except KeyboardInterrupt:
            termination, message = "interrupted", "KeyboardInterrupt; returning the best point so far"
            if state is None:
                state = SolverState(x=x, solver=name)
        self.finalize(problem, state, ws)
        if not message:
            message = ws.cache.get("message", termination or "")
        if best_cost == math.inf:
            best_x, best_cost = state.x, state.cost
        m = ws.lin.op.m if ws.lin is not None else int(ws.cache.get("m", 0))
        return Result(
            x=best_x, cost=best_cost, termination=termination or "unknown", message=message, records=records,
            state=state, initial_cost=initial_cost, solver=name, options=dataclasses.asdict(self.options),
            counters=problem.counters.snapshot() - counters0, seconds=time.perf_counter() - start,
            timings=dict(ws.timings), n=layout.n, m=m,
        )


def _one_line(r: IterationRecord) -> str:
    return (
        f"iter {r.iteration:4d}  cost {r.cost:.6e}  change {r.cost_change:.2e}  |g| {r.gradient_norm:.2e}  "
        f"|step| {r.step_norm:.2e}  rho {r.rho:.2e}  lambda {r.damping:.2e}  cg {r.cg_iterations}  "
        f"{'ok' if r.accepted else 'rejected'}  {r.seconds:.2e}s"
    )


# ----------------------------------------------------------------------------------------------------------
# Shared machinery of the second-order solvers (Gauss-Newton, Levenberg-Marquardt)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SecondOrderOptions(SolverOptions):
    """Options of the linearize-then-solve solvers."""

    linear_solver: str = "auto"  # "dense" (Cholesky on the assembled J^T J), "cg" (matrix-free PCG), "auto"
    dense_threshold: int = 64  # "auto" picks dense when n <= this; exact diag(J^T J) from columns too
    max_cg_iterations: int = 100
    cg_rtol: float = 1e-10  # CG residual tolerance relative to ||J^T r||
    eta: float = 0.1  # Nash-Sofer forcing; <= 0 disables it
    hutchinson_probes: int = 16  # VJPs per diag(J^T J) estimate when n > dense_threshold
    seed: int = 0  # seeds the Hutchinson probes (with the iteration number)
    # "transpose" (VJP of the reused VJP), "linearize", "jvp" (plain torch.func.jvp per product),
    # "auto" = "transpose": measured on teapot_pose (n = 3) too, it beats plain jvp (0.08 vs 0.12 s per
    # iteration) and skips forward-mode AD's one-time set-up
    jvp_mode: str = "auto"


class SecondOrderSolver(Solver):
    """Base of Gauss-Newton and Levenberg-Marquardt: linearization, diag(J^T J), and the linear solve."""

    Options: ClassVar[type] = SecondOrderOptions

    def validate_options(self) -> None:
        super().validate_options()
        o = self.options
        if o.linear_solver not in ("auto", "dense", "cg"):
            raise ValueError(f"{type(self).__name__}: linear_solver must be 'auto', 'dense' or 'cg', "
                             f"got {o.linear_solver!r}")
        if o.jvp_mode not in ("auto", "transpose", "linearize", "jvp"):
            raise ValueError(f"{type(self).__name__}: jvp_mode must be 'auto', 'transpose', 'linearize' or "
                             f"'jvp', got {o.jvp_mode!r}")
        if o.hutchinson_probes < 1:
            raise ValueError(
                f"{type(self).__name__}: hutchinson_probes must be >= 1, got {o.hutchinson_probes}")

    def use_dense(self, n: int) -> bool:
        o = self.options
        return o.linear_solver == "dense" or (o.linear_solver == "auto" and n <= o.dense_threshold)

    def ensure_linearization(self, problem: Problem, state: SolverState, ws: Workspace) -> str | None:
        """Linearize at ``state.x`` unless already done; compute the gradient ``g = J~^T r~`` and
        ``diag(J~^T J~)`` (and the dense ``J~^T J~`` on the dense path).  Returns a termination reason
        when the gradient is small enough or not finite."""
        if ws.lin is not None:
            return None
        t = time.perf_counter()
        mode = self.options.jvp_mode
        if mode == "auto":
            mode = "transpose"
        lin = problem.linearize(state.x, ws.ctx, jvp_mode=mode)
        op = lin.op
        g = op.vjp(lin.residual)
        dense = self.use_dense(op.n)
        if dense:
            h = op.dense_jtj()
            diag = h.diagonal().clone()
        elif op.n <= self.options.dense_threshold:
            h, diag = None, op.diag_exact()
        else:
            # Seeded by the iteration of this linearization, so a resumed solve rebuilds it bit-identically.
            gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + state.linearized_at)
            h, diag = None, op.diag_hutchinson(self.options.hutchinson_probes, gen)
        ws.timings["linearize"] += time.perf_counter() - t
        ws.lin = lin
        gnorm = float(g.abs().max()) if g.numel() else 0.0
        ws.cache.update(g=g, gnorm=gnorm, dense=dense, H=h, diag=diag, m=op.m)
        if not math.isfinite(gnorm):
            ws.cache["message"] = "the gradient is not finite at the current point"
            return "failure"
        if gnorm <= self.options.gradient_tolerance:
            ws.cache["message"] = f"max|gradient| = {gnorm:.3e} <= {self.options.gradient_tolerance:.1e}"
            return "gradient_tolerance"
        return None

    def solve_linear(
        self, problem: Problem, state: SolverState, ws: Workspace, damping: Tensor
    ) -> tuple[Tensor | None, float, int]:
        """Solve ``(J~^T J~ + diag(damping)) delta = -g``.  Returns ``(delta, predicted decrease of the GN
        model 1/2||r~ + J~ delta||^2, cg iterations)``; ``delta`` is ``None`` when the solve failed."""
        t = time.perf_counter()
        g, h, lin = ws.cache["g"], ws.cache["H"], ws.lin
        assert lin is not None
        if ws.cache["dense"]:
            a = h + torch.diag(damping)
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) != 0 or not bool(torch.isfinite(chol).all()):
                # singular (e.g. Gauss-Newton on a rank-deficient J): minimum-norm solution via eigh
                evals, evecs = torch.linalg.eigh(a)
                cutoff = evals.abs().max() * a.shape[0] * torch.finfo(a.dtype).eps
                inv = torch.where(evals > cutoff, 1 / evals.clamp_min(cutoff), torch.zeros_like(evals))
                delta = -(evecs @ (inv * (evecs.T @ g)))
            else:
                delta = -torch.cholesky_solve(g[:, None], chol)[:, 0]
            pred = -float(g @ delta + 0.5 * delta @ (h @ delta))
            cg_it = 0
        else:
            op = lin.op
            diag = ws.cache["diag"]
            pre = problem.make_preconditioner(PreconditionerInfo(state.x, ws.ctx, problem.layout(state.x),
                                                                 diag, damping))
            if pre is None:
                jac = 1.0 / (diag + damping).clamp_min(torch.finfo(diag.dtype).tiny)
                jac = torch.where(torch.isfinite(jac), jac, torch.ones_like(jac))

                def pre(v: Tensor) -> Tensor:
                    return jac * v

            res = pcg(lambda v: op.jtj(v) + damping * v, -g, precond=pre,
                      max_iterations=self.options.max_cg_iterations, rtol=self.options.cg_rtol,
                      eta=self.options.eta if self.options.eta > 0 else None)
            delta = res.x
            jd = op.jvp(delta)
            pred = -float(g @ delta + 0.5 * jd @ jd)
            cg_it = res.iterations
        ws.timings["linear_solve"] += time.perf_counter() - t
        if not bool(torch.isfinite(delta).all()):
            return None, math.nan, cg_it
        return delta, pred, cg_it

    def evaluate_trial(
        self, problem: Problem, state: SolverState, ws: Workspace, delta: Tensor
    ) -> tuple[dict[str, Tensor], Any, float, dict[str, float]]:
        """``x (+) delta``, its prepared context and its cost (nan/inf allowed, never raises on them)."""
        t = time.perf_counter()
        layout = problem.layout(state.x)
        with torch.no_grad():
            x_new = {k: v.detach() for k, v in layout.retract(state.x, delta).items()}
        ctx = problem.prepare_context(x_new)
        ev = problem.evaluate(x_new, ctx)
        ws.timings["evaluate"] += time.perf_counter() - t
        return x_new, ctx, ev.cost, ev.block_costs

    def step_too_small(self, problem: Problem, state: SolverState, step_norm: float) -> bool:
        """Ceres' parameter tolerance: ``|delta| <= tol (|x| + tol)``."""
        tol = self.options.parameter_tolerance
        x_norm = float(torch.linalg.vector_norm(problem.layout(state.x).flatten(state.x)))
        return step_norm <= tol * (x_norm + tol)
