"""``cow_shape`` and ``bunny_silhouette``: deform an icosphere into a target mesh seen from many views.

Parameters: per-vertex ``offsets`` (V, 3) of the sphere (and per-vertex ``colors`` (V, 3) in the color
stage). Residual blocks: ``silhouette`` (soft α − target α, all views) and its coarser levels
``silhouette_<f>x`` (``silhouette_levels``: f×f cell means times f, :mod:`diffrender.scenes.multiscale`),
``color`` (shaded rgb − target rgb, color stage only), and the regularizers ``laplacian``, ``edge`` and
``normal`` with their weights.
Stages: one silhouette stage per σ of the coarse-to-fine schedule, then (``color_stage``) one stage that
frees the colors too. The CG solve gets the (I + λL)^{-1} preconditioner on the offsets.
Views are split into chunks, one residual term each (blocks ``silhouette/<k>``, ``color/<k>``), when
``view_chunks`` asks for it, when the memory budget needs it (graphs then rebuilt per product), or when the
fit is sharded over processes (each builds its own chunks; rank 0 the regularizers): see
:mod:`diffrender.scenes.views`. Targets and renders for display go chunk by chunk without gradients.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffrender.scenes.base import (
    BuildContext,
    Params,
    Scene,
    Stage,
    add_image_noise,
    cached,
    chamfer,
    file_key,
    image_metrics,
    load_mesh,
    render_settings,
    sigma_stages,
    stage_size,
)
from diffrender.scenes.multiscale import level_names, with_levels
from diffrender.scenes.regularizers import (
    Topology,
    edge_residual,
    laplacian_preconditioner,
    laplacian_residual,
    normal_residual,
    softening_length,
)
from diffrender.scenes.views import plan_views, render_views


def default_lights(dtype: torch.dtype, device: torch.device):
    from diffrender.raster.shading import Lights

    return Lights.create(ambient=(0.4, 0.4, 0.4), directional_dirs=[(-0.3, -0.6, -0.7)],
                         directional_colors=[(0.7, 0.7, 0.7)], dtype=dtype, device=device)


def build(*, name: str, mesh: str, image_size: int, sigma: float, sigma_schedule: list[float],
          coarse_to_fine: bool, gamma: float, fov_deg: float, sphere_level: int, sphere_radius: float,
          views: int, distance: float, elevations_deg: list[float], color_stage: bool, w_silhouette: float,
          w_color: float, w_laplacian: float, w_edge: float, w_normal: float, preconditioner_lambda: float,
          coarse_scale: float, view_chunks: int, ctx: BuildContext, image_noise: float = 0.0,
          normal_softening: float = 0.1, silhouette_levels: int = 0,
          normal_continuation: list[float] | None = None, normal_continuation_iterations: int = 100) -> Scene:
    from diffrender import render as R
    from diffrender.camera import camera_from_look_at, orbit_eyes
    from diffrender.mesh import Mesh, icosphere, save_obj

    size = int(ctx.opt("image_size", image_size))
    kw = dict(dtype=ctx.dtype, device=ctx.device)
    gt = load_mesh(ctx, mesh, normalize=True)
    sphere = icosphere(int(sphere_level), **kw)
    base = sphere.verts * float(sphere_radius)
    faces = sphere.faces
    topo = Topology.of(faces, base.shape[0])
    eyes = orbit_eyes(int(views), float(distance), list(elevations_deg), **kw)
    cam = camera_from_look_at(eyes, fov_deg=fov_deg, height=size, width=size)
    sigmas = sigma_stages(sigma, sigma_schedule, coarse_to_fine, ctx)
    # image pyramid: the blurred stages carry no fine detail and run on coarse_scale x the final size
    sizes = [stage_size(size, coarse_scale) for _ in sigmas[:-1]] + [size]
    cams = {sz: camera_from_look_at(eyes, fov_deg=fov_deg, height=sz, width=sz) for sz in set(sizes)}
    final = render_settings(sigmas[-1], gamma, ctx)
    lights = default_lights(ctx.dtype, ctx.device)
    has_color = bool(color_stage) and (gt.texture is not None or gt.colors is not None)

    plan = plan_views(name, int(views), size, size, int(view_chunks), rank=ctx.rank, world_size=ctx.world_size,
                      memory_budget=ctx.memory_budget, dtype_bytes=torch.finfo(ctx.dtype).bits // 8)
    # rank 0 shows and saves results: it needs every view's target; the others only their own views'
    needed = plan.views if ctx.rank == 0 else plan.views_of(ctx.rank)

    def render_gt(settings, rgb: bool, camera=cam):
        return render_views(camera, needed, plan.chunk_views, lambda c: R.render_mesh(
            gt, c, settings, lights=lights if rgb else None, outputs=("alpha", "rgb") if rgb else ("alpha",)))

    def make_targets():
        out = {f"alpha_{i}": render_gt(render_settings(s, gamma, ctx), False, cams[sz])["alpha"]
               for i, (s, sz) in enumerate(zip(sigmas, sizes, strict=True))}
        if has_color:
            out["rgb"] = render_gt(final, True)["rgb"]
        return out

    key = dict(scene=name, mesh=file_key(ctx.asset(mesh)), size=sizes, sigmas=sigmas, gamma=final.gamma,
               fov=fov_deg, views=views, distance=distance, elev=list(elevations_deg), color=has_color,
               dtype=str(ctx.dtype), cull=final.cull_backfaces, eps=final.eps, margin=final.margin_px)
    targets = add_image_noise(cached(ctx, key, make_targets, store=len(needed) == int(cam.num_views)), image_noise)
    levels = int(silhouette_levels)
    if levels < 0:
        raise ValueError(f"scene.silhouette_levels must be >= 0, got {levels}")
    sil_weights = {b: w_silhouette for b in ["silhouette", *level_names("silhouette", levels)]}
    weights = {**sil_weights, "laplacian": w_laplacian, "edge": w_edge, "normal": w_normal}
    pre = None
    if preconditioner_lambda > 0:
        pre = laplacian_preconditioner(topo, base.shape[0], preconditioner_lambda, "offsets", ctx.dtype, ctx.device)

    eps = softening_length(base, faces, normal_softening)

    def regularizers(v):
        return {"laplacian": laplacian_residual(v, topo), "edge": edge_residual(v, topo),
                "normal": normal_residual(v, faces, topo, eps)}

    def problem(settings, camera, image_residuals, block_weights: dict[str, float], normal_factor: float = 1.0):
        """The stage's Problem: one term of every view (the plain problem), or one term per chunk of views
        that this process owns (``views/<k>``, blocks ``<kind>/<k>``), plus ``regularizers`` in rank 0.
        ``normal_factor`` scales the normal term's weight (a continuation stage)."""
        from diffrender.problem import Problem

        stage_weights = {**weights, "normal": weights["normal"] * normal_factor}
        if plan.single:
            def residuals(p, pairs):
                return {**image_residuals(p, camera, pairs, None), **regularizers(base + p["offsets"])}

            return Problem(residuals, prepare=lambda p: R.prepare(base + p["offsets"], faces, camera, settings),
                           weights={**stage_weights, **block_weights}, preconditioner=pre)
        terms, prepares, chunk_weights = {}, {}, {}
        for k in plan.local_chunks:
            idx = list(plan.chunks[k])
            cam_k = camera.select(idx)
            terms[f"views/{k}"] = lambda p, pairs, cam_k=cam_k, k=k, idx=idx: image_residuals(p, cam_k, pairs, (k, idx))
            prepares[f"views/{k}"] = lambda p, cam_k=cam_k: R.prepare(base + p["offsets"], faces, cam_k, settings)
            chunk_weights.update({f"{b}/{k}": w for b, w in block_weights.items()})
        if ctx.rank == 0:
            terms["regularizers"] = lambda p, _: regularizers(base + p["offsets"])
            chunk_weights.update({b: stage_weights[b] for b in ("laplacian", "edge", "normal")})
        every = [f"views/{k}" for k in range(len(plan.chunks))] + ["regularizers"]
        return Problem(terms, prepare=prepares, weights=chunk_weights, preconditioner=pre,
                       sampled_terms=every[:-1], keep_graphs=plan.keep_graphs, reduction=ctx.reduction,
                       remote_terms=[t for t in every if t not in terms])

    def named(blocks: dict, chunk) -> dict:
        return blocks if chunk is None else {f"{b}/{chunk[0]}": r for b, r in blocks.items()}

    def silhouette_stage(i: int, s: float, normal_factor: float | None = None) -> Stage:
        """A silhouette stage at σ = s; with ``normal_factor``, a continuation stage (the normal term's weight
        scaled, capped at normal_continuation_iterations)."""
        settings = render_settings(s, gamma, ctx)
        tgt, camera = targets[f"alpha_{i}"], cams[sizes[i]]

        def image_residuals(p, cam_k, pairs, chunk):
            alpha = R.render(base + p["offsets"], faces, cam_k, pairs, settings, outputs=("alpha",))["alpha"]
            return named(with_levels("silhouette", alpha - (tgt if chunk is None else tgt[chunk[1]]), levels), chunk)

        name = f"silhouette sigma={s:g} {sizes[i]}px"
        if normal_factor is None:
            return Stage(name, ["offsets"], lambda x: problem(settings, camera, image_residuals, sil_weights))
        return Stage(f"{name} w_normal x{normal_factor:g}", ["offsets"],
                     lambda x: problem(settings, camera, image_residuals, sil_weights, normal_factor),
                     max_iterations=int(normal_continuation_iterations))

    def color_stage_(s: float) -> Stage:
        settings = render_settings(s, gamma, ctx)
        tgt_a, tgt_rgb = targets[f"alpha_{len(sigmas) - 1}"], targets["rgb"]

        def image_residuals(p, cam_k, pairs, chunk):
            out = R.render(base + p["offsets"], faces, cam_k, pairs, settings, colors=p["colors"], lights=lights,
                           outputs=("alpha", "rgb"))
            a, c = (tgt_a, tgt_rgb) if chunk is None else (tgt_a[chunk[1]], tgt_rgb[chunk[1]])
            return named({**with_levels("silhouette", out["alpha"] - a, levels), "color": out["rgb"] - c}, chunk)

        return Stage("color", ["offsets", "colors"],
                     lambda x: problem(settings, cam, image_residuals, {**sil_weights, "color": w_color}))

    # continuation (graduated non-convexity): the normal term's 1 - cos between neighbours is what traps LM
    # in a worse basin; a weaker term first lets the silhouettes pull the mesh further (README, "A regularizer
    # that starts soft")
    last = len(sigmas) - 1
    stages = [silhouette_stage(i, s) for i, s in enumerate(sigmas[:-1])]
    stages += [silhouette_stage(last, sigmas[-1], float(f)) for f in normal_continuation or []]
    stages.append(silhouette_stage(last, sigmas[-1]))
    x0 = {"offsets": torch.zeros_like(base)}
    target = {"alpha": targets[f"alpha_{last}"]}
    if has_color:
        stages.append(color_stage_(sigmas[-1]))
        x0["colors"] = torch.full_like(base, 0.5)
        target["rgb"] = targets["rgb"]

    def render_fn(x: Params):
        v = base + x["offsets"]

        def one(c):
            pairs = R.prepare(v, faces, c, final)
            if has_color:
                return R.render(v, faces, c, pairs, final, colors=x["colors"].clamp(0, 1), lights=lights,
                                outputs=("alpha", "rgb"))
            return R.render(v, faces, c, pairs, final, outputs=("alpha",))

        return render_views(cam, plan.views, plan.chunk_views, one)

    def metrics_fn(x: Params, images):
        return {**image_metrics(images, target), "chamfer": chamfer(base + x["offsets"], gt.verts)}

    def mesh_fn(x: Params):
        return base + x["offsets"], faces, (x["colors"].clamp(0, 1) if has_color else None)

    def save_fn(x: Params, out: Path) -> list[str]:
        v, f, c = mesh_fn(x)
        save_obj(out / "mesh.obj", Mesh(verts=v.detach(), faces=f, colors=None if c is None else c.detach()))
        return ["mesh.obj"]

    return Scene(name=name, x0=x0, stages=stages, target=target, render_fn=render_fn, metrics_fn=metrics_fn,
                 save_fn=save_fn, mesh_fn=mesh_fn, ground_truth={"verts": gt.verts, "faces": gt.faces},
                 views=None if plan.single else plan)
