"""``teapot_pose``: recover a camera position from one soft silhouette of the teapot.

PyTorch3D's camera-position tutorial: the teapot (its own scale, about 2 units across) is seen from
distance 3, elevation 50°, azimuth 0; the fit starts at eye (3, 6.9, 2.5). The free parameter is the
eye (3,), the camera always looks at the origin (``look_at`` is differentiable), and the residual is
rendered soft silhouette − target silhouette. A coarse-to-fine σ schedule widens the basin: with a
large blur, the silhouettes overlap even when the start is far off.
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
    add_image_noise,
    cached,
    file_key,
    image_metrics,
    load_mesh,
    render_settings,
    sigma_stages,
    stage_size,
    write_json,
)


def pose_errors(eye, eye_true) -> dict[str, float]:
    """Angle between the eye directions (degrees) and relative distance error (percent)."""
    eye, eye_true = eye.detach().double().reshape(3), eye_true.detach().double().reshape(3)
    cos = torch.dot(eye, eye_true) / (eye.norm() * eye_true.norm())
    ang = math.degrees(math.acos(max(-1.0, min(1.0, float(cos)))))
    return {"pose_err_deg": ang, "dist_err_pct": 100.0 * abs(float(eye.norm() / eye_true.norm()) - 1.0)}


def build(*, name: str, mesh: str, image_size: int, sigma: float, sigma_schedule: list[float],
          coarse_to_fine: bool, gamma: float, fov_deg: float, target_distance: float,
          target_elevation_deg: float, target_azimuth_deg: float, start_eye: list[float],
          coarse_scale: float, ctx: BuildContext, image_noise: float = 0.0) -> Scene:
    """Scene with parameters {"eye": (3,)}, one stage per σ of the schedule."""
    from diffrender import render as R
    from diffrender.camera import camera_from_look_at, orbit_eyes

    size = int(ctx.opt("image_size", image_size))
    m = load_mesh(ctx, mesh, normalize=False)  # the tutorial's own scale
    verts, faces = m.verts, m.faces
    kw = dict(dtype=ctx.dtype, device=ctx.device)
    eye_true = orbit_eyes(1, target_distance, target_elevation_deg, target_azimuth_deg, **kw)[0]
    sigmas = sigma_stages(sigma, sigma_schedule, coarse_to_fine, ctx)
    final = render_settings(sigmas[-1], gamma, ctx)

    # image pyramid: the blurred stages carry no fine detail and run on coarse_scale x the final size
    sizes = [stage_size(size, coarse_scale) for _ in sigmas[:-1]] + [size]

    def camera(eye, sz=size):
        return camera_from_look_at(eye[None], fov_deg=fov_deg, height=sz, width=sz)

    def render_alpha(eye, settings, sz=size):
        cam = camera(eye, sz)
        with torch.no_grad():
            pairs = R.prepare(verts, faces, cam, settings)
        return R.render(verts, faces, cam, pairs, settings)["alpha"]

    key = dict(scene=name, mesh=file_key(ctx.asset(mesh)), size=sizes, sigmas=sigmas, gamma=final.gamma,
               fov=fov_deg, eye=eye_true.tolist(), dtype=str(ctx.dtype), cull=final.cull_backfaces,
               eps=final.eps, margin=final.margin_px)
    targets = cached(ctx, key, lambda: {f"alpha_{i}": render_alpha(eye_true, render_settings(s, gamma, ctx), sz)
                                        .detach() for i, (s, sz) in enumerate(zip(sigmas, sizes, strict=True))})
    targets = add_image_noise(targets, image_noise)

    def stage(i: int, s: float) -> Stage:
        settings = render_settings(s, gamma, ctx)
        tgt, sz = targets[f"alpha_{i}"], sizes[i]

        def make_problem(x: Params):
            from diffrender.problem import Problem

            def residuals(p, pairs):
                alpha = R.render(verts, faces, camera(p["eye"], sz), pairs, settings, outputs=("alpha",))["alpha"]
                return {"silhouette": alpha - tgt}

            return Problem(
                residuals,
                prepare=lambda p: R.prepare(verts, faces, camera(p["eye"], sz), settings),
            )

        return Stage(f"sigma={s:g} {sz}px", ["eye"], make_problem)

    target = {"alpha": targets[f"alpha_{len(sigmas) - 1}"]}

    def render_fn(x: Params):
        with torch.no_grad():
            return {"alpha": render_alpha(x["eye"], final)}

    def metrics_fn(x: Params, images):
        return {**image_metrics(images, target), **pose_errors(x["eye"], eye_true)}

    def save_fn(x: Params, out: Path) -> list[str]:
        cam = camera(x["eye"].detach())
        write_json(out / "pose.json", {"eye": x["eye"], "at": [0.0, 0.0, 0.0], "up": [0.0, 1.0, 0.0],
                                       "R": cam.R[0], "t": cam.t[0], "fov_deg": fov_deg,
                                       "eye_true": eye_true, **pose_errors(x["eye"], eye_true)})
        return ["pose.json"]

    return Scene(name=name, x0={"eye": torch.tensor(start_eye, **kw)},
                 stages=[stage(i, s) for i, s in enumerate(sigmas)], target=target, render_fn=render_fn,
                 metrics_fn=metrics_fn, save_fn=save_fn, ground_truth={"eye": eye_true})
