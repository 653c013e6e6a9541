"""SoftRas aggregation over (face, pixel) pairs (Liu et al., "Soft Rasterizer", ICCV 2019).

Coverage of a pair: D = sigmoid(δ d² / σ), d the distance from the pixel center to the triangle in
NDC units (the shorter image side spans [-1, 1], as in SoftRas and PyTorch3D), δ = +1 inside and -1
outside, and D = 0 beyond the cutoff radius (pairs outside the triangle and farther than it count
for nothing, so any superset of the pairs that matter renders the same). Everything here is
elementwise on the pair list plus ``index_add`` into pixels, so it works in reverse and forward mode
and under ``torch.func.linearize``. The compiled sweep (raster/fused.py) computes the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .distance import signed_distance2
from .geometry import GEO_ROWS


def coverage_logits(table: Tensor, index: Tensor, px: Tensor, py: Tensor, ndc_per_px: float,
                    sigma: float, r2: float = math.inf) -> tuple[Tensor, Tensor]:
    """Coverage logits x = δ d² / σ (P,) so that D = sigmoid(x), for the pairs (``table[index]``, pixel),
    and which pairs count (P,) bool: pixel inside the triangle or within ``sqrt(r2)`` px of it.

    table: (19, N*F) from ``face_table``; d is measured in NDC units. δ is piecewise constant and x is
    continuous across the edge (d² = 0 there), and so is its derivative.
    """
    inv_len2 = table[12:15].detach().index_select(1, index)
    inv_area = table[18:].detach().index_select(1, index)
    return signed_distance2(table[:GEO_ROWS], index, px, py, inv_len2, inv_area, ndc_per_px * ndc_per_px / sigma,
                            r2)


def silhouette(logits: Tensor, keep: Tensor, pixel: Tensor, num_pixels: int) -> Tensor:
    """Soft silhouette α = 1 - Π_j (1 - D_j) per pixel (num_pixels,) over the pairs that count (``keep``).

    Uses log(1 - sigmoid(x)) = -softplus(x) and α = -expm1(Σ log(1 - D_j)), which stay accurate
    when D_j is close to 0 or 1.
    """
    log_miss = torch.zeros(num_pixels, dtype=logits.dtype, device=logits.device)
    log_miss = log_miss.index_add(0, pixel, -F.softplus(logits) * keep)
    return -torch.expm1(log_miss)


def perspective_barycentrics(bary: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Perspective-correct barycentrics (3, P) and depth (P,) from screen barycentrics and vertex depths.

    bary, z: (3, P). Outside the triangle (the soft halo) barycentrics are clamped to [0, ∞) and
    renormalized, so the attributes of the nearest part of the face are used instead of
    extrapolations. Depth is z = 1 / Σ_k (l_k / z_k) (screen-space interpolation of 1/z); the
    weights then are l_k z / z_k.
    """
    lam = bary.clamp(min=0)
    lam = lam / (lam[0] + lam[1] + lam[2])  # the sum is >= 1/3 since the raw weights add to 1
    w = lam / z
    depth = 1 / (w[0] + w[1] + w[2])
    return w * depth, depth


def blend(features: Tensor, logits: Tensor, keep: Tensor, depth: Tensor, pixel: Tensor, num_pixels: int,
          near: float, far: float, gamma: float) -> Tensor:
    """SoftRas depth-aware softmax of per-pair features (P, C) into pixels (num_pixels, C), over the pairs
    that count (``keep``; the others get weight exactly 0).

    Weights w_j = D_j exp(z̃_j / γ) with z̃ = (far - z) / (far - near), computed in log space as
    log w_j = log sigmoid(x_j) + z̃_j / γ. The per-pixel maximum of log w is subtracted (detached)
    before exponentiating: the normalized blend Σ w_j c_j / Σ w_j is invariant to that shift, so
    derivatives stay exact, and the largest weight of every pixel becomes 1, so the denominator never
    underflows (a tiny denominator would square to zero in the derivative and give NaN). The
    background is composited by the caller with α.
    """
    zt = (far - depth) / (far - near)
    log_w = torch.where(keep, F.logsigmoid(logits) + zt / gamma, -math.inf)
    top = torch.zeros(num_pixels, dtype=log_w.dtype, device=log_w.device)
    top = top.scatter_reduce(0, pixel, log_w.detach(), reduce="amax", include_self=False)
    top = torch.where(torch.isfinite(top), top, 0.0)  # pixels whose pairs all lie beyond the cutoff
    w = torch.exp(log_w - top.index_select(0, pixel))
    num = torch.zeros(num_pixels, features.shape[-1], dtype=features.dtype, device=features.device)
    num = num.index_add(0, pixel, w.unsqueeze(-1) * features)
    den = torch.zeros(num_pixels, dtype=w.dtype, device=w.device).index_add(0, pixel, w)
    return num / torch.where(den > 0, den, torch.ones_like(den)).unsqueeze(-1)
