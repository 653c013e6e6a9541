"""Screen-space triangle geometry shared by pair finding and soft coverage.

Everything that depends only on the triangle is computed once per (view, face): one row of 19 values
(``face_rows``; the compiled kernels compute the same rows in C), stored component-major in one
(19, N*F) table for the PyTorch path (``face_table``); each (face, pixel) pair gathers its column with a
single ``index_select`` along dim 1. The gathered fields are then contiguous (3, P) blocks, so the
elementwise math runs on contiguous memory, and the backward scatter (``index_add`` along dim 1) is
several times faster than the row-major equivalent on CPU.

Edge k is the edge opposite vertex k: it starts at s_k = v_{k+1} with direction e_k = v_{k+2} - v_{k+1}.
Then the edge function E_k(p) = cross(e_k, p - s_k) is 2·area·l_k, l_k the barycentric weight of
vertex k, so barycentrics need no reordering.

Table rows: 0-2 sx, 3-5 sy, 6-8 ex, 9-11 ey, 12-14 1/|e_k|², 15-17 z_k, 18 1/(2·area).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

GEO_ROWS = 12  # sx, sy, ex, ey: the rows that carry derivatives of the coverage


@dataclass
class Triangles:
    """Screen-space triangles gathered per pair, each field (3, P) except inv_area (1, P).

    sx, sy: start of edge k (= vertex k+1); ex, ey: edge vectors; inv_len2: 1/|e_k|² (no gradient:
    see ``distance2``); z: depth of vertex k (None when not gathered); inv_area: 1/(2·signed area).
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
        """The columns ``index`` (P,) of a (19, ·) table from ``face_table``.

        Rows that need no derivative are gathered detached, and depth and area only when asked for.
        """
        geo = table[:GEO_ROWS].index_select(1, index).split(3)
        inv_len2 = table[12:15].detach().index_select(1, index)
        if with_depth:
            z, inv_area = table[15:].index_select(1, index).split([3, 1])
        else:
            z, inv_area = None, table[18:].detach().index_select(1, index)
        return cls(*geo, inv_len2, z, inv_area)


def face_table(xy: Tensor, z: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(view, face) constants (19, N*F) and twice the signed screen area (N*F,).

    The component-major layout of ``face_rows``, for gathering whole rows per pair.
    """
    rows, area2 = face_rows(xy, z, faces)
    return rows.T.contiguous(), area2


def face_rows(xy: Tensor, z: Tensor, faces: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(view, face) constants (N*F, 19), one row per view-face, and twice the signed screen area (N*F,).

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
    rows = torch.cat([start[..., 0], start[..., 1], edge[..., 0], edge[..., 1], inv_len2,
                      z[:, faces].reshape(nf, 3), inv_area.unsqueeze(-1)], dim=-1)
    return rows, area2


def edge_functions(tri: Triangles, px: Tensor, py: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Edge functions E_k = cross(e_k, p - s_k) (3, P) and offsets p - s_k (dx, dy), each (3, P)."""
    dx = px - tri.sx
    dy = py - tri.sy
    return tri.ex * dy - tri.ey * dx, dx, dy


def barycentrics(edge: Tensor, tri: Triangles) -> Tensor:
    """Screen barycentrics (3, P): l_k = E_k / (2·area)."""
    return edge * tri.inv_area


def inside(edge: Tensor, tri: Triangles) -> Tensor:
    """Whether each pixel center is inside its triangle (P,), for either winding; no gradient."""
    s = edge.detach() * tri.inv_area.detach()
    return (s[0] >= 0) & (s[1] >= 0) & (s[2] >= 0)  # spelled out: size-3 reductions are slow on CPU


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
    return torch.minimum(torch.minimum(d2[0], d2[1]), d2[2])
