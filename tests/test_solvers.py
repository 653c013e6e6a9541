"""Solvers: exactness on linear problems, robustness (NaN trial points, bad start), resume, interface."""

import io
import math

import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from diffrender.problem import AxisAngleSO3, Problem
from diffrender.solvers import Adam, GaussNewton, IterationRecord, LevenbergMarquardt, SolverState

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(seed=0, m=12, n=5):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g, dtype=D)
    b = torch.randn(m, generator=g, dtype=D)
    return Problem(lambda x, ctx: a @ x["x"] - b), a, b


@pytest.mark.parametrize("linear_solver", ["dense", "cg"])
def test_linear_least_squares_in_one_gauss_newton_step(linear_solver):
    problem, a, b = _linear()
    ref = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    seen = []
    res = GaussNewton(linear_solver=linear_solver, cg_rtol=1e-14, eta=0.0).solve(
        problem, {"x": torch.zeros(5, dtype=D)}, callback=lambda rec, x, st: seen.append(x["x"].clone()))
    torch.testing.assert_close(seen[1], ref, rtol=1e-10, atol=1e-10)  # seen[0] is the start point
    assert res.records[1].line_search_steps == 1 and res.records[1].accepted
    assert res.converged and res.iterations <= 2
    assert math.isclose(res.records[1].rho, 1.0, rel_tol=1e-8)  # the GN model is exact


def test_levenberg_marquardt_converges_on_linear_problem_with_both_paths():
    problem, a, b = _linear(1)
    ref = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    for ls in ["dense", "cg"]:
        res = LevenbergMarquardt(linear_solver=ls, function_tolerance=1e-14).solve(
            problem, {"x": torch.zeros(5, dtype=D)})
        torch.testing.assert_close(res.x["x"], ref, rtol=1e-6, atol=1e-8)
        assert res.converged


def _nan_problem():
    target = torch.tensor([0.1, 2.0, 0.5], dtype=D)

    def residuals(x, ctx):  # log(x) is NaN for x < 0: full GN steps from x0 overshoot into x < 0
        return torch.log(x["x"]) - torch.log(target) + 0.5 * (x["x"] - target)

    return Problem(residuals), target


@pytest.mark.parametrize("solver", [LevenbergMarquardt(), LevenbergMarquardt(linear_solver="cg"),
                                    GaussNewton()])
def test_nan_at_trial_points_is_a_rejected_step(solver):
    problem, target = _nan_problem()
    res = solver.solve(problem, {"x": torch.tensor([10.0, 10.0, 10.0], dtype=D)})
    torch.testing.assert_close(res.x["x"], target, rtol=1e-7, atol=1e-9)
    assert res.cost < 1e-14 and res.converged
    if isinstance(solver, LevenbergMarquardt):
        assert any(not r.accepted and math.isnan(r.cost_change) and r.rho == -math.inf
                   for r in res.records)


def test_non_finite_initial_cost_is_reported():
    problem, _ = _nan_problem()
    res = LevenbergMarquardt().solve(problem, {"x": torch.tensor([-1.0, 1.0, 1.0], dtype=D)})
    assert res.termination == "failure" and "not finite" in res.message
    assert len(res.records) == 1


def _rosenbrock_many(n=12):
    def residuals(x, ctx):
        z = x["z"]
        return {"valley": 10 * (z[1:] - z[:-1] ** 2), "anchor": 1 - z[:-1]}

    return Problem(residuals, weights={"anchor": 2.0}), {"z": torch.linspace(-1.0, 0.5, n, dtype=D)}


@pytest.mark.parametrize("solver_cls,opts", [
    (LevenbergMarquardt, dict(linear_solver="cg", dense_threshold=4, hutchinson_probes=3)),  # Hutchinson diag
    (LevenbergMarquardt, dict(linear_solver="dense")),
    # the grown CG cap lives in the state: a resumed solve takes the same CG iterations per step
    (LevenbergMarquardt, dict(linear_solver="cg", dense_threshold=4, max_cg_iterations=1, max_cg_iterations_grown=8)),
    (GaussNewton, dict(linear_solver="cg")),
    (Adam, dict(lr=0.05)),
])
def test_save_restore_reproduces_remaining_iterations(solver_cls, opts):
    problem, x0 = _rosenbrock_many()
    total, cut = 12, 5
    full = solver_cls(max_iterations=total, function_tolerance=0.0, **opts).solve(problem, x0)
    assert full.iterations == total
    saved = {}

    def grab(rec, x, state):
        if rec.iteration == cut:
            buf = io.BytesIO()
            torch.save(state, buf)
            saved["bytes"] = buf.getvalue()

    solver_cls(max_iterations=cut, function_tolerance=0.0, **opts).solve(problem, x0, callback=grab)
    state = torch.load(io.BytesIO(saved["bytes"]))  # default weights_only=True must work
    assert isinstance(state, SolverState) and state.iteration == cut
    resumed = solver_cls(max_iterations=total, function_tolerance=0.0, **opts).solve(
        problem, state.x, state=state)
    tail = [r for r in full.records if r.iteration > cut]
    assert [r.iteration for r in resumed.records] == [r.iteration for r in tail]
    for a, b in zip(tail, resumed.records, strict=True):
        for f in ("cost", "cost_change", "step_norm", "damping", "accepted", "cg_iterations"):
            va, vb = getattr(a, f), getattr(b, f)
            assert va == vb or (isinstance(va, float) and math.isnan(va) and math.isnan(vb)), (f, va, vb)
    torch.testing.assert_close(resumed.state.x["z"], full.state.x["z"], rtol=0, atol=0)


def test_keyboard_interrupt_returns_best_point():
    problem, x0 = _rosenbrock_many()
    calls = {"n": 0}
    inner = problem.residuals

    def interrupted(x, ctx):
        calls["n"] += 1
        if calls["n"] == 25:
            raise KeyboardInterrupt
        return inner(x, ctx)

    problem.residuals = interrupted
    res = LevenbergMarquardt(max_iterations=100).solve(problem, x0)
    assert res.termination == "interrupted"
    assert res.cost == min(r.cost for r in res.records) < res.initial_cost
    problem.residuals = inner
    assert math.isclose(problem.evaluate(res.x).cost, res.cost, rel_tol=1e-12)


def test_callback_stop_time_limit_and_records():
    problem, x0 = _rosenbrock_many()
    seen: list[IterationRecord] = []
    res = LevenbergMarquardt().solve(problem, x0, callback=lambda r, x, s: seen.append(r) or r.iteration == 3)
    assert res.termination == "callback" and res.records[-1].iteration == 3 and len(seen) == 4
    rec = res.records[1]
    assert rec.jvps > 0 and rec.vjps > 0 and rec.residual_evals == 1 and rec.seconds >= 0
    assert set(rec.block_costs) == {"valley", "anchor"}
    assert math.isclose(sum(rec.block_costs.values()), rec.cost, rel_tol=1e-12)
    assert LevenbergMarquardt(max_seconds=0.0).solve(problem, x0).termination == "time_limit"
    report = res.report()
    assert "Termination: CALLBACK" in report and "lambda" in report


def test_prepare_runs_once_per_new_point():
    calls = []

    def prepare(x):
        calls.append(x["x"].clone())
        return x["x"].clone()

    def residuals(x, ctx):
        # ctx is the prepared copy of the current point: the residual may use it as a constant
        return torch.stack([10 * (x["x"][1] - ctx[0] * x["x"][0]), 1 - x["x"][0]])

    problem = Problem(residuals, prepare=prepare)
    res = LevenbergMarquardt().solve(problem, {"x": torch.tensor([-1.2, 1.0], dtype=D)})
    assert len(calls) == res.counters.residual_evals  # start point + one per trial point, none per product
    assert not any(c.requires_grad for c in calls)
    assert res.records[0].gradient_norm > 0  # iteration 0 reports the gradient at x0


def test_block_weights_enter_the_cost():
    problem, x0 = _rosenbrock_many()
    z = x0["z"]
    expected = 0.5 * float(((10 * (z[1:] - z[:-1] ** 2)) ** 2).sum() + 2.0 * ((1 - z[:-1]) ** 2).sum())
    assert math.isclose(problem.evaluate(x0).cost, expected, rel_tol=1e-12)


def test_best_point_is_kept_by_adam():
    problem, x0 = _rosenbrock_many(4)
    res = Adam(lr=0.5, max_iterations=40).solve(problem, x0)  # large lr: the cost oscillates
    costs = [r.cost for r in res.records]
    assert res.cost == min(costs) < costs[-1]
    assert math.isclose(problem.evaluate(res.x).cost, res.cost, rel_tol=1e-12)


def test_adam_reaches_the_minimum_of_a_smooth_problem():
    problem, a, b = _linear(2, m=8, n=3)
    ref = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    res = Adam(lr=0.05, max_iterations=3000).solve(problem, {"x": torch.zeros(3, dtype=D)})
    torch.testing.assert_close(res.x["x"], ref, rtol=1e-4, atol=1e-4)


def test_custom_preconditioner_hook_is_used():
    problem, a, b = _linear(3, m=40, n=30)
    calls = []

    def factory(info):
        calls.append(info)
        # the exact inverse of J^T J + damping: CG must converge in one iteration
        inv = torch.linalg.inv(a.T @ a + torch.diag(info.damping))
        return lambda v: inv @ v

    problem.preconditioner = factory
    res = LevenbergMarquardt(linear_solver="cg", dense_threshold=8).solve(problem, {"x": torch.zeros(30, dtype=D)})
    assert calls and calls[0].jtj_diag.shape == (30,) and calls[0].layout.n == 30
    assert all(r.cg_iterations == 1 for r in res.records[1:])
    assert res.converged


@pytest.mark.parametrize("angle", [0.7, 3.1])
def test_rotation_fit_on_axis_angle_manifold(angle):
    g = torch.Generator().manual_seed(5)
    pts = torch.randn(20, 3, generator=g, dtype=D)
    axis = torch.tensor([1.0, -2.0, 0.5], dtype=D)
    true = angle * axis / axis.norm()
    obs = pts @ axis_angle_to_rotation_matrix(true[None])[0].T

    def residuals(x, ctx):
        return pts @ axis_angle_to_rotation_matrix(x["rot"][None])[0].T - obs

    problem = Problem(residuals, manifolds={"rot": AxisAngleSO3()})
    res = LevenbergMarquardt().solve(problem, {"rot": torch.tensor([0.0, 0.0, 0.0], dtype=D)})
    assert res.cost < 1e-20
    torch.testing.assert_close(axis_angle_to_rotation_matrix(res.x["rot"][None])[0],
                               axis_angle_to_rotation_matrix(true[None])[0], atol=1e-10, rtol=0)


def test_float32_follows_dtype():
    problem, x0 = _rosenbrock_many()
    res = LevenbergMarquardt(max_iterations=100).solve(problem, {"z": x0["z"].float()})
    assert res.x["z"].dtype == torch.float32
    torch.testing.assert_close(res.x["z"], torch.ones(12), atol=1e-3, rtol=0)


def test_options_are_flat_keywords_and_checked():
    with pytest.raises(TypeError, match="'max_iteration'"):
        LevenbergMarquardt(max_iteration=3)
    with pytest.raises(ValueError, match="linear_solver"):
        LevenbergMarquardt(linear_solver="qr")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"_target_": "diffrender.solvers.LevenbergMarquardt", "max_iterations": 7,
                            "linear_solver": "cg"})
    solver = instantiate(cfg)
    assert isinstance(solver, LevenbergMarquardt)
    assert solver.options.max_iterations == 7 and solver.options.linear_solver == "cg"
    assert solver.max_iterations == 7  # options also read as attributes
    with pytest.raises(AttributeError):
        _ = solver.no_such_option


def test_a_list_of_callbacks_all_run_and_any_can_stop():
    problem, x0 = _rosenbrock_many()
    seen_a, seen_b = [], []
    res = LevenbergMarquardt().solve(problem, x0, callback=[
        lambda r, x, s: seen_a.append(r.iteration),
        lambda r, x, s: seen_b.append(r.iteration) or r.iteration == 2,
    ])
    assert res.termination == "callback"
    assert seen_a == seen_b == [0, 1, 2]


def test_the_iteration_that_ends_the_solve_reaches_the_callback():
    problem, x0 = _rosenbrock_many()
    seen = []
    res = LevenbergMarquardt(max_iterations=200).solve(problem, x0, callback=lambda r, x, s: seen.append(r.iteration))
    assert res.converged and seen == [r.iteration for r in res.records]


def test_adam_function_tolerance_judges_real_progress():
    """Adam's first iteration evaluates x0 again: its zero change must not count as convergence."""
    problem, x0 = _rosenbrock_many()
    res = Adam(lr=0.05, max_iterations=200, function_tolerance=1e-3).solve(problem, x0)
    assert res.iterations > 5 and res.cost < 0.5 * res.initial_cost
