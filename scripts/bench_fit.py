#!/usr/bin/env python
"""Benchmark the solvers on the synthetic fitting scenes: time and iterations to a target, final metrics,
peak memory, and a convergence plot (cost vs solver seconds).

    python scripts/bench_fit.py                          # every synthetic scene, lm / gn / adam (lr sweep)
    python scripts/bench_fit.py --scene teapot_pose --json rows.jsonl --plot bench_fit.png
    python scripts/bench_fit.py --full                   # the issue's sizes: Adam 2,000 iterations

Each (scene, solver, lr) runs ``scripts/fit.py`` in its own process (``logging=minimal``), so peak memory
is that process's ``ru_maxrss`` (or ``torch.cuda.max_memory_allocated`` on CUDA). Times are the solver's
own per-iteration seconds summed (metrics and logging excluded). Targets:

* teapot_pose: camera direction error < 0.1° and distance error < 0.1 %;
* cow_shape, bunny_silhouette: silhouette IoU >= 0.98, or the cost the best Adam reaches at its end;
* lights_albedo: light direction error < 1° and PSNR >= 40 dB.

Shape scenes run a single σ (no coarse-to-fine, no color stage) so costs are comparable across solvers.
Timings on a shared machine are noisy: rerun before drawing conclusions from small differences.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIT = ROOT / "scripts" / "fit.py"

# per scene: fit.py overrides (quick defaults; --full uses the sizes), iterations, lr sweep
SCENES = {
    # Adam as in PyTorch3D's tutorial: one σ = 1e-4, no schedule (its stage-1 σ = 1e-2 renders are costly)
    "teapot_pose": dict(overrides=[], adam_overrides=["scene.coarse_to_fine=false"], second_order=50, adam=250,
                        full_adam=2000, lrs=[0.05, 0.1]),
    "cow_shape": dict(overrides=["renderer.image_size=48", "scene.views=12", "scene.coarse_to_fine=false",
                                 "scene.color_stage=false", "scene.sigma=3e-4"],
                      full=["renderer.image_size=64", "scene.views=20"], second_order=30, adam=300, full_adam=2000,
                      lrs=[0.003, 0.01]),
    "bunny_silhouette": dict(overrides=["renderer.image_size=48", "scene.views=12", "scene.coarse_to_fine=false",
                                        "scene.sigma=3e-4"],
                             full=["renderer.image_size=64", "scene.views=24"], second_order=30, adam=300,
                             full_adam=2000, lrs=[0.003, 0.01]),
    "lights_albedo": dict(overrides=["renderer.image_size=48", "scene.views=4"], second_order=30, adam=300,
                          full_adam=2000, lrs=[0.01, 0.03, 0.1]),
}


def reached_fn(scene: str, cost_target: float | None):
    def f(h: dict) -> bool:
        m = h.get("metrics") or {}
        if scene == "teapot_pose":
            return m.get("pose_err_deg", 1e9) < 0.1 and m.get("dist_err_pct", 1e9) < 0.1
        if scene == "lights_albedo":
            return m.get("light_dir_err_deg", 1e9) < 1.0 and m.get("psnr", 0.0) >= 40.0
        ok = m.get("iou", 0.0) >= 0.98
        return ok or (cost_target is not None and isinstance(h.get("cost"), float) and h["cost"] <= cost_target)

    return f


THREADS = "1"


def run_fit(scene: str, solver: str, overrides: list[str], work: Path, device: str) -> dict:
    out = work / f"{scene}_{solver}_{len(list(work.iterdir()))}"
    cmd = [sys.executable, str(FIT), f"scene={scene}", f"solver={solver}", "logging=minimal", f"device={device}",
           f"hydra.run.dir={out}", f"cache_dir={work / 'cache'}", *overrides]
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"bench_fit: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads((out / "summary.json").read_text())


def to_target(summary: dict, reached) -> tuple[bool, float | None, int | None]:
    for h in summary["history"]:
        if reached(h):
            return True, h["t"], h["step"]
    return False, None, None


def row(scene: str, solver: str, summary: dict, reached, lr: float | None = None) -> dict:
    ok, sec, its = to_target(summary, reached)
    peak = summary.get("cuda_peak_mb") or summary.get("peak_rss_mb")
    return {"scene": scene, "solver": solver, "lr": lr, "reached": ok, "seconds_to_target": sec,
            "iterations_to_target": its, "iterations": summary["iterations"],
            "seconds": summary["timings"]["solver_s"], "final_cost": summary.get("final_cost"),
            "final_metrics": summary["final_metrics"], "peak_mb": peak,
            "curve": [(h["t"], h["cost"]) for h in summary["history"] if isinstance(h.get("cost"), float)]}


def bench_scene(scene: str, spec: dict, full: bool, work: Path, device: str) -> list[dict]:
    over = spec["overrides"] + (spec.get("full", []) if full else [])
    adam_its = spec["full_adam"] if full else spec["adam"]
    adams = []
    for lr in spec["lrs"]:
        s = run_fit(scene, "adam", over + spec.get("adam_overrides", []) +
                    [f"solver.max_iterations={adam_its}", f"solver.lr={lr}"], work, device)
        adams.append((lr, s))
        print(f"  {scene} adam lr={lr}: final cost {s.get('final_cost')}", file=sys.stderr, flush=True)
    shape = scene in ("cow_shape", "bunny_silhouette")
    # the best Adam: reaches the target first, else the lowest final cost
    base = reached_fn(scene, None)
    best_lr, best = min(adams, key=lambda a: (to_target(a[1], base)[1] or math.inf,
                                              a[1].get("final_cost") or math.inf))
    cost_target = best.get("final_cost") if shape else None
    reached = reached_fn(scene, cost_target)
    rows = [row(scene, "adam", best, reached, best_lr)]
    for solver in ("lm", "gn"):
        s = run_fit(scene, solver, over + [f"solver.max_iterations={spec['second_order']}"], work, device)
        print(f"  {scene} {solver}: final cost {s.get('final_cost')}", file=sys.stderr, flush=True)
        rows.append(row(scene, solver, s, reached))
    return rows


def fmt(v, spec=".3g") -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return format(v, spec) if isinstance(v, float) else str(v)


def table(rows: list[dict]) -> str:
    head = ("| scene | solver | Adam lr | reached | s to target | its to target | its run | solver s | final cost "
            "| final metrics | peak MB |")
    lines = [head, "|---" * 11 + "|"]
    for r in rows:
        mets = ", ".join(f"{k} {v:.3g}" for k, v in r["final_metrics"].items() if isinstance(v, float | int))
        lines.append(f"| {r['scene']} | {r['solver']} | {fmt(r['lr'])} | {fmt(r['reached'])} | "
                     f"{fmt(r['seconds_to_target'])} | {fmt(r['iterations_to_target'])} | {r['iterations']} | "
                     f"{fmt(r['seconds'])} | {fmt(r['final_cost'], '.4g')} | {mets} | {fmt(r['peak_mb'], '.0f')} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- plot (PIL, no matplotlib)
COLORS = {"lm": (214, 39, 40), "gn": (31, 119, 180), "adam": (44, 160, 44)}


def plot(rows: list[dict], path: Path, panel=(420, 300)) -> None:
    """One panel per scene: log10(cost) against solver seconds, one polyline per solver."""
    from PIL import Image, ImageDraw

    scenes = list(dict.fromkeys(r["scene"] for r in rows))
    W, H = panel
    img = Image.new("RGB", (W * len(scenes), H), "white")
    d = ImageDraw.Draw(img)
    for k, scene in enumerate(scenes):
        ox = k * W
        rs = [r for r in rows if r["scene"] == scene and r["curve"]]
        pts = [(t, c) for r in rs for t, c in r["curve"] if c > 0 and math.isfinite(c)]
        if not pts:
            continue
        tmax = max(t for t, _ in pts) or 1.0
        lo, hi = math.log10(min(c for _, c in pts)), math.log10(max(c for _, c in pts))
        hi = hi if hi > lo else lo + 1
        left, top, right, bottom = ox + 50, 25, ox + W - 10, H - 35

        def xy(t, c, left=left, top=top, right=right, bottom=bottom, tmax=tmax, lo=lo, hi=hi):
            return (left + (right - left) * t / tmax, bottom - (bottom - top) * (math.log10(c) - lo) / (hi - lo))

        d.rectangle([left, top, right, bottom], outline="black")
        d.text((left, 5), f"{scene}: log10 cost vs solver seconds", fill="black")
        d.text((left, bottom + 5), "0", fill="black")
        d.text((right - 40, bottom + 5), f"{tmax:.1f}s", fill="black")
        d.text((ox + 5, top), f"{hi:.1f}", fill="black")
        d.text((ox + 5, bottom - 10), f"{lo:.1f}", fill="black")
        for j, r in enumerate(rs):
            line = [xy(t, c) for t, c in r["curve"] if c > 0 and math.isfinite(c)]
            col = COLORS.get(r["solver"], (0, 0, 0))
            if len(line) > 1:
                d.line(line, fill=col, width=2)
            label = r["solver"] + (f" (lr {r['lr']:g})" if r["lr"] else "")
            d.text((right - 110, top + 5 + 12 * j), label, fill=col)
    img.save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scene", choices=list(SCENES), action="append", help="run only this scene (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON lines here")
    ap.add_argument("--plot", type=Path, default=Path("bench_fit.png"), help="convergence plot (PNG)")
    ap.add_argument("--full", action="store_true", help="the issue's sizes: Adam 2,000 iterations, more views")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads per fit (1: steadier timings on a shared machine)")
    args = ap.parse_args()
    global THREADS
    THREADS = str(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_fit_") as tmp:
        for scene in args.scene or list(SCENES):
            rows += bench_scene(scene, SCENES[scene], args.full, Path(tmp), args.device)
    print(table(rows))
    for r in rows:
        if r["solver"] == "lm":
            adam = next(a for a in rows if a["scene"] == r["scene"] and a["solver"] == "adam")
            if r["seconds_to_target"] and adam["seconds_to_target"]:
                speed = adam["seconds_to_target"] / r["seconds_to_target"]
                print(f"{r['scene']}: best Adam (lr {adam['lr']:g}) time to target / LM's = {speed:.2f} "
                      f"(> 1: LM is faster)")
            else:
                print(f"{r['scene']}: target reached by LM: {fmt(r['reached'])}, by Adam: {fmt(adam['reached'])}")
    plot(rows, args.plot)
    print(f"plot: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if k != "curve"}) + "\n")


if __name__ == "__main__":
    main()
