"""Lights and materials: ambient, directional and point lights; Lambert diffuse, Blinn-Phong specular.

Shading is evaluated per pixel from blended world positions, normals and albedo (deferred shading).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class Lights:
    """Light parameters; every field is a tensor so that it can be fitted.

    ambient: (3,) RGB; directional_dirs: (L, 3) direction the light travels (need not be unit);
    directional_colors: (L, 3); point_positions: (P, 3) world positions; point_colors: (P, 3).
    Missing kinds are empty tensors.
    """

    ambient: Tensor
    directional_dirs: Tensor
    directional_colors: Tensor
    point_positions: Tensor
    point_colors: Tensor

    def __post_init__(self) -> None:
        if tuple(self.ambient.shape) != (3,):
            raise ValueError(f"Lights.ambient: expected shape (3,), got {tuple(self.ambient.shape)}")
        for a, b in (("directional_dirs", "directional_colors"), ("point_positions", "point_colors")):
            x, y = getattr(self, a), getattr(self, b)
            if x.dim() != 2 or x.shape[-1] != 3 or x.shape != y.shape:
                raise ValueError(f"Lights.{a} and Lights.{b}: expected matching (L, 3) shapes, "
                                 f"got {tuple(x.shape)} and {tuple(y.shape)}")

    @classmethod
    def create(cls, ambient=(0.5, 0.5, 0.5), directional_dirs=(), directional_colors=(),
               point_positions=(), point_colors=(), *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Lights:
        """Build from plain numbers (sequences of 3-vectors); empty sequences mean no light of that kind."""

        def t(v) -> Tensor:
            return torch.as_tensor(v, dtype=dtype or torch.get_default_dtype(), device=device).reshape(-1, 3)

        return cls(t(ambient).reshape(3), t(directional_dirs), t(directional_colors), t(point_positions),
                   t(point_colors))

    def to(self, device=None, dtype=None) -> Lights:
        return Lights(**{f.name: getattr(self, f.name).to(device=device, dtype=dtype) for f in fields(self)})


@dataclass
class Material:
    """Blinn-Phong material: specular strength and exponent (diffuse color is the albedo)."""

    specular: float = 0.0
    shininess: float = 32.0


def _normalize(v: Tensor, eps: float = 1e-12) -> Tensor:
    # rsqrt(|v|^2 + eps) keeps values and derivatives finite for zero vectors.
    return v * torch.rsqrt(_dot(v, v) + eps)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """Dot product over the last axis (size 3), keeping it: three products beat a size-3 reduction."""
    p = a * b
    return p[..., 0:1] + p[..., 1:2] + p[..., 2:3]


def shade(albedo: Tensor, points: Tensor, normals: Tensor, eye: Tensor, lights: Lights,
          material: Material) -> Tensor:
    """Shaded color (..., 3) of surface points.

    albedo: (..., 3) diffuse color; points: (..., 3) world positions; normals: (..., 3) (normalized
    here); eye: camera centers, broadcastable to points. Color = albedo * (ambient + Σ diffuse) +
    Σ specular, with diffuse = c_l max(0, n·l) and specular = k_s c_l max(0, n·h)^s,
    h = normalize(l + v) (Blinn 1977).
    """
    n = _normalize(normals)
    v = _normalize(eye - points)
    color = albedo * lights.ambient
    directions = [(-d).expand_as(points) for d in lights.directional_dirs.unbind(0)]
    directions += [q - points for q in lights.point_positions.unbind(0)]
    light_colors = [*lights.directional_colors.unbind(0), *lights.point_colors.unbind(0)]
    for d, c in zip(directions, light_colors, strict=True):
        l_dir = _normalize(d)
        color = color + albedo * c * _dot(n, l_dir).clamp(min=0)
        if material.specular > 0:
            h = _normalize(l_dir + v)
            color = color + material.specular * c * _dot(n, h).clamp(min=0) ** material.shininess
    return color
