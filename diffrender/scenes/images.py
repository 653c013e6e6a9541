"""``images``: fit to your own photos or renders — a folder of image files plus ``cameras.json``.

Free parameters (any of): ``pose`` — a rigid transform of the starting mesh, ``axis_angle`` (3,) on SO(3)
and ``translation`` (3,), world position ``R(ω) (v + offsets) + t``; ``offsets`` — per-vertex (V, 3)
with a Laplacian regularizer; ``colors`` — per-vertex albedo (V, 3). The residual is soft α − alpha
channel when the images have alpha (``target: silhouette``), else unlit rgb − image (``target: rgb``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffrender.errors import UserError
from diffrender.io import load_image_set
from diffrender.scenes.base import (
    BuildContext,
    Params,
    Scene,
    Stage,
    image_metrics,
    load_mesh,
    render_settings,
    sigma_stages,
    write_json,
)
from diffrender.scenes.regularizers import Topology, laplacian_residual

FREE = ("pose", "offsets", "colors")


def build(*, name: str, folder: str, cameras: str | None, mesh: str | None, free: list[str], target: str,
          image_size: int, sigma: float, sigma_schedule: list[float], coarse_to_fine: bool, gamma: float,
          fov_deg: float, init_axis_angle: list[float], init_translation: list[float], w_laplacian: float,
          ctx: BuildContext) -> Scene:
    from diffrender import render as R
    from diffrender.camera import pose_to_extrinsics
    from diffrender.manifolds import AxisAngleSO3
    from diffrender.mesh import Mesh, save_obj

    free = list(free)
    bad = [f for f in free if f not in FREE]
    if bad or not free:
        raise UserError(f"scene.free: expected a non-empty subset of {list(FREE)}, got {free}")
    if target not in ("auto", "silhouette", "rgb"):
        raise UserError(f"scene.target: expected auto, silhouette or rgb, got {target!r}")
    root = ctx.path(folder)
    if not root.is_dir():
        raise UserError(f"image folder not found: {root}")
    cams_path = ctx.path(cameras) if cameras else root / "cameras.json"
    data = load_image_set(cams_path, dtype=ctx.dtype, device=ctx.device)
    mesh_path = ctx.path(mesh) if mesh else data.mesh
    if mesh_path is None:
        raise UserError(f"no starting mesh: set scene.mesh or a 'mesh' entry in {cams_path}")
    m = load_mesh(ctx, mesh_path, normalize=False)  # real data: the mesh is in world units already
    use = target if target != "auto" else ("silhouette" if data.alpha is not None else "rgb")
    if use == "silhouette" and data.alpha is None:
        raise UserError(f"scene.target=silhouette but the images in {root} have no alpha channel")
    if use == "rgb" and "colors" not in free and m.colors is None:
        raise UserError("scene.target=rgb needs per-vertex colors: add 'colors' to scene.free")
    cam, faces, v0 = data.camera, m.faces, m.verts
    kw = dict(dtype=ctx.dtype, device=ctx.device)
    topo = Topology.of(faces, v0.shape[0]) if "offsets" in free else None
    sigmas = sigma_stages(sigma, sigma_schedule, coarse_to_fine, ctx)
    final = render_settings(sigmas[-1], gamma, ctx)

    x0: Params = {}
    if "pose" in free:
        x0["axis_angle"] = torch.tensor(init_axis_angle, **kw)
        x0["translation"] = torch.tensor(init_translation, **kw)
    if "offsets" in free:
        x0["offsets"] = torch.zeros_like(v0)
    if "colors" in free:
        x0["colors"] = m.colors.clone() if m.colors is not None else torch.full_like(v0, 0.5)
    fixed_aa = torch.tensor(init_axis_angle, **kw)
    fixed_t = torch.tensor(init_translation, **kw)

    def verts(p: Params):
        v = v0 + p["offsets"] if "offsets" in p else v0
        rot, t = pose_to_extrinsics(p.get("axis_angle", fixed_aa)[None], p.get("translation", fixed_t)[None])
        return v @ rot[0].transpose(0, 1) + t[0]

    def colors(p: Params):
        return p["colors"] if "colors" in p else m.colors

    def images(p: Params, pairs, settings):
        if use == "silhouette":
            return R.render(verts(p), faces, cam, pairs, settings, outputs=("alpha",))
        return R.render(verts(p), faces, cam, pairs, settings, colors=colors(p), outputs=("alpha", "rgb"))

    tgt = {"alpha": data.alpha} if use == "silhouette" else {"rgb": data.rgb}
    if use == "rgb" and data.alpha is not None:
        tgt["alpha"] = data.alpha

    def stage(s: float) -> Stage:
        settings = render_settings(s, gamma, ctx)

        def make_problem(x: Params):
            from diffrender.problem import Problem

            def residuals(p, pairs):
                out = images(p, pairs, settings)
                blocks = {"silhouette": out["alpha"] - tgt["alpha"]} if use == "silhouette" else \
                    {"color": out["rgb"] - tgt["rgb"]}
                if "offsets" in p:
                    blocks["laplacian"] = laplacian_residual(v0 + p["offsets"], topo)
                return blocks

            manifolds = {"axis_angle": AxisAngleSO3()} if "pose" in free else None
            weights = {"laplacian": w_laplacian} if "offsets" in free else None
            return Problem(residuals, prepare=lambda p: R.prepare(verts(p), faces, cam, settings),
                           manifolds=manifolds, weights=weights)

        return Stage(f"sigma={s:g}", list(x0), make_problem)

    def render_fn(x: Params):
        with torch.no_grad():
            pairs = R.prepare(verts(x), faces, cam, final)
            out = images(x, pairs, final)
            if "rgb" in out:
                out["rgb"] = out["rgb"].clamp(0, 1)
            return out

    def metrics_fn(x: Params, imgs):
        return image_metrics(imgs, tgt)

    def save_fn(x: Params, out: Path) -> list[str]:
        files = []
        if "pose" in free:
            rot, t = pose_to_extrinsics(x["axis_angle"][None], x["translation"][None])
            write_json(out / "pose.json", {"axis_angle": x["axis_angle"], "translation": x["translation"],
                                           "R": rot[0], "t": t[0],
                                           "convention": "world = R @ mesh_vertex + t"})
            files.append("pose.json")
        c = colors(x)
        save_obj(out / "mesh.obj", Mesh(verts=verts(x).detach(), faces=faces,
                                        colors=None if c is None else c.detach().clamp(0, 1)))
        return files + ["mesh.obj"]

    def mesh_fn(x: Params):
        c = colors(x)
        return verts(x).detach(), faces, None if c is None else c.clamp(0, 1)

    return Scene(name=name, x0=x0, stages=[stage(s) for s in sigmas], target=tgt, render_fn=render_fn,
                 metrics_fn=metrics_fn, save_fn=save_fn, mesh_fn=mesh_fn if "offsets" in free else None)
