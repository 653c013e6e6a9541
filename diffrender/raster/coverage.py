"""Which (face, pixel) pairs lie inside the soft coverage cutoff: integer work, no gradients.

Instead of PyTorch3D's dense top-K buffer per pixel, every face lists the pixels whose centers lie
within ``radius`` of it (or inside it). Candidates come from each face's bounding box grown by the
radius; the exact point-to-triangle distance then drops the box corners. Memory and time follow the
number of pairs, never pixels x faces, and no face is ever dropped for lack of a slot.

Two implementations: the compiled one (``native.find_runs``: faces binned into bands of rows; per face
and row, the interval of pixels within the radius of the triangle, a convex set, is one run of
pixels, so no candidate is tested one by one) and the PyTorch one (a ragged expansion with
``repeat_interleave`` and a per-candidate distance test), used on other devices and as the
reference. Both search ``SLACK_PX`` beyond the radius: the renderer drops pairs beyond the exact
cutoff itself, so a pair list only has to contain all pairs that matter, and any superset of them
renders the same images.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from . import native
from .geometry import Triangles, distance2, edge_functions, face_rows, inside

# Lazily derived integer arrays of a Pairs may first be asked for inside a torch.func transform (render is
# what the solvers transform); they are plain constants, so they are computed outside the transform.
_plain = getattr(torch._C, "_DisableFuncTorch", contextlib.nullcontext)

# Candidates processed at once in the tight test of the PyTorch search: bounds its temporary memory.
CHUNK = 1 << 21
# Extra search radius (px), so that rounding never drops a pair the renderer's own cutoff test keeps.
SLACK_PX = 1e-3


@dataclass(eq=False)
class Pairs:
    """The sparse (face, pixel) list of one render, valid for the geometry it was computed from.

    Per pair: ``view_face`` (P,) index ``view * F + face`` and ``pixel`` (P,) flat index
    ``view * H * W + row * W + col`` (PyTorch search: face-major). The compiled search stores runs
    instead: ``runs`` (R, 3) = (view_face, first pixel, length) of consecutive pixels of one row near one
    face, grouped by bands of ``band_rows`` rows (``band_off``: runs per band; ``band_pairs``: cumulative
    pairs per band); the per-pair arrays are then expanded on first use. ``face`` and ``centers``
    (face index, pixel centers) are derived on first use too. ``cull``: the render drops the pairs of
    faces that are not front-facing at the geometry it renders (a list reused at nearby geometry may
    hold faces that turned away since, or hold all faces).
    """

    num_views: int
    height: int
    width: int
    num_faces: int
    num_pairs: int
    runs: Tensor | None = None
    band_off: Tensor | None = None
    band_pairs: Tensor | None = None
    band_rows: int = 0
    cull: bool = False
    _per_pair: tuple[Tensor, Tensor] | None = field(default=None, repr=False)
    _centers: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_pairs(cls, view_face: Tensor, pixel: Tensor, num_views: int, height: int, width: int,
                   num_faces: int, cull: bool = False) -> Pairs:
        return cls(num_views, height, width, num_faces, view_face.shape[0], cull=cull, _per_pair=(view_face, pixel))

    def __len__(self) -> int:
        return self.num_pairs

    def _expand(self) -> tuple[Tensor, Tensor]:
        if self._per_pair is None:
            with _plain(), torch.no_grad():
                self._per_pair = self._expand_runs()
        return self._per_pair

    def _expand_runs(self) -> tuple[Tensor, Tensor]:
        vf, first, length = self.runs.unbind(1)
        start = torch.cumsum(length, 0) - length
        step = torch.arange(self.num_pairs, device=length.device) - torch.repeat_interleave(
            start, length, output_size=self.num_pairs)
        return (torch.repeat_interleave(vf, length, output_size=self.num_pairs),
                torch.repeat_interleave(first, length, output_size=self.num_pairs) + step)

    @property
    def view_face(self) -> Tensor:
        """(P,) view * F + face of each pair."""
        return self._expand()[0]

    @property
    def pixel(self) -> Tensor:
        """(P,) flat pixel index of each pair."""
        return self._expand()[1]

    @cached_property
    def face(self) -> Tensor:
        """(P,) face index of each pair."""
        with _plain(), torch.no_grad():
            return self.view_face % self.num_faces

    @cached_property
    def covered(self) -> Tensor:
        """(K,) sorted flat indices of the pixels with at least one pair (the others render as background)."""
        with _plain(), torch.no_grad():
            return self._covered()

    def _covered(self) -> Tensor:
        if self.runs is not None:  # only the compiled CPU search makes runs
            mask = native.covered(self.runs, self.num_views * self.height * self.width)
        else:
            mask = torch.zeros(self.num_views * self.height * self.width, dtype=torch.bool, device=self.pixel.device)
            mask[self.pixel] = True
        return mask.nonzero().squeeze(1)

    def centers(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Pixel centers (px, py), each (P,), in ``dtype``."""
        if dtype not in self._centers:
            with _plain(), torch.no_grad():
                col = self.pixel % self.width
                row = torch.div(self.pixel, self.width, rounding_mode="floor") % self.height
                self._centers[dtype] = (col.to(dtype) + 0.5, row.to(dtype) + 0.5)
        return self._centers[dtype]


def front_facing(area2: Tensor) -> Tensor:
    """Front-facing mask from twice the signed screen area (image y down).

    A face wound counter-clockwise seen from outside (OBJ convention) appears clockwise in a y-down
    image, i.e. with a negative ``cross(v1 - v0, v2 - v0)``.
    """
    return area2 < 0


def searched_faces(xy: Tensor, z: Tensor, faces: Tensor, near: float, backend: str) -> Tensor:
    """``valid_faces`` (no culling) as the search of ``backend`` computes it (N*F,) bool. xy: (N, V, 2); z: (N, V)."""
    if use_native(xy, backend):
        return native.valid_faces(xy, z, faces, near, False)
    return valid_faces(z, faces, face_rows(xy, z, faces)[1], near, False)


def valid_faces(z: Tensor, faces: Tensor, area2: Tensor, near: float, cull_backfaces: bool) -> Tensor:
    """View-faces that can have pairs (N*F,): in front of the near plane, non-degenerate, finite, and
    front-facing when culling. z: (N, V) depths; area2: (N*F,) twice the signed screen area."""
    tiny = torch.finfo(area2.dtype).tiny ** 0.5
    valid = (z[:, faces].reshape(-1, 3) > near).all(-1) & (area2.abs() > tiny) & torch.isfinite(area2)
    return valid & front_facing(area2) if cull_backfaces else valid


def use_native(x: Tensor, backend: str) -> bool:
    """Whether the compiled kernels serve tensors like ``x`` under ``backend`` ("auto", "native", "torch"):
    float32 or float64 on the CPU, and the kernels could be built."""
    if backend == "torch":
        return False
    if x.device.type != "cpu":
        why = f"the tensors are on {x.device.type}"
    elif x.dtype not in (torch.float32, torch.float64):
        why = f"the kernels take float32 or float64, not {x.dtype}"
    elif not native.available():
        why = native.status()
    else:
        return True
    if backend == "native":
        raise RuntimeError(f"backend='native' asked for, but {why}")
    return False


@torch.no_grad()
def find_pairs(xy: Tensor, z: Tensor, faces: Tensor, height: int, width: int, radius: float,
               near: float, cull_backfaces: bool = True, backend: str = "auto") -> Pairs:
    """All (face, pixel) pairs whose pixel center is inside the face or within ``radius`` pixels of it.

    xy: (N, V, 2) pixel coordinates; z: (N, V) depths; faces: (F, 3). Faces with a vertex at or nearer
    than the near plane are dropped (not clipped), as are zero-area faces and, if asked, back faces.
    ``backend``: "auto" (compiled kernels for CPU tensors when they build), "native" or "torch".
    """
    n, f = xy.shape[0], faces.shape[0]
    radius = radius + SLACK_PX
    if use_native(xy, backend):
        runs, band_off, band_pairs, band_rows = native.find_runs(xy, z, faces, height, width, radius, near,
                                                                 cull_backfaces)
        pairs = Pairs(n, height, width, f, int(band_pairs[-1]), runs, band_off, band_pairs, band_rows, cull_backfaces)
        pairs.covered  # noqa: B018  (computed now, outside any transform that may render with these pairs)
        return pairs

    rows, area2 = face_rows(xy, z, faces)
    valid = valid_faces(z, faces, area2, near, cull_backfaces)
    table = rows.T.contiguous()
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
    keep_vf, keep_pix = [], []
    hw = height * width
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        cnt = counts[lo:hi]
        local = torch.repeat_interleave(torch.arange(lo, hi, device=xy.device), cnt)
        first = torch.cumsum(cnt, 0) - cnt
        k = torch.arange(int(cnt.sum()), device=xy.device) - torch.repeat_interleave(first, cnt)
        g, col0, row0, nc = per_face.index_select(0, local).unbind(1)
        dr = torch.div(k, nc, rounding_mode="floor")
        rows, cols = row0 + dr, col0 + (k - dr * nc)
        sub = Triangles.gather(table, g, with_depth=False)
        edge, dx, dy = edge_functions(sub, cols.to(xy.dtype) + 0.5, rows.to(xy.dtype) + 0.5)
        keep = (inside(edge, sub) | (distance2(sub, dx, dy) <= radius * radius)).nonzero().squeeze(1)
        g = g.index_select(0, keep)
        keep_vf.append(g)
        keep_pix.append(torch.div(g, f, rounding_mode="floor") * hw + rows.index_select(0, keep) * width
                        + cols.index_select(0, keep))

    def cat(parts: list[Tensor]) -> Tensor:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=xy.device)

    pairs = Pairs.from_pairs(cat(keep_vf), cat(keep_pix), n, height, width, f, cull_backfaces)
    pairs.covered  # noqa: B018  (computed now, outside any transform that may render with these pairs)
    return pairs
