"""Automatic back-face culling: on exactly for closed, consistently and outward wound meshes seen from outside."""

import pytest
import torch

from diffrender.camera import camera_from_look_at
from diffrender.config import RendererConfig
from diffrender.mesh import icosphere, is_closed_and_consistently_wound, load_obj
from diffrender.raster.culling import should_cull, winding_number
from diffrender.render import RenderSettings, prepare
from diffrender.scenes.base import BuildContext, render_settings

D = torch.float64


def test_closed_and_consistently_wound():
    faces = icosphere(1).faces
    assert is_closed_and_consistently_wound(faces)
    assert not is_closed_and_consistently_wound(faces[1:])  # a hole
    flipped = faces.clone()
    flipped[3] = flipped[3].flip(0)
    assert not is_closed_and_consistently_wound(flipped)  # one face wound the other way
    assert not is_closed_and_consistently_wound(torch.cat([faces, faces[:1]]))  # a face twice
    assert not is_closed_and_consistently_wound(torch.cat([faces, torch.tensor([[0, 0, 1]])]))  # degenerate
    assert is_closed_and_consistently_wound(load_obj("assets/spot.obj").faces)
    assert not is_closed_and_consistently_wound(load_obj("assets/teapot.obj").faces)  # open lid and spout


def test_winding_number_inside_and_outside():
    ico = icosphere(3, dtype=D)
    w = winding_number(ico.verts, ico.faces, torch.tensor([[0.0, 0.1, 0.2], [0.0, 0.0, 3.0]], dtype=D))
    assert torch.allclose(w, torch.tensor([1.0, 0.0], dtype=D), atol=1e-6)


def test_auto_culls_only_when_it_cannot_show():
    ico = icosphere(2, dtype=D)
    outside = camera_from_look_at(torch.tensor([[0.3, 0.5, 3.0]], dtype=D), height=8, width=8)
    inside = camera_from_look_at(torch.tensor([[0.0, 0.1, 0.2]], dtype=D), at=(0.0, 0.0, 1.0), height=8, width=8)
    assert should_cull("auto", ico.verts, ico.faces, outside)
    assert not should_cull("auto", ico.verts, ico.faces[1:], outside)  # open
    flipped = ico.faces.clone()
    flipped[0] = flipped[0].flip(0)
    assert not should_cull("auto", ico.verts, flipped, outside)  # inconsistently wound
    assert not should_cull("auto", ico.verts, ico.faces.flip(1), outside)  # consistent but inside out
    assert not should_cull("auto", ico.verts, ico.faces, inside)  # the camera is inside
    assert should_cull(True, ico.verts, ico.faces[1:], outside)
    assert not should_cull(False, ico.verts, ico.faces, outside)
    with pytest.raises(ValueError, match="cull_backfaces"):
        should_cull("sometimes", ico.verts, ico.faces, outside)
    with pytest.raises(ValueError, match="cull_backfaces"):
        RenderSettings(cull_backfaces="sometimes")


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_auto_pairs_equal_the_explicit_choice(backend):
    from diffrender.raster import native
    if backend == "native" and not native.available():
        pytest.skip(native.status())
    ico = icosphere(2, dtype=D)
    cam = camera_from_look_at(torch.tensor([[0.3, 0.5, 3.0]], dtype=D), height=24, width=24)
    count = {c: len(prepare(ico.verts, ico.faces, cam, RenderSettings(cull_backfaces=c, backend=backend)))
             for c in (True, False, "auto")}
    assert count["auto"] == count[True] < count[False]
    open_auto = len(prepare(ico.verts, ico.faces[1:], cam, RenderSettings(backend=backend)))
    assert open_auto == len(prepare(ico.verts, ico.faces[1:], cam, RenderSettings(cull_backfaces=False,
                                                                                   backend=backend)))


def test_app_default_is_auto_where_nothing_moves():
    assert RendererConfig().cull_backfaces is None
    assert RenderSettings().cull_backfaces == "auto"
    for renderer in ({"cull_backfaces": None}, {}):
        ctx = BuildContext(renderer=renderer)
        assert render_settings(1e-4, 1e-4, ctx, fixed_geometry=True).cull_backfaces == "auto"
        assert render_settings(1e-4, 1e-4, ctx).cull_backfaces is False  # the fit moves mesh or cameras
    for cull in (True, False):
        ctx = BuildContext(renderer={"cull_backfaces": cull})
        assert render_settings(1e-4, 1e-4, ctx).cull_backfaces is cull
        assert render_settings(1e-4, 1e-4, ctx, fixed_geometry=True).cull_backfaces is cull
