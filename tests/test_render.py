"""Soft rasterizer: values against independent references, derivatives in both AD modes, bad input."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffrender.camera import Camera, camera_from_look_at, look_at, pose_to_extrinsics
from diffrender.mesh import icosphere, load_obj, normalize
from diffrender.raster.shading import Lights, Material
from diffrender.raster.texture import sample_bilinear
from diffrender.render import RenderSettings, prepare, render

D = torch.float64


def tiny_scene(n_views=2, h=12, w=10):
    torch.manual_seed(0)
    mesh = icosphere(0, dtype=D)
    verts = mesh.verts + 0.05 * torch.randn_like(mesh.verts)
    eyes = torch.tensor([[0.3, 0.4, 3.0], [2.5, 0.5, 1.0], [-1.0, 2.0, 2.0]], dtype=D)[:n_views]
    cam = camera_from_look_at(eyes, fov_deg=50, height=h, width=w)
    return verts, mesh.faces, cam


SOFT = RenderSettings(sigma=3e-3, gamma=1e-2)
LIGHTS = dict(ambient=(0.3, 0.3, 0.3), directional_dirs=[(0.2, -1.0, -0.5)], directional_colors=[(0.7, 0.6, 0.5)],
              point_positions=[(1.0, 2.0, 3.0)], point_colors=[(0.5, 0.4, 0.3)])


def images(out):
    return tuple(out[k] for k in ("alpha", "depth", "rgb") if k in out)


# ---------------------------------------------------------------- reverse and forward mode, per input kind


def test_gradcheck_vertices_colors_lights():
    verts, faces, cam = tiny_scene()
    pairs = prepare(verts, faces, cam, SOFT)
    assert len(pairs) > 100
    lights = Lights.create(**LIGHTS, dtype=D)
    mat = Material(specular=0.3, shininess=8.0)

    def f(v, colors, ambient, ldir, lcol, lpos):
        L = Lights(ambient, ldir, lcol, lpos, lights.point_colors)
        return images(render(v, faces, cam, pairs, SOFT, colors=colors, lights=L, material=mat))

    args = (verts, torch.rand(12, 3, dtype=D), lights.ambient, lights.directional_dirs, lights.directional_colors,
            lights.point_positions)
    assert torch.autograd.gradcheck(f, tuple(a.clone().requires_grad_() for a in args), check_forward_ad=True,
                                    fast_mode=True)


def test_gradcheck_camera_pose_and_intrinsics():
    verts, faces, cam = tiny_scene()
    pairs = prepare(verts, faces, cam, SOFT)
    aa = torch.tensor([[0.1, -0.2, 0.05], [0.3, 0.2, -0.1]], dtype=D)
    R0, t = cam.R, cam.t

    def f(rot, trans, focal, principal):
        R = pose_to_extrinsics(rot, trans)[0] @ R0
        c = Camera(R, trans, focal, principal, cam.height, cam.width)
        return images(render(verts, faces, c, pairs, SOFT, colors=torch.ones(12, 3, dtype=D)))

    # Pairs were found at the unperturbed camera: evaluate there (rot = 0) and let derivatives move it.
    args = (torch.zeros_like(aa), t, cam.focal, cam.principal)
    assert torch.autograd.gradcheck(f, tuple(a.clone().requires_grad_() for a in args), check_forward_ad=True)


def test_gradcheck_texture_and_uvs():
    verts, faces, cam = tiny_scene(n_views=1)
    pairs = prepare(verts, faces, cam, SOFT)
    torch.manual_seed(3)
    uvs = torch.rand(12, 2, dtype=D) * 0.8 + 0.1
    tex = torch.rand(5, 6, 3, dtype=D)

    def f(texture, uv):
        return render(verts, faces, cam, pairs, SOFT, uvs=uv, uv_faces=faces, texture=texture)["rgb"]

    assert torch.autograd.gradcheck(f, (tex.requires_grad_(), uvs.requires_grad_()), check_forward_ad=True)


def test_bilinear_sampling_matches_grid_sample():
    torch.manual_seed(0)
    tex = torch.rand(7, 9, 4, dtype=D)
    uv = torch.rand(50, 2, dtype=D)
    ours = sample_bilinear(tex, uv)
    # grid_sample: x in [-1, 1] left to right, y in [-1, 1] top to bottom; uv's v points up.
    grid = torch.stack([uv[:, 0] * 2 - 1, (1 - uv[:, 1]) * 2 - 1], -1).view(1, 1, -1, 2)
    ref = F.grid_sample(tex.permute(2, 0, 1)[None], grid, mode="bilinear", padding_mode="border",
                        align_corners=False)[0, :, 0].T
    assert torch.allclose(ours, ref, atol=1e-12)
    assert torch.autograd.gradcheck(sample_bilinear, (tex.requires_grad_(), (uv * 0.9 + 0.05).requires_grad_()),
                                    check_forward_ad=True)


# ---------------------------------------------------------------- linearized products on a teapot-sized scene


@pytest.fixture(scope="module")
def teapot_scene():
    mesh = normalize(load_obj("assets/teapot.obj", dtype=D))
    cam = camera_from_look_at(torch.tensor([[0.4, 1.2, 2.6], [-2.0, 0.8, 1.5]], dtype=D), fov_deg=55,
                              height=40, width=48)
    settings = RenderSettings(sigma=1e-3, gamma=1e-2)
    return mesh, cam, settings


def test_linearized_jvp_matches_finite_differences_and_vjp(teapot_scene):
    mesh, cam, settings = teapot_scene
    assert mesh.faces.shape[0] > 2000
    pairs = prepare(mesh.verts, mesh.faces, cam, settings)
    colors = torch.rand_like(mesh.verts)
    lights = Lights.create(**LIGHTS, dtype=D)

    def f(v, c):
        out = render(v, mesh.faces, cam, pairs, settings, colors=c, lights=lights, material=Material(0.2, 10))
        return torch.cat([out["alpha"].flatten(), out["depth"].flatten(), out["rgb"].flatten()])

    torch.manual_seed(0)
    x = (mesh.verts, colors)
    u = (torch.randn_like(mesh.verts) * 1e-2, torch.randn_like(colors))
    y, jvp_fn = torch.func.linearize(f, *x)
    ju = jvp_fn(*u)
    # Central differences (pairs held fixed: they are the piecewise-constant part).
    h = 1e-6
    fd = (f(x[0] + h * u[0], x[1] + h * u[1]) - f(x[0] - h * u[0], x[1] - h * u[1])) / (2 * h)
    assert torch.allclose(ju, fd, rtol=1e-5, atol=1e-6 * fd.abs().max())
    assert torch.allclose(ju, torch.func.jvp(f, x, u)[1], atol=1e-10)
    # Adjoint identity <J u, w> = <u, Jᵀ w> with a reused VJP.
    _, vjp_fn = torch.func.vjp(f, *x)
    for seed in range(2):
        torch.manual_seed(seed)
        w = torch.randn_like(y)
        jtw = vjp_fn(w)
        lhs = (ju * w).sum()
        rhs = sum((a * b).sum() for a, b in zip(u, jtw, strict=True))
        assert torch.allclose(lhs, rhs, rtol=1e-10)


def test_reverse_mode_matches_backward(teapot_scene):
    mesh, cam, settings = teapot_scene
    pairs = prepare(mesh.verts, mesh.faces, cam, settings)
    v = mesh.verts.clone().requires_grad_()
    alpha = render(v, mesh.faces, cam, pairs, settings, outputs=("alpha",))["alpha"]
    w = torch.randn_like(alpha)
    (alpha * w).sum().backward()
    (g,) = torch.func.vjp(lambda x: render(x, mesh.faces, cam, pairs, settings, outputs=("alpha",))["alpha"],
                          mesh.verts)[1](w)
    assert torch.allclose(v.grad, g, atol=1e-12)


# ---------------------------------------------------------------- values against independent references


def hard_coverage(verts, faces, cam):
    """Reference: pixel centers inside any front-facing projected triangle (plain pinhole math)."""
    K = torch.zeros(3, 3, dtype=verts.dtype)
    K[0, 0], K[1, 1], K[0, 2], K[1, 2], K[2, 2] = cam.focal[0, 0], cam.focal[0, 1], cam.principal[0, 0], \
        cam.principal[0, 1], 1
    h = (K @ (cam.R[0] @ verts.T + cam.t[0, :, None])).T
    p2 = h[:, :2] / h[:, 2:]
    ys, xs = torch.meshgrid(torch.arange(cam.height, dtype=verts.dtype) + 0.5,
                            torch.arange(cam.width, dtype=verts.dtype) + 0.5, indexing="ij")
    pix = torch.stack([xs.flatten(), ys.flatten()], -1)
    mask = torch.zeros(pix.shape[0], dtype=torch.bool)
    for a, b, c in p2[faces]:
        def cross(o, q, r):
            return (q[0] - o[0]) * (r[:, 1] - o[1]) - (q[1] - o[1]) * (r[:, 0] - o[0])
        s0, s1, s2 = cross(a, b, pix), cross(b, c, pix), cross(c, a, pix)
        mask |= ((s0 >= 0) & (s1 >= 0) & (s2 >= 0)) | ((s0 <= 0) & (s1 <= 0) & (s2 <= 0))
    return mask.view(cam.height, cam.width)


def test_small_sigma_silhouette_equals_hard_coverage():
    mesh = normalize(load_obj("assets/spot.obj", dtype=D))
    cam = camera_from_look_at(torch.tensor([[1.5, 0.8, 2.0]], dtype=D), fov_deg=50, height=64, width=80)
    settings = RenderSettings(sigma=1e-7)
    alpha = render(mesh.verts, mesh.faces, cam, prepare(mesh.verts, mesh.faces, cam, settings), settings,
                   outputs=("alpha",))["alpha"][0]
    ref = hard_coverage(mesh.verts, mesh.faces, cam)
    ours = alpha > 0.5
    iou = (ours & ref).sum() / (ours | ref).sum()
    assert ref.sum() > 500 and iou >= 0.99


def test_depth_of_tilted_plane_is_analytic():
    # A large quad on the plane z = 3 + 0.5 x in camera space (camera at the origin looking along +z).
    s = 4.0
    xs = torch.tensor([-s, s, s, -s], dtype=D)
    ys = torch.tensor([-s, -s, s, s], dtype=D)
    verts = torch.stack([xs, ys, 3 + 0.5 * xs], -1)
    faces = torch.tensor([[0, 2, 1], [0, 3, 2]])
    eye = torch.eye(3, dtype=D)[None]
    cam = Camera(eye, torch.zeros(1, 3, dtype=D), torch.full((1, 2), 20.0, dtype=D),
                 torch.tensor([[16.0, 12.0]], dtype=D), 24, 32)
    settings = RenderSettings(sigma=1e-6, cull_backfaces=False)
    depth = render(verts, faces, cam, prepare(verts, faces, cam, settings), settings, outputs=("depth",))["depth"][0]
    # Ray through pixel (x, y): direction (u, v, 1) with u = (x - cx) / f; plane z = 3 + 0.5 z u.
    u = (torch.arange(32, dtype=D) + 0.5 - 16) / 20
    expected = (3 / (1 - 0.5 * u)).expand(24, 32)
    assert torch.allclose(depth, expected, rtol=1e-9)


def test_single_triangle_coverage_follows_sigmoid():
    # Triangle edge on the vertical line x = 20 px; pixel centers at known distances to its right.
    verts = torch.tensor([[-10.0, -10.0, 2.0], [0.0, 10.0, 2.0], [0.0, -10.0, 2.0]], dtype=D)
    faces = torch.tensor([[0, 1, 2]])
    cam = Camera(torch.eye(3, dtype=D)[None], torch.zeros(1, 3, dtype=D), torch.full((1, 2), 4.0, dtype=D),
                 torch.tensor([[20.0, 20.0]], dtype=D), 40, 40)
    settings = RenderSettings(sigma=2e-3, cull_backfaces=False)
    alpha = render(verts, faces, cam, prepare(verts, faces, cam, settings), settings, outputs=("alpha",))["alpha"][0]
    for col in (20, 21, 22):  # centers at 0.5, 1.5, 2.5 px right of the edge (cutoff: 2.71 px)
        d_ndc = (col + 0.5 - 20) * 2 / 40
        assert math.isclose(alpha[20, col].item(), 1 / (1 + math.exp(d_ndc**2 / 2e-3)), rel_tol=1e-9)
    d_in = 0.5 * 2 / 40  # column 19 is inside, 0.5 px from the edge
    assert math.isclose(alpha[20, 19].item(), 1 / (1 + math.exp(-(d_in**2) / 2e-3)), rel_tol=1e-9)
    # Beyond the cutoff radius nothing is drawn.
    r = settings.radius_px(40, 40)
    assert alpha[20, 20 + math.ceil(r) + 1].item() == 0.0


def test_backface_culling():
    verts = torch.tensor([[-1.0, -1.0, 3.0], [1.0, -1.0, 3.0], [0.0, 1.0, 3.0]], dtype=D)
    cam = Camera(torch.eye(3, dtype=D)[None], torch.zeros(1, 3, dtype=D), torch.full((1, 2), 10.0, dtype=D),
                 torch.tensor([[8.0, 8.0]], dtype=D), 16, 16)
    counts = {}
    for order in ([0, 1, 2], [0, 2, 1]):
        faces = torch.tensor([order])
        for cull in (True, False):
            s = RenderSettings(sigma=1e-5, cull_backfaces=cull)
            counts[tuple(order), cull] = render(verts, faces, cam, prepare(verts, faces, cam, s), s)["alpha"].sum()
    # In world space y up and seen from the camera (+z forward, image y down), [0, 1, 2] is counter-clockwise.
    assert counts[(0, 1, 2), False] == counts[(0, 2, 1), False] > 5
    # The camera's image y axis flips orientation: vertex 2 has image y < its neighbours.
    front = (0, 1, 2) if counts[(0, 1, 2), True] > 0 else (0, 2, 1)
    back = (0, 2, 1) if front == (0, 1, 2) else (0, 1, 2)
    assert counts[front, True] == counts[front, False] and counts[back, True] == 0
    # Outward normal (v1 - v0) x (v2 - v0) of the visible winding points toward the camera (-z).
    v = verts[list(front)]
    assert torch.linalg.cross(v[1] - v[0], v[2] - v[0])[2] < 0


def test_rigid_motion_of_mesh_and_camera_leaves_image_unchanged():
    mesh = normalize(load_obj("assets/teapot.obj", dtype=D))
    colors = torch.rand_like(mesh.verts)
    eyes = torch.tensor([[0.5, 1.0, 2.5], [2.0, 0.3, -1.0]], dtype=D)
    settings = RenderSettings(sigma=1e-4, gamma=1e-3)
    lights = Lights.create(**LIGHTS, dtype=D)

    def shot(verts, R, t, L):
        cam = Camera(R, t, base.focal, base.principal, 32, 32)
        return render(verts, mesh.faces, cam, prepare(verts, mesh.faces, cam, settings), settings, colors=colors,
                      lights=L, material=Material(0.3, 16))

    base = camera_from_look_at(eyes, fov_deg=50, height=32, width=32)
    Q, _ = pose_to_extrinsics(torch.tensor([[0.4, -0.7, 0.2]], dtype=D), torch.zeros(1, 3, dtype=D))
    Q, c = Q[0], torch.tensor([0.3, -0.2, 0.5], dtype=D)
    moved = mesh.verts @ Q.T + c
    # x_cam = R x + t = R Qᵀ (Q x + c) + (t - R Qᵀ c); lights move with the scene.
    R2 = base.R @ Q.T
    t2 = base.t - (R2 @ c)
    L2 = Lights(lights.ambient, lights.directional_dirs @ Q.T, lights.directional_colors,
                lights.point_positions @ Q.T + c, lights.point_colors)
    a = shot(mesh.verts, base.R, base.t, lights)
    b = shot(moved, R2, t2, L2)
    for k in ("alpha", "depth", "rgb"):
        assert torch.allclose(a[k], b[k], atol=1e-9), k
    assert a["alpha"].sum() > 100


def test_mesh_behind_camera_renders_background():
    mesh = icosphere(2, dtype=D)
    cam = camera_from_look_at(torch.tensor([[0.0, 0.0, 3.0]], dtype=D), at=(0.0, 0.0, 6.0), height=16, width=16)
    settings = RenderSettings(background=(0.2, 0.4, 0.6))
    out = render(mesh.verts, mesh.faces, cam, prepare(mesh.verts, mesh.faces, cam, settings), settings,
                 colors=torch.ones_like(mesh.verts))
    assert torch.count_nonzero(out["alpha"]) == 0
    assert torch.allclose(out["rgb"], torch.tensor([0.2, 0.4, 0.6], dtype=D).expand(1, 16, 16, 3))


def test_straddling_near_plane_does_not_smear():
    # One vertex behind the camera: the face is dropped rather than projected through infinity.
    verts = torch.tensor([[-1.0, -1.0, 2.0], [1.0, -1.0, 2.0], [0.0, 1.0, -1.0]], dtype=D, requires_grad=True)
    faces = torch.tensor([[0, 1, 2]])
    cam = Camera(torch.eye(3, dtype=D)[None], torch.zeros(1, 3, dtype=D), torch.full((1, 2), 10.0, dtype=D),
                 torch.tensor([[8.0, 8.0]], dtype=D), 16, 16)
    s = RenderSettings(cull_backfaces=False)
    out = render(verts, faces, cam, prepare(verts, faces, cam, s), s, colors=torch.ones(3, 3, dtype=D))
    assert torch.count_nonzero(out["alpha"]) == 0
    sum(o.sum() for o in out.values()).backward()
    assert torch.isfinite(verts.grad).all()


# ---------------------------------------------------------------- degenerate geometry: finite values and derivatives


def test_degenerate_faces_give_finite_values_and_derivatives():
    verts = torch.tensor([
        [-0.5, -0.5, 0.0], [0.5, -0.5, 0.0], [0.0, 0.5, 0.0],      # regular face
        [0.2, 0.2, 0.1], [0.2, 0.2, 0.1], [0.4, 0.1, 0.1],          # coincident vertices
        [-0.3, 0.0, 0.2], [0.0, 0.0, 0.2], [0.3, 0.0, 0.2],         # collinear: zero area
        [0.1, -0.3, -0.5], [0.1, -0.3, 0.5], [0.1, 0.2, 0.0],       # edge-on (plane x = 0.1 contains the eye)
        [0.0, 0.0, 3.5], [0.3, 0.0, 3.5], [0.0, 0.3, 3.5],          # behind the camera
    ], dtype=D)
    faces = torch.arange(15).view(5, 3)
    cam = camera_from_look_at(torch.tensor([[0.1, 0.0, 3.0]], dtype=D), at=(0.1, 0.0, 0.0), height=20, width=20)
    s = RenderSettings(sigma=1e-3, gamma=1e-3, cull_backfaces=False)
    pairs = prepare(verts, faces, cam, s)
    colors = torch.rand(15, 3, dtype=D)
    lights = Lights.create(**LIGHTS, dtype=D)

    def f(v):
        out = render(v, faces, cam, pairs, s, colors=colors, lights=lights, material=Material(0.5, 4))
        return torch.cat([o.flatten() for o in out.values()])

    y = f(verts)
    assert torch.isfinite(y).all() and y.abs().sum() > 0
    (g,) = torch.func.vjp(f, verts)[1](torch.ones_like(y))
    ju = torch.func.jvp(f, (verts,), (torch.ones_like(verts),))[1]
    assert torch.isfinite(g).all() and torch.isfinite(ju).all()
    assert set(pairs.face.unique().tolist()) <= {0, 3}  # degenerate and behind-camera faces have no pairs


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("verts,faces,match", [
    (torch.zeros(4, 3), torch.tensor([[0, 1, 4]]), "faces: index 4 out of range"),
    (torch.zeros(4, 3), torch.tensor([[0, -1, 2]]), "faces: index -1 out of range"),
    (torch.zeros(4, 2), torch.tensor([[0, 1, 2]]), r"verts: expected shape \(V, 3\)"),
    (torch.zeros(4, 3), torch.tensor([[0, 1]]), r"faces: expected shape \(F, 3\)"),
    (torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.long), "V > 0"),
    (torch.zeros(4, 3), torch.zeros(0, 3, dtype=torch.long), "F > 0"),
    (torch.tensor([[0.0, 0, 0], [1, 0, 0], [float("nan"), 1, 0]]), torch.tensor([[0, 1, 2]]), "NaN or inf"),
    (torch.zeros(3, 3), torch.tensor([[0.0, 1.0, 2.0]]), "integer dtype"),
])
def test_bad_geometry(verts, faces, match):
    cam = camera_from_look_at(torch.tensor([[0.0, 0.0, 3.0]]), height=8, width=8)
    with pytest.raises(ValueError, match=match):
        prepare(verts, faces, cam, RenderSettings())


def test_bad_render_arguments():
    verts, faces, cam = tiny_scene(n_views=1)
    pairs = prepare(verts, faces, cam, SOFT)
    with pytest.raises(ValueError, match="colors: expected shape"):
        render(verts, faces, cam, pairs, SOFT, colors=torch.ones(5, 3, dtype=D))
    with pytest.raises(ValueError, match="'rgb' needs colors"):
        render(verts, faces, cam, pairs, SOFT, outputs=("rgb",))
    with pytest.raises(ValueError, match="unknown"):
        render(verts, faces, cam, pairs, SOFT, outputs=("normals",))
    other = camera_from_look_at(torch.tensor([[0.0, 0.0, 3.0]], dtype=D), height=9, width=10)
    with pytest.raises(ValueError, match="call prepare"):
        render(verts, faces, other, pairs, SOFT)
    with pytest.raises(ValueError, match="RenderSettings.sigma"):
        RenderSettings(sigma=0.0)


def test_float32_default_and_look_at_pose_derivative_is_nonzero():
    mesh = icosphere(1)
    eye = torch.tensor([[0.2, 0.5, 3.0]])
    s = RenderSettings(sigma=1e-3)

    def f(e):
        R, t = look_at(e, torch.zeros(3))
        cam = camera_from_look_at(eye, height=24, width=24)
        cam = Camera(R, t, cam.focal, cam.principal, 24, 24)
        return render(mesh.verts, mesh.faces, cam, pairs, s, outputs=("alpha",))["alpha"]

    pairs = prepare(mesh.verts, mesh.faces, camera_from_look_at(eye, height=24, width=24), s)
    y, ju = torch.func.jvp(f, (eye,), (torch.tensor([[1.0, 0.0, 0.0]]),))
    assert y.dtype == torch.float32 and ju.dtype == torch.float32
    assert ju.abs().sum() > 0 and torch.isfinite(ju).all()


# ---------------------------------------------------------------- the pair list is complete and exact


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_pairs_equal_brute_force_enumeration(monkeypatch, backend):
    import diffrender.raster.coverage as coverage

    mesh = normalize(load_obj("assets/bunny_1k.obj", dtype=D))
    cam = camera_from_look_at(torch.tensor([[0.3, 0.5, 2.2], [-1.8, 0.2, 1.0]], dtype=D), fov_deg=50,
                              height=30, width=36)
    settings = RenderSettings(sigma=3e-4, cull_backfaces=True, backend=backend)
    radius = settings.radius_px(30, 36)
    # Reference: every (view, face, pixel) triple, distance to the triangle by sampling-free geometry.
    xy, z = cam.project(mesh.verts)
    tri = xy[:, mesh.faces]  # (N, F, 3, 2)
    ys, xs = torch.meshgrid(torch.arange(30, dtype=D) + 0.5, torch.arange(36, dtype=D) + 0.5, indexing="ij")
    p = torch.stack([xs.flatten(), ys.flatten()], -1)[None, None, :, None, :]  # (1, 1, HW, 1, 2)
    a, b = tri[:, :, None], tri.roll(-1, dims=2)[:, :, None]  # edges a_k -> b_k, (N, F, 1, 3, 2)
    e = b - a
    t = (((p - a) * e).sum(-1) / (e * e).sum(-1)).clamp(0, 1)
    dist2 = ((p - a - t[..., None] * e) ** 2).sum(-1).amin(-1)  # (N, F, HW)
    cr = e[..., 0] * (p - a)[..., 1] - e[..., 1] * (p - a)[..., 0]
    area2 = torch.linalg.det(torch.stack([tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0]], -1))
    inside = ((cr <= 0).all(-1) | (cr >= 0).all(-1))
    usable = (area2 < 0)[..., None] & (z[:, mesh.faces] > cam.near).all(-1)[..., None]

    def within(r):
        n, f, pix = ((inside | (dist2 <= r**2)) & usable).nonzero(as_tuple=True)
        return set(zip((n * mesh.faces.shape[0] + f).tolist(), (n * 30 * 36 + pix).tolist(), strict=True))

    # Every pair within the radius is found, and nothing beyond the search slack (those contribute nothing).
    must, may = within(radius), within(radius + 2 * coverage.SLACK_PX)
    for chunk in (1 << 21, 64):  # also force many small chunks (PyTorch search)
        monkeypatch.setattr(coverage, "CHUNK", chunk)
        pairs = prepare(mesh.verts, mesh.faces, cam, settings)
        got = list(zip(pairs.view_face.tolist(), pairs.pixel.tolist(), strict=True))
        assert len(got) == len(set(got)) and must <= set(got) <= may
        assert (pairs.runs is not None) == (backend == "native")
    assert len(must) > 2000


# ---------------------------------------------------------------- the fused distance op


def test_fused_signed_distance_matches_plain_ops_in_both_modes():
    from diffrender.raster.distance import signed_distance2
    from diffrender.raster.geometry import Triangles, distance2, face_table, inside

    torch.manual_seed(0)
    xy0 = torch.rand(2, 6, 2, dtype=D) * 10
    z = torch.rand(2, 6, dtype=D) + 1
    faces = torch.tensor([[0, 1, 2], [3, 4, 5], [0, 2, 4]])
    index = torch.randint(0, 6, (40,))
    px, py = torch.rand(40, dtype=D) * 10, torch.rand(40, dtype=D) * 10

    # Functions of the projected vertices (N, V, 2): a corner shared by two edges moves with both.
    def plain(xy):
        tri = Triangles.gather(face_table(xy, z, faces)[0], index)
        dx, dy = px - tri.sx, py - tri.sy
        edge = tri.ex * dy - tri.ey * dx
        return distance2(tri, dx, dy) * torch.where(inside(edge, tri), 2.0, -2.0)

    def fused(xy):
        table = face_table(xy, z, faces)[0]
        tail = table[12:].detach().index_select(1, index)
        return signed_distance2(table[:12], index, px, py, tail[:3], tail[-1:], 2.0)[0]

    assert torch.allclose(fused(xy0), plain(xy0), atol=1e-12)
    assert torch.autograd.gradcheck(fused, (xy0.clone().requires_grad_(),), check_forward_ad=True)
    U = torch.randn(3, *xy0.shape, dtype=D)
    batched = torch.func.vmap(lambda u: torch.func.jvp(fused, (xy0,), (u,))[1])(U)
    assert torch.allclose(batched, torch.stack([torch.func.jvp(plain, (xy0,), (u,))[1] for u in U]), atol=1e-10)
    W = torch.randn(3, 40, dtype=D)
    _, vjp = torch.func.vjp(fused, xy0)
    assert torch.allclose(torch.func.vmap(vjp)(W)[0], torch.stack([torch.func.vjp(plain, xy0)[1](w)[0] for w in W]),
                          atol=1e-10)


def test_blend_is_exact_when_coverage_underflows():
    from diffrender.raster.soft import blend

    # Pixel 0 and 2 only see pairs whose coverage D = sigmoid(x) underflows float32 (x = -95, -200):
    # the normalized blend must still be the (depth-weighted) pair color, with finite derivatives.
    logits = torch.tensor([-95.0, -60.0, -95.0, -200.0], requires_grad=True)
    depth = torch.tensor([3.0, 3.0, 2.0, 3.0], requires_grad=True)
    feat = torch.rand(4, 3, requires_grad=True)
    keep = torch.ones(4, dtype=torch.bool)
    out = blend(feat, logits, keep, depth, torch.tensor([0, 1, 2, 2]), 3, 0.01, 100.0, 1e-4)
    assert torch.allclose(out, feat[:3].detach())  # pixel 2: the nearer pair (depth 2) wins at γ = 1e-4
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(depth.grad).all()
    assert torch.allclose(feat.grad, torch.tensor([[1.0] * 3, [1.0] * 3, [1.0] * 3, [0.0] * 3]))
