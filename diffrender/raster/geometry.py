"""Screen-space triangle geometry shared by pair finding and soft coverage.

Per (view, face) a few constants are computed once; per (face, pixel) pair the edge functions and
the squared distance to the triangle follow from them with elementwise ops on (P, 3) tensors, one
column per edge. The constants are kept as separate tensors (not one packed table) because the
backward of slicing a packed table allocates a full-size zero tensor per slice.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class FaceTable:
    """Per-(view, face) constants, each (N*F, 3) unless noted; also gathered per pair as (P, 3).

    vx, vy: vertex pixel coordinates; ex, ey: edge vectors e_k = v_{k+1} - v_k; inv_len2: 1/|e_k|²;
    z: vertex depths; inv_area: (N*F,) 1/(2·signed area).
    """

    vx: Tensor
    vy: Tensor
    ex: Tensor
    ey: Tensor
    inv_len2: Tensor
    z: Tensor
    inv_area: Tensor

    def gather(self, index: Tensor, with_depth: bool = True) -> FaceTable:
        """The rows ``index`` (P,) of every field."""
        return FaceTable(**{f.name: getattr(self, f.name).index_select(0, index)
                            if with_depth or f.name != "z" else getattr(self, f.name)
                            for f in fields(self)})


def face_table(xy: Tensor, z: Tensor, faces: Tensor) -> tuple[FaceTable, Tensor]:
    """Per-(view, face) constants and twice the signed screen area (N*F,).

    xy: (N, V, 2) pixel coordinates; z: (N, V) camera depths; faces: (F, 3). Degenerate edges and
    faces get finite stand-ins (their pairs are culled anyway) so that no inf or NaN reaches values
    or derivatives of other faces.
    """
    nf = xy.shape[0] * faces.shape[0]
    tri = xy[:, faces]  # (N, F, 3, 2)
    vx, vy = tri[..., 0].reshape(nf, 3), tri[..., 1].reshape(nf, 3)
    ex = vx.roll(-1, dims=-1) - vx
    ey = vy.roll(-1, dims=-1) - vy
    len2 = ex * ex + ey * ey
    tiny = torch.finfo(xy.dtype).tiny ** 0.5
    inv_len2 = 1 / torch.where(len2 > tiny, len2, torch.ones_like(len2))
    area2 = ex[:, 0] * ey[:, 1] - ey[:, 0] * ex[:, 1]  # cross(e0, e1) = cross(v1 - v0, v2 - v0)
    inv_area = 1 / torch.where(area2.abs() > tiny, area2, torch.ones_like(area2))
    return FaceTable(vx, vy, ex, ey, inv_len2, z[:, faces].reshape(nf, 3), inv_area), area2


def edge_functions(rows: FaceTable, px: Tensor, py: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Edge functions E_k = cross(e_k, p - v_k) (P, 3) and offsets p - v_k (dx, dy), each (P, 3)."""
    dx = px.unsqueeze(-1) - rows.vx
    dy = py.unsqueeze(-1) - rows.vy
    return rows.ex * dy - rows.ey * dx, dx, dy


def barycentrics(edge: Tensor, rows: FaceTable) -> Tensor:
    """Screen barycentrics (P, 3): the weight of the vertex opposite edge k is E_k / (2·area)."""
    return edge.roll(-1, dims=-1) * rows.inv_area.unsqueeze(-1)  # l_j = E_{j+1} / A


def inside(edge: Tensor, rows: FaceTable) -> Tensor:
    """Whether each pixel center is inside its triangle (P,), for either winding; no gradient."""
    return ((edge.detach() * rows.inv_area.detach().unsqueeze(-1)) >= 0).all(-1)


def distance2(rows: FaceTable, dx: Tensor, dy: Tensor) -> Tensor:
    """Squared distance (P,) from the pixel center to the triangle's boundary.

    The smallest point-to-segment distance over the three edges, with the projection parameter
    t = ((p - v_k)·e_k / |e_k|²) clamped to [0, 1].
    """
    ex, ey = rows.ex, rows.ey
    t = ((ex * dx + ey * dy) * rows.inv_len2).clamp(0, 1)
    rx = dx - t * ex
    ry = dy - t * ey
    d2 = rx * rx + ry * ry
    return torch.minimum(torch.minimum(d2[:, 0], d2[:, 1]), d2[:, 2])
