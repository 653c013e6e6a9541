"""Matrix-free linear algebra for least squares: Jacobian products and preconditioned CG."""

from diffrender.linalg.cg import CGResult, pcg
from diffrender.linalg.operator import Counters, JacobianOperator

__all__ = ["CGResult", "Counters", "JacobianOperator", "pcg"]
