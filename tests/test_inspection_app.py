"""The fit's inspection callback on real scenes: sensitivity images against finite differences of renders,
TensorBoard scalars and uncertainty.json against an independently built Jacobian; the ``inspect`` config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from diffrender.config import InspectConfig
from diffrender.fit_inspector import FitInspector, make_inspector, sequential_colormap, signed_colormap
from diffrender.inspection import Jacobian
from diffrender.scenes import cow_shape, teapot_pose
from diffrender.scenes.base import BuildContext
from diffrender.solvers import LevenbergMarquardt

ROOT = Path(__file__).resolve().parents[1]
D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teapot():
    """teapot_pose at 32 px, one σ = 1e-3 stage, float64, with image noise so that the fit has a residual."""
    ctx = BuildContext(dtype=D, renderer={"image_size": 32, "coarse_to_fine": False, "sigma": 1e-3}, root=ROOT)
    scene = teapot_pose.build(name="teapot_pose", mesh="assets/teapot.obj", image_size=32, sigma=1e-3,
                              sigma_schedule=[], coarse_to_fine=False, gamma=1e-4, fov_deg=60.0,
                              target_distance=3.0, target_elevation_deg=50.0, target_azimuth_deg=0.0,
                              start_eye=[0.3, 2.4, 2.0], coarse_scale=1.0, ctx=ctx, image_noise=0.02)
    x = {"eye": scene.ground_truth["eye"] + torch.tensor([0.02, -0.01, 0.03], dtype=D)}
    problem = scene.stages[-1].make_problem(x)
    x = LevenbergMarquardt(max_iterations=20).solve(problem, x).x  # the fitted (noisy) pose
    return scene, problem, x


def _residual(problem, x):
    """The flat residual with its own pixel-face pairs: what two independent renders give."""
    blocks = problem.residual_blocks(x, problem.prepare_context(x))
    return torch.cat([b.reshape(-1) for b in blocks.values()]), blocks


def _fd_jacobian(problem, x, name="eye", h=1e-5):
    cols = []
    for j in range(x[name].numel()):
        e = torch.zeros_like(x[name]).reshape(-1)
        e[j] = h
        e = e.reshape(x[name].shape)
        rp, _ = _residual(problem, {**x, name: x[name] + e})
        rm, _ = _residual(problem, {**x, name: x[name] - e})
        cols.append((rp - rm) / (2 * h))
    return torch.stack(cols, 1)


def test_colormaps():
    c = signed_colormap(torch.tensor([-2.0, 0.0, 1.0, 2.0]))
    torch.testing.assert_close(c[1], torch.ones(3))  # 0 is white
    assert c[3, 0] > 0.7 and c[3, 2] < 0.2 and c[0, 2] > 0.7 and c[0, 0] < 0.2  # red > 0, blue < 0
    assert 0.2 < float(c[2, 1]) < 0.9  # half scale: a lighter red
    torch.testing.assert_close(signed_colormap(torch.zeros(2)), torch.ones(2, 3))
    s = sequential_colormap(torch.tensor([0.0, 1.0]))
    assert float(s[0].sum()) < float(s[1].sum())  # dark to bright


def test_sensitivity_images_of_a_pose_match_central_differences_of_renders(teapot, tmp_path):
    scene, problem, x = teapot
    fd = _fd_jacobian(problem, x)
    jac = Jacobian(problem, x)
    cols = jac.columns(range(3))
    scale = float(fd.abs().max())
    assert scale > 0.1
    torch.testing.assert_close(cols, fd, atol=1e-4 * scale, rtol=0)
    # the logged image: one row per eye coordinate, colored from d silhouette / d eye_j
    cfg = OmegaConf.structured(InspectConfig(enabled=True, every=1))
    insp = FitInspector(cfg, scene, problem, None, tmp_path)
    img = insp.sensitivity_images(jac)["sensitivity/eye"]
    assert img.shape[1] == 96  # enlarged 3x for TensorBoard
    img = img[::3, ::3]
    h, w = 32, 32
    assert img.shape == (3 * h + 2, w, 3)
    for j in range(3):
        ref = signed_colormap(fd[:, j].reshape(h, w))
        torch.testing.assert_close(img[j * (h + 1):j * (h + 1) + h], ref, atol=2e-3, rtol=0)


class _Record:
    def __init__(self, iteration):
        self.iteration = iteration


def test_callback_scalars_and_uncertainty_json_against_a_finite_difference_jacobian(teapot, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    scene, problem, x = teapot
    fd = _fd_jacobian(problem, x)
    a = fd.T @ fd
    ev = torch.linalg.eigvalsh(a)
    writer = SummaryWriter(str(tmp_path))
    cfg = OmegaConf.structured(InspectConfig(enabled=True, every=2, lanczos_steps=3))
    steps = iter(range(10, 14))
    insp = make_inspector(cfg, scene, problem, writer, tmp_path, x_full=x, step_fn=lambda: next(steps))
    before = problem.counters.snapshot()
    for it in range(4):
        assert insp(_Record(it), x, None) is False
    assert problem.counters.snapshot() == before  # the solver's counts are left alone
    plain = FitInspector(OmegaConf.structured(InspectConfig(enabled=True, every=0)), scene, problem, None, tmp_path,
                         step_offset=5)
    plain(_Record(3), x, None)
    assert plain.step == 8  # without step_fn: the stage's offset + iteration
    files = insp.finish(x)
    writer.close()
    assert files == ["uncertainty.json"]
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("inspect/cond")] == [10, 12]  # iterations 0 and 2
    assert ea.Scalars("inspect/eig_max")[0].value == pytest.approx(float(ev[-1]), rel=1e-3)
    assert ea.Scalars("inspect/eig_min")[0].value == pytest.approx(float(ev[0]), rel=1e-3)
    assert ea.Scalars("inspect/cond")[0].value == pytest.approx(float(ev[-1] / ev[0]), rel=2e-3)
    d = a.diagonal().rsqrt()
    evp = torch.linalg.eigvalsh(d[:, None] * a * d[None, :])  # Jacobi: the teapot problem has no factory
    assert ea.Scalars("inspect/cond_precond")[0].value == pytest.approx(float(evp[-1] / evp[0]), rel=2e-3)
    assert "sensitivity/eye" in ea.Tags()["images"]
    data = json.loads((tmp_path / "uncertainty.json").read_text())
    r, _ = _residual(problem, x)
    sigma2 = float(r @ r) / (r.numel() - 3)
    std = (sigma2 * torch.linalg.inv(a)).diagonal().sqrt()
    assert data["method"] == "dense" and data["blocks"] == ["silhouette"] and not data["rank_deficient"]
    assert data["sigma2"] == pytest.approx(sigma2, rel=1e-6)
    assert data["sigma2"] == pytest.approx(0.02**2, rel=0.15)  # the image noise the scene added
    torch.testing.assert_close(torch.tensor(data["parameters"]["eye"]["std"], dtype=D), std, rtol=1e-3, atol=0)


def test_shape_scene_reports_per_vertex_std_and_draws_the_mesh(tmp_path):
    ctx = BuildContext(dtype=D, renderer={"image_size": 24, "coarse_to_fine": False}, root=ROOT)
    scene = cow_shape.build(name="cow_shape", mesh="assets/spot.obj", image_size=24, sigma=3e-4,
                            sigma_schedule=[], coarse_to_fine=False, gamma=1e-4, fov_deg=60.0, sphere_level=1,
                            sphere_radius=0.6, views=3, distance=2.5, elevations_deg=[-20.0, 25.0],
                            color_stage=False, w_silhouette=1.0, w_color=1.0, w_laplacian=1.0, w_edge=0.3,
                            w_normal=0.1, preconditioner_lambda=10.0, coarse_scale=1.0, view_chunks=1, ctx=ctx)
    x = {"offsets": 0.05 * torch.randn(42, 3, generator=torch.Generator().manual_seed(0), dtype=D)}
    problem = scene.stages[-1].make_problem(x)
    # all blocks count (the regularizers as a prior): full rank; unit residual noise
    cfg = OmegaConf.structured(InspectConfig(enabled=True, every=0, blocks=None, regularizers=[],
                                             residual_variance=False))
    insp = FitInspector(cfg, scene, problem, None, tmp_path, x_full=x)
    insp(_Record(0), x, None)
    assert insp.finish(x) == ["uncertainty.json", "uncertainty_mesh.png"]
    data = json.loads((tmp_path / "uncertainty.json").read_text())
    # independent reference: forward-mode Jacobian of the weighted residuals w.r.t. the offsets, pairs fixed
    ctx_p = problem.prepare_context(x)
    w = problem.weights

    def f(off):
        blocks = problem.residual_blocks({"offsets": off}, ctx_p)
        return torch.cat([math.sqrt(w.get(k, 1.0)) * b.reshape(-1) for k, b in blocks.items()])

    # one JVP per column (the compiled sweep has no vmap rule, so no jacfwd)
    eye = torch.eye(126, dtype=D)
    j = torch.stack([torch.func.jvp(f, (x["offsets"],), (e.reshape(42, 3),))[1] for e in eye], dim=1)
    var = torch.linalg.inv(j.T @ j).diagonal().reshape(42, 3)
    pv = torch.tensor(data["parameters"]["offsets"]["per_vertex_std"], dtype=D)
    assert data["rank"] == 126 and data["method"] == "dense"
    torch.testing.assert_close(pv, var.sum(1).sqrt(), rtol=1e-6, atol=0)
    assert (tmp_path / "uncertainty_mesh.png").stat().st_size > 1000


def test_inspect_group_composes_and_rejects_typos():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        assert compose("config").inspect.enabled is False
        cfg = compose("config", overrides=["inspect=enabled", "inspect.every=3", "inspect.blocks=[silhouette]"])
        assert cfg.inspect.enabled and cfg.inspect.every == 3 and list(cfg.inspect.blocks) == ["silhouette"]
        assert make_inspector(compose("config").inspect, None, None, None, ".") is None
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=["inspect=enabled", "inspect.evry=3"])
        with pytest.raises(ConfigCompositionException):
            compose("config", overrides=["inspect=enabled", "inspect.every=often"])


def test_uncertainty_report_marks_unobserved_vertices():
    """Vertex 2 of four appears in no residual: per-vertex std sqrt(3) sigma elsewhere, and vertex 2 flagged."""
    from diffrender.fit_inspector import uncertainty_report
    from diffrender.inspection import covariance
    from diffrender.problem import Problem

    obs = torch.arange(9, dtype=D).reshape(3, 3)
    problem = Problem(lambda p, c: {"data": (p["offsets"][[0, 1, 3]] - obs) / 0.1})
    unc = covariance(problem, {"offsets": torch.zeros(4, 3, dtype=D)})
    data, pv, unobservable = uncertainty_report(unc, n_verts=4)
    assert data["rank_deficient"] and data["null_directions"] == 3 and data["rank"] == 9
    assert unobservable.tolist() == [False, False, True, False]
    torch.testing.assert_close(pv[[0, 1, 3]], torch.full((3,), 0.1 * math.sqrt(3), dtype=D))
    assert data["parameters"]["offsets"]["null_fraction"] == pytest.approx([0, 0, 1, 0], abs=1e-12)
