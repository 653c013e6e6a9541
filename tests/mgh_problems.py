"""Moré, Garbow & Hillstrom (1981), "Testing unconstrained optimization software", ACM TOMS 7(1), problems 1-19.

Each problem is a residual function ``r(x: (n,)) -> (m,)`` in torch, its standard starting point, and the
known minimum ``f* = sum r^2`` (MGH's convention; our solvers' cost is ``1/2 sum r^2``).  ``f_star`` is
the global minimum listed by MGH (6 digits there; the extra digits are the values usually quoted in the
literature and agree to >= 10 digits with scipy's MINPACK run at 1e-15 tolerances).  Problem 2 has a
local minimum f = 48.9842... that standard starts reach; 18 a local one at 5.65565e-3.  Gulf research
uses m = 99.  Shared by tests/test_mgh.py and scripts/bench_solvers.py (which adds tests/ to sys.path).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MGHProblem:
    number: int
    name: str
    n: int
    m: int
    x0: tuple[float, ...]
    f_star: float  # sum of squares at the (global) minimum
    residual: Callable[[Tensor], Tensor]
    f_local: tuple[float, ...] = ()  # finite local minima listed by MGH that standard starts can reach

    def start(self, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Tensor:
        return torch.tensor(self.x0, dtype=dtype, device=device)


def _i(m: int, x: Tensor) -> Tensor:
    return torch.arange(1, m + 1, dtype=x.dtype, device=x.device)


def _const(values, x: Tensor) -> Tensor:
    return torch.tensor(values, dtype=x.dtype, device=x.device)


def rosenbrock(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


def freudenstein_roth(x):
    return torch.stack([
        -13 + x[0] + ((5 - x[1]) * x[1] - 2) * x[1],
        -29 + x[0] + ((x[1] + 1) * x[1] - 14) * x[1],
    ])


def powell_badly_scaled(x):
    return torch.stack([1e4 * x[0] * x[1] - 1, torch.exp(-x[0]) + torch.exp(-x[1]) - 1.0001])


def brown_badly_scaled(x):
    return torch.stack([x[0] - 1e6, x[1] - 2e-6, x[0] * x[1] - 2])


def beale(x):
    y = _const([1.5, 2.25, 2.625], x)
    i = _i(3, x)
    return y - x[0] * (1 - x[1] ** i)


def jennrich_sampson(x):
    i = _i(10, x)
    return 2 + 2 * i - (torch.exp(i * x[0]) + torch.exp(i * x[1]))


def helical_valley(x):
    ratio = torch.atan(x[1] / x[0]) / (2 * math.pi)
    theta = torch.where(x[0] > 0, ratio, ratio + 0.5)
    return torch.stack([
        10 * (x[2] - 10 * theta),
        10 * (torch.sqrt(x[0] ** 2 + x[1] ** 2) - 1),
        x[2],
    ])


_BARD_Y = [0.14, 0.18, 0.22, 0.25, 0.29, 0.32, 0.35, 0.39, 0.37, 0.58, 0.73, 0.96, 1.34, 2.10, 4.39]


def bard(x):
    u = _i(15, x)
    v = 16 - u
    w = torch.minimum(u, v)
    return _const(_BARD_Y, x) - (x[0] + u / (v * x[1] + w * x[2]))


_GAUSS_Y = [0.0009, 0.0044, 0.0175, 0.0540, 0.1295, 0.2420, 0.3521, 0.3989, 0.3521, 0.2420, 0.1295,
            0.0540, 0.0175, 0.0044, 0.0009]


def gaussian(x):
    t = (8 - _i(15, x)) / 2
    return x[0] * torch.exp(-x[1] * (t - x[2]) ** 2 / 2) - _const(_GAUSS_Y, x)


_MEYER_Y = [34780, 28610, 23650, 19630, 16370, 13720, 11540, 9744, 8261, 7030, 6005, 5147, 4427, 3820,
            3307, 2872]


def meyer(x):
    t = 45 + 5 * _i(16, x)
    return x[0] * torch.exp(x[1] / (t + x[2])) - _const(_MEYER_Y, x)


GULF_M = 99


def gulf(x):
    t = _i(GULF_M, x) / 100
    y = 25 + (-50 * torch.log(t)) ** (2.0 / 3.0)
    return torch.exp(-torch.abs(y - x[1]) ** x[2] / x[0]) - t


def box3d(x):
    t = 0.1 * _i(10, x)
    return torch.exp(-t * x[0]) - torch.exp(-t * x[1]) - x[2] * (torch.exp(-t) - torch.exp(-10 * t))


def powell_singular(x):
    return torch.stack([
        x[0] + 10 * x[1],
        math.sqrt(5) * (x[2] - x[3]),
        (x[1] - 2 * x[2]) ** 2,
        math.sqrt(10) * (x[0] - x[3]) ** 2,
    ])


def wood(x):
    return torch.stack([
        10 * (x[1] - x[0] ** 2),
        1 - x[0],
        math.sqrt(90) * (x[3] - x[2] ** 2),
        1 - x[2],
        math.sqrt(10) * (x[1] + x[3] - 2),
        (x[1] - x[3]) / math.sqrt(10),
    ])


_KO_Y = [0.1957, 0.1947, 0.1735, 0.1600, 0.0844, 0.0627, 0.0456, 0.0342, 0.0323, 0.0235, 0.0246]
_KO_U = [4.0, 2.0, 1.0, 0.5, 0.25, 0.167, 0.125, 0.1, 0.0833, 0.0714, 0.0625]


def kowalik_osborne(x):
    u = _const(_KO_U, x)
    return _const(_KO_Y, x) - x[0] * (u**2 + u * x[1]) / (u**2 + u * x[2] + x[3])


def brown_dennis(x):
    t = _i(20, x) / 5
    return (x[0] + t * x[1] - torch.exp(t)) ** 2 + (x[2] + x[3] * torch.sin(t) - torch.cos(t)) ** 2


_OS1_Y = [0.844, 0.908, 0.932, 0.936, 0.925, 0.908, 0.881, 0.850, 0.818, 0.784, 0.751, 0.718, 0.685, 0.658,
          0.628, 0.603, 0.580, 0.558, 0.538, 0.522, 0.506, 0.490, 0.478, 0.467, 0.457, 0.448, 0.438, 0.431,
          0.424, 0.420, 0.414, 0.411, 0.406]


def osborne1(x):
    t = 10 * (_i(33, x) - 1)
    return _const(_OS1_Y, x) - (x[0] + x[1] * torch.exp(-t * x[3]) + x[2] * torch.exp(-t * x[4]))


def biggs_exp6(x):
    t = 0.1 * _i(13, x)
    y = torch.exp(-t) - 5 * torch.exp(-10 * t) + 3 * torch.exp(-4 * t)
    return x[2] * torch.exp(-t * x[0]) - x[3] * torch.exp(-t * x[1]) + x[5] * torch.exp(-t * x[4]) - y


_OS2_Y = [1.366, 1.191, 1.112, 1.013, 0.991, 0.885, 0.831, 0.847, 0.786, 0.725, 0.746, 0.679, 0.608, 0.655,
          0.616, 0.606, 0.602, 0.626, 0.651, 0.724, 0.649, 0.649, 0.694, 0.644, 0.624, 0.661, 0.612, 0.558,
          0.533, 0.495, 0.500, 0.423, 0.395, 0.375, 0.372, 0.391, 0.396, 0.405, 0.428, 0.429, 0.523, 0.562,
          0.607, 0.653, 0.672, 0.708, 0.633, 0.668, 0.645, 0.632, 0.591, 0.559, 0.597, 0.625, 0.739, 0.710,
          0.729, 0.720, 0.636, 0.581, 0.428, 0.292, 0.162, 0.098, 0.054]


def osborne2(x):
    t = (_i(65, x) - 1) / 10
    model = (x[0] * torch.exp(-t * x[4]) + x[1] * torch.exp(-((t - x[8]) ** 2) * x[5])
             + x[2] * torch.exp(-((t - x[9]) ** 2) * x[6]) + x[3] * torch.exp(-((t - x[10]) ** 2) * x[7]))
    return _const(_OS2_Y, x) - model


PROBLEMS: list[MGHProblem] = [
    MGHProblem(1, "Rosenbrock", 2, 2, (-1.2, 1.0), 0.0, rosenbrock),
    MGHProblem(2, "Freudenstein-Roth", 2, 2, (0.5, -2.0), 0.0, freudenstein_roth, (48.9842536792,)),
    MGHProblem(3, "Powell badly scaled", 2, 2, (0.0, 1.0), 0.0, powell_badly_scaled),
    MGHProblem(4, "Brown badly scaled", 2, 3, (1.0, 1.0), 0.0, brown_badly_scaled),
    MGHProblem(5, "Beale", 2, 3, (1.0, 1.0), 0.0, beale),
    MGHProblem(6, "Jennrich-Sampson", 2, 10, (0.3, 0.4), 124.362182355, jennrich_sampson),
    MGHProblem(7, "Helical valley", 3, 3, (-1.0, 0.0, 0.0), 0.0, helical_valley),
    MGHProblem(8, "Bard", 3, 15, (1.0, 1.0, 1.0), 8.21487730657897e-3, bard),
    MGHProblem(9, "Gaussian", 3, 15, (0.4, 1.0, 0.0), 1.12793276961912e-8, gaussian),
    MGHProblem(10, "Meyer", 3, 16, (0.02, 4000.0, 250.0), 87.9458551718, meyer),
    MGHProblem(11, "Gulf research", 3, GULF_M, (5.0, 2.5, 0.15), 0.0, gulf),
    MGHProblem(12, "Box 3-D", 3, 10, (0.0, 10.0, 20.0), 0.0, box3d),
    MGHProblem(13, "Powell singular", 4, 4, (3.0, -1.0, 0.0, 1.0), 0.0, powell_singular),
    MGHProblem(14, "Wood", 4, 6, (-3.0, -1.0, -3.0, -1.0), 0.0, wood),
    MGHProblem(15, "Kowalik-Osborne", 4, 11, (0.25, 0.39, 0.415, 0.39), 3.07505603849e-4, kowalik_osborne),
    MGHProblem(16, "Brown-Dennis", 4, 20, (25.0, 5.0, -5.0, -1.0), 85822.2016263563, brown_dennis),
    MGHProblem(17, "Osborne 1", 5, 33, (0.5, 1.5, -1.0, 0.01, 0.02), 5.46489469748e-5, osborne1),
    MGHProblem(18, "Biggs EXP6", 6, 13, (1.0, 2.0, 1.0, 1.0, 1.0, 1.0), 0.0, biggs_exp6, (5.65565e-3,)),
    MGHProblem(19, "Osborne 2", 11, 65, (1.3, 0.65, 0.65, 0.7, 0.6, 3.0, 5.0, 7.0, 2.0, 4.5, 5.5),
               4.01377362935e-2, osborne2),
]


def lre(f: float, f_star: float) -> float:
    """Log relative error ``-log10(|f - f*| / |f*|)`` (digits of agreement), capped at 15; for ``f* = 0``
    it is ``-log10(f)`` (capped too)."""
    if not math.isfinite(f):
        return 0.0
    if f_star == 0.0:
        return 15.0 if f <= 0 else min(15.0, max(0.0, -math.log10(f)))
    err = abs(f - f_star) / abs(f_star)
    return 15.0 if err == 0 else min(15.0, max(0.0, -math.log10(err)))


def reached(f: float, f_star: float) -> bool:
    """The issue's criterion: >= 4 correct digits, or ``f <= 1e-10`` when ``f* = 0``."""
    if not math.isfinite(f):
        return False
    return f <= 1e-10 if f_star == 0.0 else lre(f, f_star) >= 4.0


def classify(problem: MGHProblem, f: float) -> str:
    """``"global"`` if ``f`` (a sum of squares) reaches the global minimum, ``"local"`` if it reaches one
    of the local minima MGH list, else ``"no"``."""
    if reached(f, problem.f_star):
        return "global"
    if any(reached(f, fl) for fl in problem.f_local):
        return "local"
    return "no"


def best_lre(problem: MGHProblem, f: float) -> float:
    """LRE against the listed minimum (global or local) that ``f`` is closest to in digits."""
    return max([lre(f, problem.f_star)] + [lre(f, fl) for fl in problem.f_local])
