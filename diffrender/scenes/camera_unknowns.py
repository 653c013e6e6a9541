"""Cameras as unknowns of the ``images`` scene: a shared pose of the whole rig, and per-view corrections.

The views of a dataset keep their relative placement (a rig: ``view_i = rel_i ∘ view_0``) while view 0 is
free in one of two parameterizations:

* ``camera_eye``: view 0 looks from ``camera_eye`` (3,) at a fixed point ``at`` with ``up`` upward (the
  PyTorch3D tutorial's unknown; ``look_at`` is differentiable in both AD modes);
* ``camera_pose``: view 0's world-to-camera rotation ``camera_axis_angle`` (3,) on SO(3) (kornia's
  Rodrigues conversion; never kornia's ``Se3``, whose translation JVP is silently zero) and its translation
  ``camera_translation`` (3,).

``view_poses`` frees every view but the first (the gauge: without it, moving all cameras together is the
same as moving the object): ``view_axis_angle`` and ``view_translation`` (N-1, 3) act in each camera's own
frame, ``x_cam ← Exp(ω_i) x_cam + τ_i``, starting at zero.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from kornia.geometry.conversions import rotation_matrix_to_axis_angle
from torch import Tensor

from diffrender.camera import Camera, compose_extrinsics, look_at, pose_to_extrinsics, relative_to_first
from diffrender.errors import UserError

CAMERA_FREE = ("camera_eye", "camera_pose", "view_poses")
Params = dict[str, Tensor]


class CameraUnknowns:
    """Maps the free camera parameters to a ``Camera`` of all views (differentiable in both AD modes).

    base: the cameras as read (N views); free: the scene's free list (only the camera entries are used);
    at, up: (3,) the look-at point and up direction of ``camera_eye``.
    """

    def __init__(self, base: Camera, free: list[str], at: Tensor, up: Tensor) -> None:
        self.base, self.at, self.up = base, at, up
        self.free = [f for f in free if f in CAMERA_FREE]
        if "camera_eye" in self.free and "camera_pose" in self.free:
            raise UserError("scene.free: camera_eye and camera_pose are two forms of the same unknown; pick one")
        if "view_poses" in self.free and base.num_views < 2:
            raise UserError("scene.free: view_poses needs at least two views (the first one is fixed)")
        self.R_rel, self.t_rel = relative_to_first(base.R, base.t)

    @property
    def shared(self) -> str | None:
        """Which shared parameterization of view 0 is free (camera_eye / camera_pose), or None."""
        return next((f for f in self.free if f != "view_poses"), None)

    def params_from_view0(self, R0: Tensor, t0: Tensor) -> Params:
        """The shared parameters that put view 0 at world-to-camera (R0 (3, 3), t0 (3,)). For camera_eye only
        the camera center counts (the orientation follows from at and up)."""
        if self.shared == "camera_eye":
            return {"camera_eye": -(R0.transpose(0, 1) @ t0)}
        if self.shared == "camera_pose":
            return {"camera_axis_angle": rotation_matrix_to_axis_angle(R0[None])[0], "camera_translation": t0.clone()}
        return {}

    def x0(self) -> Params:
        """Start values: view 0 as read; per-view corrections zero."""
        x = self.params_from_view0(self.base.R[0], self.base.t[0])
        if "view_poses" in self.free:
            z = self.base.t.new_zeros(self.base.num_views - 1, 3)
            x.update(view_axis_angle=z.clone(), view_translation=z.clone())
        return x

    def keys(self) -> list[str]:
        return list(self.x0())

    def manifolds(self) -> dict:
        from diffrender.manifolds import AxisAngleSO3

        return {k: AxisAngleSO3() for k in ("camera_axis_angle", "view_axis_angle") if k in self.keys()}

    def view0(self, p: Params) -> tuple[Tensor, Tensor]:
        """World-to-camera (R (3, 3), t (3,)) of view 0 at the parameters ``p``."""
        if "camera_eye" in p:
            R, t = look_at(p["camera_eye"][None], self.at, self.up)
            return R[0], t[0]
        if "camera_axis_angle" in p:
            R, t = pose_to_extrinsics(p["camera_axis_angle"][None], p["camera_translation"][None])
            return R[0], t[0]
        return self.base.R[0], self.base.t[0]

    def extrinsics(self, p: Params) -> tuple[Tensor, Tensor]:
        """(R (N, 3, 3), t (N, 3)) of all views at ``p``."""
        if self.shared is None:
            R, t = self.base.R, self.base.t
        else:
            R0, t0 = self.view0(p)
            R, t = compose_extrinsics(self.R_rel, self.t_rel, R0, t0)
        if "view_axis_angle" in p:
            dR, dt = pose_to_extrinsics(p["view_axis_angle"], p["view_translation"])
            Ri, ti = compose_extrinsics(dR, dt, R[1:], t[1:])
            R, t = torch.cat([R[:1], Ri]), torch.cat([t[:1], ti])
        return R, t

    def camera(self, p: Params, height: int | None = None, width: int | None = None) -> Camera:
        """All views at ``p``, optionally resampled to ``height x width`` (the image pyramid)."""
        from diffrender.camera import with_size

        cam = self.base if not self.free else replace(self.base, **dict(zip(("R", "t"), self.extrinsics(p),
                                                                          strict=True)))
        if height is not None and (height, width) != (cam.height, cam.width):
            cam = with_size(cam, height, width)
        return cam
