"""Sums over residuals that live in several processes: the one hook that shards a problem.

A problem whose residual terms are split across processes (a sharded fit: each process renders its own
views) needs every quantity that sums over residuals summed across the processes too: the cost and its
blocks, the gradient ``J^T r``, ``J^T J v``, ``diag(J^T J)``, the dense ``J^T J``, squared norms of ``J u``,
and first-order gradients. :class:`Reduction` is the identity (one process); :class:`AllReduce` sums with
``torch.distributed`` (gloo on CPU, NCCL on CUDA): one collective per product. Every process receives the
same bits, so every process takes the same solver decisions and the iterates are those of one process (up
to the order of floating-point sums). The solvers never see ranks: only :class:`~diffrender.problem.Problem`
and the operators call the reduction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["Reduction", "AllReduce", "ReductionError", "IDENTITY"]


class ReductionError(RuntimeError):
    """A collective failed: another process died, hung past the timeout, or could not be reached."""


class Reduction:
    """The identity: one process holds every residual. ``calls`` / ``bytes`` count what was reduced."""

    world_size: int = 1
    rank: int = 0

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0

    @property
    def sharded(self) -> bool:
        """Whether sums span several processes."""
        return self.world_size > 1

    def sum(self, t: Tensor) -> Tensor:
        """Elementwise sum of ``t`` over the processes (a new tensor; ``t`` itself when there is one)."""
        return t

    def sum_floats(self, values: Mapping[str, float]) -> dict[str, float]:
        """Sum named floats over the processes (keys may differ between processes: a missing key counts as
        0), added in rank order so that every process gets the same bits."""
        return dict(values)

    def any(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag true when it is true in any process: a consensus, e.g. to stop at the same iteration."""
        return [bool(f) for f in flags]


IDENTITY = Reduction()


class AllReduce(Reduction):
    """Sums over the processes of a ``torch.distributed`` group (the default group when ``group`` is None).

    Collectives that fail (a peer died, or did not answer within the group's timeout) raise
    :class:`ReductionError` with one line that says which collective and why."""

    def __init__(self, group: object | None = None) -> None:
        super().__init__()
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("AllReduce: torch.distributed is not initialized (init_process_group first)")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def _run(self, what: str, fn: object) -> object:
        try:
            return fn()
        except Exception as err:  # noqa: BLE001 - a backend error of any kind: one line, typed
            first = " ".join(str(err).split())[:300]
            raise ReductionError(f"{what} across {self.world_size} processes failed ({type(err).__name__}: "
                                 f"{first})") from err

    def sum(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        out = t.detach().clone().contiguous()
        self._run("all_reduce", lambda: dist.all_reduce(out, group=self.group))
        self.calls += 1
        self.bytes += out.numel() * out.element_size()
        return out

    def sum_floats(self, values: Mapping[str, float]) -> dict[str, float]:
        import torch.distributed as dist

        gathered: list[object] = [None] * self.world_size
        self._run("all_gather_object", lambda: dist.all_gather_object(gathered, dict(values), group=self.group))
        self.calls += 1
        self.bytes += 8 * sum(len(g) for g in gathered)  # type: ignore[arg-type]
        out: dict[str, float] = {}
        for part in gathered:
            for k, v in part.items():  # type: ignore[union-attr]
                out[k] = out.get(k, 0.0) + float(v)
        return out

    def any(self, flags: Sequence[bool]) -> list[bool]:
        import torch.distributed as dist

        device = torch.device("cuda", torch.cuda.current_device()) \
            if dist.get_backend(self.group) == "nccl" else torch.device("cpu")
        t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
        self._run("all_reduce", lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group))
        self.calls += 1
        return [bool(v > 0) for v in t.tolist()]
