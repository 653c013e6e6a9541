"""Global pose initialization: render a few hundred candidate viewpoints in one batch, keep the best by IoU.

Local solvers on silhouettes have narrow basins (from the PyTorch3D tutorial's far start, LM and Adam end
up 2–53° off). Our rasterizer renders many small views cheaply, so view 0 of the rig is tried from
``directions`` points spread evenly on a sphere around the object (a Fibonacci lattice, about
``sqrt(4π/n)`` rad apart) times ``rolls`` rotations about the viewing axis, every view of the rig rendered
hard at a small size. Each candidate is first moved along its viewing ray so that its silhouette's area
matches the target's (apparent area ~ 1/distance²), then scored by IoU over all views. Silhouettes are
ambiguous at this size (a view and its mirror image can score alike), so the ``keep`` best distinct
candidates are each refined by ``rounds`` of finer cones of directions around them, and the best of all
(or the start, if it scores higher) seeds the local solver.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from diffrender.camera import Camera, compose_extrinsics, look_at, relative_to_first
from diffrender.scenes.hard import hard_render


@dataclass
class SearchResult:
    """R (3, 3), t (3,): the best world-to-camera pose of view 0; iou: its IoU over all views; start_iou: the
    start's; candidates: how many poses were scored; seconds: wall time."""

    R: Tensor
    t: Tensor
    iou: float
    start_iou: float
    candidates: int
    seconds: float


def fibonacci_sphere(n: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """(n, 3) unit vectors spread evenly over the sphere (golden-angle spiral)."""
    i = torch.arange(n, dtype=torch.float64) + 0.5
    y = 1 - 2 * i / n
    r = torch.sqrt((1 - y * y).clamp_min(0))
    phi = math.pi * (3 - math.sqrt(5)) * i
    return torch.stack([r * torch.cos(phi), y, r * torch.sin(phi)], -1).to(dtype=dtype, device=device)


def cone(direction: Tensor, radius: float, n: int) -> Tensor:
    """(n + 1, 3) unit vectors: ``direction`` and n more spread over a cap of angular ``radius`` around it."""
    helper = direction.new_tensor([1.0, 0.0, 0.0] if abs(float(direction[0])) < 0.9 else [0.0, 1.0, 0.0])
    u = torch.linalg.cross(direction, helper)
    u = u / u.norm()
    v = torch.linalg.cross(direction, u)
    i = torch.arange(n, dtype=direction.dtype, device=direction.device) + 0.5
    r = radius * torch.sqrt(i / n)
    phi = math.pi * (3 - math.sqrt(5)) * i
    d = direction + torch.tan(r)[:, None] * (torch.cos(phi)[:, None] * u + torch.sin(phi)[:, None] * v)
    return torch.cat([direction[None], d / d.norm(dim=-1, keepdim=True)])


def cluster_vertices(verts: Tensor, faces: Tensor, cells: int) -> tuple[Tensor, Tensor]:
    """A coarse stand-in mesh for silhouettes at small sizes: vertex clustering on a grid of ``cells`` cells
    across the mesh's largest extent (Rossignac & Borrel 1993). Vertices in one cell merge into their mean;
    faces that collapse are dropped. The silhouette moves by at most about one cell."""
    lo = verts.amin(0)
    size = float((verts.amax(0) - lo).max()) / cells
    if size <= 0:
        return verts, faces
    key = ((verts - lo) / size).floor().long().clamp(0, cells)
    key = (key[:, 0] * (cells + 1) + key[:, 1]) * (cells + 1) + key[:, 2]
    uniq, inv = torch.unique(key, return_inverse=True)
    count = torch.zeros(uniq.shape[0], dtype=verts.dtype, device=verts.device).index_add_(
        0, inv, torch.ones_like(verts[:, 0]))
    merged = torch.zeros(uniq.shape[0], 3, dtype=verts.dtype, device=verts.device).index_add_(0, inv, verts)
    f = inv[faces]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])]
    return merged / count[:, None], torch.unique(f.sort(dim=1).values, dim=0)  # hard silhouettes: winding is moot


def _centers(R: Tensor, t: Tensor) -> Tensor:
    """Camera centers (K, 3) of world-to-camera poses R (K, 3, 3), t (K, 3)."""
    return -(R.transpose(1, 2) @ t.unsqueeze(-1)).squeeze(-1)


class _Scorer:
    """Renders candidate view-0 poses with the whole rig and scores them against the target silhouettes."""

    def __init__(self, verts: Tensor, faces: Tensor, rig: Camera, target: Tensor, at: Tensor, up: Tensor,
                 max_views: int) -> None:
        self.verts, self.faces, self.rig, self.at, self.up, self.max_views = verts, faces, rig, at, up, max_views
        self.R_rel, self.t_rel = relative_to_first(rig.R, rig.t)
        self.target = (target > 0.5).reshape(1, rig.num_views, -1)
        self.count = 0

    def render(self, R: Tensor, t: Tensor) -> Tensor:
        """Hard silhouettes (K, N, H W) of K view-0 poses R (K, 3, 3), t (K, 3)."""
        k, rig = R.shape[0], self.rig
        Rk, tk = compose_extrinsics(self.R_rel[None], self.t_rel[None], R[:, None], t[:, None])
        cam = Camera(Rk.reshape(-1, 3, 3), tk.reshape(-1, 3), rig.focal.repeat(k, 1), rig.principal.repeat(k, 1),
                     rig.height, rig.width, rig.near, rig.far)
        self.count += k
        alpha = hard_render(self.verts, self.faces, cam, max_views=self.max_views)["alpha"]
        return (alpha > 0.5).reshape(k, rig.num_views, -1)

    def iou(self, R: Tensor, t: Tensor) -> Tensor:
        a = self.render(R, t)
        inter = (a & self.target).sum((1, 2)).to(R.dtype)
        return inter / (a | self.target).sum((1, 2)).to(R.dtype).clamp_min(1)

    def poses(self, dirs: Tensor, dist: Tensor, roll: Tensor) -> tuple[Tensor, Tensor]:
        """View-0 poses looking at ``at`` from ``at + dist · dirs`` (K, 3), rolled by ``roll`` (K,) about the
        viewing axis, each then moved along its ray until its silhouette's area matches the target's."""
        R, t = look_at(self.at + dist[:, None] * dirs, self.at, self.up)
        c, s = torch.cos(roll), torch.sin(roll)
        z, o = torch.zeros_like(c), torch.ones_like(c)
        Rr = torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1), torch.stack([z, z, o], -1)], -2)
        R, t = Rr @ R, (Rr @ t.unsqueeze(-1)).squeeze(-1)
        area = self.render(R, t).sum((1, 2)).to(R.dtype)
        scale = torch.sqrt(area.clamp_min(1) / self.target.sum().clamp_min(1)).clamp(0.25, 4.0)
        return R, t * scale[:, None] - (1 - scale[:, None]) * (R @ self.at)  # center <- at + scale (center - at)


def search_view0(verts: Tensor, faces: Tensor, rig: Camera, target: Tensor, at: Tensor, up: Tensor,
                 start: tuple[Tensor, Tensor], *, directions: int = 300, rolls: int = 1, keep: int = 6,
                 rounds: int = 2, cone_size: int = 24, max_views: int = 256, max_faces: int = 5000) -> SearchResult:
    """Best world-to-camera pose of view 0 for hard silhouettes ``target: (N, H, W)`` (bool or [0, 1]).

    verts (V, 3), faces (F, 3): the mesh in world coordinates (above ``max_faces`` faces a vertex-clustered
    stand-in is rendered instead, with as many cells across the mesh as the search images have pixels);
    rig: the N views at the search size with their current poses (their placement relative to view 0 is
    kept); at (3,): the point candidates look at; up (3,): world up for them; start: view 0's current
    (R (3, 3), t (3,)), also scored.
    """
    t0 = time.perf_counter()
    if faces.shape[0] > max_faces:
        verts, faces = cluster_vertices(verts, faces, max(rig.height, rig.width))
    sc = _Scorer(verts, faces, rig, target, at, up, max_views)
    R_s, t_s = start
    start_iou = float(sc.iou(R_s[None], t_s[None])[0])
    offset = -(R_s.transpose(0, 1) @ t_s) - at  # start camera center relative to at
    dist0, ray = offset.norm(), offset / offset.norm()
    for _ in range(2):  # a common start distance at which the object appears about as large as in the target
        area = sc.render(R_s[None], -(R_s @ (at + dist0 * ray))[None]).sum()
        dist0 = dist0 * torch.sqrt(area.clamp_min(1) / sc.target.sum().clamp_min(1)).clamp(0.25, 4.0)
    dirs = fibonacci_sphere(directions, verts.dtype, verts.device)
    dirs = dirs[torch.linalg.cross(dirs, up.expand_as(dirs)).norm(dim=-1) > 1e-2]  # look_at needs dir x up != 0
    roll = torch.arange(rolls, dtype=verts.dtype, device=verts.device) * (2 * math.pi / rolls)
    dirs, roll = dirs.repeat_interleave(rolls, 0), roll.repeat(dirs.shape[0])
    R, t = sc.poses(dirs, dist0.expand(dirs.shape[0]), roll)
    iou = sc.iou(R, t)
    # keep the best candidates that are at least one lattice spacing apart (or differ in roll)
    spacing = math.sqrt(4 * math.pi / directions)
    seeds: list[int] = []
    for i in torch.argsort(iou, descending=True).tolist():
        if all(float(dirs[i] @ dirs[j]) < math.cos(spacing) or float(roll[i]) != float(roll[j]) for j in seeds):
            seeds.append(i)
        if len(seeds) == keep:
            break
    # refine every seed by cones of directions, one batch per round for all seeds
    d, r = dirs[seeds], roll[seeds]
    cur, Rb, tb = iou[seeds], R[seeds], t[seeds]
    dist = (_centers(Rb, tb) - at).norm(dim=-1)
    m = cone_size + 1
    for k in range(rounds):
        cd = torch.cat([cone(d[i], spacing / 2**k, cone_size) for i in range(len(seeds))])
        Rc, tc = sc.poses(cd, dist.repeat_interleave(m), r.repeat_interleave(m))
        ic = sc.iou(Rc, tc).reshape(len(seeds), m)
        val, j = ic.max(1)
        j = j + torch.arange(len(seeds), device=j.device) * m
        better = val > cur
        cur = torch.where(better, val, cur)
        d = torch.where(better[:, None], cd[j], d)
        Rb = torch.where(better[:, None, None], Rc[j], Rb)
        tb = torch.where(better[:, None], tc[j], tb)
        dist = (_centers(Rb, tb) - at).norm(dim=-1)
    i = int(torch.argmax(cur))
    best = (float(cur[i]), Rb[i], tb[i])
    if best[0] <= start_iou:
        best = (start_iou, R_s, t_s)
    return SearchResult(best[1], best[2], best[0], start_iou, sc.count, time.perf_counter() - t0)
