"""Helpers for the tests of scripts/fit.py: the script as a module (in-process fits), composed configs,
small synthetic image folders, and a subprocess runner for the checks where the process is under test."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from reference_zbuffer import look_at, read_obj
from reference_zbuffer import rodrigues as rot  # noqa: F401 - tests import it from here

ROOT = Path(__file__).resolve().parents[1]
FIT = ROOT / "scripts" / "fit.py"
CONF = str(ROOT / "conf")

# a small teapot_pose: 48x48, σ = 1e-3 (about a pixel of blur), start ~11° and 10 % off the true eye
TEAPOT = ["renderer.image_size=48", "renderer.coarse_to_fine=false", "renderer.sigma=1e-3",
          "scene.start_eye=[0.6,2.6,2.0]", "solver.max_iterations=10", "logging.image_every=2",
          "logging.checkpoint_every=2", "logging.progress=never"]
TRUE_EYE = np.array([0.0, 3 * math.sin(math.radians(50)), 3 * math.cos(math.radians(50))])


def script_module(name: str):
    """scripts/<name>.py imported as a module (once), as ``<name>_script``."""
    key = f"{name}_script"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "scripts" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[key] = mod
        spec.loader.exec_module(mod)
    return sys.modules[key]


def fit_module():
    """scripts/fit.py imported as a module (once)."""
    return script_module("fit")


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import diffrender.config  # noqa: F401  (registers the schemas and resolvers)

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides))


def with_cache(tmp: Path, overrides) -> list[str]:
    return [f"cache_dir={tmp / 'cache'}", *overrides]


def run_fit(tmp: Path, *overrides: str, run: str = "run") -> dict:
    """An in-process fit into tmp/run (as ``fit.run``); returns its summary."""
    ov = with_cache(tmp, overrides)
    out = tmp / run
    out.mkdir(parents=True, exist_ok=True)
    return fit_module().run(compose(*ov), out, ov)


def cli(tmp: Path, *overrides: str, fresh: bool = True) -> tuple[int, Path]:
    """The CLI's handling in-process: exit code and the run directory. ``fresh``: the directory is made as
    the run-directory resolver makes it (so a failed run removes it again)."""
    from diffrender.config import _unique_dir

    ov = with_cache(tmp, overrides)
    cfg = compose(*ov)
    out = Path(cfg.resume) if cfg.resume else Path(_unique_dir(str(tmp / "outputs" / "run")))
    return fit_module().cli(cfg, out, ov), out


def fit_cmd(*overrides: str) -> list[str]:
    return [sys.executable, str(FIT), *overrides]


def fit_env() -> dict[str, str]:
    return {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)])}


def eye_errors(eye) -> tuple[float, float]:
    eye = np.asarray(eye, dtype=np.float64)
    cos = eye @ TRUE_EYE / (np.linalg.norm(eye) * np.linalg.norm(TRUE_EYE))
    return math.degrees(math.acos(min(1.0, cos))), abs(np.linalg.norm(eye) / np.linalg.norm(TRUE_EYE) - 1)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ---------------------------------------------------------------------------------- solvers of "researchers"
class MySolver:
    """A researcher's own solver: fixed-step gradient descent on the problem's cost. It takes one callable
    as ``callback`` (and calls it), never a list."""

    def __init__(self, max_iterations: int = 5, step: float = 1e-3, fail_after: int | None = None,
                 steps: int | None = None) -> None:
        self.max_iterations, self.step, self.fail_after = max_iterations, step, fail_after
        self.steps = steps  # stop after this many steps per solve (as if converged)

    def solve(self, problem, x0, callback=None, state=None):
        assert callback is None or callable(callback)
        x = {k: v.detach().clone() for k, v in x0.items()}
        records = []
        term = "my_solver_done"
        for it in range(1, min(self.max_iterations, self.steps or self.max_iterations) + 1):
            if self.fail_after is not None and it > self.fail_after:
                term = "failure"
                break
            xs = {k: v.clone().requires_grad_(True) for k, v in x.items()}
            cost, blocks = problem.cost(xs, problem.prepare_context(x))
            grads = torch.autograd.grad(cost, list(xs.values()))
            x = {k: (v - self.step * g).detach() for (k, v), g in zip(x.items(), grads, strict=True)}
            rec = SimpleNamespace(iteration=it, cost=float(cost.detach()), block_costs=blocks, seconds=0.0)
            records.append(rec)
            if callback is not None:
                callback(rec, x, None)
        return SimpleNamespace(x=x, cost=records[-1].cost if records else math.nan, termination=term,
                               message="gave up" if term == "failure" else "", records=records,
                               report=lambda: f"MySolver: {len(records)} steps of {self.step}")


# ---------------------------------------------------------------------------------- image folders
def write_views(folder: Path, aa, trans, size=48, views=3, ss=8) -> list[dict]:
    """Silhouettes drawn with PIL, independent of our rasterizer: projected triangles filled at ``ss``x the
    resolution, box-filtered down to a coverage alpha (PIL's fill includes edge pixels: supersampling
    keeps that bias below a pixel / ss). Returns the cameras.json view entries (also written)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    v, f, *_ = read_obj(ROOT / "assets" / "teapot.obj")
    vw = v @ rot(aa).T + np.asarray(trans)
    fx = 0.5 * size / math.tan(math.radians(25))
    entries = []
    for i in range(views):
        az = math.radians(30 + 120 * i)
        eye = 3.0 * np.array([math.cos(0.4) * math.sin(az), math.sin(0.4), math.cos(0.4) * math.cos(az)])
        R, t = look_at(eye)
        pc = vw @ R.T + t
        uv = pc[:, :2] / pc[:, 2:] * fx + size / 2  # pixel units; pixel (i, j) has its center at (j+.5, i+.5)
        big = Image.new("L", (size * ss, size * ss), 0)
        draw = ImageDraw.Draw(big)
        for tri in f:  # supersample (a, b) has its center at ((a + .5)/ss, (b + .5)/ss) in pixel units
            draw.polygon([tuple(uv[k] * ss - 0.5) for k in tri], fill=255)
        cov = np.asarray(big, dtype=np.float64).reshape(size, ss, size, ss).mean(axis=(1, 3))
        rgba = np.zeros((size, size, 4), np.uint8)
        rgba[..., :3] = 200
        rgba[..., 3] = np.round(cov).astype(np.uint8)
        Image.fromarray(rgba, "RGBA").save(folder / f"v{i}.png")
        entry = {"file": f"v{i}.png", "width": size, "height": size, "fx": fx, "fy": fx, "cx": size / 2,
                 "cy": size / 2}
        entry.update({"eye": eye.tolist()} if i == 0 else {"R": R.tolist(), "t": t.tolist()})
        entries.append(entry)
    write_cameras(folder, entries)
    return entries


def write_cameras(folder: Path, entries: list[dict]) -> None:
    (folder / "cameras.json").write_text(json.dumps({"mesh": str(ROOT / "assets" / "teapot.obj"),
                                                     "views": entries}))
