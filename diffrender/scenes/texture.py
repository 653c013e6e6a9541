"""``texture``: recover a mesh's UV texture from shaded views of the known mesh under known lights.

Parameter: ``texture`` (T, T, 3) texels, started at flat gray. Residual blocks: ``color`` (rendered rgb −
target rgb, (N, H, W, 3)) and ``smoothness`` (texel finite differences, weight ``w_smooth``). Geometry,
cameras and lights are fixed, so the pixel–face pairs are found once at build (``prepare`` hands back the
same pairs at every point) and the rendered color is affine in the texels: bilinear lookup, the SoftRas
blend, Lambert shading and compositing over the background are each linear in the albedo. The problem is
linear least squares: one Gauss-Newton step with an accurate linear solve reaches the optimum.

The smoothness block couples only texels that some pixel depends on (nonzero Jacobian column); the others
keep their start value, since filling the empty parts of the atlas by diffusion would cost many CG
iterations and change no pixel. A small weight (default 1e-3) matters: 256² texels seen by ~20,000 pixels
are underdetermined, and without it the weakly seen texels wander (texel RMSE ~1 at 90 dB PSNR) and the
cost falls towards 0 without the relative function test ever stopping Gauss-Newton or LM.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from diffrender.config import UserError
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
)
from diffrender.scenes.cow_shape import default_lights


def resample_texture(texture: Tensor, size: int) -> Tensor:
    """``texture`` (Ht, Wt, C) area-averaged to (size, size, C): each texel the mean of the source
    texels it covers (no aliasing when shrinking by an integer factor)."""
    img = texture.permute(2, 0, 1)[None]
    return torch.nn.functional.interpolate(img, size=(size, size), mode="area")[0].permute(1, 2, 0).contiguous()


def texel_differences(texture: Tensor, mask: Tensor | None = None) -> Tensor:
    """Forward differences of a (T, T, C) texture along rows and columns, concatenated: (2 T (T − 1) C,).
    Their squares sum to the discrete Dirichlet energy. ``mask`` (T, T) bool keeps only the differences
    whose two texels are both in it (the others are 0); texels next to each other in the atlas but on
    different UV charts are coupled too, which a small weight keeps harmless."""
    dr, dc = texture[1:] - texture[:-1], texture[:, 1:] - texture[:, :-1]
    if mask is not None:
        dr = dr * (mask[1:] & mask[:-1]).unsqueeze(-1).to(texture.dtype)
        dc = dc * (mask[:, 1:] & mask[:, :-1]).unsqueeze(-1).to(texture.dtype)
    return torch.cat([dr.reshape(-1), dc.reshape(-1)])


def difference_degree(mask: Tensor) -> Tensor:
    """(T, T): how many of the differences kept by ``texel_differences(·, mask)`` involve each texel (the
    diagonal of the graph Laplacian ``DᵀD`` of those differences)."""
    rows, cols = (mask[1:] & mask[:-1]).long(), (mask[:, 1:] & mask[:, :-1]).long()
    deg = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    deg[1:] += rows
    deg[:-1] += rows
    deg[:, 1:] += cols
    deg[:, :-1] += cols
    return deg


def build(*, name: str, mesh: str, image_size: int, sigma: float, sigma_schedule: list[float],
          coarse_to_fine: bool, gamma: float, fov_deg: float, texture_size: int, views: int, distance: float,
          elevations_deg: list[float], start_value: float, w_smooth: float, seen_threshold: float,
          ctx: BuildContext) -> Scene:
    """The texture scene (see the module docstring). ``sigma_schedule`` and ``coarse_to_fine`` are unused:
    with fixed geometry a blurred stage would only blur the texture."""
    from diffrender import render as R
    from diffrender.camera import camera_from_look_at, orbit_eyes
    from diffrender.io import write_png

    size, t = int(ctx.opt("image_size", image_size)), int(texture_size)
    if t < 2:
        raise UserError(f"scene.texture_size must be at least 2, got {texture_size}")
    kw = dict(dtype=ctx.dtype, device=ctx.device)
    m = load_mesh(ctx, mesh, normalize=True)
    if m.uvs is None or m.uv_faces is None or m.texture is None:
        raise UserError(f"{ctx.asset(mesh)} needs UVs and a texture (<name>_texture.png next to it)")
    verts, faces, uvs, uv_faces = m.verts, m.faces, m.uvs, m.uv_faces
    eyes = orbit_eyes(int(views), float(distance), list(elevations_deg), **kw)
    cam = camera_from_look_at(eyes, fov_deg=fov_deg, height=size, width=size)
    settings = render_settings(float(ctx.opt("sigma", sigma)), gamma, ctx, fixed_geometry=True)
    lights = default_lights(ctx.dtype, ctx.device)
    gt = resample_texture(m.texture[..., :3], t)
    pairs = R.prepare(verts, faces, cam, settings)  # fixed geometry and cameras: found once

    def render(tex: Tensor, lit: bool = True) -> dict[str, Tensor]:
        return R.render(verts, faces, cam, pairs, settings, uvs=uvs, uv_faces=uv_faces, texture=tex,
                        lights=lights if lit else None, outputs=("alpha", "rgb"))

    key = dict(scene=name, mesh=file_key(ctx.asset(mesh)), size=size, texture_size=t, sigma=settings.sigma,
               gamma=settings.gamma, fov=fov_deg, views=views, distance=distance, elev=list(elevations_deg),
               dtype=str(ctx.dtype), cull=settings.cull_backfaces, eps=settings.eps, margin=settings.margin_px)

    target = cached(ctx, key, lambda: render(gt))  # cached() renders without gradients
    # Each texel's footprint: how many pixels' worth of unlit color it gives, Σ_pixels ∂rgb/∂texel. Every
    # Jacobian entry is ≥ 0 (bilinear weights, blend weights, α), so a zero footprint is a zero column.
    probe = torch.full_like(gt, float(start_value), requires_grad=True)
    with torch.enable_grad():
        (footprint,) = torch.autograd.grad(render(probe, lit=False)["rgb"].sum(), probe)
    footprint = footprint.detach()[..., 0]
    touched = footprint > 0  # (T, T): texels with a nonzero Jacobian column
    seen = footprint >= float(seen_threshold)  # (T, T): texels the images determine (metrics)

    # The CG preconditioner: a separable majorizer of JᵀJ (Erdoğan & Fessler 1999, "Ordered subsets algorithms
    # for transmission tomography"). The color block's entries are all ≥ 0, so diag(J_cᵀ J_c 1) − J_cᵀ J_c is a
    # graph Laplacian (PSD), and 2 w diag(deg) − w DᵀD is a signless one: M = diag(J_cᵀ (J_c 1)) + 2 w diag(deg)
    # satisfies M ⪰ JᵀJ. J is constant (the color is affine), J_c 1 = rgb(1) − rgb(0): one VJP, once, instead
    # of a noisy Hutchinson diagonal at every point (4 probes left LM at 23 dB).
    with torch.no_grad():
        rgb0 = render(torch.zeros_like(gt))["rgb"]
    ones = torch.ones_like(gt, requires_grad=True)
    with torch.enable_grad():
        rgb1 = render(ones)["rgb"]
        (jtj1,) = torch.autograd.grad(rgb1, ones, grad_outputs=rgb1.detach() - rgb0)
    w = max(float(w_smooth), 0.0)
    majorizer = (jtj1.detach() + 2 * w * difference_degree(touched).unsqueeze(-1).to(gt.dtype)).reshape(-1)

    def preconditioner(info):
        denom = majorizer + info.damping
        inv = torch.where(denom > 0, 1 / denom.clamp_min(torch.finfo(denom.dtype).tiny), torch.ones_like(denom))
        return lambda v: inv * v

    def make_problem(x: Params):
        from diffrender.problem import Problem

        def residuals(p: Params, pr) -> dict[str, Tensor]:
            rgb = R.render(verts, faces, cam, pr, settings, uvs=uvs, uv_faces=uv_faces, texture=p["texture"],
                           lights=lights, outputs=("rgb",))["rgb"]
            out = {"color": rgb - target["rgb"]}
            if w_smooth > 0:
                out["smoothness"] = texel_differences(p["texture"], touched)
            return out

        weights = {"smoothness": float(w_smooth)} if w_smooth > 0 else {}
        return Problem(residuals, prepare=lambda p: pairs, weights=weights, preconditioner=preconditioner)

    x0 = {"texture": torch.full_like(gt, float(start_value))}

    def render_fn(x: Params) -> dict[str, Tensor]:
        with torch.no_grad():
            return render(x["texture"])

    def metrics_fn(x: Params, images: dict[str, Tensor]) -> dict[str, float]:
        err = (x["texture"].detach() - gt)[seen]
        return {**image_metrics(images, target), "texel_rmse": float(err.pow(2).mean().sqrt()),
                "seen_fraction": float(seen.float().mean())}

    def save_fn(x: Params, out: Path) -> list[str]:
        write_png(out / "texture.png", x["texture"].detach().clamp(0, 1))
        write_png(out / "texture_true.png", gt)
        return ["texture.png", "texture_true.png"]

    return Scene(name=name, x0=x0, stages=[Stage("texture", ["texture"], make_problem)],
                 target={"rgb": target["rgb"], "alpha": target["alpha"]}, render_fn=render_fn,
                 metrics_fn=metrics_fn, save_fn=save_fn,
                 ground_truth={"texture": gt, "footprint": footprint, "seen": seen})
