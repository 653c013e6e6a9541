"""Adam (``torch.optim.Adam``) on the same cost, behind the same interface: the first-order baseline.

Adam updates the raw parameter tensors (manifolds are ignored: an axis-angle vector is updated as a
vector).  Each iteration evaluates the cost and its gradient by autograd at the current point (one
residual evaluation, one VJP), then takes one optimizer step.  The optimizer's ``state_dict`` travels in
``SolverState.extra["adam"]`` so a resumed solve continues exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from diffrender.problem import Problem
from diffrender.solvers.base import IterationRecord, Solver, SolverOptions, SolverState, Workspace

__all__ = ["Adam", "AdamOptions"]


@dataclass
class AdamOptions(SolverOptions):
    """Adam's options; ``function_tolerance`` and ``parameter_tolerance`` default to off (0)."""

    max_iterations: int = 1000
    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    function_tolerance: float = 0.0
    parameter_tolerance: float = 0.0


class Adam(Solver):
    """``Adam(lr=1e-2, max_iterations=1000).solve(problem, x0)``."""

    Options: ClassVar[type] = AdamOptions

    def _optimizer(self, state: SolverState, ws: Workspace) -> torch.optim.Adam:
        if "opt" not in ws.cache:
            o = self.options
            params = {k: v.detach().clone().requires_grad_(True) for k, v in state.x.items()}
            opt = torch.optim.Adam(list(params.values()), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
            if "adam" in state.extra:
                opt.load_state_dict(state.extra["adam"])
            ws.cache.update(opt=opt, params=params)
        return ws.cache["opt"]

    def iterate(
        self, problem: Problem, state: SolverState, ws: Workspace
    ) -> tuple[IterationRecord | None, str | None]:
        o = self.options
        opt = self._optimizer(state, ws)
        params = ws.cache["params"]
        ctx = problem.prepare_context(params)
        opt.zero_grad(set_to_none=True)
        cost, blocks = problem.cost(params, ctx)
        cost_value = float(cost.detach())
        if not math.isfinite(cost_value):
            ws.cache["message"] = f"cost is not finite ({cost_value}) at iteration {state.iteration}"
            return None, "failure"
        cost.backward()
        problem.counters.vjps += 1
        ws.evaluated = ({k: v.detach().clone() for k, v in params.items()}, cost_value)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params.values()]
        gnorm = max(float(gr.abs().max()) for gr in grads)
        rec = IterationRecord(state.iteration + 1, cost_value, cost_change=state.cost - cost_value,
                              gradient_norm=gnorm, block_costs=blocks)
        previous = state.cost
        if gnorm <= o.gradient_tolerance:
            ws.cache["message"] = f"max|gradient| = {gnorm:.3e} <= {o.gradient_tolerance:.1e}"
            state.cost = cost_value
            return rec, "gradient_tolerance"
        before = [p.detach().clone() for p in params.values()]
        opt.step()
        pairs = zip(params.values(), before, strict=True)
        step = math.sqrt(sum(float(((p.detach() - b) ** 2).sum()) for p, b in pairs))
        x_norm = math.sqrt(sum(float((b**2).sum()) for b in before))
        rec.step_norm = step
        # state.x is the point after the step; state.cost the cost evaluated before it (Adam evaluates lazily)
        state.x = {k: v.detach().clone() for k, v in params.items()}
        state.cost, state.block_costs = cost_value, blocks
        state.extra["adam"] = copy.deepcopy(opt.state_dict())  # the live dict is mutated by step()
        if o.function_tolerance > 0 and math.isfinite(previous) and \
                abs(previous - cost_value) <= o.function_tolerance * previous:
            ws.cache["message"] = f"|cost_change| / cost <= {o.function_tolerance:.1e}"
            return rec, "function_tolerance"
        if o.parameter_tolerance > 0 and step <= o.parameter_tolerance * (x_norm + o.parameter_tolerance):
            ws.cache["message"] = "|step| <= parameter_tolerance * (|x| + tol)"
            return rec, "parameter_tolerance"
        return rec, None
