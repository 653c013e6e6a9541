#!/usr/bin/env python
"""Write ``assets/example_images/``: the small example for ``scene=images``.

The teapot (assets/teapot.obj) moved by a known rigid transform is rendered hard (σ → 0, as a z-buffer
would: the alpha is a binary mask, like a photograph's segmentation) from 4 views at 64x64 as RGBA PNGs
(shaded gray, alpha = silhouette) with a ``cameras.json`` that uses both camera forms (R + t and fx, fy, cx,
cy for three views; eye/at/up and fov_y_deg for one). Fitting ``scene=images`` (free: pose) from the
identity should recover ``axis_angle = TRUE_AXIS_ANGLE`` and ``translation = TRUE_TRANSLATION``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffrender import render as R  # noqa: E402
from diffrender.camera import camera_from_look_at, orbit_eyes, pose_to_extrinsics  # noqa: E402
from diffrender.io import write_png  # noqa: E402
from diffrender.mesh import load_obj  # noqa: E402
from diffrender.raster.shading import Lights  # noqa: E402
from diffrender.scenes.hard import HARD_SIGMA  # noqa: E402

TRUE_AXIS_ANGLE = [0.0, 0.35, 0.1]
TRUE_TRANSLATION = [0.1, -0.05, 0.08]
SIZE, VIEWS = 64, 4


def main(out: Path = ROOT / "assets" / "example_images") -> None:
    torch.manual_seed(0)
    dtype = torch.float64
    m = load_obj(ROOT / "assets" / "teapot.obj", dtype=dtype)
    rot, t = pose_to_extrinsics(torch.tensor([TRUE_AXIS_ANGLE], dtype=dtype),
                                torch.tensor([TRUE_TRANSLATION], dtype=dtype))
    verts = m.verts @ rot[0].T + t[0]
    eyes = orbit_eyes(VIEWS, 3.0, [30.0, 10.0], azimuth_start_deg=20.0, dtype=dtype)
    cam = camera_from_look_at(eyes, fov_deg=50.0, height=SIZE, width=SIZE)
    settings = R.RenderSettings(sigma=HARD_SIGMA, gamma=1e-4, cull_backfaces=False)
    lights = Lights.create(ambient=(0.35, 0.35, 0.35), directional_dirs=[(-0.4, -0.8, -0.5)],
                           directional_colors=[(0.7, 0.7, 0.7)], dtype=dtype)
    colors = torch.full_like(verts, 0.8)
    with torch.no_grad():
        pairs = R.prepare(verts, m.faces, cam, settings)
        img = R.render(verts, m.faces, cam, pairs, settings, colors=colors, lights=lights, outputs=("alpha", "rgb"))
    out.mkdir(parents=True, exist_ok=True)
    views = []
    for i in range(VIEWS):
        name = f"view_{i:03d}.png"
        write_png(out / name, torch.cat([img["rgb"][i], img["alpha"][i][..., None]], -1))
        v = {"file": name, "width": SIZE, "height": SIZE}
        if i == VIEWS - 1:
            v.update(fov_y_deg=50.0, eye=eyes[i].tolist(), at=[0.0, 0.0, 0.0], up=[0.0, 1.0, 0.0])
        else:
            v.update(fx=float(cam.focal[i, 0]), fy=float(cam.focal[i, 1]), cx=float(cam.principal[i, 0]),
                     cy=float(cam.principal[i, 1]), R=cam.R[i].tolist(), t=cam.t[i].tolist())
        views.append(v)
    (out / "cameras.json").write_text(json.dumps({"mesh": "../teapot.obj", "views": views}, indent=1))
    print(f"wrote {VIEWS} views to {out}")


if __name__ == "__main__":
    main()
