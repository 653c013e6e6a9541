"""diffrender's own camera file, ``cameras.json`` (README, "Your data: cameras.json")::

    {"mesh": "mesh.obj",                      # optional starting mesh, relative to the JSON's folder
     "width": 64, "height": 64, "fov_y_deg": 50,             # optional defaults for every view
     "views": [{"file": "view_000.png", "width": 64, "height": 64,
                "fx": 55.4, "fy": 55.4, "cx": 32.0, "cy": 32.0,
                "R": [[...], [...], [...]], "t": [x, y, z]},      # world->camera, OpenCV (+z forward, y down)
               {"file": "view_001.png", "mask": "masks/view_001.png", "fov_y_deg": 50,
                "eye": [x, y, z], "at": [0, 0, 0], "up": [0, 1, 0]}]}

Intrinsics: ``fx`` (+ ``fy``, default fx) in pixels, or ``fov_y_deg`` / ``fov_x_deg`` (full angle across the
height / width; one of them means square pixels); ``cx``, ``cy`` default to the image center. Extrinsics:
``R`` + ``t`` or ``eye`` (+ ``at``, default the origin, and ``up``, default +y). A field given at the top level
is the default of every view. All views share one image size.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from diffrender.camera import Camera, focal_from_fov, look_at
from diffrender.errors import UserError
from diffrender.io.views import Views, all_or_none, check_rotation, entries, make_camera, number, numbers, path_field


def _look_at(eye: np.ndarray, at: np.ndarray, up: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV world->camera (R, t) looking from ``eye`` at ``at`` (float64): camera.look_at, after a check that
    names the file's view."""
    if np.linalg.norm(at - eye) == 0 or np.linalg.norm(np.cross(at - eye, up)) == 0:
        raise UserError(f"{where}: 'eye', 'at' and 'up' must not be collinear (eye {eye.tolist()}, at {at.tolist()})")
    R, t = look_at(torch.from_numpy(eye)[None], torch.from_numpy(at), torch.from_numpy(up))
    return R[0].numpy(), t[0].numpy()


def _intrinsics(view: dict, h: int, w: int, where: str) -> tuple[list[float], list[float]]:
    has_f = "fx" in view or "fy" in view
    has_fov = "fov_x_deg" in view or "fov_y_deg" in view
    if has_f == has_fov:
        raise UserError(f"{where}: give the focal length either as 'fx' (and 'fy') in pixels or as "
                        "'fov_y_deg' / 'fov_x_deg', not both or neither")
    if has_f:
        fx = number(view, "fx", where)
        fy = number(view, "fy", where, default=fx)
    else:
        fovs = {k: number(view, k, where) for k in ("fov_x_deg", "fov_y_deg") if k in view}
        for k, v in fovs.items():
            if not 0 < v < 180:
                raise UserError(f"{where}: field '{k}' must be in (0, 180) degrees, got {v}")
        fx = focal_from_fov(fovs["fov_x_deg"], w) if "fov_x_deg" in fovs else None
        fy = focal_from_fov(fovs["fov_y_deg"], h) if "fov_y_deg" in fovs else None
        fx, fy = fx or fy, fy or fx
    if fx <= 0 or fy <= 0:
        raise UserError(f"{where}: focal lengths must be positive, got fx={fx}, fy={fy}")
    return [fx, fy], [number(view, "cx", where, default=w / 2), number(view, "cy", where, default=h / 2)]


def read_cameras_json(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> Views:
    """Parse ``cameras.json`` (format above). Paths are relative to the file's folder."""
    path = Path(path)
    data, views = entries(path, "views")
    defaults = {k: v for k, v in data.items() if k not in ("views", "mesh")}
    Rs, ts, focal, principal, files, masks, sizes = [], [], [], [], [], [], []
    for i, view in enumerate(views):
        where = f"{path}: views[{i}]"
        if not isinstance(view, dict) or not isinstance(view.get("file"), str):
            raise UserError(f"{where}: needs a string field 'file'")
        view = {**defaults, **view}
        w, h = view.get("width"), view.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise UserError(f"{where}: 'width' and 'height' must be positive integers, got {w!r}, {h!r}")
        sizes.append((h, w))
        f, c = _intrinsics(view, h, w, where)
        focal.append(f)
        principal.append(c)
        if "R" in view:
            R = numbers(view, "R", 9, where).reshape(3, 3)
            check_rotation(R, where, "R")
            t = numbers(view, "t", 3, where)
        elif "eye" in view:
            at = numbers(view, "at", 3, where) if "at" in view else np.zeros(3)
            up = numbers(view, "up", 3, where) if "up" in view else np.array([0.0, 1.0, 0.0])
            R, t = _look_at(numbers(view, "eye", 3, where), at, up, where)
        else:
            raise UserError(f"{where}: needs either 'R' and 't' or 'eye' (and optional 'at', 'up')")
        Rs.append(R)
        ts.append(t)
        files.append(path.parent / view["file"])
        mask = path_field(view, "mask", where)
        masks.append(path.parent / mask if mask else None)
    mesh = path_field(data, "mesh", str(path))
    camera = make_camera(Rs, ts, focal, principal, sizes, str(path), dtype=dtype, device=device)
    return Views(camera=camera, images=files, masks=all_or_none(masks, str(path), "mask"),
                 mesh=(path.parent / mesh) if mesh else None, source=path, root=path.parent, format="cameras.json")


def load_cameras_json(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> tuple[Camera, list[Path], Path | None]:
    """(Camera of N views, image paths, starting-mesh path or None) of a ``cameras.json``."""
    v = read_cameras_json(path, dtype=dtype, device=device)
    return v.camera, v.images, v.mesh
