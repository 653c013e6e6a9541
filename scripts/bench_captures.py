#!/usr/bin/env python
"""Benchmark the ``images`` scene on captures nobody rendered with our rasterizer (issue 10's goals).

    python scripts/bench_captures.py                     # all three goals, one torch thread
    python scripts/bench_captures.py --goal pose --repeats 3 --json rows.jsonl
    python scripts/bench_captures.py --goal shape --repeats 3 --shape-args "" --shape-args scene.silhouette_levels=5

Targets come from an independent hard z-buffer rasterizer in numpy (``tests/reference_zbuffer.py``: pixel-center
point-in-triangle tests and a depth test, crisp texture lookups), written to disk in the three formats and read
back by the scene, as a user's data would be:

* pose: the PyTorch3D tutorial's teapot seen from distance 3, elevation 50°, one 256² mask file (cameras.json
  + ``masks/{stem}.png``); the camera eye is the unknown, starting at the tutorial's far start (3, 6.9, 2.5).
  Goal: direction error < 0.5° and distance error < 1 % with LM in under 10 s.
* shape: the spot cow from 8 views at 128², masks beside the images (COLMAP text + ``masks/{name}.png``), from
  an icosphere. Goal: hard IoU >= 0.98 against the masks.
* color: the textured cow over a gray background, 8 RGB views at 128² (``transforms.json``), known geometry and
  cameras, per-vertex colors free. Goal: PSNR within 0.5 dB of the best per-vertex colors can do (the
  least-squares optimum of the hard render, solved to convergence here), and no divergence.

The fits run the scene's stages with LM as ``scripts/fit.py`` does, options from ``conf/solver/lm.yaml``. The
table gives medians over ``--repeats`` runs; search and solver times are separate (the search is part of the
scene build). Times on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import dataset_writers as DW  # noqa: E402
import numpy as np  # noqa: E402
import reference_zbuffer as Z  # noqa: E402
import torch  # noqa: E402

# torch.func's VJPs import torch._dynamo on first use (~1-5 s): import it up front, as scripts/fit.py does, so
# that the one-time import is not counted as solver time
import torch._dynamo  # noqa: E402, F401
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

import diffrender.config  # noqa: E402, F401  (registers the config schemas that conf/ names)
from diffrender.scenes.base import BuildContext  # noqa: E402

SPOT_VIEWS = dict(n=8, distance=2.7, elevations=(-20.0, 25.0), fov=50.0)


def orbit(n: int, distance: float, elevations, azimuth0: float = 10.0) -> np.ndarray:
    az = np.radians(azimuth0 + np.arange(n) * 360.0 / n)
    el = np.radians(np.asarray(elevations)[np.arange(n) % len(elevations)])
    return distance * np.stack([np.cos(el) * np.sin(az), np.sin(el), np.cos(el) * np.cos(az)], -1)


def normalized_spot():
    v, f, uv, uvf = Z.read_obj(ROOT / "assets" / "spot.obj")
    c = (v.min(0) + v.max(0)) / 2
    v = (v - c) / np.linalg.norm(v - c, axis=1).max()  # as diffrender.mesh.normalize
    return v, f, uv, uvf


def write_obj(path: Path, v: np.ndarray, f: np.ndarray) -> None:
    lines = [f"v {a:.9g} {b:.9g} {c:.9g}" for a, b, c in v] + [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in f]
    path.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------ datasets
def pose_data(folder: Path, size: int = 256) -> dict:
    v, f, _, _ = Z.read_obj(ROOT / "assets" / "teapot.obj")
    e = math.radians(50.0)
    eye_true = 3.0 * np.array([0.0, math.sin(e), math.cos(e)])
    fx = 0.5 * size / math.tan(math.radians(30))
    R, t = Z.look_at(eye_true)
    alpha, rgb, _ = Z.rasterize(v, f, R, t, fx, fx, size / 2, size / 2, size, size, colors=np.full_like(v, 0.8))
    (folder / "masks").mkdir()
    DW.write_image(folder / "view_000.png", rgb)
    DW.write_image(folder / "masks" / "view_000.png", alpha)
    R0, t0 = Z.look_at([3.0, 6.9, 2.5])  # the tutorial's far start
    DW.write_cameras_json(folder, [R0], [t0], [[fx, fx, size / 2, size / 2]], size, size, ["view_000.png"],
                          mesh=str(ROOT / "assets" / "teapot.obj"), use_fov=True)
    return {"eye_true": eye_true}


def spot_cameras(size: int):
    eyes = orbit(SPOT_VIEWS["n"], SPOT_VIEWS["distance"], SPOT_VIEWS["elevations"])
    fx = 0.5 * size / math.tan(math.radians(SPOT_VIEWS["fov"] / 2))
    Rs, ts = zip(*(Z.look_at(e) for e in eyes), strict=True)
    return np.stack(Rs), np.stack(ts), [[fx, fx, size / 2, size / 2]] * len(eyes)


def shape_data(folder: Path, size: int = 128) -> dict:
    v, f, _, _ = normalized_spot()
    R, t, K = spot_cameras(size)
    names = [f"view_{i:03d}.png" for i in range(len(R))]
    DW.write_colmap(folder, R, t, K, size, size, names)
    (folder / "masks").mkdir()
    for i, name in enumerate(names):
        alpha, rgb, _ = Z.rasterize(v, f, R[i], t[i], *K[i], size, size, colors=np.full_like(v, 0.7))
        DW.write_image(folder / "images" / name, rgb)
        DW.write_image(folder / "masks" / f"{name}.png", alpha)
    return {"verts": v}


def color_data(folder: Path, size: int = 128, gray: float = 0.5) -> dict:
    from PIL import Image

    v, f, uv, uvf = normalized_spot()
    tex = np.asarray(Image.open(ROOT / "assets" / "spot_texture.png").convert("RGB"), np.float64) / 255
    R, t, K = spot_cameras(size)
    names = [f"view_{i:03d}.png" for i in range(len(R))]
    for i, name in enumerate(names):
        _, rgb, _ = Z.rasterize(v, f, R[i], t[i], *K[i], size, size, uvs=uv, uv_faces=uvf, texture=tex,
                                background=(gray,) * 3)
        DW.write_image(folder / name, rgb)
    write_obj(folder / "spot_normalized.obj", v, f)
    DW.write_transforms_json(folder, R, t, K, size, size, names, extra={"mesh": "spot_normalized.obj"})
    return {"verts": v, "faces": f, "R": R, "t": t, "K": K, "size": size}


# ------------------------------------------------------------------------------------------ running a fit
def build_scene(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["scene=images", *overrides])
    ctx = BuildContext(renderer=OmegaConf.to_container(cfg.renderer), root=ROOT)
    t0 = time.perf_counter()
    scene = instantiate(cfg.scene, _partial_=True)(ctx=ctx)
    return scene, time.perf_counter() - t0


def lm_solver(overrides: list[str] = (), **kw):
    """The app's LM (conf/solver/lm.yaml composed with its schema, as fit.py does), with fit.py's ``solver.*``
    ``overrides`` and then ``kw`` on top."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        node = compose("config", overrides=["scene=images", "solver=lm", *overrides]).solver
    return instantiate(node, **kw)


def run_stages(scene, solver_kw: dict | None = None, watch=None,
               solver_overrides: list[str] = ()) -> tuple[dict, float, float, int]:
    """Run every stage as scripts/fit.py does; (x, solver seconds, wall seconds, iterations)."""
    x = {k: v.clone() for k, v in scene.x0.items()}
    solver_s, its, t0 = 0.0, 0, time.perf_counter()
    for st in scene.stages:
        problem = st.make_problem(x)
        cap = {} if st.max_iterations is None else {"max_iterations": st.max_iterations}  # as fit.py caps it
        solver = lm_solver(solver_overrides, **{**(solver_kw or {}), **cap})
        res = solver.solve(problem, {k: x[k] for k in st.keys}, callback=watch)
        x.update({k: v.detach() for k, v in res.x.items()})
        solver_s += sum(r.seconds for r in res.records)
        its += len(res.records) - 1
    return x, solver_s, time.perf_counter() - t0, its


class SearchLog(logging.Handler):
    """Catches the scene's viewpoint-search line to report its time."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds, self.start_iou, self.iou = 0.0, math.nan, math.nan

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()  # "viewpoint search: K candidates in S s, hard IoU at HxW A -> B"
        if msg.startswith("viewpoint search"):
            self.seconds = float(msg.split(" in ")[1].split(" s")[0])
            self.start_iou, self.iou = (float(v) for v in msg.split()[-3::2])


def goal_pose(tmp: Path) -> dict:
    gt = pose_data(tmp)
    handler = SearchLog()
    logging.getLogger("diffrender.scenes.images").addHandler(handler)
    logging.getLogger("diffrender.scenes.images").setLevel(logging.INFO)
    scene, build_s = build_scene([f"scene.folder={tmp}", "scene.masks='masks/{stem}.png'", "scene.free=[camera_eye]"])
    x, solver_s, wall_s, its = run_stages(scene)
    eye = x["camera_eye"].double().numpy()
    cos = eye @ gt["eye_true"] / np.linalg.norm(eye) / np.linalg.norm(gt["eye_true"])
    m = scene.metrics_fn(x, scene.render_fn(x))
    return {"dir_err_deg": math.degrees(math.acos(min(1.0, cos))),
            "dist_err_pct": 100 * abs(np.linalg.norm(eye) / np.linalg.norm(gt["eye_true"]) - 1),
            "hard_iou": m["iou"], "search_iou_start": handler.start_iou, "search_iou": handler.iou,
            "search_s": handler.seconds, "build_s": build_s, "lm_s": solver_s,
            "lm_wall_s": wall_s, "iterations": its, "stages": len(scene.stages)}


def goal_shape(tmp: Path, extra: list[str]) -> dict:
    """``extra``: fit.py overrides; ``solver.*`` ones go to the LM, the rest to the scene."""
    shape_data(tmp)
    solver_overrides = [o for o in extra if o.startswith("solver.")]
    scene, build_s = build_scene([f"scene.folder={tmp}", "scene.masks='masks/{name}.png'", "scene.mesh=sphere",
                                  "scene.sphere_radius=0.6", "scene.free=[offsets]",
                                  *(o for o in extra if o not in solver_overrides)])
    x, solver_s, wall_s, its = run_stages(scene, solver_overrides=solver_overrides)
    m = scene.metrics_fn(x, scene.render_fn(x))
    return {"hard_iou": m["iou"], "build_s": build_s, "lm_s": solver_s, "lm_wall_s": wall_s, "iterations": its,
            "stages": len(scene.stages), "vertices": int(scene.mesh_fn(x)[0].shape[0])}


def goal_color(tmp: Path) -> dict:
    data = color_data(tmp)
    scene, build_s = build_scene([f"scene.folder={tmp}", "scene.free=[colors]", "scene.background_color=[0.5,0.5,0.5]"])
    biggest = [0.0]

    def watch(record, x, state=None):
        biggest[0] = max(biggest[0], float(x["colors"].abs().max()))

    x, solver_s, wall_s, its = run_stages(scene, watch=watch)
    m = scene.metrics_fn(x, scene.render_fn(x))
    best = best_colors_psnr(data, scene.target["rgb"], 0.5, x["colors"])
    return {"psnr": m["psnr"], "best_psnr": best, "gap_db": best - m["psnr"], "max_abs_color": biggest[0],
            "build_s": build_s, "lm_s": solver_s, "lm_wall_s": wall_s, "iterations": its}


def best_colors_psnr(data: dict, target: torch.Tensor, gray: float, start: torch.Tensor) -> float:
    """PSNR of the per-vertex colors that minimize the hard render's squared error against ``target``: a linear
    least-squares problem (for fixed geometry the render is linear in the colors), solved by LM/CG to
    convergence from ``start``."""
    from diffrender import render as R
    from diffrender.camera import Camera
    from diffrender.problem import Problem
    from diffrender.scenes.hard import HARD_SIGMA

    kw = dict(dtype=target.dtype)
    K = torch.tensor(data["K"], **kw)
    cam = Camera(torch.tensor(data["R"], **kw), torch.tensor(data["t"], **kw), K[:, :2].contiguous(),
                 K[:, 2:].contiguous(), data["size"], data["size"])
    v, f = torch.tensor(data["verts"], **kw), torch.tensor(data["faces"])
    settings = R.RenderSettings(sigma=HARD_SIGMA, gamma=1e-4, cull_backfaces=False)
    pairs = R.prepare(v, f, cam, settings)

    def image(colors):
        out = R.render(v, f, cam, pairs, settings, colors=colors, outputs=("alpha", "rgb"))
        return out["rgb"] + (1 - out["alpha"]).unsqueeze(-1) * gray

    res = lm_solver(max_iterations=100, function_tolerance=1e-12, max_cg_iterations=1000).solve(
        Problem(lambda p, ctx: image(p["colors"]) - target), {"colors": start.clone()})
    with torch.no_grad():
        return -10 * math.log10(float(((image(res.x["colors"]).clamp(0, 1) - target) ** 2).mean()))


# ------------------------------------------------------------------------------------------ main
GOALS = {
    "pose": ("dir < 0.5°, dist < 1 %, LM < 10 s",
             lambda r: r["dir_err_deg"] < 0.5 and r["dist_err_pct"] < 1 and r["lm_s"] < 10),
    "shape": ("hard IoU >= 0.98", lambda r: r["hard_iou"] >= 0.98),
    "color": ("PSNR within 0.5 dB of best, no divergence", lambda r: r["gap_db"] <= 0.5 and r["max_abs_color"] < 10),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--goal", choices=list(GOALS), action="append", help="run only these goals (repeatable)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per goal; the table shows medians")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shape-args", action="append",
                    help="extra fit.py overrides for the shape goal (scene.* and solver.*), space separated; "
                         "repeatable: one row each, their repeats interleaved (e.g. --shape-args '' "
                         "--shape-args scene.silhouette_levels=5)")
    ap.add_argument("--json", help="append one JSON row per goal to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for goal in args.goal or list(GOALS):
        variants = (args.shape_args or [""]) if goal == "shape" else [""]
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for _ in range(args.repeats):  # the variants interleaved, so that the machine's drift hits each alike
            for v in variants:
                with tempfile.TemporaryDirectory() as d:
                    tmp = Path(d)
                    if goal == "pose":
                        runs[v].append(goal_pose(tmp))
                    elif goal == "shape":
                        runs[v].append(goal_shape(tmp, v.split()))
                    else:
                        runs[v].append(goal_color(tmp))
        for v, rs in runs.items():
            row = {k: statistics.median([r[k] for r in rs]) for k in rs[0] if isinstance(rs[0][k], int | float)}
            row.update(goal=goal, target=GOALS[goal][0], met=GOALS[goal][1](row), repeats=args.repeats,
                       device="cpu", threads=args.threads, torch=torch.__version__)
            if v:
                row["args"] = v
            rows.append(row)
            print(f"{goal}: " + ", ".join(f"{k} {x:.4g}" if isinstance(x, float) else f"{k} {x}"
                                          for k, x in row.items()), flush=True)
    print()
    print(f"{'goal':<6} {'target':<44} {'met':<4} figures")
    for r in rows:
        figs = {k: v for k, v in r.items() if k not in ("goal", "target", "met", "repeats", "device", "threads",
                                                           "torch")}
        print(f"{r['goal']:<6} {r['target']:<44} {'yes' if r['met'] else 'no':<4} "
              + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figs.items()))
    if args.json:
        with open(args.json, "a") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
