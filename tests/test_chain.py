"""Chain: a second solver from the first's best point when the first stalls, one budget, one numbering."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from fitutil import TEAPOT, compose, read_json, run_fit

from diffrender.problem import Problem
from diffrender.solvers import Adam, Chain, LevenbergMarquardt
from diffrender.solvers.records import CONVERGED

D = torch.float64
# Rosenbrock as least squares: r = (10 (x1 - x0^2), 1 - x0), minimum 0 at (1, 1) (MGH 1)
ROSENBROCK = Problem(lambda x, ctx: torch.stack([10 * (x["x"][1] - x["x"][0] ** 2), 1 - x["x"][0]]))
X0 = {"x": torch.tensor([-1.2, 1.0], dtype=D)}


def _stalling_lm() -> LevenbergMarquardt:
    """LM that stops after its first step: with function_tolerance = 1 every change is within 100 % of the
    cost (and every Gauss-Newton model decrease too), the function test's stop, which the chain hands on."""
    return LevenbergMarquardt(function_tolerance=1.0)


def test_the_second_solver_goes_on_from_where_the_first_stalled():
    alone = _stalling_lm().solve(ROSENBROCK, X0)
    assert alone.termination == "function_tolerance" and alone.cost > 1.0
    seen = []
    chain = Chain(first=_stalling_lm(), then=LevenbergMarquardt(max_iterations=10), max_iterations=200)
    res = chain.solve(ROSENBROCK, X0, callback=lambda rec, x, st: seen.append((rec.iteration, rec.cost)))
    # one numbering, the start point once: 0, 1, 2, ...; the records are what the callback saw
    assert [i for i, _ in seen] == list(range(len(seen))) == [r.iteration for r in res.records]
    # the first solver's records, then the second's from its point on (the hand-off repeats no evaluation)
    n_first = len(alone.records)
    assert [c for _, c in seen[:n_first]] == [r.cost for r in alone.records]
    assert seen[n_first][1] <= alone.cost
    # the second reached the known optimum; its own max_iterations (10) gave way to the chain's budget
    torch.testing.assert_close(res.x["x"], torch.ones(2, dtype=D))
    assert res.termination in CONVERGED and res.iterations > 10
    assert res.message.startswith("LevenbergMarquardt: function_tolerance")
    assert res.solver == "Chain(LevenbergMarquardt, LevenbergMarquardt)" and res.initial_cost == alone.initial_cost


def test_the_budget_is_shared_and_the_result_is_the_best_point():
    """Adam never stops by a tolerance, so it gets exactly what the first left of max_iterations; the result
    is the lowest point of either solver, whatever Adam's last iterate."""
    first = _stalling_lm().solve(ROSENBROCK, X0)
    res = Chain(first=_stalling_lm(), then=Adam(lr=0.05), max_iterations=40).solve(ROSENBROCK, X0)
    assert res.iterations == 40 and res.termination == "max_iterations"
    assert res.cost == min(r.cost for r in res.records) <= first.cost
    assert math.isclose(res.cost, ROSENBROCK.evaluate(res.x).cost, rel_tol=1e-12)


def test_no_hand_off_after_a_stop_that_is_not_a_stall():
    """A callback's stop (or a limit, an interruption, the gradient test) ends the chain with the first."""
    res = Chain(first=_stalling_lm(), then=Adam()).solve(ROSENBROCK, X0, callback=lambda rec, x, st: True)
    assert res.termination == "callback" and res.solver == "Chain(LevenbergMarquardt)"
    linear = Problem(lambda x, ctx: x["x"] - torch.tensor([1.0, 2.0], dtype=D))
    res = Chain(first=LevenbergMarquardt(), then=Adam()).solve(linear, {"x": torch.zeros(2, dtype=D)})
    assert res.termination == "gradient_tolerance" and res.solver == "Chain(LevenbergMarquardt)"


def test_the_second_solver_stops_when_it_cannot_improve_on_a_minimum():
    """patience: LM's one step lands within 1e-8 of the cost of r = x - b's minimum (and stops by the function
    test), so Adam cannot lower the best cost by 1e-6 of the initial cost; it stops after `patience`
    iterations, its small gains (the best point either way) below that tolerance."""
    linear = Problem(lambda x, ctx: x["x"] - torch.tensor([1.0, 2.0], dtype=D))
    x0 = {"x": torch.zeros(2, dtype=D)}
    lm = _stalling_lm().solve(linear, x0)
    assert lm.termination == "function_tolerance" and lm.cost < 1e-8 * lm.initial_cost
    res = Chain(first=_stalling_lm(), then=Adam(lr=1e-3), patience=20).solve(linear, x0)
    assert res.iterations == lm.iterations + 20 and res.termination == "function_tolerance"
    assert res.message.endswith("in 20 iterations)")
    assert 0.0 <= lm.cost - res.cost <= 1e-6 * lm.initial_cost
    with pytest.raises(ValueError, match="patience and patience_tolerance must be >= 0"):
        Chain(first=_stalling_lm(), then=Adam(), patience=-1)
    with pytest.raises(TypeError, match="then must be a diffrender Solver"):
        Chain(first=_stalling_lm(), then=object())


def test_a_state_saved_in_the_second_solver_resumes_it_exactly():
    """Stopped by its callback in Adam's part and resumed from the state the callback saw, the chain ends
    where the uninterrupted chain ends: the same iterate, the numbering carried on."""
    def chain() -> Chain:
        return Chain(first=_stalling_lm(), then=Adam(lr=0.05), max_iterations=12)

    whole = chain().solve(ROSENBROCK, X0)
    saved = {}

    def stop_at_6(rec, x, st):
        saved["state"] = st
        return rec.iteration == 6

    part = chain().solve(ROSENBROCK, X0, callback=stop_at_6)
    assert part.termination == "callback" and part.records[-1].iteration == 6
    state = saved["state"]
    assert state.solver == "Adam" and state.extra["chain"]["phase"] == 1
    rest = chain().solve(ROSENBROCK, state.x, state=state)
    assert [r.iteration for r in rest.records] == list(range(7, 13))
    torch.testing.assert_close(rest.state.x["x"], whole.state.x["x"], rtol=0, atol=0)
    other = LevenbergMarquardt().solve(ROSENBROCK, X0, callback=lambda rec, x, st: True).state
    other.solver = "Dogleg"
    with pytest.raises(ValueError, match="cannot resume a state saved by 'Dogleg'"):
        chain().solve(ROSENBROCK, X0, state=other)


def test_lm_adam_config_builds_the_apps_lm_then_adam():
    from hydra.utils import instantiate

    cfg = compose("solver=lm_adam", "solver.then.lr=0.003")
    solver = instantiate(cfg.solver)
    first, then = solver.solvers
    assert isinstance(solver, Chain) and isinstance(first, LevenbergMarquardt) and isinstance(then, Adam)
    assert first.options.initial_damping == 1.0 and first.options.extend_truncated == 1.2  # conf/solver/lm.yaml
    assert then.options.lr == 0.003 and solver.options.max_iterations == 500


def test_fit_py_runs_a_chain_numbers_its_steps_on_and_resumes_it(tmp_path):
    """The app with solver=lm_adam: LM's part (a damping in the history), then Adam's (none), one step
    count; stopped in Adam's part and resumed from its checkpoint, the fit ends where the uninterrupted one
    ends."""
    chain = [*TEAPOT, "solver=lm_adam", "solver.first.function_tolerance=1.0", "solver.max_iterations=6"]
    summary = run_fit(tmp_path, *chain, run="ref")
    hist = summary["history"]
    assert [h["step"] for h in hist] == list(range(7))
    damped = [isinstance(h["damping"], float) and math.isfinite(h["damping"]) for h in hist[1:]]
    assert damped[0] and not damped[-1] and damped == sorted(damped, reverse=True)
    ref = read_json(tmp_path / "ref" / "pose.json")["eye"]
    stopped = run_fit(tmp_path, *chain, "stop_after=4")
    assert stopped["stopped"] and stopped["iterations"] == 4
    resumed = run_fit(tmp_path, f"resume={tmp_path / 'run'}", run="ignored")
    assert resumed["iterations"] == 6 and [h["step"] for h in resumed["history"]][-1] == 6
    np.testing.assert_allclose(read_json(tmp_path / "run" / "pose.json")["eye"], ref, rtol=0, atol=1e-6)
