"""Processes of a sharded fit: ``torch.distributed`` set up from what ``torchrun`` puts in the environment.

``torchrun --nproc_per_node=N scripts/fit.py ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_from_env` joins them into one process
group (gloo for CPU tensors, and NCCL for CUDA tensors where CUDA is there). Rank 0 makes the run directory
and tells the others (:func:`agree`); every process builds only its share of the residual terms and the
solver's sums go through :class:`~diffrender.linalg.reduction.AllReduce`. Reading the environment imports
no torch (``fit.py`` answers ``--help`` and config errors before importing it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

__all__ = ["env_rank", "env_world_size", "env_local_rank", "is_initialized", "init_from_env", "agree",
           "fit_group", "shutdown"]

T = TypeVar("T")
SETUP_TIMEOUT_S = 1800.0  # joining the group, agreeing on the run directory and on rank 0's start checks


def env_world_size() -> int:
    """Processes in this launch (``WORLD_SIZE``; 1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def env_rank() -> int:
    """This process's rank (``RANK``; 0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0") or 0)


def env_local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``): which GPU it uses."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_initialized() -> bool:
    """Whether a process group is set up (without importing torch when nothing did)."""
    import sys

    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


def init_from_env(timeout_s: float = SETUP_TIMEOUT_S) -> bool:
    """Join the launch's process group when ``WORLD_SIZE > 1`` (no-op otherwise, or when already joined).
    CPU tensors go through gloo; CUDA tensors through NCCL when this torch has CUDA and NCCL. Returns
    whether this process is part of a multi-process launch."""
    if env_world_size() <= 1:
        return False
    if is_initialized():
        return True
    import torch
    import torch.distributed as dist

    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(env_local_rank())
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return True


def agree(make: Callable[[], T]) -> T:
    """``make()`` on rank 0, its result on every rank (e.g. the run directory rank 0 created)."""
    if not is_initialized():
        return make()
    import torch.distributed as dist

    box: list[Any] = [make() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def fit_group(timeout_s: float) -> Any:
    """A group of all the processes whose collectives give up after ``timeout_s`` seconds (a peer that
    died or hangs then ends the fit with an error instead of a wait without end)."""
    import torch.distributed as dist

    return dist.new_group(timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    """Leave the process group (at the end of a fit; never raises)."""
    if not is_initialized():
        return
    import torch.distributed as dist

    try:
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - leaving is best effort, e.g. after a peer died
        pass
