"""scripts/fit.py end to end, as a subprocess: outputs, TensorBoard tags, resume, custom solver, images, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIT = ROOT / "scripts" / "fit.py"

# a small teapot_pose: 48x48, σ = 1e-3 (about a pixel of blur), start ~11° and 10 % off the true eye
TEAPOT = ["renderer.image_size=48", "renderer.coarse_to_fine=false", "renderer.sigma=1e-3",
          "scene.start_eye=[0.6,2.6,2.0]", "solver.max_iterations=10", "logging.image_every=2",
          "logging.checkpoint_every=2"]
TRUE_EYE = np.array([0.0, 3 * math.sin(math.radians(50)), 3 * math.cos(math.radians(50))])


def fit(tmp: Path, *overrides: str, run: str = "run", cache: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "CI": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)])}
    cmd = [sys.executable, str(FIT), f"hydra.run.dir={tmp / run}", f"cache_dir={cache or tmp / 'cache'}",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=300)


def eye_errors(eye) -> tuple[float, float]:
    eye = np.asarray(eye, dtype=np.float64)
    cos = eye @ TRUE_EYE / (np.linalg.norm(eye) * np.linalg.norm(TRUE_EYE))
    return math.degrees(math.acos(min(1.0, cos))), abs(np.linalg.norm(eye) / np.linalg.norm(TRUE_EYE) - 1)


@pytest.fixture(scope="module")
def teapot_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    p = fit(tmp, *TEAPOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return tmp / "run", p


def test_teapot_pose_end_to_end(teapot_run):
    out, p = teapot_run
    assert f"results in {out}" in p.stdout
    pose = json.loads((out / "pose.json").read_text())
    start_deg, _ = eye_errors([0.6, 2.6, 2.0])
    deg, dist = eye_errors(pose["eye"])
    assert start_deg > 10 and deg < 0.5 and dist < 0.01, (deg, dist)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["iterations"] == 10 and summary["final_metrics"]["pose_err_deg"] == pytest.approx(deg, abs=1e-3)
    assert summary["final_metrics"]["iou"] > 0.95
    costs = [h["cost"] for h in summary["history"]]
    assert costs[-1] < 0.2 * costs[0]
    for f in ("final_strip.png", "render_000.png", "target_000.png", "progress.gif", "fit.log", "checkpoint.pt"):
        assert (out / f).is_file(), f
    assert len([ln for ln in (out / "fit.log").read_text().splitlines() if "] it " in ln]) == 11  # x0 + 10

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    for tag in ("loss/total", "loss/silhouette", "solver/lambda", "solver/rho", "solver/cg_iters",
                "solver/step_norm", "solver/grad_norm", "solver/jvps", "solver/vjps", "time/iter_s",
                "metric/iou", "metric/psnr", "metric/pose_err_deg"):
        assert tag in scalars, tag
    assert [e.step for e in ea.Scalars("loss/total")][-10:] == list(range(1, 11))
    tb_cost = ea.Scalars("loss/total")[-1].value
    assert tb_cost == pytest.approx(costs[-1], rel=1e-5)
    assert "images/strip" in ea.Tags()["images"] and len(ea.Images("images/strip")) == 6  # steps 0, 2, ..., 10


def test_resume_reproduces_the_uninterrupted_run(teapot_run, tmp_path):
    ref = json.loads((teapot_run[0] / "pose.json").read_text())["eye"]
    p = fit(tmp_path, *TEAPOT, "stop_after=3")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped"] and summary["iterations"] == 3
    stopped = json.loads((tmp_path / "run" / "pose.json").read_text())["eye"]
    assert not np.allclose(stopped, ref, atol=1e-4)  # the stop really happened early
    p = fit(tmp_path, f"resume={tmp_path / 'run'}", run="ignored")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["iterations"] == 10 and not summary["stopped"]
    resumed = json.loads((tmp_path / "run" / "pose.json").read_text())["eye"]
    np.testing.assert_allclose(resumed, ref, rtol=0, atol=1e-6)


def test_ctrl_c_stops_cleanly_and_writes_the_best_state(tmp_path):
    import signal

    env = {**os.environ, "CI": "true", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(FIT), f"hydra.run.dir={tmp_path / 'run'}", f"cache_dir={tmp_path / 'cache'}",
           *TEAPOT, "solver.max_iterations=500", "solver.function_tolerance=0", "solver.parameter_tolerance=0",
           "solver.gradient_tolerance=0"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in p.stdout:
        if "] it    3 " in line:  # a few iterations done: press Ctrl-C
            p.send_signal(signal.SIGINT)
            break
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    assert "interrupted: outputs written for the best state so far" in err and "Traceback" not in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted"] and summary["termination"] == "interrupted" and 3 <= summary["iterations"] < 500
    deg, _ = eye_errors(json.loads((tmp_path / "run" / "pose.json").read_text())["eye"])
    assert deg < eye_errors([0.6, 2.6, 2.0])[0]  # the best state, not the start
    assert (tmp_path / "run" / "final_strip.png").is_file()


class MySolver:
    """A researcher's own solver: fixed-step gradient descent on the problem's cost."""

    def __init__(self, max_iterations: int = 5, step: float = 1e-3) -> None:
        self.max_iterations, self.step = max_iterations, step

    def solve(self, problem, x0, callback=None, state=None):
        x = {k: v.detach().clone() for k, v in x0.items()}
        records = []
        for it in range(1, self.max_iterations + 1):
            xs = {k: v.clone().requires_grad_(True) for k, v in x.items()}
            cost, blocks = problem.cost(xs, problem.prepare_context(x))
            grads = torch.autograd.grad(cost, list(xs.values()))
            x = {k: (v - self.step * g).detach() for (k, v), g in zip(x.items(), grads, strict=True)}
            rec = SimpleNamespace(iteration=it, cost=float(cost), block_costs=blocks, seconds=0.0)
            records.append(rec)
            if callback is not None:
                callback(rec, x, None)
        return SimpleNamespace(x=x, cost=records[-1].cost, termination="my_solver_done", records=records,
                               report=lambda: f"MySolver: {len(records)} steps of {self.step}")


def test_custom_target_solver_plugs_in(tmp_path):
    p = fit(tmp_path, *TEAPOT, "solver=custom", "solver._target_=test_fit.MySolver", "solver.max_iterations=3",
            "+solver.step=1e-4")
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["solver"] == "test_fit.MySolver" and summary["iterations"] == 3
    assert summary["termination"] == "my_solver_done"
    assert summary["stages"][0]["report"] == "MySolver: 3 steps of 0.0001"


# ---------------------------------------------------------------------------------- images scene
def _rot(axis_angle):
    """Rodrigues' formula, written here independently of the package."""
    w = np.asarray(axis_angle, dtype=np.float64)
    th = np.linalg.norm(w)
    if th < 1e-12:
        return np.eye(3)
    k = w / th
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * K + (1 - math.cos(th)) * K @ K


def _look_at(eye):
    """OpenCV world->camera (R, t) looking at the origin, y up in the world (image y down)."""
    eye = np.asarray(eye, dtype=np.float64)
    z = -eye / np.linalg.norm(eye)
    x = np.cross(z, [0.0, 1.0, 0.0])
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R = np.stack([x, y, z])
    return R, -R @ eye


def _obj_verts_faces(path):
    v, f = [], []
    for line in Path(path).read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "v":
            v.append([float(a) for a in parts[1:4]])
        elif parts and parts[0] == "f":
            f.append([int(a.split("/")[0]) - 1 for a in parts[1:4]])
    return np.array(v), np.array(f)


def _write_views(folder: Path, aa, trans, size=48, views=3, ss=8):
    """Silhouettes drawn with PIL, independent of our rasterizer: projected triangles filled at ``ss``x the
    resolution, box-filtered down to a coverage alpha (PIL's fill includes edge pixels: supersampling
    keeps that bias below a pixel / ss)."""
    from PIL import Image, ImageDraw

    v, f = _obj_verts_faces(ROOT / "assets" / "teapot.obj")
    vw = v @ _rot(aa).T + np.asarray(trans)
    fx = 0.5 * size / math.tan(math.radians(25))
    entries = []
    for i in range(views):
        az = math.radians(30 + 120 * i)
        eye = 3.0 * np.array([math.cos(0.4) * math.sin(az), math.sin(0.4), math.cos(0.4) * math.cos(az)])
        R, t = _look_at(eye)
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
    (folder / "cameras.json").write_text(json.dumps({"mesh": str(ROOT / "assets" / "teapot.obj"),
                                                     "views": entries}))


def test_images_scene_recovers_a_pose_from_files(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    aa, trans = [0.0, 0.2, 0.05], [0.06, -0.03, 0.04]
    _write_views(data, aa, trans)
    p = fit(tmp_path, "scene=images", f"scene.folder={data}", "scene.sigma_schedule=[1e-3]", "scene.sigma=1e-4",
            "solver.max_iterations=8", "logging.image_every=0", "logging.metrics_every=0")
    assert p.returncode == 0, p.stderr[-3000:]
    pose = json.loads((tmp_path / "run" / "pose.json").read_text())
    R = np.asarray(pose["R"])
    ang = math.degrees(math.acos(np.clip((np.trace(R @ _rot(aa).T) - 1) / 2, -1, 1)))
    start = math.degrees(np.linalg.norm(aa))
    assert ang < 0.25 * start, (ang, start)  # from 11.7° to within a quarter of it
    assert np.abs(np.asarray(pose["translation"]) - trans).max() < 0.25 * np.abs(trans).max()


# ---------------------------------------------------------------------------------- errors
def _bad_images(folder: Path, kind: str) -> None:
    folder.mkdir()
    from PIL import Image

    Image.new("RGBA", (16, 16)).save(folder / "v0.png")
    if kind == "unreadable":
        (folder / "v0.png").write_bytes(b"this is not a png")
    size = 32 if kind == "size" else 16
    (folder / "cameras.json").write_text(json.dumps({"mesh": str(ROOT / "assets" / "teapot.obj"), "views": [
        {"file": "v0.png", "width": size, "height": size, "fx": 20, "fy": 20, "cx": 8, "cy": 8, "eye": [0, 0, 3]}]}))


@pytest.mark.parametrize("case, message", [
    ("unknown_scene", "error: unknown scene 'nope'"),
    ("missing_asset", "error: asset not found:"),
    ("unreadable", "error: cannot read image"),
    ("size", "but"),
    ("cuda", "error: device=cuda but CUDA is not available"),
    ("no_checkpoint", "error: no checkpoint to resume from"),
])
def test_bad_input_is_one_line_and_exit_code_2(case, message, tmp_path):
    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = {
        "unknown_scene": ["scene=nope"],
        "missing_asset": ["scene.mesh=assets/nope.obj"],
        "unreadable": ["scene=images", f"scene.folder={tmp_path / 'imgs'}"],
        "size": ["scene=images", f"scene.folder={tmp_path / 'imgs'}"],
        "cuda": ["device=cuda"],
        "no_checkpoint": [f"resume={tmp_path}"],
    }[case]
    if case in ("unreadable", "size"):
        _bad_images(tmp_path / "imgs", case)
    p = fit(tmp_path, *args)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_hydra_compose_errors_fail_with_hydras_message(tmp_path):
    p = fit(tmp_path, "scene.imag_size=3")
    assert p.returncode != 0 and "Could not override 'scene.imag_size'" in p.stderr
    p = fit(tmp_path, "renderer.image_size=big")
    assert p.returncode != 0 and "renderer.image_size" in p.stderr
