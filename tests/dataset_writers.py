"""Writers of the dataset formats diffrender reads, for tests and scripts/bench_captures.py.

Written from the formats' own documentation in numpy, independently of ``diffrender.io`` (which only reads):
cameras.json (ours), NeRF / Blender ``transforms.json`` (camera-to-world in OpenGL axes) and COLMAP text
(``cameras.txt``, ``images.txt`` with world-to-camera Hamilton quaternions). Cameras come as OpenCV
world-to-camera ``R`` (N, 3, 3), ``t`` (N, 3) and intrinsics ``K`` rows (fx, fy, cx, cy).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def write_image(path: Path, img: np.ndarray, bits: int = 8) -> None:
    """Float image (H, W) or (H, W, C), C in {1, 2, 3, 4}, in [0, 1] as a PNG (PIL, not our writer);
    ``bits=16`` for a 16-bit grayscale image."""
    from PIL import Image

    img = np.asarray(img, np.float64)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if bits == 16:
        Image.fromarray(np.round(np.clip(img, 0, 1) * 65535).astype(np.uint16)).save(path)
        return
    a = np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)
    Image.fromarray(a, "L" if a.ndim == 2 else {2: "LA", 3: "RGB", 4: "RGBA"}[a.shape[-1]]).save(path)


def write_cameras_json(folder: Path, R, t, K, height: int, width: int, files: list[str], *, mesh: str | None = None,
                       masks: list[str] | None = None, use_fov: bool = False) -> Path:
    views = []
    for i, f in enumerate(files):
        v = {"file": f, "width": width, "height": height, "R": np.asarray(R[i]).tolist(),
             "t": np.asarray(t[i]).tolist()}
        fx, fy, cx, cy = (float(k) for k in K[i])
        if use_fov:  # square pixels, centered principal point
            v["fov_y_deg"] = math.degrees(2 * math.atan(0.5 * height / fy))
        else:
            v.update(fx=fx, fy=fy, cx=cx, cy=cy)
        if masks:
            v["mask"] = masks[i]
        views.append(v)
    data = {"views": views}
    if mesh:
        data["mesh"] = mesh
    path = Path(folder) / "cameras.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def c2w_opengl(R, t) -> np.ndarray:
    """Camera-to-world (4, 4) in OpenGL axes (x right, y up, z backward) of an OpenCV world-to-camera pose."""
    R, t = np.asarray(R, np.float64), np.asarray(t, np.float64)
    m = np.eye(4)
    m[:3, :3] = R.T @ np.diag([1.0, -1.0, -1.0])
    m[:3, 3] = -R.T @ t
    return m


def write_transforms_json(folder: Path, R, t, K, height: int, width: int, files: list[str], *,
                          angle: bool = False, extra: dict | None = None, masks: list[str] | None = None) -> Path:
    """``angle``: NeRF-synthetic style (``camera_angle_x``, no size, ``file_path`` without extension);
    else instant-ngp style (``fl_x``, ``fl_y``, ``cx``, ``cy``, ``w``, ``h``) from view 0's intrinsics."""
    fx, fy, cx, cy = (float(k) for k in K[0])
    data: dict = {"camera_angle_x": 2 * math.atan(0.5 * width / fx)} if angle else \
        {"fl_x": fx, "fl_y": fy, "cx": cx, "cy": cy, "w": width, "h": height}
    data.update(extra or {})
    frames = []
    for i, f in enumerate(files):
        fr = {"file_path": "./" + (str(Path(f).with_suffix("")) if angle else f),
              "transform_matrix": c2w_opengl(R[i], t[i]).tolist()}
        if masks:
            fr["mask_path"] = masks[i]
        frames.append(fr)
    data["frames"] = frames
    path = Path(folder) / "transforms.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def matrix_to_quaternion(R) -> np.ndarray:
    """Hamilton quaternion (w, x, y, z), w >= 0, of a rotation matrix (Shepperd's method)."""
    R = np.asarray(R, np.float64)
    tr = np.trace(R)
    if tr > 0:
        s = 2 * math.sqrt(1 + tr)
        q = [s / 4, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(R)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2 * math.sqrt(1 + R[i, i] - R[j, j] - R[k, k])
        q = [0.0] * 4
        q[0] = (R[k, j] - R[j, k]) / s
        q[1 + i] = s / 4
        q[1 + j] = (R[j, i] + R[i, j]) / s
        q[1 + k] = (R[k, i] + R[i, k]) / s
    q = np.asarray(q)
    return q if q[0] >= 0 else -q


def write_colmap(folder: Path, R, t, K, height: int, width: int, names: list[str], *, model: str = "PINHOLE",
                 distortion: tuple[float, ...] = ()) -> Path:
    """``folder/sparse/0/{cameras,images,points3D}.txt``, one camera per view; images go in ``folder/images``."""
    d = Path(folder) / "sparse" / "0"
    d.mkdir(parents=True, exist_ok=True)
    cams = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    imgs = ["# Image list with two lines of data per image:",
            "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME", "#   POINTS2D[] as (X, Y, POINT3D_ID)"]
    for i, name in enumerate(names):
        fx, fy, cx, cy = (float(k) for k in K[i])
        params = {"PINHOLE": [fx, fy, cx, cy], "SIMPLE_PINHOLE": [fx, cx, cy],
                  "SIMPLE_RADIAL": [fx, cx, cy, *(distortion or (0.0,))],
                  "OPENCV": [fx, fy, cx, cy, *(distortion or (0.0, 0.0, 0.0, 0.0))]}[model]
        cams.append(" ".join([str(i + 1), model, str(width), str(height), *(repr(p) for p in params)]))
        q = matrix_to_quaternion(R[i])
        imgs.append(" ".join([str(i + 1), *(repr(float(v)) for v in q), *(repr(float(v)) for v in t[i]),
                              str(i + 1), name]))
        imgs.append("" if i % 2 else "12.5 3.5 -1 40.0 7.25 -1")  # 2-D points (ignored), empty for some images
    (d / "cameras.txt").write_text("\n".join(cams) + "\n")
    (d / "images.txt").write_text("\n".join(imgs) + "\n")
    (d / "points3D.txt").write_text("# 3D point list\n")
    (Path(folder) / "images").mkdir(exist_ok=True)
    return d
