"""Soft silhouette targets for every σ from one hard (or anti-aliased) mask, the way our renderer softens a mesh.

A mask from a photograph is hard: fitting a blurred render (σ large) to it pulls the wrong way, and
blurring the mask with a Gaussian is not what the renderer does. The renderer covers a pixel by a face with
``sigmoid(δ d² / σ)``, ``d`` the distance in NDC from the pixel center to the face (README, "Rendering"), so
the target for σ is built from the signed distance ``d`` of each pixel center to the mask's boundary,
pushed through the same sigmoid. A silhouette pixel of a closed mesh is covered by ``layers`` faces at its
contour (a front and a back face when back faces are not culled), so the target is
``1 − (1 − sigmoid(δ d²/σ))^layers``, which is what the renderer gives there.

The boundary is located to sub-pixel precision: on every grid edge between a pixel inside (value ≥ 0.5) and
one outside, the crossing of the 0.5 level of the linearly interpolated mask (the midpoint for a binary
mask, shifted by the coverage of an anti-aliased one). The distance to the nearest crossing is exact
(brute force over the crossings, chunked), in torch: scipy is not a runtime dependency.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def boundary_points(mask: Tensor, threshold: float = 0.5) -> Tensor:
    """Sub-pixel boundary crossings (K, 2) as pixel coordinates (x, y) of one mask ``(H, W)``.

    Pixel (i, j) has its center at (j + 0.5, i + 0.5). Between 4-neighbours p (inside) and q (outside)
    the crossing sits where the linear interpolation of the mask values equals ``threshold``.
    """
    h, w = mask.shape
    m = mask.to(torch.float64)
    inside = m >= threshold
    pts = []
    for dim in (1, 0):  # horizontal neighbours (along x), then vertical (along y)
        a = m[:, :-1] if dim == 1 else m[:-1, :]
        b = m[:, 1:] if dim == 1 else m[1:, :]
        ia = inside[:, :-1] if dim == 1 else inside[:-1, :]
        ib = inside[:, 1:] if dim == 1 else inside[1:, :]
        cross = (ia != ib).nonzero()
        if cross.numel() == 0:
            continue
        va, vb = a[cross[:, 0], cross[:, 1]], b[cross[:, 0], cross[:, 1]]
        frac = ((va - threshold) / (va - vb)).clamp(0.0, 1.0)  # va != vb: one is >= threshold, one below
        x = cross[:, 1].to(torch.float64) + 0.5
        y = cross[:, 0].to(torch.float64) + 0.5
        if dim == 1:
            x = x + frac
        else:
            y = y + frac
        pts.append(torch.stack([x, y], -1))
    if not pts:
        return torch.zeros(0, 2, dtype=torch.float64, device=mask.device)
    return torch.cat(pts)


def signed_distance(masks: Tensor, threshold: float = 0.5, chunk: int = 1 << 22) -> Tensor:
    """Signed distance in pixels (N, H, W) from each pixel center to the boundary of ``masks: (N, H, W)``;
    positive inside (value ≥ threshold). A mask without boundary (empty or full) gets ∓(H + W) everywhere.

    Exact Euclidean distance to the nearest sub-pixel crossing (see :func:`boundary_points`), by brute
    force over the crossings in chunks of at most ``chunk`` pixel-crossing pairs; float64 internally,
    returned in the masks' dtype.
    """
    n, h, w = masks.shape
    dev = masks.device
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=dev) + 0.5,
                            torch.arange(w, dtype=torch.float64, device=dev) + 0.5, indexing="ij")
    centers = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)  # (H W, 2)
    out = torch.empty(n, h * w, dtype=torch.float64, device=dev)
    for i in range(n):
        pts = boundary_points(masks[i], threshold)
        inside = (masks[i] >= threshold).reshape(-1)
        if pts.shape[0] == 0:
            out[i] = float(h + w)
        else:
            rows = max(1, chunk // pts.shape[0])
            out[i] = torch.cat([torch.cdist(centers[s:s + rows], pts).amin(1) for s in range(0, h * w, rows)])
        out[i] = torch.where(inside, out[i], -out[i])
    return out.reshape(n, h, w).to(masks.dtype)


def soft_target(sdf_ndc: Tensor, sigma: float, layers: int = 2) -> Tensor:
    """Soft silhouette ``1 − (1 − sigmoid(δ d²/σ))^layers`` from the signed distance ``sdf_ndc`` (NDC units,
    positive inside), as the renderer covers a pixel ``d`` away from a contour seen through ``layers`` faces."""
    d = sdf_ndc
    s = torch.sigmoid(torch.sign(d) * d * d / sigma)
    return 1.0 - (1.0 - s) ** layers


def area_resize(images: Tensor, height: int, width: int) -> Tensor:
    """Area-average ``images: (N, H, W)`` or ``(N, H, W, C)`` to ``height x width`` (the image pyramid of the
    coarse stages: each coarse pixel is the mean of the fine pixels it covers)."""
    if images.shape[1:3] == (height, width):
        return images
    x = images.unsqueeze(1) if images.dim() == 3 else images.permute(0, 3, 1, 2)
    y = F.adaptive_avg_pool2d(x, (height, width))
    return y[:, 0] if images.dim() == 3 else y.permute(0, 2, 3, 1)


class MaskTargets:
    """Soft targets of a set of masks ``(N, H, W)`` for any σ and image size (the pyramid).

    The signed distance is computed once at full resolution, in NDC (the shorter image side spans 2),
    which does not depend on the resolution; a coarse level averages it over each coarse pixel (exact for
    a locally straight boundary, whose distance field is linear).
    """

    def __init__(self, masks: Tensor, layers: int = 2, threshold: float = 0.5) -> None:
        n, h, w = masks.shape
        self.height, self.width, self.layers = h, w, int(layers)
        self.sdf_ndc = signed_distance(masks, threshold) * (2.0 / min(h, w))

    def at(self, sigma: float, height: int | None = None, width: int | None = None) -> Tensor:
        """The soft target (N, height, width) for σ (NDC²); default size: the masks' own."""
        sdf = area_resize(self.sdf_ndc, height or self.height, width or self.width)
        return soft_target(sdf, sigma, self.layers)


def radial_profile(soft: Tensor, sdf_ndc: Tensor, sigma: float, bins: int = 64) -> tuple[Tensor, Tensor]:
    """The renderer's mean soft coverage as a function of signed distance to the hard silhouette.

    soft: (N, H, W) render of a mesh at σ; sdf_ndc: (N, H, W) signed distance (NDC) to that mesh's hard
    silhouette. Returns (d, value): ``bins`` bin centers over the cutoff range ``|d| ≤ sqrt(σ ln(1e4))`` and
    the mean soft α per bin, made non-decreasing (coverage only grows toward the inside); empty bins take the
    two-layer model. It captures what the single-sigmoid model cannot: many small faces near a contour each
    add coverage outside it, so a mesh's soft halo is wider than one sigmoid (at σ = 1e-2 about twice).
    """
    r = (sigma * math.log(1e4)) ** 0.5
    edges = torch.linspace(-r, r, bins + 1, dtype=soft.dtype, device=soft.device)
    centers = 0.5 * (edges[1:] + edges[:-1])
    d, a = sdf_ndc.reshape(-1), soft.reshape(-1).detach()
    sel = d.abs() < r
    idx = torch.bucketize(d[sel], edges[1:-1])
    total = torch.zeros(bins, dtype=soft.dtype, device=soft.device).index_add(0, idx, a[sel])
    count = torch.zeros(bins, dtype=soft.dtype, device=soft.device).index_add(0, idx, torch.ones_like(a[sel]))
    value = torch.where(count > 0, total / count.clamp_min(1), soft_target(centers, sigma, 2))
    return centers, torch.cummax(value, 0).values


def profile_target(sdf_ndc: Tensor, profile: tuple[Tensor, Tensor], sigma: float) -> Tensor:
    """Soft target from a signed distance field through a :func:`radial_profile` (linear interpolation;
    0 / 1 beyond the cutoff range)."""
    d, value = profile
    r = (sigma * math.log(1e4)) ** 0.5
    x = torch.cat([d.new_tensor([-r]), d, d.new_tensor([r])])
    y = torch.cat([value.new_tensor([0.0]), value, value.new_tensor([1.0])])
    q = sdf_ndc.clamp(-r, r).reshape(-1)
    i = torch.bucketize(q, x[1:-1]).clamp(0, x.numel() - 2)
    t = ((q - x[i]) / (x[i + 1] - x[i])).clamp(0, 1)
    return (y[i] + t * (y[i + 1] - y[i])).reshape(sdf_ndc.shape)


def calibrated_target(sdf_target: Tensor, soft: Tensor, hard: Tensor, sigma: float, *,
                      correct: bool = False) -> Tensor:
    """Soft target (N, H, W) at σ for masks with signed distance ``sdf_target`` (NDC), calibrated on the current
    mesh: ``soft`` and ``hard`` are its renders at σ and σ → 0 (same size).

    The mask goes through the mesh's own :func:`radial_profile`. With ``correct`` the target becomes
    ``profile(mask) + [soft − profile(hard)]``, a defect correction: the bracket is what the profile misses for
    this mesh at this pose (internal edges, the halo's shape), so where the current hard silhouette equals
    the mask the target equals the current soft render exactly, and the fit's fixed point is where the
    mesh's hard silhouette matches the mask, whatever the renderer's edge profile. Use it near the optimum
    (the final σ; run twice to re-calibrate): far from it the bracket sits at the wrong pixels.
    """
    h, w = hard.shape[-2:]
    sdf_hard = signed_distance(hard) * (2.0 / min(h, w))
    prof = radial_profile(soft, sdf_hard, sigma)
    target = profile_target(sdf_target, prof, sigma)
    return target + (soft - profile_target(sdf_hard, prof, sigma)) if correct else target
