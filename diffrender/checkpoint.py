"""Atomic checkpoints of a fit: solver state, stage, parameters and config, for ``resume=<run dir>``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from diffrender.errors import UserError

CHECKPOINT_NAME = "checkpoint.pt"
# what scripts/fit.py writes and needs to resume
REQUIRED_KEYS = frozenset({"config", "stage", "x", "state", "step"})


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace``: a crash mid-write never
    leaves a truncated checkpoint behind (the rename is atomic on POSIX and Windows)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint of a run directory (or a checkpoint file). Raises UserError naming the path."""
    p = Path(run_dir)
    if p.is_dir():
        p = p / CHECKPOINT_NAME
    if not p.is_file():
        raise UserError(f"no checkpoint to resume from: {p} does not exist")
    try:
        # the payload holds the solver's state dataclass, so this is not a weights-only load:
        # only resume from run directories you trust.
        payload = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise UserError(f"cannot read checkpoint {p}: {type(e).__name__}: {first}") from None
    missing = sorted(REQUIRED_KEYS - set(payload)) if isinstance(payload, dict) else sorted(REQUIRED_KEYS)
    if missing:
        raise UserError(f"{p} is not a fit checkpoint (a torch file without {', '.join(missing)})")
    return payload
