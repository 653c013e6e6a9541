"""Hessian-vector products of a Problem's cost: against autograd's dense Hessian and central differences."""

import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix

from diffrender.problem import AxisAngleSO3, Cauchy, Problem

D = torch.float64


def _problem():
    g = torch.Generator().manual_seed(3)
    pts = torch.randn(7, 3, generator=g, dtype=D)
    obs = torch.randn(7, 3, generator=g, dtype=D)

    def residuals(x, ctx):
        R = axis_angle_to_rotation_matrix(x["rot"][None])[0]
        return {"fit": pts @ R.T * x["s"] + x["t"] - obs, "prior": torch.sin(x["t"]) * x["s"]}

    problem = Problem(residuals, manifolds={"rot": AxisAngleSO3()}, weights={"prior": 0.3},
                      losses={"fit": Cauchy(0.7)})
    x = {"rot": torch.tensor([0.3, -0.2, 0.5], dtype=D), "t": torch.tensor([0.1, 0.4, -0.3], dtype=D),
         "s": torch.tensor([1.3], dtype=D)}
    return problem, x


def test_hvp_equals_autograd_hessian_and_central_differences_of_the_gradient():
    problem, x = _problem()
    hess = problem.hessian(x)
    f = problem.tangent_cost(x)
    n = hess.n
    h_ref = torch.autograd.functional.hessian(f, torch.zeros(n, dtype=D))
    torch.testing.assert_close(hess.dense(), h_ref, rtol=1e-10, atol=1e-12)
    v = torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=D)
    grad = torch.func.grad(f)
    h = 1e-5
    fd = (grad(h * v) - grad(-h * v)) / (2 * h)
    torch.testing.assert_close(hess.hvp(v), fd, rtol=1e-7, atol=1e-9)
    _, ref_hvp = torch.autograd.functional.hvp(f, torch.zeros(n, dtype=D), v)
    torch.testing.assert_close(hess.hvp(v), ref_hvp, rtol=1e-10, atol=1e-12)
    # the gradient it carries is the cost's gradient, and the value the cost
    torch.testing.assert_close(hess.gradient, grad(torch.zeros(n, dtype=D)))
    assert abs(float(hess.value) - problem.evaluate(x).cost) < 1e-12


def test_hessian_of_a_residual_that_is_zero_at_the_optimum_is_gauss_newton():
    """At a zero-residual point H = J^T J exactly: the second-order term sum r_i grad^2 r_i vanishes."""
    a = torch.tensor([[1.0, 2.0], [0.5, -1.0], [3.0, 0.2]], dtype=D)
    xs = torch.tensor([0.7, -0.4], dtype=D)

    def residuals(x, ctx):
        return torch.exp(a @ x["x"]) - torch.exp(a @ xs)

    problem = Problem(residuals)
    x = {"x": xs.clone()}
    jtj = problem.linearize(x).op.columns()
    torch.testing.assert_close(problem.hessian(x).dense(), jtj.T @ jtj, rtol=1e-12, atol=1e-12)
    assert problem.counters.hvps == 2
