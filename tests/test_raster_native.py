"""The compiled kernels (raster/native.py, raster/fused.py) against the PyTorch path, which is their reference:
pairs, values and derivatives in every AD mode the solvers use, and the fallback when they are unavailable."""

import pytest
import torch
from fitutil import script_module

from diffrender.camera import camera_from_look_at
from diffrender.mesh import icosphere, load_obj, normalize
from diffrender.raster import native
from diffrender.raster.coverage import SLACK_PX, use_native
from diffrender.raster.shading import Lights, Material
from diffrender.render import RenderSettings, prepare, render

D = torch.float64
pytestmark = pytest.mark.skipif(not native.available(), reason=f"compiled kernels unavailable: {native.status()}")

LIGHTS = dict(ambient=(0.3, 0.3, 0.3), directional_dirs=[(0.2, -1.0, -0.5)], directional_colors=[(0.7, 0.6, 0.5)],
              point_positions=[(1.0, 2.0, 3.0)], point_colors=[(0.5, 0.4, 0.3)])


def scene(dtype=D, views=((0.4, 1.2, 2.6), (-2.0, 0.8, 1.5)), h=40, w=48):
    mesh = normalize(load_obj("assets/teapot.obj", dtype=dtype))  # open: culling stays off under "auto"
    cam = camera_from_look_at(torch.tensor(views, dtype=dtype), fov_deg=55, height=h, width=w)
    torch.manual_seed(0)
    return mesh, cam, torch.rand_like(mesh.verts), Lights.create(**LIGHTS, dtype=dtype)


def pipeline(backend, mesh, cam, lights, settings=None):
    """f(verts, colors) -> every output flattened, with the pairs of this backend's own search."""
    s = settings or RenderSettings(sigma=1e-3, gamma=1e-2, backend=backend)
    pairs = prepare(mesh.verts, mesh.faces, cam, s)

    def f(v, c):
        out = render(v, mesh.faces, cam, pairs, s, colors=c, lights=lights, material=Material(0.3, 12))
        return torch.cat([out["alpha"].flatten(), out["depth"].flatten(), out["rgb"].flatten()])

    return f, pairs


def test_compiled_search_finds_the_pytorch_pairs():
    mesh, cam, _, _ = scene(h=50, w=60)
    for cull in (False, True):
        s = {b: RenderSettings(sigma=3e-4, cull_backfaces=cull, backend=b) for b in ("torch", "native")}
        got = {b: prepare(mesh.verts, mesh.faces, cam, s[b]) for b in s}
        assert got["native"].runs is not None and got["torch"].runs is None
        sets = {b: set(zip(p.view_face.tolist(), p.pixel.tolist(), strict=True)) for b, p in got.items()}
        assert len(sets["native"]) == len(got["native"])  # no pair twice
        # The two searches may only disagree on pairs within the search slack beyond the radius, where
        # rounding decides and which contribute nothing.
        odd = sets["native"] ^ sets["torch"]
        assert len(odd) <= 1e-3 * len(sets["torch"]) and len(sets["torch"]) > 5000
        assert SLACK_PX < 0.01


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 2e-3)])
def test_compiled_render_equals_pytorch_values_and_derivatives(dtype, rtol):
    mesh, cam, colors, lights = scene(dtype, h=32, w=36)
    (f_t, _), (f_n, pairs) = pipeline("torch", mesh, cam, lights), pipeline("native", mesh, cam, lights)
    assert pairs.runs is not None
    x = (mesh.verts, colors)
    y_t, y_n = f_t(*x), f_n(*x)
    scale = y_t.abs().max()
    assert torch.allclose(y_n, y_t, rtol=0, atol=rtol * scale)
    torch.manual_seed(1)
    u = (torch.randn_like(mesh.verts) * 1e-2, torch.randn_like(colors))
    w = torch.randn_like(y_t)
    j_t, j_n = torch.func.jvp(f_t, x, u)[1], torch.func.jvp(f_n, x, u)[1]
    assert torch.allclose(j_n, j_t, rtol=0, atol=rtol * j_t.abs().max())
    g_t, g_n = torch.func.vjp(f_t, *x)[1](w), torch.func.vjp(f_n, *x)[1](w)
    for a, b in zip(g_n, g_t, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=rtol * b.abs().max())


def test_compiled_render_in_every_ad_mode_the_solvers_use():
    mesh, cam, colors, lights = scene()
    f, _ = pipeline("native", mesh, cam, lights)
    x = (mesh.verts, colors)
    torch.manual_seed(2)
    u = (torch.randn_like(mesh.verts) * 1e-2, torch.randn_like(colors))
    y, ju = torch.func.jvp(f, x, u)
    # central differences (pairs fixed)
    h = 1e-6
    fd = (f(x[0] + h * u[0], x[1] + h * u[1]) - f(x[0] - h * u[0], x[1] - h * u[1])) / (2 * h)
    assert torch.allclose(ju, fd, rtol=1e-5, atol=1e-6 * fd.abs().max())
    # linearize (traced with make_fx: the kernels are opaque custom ops in the graph)
    _, lin = torch.func.linearize(f, *x)
    assert torch.allclose(lin(*u), ju, atol=1e-10 * ju.abs().max())
    # reused VJP, adjoint identity, and the "transpose" JVP: the VJP of the VJP map w -> Jᵀw is u -> J u
    _, vjp = torch.func.vjp(f, *x)
    w = torch.randn_like(y)
    jtw = vjp(w)
    assert torch.allclose((ju * w).sum(), sum((a * b).sum() for a, b in zip(u, jtw, strict=True)), rtol=1e-10)
    _, transpose = torch.func.vjp(vjp, torch.zeros_like(y))
    (ju_t,) = transpose(u)
    assert torch.allclose(ju_t, ju, atol=1e-10 * ju.abs().max())
    # backward agrees with torch.func.vjp
    v, c = (t.clone().requires_grad_() for t in x)
    (f(v, c) * w).sum().backward()
    assert torch.allclose(v.grad, jtw[0], atol=1e-12) and torch.allclose(c.grad, jtw[1], atol=1e-12)


def test_compiled_render_under_vmap_equals_one_product_per_tangent():
    """vmap (a dense Jacobian's columns) over the JVPs the solvers build, the "transpose" (VJP of the VJP) and
    "linearize" maps, and over VJPs: attribute-only batches take the one-sweep rule (distinct non-zero
    channels), others loop; all against the PyTorch path one tangent at a time. (vmap over torch.func.jvp
    itself is not supported: the solvers' dense columns fall back to a loop there.)"""
    mesh, cam, colors, lights = scene(h=24, w=28)
    (f_t, _), (f_n, _) = pipeline("torch", mesh, cam, lights), pipeline("native", mesh, cam, lights)
    x = (mesh.verts, colors)
    torch.manual_seed(3)
    one_hot = torch.zeros(4, *colors.shape, dtype=D)
    one_hot[0, 5, 1] = one_hot[1, 5, 1] = one_hot[2, 7, 0] = 1.0  # a repeated column, and an all-zero one
    by_colors = [(torch.zeros_like(x[0]), u) for u in torch.cat([one_hot, torch.randn(2, *colors.shape, dtype=D)])]
    by_verts = [(u, torch.zeros_like(x[1])) for u in torch.randn(3, *mesh.verts.shape, dtype=D) * 1e-2]
    y, vjp_n = torch.func.vjp(f_n, *x)
    _, transpose = torch.func.vjp(vjp_n, torch.zeros_like(y))
    _, linearized = torch.func.linearize(f_n, *x)
    for batch in (by_colors, by_verts):
        want = torch.stack([torch.func.jvp(f_t, x, u)[1] for u in batch])
        atol = 1e-10 * want.abs().max()
        if batch is by_colors:  # the zero vertex tangent unbatched, as a dense Jacobian's colour columns have it
            u = torch.stack([c for _, c in batch])
            got_t = torch.func.vmap(lambda c: transpose((x[0] * 0, c))[0])(u)
            got_l = torch.func.vmap(lambda c: linearized(x[0] * 0, c))(u)
        else:
            u = torch.stack([v for v, _ in batch])
            got_t = torch.func.vmap(lambda v: transpose((v, x[1] * 0))[0])(u)
            got_l = torch.func.vmap(lambda v: linearized(v, x[1] * 0))(u)
        assert torch.allclose(got_t, want, rtol=0, atol=atol) and torch.allclose(got_l, want, rtol=0, atol=atol)
    # a silhouette-only sweep takes a batch that moves the geometry in one sweep (the pairs' geometry shared)
    sil = {b: RenderSettings(sigma=1e-3, backend=b) for b in ("torch", "native")}
    pairs = {b: prepare(mesh.verts, mesh.faces, cam, sil[b]) for b in sil}

    def alpha(b):
        return lambda v: render(v, mesh.faces, cam, pairs[b], sil[b], outputs=("alpha",))["alpha"].flatten()

    dv = torch.stack([v for v, _ in by_verts])
    want = torch.stack([torch.func.jvp(alpha("torch"), (x[0],), (v,))[1] for v in dv])
    a0, a_vjp = torch.func.vjp(alpha("native"), x[0])
    _, a_transpose = torch.func.vjp(a_vjp, torch.zeros_like(a0))
    got = torch.func.vmap(lambda v: a_transpose((v,))[0])(dv)
    assert want.abs().max() > 0 and torch.allclose(got, want, rtol=0, atol=1e-10 * want.abs().max())
    w = torch.randn(3, y.numel(), dtype=D)
    _, vjp_t = torch.func.vjp(f_t, *x)
    got = torch.func.vmap(vjp_n)(w)
    want = [torch.stack(t) for t in zip(*[vjp_t(wi) for wi in w], strict=True)]
    for a, b in zip(got, want, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10 * b.abs().max())


@pytest.mark.parametrize("cull,threads", [(False, 1), (True, 2)])
def test_kept_linear_map_equals_the_pytorch_path(monkeypatch, cull, threads):
    """A silhouette sweep's J kept as per-pair coefficients (built at the first product at a point, used by
    every later one): VJPs, the "transpose" JVPs built from them and vmapped VJPs equal the PyTorch path's
    products, with faces skipped under culling and the work split over threads; the adjoint identity holds
    to rounding; and with the maps off nothing is kept."""
    monkeypatch.setattr(native, "MIN_PARALLEL", 1)  # split even this small sweep over the threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    mesh = icosphere(2, dtype=D)
    cam = camera_from_look_at(torch.tensor([(0.4, 1.2, 2.6), (-2.0, 0.8, 1.5)], dtype=D), fov_deg=55, height=30,
                              width=34)
    s = {b: RenderSettings(sigma=1e-3, cull_backfaces=cull, backend=b) for b in ("torch", "native")}
    torch.manual_seed(4)
    v0 = mesh.verts * 0.9
    pairs = {b: prepare(v0, mesh.faces, cam, s[b]) for b in s}
    v = v0 + 0.02 * torch.randn_like(v0)  # off the point of the pair search: under culling, rows are skipped

    def alpha(b):
        return lambda x: render(x, mesh.faces, cam, pairs[b], s[b], outputs=("alpha",))["alpha"].flatten()

    y, vjp_t = torch.func.vjp(alpha("torch"), v)
    u, w = torch.randn(3, *v.shape, dtype=D), torch.randn(3, y.numel(), dtype=D)
    want_j = torch.stack([torch.func.jvp(alpha("torch"), (v,), (ui,))[1] for ui in u])
    want_g = torch.stack([vjp_t(wi)[0] for wi in w])
    native.clear_linear_cache()
    try:
        _, vjp_n = torch.func.vjp(alpha("native"), v)
        got_g = torch.stack([vjp_n(wi)[0] for wi in w])  # the first builds the coefficients, the others use them
        assert len(native._linear.entries) == 1
        _, transpose = torch.func.vjp(vjp_n, torch.zeros_like(y))
        got_j = torch.stack([transpose((ui,))[0] for ui in u])
        got_vmapped = torch.func.vmap(vjp_n)(w)[0]
        assert len(native._linear.entries) == 1  # one point, one entry
        for got, want in ((got_g, want_g), (got_j, want_j), (got_vmapped, want_g)):
            assert want.abs().max() > 0 and torch.allclose(got, want, rtol=0, atol=1e-10 * want.abs().max())
        lhs, rhs = (got_j * w).sum(), (u * got_g).sum()
        assert abs(lhs - rhs) <= 1e-12 * abs(lhs)
        native.keep_linear_maps(False)
        _, vjp_off = torch.func.vjp(alpha("native"), v)
        assert torch.allclose(vjp_off(w[0])[0], want_g[0], rtol=0, atol=1e-10 * want_g[0].abs().max())
        assert not native._linear.entries
    finally:
        native.keep_linear_maps(True)


def test_compiled_gradcheck_tiny_scene():
    torch.manual_seed(0)
    mesh = icosphere(0, dtype=D)
    verts = mesh.verts + 0.05 * torch.randn_like(mesh.verts)
    cam = camera_from_look_at(torch.tensor([[0.3, 0.4, 3.0], [2.5, 0.5, 1.0]], dtype=D), fov_deg=50, height=12,
                              width=10)
    s = RenderSettings(sigma=3e-3, gamma=1e-2, cull_backfaces=False, backend="native")
    pairs = prepare(verts, mesh.faces, cam, s)
    lights = Lights.create(**LIGHTS, dtype=D)

    def f(v, colors):
        out = render(v, mesh.faces, cam, pairs, s, colors=colors, lights=lights, material=Material(0.3, 8.0))
        return out["alpha"], out["depth"], out["rgb"]

    args = (verts.clone().requires_grad_(), torch.rand(12, 3, dtype=D).requires_grad_())
    assert torch.autograd.gradcheck(f, args, check_forward_ad=True, fast_mode=True)


def test_fallback_when_the_kernels_are_unavailable(monkeypatch):
    mesh, cam, colors, lights = scene(h=20, w=24)
    ref = render(mesh.verts, mesh.faces, cam, prepare(mesh.verts, mesh.faces, cam, RenderSettings(backend="torch")),
                 RenderSettings(backend="torch"), colors=colors)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", "disabled for this test")
    assert not native.available() and "disabled for this test" in native.status()
    s = RenderSettings()  # backend "auto": falls back to PyTorch
    pairs = prepare(mesh.verts, mesh.faces, cam, s)
    assert pairs.runs is None
    out = render(mesh.verts, mesh.faces, cam, pairs, s, colors=colors)
    assert all(torch.allclose(out[k], ref[k]) for k in ref)
    with pytest.raises(RuntimeError, match="backend='native' asked for, but .*disabled for this test"):
        prepare(mesh.verts, mesh.faces, cam, RenderSettings(backend="native"))


def test_native_backend_needs_compiled_pairs_and_cpu_float_tensors():
    mesh, cam, colors, _ = scene(h=12, w=12)
    pairs = prepare(mesh.verts, mesh.faces, cam, RenderSettings(backend="torch"))
    with pytest.raises(ValueError, match="needs pairs from the compiled search"):
        render(mesh.verts, mesh.faces, cam, pairs, RenderSettings(backend="native"))
    with pytest.raises(ValueError, match="RenderSettings.backend"):
        RenderSettings(backend="cuda")
    half = mesh.verts.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="the kernels take float32 or float64, not torch.bfloat16"):
        use_native(half, "native")
    assert not use_native(half, "auto") and use_native(mesh.verts, "auto")


def test_check_cuda_script_on_the_cpu_torch_path(monkeypatch, capsys):
    """scripts/check_cuda.py (the GPU check) run on the CPU: its PyTorch-path renders and derivatives agree
    with the compiled kernels', so a BAD line on a GPU is the device's, not the script's; and without CUDA it
    refuses with one line and exit code 2."""
    mod = script_module("check_cuda")
    lines = mod.check("cpu", size=24)
    assert len(lines) == 18 and all(line.startswith("ok ") for line in lines), lines
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert mod.main(["--device", "cuda"]) == 2
    assert capsys.readouterr().err.strip() == "error: --device cuda asked for, but CUDA is not available"
