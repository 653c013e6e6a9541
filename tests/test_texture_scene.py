"""The texture scene's Problem: exact Jacobian products (adjoint identity, central differences), a residual
affine in the texels, and Gauss-Newton reaching the known optimum (the true texture) from flat gray."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from diffrender.scenes.base import BuildContext
from diffrender.scenes.texture import build, resample_texture, texel_differences
from diffrender.solvers import GaussNewton

ROOT = Path(__file__).resolve().parents[1]


def tiny(texture_size: int = 16, image_size: int = 24, views: int = 2, w_smooth: float = 1e-2):
    return build(name="texture", mesh="assets/spot.obj", image_size=image_size, sigma=1e-5, sigma_schedule=[],
                 coarse_to_fine=False, gamma=1e-4, fov_deg=60.0, texture_size=texture_size, views=views,
                 distance=2.5, elevations_deg=[-20.0, 25.0], start_value=0.5, w_smooth=w_smooth,
                 seen_threshold=0.01, ctx=BuildContext(dtype=torch.float64, root=ROOT))


def whitened(problem, x, ctx) -> torch.Tensor:
    """The residual vector the operator differentiates: each block times sqrt(its weight)."""
    blocks = problem.residual_blocks(x, ctx)
    return torch.cat([math.sqrt(problem.weights.get(k, 1.0)) * b.reshape(-1) for k, b in blocks.items()])


@pytest.fixture(scope="module")
def scene():
    return tiny()


def test_jacobian_products_are_adjoint_and_match_central_differences(scene, one_thread):
    problem = scene.stages[0].make_problem(scene.x0)
    g = torch.Generator().manual_seed(0)
    x = {"texture": torch.rand(scene.x0["texture"].shape, generator=g, dtype=torch.float64)}
    ctx = problem.prepare_context(x)
    op = problem.linearize(x, ctx).op
    assert set(problem.residual_blocks(x, ctx)) == {"color", "smoothness"}
    u = torch.randn(op.n, generator=g, dtype=torch.float64)
    w = torch.randn(whitened(problem, x, ctx).numel(), generator=g, dtype=torch.float64)
    ju, jtw = op.jvp(u), op.vjp(w)
    assert float(ju.norm()) > 0 and float(jtw.norm()) > 0
    torch.testing.assert_close(ju @ w, u @ jtw, rtol=1e-10, atol=1e-10)  # <J u, w> = <u, J^T w>
    h = 1e-4
    step = u.reshape(x["texture"].shape)
    fd = (whitened(problem, {"texture": x["texture"] + h * step}, ctx)
          - whitened(problem, {"texture": x["texture"] - h * step}, ctx)) / (2 * h)
    torch.testing.assert_close(ju, fd, rtol=1e-7, atol=1e-9)
    # affine in the texels: the same J at another point, and r(x + u) = r(x) + J u exactly
    x2 = {"texture": x["texture"] + step}
    torch.testing.assert_close(problem.linearize(x2, ctx).op.jvp(u), ju, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(whitened(problem, x2, ctx), whitened(problem, x, ctx) + ju, rtol=1e-9, atol=1e-9)


def test_preconditioner_majorizes_the_gauss_newton_matrix(one_thread):
    """M = diag(J_c^T J_c 1) + 2 w diag(deg) >= J^T J (Erdogan & Fessler's separable majorizer), against a
    dense J assembled here column by column (the residual is affine: r(e_j) - r(0) is column j)."""
    from diffrender.problem import PreconditionerInfo

    sc = tiny(texture_size=8, image_size=16)
    problem = sc.stages[0].make_problem(sc.x0)
    x0 = {"texture": torch.zeros_like(sc.x0["texture"])}
    ctx = problem.prepare_context(x0)
    base = whitened(problem, x0, ctx)
    n = x0["texture"].numel()
    cols = [whitened(problem, {"texture": torch.eye(n, dtype=torch.float64)[j].reshape(x0["texture"].shape)},
                     ctx) - base for j in range(n)]
    jtj = (lambda j: j.T @ j)(torch.stack(cols, 1))
    zeros = torch.zeros(n, dtype=torch.float64)
    apply = problem.make_preconditioner(PreconditionerInfo(x0, ctx, problem.layout(x0), zeros, zeros))
    m = 1 / apply(torch.ones(n, dtype=torch.float64))
    live = jtj.diagonal() > 0  # texels some pixel depends on (the others: identity)
    assert 0 < int(live.sum()) < n
    assert bool((jtj.diagonal()[live] <= m[live] * (1 + 1e-9)).all())
    s = m[live].rsqrt()
    eig = torch.linalg.eigvalsh(s[:, None] * jtj[live][:, live] * s[None, :])
    assert float(eig.max()) <= 1 + 1e-9 and float(eig.max()) > 0.5  # M >= J^T J, and not by a wide margin


def test_smoothness_block_and_resampling_against_direct_formulas():
    t = torch.arange(3 * 4 * 2, dtype=torch.float64).reshape(3, 4, 2) ** 1.5
    d = texel_differences(t)
    ref = [t[i + 1, j, c] - t[i, j, c] for i in range(2) for j in range(4) for c in range(2)]
    ref += [t[i, j + 1, c] - t[i, j, c] for i in range(3) for j in range(3) for c in range(2)]
    torch.testing.assert_close(d, torch.stack(ref))
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, :2] = mask[1, 0] = True  # kept: rows (0,0)-(1,0); columns (0,0)-(0,1)
    kept = texel_differences(t, mask)
    assert int((kept != 0).sum()) == 2 * 2
    torch.testing.assert_close(kept[[0, 1]], t[1, 0] - t[0, 0])
    torch.testing.assert_close(kept[2 * 4 * 2: 2 * 4 * 2 + 2], t[0, 1] - t[0, 0])
    img = torch.rand(8, 8, 3, dtype=torch.float64)
    torch.testing.assert_close(resample_texture(img, 2)[1, 0], img[4:, :4].mean((0, 1)))


def test_gauss_newton_reaches_the_true_texture_in_two_iterations(one_thread):
    # without smoothness the true texture reproduces the targets exactly: the optimum has cost 0
    sc = tiny(texture_size=16, image_size=24, views=4, w_smooth=0.0)
    problem = sc.stages[0].make_problem(sc.x0)
    start = problem.evaluate(sc.x0, problem.prepare_context(sc.x0)).cost
    assert start > 1.0
    # an accurate linear solve (no Nash-Sofer truncation): the Gauss-Newton model of an affine residual is exact
    solver = GaussNewton(max_iterations=2, linear_solver="cg", eta=0.0, cg_rtol=1e-14, max_cg_iterations=60)
    result = solver.solve(problem, sc.x0)
    assert len(result.records) - 1 <= 2  # records[0] is the start point
    assert result.cost < 1e-6 * start
    assert sc.metrics_fn(result.x, sc.render_fn(result.x))["psnr"] > 70
    # texels no pixel depends on (zero Jacobian columns) keep the start value
    untouched = sc.ground_truth["footprint"] == 0
    assert int(untouched.sum()) > 0
    assert bool((result.x["texture"][untouched] == 0.5).all())


def test_bad_inputs_name_the_problem():
    from diffrender.config import UserError

    kw = dict(name="texture", image_size=8, sigma=1e-5, sigma_schedule=[], coarse_to_fine=False, gamma=1e-4,
              fov_deg=60.0, views=1, distance=2.5, elevations_deg=[0.0], start_value=0.5, w_smooth=0.0,
              seen_threshold=0.01, ctx=BuildContext(root=ROOT))
    with pytest.raises(UserError, match="teapot.obj needs UVs and a texture"):
        build(mesh="assets/teapot.obj", texture_size=8, **kw)
    with pytest.raises(UserError, match="texture_size must be at least 2"):
        build(mesh="assets/spot.obj", texture_size=1, **kw)
