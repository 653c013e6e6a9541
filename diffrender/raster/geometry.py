"""Screen-space triangle geometry shared by pair finding and soft coverage.

Everything that depends only on the triangle is computed once per (view, face) and packed in one
contiguous (N*F, 19) table; each (face, pixel) pair gathers its row with a single ``index_select``
(gathers and their backward scatters dominate the cost, so one wide gather beats several narrow
ones) and evaluates edge functions and distances with a few elementwise ops on (P, 3) tensors.

Edge k is the edge opposite vertex k: it starts at s_k = v_{k+1} with direction e_k = v_{k+2} - v_{k+1}.
Then the edge function E_k(p) = cross(e_k, p - s_k) is 2·area·l_k, l_k the barycentric weight of
vertex k, so barycentrics need no reordering.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Triangles:
    """Screen-space triangles, one row per (view, face) or per pair.

    sx, sy: (·, 3) start of edge k (= vertex k+1); ex, ey: (·, 3) edge vectors; inv_len2: (·, 3)
    1/|e_k|² (no gradient: see ``distance2``); z: (·, 3) depth of vertex k; inv_area: (·, 1) 1/(2·signed area).
    """

    sx: Tensor
    sy: Tensor
    ex: Tensor
    ey: Tensor
    inv_len2: Tensor
    z: Tensor | None
    inv_area: Tensor

    @classmethod
    def gather(cls, table: Tensor, index: Tensor, with_depth: bool = True) -> Triangles:
        """The rows ``index`` (P,) of a (·, 19) table from ``face_table``.

        Columns that need no derivative are gathered detached, and depth and area only when asked
        for: the backward of a gather and of the column split costs in proportion to its width.
        """
        geo = table[:, :12].index_select(0, index).split(3, dim=-1)
        inv_len2 = table[:, 12:15].detach().index_select(0, index)
        if with_depth:
            z, inv_area = table[:, 15:].index_select(0, index).split([3, 1], dim=-1)
        else:
            z, inv_area = None, table[:, 18:].detach().index_select(0, index)
        return cls(*geo, inv_len2, z, inv_area)


def face_table(xy: Tensor, z: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(view, face) constants (N*F, 19) and twice the signed screen area (N*F,).

    xy: (N, V, 2) pixel coordinates; z: (N, V) camera depths; faces: (F, 3). Degenerate edges and
    faces get finite stand-ins (their pairs are culled anyway) so that no inf or NaN reaches values or
    derivatives of other faces.
    """
    nf = xy.shape[0] * faces.shape[0]
    tri = xy[:, faces].reshape(nf, 3, 2)
    start = tri[:, [1, 2, 0]]  # s_k = v_{k+1}
    edge = tri[:, [2, 0, 1]] - start  # e_k = v_{k+2} - v_{k+1}
    len2 = (edge * edge).sum(-1)
    tiny = torch.finfo(xy.dtype).tiny ** 0.5
    inv_len2 = 1 / torch.where(len2 > tiny, len2, torch.ones_like(len2))
    # 2·area = cross(v1 - v0, v2 - v0) = cross(e_2, -e_1)
    area2 = edge[:, 1, 0] * edge[:, 2, 1] - edge[:, 1, 1] * edge[:, 2, 0]
    inv_area = 1 / torch.where(area2.abs() > tiny, area2, torch.ones_like(area2))
    table = torch.cat([start[..., 0], start[..., 1], edge[..., 0], edge[..., 1], inv_len2,
                       z[:, faces].reshape(nf, 3), inv_area.unsqueeze(-1)], dim=-1)
    return table, area2


def edge_functions(tri: Triangles, px: Tensor, py: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Edge functions E_k = cross(e_k, p - s_k) (P, 3) and offsets p - s_k (dx, dy), each (P, 3)."""
    dx = px.unsqueeze(-1) - tri.sx
    dy = py.unsqueeze(-1) - tri.sy
    return tri.ex * dy - tri.ey * dx, dx, dy


def barycentrics(edge: Tensor, tri: Triangles) -> Tensor:
    """Screen barycentrics (P, 3): l_k = E_k / (2·area)."""
    return edge * tri.inv_area


def inside(edge: Tensor, tri: Triangles) -> Tensor:
    """Whether each pixel center is inside its triangle (P,), for either winding; no gradient."""
    return ((edge.detach() * tri.inv_area.detach()) >= 0).all(-1)


def distance2(tri: Triangles, dx: Tensor, dy: Tensor) -> Tensor:
    """Squared distance (P,) from the pixel center to the triangle's boundary.

    The smallest point-to-segment distance over the three edges, |d - t e|² with d = p - s_k and the
    projection parameter t = clamp(d·e / |e|², 0, 1). t is computed without gradient: by Danskin's
    theorem the derivative of min_t |d - t e|² is the partial derivative at the optimal t (interior t
    makes ∂/∂t vanish, a clamped t is locally constant), so the result is exact in both AD modes.
    """
    ex, ey = tri.ex, tri.ey
    exd, eyd = ex.detach(), ey.detach()  # detach (not no_grad) also drops forward-mode tangents
    t = ((exd * dx.detach() + eyd * dy.detach()) * tri.inv_len2.detach()).clamp_(0, 1)
    rx = dx - t * ex
    ry = dy - t * ey
    d2 = rx * rx + ry * ry
    return torch.minimum(torch.minimum(d2[:, 0], d2[:, 1]), d2[:, 2])
