"""Globalization strategies: what to do with a step (trust region by the gain ratio, Armijo line search)."""

from diffrender.solvers.search.base import Search
from diffrender.solvers.search.line_search import ArmijoLineSearch
from diffrender.solvers.search.trust_region import ClassicalRadius, NielsenDamping, RegionPolicy, TrustRegion

__all__ = ["Search", "ArmijoLineSearch", "TrustRegion", "RegionPolicy", "NielsenDamping", "ClassicalRadius"]
