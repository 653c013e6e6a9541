"""Back-face culling, and when it is safe to cull automatically.

Culling drops faces wound clockwise on screen (seen from their back). For a closed mesh whose faces
are consistently wound with outward normals, seen from outside, back faces are always hidden behind
front faces, so culling leaves the hard silhouette unchanged and halves the pairs; only the soft halo of
back faces along the contour is lost. "auto" culls exactly then: closed and consistently wound (a
topology check, cached per faces tensor), outward (positive signed volume) and every camera center
outside the mesh (generalized winding number; Jacobson et al. 2013).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor

from ..camera import Camera
from ..mesh import is_closed_and_consistently_wound

_closed: dict[int, tuple[weakref.ref, int, bool]] = {}


def closed_and_consistent(faces: Tensor) -> bool:
    """``mesh.is_closed_and_consistently_wound(faces)``, remembered per faces tensor (until it is modified)."""
    hit = _closed.get(id(faces))
    if hit is not None and hit[0]() is faces and hit[1] == faces._version:
        return hit[2]
    result = is_closed_and_consistently_wound(faces)
    for key in [k for k, v in _closed.items() if v[0]() is None]:
        del _closed[key]
    _closed[id(faces)] = (weakref.ref(faces), faces._version, result)
    return result


def signed_volume(verts: Tensor, faces: Tensor) -> Tensor:
    """Signed volume of a closed mesh (positive when faces are wound counter-clockwise seen from outside)."""
    v0, v1, v2 = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    return (v0 * torch.linalg.cross(v1, v2, dim=-1)).sum() / 6


def winding_number(verts: Tensor, faces: Tensor, points: Tensor) -> Tensor:
    """Generalized winding number (P,) of a closed mesh around points (P, 3): 1 inside, 0 outside.

    Sum of the solid angles of the faces seen from each point (Van Oosterom and Strackee 1983) over 4π.
    """
    tri = verts[faces.long()]  # (F, 3, 3)
    a, b, c = (tri[None, :, k] - points[:, None] for k in range(3))  # (P, F, 3)
    la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
    det = (a * torch.linalg.cross(b, c, dim=-1)).sum(-1)
    den = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
    return 2 * torch.atan2(det, den).sum(-1) / (4 * math.pi)


@torch.no_grad()
def should_cull(setting: bool | str, verts: Tensor, faces: Tensor, camera: Camera) -> bool:
    """Resolve a ``cull_backfaces`` setting (True, False or "auto") for this mesh and these cameras."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise ValueError(f"cull_backfaces must be True, False or 'auto', got {setting!r}")
    if not closed_and_consistent(faces):
        return False
    verts = verts.detach()
    if not bool(signed_volume(verts, faces) > 0):
        return False  # inside out: its "front" faces are the inner ones
    eyes = camera.centers.detach().to(verts.dtype)
    lo, hi = verts.amin(0), verts.amax(0)
    near_box = ((eyes >= lo) & (eyes <= hi)).all(-1)  # cameras outside the bounding box are outside the mesh
    if bool(near_box.any()) and bool((winding_number(verts, faces, eyes[near_box]).abs() > 0.5).any()):
        return False
    return True
