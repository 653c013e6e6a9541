"""Perspective pinhole cameras, batched over views.

Conventions (OpenCV): the camera looks along +z, image x points right and y points down.
World to camera is ``x_cam = R @ x_world + t``. Pixel (row i, column j) has its center at
``(x, y) = (j + 0.5, i + 0.5)`` in pixel units, so the image spans ``[0, W] x [0, H]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from kornia.geometry.conversions import axis_angle_to_rotation_matrix
from torch import Tensor

from diffrender.errors import UserError
from diffrender.mesh import _is_transformed


@dataclass
class Camera:
    """A batch of N pinhole views sharing one image size.

    R: (N, 3, 3) world-to-camera rotation; t: (N, 3) translation; focal: (N, 2) fx, fy in pixels;
    principal: (N, 2) cx, cy in pixels. near/far bound the depth range used for clipping and blending.
    """

    R: Tensor
    t: Tensor
    focal: Tensor
    principal: Tensor
    height: int
    width: int
    near: float = 0.01
    far: float = 100.0

    def __post_init__(self) -> None:
        n = self.R.shape[0] if self.R.dim() == 3 else -1
        for name, value, shape in (
            ("R", self.R, (n, 3, 3)),
            ("t", self.t, (n, 3)),
            ("focal", self.focal, (n, 2)),
            ("principal", self.principal, (n, 2)),
        ):
            if tuple(value.shape) != shape or n < 1:
                raise ValueError(f"Camera.{name}: expected shape {shape}, got {tuple(value.shape)}")
        if int(self.height) < 1 or int(self.width) < 1:
            raise ValueError(f"Camera image size must be positive, got height={self.height}, width={self.width}")
        if not 0 < self.near < self.far:
            raise ValueError(f"Camera needs 0 < near < far, got near={self.near}, far={self.far}")
        f = self.focal.detach()
        if not _is_transformed(f) and not bool((torch.isfinite(f) & (f > 0)).all()):
            bad = int((~(torch.isfinite(f) & (f > 0))).any(dim=1).nonzero()[0, 0])
            raise UserError(f"camera view {bad}: focal lengths fx, fy must be finite and positive, "
                            f"got {f[bad].tolist()}")

    @property
    def num_views(self) -> int:
        return self.R.shape[0]

    @property
    def centers(self) -> Tensor:
        """Camera centers in world coordinates, (N, 3): ``-Rᵀ t``."""
        return -(self.R.transpose(-1, -2) @ self.t.unsqueeze(-1)).squeeze(-1)

    def to_camera(self, points: Tensor) -> Tensor:
        """World points (P, 3) or (N, P, 3) to camera coordinates (N, P, 3)."""
        return points @ self.R.transpose(-1, -2) + self.t.unsqueeze(-2)

    def project(self, points: Tensor) -> tuple[Tensor, Tensor]:
        """Project world points (P, 3) to pixel coordinates (N, P, 2) and camera depth z (N, P).

        Points at or behind the near plane get a clamped depth for the division so that values and
        derivatives stay finite; the rasterizer discards faces touching them.
        """
        pc = self.to_camera(points)
        z = pc[..., 2]
        z_safe = torch.where(z > self.near, z, torch.full_like(z, self.near))
        xy = pc[..., :2] / z_safe.unsqueeze(-1) * self.focal.unsqueeze(-2) + self.principal.unsqueeze(-2)
        return xy, z

    def backproject(self, depth: Tensor) -> Tensor:
        """World points (N, H, W, 3) at camera depth ``depth: (N, H, W)`` along each pixel center's ray."""
        pixel = torch.arange(depth.numel(), device=depth.device)
        return self.backproject_pixels(pixel, depth.reshape(-1)).reshape(*depth.shape, 3)

    def backproject_pixels(self, pixel: Tensor, depth: Tensor) -> Tensor:
        """World points (K, 3) at camera depth ``depth: (K,)`` on the rays through the flat pixel indices
        ``pixel: (K,)`` (view-major, as ``N*H*W`` images are flattened)."""
        hw = self.height * self.width
        view = torch.div(pixel, hw, rounding_mode="floor")
        rest = pixel - view * hw
        row = torch.div(rest, self.width, rounding_mode="floor")
        xy = torch.stack([rest - row * self.width, row], -1).to(depth.dtype) + 0.5
        uv = (xy - self.principal.index_select(0, view)) / self.focal.index_select(0, view)
        cam = torch.cat([uv, torch.ones_like(uv[:, :1])], -1) * depth.unsqueeze(-1)
        # x_world = Rᵀ (x_cam - t), written as a row-vector product per point
        return ((cam - self.t.index_select(0, view)).unsqueeze(-2) @ self.R.index_select(0, view)).squeeze(-2)

    def select(self, index: Tensor | Sequence[int] | slice) -> Camera:
        """A camera holding a subset of the views."""
        if not isinstance(index, slice):
            index = torch.as_tensor(index, device=self.R.device, dtype=torch.long)
        return replace(self, R=self.R[index], t=self.t[index], focal=self.focal[index],
                       principal=self.principal[index])

    def scaled(self, factor: float) -> Camera:
        """The same views at an image size scaled by ``factor`` (for coarse-to-fine fitting)."""
        return with_size(self, max(1, round(self.height * factor)), max(1, round(self.width * factor)))


def _safe_normalize(v: Tensor, eps: float = 1e-12) -> Tensor:
    return v * torch.rsqrt((v * v).sum(-1, keepdim=True) + eps)


def look_at(eye: Tensor, at: Tensor, up: Sequence[float] | Tensor = (0.0, 1.0, 0.0)) -> tuple[Tensor, Tensor]:
    """World-to-camera (R, t) for cameras at ``eye`` (N, 3) looking at ``at`` (N, 3) or (3,).

    ``up`` is the world direction that appears upward in the image (image y points down). Differentiable
    in ``eye`` and ``at`` in both AD modes. Raises UserError for a non-finite eye, ``eye == at`` or a view
    direction along ``up``, where R would be zero or rank 1 and the view black (checked on plain tensors;
    skipped inside torch.func transforms, where values cannot steer control flow).
    """
    eye = torch.atleast_2d(eye)
    at = torch.as_tensor(at, dtype=eye.dtype, device=eye.device).expand_as(eye)
    up_t = torch.as_tensor(up, dtype=eye.dtype, device=eye.device).expand_as(eye)
    if not _is_transformed(eye):
        _check_look_at(eye.detach(), at.detach(), up_t.detach())
    z = _safe_normalize(at - eye)
    x = _safe_normalize(torch.linalg.cross(z, up_t))
    y = torch.linalg.cross(z, x)  # = component of -up orthogonal to z: image y points down
    R = torch.stack([x, y, z], dim=-2)
    t = -(R @ eye.unsqueeze(-1)).squeeze(-1)
    return R, t


def _check_look_at(eye: Tensor, at: Tensor, up: Tensor) -> None:
    d = at - eye
    dist = d.norm(dim=-1)
    # sin of the angle between the view direction and up; 0 when looking straight along up
    sin = torch.linalg.cross(d, up).norm(dim=-1) / (dist * up.norm(dim=-1)).clamp_min(1e-30)
    finite = torch.isfinite(eye).all(-1) & torch.isfinite(at).all(-1) & torch.isfinite(up).all(-1)
    ok = finite & (dist > 0) & (sin > 1e-6)
    if bool(ok.all()):
        return
    i = int((~ok).nonzero()[0, 0])
    where = f"look_at (view {i}): eye {eye[i].tolist()}, at {at[i].tolist()}, up {up[i].tolist()}"
    if not finite[i]:
        raise UserError(f"{where}: values must be finite")
    if dist[i] == 0:
        raise UserError(f"{where}: eye equals at, the view direction is undefined")
    raise UserError(f"{where}: the view direction is parallel to up, so the camera's roll is undefined; "
                    "choose another up or move the eye")


def pose_to_extrinsics(axis_angle: Tensor, translation: Tensor) -> tuple[Tensor, Tensor]:
    """(R, t) from an axis-angle rotation (N, 3) and a translation (N, 3); world-to-camera.

    Uses kornia's Rodrigues conversion (forward-mode safe) composed with a plain translation, not
    kornia's ``Se3``, whose translation tangents vanish under forward-mode AD.
    """
    return axis_angle_to_rotation_matrix(torch.atleast_2d(axis_angle)), torch.atleast_2d(translation)


def intrinsics_from_fov(fov_deg: float, height: int, width: int, n: int = 1, *,
                        dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Focal lengths (n, 2) and principal points (n, 2) for a field of view across the shorter side."""
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    f = 0.5 * min(height, width) / math.tan(math.radians(fov_deg) / 2)
    focal = torch.full((n, 2), f, dtype=dtype, device=device)
    principal = torch.tensor([width / 2, height / 2], dtype=dtype, device=device).expand(n, 2).clone()
    return focal, principal


def camera_from_look_at(eye: Tensor, at: Tensor | Sequence[float] = (0.0, 0.0, 0.0), *,
                        fov_deg: float = 60.0, height: int, width: int,
                        up: Sequence[float] = (0.0, 1.0, 0.0), near: float = 0.01,
                        far: float = 100.0) -> Camera:
    """Cameras at ``eye`` (N, 3) looking at ``at`` with a given field of view."""
    eye = torch.atleast_2d(eye)
    if not torch.is_floating_point(eye):
        raise ValueError(f"eye must be a floating tensor, got dtype {eye.dtype}")
    R, t = look_at(eye, torch.as_tensor(at, dtype=eye.dtype, device=eye.device), up)
    focal, principal = intrinsics_from_fov(fov_deg, height, width, eye.shape[0], dtype=eye.dtype,
                                           device=eye.device)
    return Camera(R, t, focal, principal, height, width, near, far)


def orbit_eyes(n: int, distance: float, elevation_deg: float | Sequence[float] = 0.0,
               azimuth_start_deg: float = 0.0, *, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> Tensor:
    """(n, 3) camera positions on a ring around the origin (y up), azimuths evenly spaced.

    Spherical convention of PyTorch3D: ``(d cos e sin a, d sin e, d cos e cos a)``. A sequence of
    elevations is cycled through, which spreads views over several rings.
    """
    az = torch.deg2rad(azimuth_start_deg + torch.arange(n, dtype=torch.float64) * (360.0 / n))
    elev = torch.as_tensor(elevation_deg, dtype=torch.float64).reshape(-1)
    el = torch.deg2rad(elev[torch.arange(n) % elev.numel()])
    eyes = distance * torch.stack([el.cos() * az.sin(), el.sin(), el.cos() * az.cos()], dim=-1)
    return eyes.to(dtype=dtype or torch.get_default_dtype(), device=device)


# ---------------------------------------------------------------------------------------------------
# Dataset conventions and pose parameterizations (camera unknowns)


def focal_from_fov(fov_deg: float, size: float) -> float:
    """Focal length in pixels for a full field of view ``fov_deg`` across ``size`` pixels."""
    if not 0.0 < fov_deg < 180.0:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    return 0.5 * size / math.tan(math.radians(fov_deg) / 2)


# OpenGL / Blender cameras look along -z with y up; OpenCV along +z with y down: flip the y and z axes.
_GL_TO_CV = (1.0, -1.0, -1.0)


def opengl_to_opencv(c2w: Tensor) -> tuple[Tensor, Tensor]:
    """World-to-camera (R (N, 3, 3), t (N, 3)) in OpenCV axes from camera-to-world matrices ``c2w``
    (N, 3, 4) or (N, 4, 4) in OpenGL axes (NeRF / Blender ``transform_matrix``)."""
    c2w = c2w[..., :3, :4]
    rot_cv = c2w[..., :3, :3] * c2w.new_tensor(_GL_TO_CV)  # scales the columns: camera axes in the world
    R = rot_cv.transpose(-1, -2)
    t = -(R @ c2w[..., :3, 3:]).squeeze(-1)
    return R, t


def opencv_to_opengl(R: Tensor, t: Tensor) -> Tensor:
    """Camera-to-world (N, 4, 4) in OpenGL axes from OpenCV world-to-camera ``R`` (N, 3, 3), ``t`` (N, 3);
    the inverse of :func:`opengl_to_opencv`."""
    rot = R.transpose(-1, -2)
    center = -(rot @ t.unsqueeze(-1))
    top = torch.cat([rot * R.new_tensor(_GL_TO_CV), center], -1)
    bottom = R.new_tensor([0.0, 0.0, 0.0, 1.0]).expand(*R.shape[:-2], 1, 4)
    return torch.cat([top, bottom], -2)


def compose_extrinsics(R_a: Tensor, t_a: Tensor, R_b: Tensor, t_b: Tensor) -> tuple[Tensor, Tensor]:
    """The transform ``x -> R_a (R_b x + t_b) + t_a`` as (R, t); shapes broadcast ((..., 3, 3), (..., 3))."""
    return R_a @ R_b, (R_a @ t_b.unsqueeze(-1)).squeeze(-1) + t_a


def relative_to_first(R: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """Each view's pose relative to view 0 (a rig): (R_rel, t_rel) with ``view_i = rel_i ∘ view_0``;
    R: (N, 3, 3), t: (N, 3)."""
    R_rel = R @ R[0].transpose(-1, -2)
    return R_rel, t - (R_rel @ t[0].unsqueeze(-1)).squeeze(-1)


def with_size(camera: Camera, height: int, width: int) -> Camera:
    """The same views resampled to ``height x width`` pixels (image pyramids): focal lengths and principal
    points scale with the image, so a point lands on the same fraction of the image."""
    s = camera.focal.new_tensor([width / camera.width, height / camera.height])
    return replace(camera, focal=camera.focal * s, principal=camera.principal * s, height=height, width=width)
