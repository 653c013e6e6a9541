"""``lights_albedo``: known mesh and cameras; recover one directional light (direction, intensity), the
ambient level and per-vertex albedo from shaded images.

Parameters: ``light_dir`` (3,) (normalized inside the model, so only its direction matters),
``intensity`` (1,), ``ambient`` (1,), ``albedo`` (V, 3). Residual: rendered rgb − target rgb.
Lambertian shading ``albedo · (ambient + intensity · max(0, n·l))`` is invariant under
``albedo → s·albedo, (ambient, intensity) → (ambient, intensity)/s``: the metrics compare after the best
such ``s`` (least squares on the albedo), and the solver sees the gauge direction as a flat valley.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

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
from diffrender.scenes.regularizers import Topology, laplacian_residual


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


def build(*, name: str, mesh: str, image_size: int, sigma: float, sigma_schedule: list[float],
          coarse_to_fine: bool, gamma: float, fov_deg: float, views: int, distance: float, elevation_deg: float,
          light_dir: list[float], light_intensity: float, ambient: float, start_light_dir: list[float],
          start_intensity: float, start_ambient: float, start_albedo: float, ctx: BuildContext,
          w_smooth: float = 0.01) -> Scene:
    from diffrender import render as R
    from diffrender.camera import camera_from_look_at, orbit_eyes
    from diffrender.mesh import Mesh, save_obj
    from diffrender.raster.shading import Lights

    size = int(ctx.opt("image_size", image_size))
    kw = dict(dtype=ctx.dtype, device=ctx.device)
    m = load_mesh(ctx, mesh, normalize=True)
    verts, faces = m.verts, m.faces
    eyes = orbit_eyes(int(views), float(distance), float(elevation_deg), azimuth_start_deg=15.0, **kw)
    cam = camera_from_look_at(eyes, fov_deg=fov_deg, height=size, width=size)
    settings = render_settings(float(ctx.opt("sigma", sigma)), gamma, ctx)
    gt = {"light_dir": torch.tensor(light_dir, **kw), "intensity": torch.tensor([light_intensity], **kw),
          "ambient": torch.tensor([ambient], **kw), "albedo": vertex_albedo_from_texture(m)}
    topo = Topology.of(faces, verts.shape[0])
    with torch.no_grad():
        pairs = R.prepare(verts, faces, cam, settings)  # geometry and cameras are fixed: pairs never change

    def lights(p: Params) -> Lights:
        d = p["light_dir"] / torch.sqrt((p["light_dir"] ** 2).sum() + 1e-12)
        ones = torch.ones(3, **kw)
        return Lights(ambient=p["ambient"] * ones, directional_dirs=d[None],
                      directional_colors=(p["intensity"] * ones)[None],
                      point_positions=torch.zeros(0, 3, **kw), point_colors=torch.zeros(0, 3, **kw))

    def rgb(p: Params):
        return R.render(verts, faces, cam, pairs, settings, colors=p["albedo"], lights=lights(p),
                        outputs=("alpha", "rgb"))

    key = dict(scene=name, mesh=file_key(ctx.asset(mesh)), size=size, sigma=settings.sigma, gamma=settings.gamma,
               views=views, distance=distance, elev=elevation_deg, fov=fov_deg, light=light_dir,
               intensity=light_intensity, ambient=ambient, dtype=str(ctx.dtype))

    def make():
        with torch.no_grad():
            out = rgb(gt)
        return {"rgb": out["rgb"], "alpha": out["alpha"]}

    target = cached(ctx, key, make)

    def make_problem(x: Params):
        from diffrender.problem import Problem

        def residuals(p, _):
            # gauge: pin ambient + intensity to its start value and |light_dir| to 1; each symmetry orbit
            # meets these once, so the image fit is unchanged and the scale-invariant metrics are unbiased
            gauge = torch.stack([(p["ambient"] + p["intensity"])[0] - gauge_sum,
                                 torch.sqrt((p["light_dir"] ** 2).sum() + 1e-12) - 1.0])
            # a weak uniform-Laplacian smoothness on the albedo fills in vertices no camera sees
            return {"color": rgb(p)["rgb"] - target["rgb"], "gauge": gauge,
                    "albedo_smooth": laplacian_residual(p["albedo"], topo)}

        return Problem(residuals, weights={"gauge": 100.0, "albedo_smooth": w_smooth})

    x0 = {"light_dir": torch.tensor(start_light_dir, **kw), "intensity": torch.tensor([start_intensity], **kw),
          "ambient": torch.tensor([start_ambient], **kw), "albedo": torch.full_like(verts, start_albedo)}

    gauge_sum = float(start_ambient + start_intensity)

    def render_fn(x: Params):
        with torch.no_grad():
            out = rgb(x)
        return {"alpha": out["alpha"], "rgb": out["rgb"].clamp(0, 1)}

    def errors(x: Params) -> dict[str, float]:
        a, ag = x["albedo"].detach().double(), gt["albedo"].double()
        s = float((a * ag).sum() / (a * a).sum().clamp_min(1e-30))  # s·albedo ≈ gt: the gauge
        d, dg = x["light_dir"].double(), gt["light_dir"].double()
        cos = float((d @ dg) / (d.norm() * dg.norm()).clamp_min(1e-30))
        return {"light_dir_err_deg": math.degrees(math.acos(max(-1.0, min(1.0, cos)))),
                "intensity_err": abs(float(x["intensity"]) / s - light_intensity),
                "ambient_err": abs(float(x["ambient"]) / s - ambient),
                "albedo_rmse": float(((s * a - ag) ** 2).mean().sqrt()), "gauge_scale": s}

    def metrics_fn(x: Params, images):
        return {**image_metrics(images, target), **errors(x)}

    def save_fn(x: Params, out: Path) -> list[str]:
        d = x["light_dir"] / x["light_dir"].norm()
        write_json(out / "lights.json", {"light_dir": d, "intensity": x["intensity"], "ambient": x["ambient"],
                                         "true": {k: v for k, v in gt.items() if k != "albedo"}, **errors(x)})
        save_obj(out / "albedo.obj", Mesh(verts=verts, faces=faces, colors=x["albedo"].detach().clamp(0, 1)))
        return ["lights.json", "albedo.obj"]

    return Scene(name=name, x0=x0, stages=[Stage("lights+albedo", list(x0), make_problem)],
                 target={"rgb": target["rgb"], "alpha": target["alpha"]}, render_fn=render_fn,
                 metrics_fn=metrics_fn, save_fn=save_fn, ground_truth=gt)
