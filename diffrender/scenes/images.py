"""``images``: fit to your own photographs or renders — images, masks and cameras from a dataset folder.

Formats: ``cameras.json``, ``transforms.json`` (NeRF / Blender), COLMAP text (``diffrender.io``). Targets:
silhouettes (mask files, else the images' alpha) and/or colors. Unknowns (``free``, any of):

* ``pose``: a rigid transform of the starting mesh, world ``R(axis_angle) v + translation`` (rotation about
  the world origin);
* ``camera_eye`` / ``camera_pose``: the rig's shared pose (view 0 as a look-at eye, or SO(3) + translation;
  the other views keep their placement relative to it); ``view_poses``: every view but the first;
* ``offsets``: per-vertex displacements (Laplacian, edge-length and normal-consistency blocks, the
  (I + λL)⁻¹ preconditioner), optionally on a subdivided mesh in the last stage;
* ``colors``: per-vertex albedo (unlit) with a smoothness block; ``background``: a free background color.

Stages: one per σ of the coarse-to-fine schedule, coarse ones on an image pyramid, each against soft
targets made from the masks the way the renderer softens a mesh (``mask_targets``); then, when colors are
free and silhouettes exist, a color stage with the geometry fixed. A far start is first moved by the
viewpoint search (``viewpoint_search``). Metrics (``iou``, ``psnr``) are measured on hard renders.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import Tensor

from diffrender.errors import UserError
from diffrender.scenes.base import (
    BuildContext,
    Params,
    Scene,
    Stage,
    iou,
    psnr,
    render_settings,
    sigma_stages,
    write_json,
)
from diffrender.scenes.camera_unknowns import CAMERA_FREE, CameraUnknowns
from diffrender.scenes.multiscale import level_names, with_levels
from diffrender.scenes.regularizers import (
    Topology,
    edge_residual,
    laplacian_preconditioner,
    laplacian_residual,
    normal_residual,
    softening_length,
)

log = logging.getLogger(__name__)
FREE = ("pose", "offsets", "colors", "background", *CAMERA_FREE)
RIGID = ("pose", "camera_eye", "camera_pose")
BACKGROUNDS = ("fixed", "free", "alpha")
SEARCH_VIEWS = 4


def auto_sigma(height: int, width: int, radius_px: float = 2.0, eps: float = 1e-4) -> float:
    """The σ whose coverage cutoff (``D = eps``) lies ``radius_px`` pixels from an edge at this image size:
    ``σ = d² / ln(1/eps − 1)`` with ``d = radius_px · 2 / min(H, W)`` in NDC."""
    d = radius_px * 2.0 / min(height, width)
    return d * d / math.log(1 / eps - 1)


def pyramid_size(height: int, width: int, sigma: float, blur_px: float, eps: float = 1e-4,
                 min_size: int = 16) -> tuple[int, int]:
    """Image size of a coarse σ stage (the image pyramid): the largest downscale at which the coverage cutoff
    radius still spans ``blur_px`` pixels (a wider blur carries no finer detail, and fewer pixels mean far
    fewer pixel-face pairs); never larger than the images, nor smaller than ``min_size`` on the shorter side."""
    radius_px = math.sqrt(sigma * math.log(1 / eps - 1)) * min(height, width) / 2
    scale = min(1.0, max(blur_px / radius_px, min_size / min(height, width)))
    if scale > 0.9:  # not worth a level of its own
        return height, width
    return max(1, round(height * scale)), max(1, round(width * scale))


def _check_choices(free: list[str], target: str, background: str, search: str) -> None:
    bad = [f for f in free if f not in FREE]
    if bad or not free:
        raise UserError(f"scene.free: expected a non-empty subset of {list(FREE)}, got {list(free)}")
    if "pose" in free and ("camera_eye" in free or "camera_pose" in free):
        raise UserError("scene.free: pose and a shared camera pose (camera_eye / camera_pose) are the same six "
                        "degrees of freedom (moving the object = moving the rig the other way): free one of them")
    if target not in ("auto", "silhouette", "rgb", "both"):
        raise UserError(f"scene.target: expected auto, silhouette, rgb or both, got {target!r}")
    if background not in BACKGROUNDS:
        raise UserError(f"scene.background: expected one of {list(BACKGROUNDS)}, got {background!r}")
    if "background" in free and background != "free":
        raise UserError("scene.free has 'background': set scene.background=free as well")
    if search not in ("auto", "on", "off"):
        raise UserError(f"scene.search: expected auto, on or off, got {search!r}")


def build(*, name: str, folder: str, cameras: str | None, format: str, images: str | None, masks: str | None,
          mesh: str | None, sphere_level: int, sphere_radius: float, sphere_center: list[float], subdivide: int,
          free: list[str], target: str, background: str, background_color: list[float], image_size: int,
          sigma: float | None, sigma_schedule: list[float], coarse_to_fine: bool, coarse_blur_px: float, gamma: float,
          fov_deg: float, init_axis_angle: list[float], init_translation: list[float], look_at: list[float],
          up: list[float], search: str, search_below_iou: float, search_directions: int, search_rolls: int,
          search_size: int, w_silhouette: float, w_color: float, w_laplacian: float, w_edge: float,
          w_normal: float, w_color_smooth: float, preconditioner_lambda: float, final_passes: int,
          ctx: BuildContext, normal_softening: float = 0.1, silhouette_levels: int = 0) -> Scene:
    from diffrender import render as R
    from diffrender.camera import pose_to_extrinsics
    from diffrender.io import load_dataset
    from diffrender.manifolds import AxisAngleSO3
    from diffrender.mesh import Mesh, edges, icosphere
    from diffrender.mesh import subdivide as subdivide_mesh
    from diffrender.scenes.hard import HARD_SIGMA, hard_render
    from diffrender.scenes.mask_targets import MaskTargets, area_resize, calibrated_target

    free = list(free)
    _check_choices(free, target, background, search)
    kw = dict(dtype=ctx.dtype, device=ctx.device)
    root = ctx.path(folder)
    if not root.exists():
        raise UserError(f"dataset folder not found: {root}")
    data = load_dataset(ctx.path(cameras) if cameras else root, format=format,
                        images=ctx.path(images) if images else None, masks=masks, **kw)
    cam0 = data.camera
    H, W = cam0.height, cam0.width

    # ---------------------------------------------------------------- targets
    sil = data.mask
    use_sil = target in ("silhouette", "both") or (target == "auto" and sil is not None)
    use_rgb = target in ("rgb", "both") or (target == "auto" and ("colors" in free or sil is None))
    if use_sil and sil is None:
        raise UserError(f"scene.target={target} needs silhouettes: the images in {root} have no alpha channel "
                        "and no masks were given (scene.masks=<pattern>, e.g. masks/{stem}.png)")
    if not use_sil and not use_rgb:
        raise UserError(f"nothing to fit in {root}: no silhouettes (masks or alpha) and 'colors' is not free; "
                        "add colors to scene.free or give masks")
    if background == "alpha" and use_rgb and sil is None:
        raise UserError("scene.background=alpha needs the images' alpha channel or mask files")

    # ---------------------------------------------------------------- the starting mesh
    if mesh == "sphere":
        sph = icosphere(int(sphere_level), **kw)
        v_start = sph.verts * float(sphere_radius) + torch.tensor(sphere_center, **kw)
        faces = sph.faces
        colors0 = None
    else:
        from diffrender.scenes.base import load_mesh

        mesh_path = ctx.path(mesh) if mesh else data.mesh
        if mesh_path is None:
            raise UserError(f"no starting mesh: set scene.mesh (a path, or 'sphere') or a 'mesh' entry in the "
                            f"camera file of {root}")
        m = load_mesh(ctx, mesh_path, normalize=False)  # real data: the mesh is in world units already
        v_start, faces, colors0 = m.verts, m.faces, m.colors
    if use_rgb and "colors" not in free and colors0 is None:
        raise UserError("fitting colors needs per-vertex colors: add 'colors' to scene.free")
    # subdivision for the last geometric stage: fine = [v, midpoints of edges(faces)] (mesh.subdivide's order)
    levels = [(faces, None)]
    for _ in range(int(subdivide) if "offsets" in free else 0):
        f_prev = levels[-1][0]
        n_prev = int(f_prev.max()) + 1
        levels.append((subdivide_mesh(Mesh(torch.zeros(n_prev, 3, **kw), f_prev)).faces, edges(f_prev)))
    fine = len(levels) > 1
    faces_out = levels[-1][0]

    def upsample(v: Tensor) -> Tensor:
        for _, e in levels[1:]:
            v = torch.cat([v, v[e].mean(1)])
        return v

    n_fine = v_start.shape[0] + sum(e.shape[0] for _, e in levels[1:])
    topo = Topology.of(faces, v_start.shape[0]) if "offsets" in free else None
    topo_fine = Topology.of(faces_out, n_fine) if fine else topo
    topo_colors = Topology.of(faces_out, n_fine) if "colors" in free else None
    # the normal term's ε per level: midpoint subdivision quarters every face (and its |ñ|)
    eps = softening_length(v_start, faces, normal_softening) if "offsets" in free else 0.0
    eps_fine = eps / 4 ** (len(levels) - 1)

    # ---------------------------------------------------------------- unknowns and x0
    unknowns = CameraUnknowns(cam0, free, torch.tensor(look_at, **kw), torch.tensor(up, **kw))
    bg_fixed = torch.tensor(background_color, **kw)
    if bg_fixed.shape != (3,):
        raise UserError(f"scene.background_color: expected 3 numbers, got {background_color}")
    x0: Params = dict(unknowns.x0())
    if "pose" in free:
        x0["axis_angle"] = torch.tensor(init_axis_angle, **kw)
        x0["translation"] = torch.tensor(init_translation, **kw)
    if "offsets" in free:
        x0["offsets"] = torch.zeros_like(v_start)
        if fine:
            x0["offsets_fine"] = torch.zeros(n_fine, 3, **kw)
    if "colors" in free:
        x0["colors"] = upsample(colors0) if colors0 is not None else torch.full((n_fine, 3), 0.5, **kw)
    if "background" in free:
        x0["background"] = bg_fixed.clone()
    fixed_aa, fixed_t = torch.tensor(init_axis_angle, **kw), torch.tensor(init_translation, **kw)

    def verts(p: Params, level: str = "out") -> Tensor:
        """World vertices at the stage's mesh level ("coarse", or "out": the final mesh)."""
        v = v_start + p["offsets"] if "offsets" in p else v_start
        if level == "out" and fine:
            v = upsample(v) + p["offsets_fine"]
        elif level == "out":
            v = upsample(v)
        rot, t = pose_to_extrinsics(p.get("axis_angle", fixed_aa)[None], p.get("translation", fixed_t)[None])
        return v @ rot[0].transpose(0, 1) + t[0]

    colors_fixed = upsample(colors0) if colors0 is not None else None

    def colors(p: Params) -> Tensor | None:
        return p["colors"] if "colors" in p else colors_fixed

    def bg(p: Params) -> Tensor:
        return p["background"] if "background" in p else bg_fixed

    # ---------------------------------------------------------------- global pose initialization
    rigid = [f for f in free if f in RIGID]
    if use_sil and rigid and search != "off":
        x0.update(_searched(x0, v_start, faces, sil, unknowns, verts, search, search_below_iou,
                            search_directions, search_rolls, search_size))

    # ---------------------------------------------------------------- stages
    final_sigma = float(sigma) if sigma else auto_sigma(H, W, eps=render_settings(1.0, gamma, ctx).eps)
    sigmas = sigma_stages(final_sigma, sigma_schedule, coarse_to_fine, ctx)
    sizes = [pyramid_size(H, W, s, coarse_blur_px, render_settings(s, gamma, ctx).eps) for s in sigmas[:-1]] + [(H, W)]
    mask_targets = MaskTargets(sil) if use_sil else None
    rgb_target = None
    if use_rgb:
        rgb_target = sil.unsqueeze(-1) * data.rgb if background == "alpha" else data.rgb
    pre = pre_coarse = None
    if "offsets" in free and preconditioner_lambda > 0:
        t_, n_, key = (topo_fine, n_fine, "offsets_fine") if fine else (topo, v_start.shape[0], "offsets")
        pre = laplacian_preconditioner(t_, n_, preconditioner_lambda, key, ctx.dtype, ctx.device)
        pre_coarse = laplacian_preconditioner(topo, v_start.shape[0], preconditioner_lambda, "offsets",
                                              ctx.dtype, ctx.device) if fine else pre
    geo_keys = [k for k in x0 if k not in ("colors", "background", "offsets_fine")]
    color_stage = use_rgb and use_sil
    rgb_in_geometry = use_rgb and not use_sil  # no silhouettes: geometry (if free) fits the colors

    def shade(p: Params, out: dict[str, Tensor]) -> Tensor:
        """Rendered color composited as the target is: over the background, or premultiplied (alpha)."""
        if background == "alpha":
            return out["rgb"]
        return out["rgb"] + (1 - out["alpha"]).unsqueeze(-1) * bg(p)

    def regularizers(q: Params, keys: list[str], level: str, v: Tensor) -> dict[str, Tensor]:
        """Smoothness blocks of the free per-vertex unknowns (q: all parameters; v = verts(q, level), which
        without subdivision are the coarse vertices at either level)."""
        blocks = {}
        if "offsets" in keys or "offsets_fine" in keys:
            tp, f, e = (topo_fine, faces_out, eps_fine) if level == "out" and fine else (topo, faces, eps)
            blocks.update(laplacian=laplacian_residual(v, tp), edge=edge_residual(v, tp),
                          normal=normal_residual(v, f, tp, e))
        if "colors" in keys:  # also keeps colors that no view sees finite (tied to their neighbours)
            blocks["color_smooth"] = laplacian_residual(q["colors"], topo_colors)
        return blocks

    if int(silhouette_levels) < 0:
        raise UserError(f"scene.silhouette_levels must be >= 0, got {silhouette_levels}")
    sil_levels = level_names("silhouette", int(silhouette_levels))
    weights = {"silhouette": w_silhouette, "color": w_color, "laplacian": w_laplacian, "edge": w_edge,
               "normal": w_normal, "color_smooth": w_color_smooth, **{b: w_silhouette for b in sil_levels}}

    def make_stage(label: str, keys: list[str], s: float, size: tuple[int, int], level: str, with_sil: bool,
                   with_rgb: bool) -> Stage:
        settings = render_settings(s, gamma, ctx)
        f_stage = faces_out if level == "out" else faces

        def make_problem(x: Params):
            from diffrender.problem import Problem

            fixed = {k: v for k, v in x.items() if k not in keys}
            tgt = None
            if with_sil:  # soft target calibrated on the mesh where this stage starts (mask_targets)
                with torch.no_grad():
                    v, cam = verts(x, level), unknowns.camera(x, *size)
                    soft = R.render(v, f_stage, cam, R.prepare(v, f_stage, cam, settings), settings,
                                    outputs=("alpha",))["alpha"]
                    tgt = calibrated_target(area_resize(mask_targets.sdf_ndc, *size), soft,
                                            hard_render(v, f_stage, cam)["alpha"], s, correct=True)

            def residuals(p, pairs):
                q = {**fixed, **p}
                v, cam = verts(q, level), unknowns.camera(q, *size)
                if with_rgb:
                    out = R.render(v, f_stage, cam, pairs, settings, colors=colors(q), outputs=("alpha", "rgb"))
                else:
                    out = R.render(v, f_stage, cam, pairs, settings, outputs=("alpha",))
                blocks = {}
                if with_sil:  # and its coarser levels (multiscale.py), as in cow_shape
                    blocks.update(with_levels("silhouette", out["alpha"] - tgt, len(sil_levels)))
                if with_rgb:
                    blocks["color"] = shade(q, out) - rgb_target
                blocks.update(regularizers(q, keys, level, v))
                return blocks

            def prepare(p):
                q = {**fixed, **p}
                return R.prepare(verts(q, level), f_stage, unknowns.camera(q, *size), settings)

            manifolds = {"axis_angle": AxisAngleSO3()} if "axis_angle" in keys else {}
            manifolds.update({k: m for k, m in unknowns.manifolds().items() if k in keys})
            names = {"silhouette", *sil_levels} if with_sil else set()
            names |= {"color"} if with_rgb else set()
            names |= {"laplacian", "edge", "normal"} if "offsets" in keys or "offsets_fine" in keys else set()
            names |= {"color_smooth"} if "colors" in keys else set()
            precond = pre if "offsets_fine" in keys else (pre_coarse if "offsets" in keys else None)
            return Problem(residuals, prepare=prepare, manifolds=manifolds,
                           weights={k: w for k, w in weights.items() if k in names}, preconditioner=precond)

        return Stage(label, keys, make_problem)

    stages: list[Stage] = []
    rgb_keys = [k for k in ("colors", "background") if k in x0]
    if geo_keys:
        extra = rgb_keys if rgb_in_geometry else []
        for s, size in zip(sigmas[:-1], sizes[:-1], strict=True):
            stages.append(make_stage(f"sigma={s:g} {size[1]}x{size[0]}", geo_keys + extra, s, size,
                                     "coarse" if fine else "out", use_sil, rgb_in_geometry))
        # the final σ: passes each re-calibrated where the last one ended
        s, size = sigmas[-1], sizes[-1]
        for k in range(max(1, int(final_passes))):
            sub = fine and k == max(1, int(final_passes)) - 1  # the subdivided mesh in the last pass
            keys = [g for g in geo_keys if g != "offsets"] + ["offsets_fine"] if sub else geo_keys
            stages.append(make_stage(f"sigma={s:g} {size[1]}x{size[0]} pass {k + 1}{' subdivided' if sub else ''}",
                                     keys + extra, s, size, "out" if sub or not fine else "coarse", use_sil,
                                     rgb_in_geometry))
    if rgb_keys and (color_stage or not geo_keys):
        # geometry fixed: colors are fitted on the hard render (σ → 0), a linear least-squares problem whose
        # optimum is the best the per-vertex colors can do against these images (no blur at the edges)
        stages.append(make_stage("colors", rgb_keys, HARD_SIGMA, (H, W), "out", False, True))
    if not stages:
        raise UserError(f"scene.free={free}: no unknown to fit")

    # ---------------------------------------------------------------- display, metrics, outputs
    tgt_show: dict[str, Tensor] = {}
    if sil is not None:
        tgt_show["alpha"] = sil
    if use_rgb:
        tgt_show["rgb"] = rgb_target

    def render_fn(x: Params) -> dict[str, Tensor]:
        """Hard renders (σ → 0), composited like the targets."""
        c = colors(x) if use_rgb else None
        out = hard_render(verts(x), faces_out, unknowns.camera(x), colors=c, gamma=gamma)
        if "rgb" in out:
            out["rgb"] = shade(x, out).clamp(0, 1)
        return out

    def metrics_fn(x: Params, imgs: dict[str, Tensor]) -> dict[str, float]:
        out = {}
        if "alpha" in tgt_show:
            out["iou"] = iou(imgs["alpha"], tgt_show["alpha"])
        if "rgb" in imgs:
            out["psnr"] = psnr(imgs["rgb"], tgt_show["rgb"])
        if "background" in x:
            out.update({f"background_{c}": float(v) for c, v in zip("rgb", x["background"], strict=True)})
        return out

    def save_fn(x: Params, out: Path) -> list[str]:
        from diffrender.mesh import Mesh, save_obj

        files = []
        if "pose" in free:
            rot, t = pose_to_extrinsics(x["axis_angle"][None], x["translation"][None])
            write_json(out / "pose.json", {"axis_angle": x["axis_angle"], "translation": x["translation"],
                                           "R": rot[0], "t": t[0],
                                           "convention": "world = R @ mesh_vertex + t"})
            files.append("pose.json")
        if unknowns.free:
            _write_cameras(out / "cameras.json", unknowns.camera(x), data.files)
            files.append("cameras.json")
        c = colors(x)
        save_obj(out / "mesh.obj", Mesh(verts=verts(x).detach(), faces=faces_out,
                                        colors=None if c is None else c.detach().clamp(0, 1)))
        return files + ["mesh.obj"]

    def mesh_fn(x: Params):
        c = colors(x)
        return verts(x).detach(), faces_out, None if c is None else c.detach().clamp(0, 1)

    return Scene(name=name, x0=x0, stages=stages, target=tgt_show, render_fn=render_fn, metrics_fn=metrics_fn,
                 save_fn=save_fn, mesh_fn=mesh_fn if "offsets" in free else None)


def _searched(x0: Params, v_start: Tensor, faces: Tensor, sil: Tensor, unknowns: CameraUnknowns, verts,
              search: str, below: float, directions: int, rolls: int, size: int) -> Params:
    """Parameters after the viewpoint search (``{}`` when it is skipped or finds nothing better)."""
    from kornia.geometry.conversions import rotation_matrix_to_axis_angle

    from diffrender.camera import pose_to_extrinsics
    from diffrender.scenes.mask_targets import area_resize
    from diffrender.scenes.viewpoint_search import search_view0

    H, W = sil.shape[-2:]
    s = min(1.0, size / min(H, W))
    h, w = max(1, round(H * s)), max(1, round(W * s))
    # at most SEARCH_VIEWS views, view 0 first: the cost is candidates x views
    pick = torch.linspace(0, sil.shape[0] - 1, min(sil.shape[0], SEARCH_VIEWS)).round().long().unique()
    target = area_resize(sil[pick], h, w)
    v = verts(x0, "coarse").detach()
    rig = unknowns.camera(x0, h, w).select(pick)
    R0, t0 = rig.R[0], rig.t[0]
    if unknowns.shared == "camera_eye":
        at, up = unknowns.at, unknowns.up
    else:  # look at the object's bounding-box center, keeping view 0's image up
        at, up = 0.5 * (v.amin(0) + v.amax(0)), -R0[1]
    with torch.no_grad():
        res = search_view0(v, faces, rig, target, at, up, (R0, t0), directions=directions, rolls=rolls,
                           max_views=256) if search == "on" or _start_iou(v, faces, rig, target) < below else None
    if res is None:
        return {}
    log.info(f"viewpoint search: {res.candidates} candidates in {res.seconds:.2f} s, hard IoU at {h}x{w} "
             f"{res.start_iou:.3f} -> {res.iou:.3f}")
    if res.iou <= res.start_iou:
        return {}
    if unknowns.shared is not None:
        return unknowns.params_from_view0(res.R, res.t)
    # object pose: R0 (R_o' v + t_o') + t0 = R_c (R_o v + t_o) + t_c
    R_o, t_o = pose_to_extrinsics(x0["axis_angle"][None], x0["translation"][None])
    R_new = R0.T @ res.R @ R_o[0]
    t_new = R0.T @ (res.R @ t_o[0] + res.t - t0)
    return {"axis_angle": rotation_matrix_to_axis_angle(R_new[None])[0], "translation": t_new}


def _start_iou(v: Tensor, faces: Tensor, rig, target: Tensor) -> float:
    from diffrender.scenes.hard import hard_render

    return iou(hard_render(v, faces, rig)["alpha"], target)


def _write_cameras(path: Path, cam, files: list[Path]) -> None:
    """The fitted cameras as a ``cameras.json`` (readable by this scene)."""
    views = [{"file": str(f), "width": cam.width, "height": cam.height, "fx": float(cam.focal[i, 0]),
              "fy": float(cam.focal[i, 1]), "cx": float(cam.principal[i, 0]), "cy": float(cam.principal[i, 1]),
              "R": cam.R[i].detach().cpu().tolist(), "t": cam.t[i].detach().cpu().tolist()}
             for i, f in enumerate(files)]
    write_json(path, {"views": views})
