"""``lights_albedo``: known mesh, cameras and material; recover one directional light (direction,
intensity), the ambient level and a smooth albedo from shaded images.

Parameters: ``light_dir`` (3,) (normalized inside the model, so only its direction matters),
``intensity`` (1,), ``ambient`` (1,), ``albedo`` (K, 3): the coefficients of the per-vertex albedo
``Φ @ albedo`` in a basis ``Φ`` (V, K) of polynomials of the vertex position up to ``albedo_degree``
(orthonormalized over the vertices). Residual: rendered rgb − target rgb. The ground-truth albedo is the
mesh texture sampled at the vertices and projected onto that basis, so the true parameters fit exactly.

Why low-dimensional: Lambertian shading ``albedo · (ambient + I max(0, n·l))`` with a free albedo per
vertex does not identify the light, since each vertex's albedo absorbs its own shading. A smooth albedo
cannot: the shading follows the normals, which turn quickly at the ears, legs and snout, so a wrong light
leaves a pattern that no low-degree polynomial reproduces. What remains is the scale
``albedo → s·albedo, (ambient, I) → (ambient, I)/s``, a true symmetry of diffuse shading: it is pinned by
a residual ``ambient + I = const`` and the metrics compare after the best ``s``. A known Blinn-Phong
specular term (``specular > 0``) fixes that scale from the images instead (a highlight's brightness
``k_s I`` does not scale with the albedo); the pin is then dropped and the metrics compare as fitted.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from diffrender.scenes.base import (
    BuildContext,
    Params,
    Scene,
    Stage,
    cached,
    file_key,
    image_metrics,
    load_mesh,
    render_settings,
    write_json,
)


def vertex_albedo_from_texture(mesh) -> torch.Tensor:
    """Per-vertex colors (V, 3) sampled (nearest texel) from the mesh texture at one UV of each vertex;
    0.7 gray when the mesh has no texture."""
    v = mesh.verts
    if mesh.texture is None or mesh.uvs is None or mesh.uv_faces is None:
        return torch.full_like(v, 0.7)
    uv_of_vert = torch.zeros(v.shape[0], dtype=torch.long, device=v.device)
    uv_of_vert[mesh.faces.reshape(-1).long()] = mesh.uv_faces.reshape(-1).long()
    uv = mesh.uvs[uv_of_vert]
    h, w = mesh.texture.shape[:2]
    col = (uv[:, 0] * (w - 1)).round().long().clamp(0, w - 1)
    row = ((1 - uv[:, 1]) * (h - 1)).round().long().clamp(0, h - 1)  # OBJ v points up
    return mesh.texture[row, col, :3].to(v.dtype)


def polynomial_basis(points: Tensor, degree: int) -> Tensor:
    """Φ (V, K): the monomials ``x^a y^b z^c`` (a + b + c ≤ degree, K = C(degree + 3, 3)) of ``points``
    (V, 3), orthogonalized over the points (QR in float64) and scaled so that ``Φᵀ Φ = V I``: coefficients
    are then of the order of the values, and column 0 is the constant 1."""
    p = points.detach().double()
    cols = [p[:, 0] ** a * p[:, 1] ** b * p[:, 2] ** c
            for total in range(degree + 1) for a in range(total + 1) for b in range(total - a + 1)
            for c in [total - a - b]]
    q, r = torch.linalg.qr(torch.stack(cols, 1))
    q = q * torch.sign(torch.diagonal(r))  # column 0 positive
    return (q * math.sqrt(p.shape[0])).to(points.dtype)


def build(*, name: str, mesh: str, image_size: int, sigma: float, sigma_schedule: list[float],
          coarse_to_fine: bool, gamma: float, fov_deg: float, views: int, distance: float, elevation_deg: float,
          light_dir: list[float], light_intensity: float, ambient: float, start_light_dir: list[float],
          start_intensity: float, start_ambient: float, start_albedo: float, albedo_degree: int,
          specular: float, shininess: float, ctx: BuildContext) -> Scene:
    from diffrender import render as R
    from diffrender.camera import camera_from_look_at, orbit_eyes
    from diffrender.config import UserError
    from diffrender.mesh import Mesh, save_obj
    from diffrender.raster.shading import Lights, Material

    if albedo_degree < 0:
        raise UserError(f"scene.albedo_degree must be >= 0, got {albedo_degree}")
    size = int(ctx.opt("image_size", image_size))
    kw = dict(dtype=ctx.dtype, device=ctx.device)
    m = load_mesh(ctx, mesh, normalize=True)
    verts, faces = m.verts, m.faces
    eyes = orbit_eyes(int(views), float(distance), float(elevation_deg), azimuth_start_deg=15.0, **kw)
    cam = camera_from_look_at(eyes, fov_deg=fov_deg, height=size, width=size)
    settings = render_settings(float(ctx.opt("sigma", sigma)), gamma, ctx, fixed_geometry=True)
    material = Material(specular=float(specular), shininess=float(shininess))
    basis = polynomial_basis(verts, int(albedo_degree))  # (V, K)
    gt = {"light_dir": torch.tensor(light_dir, **kw), "intensity": torch.tensor([light_intensity], **kw),
          "ambient": torch.tensor([ambient], **kw),
          "albedo": basis.T @ vertex_albedo_from_texture(m) / verts.shape[0]}  # least-squares projection
    with torch.no_grad():
        pairs = R.prepare(verts, faces, cam, settings)  # geometry and cameras are fixed: pairs never change

    def length(v: Tensor) -> Tensor:
        # (1,), not 0-d: torch 2.13's forward mode gives `0-d tensor + python float` a float64 tangent
        return torch.sqrt((v * v).sum(-1, keepdim=True) + 1e-12)

    def lights(p: Params) -> Lights:
        d = p["light_dir"] / length(p["light_dir"])
        ones = torch.ones(3, **kw)
        return Lights(ambient=p["ambient"] * ones, directional_dirs=d[None],
                      directional_colors=(p["intensity"] * ones)[None],
                      point_positions=torch.zeros(0, 3, **kw), point_colors=torch.zeros(0, 3, **kw))

    def rgb(p: Params):
        return R.render(verts, faces, cam, pairs, settings, colors=basis @ p["albedo"], lights=lights(p),
                        material=material, outputs=("alpha", "rgb"))

    key = dict(scene=name, mesh=file_key(ctx.asset(mesh)), size=size, sigma=settings.sigma, gamma=settings.gamma,
               views=views, distance=distance, elev=elevation_deg, fov=fov_deg, light=light_dir,
               intensity=light_intensity, ambient=ambient, degree=albedo_degree, specular=material.specular,
               shininess=material.shininess, dtype=str(ctx.dtype))

    def make():  # cached() renders without gradients
        out = rgb(gt)
        return {"rgb": out["rgb"], "alpha": out["alpha"]}

    target = cached(ctx, key, make)
    gauge_sum = float(start_ambient + start_intensity)
    scale_known = material.specular > 0  # the highlights' brightness fixes the albedo/light scale

    def make_problem(x: Params):
        from diffrender.problem import Problem

        def residuals(p, _):
            # gauge: |light_dir| = 1 and, without a specular term, ambient + intensity = its start value;
            # each symmetry orbit meets these once, so the image fit is unchanged
            gauge = length(p["light_dir"]) - 1.0
            if not scale_known:
                gauge = torch.cat([gauge, p["ambient"] + p["intensity"] - gauge_sum])
            return {"color": rgb(p)["rgb"] - target["rgb"], "gauge": gauge}

        return Problem(residuals, weights={"gauge": 100.0})

    x0 = {"light_dir": torch.tensor(start_light_dir, **kw), "intensity": torch.tensor([start_intensity], **kw),
          "ambient": torch.tensor([start_ambient], **kw),
          "albedo": basis.T @ torch.full_like(verts, start_albedo) / verts.shape[0]}  # constant albedo

    def render_fn(x: Params):
        with torch.no_grad():
            out = rgb(x)  # not clamped: highlights may exceed 1 in the targets too (PNGs clip)
        return {"alpha": out["alpha"], "rgb": out["rgb"]}

    def errors(x: Params) -> dict[str, float]:
        a, ag = (basis @ x["albedo"].detach()).double(), (basis @ gt["albedo"]).double()
        s = float((a * ag).sum() / (a * a).sum().clamp_min(1e-30))  # s·albedo ≈ gt: the scale found
        gauge_scale = s
        if scale_known:
            s = 1.0  # the images determine the scale: compare as fitted
        d, dg = x["light_dir"].double(), gt["light_dir"].double()
        cos = float((d @ dg) / (d.norm() * dg.norm()).clamp_min(1e-30))
        return {"light_dir_err_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos)))),
                "intensity_err": abs(float(x["intensity"]) / s - light_intensity),
                "ambient_err": abs(float(x["ambient"]) / s - ambient),
                "albedo_rmse": float(((s * a - ag) ** 2).mean().sqrt()), "gauge_scale": gauge_scale}

    def metrics_fn(x: Params, images):
        return {**image_metrics(images, target), **errors(x)}

    def save_fn(x: Params, out: Path) -> list[str]:
        d = x["light_dir"] / x["light_dir"].norm()
        write_json(out / "lights.json", {"light_dir": d, "intensity": x["intensity"], "ambient": x["ambient"],
                                         "true": {k: v for k, v in gt.items() if k != "albedo"}, **errors(x)})
        colors = (basis @ x["albedo"]).detach().clamp(0, 1)
        save_obj(out / "albedo.obj", Mesh(verts=verts, faces=faces, colors=colors))
        return ["lights.json", "albedo.obj"]

    return Scene(name=name, x0=x0, stages=[Stage("lights+albedo", list(x0), make_problem)],
                 target={"rgb": target["rgb"], "alpha": target["alpha"]}, render_fn=render_fn,
                 metrics_fn=metrics_fn, save_fn=save_fn, ground_truth={**gt, "albedo_basis": basis})
