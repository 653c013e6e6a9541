"""Texture lookups that work in both AD modes.

``torch.nn.functional.grid_sample`` has no forward-mode derivative in torch 2.13, so bilinear
sampling is written as four gathers with fractional weights: the integer texel indices are
piecewise constant (computed on detached values) and the weights carry the derivative in ``uv``.
"""

from __future__ import annotations

from torch import Tensor


def sample_bilinear(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinearly sample ``texture`` (Ht, Wt, C) at ``uv`` (P, 2) -> (P, C).

    ``uv`` in [0, 1] with v pointing up (OBJ convention): (0, 0) is the bottom-left corner of the
    image and texel centers sit at half-integer positions. Lookups outside clamp to the border texel.
    Differentiable in ``texture`` and ``uv``.
    """
    if texture.dim() != 3:
        raise ValueError(f"texture: expected shape (Ht, Wt, C), got {tuple(texture.shape)}")
    if uv.dim() != 2 or uv.shape[-1] != 2:
        raise ValueError(f"uv: expected shape (P, 2), got {tuple(uv.shape)}")
    ht, wt, c = texture.shape
    # Continuous texel coordinates: texel (i, j) has its center at (j + 0.5, i + 0.5).
    x = (uv[:, 0] * wt - 0.5).clamp(0, wt - 1)
    y = ((1 - uv[:, 1]) * ht - 0.5).clamp(0, ht - 1)
    x0 = x.detach().floor().clamp(max=max(wt - 2, 0))
    y0 = y.detach().floor().clamp(max=max(ht - 2, 0))
    fx = (x - x0).unsqueeze(-1)
    fy = (y - y0).unsqueeze(-1)
    j0 = x0.long()
    i0 = y0.long()
    j1 = (j0 + 1).clamp(max=wt - 1)
    i1 = (i0 + 1).clamp(max=ht - 1)
    flat = texture.reshape(ht * wt, c)

    def tex(i: Tensor, j: Tensor) -> Tensor:
        return flat.index_select(0, i * wt + j)

    top = tex(i0, j0) * (1 - fx) + tex(i0, j1) * fx
    bottom = tex(i1, j0) * (1 - fx) + tex(i1, j1) * fx
    return top * (1 - fy) + bottom * fy
