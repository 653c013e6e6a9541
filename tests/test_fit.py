"""scripts/fit.py run in-process: outputs, TensorBoard's first screen, the GIF, the shared budget of the
stages, resume (with overrides), custom solvers, the images scene, a second Ctrl-C while writing outputs.
What needs a real process (exit codes, signals, concurrent runs, Hydra's files) is in test_app_cli.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fitutil import TEAPOT, eye_errors, fit_module, read_json, rot, run_fit, write_views


@pytest.fixture(scope="module")
def teapot_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    summary = run_fit(tmp, *TEAPOT)
    return tmp / "run", summary


def test_teapot_pose_end_to_end(teapot_run):
    out, summary = teapot_run
    pose = read_json(out / "pose.json")
    start_deg, _ = eye_errors([0.6, 2.6, 2.0])
    deg, dist = eye_errors(pose["eye"])
    assert start_deg > 10 and deg < 0.5 and dist < 0.01, (deg, dist)
    on_disk = read_json(out / "summary.json")
    assert {k: on_disk[k] for k in ("termination", "iterations", "stages")} == \
        {k: summary[k] for k in ("termination", "iterations", "stages")}
    assert summary["iterations"] == 10 and summary["final_metrics"]["pose_err_deg"] == pytest.approx(deg, abs=1e-3)
    assert summary["final_metrics"]["iou"] > 0.95
    assert summary["stages"][0]["iterations"] == 10
    costs = [h["cost"] for h in summary["history"]]
    assert costs[-1] < 0.2 * costs[0]
    for f in ("final_strip.png", "render_000.png", "target_000.png", "progress.gif", "checkpoint.pt"):
        assert (out / f).is_file(), f


def _time_series_tags(ea) -> list[str]:
    """The cards of TensorBoard's Time Series tab (scalars, images, histograms), in its order: by tag name."""
    tags = ea.Tags()
    return sorted(tags["scalars"] + tags["images"] + tags["histograms"])


def test_tensorboard_first_screen_shows_convergence(teapot_run):
    out, summary = teapot_run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    ea.Reload()
    cards = _time_series_tags(ea)
    # the first card is the cost on a log scale; no single-point hparam cards anywhere
    assert cards[0] == "convergence/log10_cost", cards[:3]
    assert not [t for t in cards if t.startswith("hparam")]
    for tag in ("loss/total", "loss/silhouette", "solver/lambda", "solver/rho", "solver/cg_iters",
                "solver/step_norm", "solver/grad_norm", "solver/jvps", "solver/vjps", "time/iter_s",
                "metric/iou", "metric/psnr", "metric/pose_err_deg", "images/strip"):
        assert tag in cards, tag
    total = {e.step: e.value for e in ea.Scalars("loss/total")}
    logc = {e.step: e.value for e in ea.Scalars("convergence/log10_cost")}
    assert set(logc) == set(total) and set(range(11)) <= set(total)
    for step, v in total.items():
        assert logc[step] == pytest.approx(math.log10(v), abs=1e-5)
    assert total[10] == pytest.approx(summary["history"][-1]["cost"], rel=1e-5)
    assert len(ea.Images("images/strip")) == 6  # steps 0, 2, ..., 10
    # hparams live in the HParams plugin, and its metrics are this run's own metric/* scalars
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = ea.PluginTagToContent("hparams")
    exp = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in exp.metric_infos}
    assert metric_tags and metric_tags <= set(cards)
    assert {h.name for h in exp.hparam_infos} >= {"scene.name", "solver.max_iterations"}


def test_progress_gif_plays_at_gif_fps(teapot_run):
    from PIL import Image

    out, _ = teapot_run
    with Image.open(out / "progress.gif") as im:
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    # 7 frames (6 logged strips and the final one) at gif_fps 8 = 125 ms each (GIF stores 10 ms units);
    # Pillow merges identical neighbours (the final strip repeats step 10's) and adds up their durations
    assert sum(durations) == pytest.approx(7 * 125, abs=7 * 5), durations
    assert all(d >= 120 for d in durations), durations


def test_stages_share_the_iteration_and_time_budget(tmp_path):
    """max_iterations / max_seconds bound the whole fit: each stage gets what the stages before it left."""
    quiet = ["renderer.image_size=32", "logging.image_every=0", "logging.metrics_every=0",
             "logging.checkpoint_every=0", "logging.gif=false", "logging.tensorboard=false", "logging.progress=never"]
    # three σ stages; a solver that stops after 3 steps per stage: 3 + 3 + the 1 left of 7
    s = run_fit(tmp_path, *quiet, "solver=custom", "solver._target_=fitutil.MySolver", "solver.max_iterations=7",
                "+solver.steps=3", "+solver.step=1e-5")
    assert [st["iterations"] for st in s["stages"]] == [3, 3, 1] and s["iterations"] == 7
    # LM that never converges: the first stage uses the whole budget, no later stage runs
    never = ["solver.function_tolerance=0", "solver.parameter_tolerance=0", "solver.gradient_tolerance=0"]
    s = run_fit(tmp_path, *quiet, *never, "solver.max_iterations=4")
    assert [st["iterations"] for st in s["stages"]] == [4] and s["termination"] == "max_iterations"
    s = run_fit(tmp_path, *quiet, *never, "solver.max_seconds=1e-6")
    assert [st["iterations"] for st in s["stages"]] == [0] and s["termination"] == "time_limit"


def test_a_capped_continuation_stage_hands_on_and_resumes_within_it(tmp_path):
    """scene.normal_continuation: each weaker-normal stage stops after normal_continuation_iterations and the
    next stage gets what is left of the fit's budget; a fit budget below the cap ends the fit there; a resume
    inside a capped stage reaches the uninterrupted run's mesh with the same per-stage counts."""
    small = ["scene=bunny_silhouette", "renderer.image_size=24", "scene.views=3", "scene.coarse_to_fine=false",
             "scene.silhouette_levels=0", "scene.normal_continuation=[0.1,0.5]",
             "scene.normal_continuation_iterations=2", "solver.function_tolerance=0",
             "solver.parameter_tolerance=0", "solver.gradient_tolerance=0", "logging.image_every=0",
             "logging.metrics_every=0", "logging.checkpoint_every=1", "logging.gif=false",
             "logging.tensorboard=false", "logging.progress=never"]
    ref = run_fit(tmp_path, *small, "solver.max_iterations=7")
    names = [st["stage"] for st in ref["stages"]]
    assert names[0].endswith("w_normal x0.1") and names[1].endswith("w_normal x0.5") and "w_normal" not in names[2]
    assert [st["iterations"] for st in ref["stages"]] == [2, 2, 3] and ref["iterations"] == 7
    assert ref["termination"] == "max_iterations"
    short = run_fit(tmp_path, *small, "solver.max_iterations=1", run="short")
    assert [st["iterations"] for st in short["stages"]] == [1] and short["termination"] == "max_iterations"
    stopped = run_fit(tmp_path, *small, "solver.max_iterations=7", "stop_after=1", run="stopped")
    assert stopped["stopped"] and [st["iterations"] for st in stopped["stages"]] == [1]
    resumed = run_fit(tmp_path, f"resume={tmp_path / 'stopped'}", run="ignored")
    assert [st["iterations"] for st in resumed["stages"]] == [2, 2, 3]
    np.testing.assert_allclose(_obj_verts(tmp_path / "stopped" / "mesh.obj"), _obj_verts(tmp_path / "run" / "mesh.obj"),
                               rtol=0, atol=1e-6)


def _obj_verts(path) -> np.ndarray:
    return np.array([[float(v) for v in line.split()[1:4]] for line in path.read_text().splitlines()
                     if line.startswith("v ")])


def test_resume_reproduces_the_uninterrupted_run_and_applies_safe_overrides(teapot_run, tmp_path):
    ref = read_json(teapot_run[0] / "pose.json")["eye"]
    stopped = run_fit(tmp_path, *TEAPOT, "solver.max_iterations=5", "stop_after=3")
    assert stopped["stopped"] and stopped["iterations"] == 3
    assert not np.allclose(read_json(tmp_path / "run" / "pose.json")["eye"], ref, atol=1e-4)  # stopped early
    resumed = run_fit(tmp_path, f"resume={tmp_path / 'run'}", "solver.max_iterations=10", "logging.metrics_every=2",
                      run="ignored")
    assert resumed["resumes"] == [{"at_iteration": 3,
                                   "applied": {"solver.max_iterations": 10, "logging.metrics_every": 2}}]
    assert resumed["iterations"] == 10 and not resumed["stopped"]
    assert resumed["stages"][0]["iterations"] == 10  # the stage's count includes the 3 before the resume
    np.testing.assert_allclose(read_json(tmp_path / "run" / "pose.json")["eye"], ref, rtol=0, atol=1e-6)


def test_resume_refuses_unsafe_overrides(tmp_path):
    fit = fit_module()
    from fitutil import compose

    from diffrender.errors import UserError

    saved = {"scene": {"name": "teapot_pose", "views": 2}, "solver": {"max_iterations": 5}, "resume": None,
             "stop_after": 3, "logging": {"image_every": 5}}
    cfg = compose("resume=/somewhere", "solver.max_iterations=9", "logging.image_every=1")
    out, applied = fit.resume_config(cfg, saved, ["resume=/somewhere", "solver.max_iterations=9",
                                                  "logging.image_every=1"])
    assert applied == {"solver.max_iterations": 9, "logging.image_every": 1}
    assert out.solver.max_iterations == 9 and out.stop_after is None and out.resume == "/somewhere"
    with pytest.raises(UserError, match=r"^resume= continues the saved run with its saved config and cannot "
                                        r"change scene.views \(a resume may change solver.max_iterations"):
        fit.resume_config(compose("resume=/somewhere", "scene.sigma=2e-4"), saved,
                          ["resume=/somewhere", "scene.views=3"])


def test_custom_target_solver_plugs_in(tmp_path):
    s = run_fit(tmp_path, *TEAPOT, "solver=custom", "solver._target_=fitutil.MySolver", "solver.max_iterations=3",
                "+solver.step=1e-4")
    assert s["solver"] == "fitutil.MySolver" and s["iterations"] == 3
    assert s["termination"] == "my_solver_done"
    assert s["stages"][0]["report"] == "MySolver: 3 steps of 0.0001"


def test_images_scene_recovers_a_pose_and_resumes_within_a_later_stage(tmp_path):
    data = tmp_path / "data"
    aa, trans = [0.0, 0.2, 0.05], [0.06, -0.03, 0.04]
    write_views(data, aa, trans)
    two = ["scene=images", f"scene.folder={data}", "scene.sigma_schedule=[1e-3]", "scene.sigma=1e-4",
           "solver.function_tolerance=1e-2", "solver.max_iterations=14", "logging.image_every=0",
           "logging.metrics_every=0", "logging.progress=never", "logging.checkpoint_every=0"]
    ref = run_fit(tmp_path, *two, run="ref")
    pose = read_json(tmp_path / "ref" / "pose.json")
    R = np.asarray(pose["R"])
    ang = math.degrees(math.acos(np.clip((np.trace(R @ rot(aa).T) - 1) / 2, -1, 1)))
    start = math.degrees(np.linalg.norm(aa))
    assert ang < 0.25 * start, (ang, start)  # from 11.7° to within a quarter of it
    assert np.abs(np.asarray(pose["translation"]) - trans).max() < 0.25 * np.abs(trans).max()
    counts = [st["iterations"] for st in ref["stages"]]
    assert len(counts) >= 2 and counts[1] >= 2 and sum(counts) == ref["iterations"] <= 14  # one shared budget
    # stopped in the second stage, then resumed: the same result and the same per-stage counts
    stopped = run_fit(tmp_path, *two, f"stop_after={counts[0] + 1}")
    assert [st["iterations"] for st in stopped["stages"]] == [counts[0], 1]
    resumed = run_fit(tmp_path, f"resume={tmp_path / 'run'}", run="ignored")
    assert [st["iterations"] for st in resumed["stages"]] == counts
    got = read_json(tmp_path / "run" / "pose.json")
    np.testing.assert_allclose(got["axis_angle"] + got["translation"], pose["axis_angle"] + pose["translation"],
                               rtol=0, atol=1e-5)


def test_second_ctrl_c_while_writing_outputs_still_leaves_an_interrupted_summary(tmp_path, monkeypatch):
    fit = fit_module()

    def interrupted_again(self, x, images):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit.Fit, "write_outputs", interrupted_again)
    s = run_fit(tmp_path, *TEAPOT, "solver.max_iterations=2")
    on_disk = read_json(tmp_path / "run" / "summary.json")
    assert on_disk["termination"] == "interrupted" and on_disk["interrupted"] and not on_disk["outputs_complete"]
    assert on_disk["iterations"] == 2 == s["iterations"]
    assert not (tmp_path / "run" / "pose.json").exists()


def test_progress_bar_prints_log_lines_above_itself(monkeypatch):
    """tqdm + logging redirection: a log record during the bar is a line of its own, and the total is the
    fit's max_iterations."""
    import io
    import logging

    from diffrender.logging import ProgressBar

    fake = io.StringIO()
    monkeypatch.setattr("sys.stderr", fake)
    root = logging.getLogger()
    handler = logging.StreamHandler(fake)  # what Hydra's console handler on the root logger is to the terminal
    root.addHandler(handler)
    try:
        bar = ProgressBar(50, enabled=True, stream=fake)
        bar.update(3, "cost 1.0e+00")
        logging.getLogger("fit").warning("a log line")
        bar.update(31, "cost 1.0e-15")
        bar.close()
        assert handler in root.handlers  # the redirection ends with the bar
    finally:
        root.removeHandler(handler)
    text = fake.getvalue()
    lines = [seg.split("\r")[-1] for seg in text.split("\n")]
    assert "a log line" in lines  # on a line of its own, not glued to the bar
    assert "31/50" in text and "/150" not in text
