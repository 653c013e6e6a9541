"""Image residuals at several scales: the residual image averaged over 2×2, 4×4, ... cells, added as blocks.

A silhouette's Gauss-Newton model sees only the pixels within the blur radius of the current outline (theirs is
the α that moves), so its step moves the outline about a pixel however far away the target's outline is, and
the cost falls about twice as much as the model predicts (ρ ≈ 2). The coverage of an f×f cell is nearly linear
in the outline's position across the whole cell, so the same derivatives, summed over the cell, predict moves of
up to f pixels: a Gauss-Newton model with the coarse cells in it takes longer steps. The levels add residuals;
the rendering is not blurred and the full-resolution residual stays in the cost, so a mesh that matches the
target at full resolution matches it at every level too (a σ pyramid's blurred stages instead converge to a
blurred optimum). This is the image pyramid of coarse-to-fine registration (Lucas & Kanade 1981; Bergen et al.
1992) summed into one cost rather than run stage by stage.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def residual_pyramid(d: Tensor, levels: int) -> dict[int, Tensor]:
    """``d: (N, H, W)`` residual images → ``{f: (N, ceil(H / f), ceil(W / f))}`` for ``f = 2, 4, ..., 2**levels``.

    Each entry is the mean of ``d`` over f×f cells (a cell cut by the image border averages the pixels it has)
    times ``f``, so that a uniform error costs as much at every level as at full resolution (f² fewer residuals,
    each f times the error). Linear in ``d``; a cell is dropped from no level, so ``levels`` may exceed
    log2 of the image size (the coarsest levels are then one cell per view).
    """
    if d.dim() != 3:
        raise ValueError(f"residual_pyramid: d must be (N, H, W) images, got shape {tuple(d.shape)}")
    if levels < 0:
        raise ValueError(f"residual_pyramid: levels must be >= 0, got {levels}")
    out, x = {}, d.unsqueeze(1)
    for k in range(1, levels + 1):
        # pooling the previous level's (unscaled) means by 2x2 would weigh a cut border cell's pixels unevenly;
        # pooling d directly by f keeps every cell the plain mean of its pixels
        f = 2**k
        out[f] = f * F.avg_pool2d(x, f, ceil_mode=True, count_include_pad=False).squeeze(1)
    return out


def level_names(block: str, levels: int) -> list[str]:
    """The blocks of ``block``'s coarser levels: ``<block>_2x, <block>_4x, ..., <block>_<2**levels>x``."""
    return [f"{block}_{2**k}x" for k in range(1, levels + 1)]


def with_levels(block: str, d: Tensor, levels: int) -> dict[str, Tensor]:
    """``{block: d}`` and its coarser levels under :func:`level_names`' names (``d: (N, H, W)``)."""
    return {block: d, **{f"{block}_{f}x": r for f, r in residual_pyramid(d, levels).items()}}
