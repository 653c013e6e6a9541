"""Scene tensors -> images: soft silhouette, depth and shaded color, batched over views.

Rendering is split in two so that a solver can linearize it once and apply many products:

* ``prepare(verts, faces, camera, settings)`` finds the (face, pixel) pairs: integer work without
  gradients that depends on the current geometry (call it again whenever vertices or cameras move,
  or let a ``PairCache`` decide when a list built with a margin can be reused);
* ``render(verts, faces, camera, pairs, settings, ...)`` is smooth given the pairs, so
  ``torch.func.jvp``, ``torch.func.linearize``, ``torch.func.vjp`` and ``.backward()`` all work.

A pair contributes only while its pixel lies inside its face or within the cutoff radius: ``render``
tests that itself, so any pair list that contains all such pairs (a superset) gives the same images.
On CPU, the compiled kernels (raster/native.py, raster/fused.py) do the search and the whole
per-pixel sweep; elsewhere, or with ``backend="torch"``, the PyTorch path (raster/soft.py) does, and
it is the reference the kernels are tested against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .camera import Camera
from .mesh import Mesh, vertex_normals
from .raster import fused
from .raster.coverage import Pairs, find_pairs, front_facing, searched_faces, use_native
from .raster.culling import should_cull
from .raster.geometry import Triangles, barycentrics, edge_functions, face_table
from .raster.shading import Lights, Material, shade
from .raster.soft import blend, coverage_logits, perspective_barycentrics, silhouette
from .raster.texture import sample_bilinear

OUTPUTS = ("alpha", "depth", "rgb")


@dataclass
class RenderSettings:
    """Soft rasterizer options; σ, γ and ε have their SoftRas / PyTorch3D meaning and defaults.

    sigma: sharpness of the coverage sigmoid (NDC² units); gamma: depth softmax temperature;
    eps: coverage below which a pair is ignored (sets the cutoff radius: beyond it a pair contributes
    exactly nothing); margin_px: extra search radius, so that a pair list stays complete while no
    vertex moves farther than it on screen (see ``PairCache``); background: RGB behind the mesh;
    cull_backfaces: ignore faces wound clockwise on screen: True, False, or "auto" (cull exactly when
    that cannot change the hard silhouette: a closed, consistently and outward wound mesh seen from
    outside; raster/culling.py); backend: "auto" (compiled kernels for CPU tensors when a C compiler
    is available), "native" (require them) or "torch" (the PyTorch path).
    """

    sigma: float = 1e-4
    gamma: float = 1e-4
    eps: float = 1e-4
    margin_px: float = 0.0
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cull_backfaces: bool | str = "auto"
    backend: str = "auto"

    def __post_init__(self) -> None:
        for name in ("sigma", "gamma", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RenderSettings.{name} must be positive, got {getattr(self, name)}")
        if not self.eps < 0.5:
            raise ValueError(f"RenderSettings.eps must be < 0.5, got {self.eps}")
        if len(self.background) != 3:
            raise ValueError(f"RenderSettings.background must be RGB, got {self.background}")
        if not self.margin_px >= 0:
            raise ValueError(f"RenderSettings.margin_px must be >= 0, got {self.margin_px}")
        if self.cull_backfaces not in (True, False, "auto"):
            raise ValueError(f"RenderSettings.cull_backfaces must be True, False or 'auto', "
                             f"got {self.cull_backfaces!r}")
        if self.backend not in ("auto", "native", "torch"):
            raise ValueError(f"RenderSettings.backend must be 'auto', 'native' or 'torch', got {self.backend!r}")

    def ndc_per_px(self, height: int, width: int) -> float:
        return 2.0 / min(height, width)

    def cutoff_px(self, height: int, width: int) -> float:
        """Cutoff radius in pixels: D < eps  <=>  d² > σ ln(1/eps - 1)."""
        return math.sqrt(self.sigma * math.log(1 / self.eps - 1)) / self.ndc_per_px(height, width)

    def radius_px(self, height: int, width: int) -> float:
        """Search radius in pixels: the cutoff plus the margin."""
        return self.cutoff_px(height, width) + self.margin_px


def _check_geometry(verts: Tensor, faces: Tensor) -> None:
    if verts.dim() != 2 or verts.shape[-1] != 3 or verts.shape[0] == 0:
        raise ValueError(f"verts: expected shape (V, 3) with V > 0, got {tuple(verts.shape)}")
    if not torch.is_floating_point(verts):
        raise ValueError(f"verts: expected a floating dtype, got {verts.dtype}")
    if faces.dim() != 2 or faces.shape[-1] != 3 or faces.shape[0] == 0:
        raise ValueError(f"faces: expected shape (F, 3) with F > 0, got {tuple(faces.shape)}")
    if faces.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"faces: expected an integer dtype, got {faces.dtype}")


def _check_values(verts: Tensor, faces: Tensor) -> None:
    if not torch.isfinite(verts).all():
        raise ValueError("verts: contains NaN or inf")
    lo, hi = int(faces.min()), int(faces.max())
    if lo < 0 or hi >= verts.shape[0]:
        bad = lo if lo < 0 else hi
        raise ValueError(f"faces: index {bad} out of range for {verts.shape[0]} vertices")


@torch.no_grad()
def prepare(verts: Tensor, faces: Tensor, camera: Camera, settings: RenderSettings) -> Pairs:
    """The (face, pixel) pairs for the current geometry; no gradients flow through this.

    verts: (V, 3) world positions; faces: (F, 3). Raises ValueError on bad shapes, non-finite
    vertices or out-of-range face indices.
    """
    _check_geometry(verts, faces)
    verts = verts.detach()
    _check_values(verts, faces)
    xy, z = camera.project(verts)
    cull = should_cull(settings.cull_backfaces, verts, faces, camera)
    return find_pairs(xy, z, faces.long(), camera.height, camera.width,
                      settings.radius_px(camera.height, camera.width), camera.near, cull, settings.backend)


class PairCache:
    """Reuses one pair list across nearby geometry: solver trial points, small optimizer steps.

    ``get(verts, camera)`` returns the pairs of a search with ``margin_px`` added to the settings' own
    margin. A distance to a triangle changes by at most the largest displacement of its vertices, so
    the list stays complete while every vertex of every face that can have pairs moved less than
    ``margin_px`` on screen since the search, and while that set of faces (in front of the near plane,
    non-degenerate) is unchanged. Back faces are searched too and culled by ``render`` at the geometry
    it renders, so faces turning along the contour (every small step of a deforming mesh turns some)
    need no new search; ``render`` also drops the pairs beyond the cutoff, so the images and
    derivatives are exactly those of a fresh search with the same margin. Otherwise it searches again.
    ``searches`` and ``reuses`` count what happened. faces: (F, 3).
    """

    def __init__(self, faces: Tensor, settings: RenderSettings, margin_px: float = 1.0) -> None:
        if not margin_px >= 0:
            raise ValueError(f"PairCache: margin_px must be >= 0, got {margin_px}")
        self.faces = faces
        self.settings = replace(settings, margin_px=settings.margin_px + margin_px)
        self.margin_px = margin_px
        self.searches = 0
        self.reuses = 0
        self._pairs: Pairs | None = None
        self._xy: Tensor | None = None
        self._valid: Tensor | None = None
        self._used: Tensor | None = None
        self._key: tuple | None = None

    @torch.no_grad()
    def get(self, verts: Tensor, camera: Camera) -> Pairs:
        """Pairs for ``verts`` (V, 3) seen by ``camera``: the cached list when still complete, else a new search."""
        _check_geometry(verts, self.faces)
        verts = verts.detach()
        faces = self.faces.long()
        xy, z = camera.project(verts)
        cull = should_cull(self.settings.cull_backfaces, verts, self.faces, camera)
        valid = searched_faces(xy, z, faces, camera.near, self.settings.backend)  # what the search keeps
        # the search never culls (render does, at the geometry it renders), so culling is not part of the key
        key = (camera.num_views, camera.height, camera.width, camera.near, verts.shape[0], verts.dtype)
        if self._pairs is not None and key == self._key and torch.equal(valid, self._valid):
            moved = (xy - self._xy).norm(dim=-1)  # (N, V) on-screen move of every vertex since the search
            if not bool((moved[self._used] > self.margin_px).any()):
                self.reuses += 1
                self._pairs.cull = cull
                return self._pairs
        _check_values(verts, self.faces)
        self._pairs = find_pairs(xy, z, faces, camera.height, camera.width,
                                 self.settings.radius_px(camera.height, camera.width), camera.near, False,
                                 self.settings.backend)
        self._pairs.cull = cull
        # the vertices that matter: those of faces that can have pairs, per view (N, V)
        vf = valid.nonzero().squeeze(1)
        view, face = torch.div(vf, faces.shape[0], rounding_mode="floor"), vf % faces.shape[0]
        self._used = torch.zeros(camera.num_views, verts.shape[0], dtype=torch.bool, device=verts.device)
        self._used[view.repeat_interleave(3), faces.index_select(0, face).reshape(-1)] = True
        self._xy, self._valid, self._key = xy, valid, key
        self.searches += 1
        return self._pairs


def _interpolate(values: Tensor, faces: Tensor, face_index: Tensor, weights: Tensor) -> Tensor:
    """Σ_k weights[k] values[faces[face_index, k]]: (P, C) from per-vertex values (V, C).

    values: (V, C); faces: (F, 3) indices into values; face_index: (P,); weights: (3, P). The corners
    are first laid out per face, (F, 3C), so each pair gathers one wide row: a wide gather and its
    backward scatter cost far less than three narrow ones. The sum is written as three products
    because a reduction over a size-3 axis is slow on CPU.
    """
    per_face = values[faces].reshape(faces.shape[0], -1)
    g = per_face.index_select(0, face_index).view(face_index.shape[0], 3, values.shape[-1]).unbind(1)
    w = weights.unsqueeze(-1)
    return g[0] * w[0] + g[1] * w[1] + g[2] * w[2]


def render(verts: Tensor, faces: Tensor, camera: Camera, pairs: Pairs, settings: RenderSettings, *,
           colors: Tensor | None = None, uvs: Tensor | None = None, uv_faces: Tensor | None = None,
           texture: Tensor | None = None, lights: Lights | None = None,
           material: Material | None = None, outputs: tuple[str, ...] | None = None) -> dict[str, Tensor]:
    """Render soft images of a mesh from N views, given pairs from ``prepare``.

    verts: (V, 3); faces: (F, 3); colors: (V, 3) per-vertex albedo, or uvs (T, 2) + uv_faces (F, 3) +
    texture (Ht, Wt, C) for a UV-mapped albedo; lights: shading (unlit albedo when None).
    Returns "alpha" (N, H, W) soft silhouette, "depth" (N, H, W) blended camera depth (0 where no
    face is near), and "rgb" (N, H, W, 3) color composited over the background with α. Shading is
    deferred: albedo and normal are blended per pixel with the SoftRas weights, then lit once per pixel
    at the point of the pixel's ray at the blended depth (cheaper than lighting every pair; identical
    wherever one face dominates a pixel).
    ``outputs`` picks a subset (default: all that the inputs allow); asking only for "alpha" skips
    depth and shading work.
    """
    _check_geometry(verts, faces)
    n, h, w = camera.num_views, camera.height, camera.width
    if (pairs.num_views, pairs.height, pairs.width) != (n, h, w):
        raise ValueError(f"pairs were computed for {pairs.num_views} views of {pairs.height}x{pairs.width}, "
                         f"camera has {n} views of {h}x{w}: call prepare() again")
    has_albedo = colors is not None or texture is not None
    if outputs is None:
        outputs = ("alpha", "depth", "rgb") if has_albedo else ("alpha", "depth")
    unknown = set(outputs) - set(OUTPUTS)
    if unknown:
        raise ValueError(f"outputs: unknown {sorted(unknown)}, choose from {OUTPUTS}")
    if "rgb" in outputs and not has_albedo:
        raise ValueError("outputs: 'rgb' needs colors (V, 3) or uvs + uv_faces + texture")
    if colors is not None and tuple(colors.shape) != (verts.shape[0], 3):
        raise ValueError(f"colors: expected shape ({verts.shape[0]}, 3), got {tuple(colors.shape)}")
    if texture is not None and (uvs is None or uv_faces is None):
        raise ValueError("texture needs uvs (T, 2) and uv_faces (F, 3)")

    xy, z = camera.project(verts)
    shaded = "depth" in outputs or "rgb" in outputs
    faces = faces.long()
    lit = lights is not None
    if settings.backend == "native" and pairs.runs is None:
        raise ValueError("backend='native' needs pairs from the compiled search (prepare with backend 'native' or "
                         "'auto' on the CPU)")
    if pairs.runs is not None and texture is None and use_native(xy, settings.backend):
        alpha, blended = _sweep_native(xy, z, verts, faces, camera, pairs, settings, colors if "rgb" in outputs
                                       else None, lit, shaded)
    else:
        alpha, blended = _sweep_torch(xy, z, verts, faces, camera, pairs, settings, outputs, colors, uvs, uv_faces,
                                      texture, lit, shaded)
    result: dict[str, Tensor] = {}
    if "alpha" in outputs:
        result["alpha"] = alpha.reshape(n, h, w)
    if "depth" in outputs:
        result["depth"] = blended[:, 0].reshape(n, h, w)
    if "rgb" in outputs:
        # Only pixels with pairs are shaded and composited; the others show the background (α = 0).
        cov = pairs.covered
        b = blended.index_select(0, cov)
        color = b[:, 1:4]
        if lit:
            # Deferred shading: albedo and normal are blended per pixel and lit once per pixel, at the
            # point on the pixel's ray at the blended depth (cheaper than interpolating positions).
            view = torch.div(cov, h * w, rounding_mode="floor")
            points = camera.backproject_pixels(cov, b[:, 0])
            color = shade(color, points, b[:, 4:7], camera.centers.index_select(0, view), lights,
                          material or Material())
        bg = torch.as_tensor(settings.background, dtype=blended.dtype, device=blended.device)
        a = alpha.index_select(0, cov).unsqueeze(-1)
        rgb = torch.zeros(n * h * w, 3, dtype=blended.dtype, device=blended.device).index_add(0, cov, a * (color - bg))
        result["rgb"] = (rgb + bg).reshape(n, h, w, 3)
    return result


def _sweep_native(xy: Tensor, z: Tensor, verts: Tensor, faces: Tensor, camera: Camera, pairs: Pairs,
                  settings: RenderSettings, colors: Tensor | None, lit: bool, shaded: bool) -> tuple[Tensor, Tensor]:
    """α (N*H*W,) and blended [depth, albedo, normal] (N*H*W, 1 + C) with the compiled sweep (raster/fused.py)."""
    h, w = camera.height, camera.width
    if colors is not None:
        attrs = torch.cat([colors, vertex_normals(verts, faces)], -1) if lit else colors
    else:
        attrs = xy.new_zeros(verts.shape[0], 0)
    spec = fused.SweepSpec(faces.contiguous(), pairs.runs, pairs.band_off, pairs.band_pairs,
                           (camera.num_views * h * w, faces.shape[0], h, w, int(shaded), pairs.band_rows,
                            int(pairs.cull)),
                           (settings.ndc_per_px(h, w) ** 2 / settings.sigma, settings.cutoff_px(h, w) ** 2,
                            1 / ((camera.far - camera.near) * settings.gamma)))
    return fused.sweep(xy, z, attrs.to(xy.dtype), spec)


def _sweep_torch(xy: Tensor, z: Tensor, verts: Tensor, faces: Tensor, camera: Camera, pairs: Pairs,
                 settings: RenderSettings, outputs: tuple[str, ...], colors: Tensor | None, uvs: Tensor | None,
                 uv_faces: Tensor | None, texture: Tensor | None, lit: bool,
                 shaded: bool) -> tuple[Tensor, Tensor | None]:
    """The same as ``_sweep_native`` with PyTorch ops over the pair list (any device; textures)."""
    h, w = camera.height, camera.width
    num_pixels = camera.num_views * h * w
    table, area2 = face_table(xy, z, faces)
    px, py = pairs.centers(table.dtype)
    logits, keep = coverage_logits(table, pairs.view_face, px, py, settings.ndc_per_px(h, w), settings.sigma,
                                   settings.cutoff_px(h, w) ** 2)
    if pairs.cull:  # faces that turned away since the pairs were found contribute nothing
        keep = keep & front_facing(area2.detach()).index_select(0, pairs.view_face)
    alpha = silhouette(logits, keep, pairs.pixel, num_pixels)
    if not shaded:
        return alpha, None
    rows = Triangles.gather(table, pairs.view_face)
    bary = barycentrics(edge_functions(rows, px, py)[0], rows)
    bary_pc, depth = perspective_barycentrics(bary, rows.z)
    features = [depth.unsqueeze(-1)]
    if "rgb" in outputs:
        features.append(_surface_attributes(verts, faces, pairs, bary_pc, colors, uvs, uv_faces, texture, lit))
    return alpha, blend(torch.cat(features, -1), logits, keep, depth, pairs.pixel, num_pixels, camera.near,
                        camera.far, settings.gamma)


def _surface_attributes(verts: Tensor, faces: Tensor, pairs: Pairs, bary_pc: Tensor, colors: Tensor | None,
                        uvs: Tensor | None, uv_faces: Tensor | None, texture: Tensor | None,
                        lit: bool) -> Tensor:
    """Per-pair albedo (P, 3), followed by the interpolated vertex normal (P, 3) when the scene is lit."""
    faces = faces.long()
    normals = [vertex_normals(verts, faces)] if lit else []
    if texture is None:
        return _interpolate(torch.cat([colors, *normals], -1), faces, pairs.face, bary_pc)
    albedo = sample_bilinear(texture, _interpolate(uvs, uv_faces.long(), pairs.face, bary_pc))[:, :3]
    if not lit:
        return albedo
    return torch.cat([albedo, _interpolate(normals[0], faces, pairs.face, bary_pc)], -1)


def render_mesh(mesh: Mesh, camera: Camera, settings: RenderSettings | None = None, *,
                lights: Lights | None = None, material: Material | None = None,
                outputs: tuple[str, ...] | None = None) -> dict[str, Tensor]:
    """Convenience: ``prepare`` then ``render`` for a Mesh with its own colors or texture."""
    settings = settings or RenderSettings()
    pairs = prepare(mesh.verts, mesh.faces, camera, settings)
    return render(mesh.verts, mesh.faces, camera, pairs, settings, colors=mesh.colors, uvs=mesh.uvs,
                  uv_faces=mesh.uv_faces, texture=mesh.texture, lights=lights, material=material,
                  outputs=outputs)
