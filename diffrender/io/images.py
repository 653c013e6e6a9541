"""Image files: reading any PNG/JPEG as float, masks, and uint8 PNG writing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from diffrender.errors import UserError


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


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """A silhouette mask file as float32 (H, W) in [0, 1], 1 = object: the alpha channel of an image
    that has one (gray + alpha, RGBA), else the mean of its channels (grayscale or RGB, 8 or 16 bit)."""
    img = read_image(path)
    return img[..., 3] if img.shape[-1] == 4 else img.mean(-1)


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
