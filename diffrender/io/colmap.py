"""COLMAP text models: ``cameras.txt`` + ``images.txt`` (``points3D.txt`` is not needed).

``cameras.txt``: ``CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]``; the pinhole models SIMPLE_PINHOLE (f, cx, cy),
PINHOLE (fx, fy, cx, cy) and, with all distortion coefficients zero, SIMPLE_RADIAL (f, cx, cy, k),
RADIAL (f, cx, cy, k1, k2), OPENCV (fx, fy, cx, cy, k1, k2, p1, p2) and FULL_OPENCV. ``images.txt``: two
lines per image, ``IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME`` (world to camera: ``x_cam = R(q) x + t``,
Hamilton quaternion, OpenCV axes, as ours) and its 2-D points (unused). COLMAP's pixel convention (the
upper-left pixel's center at (0.5, 0.5)) is ours too. Views keep the order of ``images.txt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from diffrender.errors import UserError
from diffrender.io.views import Views, make_camera, refuse_distortion

# model -> (parameter names), the focal/principal ones first
MODELS = {
    "SIMPLE_PINHOLE": ("f", "cx", "cy"),
    "PINHOLE": ("fx", "fy", "cx", "cy"),
    "SIMPLE_RADIAL": ("f", "cx", "cy", "k1"),
    "RADIAL": ("f", "cx", "cy", "k1", "k2"),
    "OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2"),
    "FULL_OPENCV": ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2", "k3", "k4", "k5", "k6"),
}


def quaternion_to_matrix(q: np.ndarray) -> np.ndarray:
    """Rotation matrix of a Hamilton quaternion (w, x, y, z), normalized first."""
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


def _lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-comment lines; blank lines are kept (an image may have no points)."""
    if not path.is_file():
        raise UserError(f"COLMAP model file not found: {path}")
    return [(i + 1, s) for i, s in enumerate(path.read_text().splitlines()) if not s.lstrip().startswith("#")]


def read_cameras_txt(path: Path) -> dict[int, tuple[int, int, list[float], list[float]]]:
    """camera id -> (height, width, [fx, fy], [cx, cy]); refuses distortion and non-pinhole models."""
    cams = {}
    for no, line in _lines(path):
        tok = line.split()
        if not tok:
            continue
        where = f"{path}:{no}"
        if len(tok) < 4 or tok[1] not in MODELS:
            model = tok[1] if len(tok) > 1 else "?"
            raise UserError(f"{where}: unsupported camera model {model!r}; diffrender reads the pinhole models "
                            f"{', '.join(MODELS)} (undistort fisheye images first)")
        names = MODELS[tok[1]]
        try:
            cid, w, h = int(tok[0]), int(tok[2]), int(tok[3])
            vals = [float(v) for v in tok[4:]]
        except ValueError:
            raise UserError(f"{where}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS[]', got {line!r}") from None
        if len(vals) != len(names):
            raise UserError(f"{where}: model {tok[1]} has {len(names)} parameters ({' '.join(names)}), got {len(vals)}")
        p = dict(zip(names, vals, strict=True))
        refuse_distortion({k: v for k, v in p.items() if k[0] in "kp"}, where)
        fx, fy = (p["f"], p["f"]) if "f" in p else (p["fx"], p["fy"])
        cams[cid] = (h, w, [fx, fy], [p["cx"], p["cy"]])
    return cams


def find_model(path: Path) -> Path:
    """The folder holding ``cameras.txt`` + ``images.txt``: ``path`` itself, ``path/sparse/0`` or ``path/sparse``."""
    for d in (path, path / "sparse" / "0", path / "sparse"):
        if (d / "cameras.txt").is_file() and (d / "images.txt").is_file():
            return d
    raise UserError(f"no COLMAP text model (cameras.txt + images.txt) in {path}, {path / 'sparse/0'} or "
                    f"{path / 'sparse'} (binary models: convert with 'colmap model_converter --output_type TXT')")


def read_colmap(path: str | os.PathLike, images: str | os.PathLike | None = None, *,
                dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Views:
    """Cameras and image paths of a COLMAP text model.

    path: the model folder or a dataset folder holding ``sparse/0``; images: the image folder (default: the
    first ``images`` folder found at the model folder or up to two levels above it).
    """
    model = find_model(Path(path))
    cams = read_cameras_txt(model / "cameras.txt")
    if images is None:
        candidates = [model / "images", model.parent / "images", model.parent.parent / "images"]
        image_dir = next((c for c in candidates if c.is_dir()), None)
        if image_dir is None:
            raise UserError(f"no image folder for the COLMAP model {model}: tried "
                            f"{', '.join(str(c) for c in candidates)}; name it with scene.images")
    else:
        image_dir = Path(images)
    Rs, ts, focal, principal, files, sizes = [], [], [], [], [], []
    lines = _lines(model / "images.txt")
    k = 0
    while k < len(lines):
        no, line = lines[k]
        tok = line.split()
        if not tok:  # blank lines between entries or at the end
            k += 1
            continue
        where = f"{model / 'images.txt'}:{no}"
        try:
            q = np.array([float(v) for v in tok[1:5]])
            t = np.array([float(v) for v in tok[5:8]])
            cid = int(tok[8])
            name = " ".join(tok[9:])
        except (ValueError, IndexError):
            raise UserError(f"{where}: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME', got {line!r}") from None
        if not name or not np.all(np.isfinite(q)) or not np.all(np.isfinite(t)) or np.linalg.norm(q) == 0:
            raise UserError(f"{where}: bad image entry {line!r}")
        if cid not in cams:
            raise UserError(f"{where}: camera id {cid} is not in {model / 'cameras.txt'}")
        h, w, f, c = cams[cid]
        Rs.append(quaternion_to_matrix(q))
        ts.append(t)
        focal.append(f)
        principal.append(c)
        sizes.append((h, w))
        files.append(image_dir / name)
        k += 2  # skip this image's POINTS2D line
    if not files:
        raise UserError(f"{model / 'images.txt'}: no images")
    camera = make_camera(Rs, ts, focal, principal, sizes, str(model), dtype=dtype, device=device)
    return Views(camera=camera, images=files, masks=None, mesh=None, source=model, root=image_dir.parent,
                 format="colmap")
