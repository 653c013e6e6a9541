"""Which (face, pixel) pairs lie inside the soft coverage cutoff: integer work, no gradients.

Instead of PyTorch3D's dense top-K buffer per pixel, every face lists the pixels whose centers lie
within ``radius`` of it (or inside it). Candidates come from each face's bounding box grown by the
radius (a ragged expansion with ``repeat_interleave``); the exact point-to-triangle distance then
drops the box corners. Memory and time follow the number of pairs, never pixels x faces, and no
face is ever dropped for lack of a slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .geometry import Triangles, distance2, edge_functions, face_table, inside

# Candidates processed at once in the tight test: bounds the temporary memory of pair finding.
CHUNK = 1 << 21


@dataclass
class Pairs:
    """The sparse (face, pixel) list of one render, valid for the geometry it was computed from.

    view_face: (P,) index ``view * F + face``; pixel: (P,) flat index ``view * H * W + row * W + col``;
    face: (P,) face index; px, py: (P,) pixel centers. Pairs are sorted by view_face.
    """

    view_face: Tensor
    pixel: Tensor
    face: Tensor
    px: Tensor
    py: Tensor
    num_views: int
    height: int
    width: int

    def __len__(self) -> int:
        return self.pixel.shape[0]


def front_facing(area2: Tensor) -> Tensor:
    """Front-facing mask from twice the signed screen area (image y down).

    A face wound counter-clockwise seen from outside (OBJ convention) appears clockwise in a y-down
    image, i.e. with a negative ``cross(v1 - v0, v2 - v0)``.
    """
    return area2 < 0


@torch.no_grad()
def find_pairs(xy: Tensor, z: Tensor, faces: Tensor, height: int, width: int, radius: float,
               near: float, cull_backfaces: bool = True) -> Pairs:
    """All (face, pixel) pairs whose pixel center is inside the face or within ``radius`` pixels of it.

    xy: (N, V, 2) pixel coordinates; z: (N, V) depths; faces: (F, 3). Faces with a vertex at or nearer
    than the near plane are dropped (not clipped), as are zero-area faces and, if asked, back faces.
    """
    n, f = xy.shape[0], faces.shape[0]
    table, area2 = face_table(xy, z, faces)
    tiny = torch.finfo(xy.dtype).tiny ** 0.5
    valid = (z[:, faces].reshape(-1, 3) > near).all(-1) & (area2.abs() > tiny) & torch.isfinite(area2)
    if cull_backfaces:
        valid &= front_facing(area2)
    vx, vy = table[0:3].T, table[3:6].T  # edge starts run over all three corners
    # Pixel column j has its center at j + 0.5: columns within [xmin - r, xmax + r].
    c0 = torch.ceil(vx.amin(-1) - radius - 0.5).clamp(min=0)
    c1 = torch.floor(vx.amax(-1) + radius - 0.5).clamp(max=width - 1)
    r0 = torch.ceil(vy.amin(-1) - radius - 0.5).clamp(min=0)
    r1 = torch.floor(vy.amax(-1) + radius - 0.5).clamp(max=height - 1)
    valid &= (c1 >= c0) & (r1 >= r0)
    vf = valid.nonzero().squeeze(1)
    c0, r0 = c0.index_select(0, vf).long(), r0.index_select(0, vf).long()
    ncols = c1.index_select(0, vf).long() - c0 + 1
    counts = ncols * (r1.index_select(0, vf).long() - r0 + 1)

    # Split the faces into chunks of at most CHUNK candidates (a single larger face is its own chunk).
    ends = torch.cumsum(counts, 0)
    bounds = [0]
    while bounds[-1] < len(vf):
        done = int(ends[bounds[-1] - 1]) if bounds[-1] else 0
        bounds.append(max(int(torch.searchsorted(ends, done + CHUNK, right=True)), bounds[-1] + 1))

    per_face = torch.stack([vf, c0, r0, ncols], 1)  # gathered once per candidate with one index_select
    keep_vf, keep_pix, keep_px, keep_py = [], [], [], []
    hw = height * width
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        cnt = counts[lo:hi]
        local = torch.repeat_interleave(torch.arange(lo, hi, device=xy.device), cnt)
        first = torch.cumsum(cnt, 0) - cnt
        k = torch.arange(int(cnt.sum()), device=xy.device) - torch.repeat_interleave(first, cnt)
        g, col0, row0, nc = per_face.index_select(0, local).unbind(1)
        dr = torch.div(k, nc, rounding_mode="floor")
        rows, cols = row0 + dr, col0 + (k - dr * nc)
        px = cols.to(xy.dtype) + 0.5
        py = rows.to(xy.dtype) + 0.5
        sub = Triangles.gather(table, g, with_depth=False)
        edge, dx, dy = edge_functions(sub, px, py)
        keep = (inside(edge, sub) | (distance2(sub, dx, dy) <= radius * radius)).nonzero().squeeze(1)
        g = g.index_select(0, keep)
        keep_vf.append(g)
        keep_pix.append(torch.div(g, f, rounding_mode="floor") * hw + rows.index_select(0, keep) * width
                        + cols.index_select(0, keep))
        keep_px.append(px.index_select(0, keep))
        keep_py.append(py.index_select(0, keep))

    def cat(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=xy.device)

    view_face = cat(keep_vf, torch.long)
    return Pairs(view_face=view_face, pixel=cat(keep_pix, torch.long), face=view_face % f,
                 px=cat(keep_px, xy.dtype), py=cat(keep_py, xy.dtype), num_views=n, height=height,
                 width=width)
