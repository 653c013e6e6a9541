"""PairCache: reused pairs render exactly what a fresh search with the same margin renders, and are searched
again once a vertex moved past the margin or a face changed facing under culling."""

import pytest
import torch

from diffrender.camera import Camera, camera_from_look_at
from diffrender.mesh import icosphere
from diffrender.raster import native
from diffrender.raster.shading import Lights, Material
from diffrender.render import PairCache, RenderSettings, prepare, render

D = torch.float64
BACKENDS = ["torch", "native"] if native.available() else ["torch"]


def outputs(verts, faces, cam, pairs, settings, colors):
    lights = Lights.create(ambient=(0.3,) * 3, directional_dirs=[(0.2, -1.0, -0.5)], directional_colors=[(0.7,) * 3],
                           dtype=D)

    def f(v, c):
        out = render(v, faces, cam, pairs, settings, colors=c, lights=lights, material=Material(0.3, 8))
        return torch.cat([o.flatten() for o in out.values()])

    return f


def screen_shift(cam, a, b):
    """Largest on-screen displacement (px) of any vertex between a and b."""
    return float((cam.project(a)[0] - cam.project(b)[0]).norm(dim=-1).max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_reused_pairs_render_exactly_what_a_fresh_search_does(backend):
    torch.manual_seed(0)
    mesh = icosphere(2, dtype=D)
    cam = camera_from_look_at(torch.tensor([[0.3, 0.5, 3.0], [-2.2, 0.4, 1.5]], dtype=D), fov_deg=45, height=24,
                              width=28)
    settings = RenderSettings(sigma=3e-4, gamma=1e-2, backend=backend)
    cache = PairCache(mesh.faces, settings, margin_px=1.0)
    colors = torch.rand_like(mesh.verts)
    v0 = mesh.verts
    first = cache.get(v0, cam)
    step = 0.004 * torch.randn_like(v0)  # a small step: every vertex moves less than the margin on screen
    v1 = v0 + step
    assert 0.1 < screen_shift(cam, v0, v1) < 1.0
    reused = cache.get(v1, cam)
    assert reused is first and (cache.searches, cache.reuses) == (1, 1)
    fresh = prepare(v1, mesh.faces, cam, RenderSettings(sigma=3e-4, gamma=1e-2, margin_px=1.0, backend=backend))
    assert len(fresh) != len(reused)  # different lists (their extra pairs beyond the cutoff contribute nothing) ...
    f_reused = outputs(v1, mesh.faces, cam, reused, settings, colors)
    f_fresh = outputs(v1, mesh.faces, cam, fresh, settings, colors)
    no_margin = outputs(v1, mesh.faces, cam, prepare(v1, mesh.faces, cam, settings), settings, colors)
    x = (v1, colors)
    y = f_fresh(*x)
    assert y.abs().sum() > 50
    # ... but the same images and derivatives, also as with no margin at all (the cutoff is the renderer's)
    for g in (f_reused, no_margin):
        assert torch.allclose(g(*x), y, rtol=0, atol=1e-12)
    u = (torch.randn_like(v1), torch.randn_like(colors))
    w = torch.randn_like(y)
    ju = torch.func.jvp(f_fresh, x, u)[1]
    jtw = torch.func.vjp(f_fresh, *x)[1](w)
    assert torch.allclose(torch.func.jvp(f_reused, x, u)[1], ju, rtol=0, atol=1e-10 * ju.abs().max())
    for a, b in zip(torch.func.vjp(f_reused, *x)[1](w), jtw, strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-10 * b.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_searches_again_past_the_margin(backend):
    mesh = icosphere(2, dtype=D)
    cam = camera_from_look_at(torch.tensor([[0.3, 0.5, 3.0]], dtype=D), fov_deg=45, height=32, width=32)
    cache = PairCache(mesh.faces, RenderSettings(sigma=3e-4, backend=backend), margin_px=0.5)
    v0 = mesh.verts
    cache.get(v0, cam)
    v1 = v0.clone()
    v1[5] += torch.tensor([0.05, 0.0, 0.0], dtype=D)  # one vertex, about 1.3 px on screen
    assert screen_shift(cam, v0, v1) > 0.5
    pairs = cache.get(v1, cam)
    assert (cache.searches, cache.reuses) == (2, 0)
    # the new search, like a fresh one with the same margin (back faces included: render culls them)
    fresh = prepare(v1, mesh.faces, cam, RenderSettings(sigma=3e-4, margin_px=0.5, cull_backfaces=False,
                                                        backend=backend))
    assert set(zip(pairs.view_face.tolist(), pairs.pixel.tolist(), strict=True)) == set(
        zip(fresh.view_face.tolist(), fresh.pixel.tolist(), strict=True))
    cache.get(v1, cam)  # unchanged geometry: reused
    cam2 = Camera(cam.R, cam.t + torch.tensor([[0.05, 0.0, 0.0]], dtype=D), cam.focal, cam.principal, 32, 32)
    cache.get(v1, cam2)  # a camera move is a screen move of every vertex
    assert (cache.searches, cache.reuses) == (3, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_faces_turning_away_need_no_new_search(backend):
    # One thin triangle seen from the front: its apex crosses the base line by a fraction of a pixel, so
    # it turns its back to the camera. The cached list holds back faces too; render culls them.
    verts = torch.tensor([[-1.0, -0.2, 3.0], [1.0, -0.2, 3.0], [0.0, -0.19, 3.0]], dtype=D)
    faces = torch.tensor([[0, 2, 1]])
    cam = Camera(torch.eye(3, dtype=D)[None], torch.zeros(1, 3, dtype=D), torch.full((1, 2), 20.0, dtype=D),
                 torch.tensor([[16.0, 16.0]], dtype=D), 32, 32)
    flipped = verts.clone()
    flipped[2, 1] = -0.21
    assert screen_shift(cam, verts, flipped) < 0.2
    for cull in (True, False):
        settings = RenderSettings(sigma=1e-3, cull_backfaces=cull, backend=backend)
        cache = PairCache(faces, settings, margin_px=1.0)
        for v in (verts, flipped, verts):
            pairs = cache.get(v, cam)
            fresh = prepare(v, faces, cam, settings)
            a = render(v, faces, cam, pairs, settings, outputs=("alpha",))["alpha"]
            b = render(v, faces, cam, fresh, settings, outputs=("alpha",))["alpha"]
            assert torch.allclose(a, b, rtol=0, atol=1e-12)
            assert (a.sum() > 1) == (not cull or v is verts)  # culled once it turned away
        assert (cache.searches, cache.reuses) == (1, 2)


def test_bad_margin():
    with pytest.raises(ValueError, match="margin_px"):
        PairCache(icosphere(0).faces, RenderSettings(), margin_px=-1.0)
    with pytest.raises(ValueError, match="margin_px"):
        RenderSettings(margin_px=-0.5)
