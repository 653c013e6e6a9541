"""Adam (``torch.optim.Adam``) on the same cost, behind the same interface: the first-order baseline.

Adam updates the raw parameter tensors (manifolds are ignored: an axis-angle vector is updated as a
vector).  Each iteration evaluates the cost and its gradient by autograd at the current point (one
residual evaluation, one VJP), then takes one optimizer step.  The optimizer's ``state_dict`` travels in
``SolverState.extra["adam"]`` so a resumed solve continues exactly.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from diffrender.problem import Problem
from diffrender.solvers.base import Solver, Workspace
from diffrender.solvers.options import AdamOptions
from diffrender.solvers.records import IterationRecord, SolverState

__all__ = ["Adam", "AdamOptions"]


@dataclass
class AdamWorkspace(Workspace):
    """Adam's per-solve objects: the ``torch.optim.Adam`` instance and the leaf tensors it updates."""

    opt: torch.optim.Adam | None = None
    params: dict[str, Tensor] = field(default_factory=dict)


class Adam(Solver):
    """``Adam(lr=1e-2, max_iterations=1000).solve(problem, x0)``."""

    Options: ClassVar[type] = AdamOptions

    def make_workspace(self) -> AdamWorkspace:
        return AdamWorkspace()

    def _optimizer(self, state: SolverState, ws: AdamWorkspace) -> torch.optim.Adam:
        if ws.opt is None:
            o = self.options
            ws.params = {k: v.detach().clone().requires_grad_(True) for k, v in state.x.items()}
            ws.opt = torch.optim.Adam(list(ws.params.values()), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
            if "adam" in state.extra:
                ws.opt.load_state_dict(state.extra["adam"])
        return ws.opt

    def iterate(
        self, problem: Problem, state: SolverState, ws: AdamWorkspace
    ) -> tuple[IterationRecord | None, str | None]:
        o = self.options
        opt = self._optimizer(state, ws)
        params = ws.params
        ctx = problem.prepare_context(params)
        opt.zero_grad(set_to_none=True)
        cost, blocks = problem.cost(params, ctx)
        cost_value = float(cost.detach())
        if not math.isfinite(cost_value):
            ws.message = f"cost is not finite ({cost_value}) at iteration {state.iteration}"
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
            ws.message = f"max|gradient| = {gnorm:.3e} <= {o.gradient_tolerance:.1e}"
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
        # the first iteration evaluates x0 itself, whose cost the start already has: no change to judge
        if o.function_tolerance > 0 and state.iteration > 0 and math.isfinite(previous) and \
                abs(previous - cost_value) <= o.function_tolerance * previous:
            ws.message = f"|cost_change| / cost <= {o.function_tolerance:.1e}"
            return rec, "function_tolerance"
        if o.parameter_tolerance > 0 and step <= o.parameter_tolerance * (x_norm + o.parameter_tolerance):
            ws.message = "|step| <= parameter_tolerance * (|x| + tol)"
            return rec, "parameter_tolerance"
        return rec, None
