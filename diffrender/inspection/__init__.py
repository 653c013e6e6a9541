"""Looking inside a fit, for any Problem (solving wing: no renderer here): explicit Jacobian entries, rows,
columns and blocks; the Gauss-Newton/Newton gap; conditioning by Lanczos; parameter covariance."""

from diffrender.inspection.conditioning import Conditioning, conditioning, solver_preconditioner
from diffrender.inspection.covariance import Uncertainty, covariance
from diffrender.inspection.jacobian import (
    DenseJacobian,
    GaussNewtonGap,
    Jacobian,
    ResidualLayout,
    gauss_newton_gap,
)

__all__ = ["Conditioning", "DenseJacobian", "GaussNewtonGap", "Jacobian", "ResidualLayout", "Uncertainty",
           "conditioning", "covariance", "gauss_newton_gap", "solver_preconditioner"]
