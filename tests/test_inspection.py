"""Jacobian access, the Gauss-Newton gap, conditioning and covariance against independent references."""

import math

import pytest
import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from diffrender.inspection import Jacobian, conditioning, covariance, gauss_newton_gap, solver_preconditioner
from diffrender.problem import AxisAngleSO3, Problem

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")

W_PRIOR = 0.3


def _problem(m_pts: int = 7):
    """A small nonlinear problem: rotation (on SO(3)), translation, scale; a data block shaped (P, 3)
    and a weighted prior block."""
    g = torch.Generator().manual_seed(3)
    pts = torch.randn(m_pts, 3, generator=g, dtype=D)
    obs = torch.randn(m_pts, 3, generator=g, dtype=D)

    def residuals(x, ctx):
        R = axis_angle_to_rotation_matrix(x["rot"][None])[0]
        return {"fit": pts @ R.T * x["s"] + x["t"] - obs, "prior": torch.sin(x["t"]) * x["s"]}

    problem = Problem(residuals, manifolds={"rot": AxisAngleSO3()}, weights={"prior": W_PRIOR})
    x = {"rot": torch.tensor([0.3, -0.2, 0.5], dtype=D), "t": torch.tensor([0.1, 0.4, -0.3], dtype=D),
         "s": torch.tensor([1.3], dtype=D)}
    return problem, x


def _whitened(problem, x):
    """delta -> the whitened residual, spelled out independently of Jacobian/linearize."""
    layout = problem.layout(x)

    def f(delta):
        blocks = problem.residuals(layout.retract(x, delta), None)
        return torch.cat([blocks["fit"].reshape(-1), math.sqrt(W_PRIOR) * blocks["prior"].reshape(-1)])

    return f, layout.n


def test_entries_rows_columns_and_blocks_match_jacrev_and_jacfwd():
    problem, x = _problem()
    f, n = _whitened(problem, x)
    zero = torch.zeros(n, dtype=D)
    ref_rev = torch.func.jacrev(f)(zero)
    ref_fwd = torch.func.jacfwd(f)(zero)
    torch.testing.assert_close(ref_rev, ref_fwd)
    jac = Jacobian(problem, x)
    assert (jac.m, jac.n) == (24, 7) and jac.residuals.names == ("fit", "prior")
    for j in range(n):
        torch.testing.assert_close(jac.column(j), ref_fwd[:, j])
    for i in (0, 5, 20, 23):
        torch.testing.assert_close(jac.row(i), ref_rev[i])
    i, j = jac.residual_index("fit", (4, 2)), jac.param_index("t", 1)
    assert (i, j) == (14, 4)
    assert jac.entry(i, j) == pytest.approx(float(ref_rev[i, j]), abs=1e-14)
    torch.testing.assert_close(jac.param_block("t"), ref_fwd[:, 3:6])
    torch.testing.assert_close(jac.columns([6, 0]), ref_fwd[:, [6, 0]])
    torch.testing.assert_close(jac.rows([3, 22]), ref_rev[[3, 22]])
    # J v split into blocks of their own shapes
    v = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=D)
    parts = jac.apply(v)
    assert parts["fit"].shape == (7, 3) and parts["prior"].shape == (3,)
    torch.testing.assert_close(torch.cat([parts["fit"].reshape(-1), parts["prior"]]), ref_fwd @ v)
    only_s = jac.apply({"s": torch.ones(1, dtype=D)})
    torch.testing.assert_close(only_s["fit"].reshape(-1), ref_fwd[:21, 6])


def test_dense_chooses_the_smaller_side_and_says_so():
    problem, x = _problem()
    f, n = _whitened(problem, x)
    ref = torch.func.jacfwd(f)(torch.zeros(n, dtype=D))
    jac = Jacobian(problem, x)
    c0 = problem.counters.snapshot()
    d = jac.dense()
    assert d.mode == "forward" and d.products == 7 and "n = 7 <= m = 24" in d.reason
    assert problem.counters.jvps - c0.jvps == 7
    torch.testing.assert_close(d.matrix, ref)
    r = jac.dense("reverse")
    assert r.mode == "reverse" and r.products == 24
    torch.testing.assert_close(r.matrix, ref)
    # J^T J without forming J (column by column), and from J
    c0 = problem.counters.snapshot()
    g, how = jac.gram(max_elements=0)
    assert "columns of JᵀJ" in how and (problem.counters.jvps - c0.jvps, problem.counters.vjps - c0.vjps) == (7, 7)
    torch.testing.assert_close(g, ref.T @ ref)
    g, how = jac.gram([0, 1, 2, 3])
    assert how == "4 VJPs (rows of J)"
    torch.testing.assert_close(g, ref[:4].T @ ref[:4])
    # fewer residuals than parameters: reverse mode
    wide, _ = _problem(m_pts=1)
    xw = dict(x)
    d = Jacobian(wide, xw).dense()
    fw, _ = _whitened(wide, xw)
    assert d.mode == "reverse" and d.products == 6 and "m = 6 < n = 7" in d.reason
    torch.testing.assert_close(d.matrix, torch.func.jacrev(fw)(torch.zeros(7, dtype=D)))


def test_bad_indices_and_names_raise_clear_errors():
    problem, x = _problem()
    jac = Jacobian(problem, x)
    with pytest.raises(IndexError, match="column 7"):
        jac.column(7)
    with pytest.raises(IndexError, match="row -1"):
        jac.row(-1)
    with pytest.raises(ValueError, match=r"unknown parameter \['nope'\]"):
        jac.param_index("nope")
    with pytest.raises(IndexError, match="out of range"):
        jac.residual_index("fit", (7, 0))
    with pytest.raises(ValueError, match="mode"):
        jac.dense("sideways")
    with pytest.raises(ValueError, match=r"unknown residual block \['data'\]"):
        covariance(problem, x, blocks=["data"])


def test_gauss_newton_gap_matches_autograd_hessian_minus_jtj():
    problem, x = _problem()
    f, n = _whitened(problem, x)
    zero = torch.zeros(n, dtype=D)
    h = torch.autograd.functional.hessian(problem.tangent_cost(x), zero)
    j = torch.func.jacfwd(f)(zero)
    v = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=D)
    ref = h @ v - j.T @ (j @ v)
    gap = gauss_newton_gap(problem, x, v)
    assert gap.gap == pytest.approx(float(ref.norm()), rel=1e-9)
    assert gap.relative == pytest.approx(float(ref.norm() / (h @ v).norm()), rel=1e-9)
    assert gap.gap > 1e-3  # a large-residual point: GN drops a real term here
    # at a zero-residual point of a linear problem the gap vanishes
    a = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.2]], dtype=D)
    lin = Problem(lambda p, c: a @ p["x"] - a @ torch.tensor([0.3, 0.1], dtype=D))
    g0 = gauss_newton_gap(lin, {"x": torch.tensor([0.3, 0.1], dtype=D)}, torch.ones(2, dtype=D))
    assert g0.gap < 1e-12


def test_conditioning_plain_and_preconditioned_against_eigvalsh():
    problem, x = _problem()
    f, n = _whitened(problem, x)
    j = torch.func.jacfwd(f)(torch.zeros(n, dtype=D))
    a = j.T @ j
    ref = torch.linalg.eigvalsh(a)
    jac = Jacobian(problem, x)
    c = conditioning(jac.op, steps=n)
    assert c.converged and not c.rank_deficient and c.preconditioner == "none"
    assert c.eig_min == pytest.approx(float(ref[0]), rel=1e-6)
    assert c.eig_max == pytest.approx(float(ref[-1]), rel=1e-6)
    assert c.cond == pytest.approx(float(ref[-1] / ref[0]), rel=1e-6)
    v = c.smallest_vectors[:, 0]
    torch.testing.assert_close(a @ v, c.eig_min * v, atol=1e-8 * float(ref[-1]), rtol=0)
    # Jacobi, as the solver builds it (no preconditioner factory on this problem)
    pre, kind = solver_preconditioner(problem, x, None, jac.op)
    assert kind == "jacobi"
    cp = conditioning(jac.op, precond=pre, preconditioner=kind, steps=n)
    d = a.diagonal().rsqrt()
    ref_p = torch.linalg.eigvalsh(d[:, None] * a * d[None, :])
    assert cp.eig_min == pytest.approx(float(ref_p[0]), rel=1e-6)
    assert cp.eig_max == pytest.approx(float(ref_p[-1]), rel=1e-6)


def test_solver_preconditioner_uses_the_problems_factory():
    problem, x = _problem()
    seen = {}

    def factory(info):
        seen["diag"], seen["damping"] = info.jtj_diag, info.damping
        return lambda v: 2 * v

    p2 = Problem(problem.residuals, manifolds=problem.manifolds, weights=problem.weights, preconditioner=factory)
    jac = Jacobian(p2, x)
    pre, kind = solver_preconditioner(p2, x, None, jac.op)
    assert kind == "problem"
    torch.testing.assert_close(pre(torch.ones(7, dtype=D)), 2 * torch.ones(7, dtype=D))
    f, n = _whitened(problem, x)
    j = torch.func.jacfwd(f)(torch.zeros(n, dtype=D))
    torch.testing.assert_close(seen["diag"], (j * j).sum(0))
    assert float(seen["damping"].abs().max()) == 0


def test_covariance_equals_the_dense_inverse_over_the_chosen_blocks():
    problem, x = _problem()
    f, n = _whitened(problem, x)
    j = torch.func.jacfwd(f)(torch.zeros(n, dtype=D))
    all_blocks = covariance(problem, x)
    torch.testing.assert_close(all_blocks.covariance, torch.linalg.inv(j.T @ j))
    assert all_blocks.method == "dense" and all_blocks.rank == 7 and not all_blocks.rank_deficient
    # data block only: the prior rows do not count; sigma2 from the data block's cost and m = 21
    data = covariance(problem, x, blocks=["fit"], residual_variance=True)
    jf = j[:21]
    r = problem.residuals(x, None)["fit"]
    sigma2 = float((r * r).sum()) / (21 - 7)
    assert data.m == 21 and data.sigma2 == pytest.approx(sigma2, rel=1e-12)
    torch.testing.assert_close(data.covariance, sigma2 * torch.linalg.inv(jf.T @ jf))
    std = data.std()
    assert set(std) == {"rot", "t", "s"} and std["t"].shape == (3,)
    torch.testing.assert_close(std["s"], data.covariance[6:, 6].sqrt())
    with pytest.raises(ValueError, match="m = 3, n = 7"):
        covariance(problem, x, blocks=["prior"], residual_variance=True)


def _linear_gaussian(m=200, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, n, generator=g, dtype=D) * torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=D)
    a[:, 1] += 0.8 * a[:, 0]  # correlated columns
    return a, torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=D)


def test_covariance_is_calibrated_on_a_linear_gaussian_problem():
    """Sample covariance of least-squares estimates over repeated noisy draws vs the predicted one."""
    a, x_true = _linear_gaussian()
    sigma, draws = 0.3, 4000
    g = torch.Generator().manual_seed(1)
    y = (a @ x_true)[:, None] + sigma * torch.randn(a.shape[0], draws, generator=g, dtype=D)
    est = torch.linalg.lstsq(a, y).solution.T  # (draws, n): the least-squares estimate of every draw
    sample_var = est.var(0)
    # known noise: whitened residuals (unit covariance, Ceres' convention)
    y0 = y[:, 0]
    known = Problem(lambda p, c: (a @ p["x"] - y0) / sigma)
    pred = covariance(known, {"x": est[0]}).variance
    assert ((sample_var / pred - 1).abs() < 0.10).all(), (sample_var / pred)
    # unknown noise: raw residuals, scaled by sigma2 = 2 cost / (m - n); averaged over 50 draws
    preds = []
    for k in range(50):
        yk = y[:, k]
        raw = Problem(lambda p, c, yk=yk: a @ p["x"] - yk)
        preds.append(covariance(raw, {"x": est[k]}, residual_variance=True).variance)
    mean_pred = torch.stack(preds).mean(0)
    assert ((sample_var / mean_pred - 1).abs() < 0.10).all(), (sample_var / mean_pred)


def test_hutchinson_diagonal_of_the_inverse_matches_the_dense_one():
    g = torch.Generator().manual_seed(7)
    n, m = 60, 150
    a = torch.randn(m, n, generator=g, dtype=D) / math.sqrt(m) + torch.cat(
        [torch.diag(torch.linspace(1, 3, n, dtype=D)), torch.zeros(m - n, n, dtype=D)])
    y = torch.randn(m, generator=g, dtype=D)
    problem = Problem(lambda p, c: a @ p["x"] - y)
    x = {"x": torch.zeros(n, dtype=D)}
    dense = covariance(problem, x)
    est = covariance(problem, x, dense_max=10, probes=64, seed=3)
    assert est.method == "hutchinson" and est.covariance is None and not est.rank_deficient
    ref = torch.linalg.inv(a.T @ a).diagonal()
    torch.testing.assert_close(dense.variance, ref)
    # unbiased, with the error the reported standard error predicts: 64 probes of a matrix with these
    # off-diagonal terms give a few percent typically, about 20 % at worst
    rel = (est.variance / ref - 1).abs()
    assert float(rel.median()) < 0.05 and float(rel.max()) < 0.3, (float(rel.median()), float(rel.max()))
    assert float(((est.variance - ref).abs() <= 3 * est.std_error).double().mean()) > 0.95
    assert abs(float((est.variance - ref).mean() / ref.mean())) < 0.02
    assert "64 Hutchinson probes" in est.message and "stopped" not in est.message


def test_a_gauge_freedom_is_reported_with_its_direction():
    """Only the sum of a and b is observed (and c): (1, -1, 0)/sqrt(2) is a null direction."""
    g = torch.Generator().manual_seed(8)
    t = torch.randn(20, generator=g, dtype=D)
    obs = torch.randn(20, generator=g, dtype=D)

    def residuals(p, ctx):
        s = p["ab"][0] + p["ab"][1]
        return {"data": torch.tanh(s * t + p["c"]) - obs}

    problem = Problem(residuals)
    x = {"ab": torch.tensor([0.2, 0.5], dtype=D), "c": torch.tensor([0.1], dtype=D)}
    unc = covariance(problem, x)
    assert unc.rank_deficient and unc.rank == 2 and unc.null_space.shape == (3, 1)
    direction = torch.tensor([1.0, -1.0, 0.0], dtype=D) / math.sqrt(2)
    assert abs(float(unc.null_space[:, 0] @ direction)) == pytest.approx(1.0, abs=1e-10)
    torch.testing.assert_close(unc.null_fraction, torch.tensor([0.5, 0.5, 0.0], dtype=D), atol=1e-10, rtol=0)
    assert "rank deficient: rank 2 of 3" in unc.message and math.isinf(unc.cond)
    assert bool(torch.isfinite(unc.variance).all())  # pseudo-inverse on the observable part, flagged
    c = conditioning(Jacobian(problem, x).op, steps=3)
    assert c.rank_deficient and math.isinf(c.cond)
    assert abs(float(c.null_directions[:, 0] @ direction)) == pytest.approx(1.0, abs=1e-8)


def test_a_large_problem_with_a_translation_gauge_reports_it_instead_of_huge_variances():
    """Chain differences x_{i+1} - x_i only: the constant vector is unobservable (n = 50 > dense_max)."""
    n = 50
    g = torch.Generator().manual_seed(9)
    d = torch.randn(n - 1, generator=g, dtype=D)
    problem = Problem(lambda p, c: (p["x"][1:] - p["x"][:-1]) - d)
    x = {"x": torch.zeros(n, dtype=D)}
    unc = covariance(problem, x, dense_max=10, lanczos_steps=n)
    assert unc.method == "hutchinson" and unc.rank_deficient and unc.variance is None and unc.std() is None
    ones = torch.ones(n, dtype=D) / math.sqrt(n)
    assert abs(float(unc.null_space[:, 0] @ ones)) == pytest.approx(1.0, abs=1e-8)
    assert "rank deficient" in unc.message
