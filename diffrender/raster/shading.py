"""Lights and materials: ambient, directional and point lights; Lambert diffuse, Blinn-Phong specular.

Shading is evaluated per (face, pixel) pair from interpolated world positions and normals, before
the soft blend, as PyTorch3D's Phong shader does per fragment.
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
    return v * torch.rsqrt((v * v).sum(-1, keepdim=True) + eps)


def shade(albedo: Tensor, points: Tensor, normals: Tensor, eye: Tensor, lights: Lights,
          material: Material) -> Tensor:
    """Shaded color (P, 3) of surface points.

    albedo: (P, 3) diffuse color; points: (P, 3) world positions; normals: (P, 3) (normalized here);
    eye: (P, 3) camera center of each point's view. Color = albedo * (ambient + Σ diffuse) + Σ specular,
    diffuse = c_l max(0, n·l), specular = k_s c_l max(0, n·h)^s with h = normalize(l + v)
    (Blinn 1977).
    """
    n = _normalize(normals)
    v = _normalize(eye - points)
    light_dirs = []
    light_colors = []
    if lights.directional_dirs.shape[0]:
        d = _normalize(-lights.directional_dirs)  # toward the light
        light_dirs.append(d.unsqueeze(0).expand(points.shape[0], -1, -1))
        light_colors.append(lights.directional_colors)
    if lights.point_positions.shape[0]:
        light_dirs.append(_normalize(lights.point_positions.unsqueeze(0) - points.unsqueeze(1)))
        light_colors.append(lights.point_colors)
    diffuse = lights.ambient.expand_as(albedo)
    if not light_dirs:
        return albedo * diffuse
    l_dir = torch.cat(light_dirs, dim=1)  # (P, L, 3)
    l_col = torch.cat(light_colors, dim=0)  # (L, 3)
    cos = (n.unsqueeze(1) * l_dir).sum(-1).clamp(min=0)  # (P, L)
    color = albedo * (diffuse + cos @ l_col)
    if material.specular > 0:
        h = _normalize(l_dir + v.unsqueeze(1))
        spec = (n.unsqueeze(1) * h).sum(-1).clamp(min=0) ** material.shininess
        color = color + material.specular * (spec @ l_col)
    return color
