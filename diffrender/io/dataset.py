"""One entry point for every format: find the camera file, read the images and the masks.

Formats (README, "Your data"): ``cameras.json`` (ours), ``transforms.json`` (NeRF / Blender / instant-ngp),
a COLMAP text model. Silhouette masks come from mask files (named by the camera file, or found by a
pattern such as ``masks/{stem}.png``) or else from the images' alpha channel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffrender.camera import Camera
from diffrender.errors import UserError
from diffrender.io.cameras_json import read_cameras_json
from diffrender.io.colmap import find_model, read_colmap
from diffrender.io.images import read_image, read_mask
from diffrender.io.transforms_json import read_transforms_json
from diffrender.io.views import Views, read_json

FORMATS = ("auto", "cameras.json", "transforms.json", "colmap")


@dataclass
class ImageSet:
    """Targets and cameras read from disk.

    rgb: (N, H, W, 3) in [0, 1]; alpha: (N, H, W) the images' alpha channel, or None when no image has one;
    mask: (N, H, W) silhouettes from mask files, else the alpha channel, else None; camera: N views;
    files: image paths; mesh: a starting mesh named by the camera file, or None; format: the reader used.
    """

    rgb: Tensor
    alpha: Tensor | None
    camera: Camera
    files: list[Path]
    mesh: Path | None
    mask: Tensor | None = None
    format: str = "cameras.json"


def detect(path: Path) -> tuple[str, Path]:
    """(format, camera file or model folder) of a dataset folder or a camera file."""
    if path.is_file():
        if path.suffix == ".json":
            data = read_json(path)
            if isinstance(data, dict) and "frames" in data:
                return "transforms.json", path
            return "cameras.json", path
        if path.name in ("cameras.txt", "images.txt"):
            return "colmap", path.parent
        raise UserError(f"cannot tell the format of {path}: expected a .json camera file or a COLMAP folder")
    if not path.is_dir():
        raise UserError(f"dataset not found: {path}")
    for name, fmt in (("cameras.json", "cameras.json"), ("transforms.json", "transforms.json"),
                      ("transforms_train.json", "transforms.json")):
        if (path / name).is_file():
            return fmt, path / name
    try:
        return "colmap", find_model(path)
    except UserError:
        raise UserError(f"no camera file in {path}: expected cameras.json, transforms.json, transforms_train.json "
                        "or a COLMAP text model (cameras.txt + images.txt, or sparse/0/)") from None


def read_views(path: str | os.PathLike, *, format: str = "auto", images: str | os.PathLike | None = None,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Views:
    """The cameras and files of a dataset folder or camera file in any supported format."""
    if format not in FORMATS:
        raise UserError(f"unknown dataset format {format!r}: choose from {', '.join(FORMATS)}")
    path = Path(path)
    fmt, src = detect(path) if format == "auto" else (format, path)
    if fmt == "cameras.json":
        return read_cameras_json(src / "cameras.json" if src.is_dir() else src, dtype=dtype, device=device)
    if fmt == "transforms.json":
        return read_transforms_json(src / "transforms.json" if src.is_dir() else src, dtype=dtype, device=device)
    return read_colmap(src, images, dtype=dtype, device=device)


def mask_paths(views: Views, pattern: str) -> list[Path]:
    """Mask files by a pattern relative to the dataset root: ``{name}`` is the image's file name,
    ``{stem}`` the name without extension (e.g. ``masks/{stem}.png``, COLMAP's ``masks/{name}.png``)."""
    try:
        return [views.root / pattern.format(name=p.name, stem=p.stem) for p in views.images]
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"mask pattern {pattern!r}: use the fields {{name}} and {{stem}} only ({e})") from None


def load_dataset(path: str | os.PathLike, *, format: str = "auto", images: str | os.PathLike | None = None,
                 masks: str | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> ImageSet:
    """Read a dataset: cameras, every image, and silhouettes (mask files by ``masks`` pattern or as the camera
    file names them, else the images' alpha). Every image and mask must have the cameras' size."""
    views = read_views(path, format=format, images=images, dtype=dtype, device=device)
    cam = views.camera
    size = (cam.height, cam.width)

    def check(arr: np.ndarray, f: Path) -> np.ndarray:
        if arr.shape[:2] != size:
            raise UserError(f"image {f} is {arr.shape[1]}x{arr.shape[0]} (WxH) but {views.source} says "
                            f"{cam.width}x{cam.height}")
        return arr

    rgbs, alphas = [], []
    for f in views.images:
        img = check(read_image(f), f)
        rgbs.append(img[..., :3] if img.shape[-1] >= 3 else img[..., :1].repeat(3, -1))
        alphas.append(img[..., 3] if img.shape[-1] == 4 else None)
    kw = dict(dtype=dtype, device=device)
    alpha = None
    if any(a is not None for a in alphas):
        alpha = torch.tensor(np.stack([a if a is not None else np.ones(size, np.float32) for a in alphas]), **kw)
    files = mask_paths(views, masks) if masks else views.masks
    mask = alpha
    if files is not None:
        mask = torch.tensor(np.stack([check(read_mask(f), f) for f in files]), **kw)
    return ImageSet(rgb=torch.tensor(np.stack(rgbs), **kw), alpha=alpha, camera=cam, files=views.images,
                    mesh=views.mesh, mask=mask, format=views.format)


def load_image_set(cameras_json: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> ImageSet:
    """Read a ``cameras.json`` and every image it names (alpha kept when any image has it)."""
    return load_dataset(cameras_json, format="cameras.json", dtype=dtype, device=device)
