"""Preconditioned CG: accuracy on SPD systems, singular and indefinite safeguards, Nash-Sofer truncation."""

import pytest
import torch

from diffrender.linalg import pcg

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _spd(n: int, cond: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D))
    ev = torch.logspace(0, torch.log10(torch.tensor(cond)).item(), n, dtype=D)
    return q @ torch.diag(ev) @ q.T


def _q(a, b, x):
    return float(0.5 * x @ a @ x - b @ x)


def test_solves_spd_to_tolerance_with_and_without_jacobi():
    a = _spd(30, 1e3, 0)
    b = torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=D)
    ref = torch.linalg.solve(a, b)
    for pre in [None, lambda r: r / a.diagonal()]:
        res = pcg(lambda v: a @ v, b, precond=pre, max_iterations=500, rtol=1e-12, eta=None)
        assert res.termination == "converged"
        torch.testing.assert_close(res.x, ref, rtol=1e-8, atol=1e-10)
        assert abs(res.model_decrease - (-_q(a, b, res.x))) <= 1e-9 * abs(res.model_decrease)


def test_singular_normal_equations_with_zero_damping_stay_finite():
    g = torch.Generator().manual_seed(2)
    J = torch.randn(10, 3, generator=g, dtype=D) @ torch.randn(3, 6, generator=g, dtype=D)  # rank 3
    r = torch.randn(10, generator=g, dtype=D)
    jtj = J.T @ J
    b = -J.T @ r  # lies in range(J^T J): the system is consistent
    diag = jtj.diagonal()
    res = pcg(lambda v: jtj @ v, b, precond=lambda v: v / diag, max_iterations=50, rtol=1e-12, eta=None)
    assert torch.isfinite(res.x).all()
    torch.testing.assert_close(jtj @ res.x, b, atol=1e-9, rtol=1e-9)
    # the minimum of 1/2 |r + J x|^2 is reached: same value as the least-squares solution
    ls = torch.linalg.lstsq(J, -r[:, None]).solution[:, 0]
    torch.testing.assert_close((r + J @ res.x).norm(), (r + J @ ls).norm())


def test_zero_rhs_and_indefinite_matrix():
    a = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=D))
    res0 = pcg(lambda v: a @ v, torch.zeros(3, dtype=D))
    assert res0.iterations == 0 and res0.termination == "zero rhs" and not res0.x.any()
    b = torch.tensor([0.0, 1.0, 0.0], dtype=D)  # first direction has negative curvature
    res = pcg(lambda v: a @ v, b, eta=None)
    assert res.termination == "non-positive curvature"
    assert torch.isfinite(res.x).all()
    zero = pcg(lambda v: torch.zeros_like(v), torch.ones(3, dtype=D))  # A = 0 (J = 0, lambda = 0)
    assert zero.termination == "non-positive curvature" and torch.isfinite(zero.x).all()


def test_nash_sofer_truncates_and_reports_model_decrease():
    a = _spd(200, 1e6, 3)
    b = torch.randn(200, generator=torch.Generator().manual_seed(4), dtype=D)
    full = pcg(lambda v: a @ v, b, max_iterations=2000, rtol=1e-10, eta=None)
    cut = pcg(lambda v: a @ v, b, max_iterations=2000, rtol=1e-10, eta=0.1)
    assert cut.termination == "forcing"
    assert cut.iterations < full.iterations
    assert 0 < cut.model_decrease <= full.model_decrease * (1 + 1e-12)
    assert abs(cut.model_decrease + _q(a, b, cut.x)) <= 1e-8 * cut.model_decrease
    capped = pcg(lambda v: a @ v, b, max_iterations=3, eta=None)
    assert capped.iterations == 3 and capped.termination == "max_iterations"
