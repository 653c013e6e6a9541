"""Camera conventions and the derivatives of the pose parameterizations."""

import math

import pytest
import torch

from diffrender.camera import (
    Camera,
    camera_from_look_at,
    intrinsics_from_fov,
    look_at,
    orbit_eyes,
    pose_to_extrinsics,
)

D = torch.float64


def test_look_at_conventions():
    eye = torch.tensor([[1.0, 2.0, 3.0]], dtype=D)
    cam = camera_from_look_at(eye, (0.0, 0.0, 0.0), fov_deg=60, height=40, width=60)
    # R is a rotation, the camera center is the eye, the target sits on the principal point.
    assert torch.allclose(cam.R @ cam.R.transpose(-1, -2), torch.eye(3, dtype=D).expand(1, 3, 3), atol=1e-12)
    assert torch.allclose(torch.linalg.det(cam.R), torch.ones(1, dtype=D))
    assert torch.allclose(cam.centers, eye)
    xy, z = cam.project(torch.zeros(1, 3, dtype=D))
    assert torch.allclose(xy[0, 0], torch.tensor([30.0, 20.0], dtype=D))
    assert torch.allclose(z, torch.tensor([[eye.norm()]], dtype=D))  # +z looks forward
    # World up appears toward smaller image y (image y points down); right-handed x to the right.
    up = torch.tensor([[0.0, 0.1, 0.0]], dtype=D)
    assert cam.project(up)[0][0, 0, 1] < 20.0
    right = torch.linalg.cross(eye[0] * -1, torch.tensor([0.0, 1.0, 0.0], dtype=D))  # forward x up
    assert cam.project(0.1 * right.unsqueeze(0))[0][0, 0, 0] > 30.0


def test_projection_matches_pinhole_formula():
    torch.manual_seed(0)
    R, t = pose_to_extrinsics(torch.randn(2, 3, dtype=D), torch.tensor([[0.1, 0.2, 5.0], [0.0, 0.0, 4.0]], dtype=D))
    focal = torch.tensor([[50.0, 55.0], [40.0, 40.0]], dtype=D)
    principal = torch.tensor([[31.0, 22.0], [30.0, 20.0]], dtype=D)
    cam = Camera(R, t, focal, principal, 40, 60)
    p = torch.randn(5, 3, dtype=D)
    xy, z = cam.project(p)
    for n in range(2):
        K = torch.tensor([[focal[n, 0], 0, principal[n, 0]], [0, focal[n, 1], principal[n, 1]], [0, 0, 1]], dtype=D)
        h = (K @ (R[n] @ p.T + t[n, :, None])).T
        assert torch.allclose(xy[n], h[:, :2] / h[:, 2:], atol=1e-10)
        assert torch.allclose(z[n], h[:, 2], atol=1e-12)


def test_pose_rotation_matches_rodrigues_and_derivatives():
    torch.manual_seed(1)
    aa = torch.randn(3, 3, dtype=D)
    R, _ = pose_to_extrinsics(aa, torch.zeros(3, 3, dtype=D))
    theta = aa.norm(dim=-1, keepdim=True)
    k = aa / theta
    Kx = torch.zeros(3, 3, 3, dtype=D)
    Kx[:, 0, 1], Kx[:, 0, 2], Kx[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    Kx = Kx - Kx.transpose(-1, -2)
    ref = torch.eye(3, dtype=D) + theta.sin()[..., None] * Kx + (1 - theta.cos())[..., None] * Kx @ Kx
    assert torch.allclose(R, ref, atol=1e-12)
    tr = torch.randn(3, 3, dtype=D)
    assert torch.autograd.gradcheck(pose_to_extrinsics, (aa.requires_grad_(), tr.requires_grad_()),
                                    check_forward_ad=True)
    # Forward mode through the translation must not vanish (kornia's Se3 trap).
    _, (dR, dt) = torch.func.jvp(pose_to_extrinsics, (aa.detach(), tr.detach()),
                                 (torch.zeros_like(aa), torch.ones_like(tr)))
    assert torch.equal(dt, torch.ones_like(tr)) and torch.count_nonzero(dR) == 0


def test_look_at_derivatives_match_finite_differences():
    eye = torch.tensor([[0.5, 2.0, 3.0], [1.0, -1.0, 2.0]], dtype=D, requires_grad=True)
    at = torch.tensor([0.1, 0.2, -0.3], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(look_at, (eye, at), check_forward_ad=True)


def test_intrinsics_and_orbit():
    focal, principal = intrinsics_from_fov(90.0, 30, 50, 2, dtype=D)
    assert torch.allclose(focal, torch.full((2, 2), 15.0, dtype=D))
    assert torch.allclose(principal, torch.tensor([[25.0, 15.0]] * 2, dtype=D))
    eyes = orbit_eyes(8, 2.5, 30.0, dtype=D)
    assert torch.allclose(eyes.norm(dim=-1), torch.full((8,), 2.5, dtype=D))
    assert torch.allclose(eyes[:, 1], torch.full((8,), 2.5 * math.sin(math.radians(30)), dtype=D))


def test_scaled_camera_keeps_normalized_projection():
    cam = camera_from_look_at(torch.tensor([[0.0, 1.0, 3.0]], dtype=D), fov_deg=50, height=64, width=96)
    half = cam.scaled(0.5)
    p = torch.randn(6, 3, dtype=D) * 0.3
    assert (half.height, half.width) == (32, 48)
    assert torch.allclose(cam.project(p)[0] / 2, half.project(p)[0], atol=1e-12)


@pytest.mark.parametrize("field,value", [("R", torch.eye(3)), ("t", torch.zeros(1, 2)),
                                         ("focal", torch.ones(1, 3)), ("principal", torch.ones(2, 2))])
def test_bad_camera_shapes(field, value):
    args = dict(R=torch.eye(3)[None], t=torch.zeros(1, 3), focal=torch.ones(1, 2), principal=torch.ones(1, 2))
    args[field] = value
    with pytest.raises(ValueError, match=f"Camera.{field}"):
        Camera(**args, height=4, width=4)


def test_bad_camera_values():
    with pytest.raises(ValueError, match="near"):
        Camera(torch.eye(3)[None], torch.zeros(1, 3), torch.ones(1, 2), torch.ones(1, 2), 4, 4, near=1.0, far=0.5)
    with pytest.raises(ValueError, match="fov"):
        intrinsics_from_fov(180.0, 4, 4)


def test_backproject_inverts_project():
    torch.manual_seed(2)
    cam = camera_from_look_at(torch.tensor([[0.5, 1.0, 3.0], [-2.0, 0.5, 1.0]], dtype=D), fov_deg=50,
                              height=5, width=7)
    depth = torch.rand(2, 5, 7, dtype=D) + 1
    pts = cam.backproject(depth)
    for n in range(2):
        xy, z = cam.select([n]).project(pts[n].reshape(-1, 3))
        ys, xs = torch.meshgrid(torch.arange(5, dtype=D) + 0.5, torch.arange(7, dtype=D) + 0.5, indexing="ij")
        assert torch.allclose(xy[0], torch.stack([xs, ys], -1).reshape(-1, 2), atol=1e-10)
        assert torch.allclose(z[0], depth[n].reshape(-1), atol=1e-12)
