"""NeRF-synthetic / Blender / instant-ngp / nerfstudio ``transforms.json``::

    {"camera_angle_x": 0.69,                     # horizontal field of view in radians, or
     "fl_x": 1111.1, "fl_y": 1111.1, "cx": 400, "cy": 400, "w": 800, "h": 800,   # pixels
     "k1": 0, "k2": 0, "p1": 0, "p2": 0,          # distortion: must be zero (undistortion is not ours)
     "frames": [{"file_path": "./train/r_0",     # with or without extension (.png tried first)
                 "transform_matrix": [[...4 rows...]],   # camera to world, OpenGL axes (-z forward, y up)
                 "mask_path": "masks/r_0.png"}]}  # optional

Intrinsics may also be given per frame (a frame's keys override the top level). Without ``w``/``h`` the
image size is read from the first image. ``cx``/``cy`` default to the image center; ``fl_y`` to ``fl_x``
(``camera_angle_y`` gives it as an angle). instant-ngp's ``scale``/``offset``/``aabb_scale`` are ignored:
the camera file's own world units are used, and the mesh must be in them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from diffrender.camera import opengl_to_opencv
from diffrender.errors import UserError
from diffrender.io.images import read_image
from diffrender.io.views import (
    DISTORTION_KEYS,
    Views,
    all_or_none,
    check_rotation,
    entries,
    make_camera,
    number,
    path_field,
    refuse_distortion,
)

EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")
PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE", "SIMPLE_RADIAL", "RADIAL")


def resolve_image(root: Path, file_path: str, where: str) -> Path:
    """``root / file_path``, adding an image extension when the path has none that exists."""
    p = root / file_path
    if p.is_file():
        return p
    for ext in EXTENSIONS:
        q = p.with_name(p.name + ext)
        if q.is_file():
            return q
    raise UserError(f"{where}: image not found: {p} (also tried the extensions {', '.join(EXTENSIONS[:3])})")


def read_transforms_json(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> Views:
    """Parse a ``transforms.json`` (format above) into OpenCV cameras; paths relative to its folder."""
    path = Path(path)
    data, frames = entries(path, "frames")
    top = {k: v for k, v in data.items() if k != "frames"}
    Rs, ts, focal, principal, files, masks, sizes = [], [], [], [], [], [], []
    for i, frame in enumerate(frames):
        where = f"{path}: frames[{i}]"
        if not isinstance(frame, dict) or not isinstance(frame.get("file_path"), str):
            raise UserError(f"{where}: needs a string field 'file_path'")
        f = {**top, **frame}
        model = f.get("camera_model", "OPENCV")
        if model not in PINHOLE_MODELS:
            raise UserError(f"{where}: camera_model {model!r} is not a pinhole camera; diffrender fits pinhole "
                            "cameras only: undistort or reproject the images first")
        refuse_distortion({k: number(f, k, where) for k in DISTORTION_KEYS if k in f}, where)
        image = resolve_image(path.parent, f["file_path"], where)
        files.append(image)
        if "w" in f or "h" in f:
            w, h = f.get("w"), f.get("h")
            if not (isinstance(w, int | float) and isinstance(h, int | float) and w == int(w) > 0
                    and h == int(h) > 0):
                raise UserError(f"{where}: 'w' and 'h' must be positive integers, got {w!r}, {h!r}")
            w, h = int(w), int(h)
        elif sizes:
            h, w = sizes[-1]  # the image reader checks every image against it
        else:
            h, w = read_image(image).shape[:2]
        sizes.append((h, w))
        if "fl_x" in f:
            fx = number(f, "fl_x", where)
            fy = number(f, "fl_y", where, default=fx)
        elif "camera_angle_x" in f:
            fx = 0.5 * w / math.tan(0.5 * number(f, "camera_angle_x", where))
            fy = 0.5 * h / math.tan(0.5 * number(f, "camera_angle_y", where)) if "camera_angle_y" in f else fx
        else:
            raise UserError(f"{where}: needs the focal length: 'camera_angle_x' (radians) or 'fl_x' (pixels)")
        if not (fx > 0 and fy > 0):
            raise UserError(f"{where}: focal lengths must be positive, got {fx}, {fy}")
        focal.append([fx, fy])
        principal.append([number(f, "cx", where, default=w / 2), number(f, "cy", where, default=h / 2)])
        m = frame.get("transform_matrix")
        rows = np.asarray(m, dtype=np.float64) if isinstance(m, list) else None
        if rows is None or rows.shape not in ((4, 4), (3, 4)) or not np.all(np.isfinite(rows)):
            raise UserError(f"{where}: 'transform_matrix' must be a 4x4 (or 3x4) matrix of finite numbers")
        check_rotation(rows[:3, :3], where, "transform_matrix")
        R, t = opengl_to_opencv(torch.from_numpy(rows[None]))
        Rs.append(R[0].numpy())
        ts.append(t[0].numpy())
        mp = path_field(frame, "mask_path", where)
        masks.append(resolve_image(path.parent, mp, where) if mp else None)
    camera = make_camera(Rs, ts, focal, principal, sizes, str(path), dtype=dtype, device=device)
    mesh = path_field(data, "mesh", str(path))  # not part of the format: a convenience, as in cameras.json
    return Views(camera=camera, images=files, masks=all_or_none(masks, str(path), "mask_path"),
                 mesh=(path.parent / mesh) if mesh else None, source=path, root=path.parent,
                 format="transforms.json")
