"""Scene helpers: regularizer residuals, the Laplacian preconditioner, metrics, camera JSON, image reading."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffrender.errors import UserError
from diffrender.io import load_cameras_json, load_image_set, read_image, write_png
from diffrender.mesh import icosphere
from diffrender.scenes.base import chamfer, iou, psnr, stage_size
from diffrender.scenes.regularizers import (
    Topology,
    edge_residual,
    laplacian_preconditioner,
    laplacian_residual,
    normal_residual,
    softening_length,
)


def test_topology_of_a_closed_mesh():
    m = icosphere(1, dtype=torch.float64)
    topo = Topology.of(m.faces, m.verts.shape[0])
    V, F = m.verts.shape[0], m.faces.shape[0]
    assert topo.edges.shape[0] == V + F - 2  # Euler, genus 0
    assert topo.face_pairs.shape[0] == topo.edges.shape[0]  # every edge of a closed mesh joins two faces
    assert int(topo.degree.sum()) == 2 * topo.edges.shape[0]
    # each pair shares exactly two vertices
    a, b = m.faces[topo.face_pairs[:, 0]], m.faces[topo.face_pairs[:, 1]]
    shared = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)
    assert bool((shared == 2).all())


def test_regularizers_against_direct_formulas():
    torch.manual_seed(0)
    m = icosphere(1, dtype=torch.float64)
    v = m.verts + 0.05 * torch.randn_like(m.verts)
    topo = Topology.of(m.faces, v.shape[0])
    # Laplacian: v_i - mean of neighbours, computed with a python loop
    nbrs = {i: set() for i in range(v.shape[0])}
    for f in m.faces.tolist():
        for x in f:
            nbrs[x].update(y for y in f if y != x)
    ref = torch.stack([v[i] - v[sorted(nbrs[i])].mean(0) for i in range(v.shape[0])])
    torch.testing.assert_close(laplacian_residual(v, topo), ref)
    # scaling the mesh scales the Laplacian and edge residuals; a uniform sphere has near-equal edges
    torch.testing.assert_close(laplacian_residual(2 * v, topo), 2 * ref)
    # edge residual: every undirected edge's length minus the mean length, edges listed from the faces here
    pairs = sorted({tuple(sorted((f[a], f[b]))) for f in m.faces.tolist() for a, b in ((0, 1), (1, 2), (2, 0))})
    lengths = torch.stack([(v[a] - v[b]).norm() for a, b in pairs])
    got = edge_residual(v, topo)
    assert got.shape == lengths.shape
    torch.testing.assert_close(got.sort().values, (lengths - lengths.mean()).sort().values, rtol=0, atol=1e-9)
    # normal residual: |n_a - n_b|^2 = 2 (1 - cos angle between the adjacent faces)
    r = normal_residual(v, m.faces, topo)
    fa, fb = m.faces[topo.face_pairs[:, 0]], m.faces[topo.face_pairs[:, 1]]

    def unit_normal(f):
        n = torch.linalg.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
        return n / n.norm(dim=1, keepdim=True)

    cos = (unit_normal(fa) * unit_normal(fb)).sum(1)
    torch.testing.assert_close((r * r).sum(1), 2 * (1 - cos))


def test_regularizers_are_differentiable_in_both_modes():
    m = icosphere(0, dtype=torch.float64)
    topo = Topology.of(m.faces, m.verts.shape[0])
    v = (m.verts + 0.03 * torch.randn_like(m.verts)).requires_grad_(True)
    for fn in (lambda x: laplacian_residual(x, topo), lambda x: edge_residual(x, topo),
               lambda x: normal_residual(x, m.faces, topo), lambda x: normal_residual(x, m.faces, topo, 0.3)):
        assert torch.autograd.gradcheck(fn, (v,))
        u = torch.randn_like(v)
        _, jvp = torch.func.jvp(fn, (v.detach(),), (u,))
        h = 1e-6
        fd = (fn(v.detach() + h * u) - fn(v.detach() - h * u)) / (2 * h)
        torch.testing.assert_close(jvp, fd, rtol=1e-5, atol=1e-7)


def test_softened_normals_keep_a_sliver_s_derivative_bounded():
    # two faces on the edge (0, 1): a unit right triangle and a sliver whose apex lies h off the shared edge
    faces = torch.tensor([[0, 1, 2], [1, 0, 3]])
    topo = Topology.of(faces, 4)

    def verts(h):
        return torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0.5, -h, 0.3 * h]], dtype=torch.float64)

    eps = 0.05
    # |ñ| = 2 x area: 1 for face 0, |(0, 0.3, 1)| for face 1; the median of two is the lower one (torch's)
    assert softening_length(verts(1.0), faces, 0.1) == pytest.approx(0.1 * min(1.0, 1.09 ** 0.5))
    assert softening_length(verts(1.0), faces, 0.0) == 0.0

    def jac_norm(h, e):
        return torch.autograd.functional.jacobian(lambda v: normal_residual(v, faces, topo, e), verts(h)).abs().max()

    # unit normals: the derivative grows as 1/h (|d n / d apex| = 1/|h (1, 0.3)|-ish); softened: below 1/eps
    # times the largest edge (|d ñ / d v| <= 2 max edge) for every h
    assert jac_norm(1e-6, 0.0) > 1e5
    for h in (1e-6, 1e-3, 1.0):
        assert jac_norm(h, eps) <= 2 * 2 ** 0.5 / eps
    # a face far above eps keeps its unit normal: n = unit * |ñ| / sqrt(|ñ|² + eps²), |ñ| = 1 for face 0
    v = verts(1.0)
    r_soft, r_unit = normal_residual(v, faces, topo, 1e-3), normal_residual(v, faces, topo)
    torch.testing.assert_close(r_soft, r_unit, rtol=0, atol=1e-6)
    # a collapsed face (h = 0: zero area) has normal 0 softened, so the pair costs |n_0|² = 1 exactly
    assert float((normal_residual(verts(0.0), faces, topo, eps) ** 2).sum()) == pytest.approx(1 / (1 + eps ** 2))


def test_laplacian_preconditioner_solves_i_plus_lambda_l():
    from types import SimpleNamespace

    m = icosphere(1, dtype=torch.float64)
    V = m.verts.shape[0]
    topo = Topology.of(m.faces, V)
    lam = 5.0
    factory = laplacian_preconditioner(topo, V, lam, "offsets", torch.float64, torch.device("cpu"))
    diag = torch.cat([torch.full((V * 3,), 2.0), torch.arange(1.0, 4.0, dtype=torch.float64)])
    layout = SimpleNamespace(names=("offsets", "other"),
                             split=lambda t: {"offsets": t[: V * 3].reshape(V, 3), "other": t[V * 3:]})
    apply = factory(SimpleNamespace(jtj_diag=diag, damping=torch.zeros_like(diag), layout=layout))
    v = torch.randn(V * 3 + 3, dtype=torch.float64)
    out = apply(v)
    # reference: L = D - A assembled from the faces here, M = 2 (I + λL) on each coordinate column
    A = torch.zeros(V, V, dtype=torch.float64)
    for f in m.faces.tolist():
        for i in range(3):
            a, b = f[i], f[(i + 1) % 3]
            A[a, b] = A[b, a] = 1.0
    M = 2.0 * (torch.eye(V, dtype=torch.float64) + lam * (torch.diag(A.sum(1)) - A))
    torch.testing.assert_close(out[: V * 3].reshape(V, 3), torch.linalg.solve(M, v[: V * 3].reshape(V, 3)))
    torch.testing.assert_close(out[V * 3:], v[V * 3:] / diag[V * 3:])  # Jacobi elsewhere


def test_metrics_on_known_values():
    a = torch.zeros(1, 4, 4)
    b = torch.zeros(1, 4, 4)
    a[0, :2] = 1.0  # 8 pixels
    b[0, 1:3] = 1.0  # 8 pixels, 4 shared
    assert iou(a, b) == pytest.approx(4 / 12)
    assert psnr(torch.full((2, 2), 0.5), torch.full((2, 2), 0.6)) == pytest.approx(20.0)
    p = torch.tensor([[0.0, 0, 0], [1, 0, 0]])
    q = torch.tensor([[0.0, 0, 0]])
    assert chamfer(p, q) == pytest.approx(0.5)  # (0 + 1)/2 one way, 0 the other
    assert stage_size(48, 2 / 3) == 32 and stage_size(48, 0.1) == 16 and stage_size(8, 0.5) == 8


def _lights_albedo(size: int, views: int, specular: float = 0.0, dtype: torch.dtype = torch.float64):
    from pathlib import Path

    from diffrender.scenes.base import BuildContext
    from diffrender.scenes.lights_albedo import build

    return build(name="lights_albedo", mesh="assets/spot.obj", image_size=size, sigma=1e-5, sigma_schedule=[],
                 coarse_to_fine=False, gamma=1e-4, fov_deg=60.0, views=views, distance=2.5, elevation_deg=20.0,
                 light_dir=[-0.4, -0.7, -0.6], light_intensity=0.8, ambient=0.3, start_light_dir=[0.0, 0.0, -1.0],
                 start_intensity=0.5, start_ambient=0.5, start_albedo=0.5, albedo_degree=2, specular=specular,
                 shininess=16.0, ctx=BuildContext(dtype=dtype, root=Path(__file__).resolve().parents[1]))


def test_polynomial_albedo_basis_spans_the_monomials():
    from diffrender.scenes.lights_albedo import polynomial_basis

    p = torch.rand(200, 3, dtype=torch.float64) * 2 - 1
    phi = polynomial_basis(p, 2)
    assert phi.shape == (200, 10)
    torch.testing.assert_close(phi.T @ phi, 200 * torch.eye(10, dtype=torch.float64))
    torch.testing.assert_close(phi[:, 0], torch.ones(200, dtype=torch.float64))
    x, y, z = p.unbind(1)
    for f in (x * y, z**2 - 0.5 * x + 3, y * z):  # in the span: the projection reproduces them
        torch.testing.assert_close(phi @ (phi.T @ f) / 200, f)
    assert float((phi @ (phi.T @ x**3) / 200 - x**3).abs().max()) > 1e-3  # degree 3 is not


@pytest.fixture(scope="module")
def lights_albedo():
    return _lights_albedo(24, 4)


def test_lights_albedo_scale_is_a_symmetry_only_of_diffuse_shading(lights_albedo):
    for sc, changes in ((lights_albedo, False), (_lights_albedo(16, 2, specular=0.5), True)):
        gt = {k: sc.ground_truth[k] for k in sc.x0}
        s = 1.3
        scaled = {**gt, "albedo": s * gt["albedo"], "ambient": gt["ambient"] / s, "intensity": gt["intensity"] / s}
        diff = float((sc.render_fn(scaled)["rgb"] - sc.render_fn(gt)["rgb"]).abs().max())
        assert (diff > 1e-3) if changes else (diff < 1e-12)


def test_lights_albedo_derivatives_follow_the_dtype():
    """float32 in, float32 tangents out in both modes (torch 2.13's forward mode gives `0-d tensor + float` a
    float64 tangent, which made the dense LM's J^T J float64)."""
    sc = _lights_albedo(16, 2, specular=0.5, dtype=torch.float32)
    problem = sc.stages[0].make_problem(sc.x0)
    ctx = problem.prepare_context(sc.x0)
    tangent = {k: torch.ones_like(v) for k, v in sc.x0.items()}
    _, jvp = torch.func.jvp(lambda p: problem.residual_blocks(p, ctx), (sc.x0,), (tangent,))
    assert {b.dtype for b in jvp.values()} == {torch.float32}
    _, vjp = torch.func.vjp(lambda p: problem.residual_blocks(p, ctx), sc.x0)
    grads = vjp({k: torch.ones_like(v) for k, v in jvp.items()})[0]
    assert {g.dtype for g in grads.values()} == {torch.float32}


def test_lm_recovers_the_light_of_lights_albedo(lights_albedo, one_thread):
    """With a smooth (quadratic) albedo the light is identifiable: LM from the start (53° off) finds it. With a
    free albedo per vertex (the former scene) the same fit stopped 3.6° off after 30 iterations,
    with intensity and ambient off by 0.61 and 0.29 after the best scale."""
    from diffrender.solvers import LevenbergMarquardt

    sc = lights_albedo
    start = sc.metrics_fn(sc.x0, sc.render_fn(sc.x0))
    assert start["light_dir_err_deg"] > 45
    problem = sc.stages[0].make_problem(sc.x0)
    result = LevenbergMarquardt(max_iterations=12).solve(problem, sc.x0)
    m = sc.metrics_fn(result.x, sc.render_fn(result.x))
    assert m["light_dir_err_deg"] < 0.1
    # intensity, ambient and albedo up to the diffuse scale, which the gauge block pins to ambient + I = 1
    assert m["intensity_err"] < 1e-3 and m["ambient_err"] < 1e-3 and m["albedo_rmse"] < 1e-3
    assert abs(float(result.x["ambient"] + result.x["intensity"]) - 1.0) < 1e-4


def test_cameras_json_both_forms_agree_and_errors_name_the_field(tmp_path):
    eye = [0.5, 1.0, 2.5]
    z = -np.asarray(eye) / np.linalg.norm(eye)
    x = np.cross(z, [0, 1, 0])
    x /= np.linalg.norm(x)
    R = np.stack([x, np.cross(z, x), z])
    t = -R @ np.asarray(eye)
    base = {"width": 8, "height": 6, "fx": 10, "fy": 11, "cx": 4, "cy": 3}
    views = [{"file": "a.png", **base, "R": R.tolist(), "t": t.tolist()}, {"file": "b.png", **base, "eye": eye}]
    (tmp_path / "cameras.json").write_text(json.dumps({"views": views}))
    cam, files, mesh = load_cameras_json(tmp_path / "cameras.json", dtype=torch.float64)
    torch.testing.assert_close(cam.R[0], cam.R[1])
    torch.testing.assert_close(cam.t[0], cam.t[1])
    assert (cam.height, cam.width) == (6, 8) and files[1] == tmp_path / "b.png" and mesh is None
    torch.testing.assert_close(cam.focal[0], torch.tensor([10.0, 11.0], dtype=torch.float64))
    views[1]["fx"] = "ten"
    (tmp_path / "cameras.json").write_text(json.dumps({"views": views}))
    with pytest.raises(UserError, match=r"views\[1\]: field 'fx'"):
        load_cameras_json(tmp_path / "cameras.json")
    views[1]["fx"] = 10
    views[0]["R"] = (2 * R).tolist()
    (tmp_path / "cameras.json").write_text(json.dumps({"views": views}))
    with pytest.raises(UserError, match="not a rotation"):
        load_cameras_json(tmp_path / "cameras.json")


def test_image_set_reads_alpha_and_checks_sizes(tmp_path):
    img = np.zeros((6, 8, 4), np.float32)
    img[2:4, 3:6] = [1.0, 0.5, 0.25, 1.0]
    write_png(tmp_path / "a.png", img)
    back = read_image(tmp_path / "a.png")
    assert back.shape == (6, 8, 4) and np.abs(back - img).max() <= 0.5 / 255 + 1e-6
    v = {"file": "a.png", "width": 8, "height": 6, "fx": 10, "fy": 10, "cx": 4, "cy": 3, "eye": [0, 0, 3]}
    (tmp_path / "cameras.json").write_text(json.dumps({"views": [v]}))
    s = load_image_set(tmp_path / "cameras.json")
    assert s.alpha is not None and float(s.alpha.sum()) == 6.0 and s.rgb.shape == (1, 6, 8, 3)
    v["width"] = 9
    (tmp_path / "cameras.json").write_text(json.dumps({"views": [v]}))
    with pytest.raises(UserError, match="a.png is 8x6"):
        load_image_set(tmp_path / "cameras.json")
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(UserError, match="cannot read image"):
        read_image(tmp_path / "bad.png")
    assert s.rgb.dtype == torch.float32 and float(s.rgb.min()) >= 0.0 and float(s.rgb.max()) <= 1.0
