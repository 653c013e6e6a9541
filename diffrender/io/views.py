"""What every camera-file reader returns, and the field checks they share.

A reader turns one dataset format into :class:`Views`: one batched ``Camera`` (OpenCV conventions, README
"Rendering") plus the image files, the mask files the camera file names, and a starting mesh if it names
one. Bad input raises ``UserError`` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffrender.camera import Camera
from diffrender.errors import UserError

# Every reader checks these: a non-zero value means the images need undistorting first.
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "k5", "k6", "p1", "p2")


@dataclass
class Views:
    """A dataset's cameras and files.

    camera: N views sharing one image size; images: N image paths; masks: N mask paths named by the camera
    file, or None; mesh: a starting mesh named by the camera file, or None; source: the camera file (or
    COLMAP model folder); root: the folder that relative paths (and mask patterns) start from.
    """

    camera: Camera
    images: list[Path]
    masks: list[Path] | None
    mesh: Path | None
    source: Path
    root: Path
    format: str


def read_json(path: Path) -> Any:
    """Parsed JSON of ``path``; UserError naming the file when it is missing or malformed."""
    if not path.is_file():
        raise UserError(f"cameras file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"cannot parse {path}: {e}") from None


def entries(path: Path, key: str) -> tuple[dict, list]:
    """(the parsed camera file, its non-empty list ``key``) or UserError naming the file."""
    data = read_json(path)
    items = data.get(key) if isinstance(data, dict) else None
    if not isinstance(items, list) or not items:
        raise UserError(f"{path}: expected an object with a non-empty list '{key}'")
    return data, items


def path_field(obj: dict, key: str, where: str) -> str | None:
    """``obj[key]`` when it is a path string, None when absent; UserError otherwise."""
    v = obj.get(key)
    if v is not None and not isinstance(v, str):
        raise UserError(f"{where}: '{key}' must be a path string, got {v!r}")
    return v


def all_or_none(paths: list[Path | None], where: str, key: str) -> list[Path] | None:
    """Per-view optional files: every view names one (the list) or none does (None)."""
    if all(p is None for p in paths):
        return None
    if any(p is None for p in paths):
        raise UserError(f"{where}: either every view names a '{key}' or none does")
    return paths


def number(obj: dict, key: str, where: str, default: float | None = None) -> float:
    """``obj[key]`` as a finite float (``default`` when absent and a default is given)."""
    v = obj.get(key)
    if v is None and default is not None:
        return float(default)
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
        raise UserError(f"{where}: field '{key}' must be a finite number, got {v!r}")
    return float(v)


def numbers(obj: dict, key: str, n: int, where: str) -> np.ndarray:
    """``obj[key]`` as ``n`` finite float64 numbers (any nesting, e.g. a 3x3 list), flattened."""
    v = obj.get(key)
    try:
        arr = np.asarray(v, dtype=np.float64).reshape(-1) if v is not None else None
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.size != n or not np.all(np.isfinite(arr)):
        raise UserError(f"{where}: field '{key}' must be {n} finite numbers, got {v!r}")
    return arr


def check_rotation(R: np.ndarray, where: str, field: str) -> None:
    """UserError unless ``R`` (3, 3) is a rotation (orthonormal to 1e-4, determinant +1)."""
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        raise UserError(f"{where}: '{field}' is not a rotation matrix")


def refuse_distortion(coeffs: dict[str, float], where: str) -> None:
    """One-line UserError when any distortion coefficient is non-zero: undistortion is not ours."""
    bad = {k: v for k, v in coeffs.items() if v != 0}
    if bad:
        listed = ", ".join(f"{k}={v:g}" for k, v in bad.items())
        raise UserError(f"{where}: non-zero lens distortion ({listed}); diffrender fits pinhole cameras and does "
                        "not undistort: undistort the images first (e.g. COLMAP image_undistorter)")


def make_camera(Rs: list, ts: list, focal: list, principal: list, sizes: list[tuple[int, int]], where: str, *,
                dtype: torch.dtype, device: torch.device | str | None) -> Camera:
    """One Camera from per-view lists (float64 numbers); all views must share one image size (H, W)."""
    if len(set(sizes)) != 1:
        raise UserError(f"{where}: all views must share one image size, got {sorted(set(sizes))} (HxW)")
    (h, w), = set(sizes)
    kw = dict(dtype=dtype, device=device)
    return Camera(torch.tensor(np.stack(Rs), **kw), torch.tensor(np.stack(ts), **kw),
                  torch.tensor(np.asarray(focal), **kw), torch.tensor(np.asarray(principal), **kw),
                  height=h, width=w)
