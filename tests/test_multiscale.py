"""The silhouette residual pyramid (scenes/multiscale.py): values against cell means computed by hand, both
derivative modes, and the shape scene's blocks built from it; the shape scene's continuation stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from diffrender.scenes.multiscale import residual_pyramid

D = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def _cell_means(d: torch.Tensor, f: int) -> torch.Tensor:
    """Independent reference: the plain mean of every f x f cell (cut cells at the border: their pixels)."""
    n, h, w = d.shape
    out = torch.empty(n, -(-h // f), -(-w // f), dtype=d.dtype)
    for i in range(out.shape[1]):
        for j in range(out.shape[2]):
            out[:, i, j] = d[:, i * f : (i + 1) * f, j * f : (j + 1) * f].mean(dim=(1, 2))
    return out


def test_levels_are_cell_means_times_the_cell_size():
    d = torch.randn(2, 7, 10, generator=torch.Generator().manual_seed(0), dtype=D)
    pyr = residual_pyramid(d, 4)
    assert sorted(pyr) == [2, 4, 8, 16]
    for f, r in pyr.items():
        torch.testing.assert_close(r, f * _cell_means(d, f))
    assert residual_pyramid(d, 0) == {}


def test_a_uniform_error_costs_the_same_at_every_level():
    d = torch.full((3, 16, 16), 0.25, dtype=D)
    full = (d * d).sum()
    for r in residual_pyramid(d, 4).values():
        torch.testing.assert_close((r * r).sum(), full)


def test_pyramid_derivatives_in_both_modes():
    d = torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(1), dtype=D)

    def fn(x):
        return torch.cat([r.reshape(-1) for r in residual_pyramid(x, 2).values()])

    assert torch.autograd.gradcheck(fn, (d.clone().requires_grad_(True),))
    u = torch.randn_like(d)
    _, jvp = torch.func.jvp(fn, (d,), (u,))
    h = 1e-6
    torch.testing.assert_close(jvp, (fn(d + h * u) - fn(d - h * u)) / (2 * h), rtol=1e-6, atol=1e-9)
    w = torch.randn_like(jvp)
    _, vjp = torch.func.vjp(fn, d)
    torch.testing.assert_close(jvp @ w, (u * vjp(w)[0]).sum())  # <J u, w> = <u, J^T w>


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        residual_pyramid(torch.zeros(4, 4), 1)
    with pytest.raises(ValueError, match="levels must be >= 0"):
        residual_pyramid(torch.zeros(1, 4, 4), -1)


def _scene(levels: int, **kw):
    from diffrender.scenes import cow_shape
    from diffrender.scenes.base import BuildContext

    ctx = BuildContext(dtype=D, renderer={"image_size": 16, "coarse_to_fine": False}, root=ROOT)
    return cow_shape.build(name="cow_shape", mesh="assets/spot.obj", image_size=16, sigma=1e-3, sigma_schedule=[],
                           coarse_to_fine=False, gamma=1e-4, fov_deg=60.0, sphere_level=1, sphere_radius=0.6,
                           views=2, distance=2.5, elevations_deg=[-20.0, 25.0], color_stage=False,
                           w_silhouette=2.0, w_color=1.0, w_laplacian=1.0, w_edge=0.3, w_normal=0.1,
                           preconditioner_lambda=10.0, coarse_scale=1.0, view_chunks=1, ctx=ctx,
                           silhouette_levels=levels, **kw)


def test_shape_scene_adds_the_levels_as_weighted_blocks_with_consistent_derivatives():
    scene = _scene(3)
    x = {"offsets": 0.05 * torch.randn(42, 3, generator=torch.Generator().manual_seed(0), dtype=D)}
    problem = scene.stages[0].make_problem(x)
    ctx = problem.prepare_context(x)
    blocks = problem.residual_blocks(x, ctx)
    sil = blocks["silhouette"]
    for f in (2, 4, 8):
        torch.testing.assert_close(blocks[f"silhouette_{f}x"], f * _cell_means(sil, f))
        assert problem.weights[f"silhouette_{f}x"] == 2.0  # each level weighs as the full-resolution block
    # the same scene without levels: the same full-resolution block, and a cost lower by the levels' share
    flat = _scene(0).stages[0].make_problem(x)
    assert "silhouette_2x" not in flat.residual_blocks(x, flat.prepare_context(x))
    levels_cost = sum(0.5 * 2.0 * float((blocks[f"silhouette_{f}x"] ** 2).sum()) for f in (2, 4, 8))
    full_cost = flat.evaluate(x, flat.prepare_context(x)).cost
    assert problem.evaluate(x, ctx).cost == pytest.approx(full_cost + levels_cost, rel=1e-12)
    # the Jacobian operator of the stacked residuals: adjoint identity and a central-difference JVP
    lin = problem.linearize(x, ctx)
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(lin.op.n, generator=gen, dtype=D)
    w = torch.randn(lin.op.m, generator=gen, dtype=D)
    ju = lin.op.jvp(u)
    torch.testing.assert_close(ju @ w, u @ lin.op.vjp(w))
    layout = problem.layout(x)
    h = 1e-6

    def r(delta):
        xs = layout.retract(x, delta)
        return torch.cat([(problem.weights.get(k, 1.0) ** 0.5) * b.reshape(-1)
                          for k, b in problem.residual_blocks(xs, ctx).items()])

    torch.testing.assert_close(ju, (r(h * u) - r(-h * u)) / (2 * h), rtol=1e-5, atol=1e-7)


def test_negative_levels_are_refused():
    with pytest.raises(ValueError, match="silhouette_levels must be >= 0, got -1"):
        _scene(-1)


def test_normal_continuation_stages_scale_only_the_normal_term_and_are_capped():
    """scene.normal_continuation: one stage per factor before the full-weight stage, at the final σ, each capped
    at normal_continuation_iterations; the stage's cost is the full one with the normal block scaled."""
    scene = _scene(1, normal_continuation=[0.1, 0.5, 1.0], normal_continuation_iterations=7)
    assert [(st.name, st.max_iterations) for st in scene.stages] == [
        ("silhouette sigma=0.001 16px w_normal x0.1", 7), ("silhouette sigma=0.001 16px w_normal x0.5", 7),
        ("silhouette sigma=0.001 16px w_normal x1", 7), ("silhouette sigma=0.001 16px", None)]
    x = {"offsets": 0.05 * torch.randn(42, 3, generator=torch.Generator().manual_seed(0), dtype=D)}
    full = scene.stages[-1].make_problem(x)
    parts = full.evaluate(x, full.prepare_context(x)).block_costs
    assert parts["normal"] > 0.01 * sum(parts.values())  # the term matters at this point
    for factor, stage in zip((0.1, 0.5), scene.stages[:2], strict=True):
        problem = stage.make_problem(x)
        got = problem.evaluate(x, problem.prepare_context(x)).block_costs
        assert got["normal"] == pytest.approx(factor * parts["normal"], rel=1e-12)
        assert {k: v for k, v in got.items() if k != "normal"} == pytest.approx(
            {k: v for k, v in parts.items() if k != "normal"}, rel=1e-12)
    assert [st.max_iterations for st in _scene(1).stages] == [None]  # off by default
