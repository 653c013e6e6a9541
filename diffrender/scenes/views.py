"""The views of a multi-view scene: chunks (one residual term each), their processes, and memory.

A fit of many views is split into chunks of views, each chunk one residual term with its own pair search.
The chunks are shared among the processes of a sharded fit (process ``r`` builds only its own terms), and
when keeping every view's graph would exceed the memory budget the graphs are rebuilt per product, chunk by
chunk (``keep_graphs=False``), with chunks as large as the budget allows. The plan depends on the config
(views, size, ``scene.view_chunks``, the budget, the number of processes), so every process computes the
same one, and the terms (hence the iterates) do not depend on the number of processes for a given set of
chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffrender.errors import UserError

__all__ = ["ViewPlan", "view_chunks_of", "plan_views", "render_views"]


def view_chunks_of(views: int, chunks: int) -> list[list[int]]:
    """Split ``views`` view indices into ``chunks`` contiguous, near-equal groups (at most one per view)."""
    chunks = max(1, min(chunks, views))
    return [list(range(views * k // chunks, views * (k + 1) // chunks)) for k in range(chunks)]


@dataclass(frozen=True)
class ViewPlan:
    """Chunks of views (global, in order), the process that owns each, and whether graphs are kept.

    ``chunks[k]``: the view indices of term ``views/k``; ``owners[k]``: its rank (contiguous blocks of
    chunks per rank); ``rank`` / ``world_size``: this process; ``keep_graphs``: False when the graphs
    are rebuilt per product to stay within the memory budget."""

    chunks: tuple[tuple[int, ...], ...]
    owners: tuple[int, ...]
    rank: int = 0
    world_size: int = 1
    keep_graphs: bool = True

    @property
    def single(self) -> bool:
        """One chunk, one process, kept graphs: the scene's plain one-term problem."""
        return len(self.chunks) == 1 and self.world_size == 1 and self.keep_graphs

    @property
    def views(self) -> list[int]:
        return [v for c in self.chunks for v in c]

    @property
    def local_chunks(self) -> list[int]:
        """Indices of the chunks this process evaluates."""
        return [k for k, r in enumerate(self.owners) if r == self.rank]

    def views_of(self, rank: int) -> list[int]:
        return [v for c, r in zip(self.chunks, self.owners, strict=True) if r == rank for v in c]

    @property
    def chunk_views(self) -> int:
        return max(len(c) for c in self.chunks)

    def describe(self) -> dict[str, Any]:
        """What summary.json records: chunks, graph policy, and each rank's views."""
        return {"view_chunks": len(self.chunks), "chunk_views": self.chunk_views, "keep_graphs": self.keep_graphs,
                "world_size": self.world_size, "rank_views": [self.views_of(r) for r in range(self.world_size)]}


def plan_views(scene: str, views: int, height: int, width: int, view_chunks: int, *, rank: int = 0,
               world_size: int = 1, memory_budget: float | None = None, dtype_bytes: int = 4) -> ViewPlan:
    """The chunks of a fit of ``views`` views of ``height x width``: at least ``view_chunks`` and one per
    process; when the estimated peak of keeping every graph of this process's views exceeds
    ``memory_budget`` (bytes; None: no limit), graphs are rebuilt per product and the chunks are as large
    as the budget allows (:func:`diffrender.memory.chunk_views_within`)."""
    from diffrender import memory

    if views < world_size:
        raise UserError(f"scene.views={views} cannot be shared by {world_size} processes: each needs at least one "
                        "view (fewer processes, or more views)")
    if view_chunks < 1:
        raise UserError(f"scene.view_chunks must be at least 1, got {view_chunks}")
    local = math.ceil(views / world_size)
    per_chunk = None if memory_budget is None else memory.chunk_views_within(
        memory_budget, scene, local, height, width, dtype_bytes=dtype_bytes)
    n = max(view_chunks, world_size)
    if per_chunk is not None:
        n = max(n, math.ceil(local / per_chunk) * world_size)
    chunks = view_chunks_of(views, n)
    owners = tuple(k * world_size // len(chunks) for k in range(len(chunks)))
    return ViewPlan(tuple(tuple(c) for c in chunks), owners, rank, world_size, per_chunk is None)


def render_views(camera: Any, views: list[int], chunk_views: int,
                 render: Callable[[Any], dict[str, Tensor]], num_views: int | None = None) -> dict[str, Tensor]:
    """``render(camera.select(chunk))`` without gradients for the listed views, at most ``chunk_views`` at
    a time, into tensors of ``num_views`` (default: the camera's) views whose unlisted views stay zero.
    Peak memory follows the chunk, not the number of views."""
    num_views = camera.num_views if num_views is None else num_views
    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for start in range(0, len(views), max(1, chunk_views)):
            idx = views[start:start + max(1, chunk_views)]
            images = render(camera.select(idx))
            for key, img in images.items():
                if key not in out:
                    out[key] = img.new_zeros((num_views, *img.shape[1:]))
                out[key][torch.as_tensor(idx, device=img.device)] = img.detach()
    return out
