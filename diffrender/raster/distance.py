"""Fused signed squared distance from pixel centers to their triangles, with hand-written derivatives.

This is the hot loop of every silhouette render. Written with plain tensor ops, autograd records
some twenty (P, 3)-sized intermediates and replays twice as many in the backward pass. The
derivative of d² = min_k min_{t∈[0,1]} |d_k - t e_k|² only needs the winning edge k* and its
residual r = d_k* - t* e_k* (Danskin's theorem: the inner minimizers are held fixed), so forward
saves three (P,) vectors and both backward and JVP are a handful of (P,)-sized ops:

    ∂d²/∂s_k* = -2 r,    ∂d²/∂e_k* = -2 t* r    (s: edge start, e: edge vector, d = p - s).

A new-style ``torch.autograd.Function`` (``setup_context``, ``jvp``, generated vmap rule) so it works
with ``backward``, ``torch.func.vjp/jvp/linearize`` and ``vmap``.
"""

from __future__ import annotations

import torch
from torch import Tensor

GEO_WIDTH = 12  # sx (3), sy (3), ex (3), ey (3): the differentiable columns of the face table


class _SignedDistance(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(geo: Tensor, index: Tensor, px: Tensor, py: Tensor, inv_len2: Tensor, inv_area: Tensor,
                scale: float):
        rows = geo.index_select(0, index)
        sx, sy, ex, ey = rows.split(3, dim=-1)
        dx = px.unsqueeze(-1) - sx
        dy = py.unsqueeze(-1) - sy
        inside = ((ex * dy - ey * dx) * inv_area >= 0).all(-1)
        t = ((ex * dx + ey * dy) * inv_len2).clamp(0, 1)
        rx = dx - t * ex
        ry = dy - t * ey
        d2, k = (rx * rx + ry * ry).min(dim=-1, keepdim=True)
        signed = torch.where(inside, scale, -scale).to(geo.dtype)
        flat = index * GEO_WIDTH + k.squeeze(-1)  # position of column k* (of sx) in geo.view(-1)
        return (d2.squeeze(-1) * signed, rx.gather(-1, k).squeeze(-1), ry.gather(-1, k).squeeze(-1),
                t.gather(-1, k).squeeze(-1), signed, flat)

    @staticmethod
    def setup_context(ctx, inputs, output):
        geo = inputs[0]
        _, rx, ry, t, signed, flat = output
        ctx.mark_non_differentiable(rx, ry, t, signed, flat)
        ctx.geo_shape = geo.shape
        ctx.save_for_backward(rx, ry, t, signed, flat)
        ctx.save_for_forward(rx, ry, t, signed, flat)

    @staticmethod
    def backward(ctx, grad, *_):
        rx, ry, t, signed, flat = ctx.saved_tensors
        c = -2 * grad * signed
        gsx, gsy = c * rx, c * ry
        values = torch.cat([gsx, gsy, gsx * t, gsy * t])
        positions = torch.cat([flat, flat + 3, flat + 6, flat + 9])
        n = ctx.geo_shape[0] * GEO_WIDTH
        grad_geo = torch.zeros(n, dtype=grad.dtype, device=grad.device).index_add(0, positions, values)
        return grad_geo.view(ctx.geo_shape), None, None, None, None, None, None

    @staticmethod
    def jvp(ctx, geo_t, *_):
        rx, ry, t, signed, flat = ctx.saved_tensors
        tg = geo_t.reshape(-1)
        tsx, tsy = tg.index_select(0, flat), tg.index_select(0, flat + 3)
        tex, tey = tg.index_select(0, flat + 6), tg.index_select(0, flat + 9)
        d2_t = -2 * (rx * (tsx + t * tex) + ry * (tsy + t * tey))
        return d2_t * signed, None, None, None, None, None


def signed_distance2(geo: Tensor, index: Tensor, px: Tensor, py: Tensor, inv_len2: Tensor, inv_area: Tensor,
                     scale: float) -> Tensor:
    """δ · scale · d² (P,) for pixel centers (px, py) and the triangles ``geo[index]``.

    geo: (N*F, 12) edge starts and edge vectors (differentiable); index: (P,) rows; inv_len2: (P, 3)
    1/|e_k|²; inv_area: (P, 1) 1/(2·area), used for its sign only; δ = +1 inside, -1 outside.
    """
    return _SignedDistance.apply(geo, index, px, py, inv_len2, inv_area, scale)[0]
