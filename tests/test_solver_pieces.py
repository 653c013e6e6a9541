"""The solver pieces: dogleg steps, a custom descent in a few lines, the scale-invariant gradient test,
and where the exact Hessian pays (large residuals at the optimum)."""

import math
import sys
from pathlib import Path

import pytest
import torch

from diffrender.problem import Problem
from diffrender.solvers import Dogleg, GaussNewton, LevenbergMarquardt, NewtonCG, SecondOrderSolver, SolverState
from diffrender.solvers.base import Workspace
from diffrender.solvers.descent import Descent, Region, Step
from diffrender.solvers.search import ClassicalRadius, TrustRegion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mgh_problems import PROBLEMS  # noqa: E402

D = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def _exp_fit():
    """A small nonlinear least-squares problem with a non-zero residual at the optimum."""
    t = torch.linspace(0, 2, 9, dtype=D)
    y = 1.5 * torch.exp(-0.7 * t) + 0.05 * torch.sin(7 * t)
    return Problem(lambda x, ctx: x["a"] * torch.exp(-x["k"] * t) - y), \
        {"a": torch.tensor([1.0], dtype=D), "k": torch.tensor([0.1], dtype=D)}


def _linearized(solver, problem, x0):
    state = SolverState(x=x0, cost=problem.evaluate(x0).cost)
    ws = Workspace()
    assert solver.linearize(problem, state, ws) is None
    return state, ws


@pytest.mark.parametrize("linear_solver", ["dense", "cg"])
def test_dogleg_step_is_the_cut_cauchy_point_or_the_gauss_newton_point(linear_solver):
    problem, x0 = _exp_fit()
    solver = Dogleg(jacobi_scaling=False, linear_solver=linear_solver, cg_rtol=1e-14, eta=0.0)
    state, ws = _linearized(solver, problem, x0)
    g = ws.lin.gradient
    small = 1e-3
    step = solver.descent.step(solver, problem, state, ws, Region(1 / small, small))
    torch.testing.assert_close(step.delta, -small * g / g.norm(), rtol=1e-12, atol=0)  # steepest descent, cut
    assert step.on_boundary and math.isclose(step.norm, small, rel_tol=1e-12)
    j = ws.lin.op.columns()
    gn = torch.linalg.lstsq(j, -ws.lin.residual[:, None]).solution[:, 0]
    step = solver.descent.step(solver, problem, state, ws, Region(1e-6, 1e6))
    torch.testing.assert_close(step.delta, gn, rtol=1e-8, atol=1e-12)
    assert not step.on_boundary
    # in between, the step lies on the boundary and is predicted to decrease the model more than the cut
    # Cauchy step of the same length would
    mid = 0.5 * float(gn.norm())
    step = solver.descent.step(solver, problem, state, ws, Region(1 / mid, mid))
    assert math.isclose(float(step.delta.norm()), mid, rel_tol=1e-10)
    cut = -mid * g / g.norm()
    jc = j @ cut
    assert step.predicted > -float(g @ cut + 0.5 * jc @ jc)


class SteepestDescent(Descent):
    """Steepest descent cut at the trust radius: the whole of a new descent."""

    def step(self, loop, problem, state, ws, region):
        g = ws.lin.gradient
        delta = -min(region.radius / float(g.norm()), 1e3) * g
        jd = ws.lin.op.jvp(delta)
        return Step(delta, -float(g @ delta + 0.5 * jd @ jd), norm=float(delta.norm()))


def test_a_custom_descent_is_one_small_class():
    a = torch.tensor([[3.0, 1.0], [1.0, 2.0], [0.0, 1.0]], dtype=D)
    b = torch.tensor([1.0, -1.0, 2.0], dtype=D)
    problem = Problem(lambda x, ctx: a @ x["x"] - b)
    solver = SecondOrderSolver(search=TrustRegion(ClassicalRadius(initial_radius=1.0)), descent=SteepestDescent(),
                               max_iterations=500, function_tolerance=1e-15, parameter_tolerance=1e-14)
    res = solver.solve(problem, {"x": torch.zeros(2, dtype=D)})
    torch.testing.assert_close(res.x["x"], torch.linalg.lstsq(a, b[:, None]).solution[:, 0], rtol=1e-6, atol=1e-7)
    assert res.converged and math.isfinite(res.records[-1].radius)


def test_gradient_test_does_not_depend_on_the_residual_scale():
    """Residuals scaled by 1e-6: the relative test takes exactly the unscaled iterations; an absolute one
    stops within a few iterations, far from the minimum (max|g| = 1e-12 |g_unscaled| falls below 1e-10).
    LM's floor on D^2 is lowered so that it does not clamp the scaled problem's diagonal."""
    p = PROBLEMS[0]  # Rosenbrock
    runs = {}
    for scale in (1.0, 1e-6):
        problem = Problem(lambda x, ctx, s=scale: s * p.residual(x["x"]))
        for test in ("relative", "max_norm"):
            runs[scale, test] = LevenbergMarquardt(gradient_test=test, gradient_tolerance=1e-10, min_diagonal=1e-30,
                                                   linear_solver="dense", max_iterations=200) \
                .solve(problem, {"x": p.start()})
    ref, scaled = runs[1.0, "relative"], runs[1e-6, "relative"]
    assert ref.converged and ref.iterations > 10
    assert scaled.iterations == ref.iterations and scaled.termination == ref.termination
    torch.testing.assert_close(scaled.x["x"], ref.x["x"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(scaled.x["x"], torch.ones(2, dtype=D), rtol=0, atol=1e-8)
    absolute = runs[1e-6, "max_norm"]
    assert absolute.termination == "gradient_tolerance" and absolute.iterations < ref.iterations / 2
    assert float((absolute.x["x"] - 1).abs().max()) > 0.5


def test_the_exact_hessian_pays_where_residuals_stay_large():
    """Jennrich-Sampson (f* = 124.36) and Brown-Dennis (f* = 85822.2): Newton-CG converges in a few
    iterations; Gauss-Newton's line search fails on the first, LM needs many times the iterations on the
    second."""
    js, bd = PROBLEMS[5], PROBLEMS[15]
    out = {}
    for p in (js, bd):
        problem = Problem(lambda x, ctx, p=p: p.residual(x["x"]))
        for cls in (NewtonCG, LevenbergMarquardt, GaussNewton):
            out[p.number, cls.__name__] = cls(max_iterations=300, function_tolerance=1e-10).solve(
                problem, {"x": p.start()})
    for p in (js, bd):
        res = out[p.number, "NewtonCG"]
        assert math.isclose(2 * res.cost, p.f_star, rel_tol=1e-6), (p.name, 2 * res.cost)
    assert out[js.number, "GaussNewton"].termination == "line_search_failure"
    assert 3 * out[bd.number, "NewtonCG"].iterations < out[bd.number, "LevenbergMarquardt"].iterations


def _many_terms(n_terms=6, m=40, n=8, seed=0):
    """A nonlinear problem whose residuals come in several terms (like views), plus a regularizer term."""
    g = torch.Generator().manual_seed(seed)
    mats = [torch.randn(m, n, generator=g, dtype=D) / math.sqrt(n) for _ in range(n_terms)]
    true = torch.randn(n, generator=g, dtype=D)
    obs = [torch.tanh(a @ true) + 0.01 * torch.randn(m, generator=g, dtype=D) for a in mats]
    terms = {f"view{i}": (lambda x, ctx, a=a, y=y: torch.tanh(a @ x["x"]) - y) for i, (a, y) in
             enumerate(zip(mats, obs, strict=True))}
    terms["reg"] = lambda x, ctx: 0.01 * x["x"]
    one = lambda x, ctx: {k: f(x, ctx) for k, f in terms.items()}  # noqa: E731  (the same, as one term)
    return terms, one, {"x": torch.zeros(n, dtype=D)}


def test_terms_stack_into_the_same_problem():
    terms, one, x0 = _many_terms()
    split, whole = Problem(terms), Problem(one)
    x = {"x": torch.linspace(-0.5, 0.5, 8, dtype=D)}
    assert math.isclose(split.evaluate(x).cost, whole.evaluate(x).cost, rel_tol=1e-14)
    ls, lw = split.linearize(x), whole.linearize(x)
    v = torch.randn(8, dtype=D, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(ls.gradient, lw.gradient)
    torch.testing.assert_close(ls.op.jtj(v), lw.op.jtj(v))
    torch.testing.assert_close(ls.op.jvp(v), lw.op.jvp(v))
    torch.testing.assert_close(ls.op.dense_jtj(), lw.op.dense_jtj())


def test_subsampled_curvature_converges_to_the_full_curvature_minimum():
    """Only the Gauss-Newton model is subsampled (2 of 6 terms per iteration, scaled by 3); the gradient
    and the cost are exact, so LM reaches the same minimum, in more iterations."""
    terms, _, x0 = _many_terms()
    problem = Problem(terms, sampled_terms=[t for t in terms if t != "reg"])
    opts = dict(linear_solver="cg", max_iterations=200, function_tolerance=1e-14, gradient_tolerance=1e-12)
    full = LevenbergMarquardt(**opts).solve(problem, x0)
    sub = LevenbergMarquardt(curvature_subsample=1 / 3, **opts).solve(problem, x0)
    assert full.converged and sub.converged
    torch.testing.assert_close(sub.x["x"], full.x["x"], rtol=1e-6, atol=1e-8)
    assert math.isclose(sub.cost, full.cost, rel_tol=1e-10)


@pytest.mark.parametrize("max_extensions", [1, 3])
def test_extended_truncated_steps_converge_to_the_same_minimum(max_extensions):
    """extend_truncated: a step CG cut short (one CG iteration here) whose gain ratio is high is tried at
    twice its length (and again doubled, up to max_extensions trials, while the cost keeps falling) and the
    lowest kept: a different path to the same minimum."""
    terms, _, x0 = _many_terms()
    problem = Problem(terms)
    opts = dict(linear_solver="cg", max_cg_iterations=1, max_iterations=300, function_tolerance=1e-14,
                gradient_tolerance=1e-12)
    plain = LevenbergMarquardt(**opts).solve(problem, x0)
    longer = LevenbergMarquardt(extend_truncated=0.5, max_extensions=max_extensions, **opts).solve(problem, x0)
    assert plain.converged and longer.converged
    tried = [r.line_search_steps for r in longer.records]
    # extensions were tried (more than one in a row where allowed), never more than allowed, and some kept:
    assert max(tried) == min(max_extensions, 2) and all(t <= max_extensions for t in tried)
    assert longer.records[1].cost < plain.records[1].cost
    # the first step was extended: longer than the plain run's first step
    first = longer.records[1]
    assert first.step_norm > plain.records[1].step_norm * 1.5
    torch.testing.assert_close(longer.x["x"], plain.x["x"], rtol=1e-6, atol=1e-8)
    assert math.isclose(longer.cost, plain.cost, rel_tol=1e-10)
    with pytest.raises(ValueError, match="extend_truncated must be >= 0"):
        LevenbergMarquardt(extend_truncated=-1.0)
    with pytest.raises(ValueError, match="max_extensions must be >= 1"):
        LevenbergMarquardt(max_extensions=0)


def test_the_cg_cap_doubles_while_the_model_holds_and_resets_where_it_fails():
    """max_cg_iterations_grown, the rule itself: a step CG cut short with 0.75 <= rho < extend_truncated
    doubles the next cap (up to the limit); rho >= extend_truncated (forward tracking's regime), rho < 1/4
    or a rejection set it back; a step CG finished itself, or 1/4 <= rho < 3/4, leaves it."""
    loop = LevenbergMarquardt(linear_solver="cg", max_cg_iterations=2, max_cg_iterations_grown=12,
                              extend_truncated=1.2)
    state = SolverState(x={})

    def after(cg_iterations, rho):
        TrustRegion._adapt_cg_cap(loop, state, Step(None, 1.0, cg_iterations=cg_iterations), rho)
        return loop.cg_cap(state)

    assert loop.cg_cap(state) == 2
    assert [after(2, 1.0), after(4, 0.8), after(8, 1.1), after(12, 0.9)] == [4, 8, 12, 12]  # the limit holds
    assert after(5, 1.0) == 12  # CG converged before the cap: nothing to grow
    assert after(12, 0.5) == 12  # a fair step: kept
    assert after(12, 1.2) == 2  # the model under-predicts: back to the base cap
    assert [after(2, 0.9), after(4, 0.2)] == [4, 2]  # the model failed
    assert [after(2, 0.9), after(4, -math.inf)] == [4, 2]  # a rejected (or invalid) step
    off = LevenbergMarquardt(linear_solver="cg", max_cg_iterations=2)  # the class default: fixed cap
    TrustRegion._adapt_cg_cap(off, state := SolverState(x={}), Step(None, 1.0, cg_iterations=2), 1.0)
    assert off.cg_cap(state) == 2 and "cg_cap" not in state.extra
    with pytest.raises(ValueError, match="max_cg_iterations_grown must be >= 0"):
        LevenbergMarquardt(max_cg_iterations_grown=-1)


def test_a_grown_cg_cap_converges_to_the_same_minimum_in_fewer_iterations():
    """On a nonlinear problem whose Gauss-Newton model holds (rho near 1), one CG iteration per step
    crawls; letting the cap double where the model held takes fewer iterations to the same minimum."""
    terms, _, x0 = _many_terms()
    problem = Problem(terms)
    opts = dict(linear_solver="cg", max_cg_iterations=1, max_iterations=500, function_tolerance=1e-14,
                gradient_tolerance=1e-12, eta=0.0)  # no Nash-Sofer stop: CG runs to the cap (n = 8)
    fixed = LevenbergMarquardt(**opts).solve(problem, x0)
    grown = LevenbergMarquardt(max_cg_iterations_grown=8, **opts).solve(problem, x0)
    assert fixed.converged and grown.converged
    caps = [r.cg_iterations for r in grown.records[1:]]
    assert caps[:5] == [1, 2, 4, 8, 8]  # it doubled, step by step, up to the limit
    assert len(grown.records) < len(fixed.records) / 2
    torch.testing.assert_close(grown.x["x"], fixed.x["x"], rtol=1e-6, atol=1e-8)
    assert math.isclose(grown.cost, fixed.cost, rel_tol=1e-10)


def test_newton_cg_takes_the_grown_cg_cap_too():
    """Steihaug's CG path (Newton-CG) reads the same cap as LM's and the dogleg's normal solves: with a base
    cap of 1 that grows, its paths get longer than one leg and it reaches the same minimum in fewer
    iterations."""
    terms, _, x0 = _many_terms()
    problem = Problem(terms)
    opts = dict(linear_solver="cg", max_cg_iterations=1, max_iterations=300, function_tolerance=1e-14,
                gradient_tolerance=1e-12)
    fixed = NewtonCG(**opts).solve(problem, x0)
    grown = NewtonCG(max_cg_iterations_grown=8, **opts).solve(problem, x0)
    assert fixed.converged and grown.converged
    assert max(r.cg_iterations for r in fixed.records) == 1 < max(r.cg_iterations for r in grown.records)
    assert len(grown.records) < len(fixed.records) / 2
    torch.testing.assert_close(grown.x["x"], fixed.x["x"], rtol=1e-6, atol=1e-8)
    assert math.isclose(grown.cost, fixed.cost, rel_tol=1e-10)


def _diagonal_problem():
    """r = W x - b with diagonal W: ``(problem, x0, x*)``; the cost is exactly quadratic along any ray."""
    w = torch.tensor([1.0, 2.0, 3.0], dtype=D)
    b = torch.tensor([0.5, -1.0, 2.0], dtype=D)
    return Problem(lambda x, ctx: w * x["x"] - b), {"x": torch.zeros(3, dtype=D)}, b / w


def _diagonal_linear(**options):
    """LM damps r = W x - b with lambda diag(W^2), so its first step (one CG iteration, exact here) is the
    Newton step shrunk by 1/(1 + lambda), and with lambda = 0.75 the line minimum sits at t* = 1.75. Returns
    the one-iteration result and x*."""
    problem, x0, x_star = _diagonal_problem()
    solver = LevenbergMarquardt(linear_solver="cg", max_cg_iterations=1, initial_damping=0.75, extend_truncated=0.5,
                                max_extensions=3, max_iterations=1, **options)
    return solver.solve(problem, x0), x_star


def test_the_result_is_the_accepted_point_after_a_failed_extension():
    """Doubling keeps t = 2 and then tries t = 4, which fails. The solve must return the point it accepted,
    not the last trial it evaluated."""
    result, x_star = _diagonal_linear()
    assert result.records[1].line_search_steps == 2
    torch.testing.assert_close(result.x["x"], 2 / 1.75 * x_star, rtol=1e-12, atol=1e-12)
    assert result.cost == result.records[-1].cost < result.records[0].cost


def test_quadratic_extension_lands_on_the_line_minimum_of_a_quadratic_cost():
    """extension_rule="quadratic" fits f(0), f'(0) and f(t) with a parabola. On a cost that is exactly
    quadratic along the ray, the first extension lands on x* (t* = 1.75, within [1.5, 2]). It then stops,
    because the next fit puts the minimum short of 1.25 t. Doubling pays a second, failing trial."""
    quad, x_star = _diagonal_linear(extension_rule="quadratic")
    double, _ = _diagonal_linear()
    torch.testing.assert_close(quad.x["x"], x_star, rtol=1e-12, atol=1e-12)
    assert quad.records[1].line_search_steps == 1 and quad.cost < 1e-20
    assert math.isclose(quad.records[1].step_norm / double.records[1].step_norm, 1.75 / 2, rel_tol=1e-12)
    with pytest.raises(ValueError, match="extension_rule must be one of"):
        LevenbergMarquardt(extension_rule="cubic")


@pytest.mark.parametrize("damping, share, extended", [(0.05, 0.1, True), (0.75, 0.1, False), (0.05, 0.0, False)])
def test_a_dense_step_is_extended_only_where_the_damping_did_not_shorten_it(damping, share, extended):
    """extend_damping_share: a dense step (never CG-truncated) is extended only where the damping adds less
    than ``share`` to the model's curvature along it. On r = W x - b damped with lambda diag(W^2) that share
    is lambda itself, and the step is x*/(1 + lambda), so rho = 1 and the line minimum is t* = 1 + lambda:
    the doubled trial (t = 2) is tried and fails, and the accepted point stays the step's own."""
    problem, x0, x_star = _diagonal_problem()
    result = LevenbergMarquardt(linear_solver="dense", initial_damping=damping, extend_truncated=0.5,
                                extend_damping_share=share, max_extensions=3, max_iterations=1).solve(problem, x0)
    assert result.records[1].line_search_steps == (1 if extended else 0)
    torch.testing.assert_close(result.x["x"], x_star / (1 + damping), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="extend_damping_share must be >= 0"):
        LevenbergMarquardt(extend_damping_share=-0.1)


def test_an_amortized_diagonal_is_reused_refreshed_and_never_negative():
    """diagonal_every=3: the Hutchinson estimate is made at the first of every 3 linearizations and reused
    in between; being a mean of squares, it is never negative."""
    seen = []

    def spy(info):
        seen.append(info.jtj_diag)
        return None  # Jacobi

    terms, _, x0 = _many_terms()
    problem = Problem(terms, preconditioner=spy)
    res = LevenbergMarquardt(linear_solver="cg", dense_threshold=2, hutchinson_probes=2, diagonal_every=3,
                             max_iterations=7, function_tolerance=0.0).solve(problem, x0)
    assert res.iterations == 7 and all(r.accepted for r in res.records)
    assert all(bool((d >= 0).all()) for d in seen)
    assert seen[1] is seen[0] and seen[2] is seen[0] and seen[3] is not seen[0] and seen[4] is seen[3]


def test_a_rejected_step_raises_the_damping_to_the_curvature_along_it():
    """After a run of accepted steps lambda sits near its floor (1e-16), where Nielsen's doubling needs ~10
    rejections before the step changes. The curvature floor raises lambda at once to ||J~ d||^2 / ||D d||^2
    of the rejected step d, so LM started at lambda = 1e-16 is rejected a few times, not tens, and lands on
    the same minimum. Policy: lambda <- max(lambda nu, that curvature)."""
    from diffrender.solvers.search import NielsenDamping

    policy, state = NielsenDamping(initial_damping=1e-16), SolverState(x={}, cost=1.0)
    policy.init(state)
    policy.rejected(state, Step(None, 0.0, curvature=0.25))
    assert state.damping == 0.25 and state.nu == 4.0
    policy.rejected(state, Step(None, 0.0, curvature=0.25))  # above the floor: Nielsen's factor
    assert state.damping == 1.0
    policy.rejected(state, Step(None, 0.0))  # curvature unknown (nan): Nielsen's factor alone
    assert state.damping == 8.0

    for number in (5, 15, 19):  # Beale, Kowalik-Osborne, Osborne 2
        p = PROBLEMS[number - 1]
        problem = Problem(lambda x, ctx, p=p: p.residual(x["x"]))
        runs = {floor: LevenbergMarquardt(linear_solver="dense", initial_damping=1e-16, max_iterations=200,
                                          rejection_curvature_floor=floor).solve(problem, {"x": p.start()})
                for floor in (True, False)}
        rejected = {floor: sum(not r.accepted for r in res.records) for floor, res in runs.items()}
        assert rejected[True] <= 2 < 8 <= rejected[False], (p.name, rejected)
        assert math.isclose(runs[True].cost, runs[False].cost, rel_tol=1e-6, abs_tol=1e-20), p.name
