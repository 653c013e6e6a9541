"""Image files and camera JSON for fits to real data, and uint8 PNG writing.

``cameras.json`` (documented in the README, "Fitting")::

    {"mesh": "mesh.obj",                      # optional starting mesh, relative to the JSON's folder
     "views": [{"file": "view_000.png", "width": 64, "height": 64,
                "fx": 55.4, "fy": 55.4, "cx": 32.0, "cy": 32.0,
                "R": [[...], [...], [...]], "t": [x, y, z]},      # world->camera, OpenCV (+z forward, y down)
               {"file": "view_001.png", ..., "eye": [x, y, z], "at": [0, 0, 0], "up": [0, 1, 0]}]}

Every view needs the intrinsics and either ``R`` + ``t`` or ``eye`` (+ optional ``at``, ``up``).
All views must share one image size, and every image must have that size.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffrender.errors import UserError


@dataclass
class ImageSet:
    """Targets and cameras read from disk.

    rgb: (N, H, W, 3) in [0, 1]; alpha: (N, H, W) in [0, 1] or None when no image had an alpha channel;
    camera: a ``diffrender.camera.Camera`` of N views; files: image paths; mesh: starting mesh path or None.
    """

    rgb: Tensor
    alpha: Tensor | None
    camera: object
    files: list[Path]
    mesh: Path | None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as float32 (H, W, C) in [0, 1], C = 1, 3 or 4. Raises UserError naming the file."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.is_file():
        raise UserError(f"image not found: {path}")
    try:
        img = np.asarray(iio.imread(path))
    except Exception as e:  # imageio raises many types for corrupt or unknown files
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"cannot read image {path}: {type(e).__name__}: {first}") from None
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[-1] not in (1, 2, 3, 4):
        raise UserError(f"unsupported image layout {img.shape} in {path}")
    scale = float(np.iinfo(img.dtype).max) if np.issubdtype(img.dtype, np.integer) else 1.0
    img = img.astype(np.float32) / scale
    if img.shape[-1] == 2:  # gray + alpha
        img = np.concatenate([img[..., :1].repeat(3, -1), img[..., 1:]], -1)
    return img


def to_uint8(img: Tensor | np.ndarray) -> np.ndarray:
    """A float image (H, W) or (H, W, C) in [0, 1] as uint8 (H, W, C) with C in {1→3, 3, 4}."""
    if isinstance(img, Tensor):
        img = img.detach().to("cpu", torch.float32).numpy()
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = img.repeat(3, -1)
    return (np.clip(np.nan_to_num(img), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_png(path: str | os.PathLike, img: Tensor | np.ndarray) -> None:
    """Write a float image in [0, 1] as an 8-bit PNG (imageio cannot write float PNGs)."""
    import imageio.v3 as iio

    iio.imwrite(Path(path), to_uint8(img))


def _vec(view: dict, key: str, n: int, where: str) -> list[float]:
    v = view.get(key)
    arr = np.asarray(v, dtype=np.float64) if v is not None else None
    if arr is None or arr.size != n or not np.all(np.isfinite(arr)):
        raise UserError(f"{where}: field '{key}' must be {n} finite numbers, got {v!r}")
    return arr.reshape(-1).tolist()


def _num(view: dict, key: str, where: str) -> float:
    v = view.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        raise UserError(f"{where}: field '{key}' must be a number, got {v!r}")
    return float(v)


def load_cameras_json(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None) -> tuple[object, list[Path], Path | None]:
    """Parse ``cameras.json`` into (Camera of N views, image paths, starting-mesh path or None).

    Paths in the file are relative to the file's folder. Raises UserError naming the file and field.
    """
    from diffrender.camera import Camera, look_at

    path = Path(path)
    if not path.is_file():
        raise UserError(f"cameras file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse {path}: {e}") from None
    views = data.get("views") if isinstance(data, dict) else None
    if not isinstance(views, list) or not views:
        raise UserError(f"{path}: expected an object with a non-empty list 'views'")
    Rs, ts, focal, principal, files, sizes = [], [], [], [], [], set()
    for i, view in enumerate(views):
        where = f"{path}: views[{i}]"
        if not isinstance(view, dict) or not isinstance(view.get("file"), str):
            raise UserError(f"{where}: needs a string field 'file'")
        w, h = view.get("width"), view.get("height")
        if not (isinstance(w, int) and isinstance(h, int) and w > 0 and h > 0):
            raise UserError(f"{where}: 'width' and 'height' must be positive integers, got {w!r}, {h!r}")
        sizes.add((h, w))
        focal.append([_num(view, "fx", where), _num(view, "fy", where)])
        principal.append([_num(view, "cx", where), _num(view, "cy", where)])
        if "R" in view:
            R = torch.tensor(_vec(view, "R", 9, where), dtype=torch.float64).reshape(3, 3)
            if not torch.allclose(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-4) or torch.det(R) < 0:
                raise UserError(f"{where}: 'R' is not a rotation matrix")
            t = torch.tensor(_vec(view, "t", 3, where), dtype=torch.float64)
        elif "eye" in view:
            eye = torch.tensor(_vec(view, "eye", 3, where), dtype=torch.float64)
            at = _vec(view, "at", 3, where) if "at" in view else [0.0, 0.0, 0.0]
            at = torch.tensor(at, dtype=torch.float64)
            up = _vec(view, "up", 3, where) if "up" in view else [0.0, 1.0, 0.0]
            R, t = look_at(eye[None], at, up)
            R, t = R[0], t[0]
        else:
            raise UserError(f"{where}: needs either 'R' and 't' or 'eye' (and optional 'at', 'up')")
        Rs.append(R)
        ts.append(t)
        files.append(path.parent / view["file"])
    if len(sizes) != 1:
        raise UserError(f"{path}: all views must share one image size, got {sorted(sizes)}")
    (h, w), = sizes
    kw = dict(dtype=dtype, device=device)
    camera = Camera(torch.stack(Rs).to(**kw), torch.stack(ts).to(**kw), torch.tensor(focal, **kw),
                    torch.tensor(principal, **kw), height=h, width=w)
    mesh = data.get("mesh")
    if mesh is not None and not isinstance(mesh, str):
        raise UserError(f"{path}: 'mesh' must be a path string, got {mesh!r}")
    return camera, files, (path.parent / mesh) if mesh else None


def load_image_set(cameras_json: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> ImageSet:
    """Read the cameras and every image they name; check sizes. Alpha is kept when any image has it."""
    camera, files, mesh = load_cameras_json(cameras_json, dtype=dtype, device=device)
    rgbs, alphas = [], []
    for f in files:
        img = read_image(f)
        if img.shape[:2] != (camera.height, camera.width):
            raise UserError(f"image {f} is {img.shape[1]}x{img.shape[0]} (WxH) but {cameras_json} says "
                            f"{camera.width}x{camera.height}")
        rgb = img[..., :3] if img.shape[-1] >= 3 else img[..., :1].repeat(3, -1)
        rgbs.append(rgb)
        alphas.append(img[..., 3] if img.shape[-1] == 4 else None)
    has_alpha = any(a is not None for a in alphas)
    alpha = None
    if has_alpha:
        alpha = torch.tensor(np.stack([a if a is not None else np.ones(rgbs[0].shape[:2], np.float32)
                                       for a in alphas]), dtype=dtype, device=device)
    rgb = torch.tensor(np.stack(rgbs), dtype=dtype, device=device)
    return ImageSet(rgb=rgb, alpha=alpha, camera=camera, files=files, mesh=mesh)
