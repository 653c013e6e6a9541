#!/usr/bin/env python
"""Benchmark what one iteration costs on the shape scenes: Levenberg-Marquardt (the app's defaults) against
Adam, with the silhouette sweeps' kept linear maps on and off (raster/native.py: the per-pair coefficients
of J built at the first product at a point, so that the products after it are one gather-scatter pass
instead of a sweep each), and the products themselves. Scenes as ``bench_fit.py`` sets them up (48², 12
views, σ = 3e-4, silhouettes only).

    python scripts/bench_iteration.py
    python scripts/bench_iteration.py --scene cow_shape --iterations 20 --repeats 3

One thread; per-iteration medians over ``--iterations`` iterations from the start point (the first, with
its warm-up, left out), each configuration run ``--repeats`` times alternating, the median of those taken.
Products: medians of ``--repeats`` × 5 calls at the start point.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchutil import SHAPE_SCENES, median_ms, shape_problem  # noqa: E402

SCENES = SHAPE_SCENES


def setup(scene: str):
    """(problem, x, lm config, adam config) at the scene's start point."""
    problem, x, nodes = shape_problem(scene, {"lm": ["solver=lm"], "adam": ["solver=adam", "solver.lr=0.05"]})
    return problem, x, nodes["lm"], nodes["adam"]


def per_iteration_ms(problem, x, node, iterations: int) -> float:
    from hydra.utils import instantiate

    solver = instantiate(node, max_iterations=iterations, max_seconds=1e9)
    result = solver.solve(problem, {k: v.clone() for k, v in x.items()})
    return 1e3 * statistics.median(r.seconds for r in result.records if r.iteration > 1)


def measure(scene: str, iterations: int, repeats: int) -> list[dict]:
    from diffrender.raster import native

    problem, x, lm, adam = setup(scene)
    ctx = problem.prepare_context(x)
    rows = []
    for keep in (False, True):
        native.keep_linear_maps(keep)
        lin = problem.linearize(x, ctx)
        u = torch.randn(lin.op.n, generator=torch.Generator().manual_seed(0))
        ms = lambda f: median_ms(f, torch.device("cpu"), 5 * repeats)  # noqa: E731
        rows.append({"scene": scene, "kept": keep, "n": lin.op.n, "m": lin.op.m,
                     "jvp_ms": ms(lambda lin=lin, u=u: lin.op.jvp(u)),
                     "vjp_ms": ms(lambda lin=lin: lin.op.vjp(lin.residual)), "adam": [], "lm": []})
    for _ in range(repeats):  # alternate, so that a slower spell of the machine hits both alike
        for row in rows:
            native.keep_linear_maps(row["kept"])
            row["adam"].append(per_iteration_ms(problem, x, adam, iterations))
            row["lm"].append(per_iteration_ms(problem, x, lm, iterations))
    native.keep_linear_maps(True)
    for row in rows:
        row["adam_ms"], row["lm_ms"] = statistics.median(row.pop("adam")), statistics.median(row.pop("lm"))
        row["lm_over_adam"] = row["lm_ms"] / row["adam_ms"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", choices=SCENES, action="append", help="only this scene (repeatable)")
    ap.add_argument("--iterations", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from diffrender.raster import native

    print(f"# device: cpu, torch {torch.__version__}, threads 1, float32; per-iteration medians of "
          f"{args.iterations - 1} iterations x {args.repeats} runs; rasterizer: {native.status()}")
    keys = ["scene", "kept", "n", "m", "jvp_ms", "vjp_ms", "adam_ms", "lm_ms", "lm_over_adam"]
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for scene in args.scene or list(SCENES):
        for row in measure(scene, args.iterations, args.repeats):
            print("| " + " | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in keys)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
