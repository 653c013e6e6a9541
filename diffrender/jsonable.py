"""Plain JSON from what a fit produces: tensors to lists, non-finite floats as strings ("nan", "inf"), dict
keys as strings; optionally floats rounded to a number of significant digits."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["jsonable"]


def jsonable(v: Any, digits: int | None = None) -> Any:
    """``v`` made of dicts, lists, tuples, tensors and numbers -> what ``json.dumps`` writes as is."""
    if isinstance(v, dict):
        return {str(k): jsonable(w, digits) for k, w in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(w, digits) for w in v]
    if hasattr(v, "detach") and hasattr(v, "tolist"):  # a torch.Tensor, without importing torch here
        return jsonable(v.detach().cpu().tolist(), digits)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return float(f"{v:.{digits}g}") if digits else v
    return v
