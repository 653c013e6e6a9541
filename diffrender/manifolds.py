"""Parameter manifolds: how a flat tangent increment updates one named parameter tensor.

A solver works in a flat tangent vector ``delta`` over all parameters; each manifold maps its slice of
``delta`` back onto its tensor (``retract``).  The Jacobian the solvers use is the derivative of the
residuals with respect to ``delta`` at ``delta = 0``, so a manifold's ``retract`` must be differentiable
in forward and reverse mode.
"""

from __future__ import annotations

from kornia.geometry.liegroup import So3
from torch import Tensor

__all__ = ["Manifold", "Euclidean", "AxisAngleSO3"]


class Manifold:
    """Base class: a parameter tensor ``x`` and a tangent increment ``delta`` of ``tangent_numel(x)``."""

    def tangent_numel(self, x: Tensor) -> int:
        """Number of tangent coordinates of ``x`` (its degrees of freedom)."""
        return x.numel()

    def retract(self, x: Tensor, delta: Tensor) -> Tensor:
        """Move ``x`` by the flat tangent increment ``delta: (tangent_numel(x),)``; returns a tensor
        like ``x``."""
        raise NotImplementedError


class Euclidean(Manifold):
    """Plain vector space: ``x + delta``."""

    def retract(self, x: Tensor, delta: Tensor) -> Tensor:
        return x + delta.reshape(x.shape)

    def __repr__(self) -> str:
        return "Euclidean()"


class AxisAngleSO3(Manifold):
    """Rotations stored as axis-angle vectors ``x: (..., 3)`` with a left-multiplied increment.

    ``R(x_new) = Exp(delta) R(x)`` (kornia ``So3``), returned as axis-angle again through the principal
    logarithm, so the angle stays in ``[0, pi]`` and wraps cleanly through ``pi``.
    """

    def tangent_numel(self, x: Tensor) -> int:
        if x.shape[-1] != 3:
            raise ValueError(f"AxisAngleSO3 needs a (..., 3) tensor, got shape {tuple(x.shape)}")
        return x.numel()

    def retract(self, x: Tensor, delta: Tensor) -> Tensor:
        xs = x.reshape(-1, 3)
        ds = delta.reshape(-1, 3)
        out = (So3.exp(ds) * So3.exp(xs)).log()
        return out.reshape(x.shape)

    def __repr__(self) -> str:
        return "AxisAngleSO3()"
