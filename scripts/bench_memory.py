#!/usr/bin/env python
"""Peak memory of a fit versus views x pixels, per scene: the measurements behind the README's memory
table and the slopes in ``diffrender/memory.py`` (the start-time refusal of fits too large to fit).

Each row is one ``scripts/fit.py`` run in its own process (LM, float32, CPU, one thread, no TensorBoard or
images), with ``solver.function_tolerance=1`` so that every stage (σ schedule, color) runs about one
iteration: the peak is reached in a stage's first linearization and linear solve. ``peak MB`` is the
process's max RSS (summary.json ``peak_rss_mb``); ``above base`` subtracts the same scene at 1 view of
16x16 px (python, torch, the mesh); ``B/view-px`` divides that by views x height x width.

    python scripts/bench_memory.py                  # the default grid (about 12 runs)
    python scripts/bench_memory.py --scene cow_shape --json rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# scene -> [(views, size)], the first one the baseline
GRID = {
    "teapot_pose": [(1, 16), (1, 128), (1, 256)],
    "cow_shape": [(1, 16), (4, 64), (8, 96)],
    "bunny_silhouette": [(1, 16), (4, 64), (8, 96)],
    "lights_albedo": [(1, 16), (2, 64), (4, 96)],
}


def run(scene: str, views: int, size: int, tmp: Path) -> dict:
    out = tmp / f"{scene}_{views}_{size}"
    args = [sys.executable, str(ROOT / "scripts" / "fit.py"), f"scene={scene}", f"renderer.image_size={size}",
            "logging=minimal", "logging.history=false", "solver.function_tolerance=1", "solver.max_iterations=10",
            "device.memory_check=false", f"hydra.run.dir={out}", f"cache_dir={tmp / 'cache'}"]
    if scene != "teapot_pose":
        args.append(f"scene.views={views}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true"}
    p = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp)
    if p.returncode != 0:
        raise SystemExit(f"{scene} {views}x{size}: exit {p.returncode}\n{p.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"scene": scene, "views": views, "size": size, "view_px": views * size * size,
            "peak_mb": s["peak_rss_mb"], "iterations": s["iterations"], "stages": len(s["stages"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scene", choices=sorted(GRID), action="append", help="only these scenes (repeatable)")
    ap.add_argument("--json", help="append the rows as JSON lines to this file")
    a = ap.parse_args()
    rows = []
    print(f"{'scene':>16} {'views':>5} {'size':>5} {'view-px':>9} {'stages':>6} {'its':>4} {'peak MB':>8} "
          f"{'above base':>10} {'B/view-px':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for scene in a.scene or GRID:
            base = None
            for views, size in GRID[scene]:
                r = run(scene, views, size, Path(tmp))
                base = base or r
                r["above_base_mb"] = r["peak_mb"] - base["peak_mb"]
                extra = r["view_px"] - base["view_px"]
                r["bytes_per_view_px"] = r["above_base_mb"] * 2**20 / extra if extra > 0 else float("nan")
                rows.append(r)
                print(f"{scene:>16} {views:>5} {size:>5} {r['view_px']:>9} {r['stages']:>6} {r['iterations']:>4} "
                      f"{r['peak_mb']:>8.0f} {r['above_base_mb']:>10.0f} {r['bytes_per_view_px']:>9.0f}", flush=True)
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "device": "cpu", "dtype": "float32", "solver": "lm"}) + "\n")


if __name__ == "__main__":
    main()
