"""Direction computations: damped Gauss-Newton (the LM step), Powell's dogleg, Steihaug-Toint Newton-CG."""

from diffrender.solvers.descent.base import Descent, Region, Step
from diffrender.solvers.descent.damped_gauss_newton import DampedGaussNewton
from diffrender.solvers.descent.dogleg import Dogleg
from diffrender.solvers.descent.scaling import DiagonalScaling, IdentityScaling
from diffrender.solvers.descent.steihaug import SteihaugNewton

__all__ = ["Descent", "Region", "Step", "DampedGaussNewton", "Dogleg", "DiagonalScaling", "IdentityScaling",
           "SteihaugNewton"]
