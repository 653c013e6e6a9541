"""Bad input and failed solves end in one ``error:`` line and exit code 2, and a run that fails before its
first iteration leaves nothing on disk. Run in-process through ``fit.cli`` (the CLI's own handling); the
subprocess checks of the real exit code are in test_app_cli.py."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from fitutil import ROOT, TEAPOT, cli, read_json, write_cameras, write_views

SMALL = ["renderer.image_size=24", "solver.max_iterations=2", "logging.progress=never"]


def _folder(tmp: Path, edit=None, views: int = 2) -> Path:
    """A small image folder (PIL-drawn teapot silhouettes); ``edit(entries, folder)`` spoils it."""
    data = tmp / "data"
    entries = write_views(data, [0, 0, 0], [0, 0, 0], size=24, views=views, ss=2)
    if edit is not None:
        edit(entries, data)
        write_cameras(data, entries)
    return data


def _set(i, **kw):
    def edit(entries, folder):
        entries[i].pop("R", None), entries[i].pop("t", None)
        entries[i].update(kw)
    return edit


def _zero_alpha(entries, folder):
    from PIL import Image

    Image.new("RGBA", (24, 24), (200, 200, 200, 0)).save(folder / entries[1]["file"])


def _degenerate_mesh(tmp: Path) -> Path:
    p = tmp / "flat.obj"
    p.write_text("v 0 0 0\nv 1 0 0\nv 2 0 0\nv 0 1 0\nf 1 2 3\nf 1 1 4\n")
    return p


def _unreadable(entries, folder):
    (folder / entries[0]["file"]).write_bytes(b"this is not a png")


def _wrong_size(entries, folder):
    for e in entries:
        e["width"] = e["height"] = 32


CASES = {
    "missing_asset": (lambda t: [*TEAPOT, "scene.mesh=assets/nope.obj"],
                      f"error: asset not found: {ROOT / 'assets' / 'nope.obj'}\n"),
    "unreadable_image": (lambda t: ["scene=images", f"scene.folder={_folder(t, _unreadable)}"],
                         "error: cannot read image "),
    "image_size_mismatch": (lambda t: ["scene=images", f"scene.folder={_folder(t, _wrong_size)}"],
                            "error: image {data}/v0.png is 24x24 (WxH) but {data}/cameras.json says 32x32\n"),
    # id: (overrides builder(tmp) -> list, the one line's start)
    "fx_nan": (lambda t: ["scene=images", f"scene.folder={_folder(t, _set(0, eye=[0, 1, 3], fx=math.nan))}"],
               "error: {data}/cameras.json: views[0]: field 'fx' must be a finite number, got nan\n"),
    "fx_zero": (lambda t: ["scene=images", f"scene.folder={_folder(t, _set(1, eye=[0, 1, 3], fy=0))}"],
                "error: {data}/cameras.json: views[1]: focal lengths must be positive, got fx=25.7"),
    "eye_at": (lambda t: ["scene=images", f"scene.folder={_folder(t, _set(1, eye=[0, 0, 0]))}"],
               "error: {data}/cameras.json: views[1]: 'eye', 'at' and 'up' must not be collinear (eye [0.0, 0.0, 0.0], "
               "at [0.0, 0.0, 0.0])\n"),
    "eye_along_up": (lambda t: ["scene=images", f"scene.folder={_folder(t, _set(1, eye=[0, 3, 0]))}"],
                     "error: {data}/cameras.json: views[1]: 'eye', 'at' and 'up' must not be collinear "
                     "(eye [0.0, 3.0, 0.0], at [0.0, 0.0, 0.0])\n"),
    "start_eye_origin": (lambda t: [*TEAPOT, "scene.start_eye=[0,0,0]"],
                         "error: look_at (view 0): eye [0.0, 0.0, 0.0], at [0.0, 0.0, 0.0]"),
    "off_screen": (lambda t: ["scene=images", f"scene.folder={_folder(t)}", "scene.init_translation=[40,0,0]",
                              "scene.search=off"],  # no global initialization that could help
                   "error: the render at the start is empty in every view (the mesh is behind the camera, off-screen"),
    "behind_camera": (lambda t: ["scene=images", f"scene.folder={_folder(t, views=1)}",
                                 "scene.init_translation=[2.02,2.34,5.39]", "scene.search=off"],  # 2x the eye: behind
                      "error: the render at the start is empty in every view"),
    "alpha_all_zero": (lambda t: ["scene=images", f"scene.folder={_folder(t, _zero_alpha)}"],
                       "error: the target silhouette (alpha) of view 1 is all zero: nothing to fit (1 of 2 views"),
    "zero_area_mesh": (lambda t: [*TEAPOT, f"scene.mesh={_degenerate_mesh(t)}"],
                       "error: mesh "),
    "nan_start_cost": (lambda t: ["scene=lights_albedo", "scene.views=2", "scene.start_intensity=nan", *SMALL],
                       "error: the solver failed at the start of stage 'lights+albedo': initial cost is not "
                       "finite (nan)"),
    "sigma_zero": (lambda t: ["renderer.sigma=0"], "error: renderer.sigma must be a positive number, got 0"),
    "views_zero": (lambda t: ["scene=cow_shape", "scene.views=0"], "error: scene.views must be at least 1, got 0"),
    "custom_without_target": (lambda t: ["solver=custom"],
                              "error: solver=custom needs your solver class: solver._target_=mypkg.MySolver"),
    "too_big_for_memory": (lambda t: ["scene=cow_shape", "scene.views=100000", "renderer.image_size=4096"],
                           "error: this fit would need about "),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(case, tmp_path, capsys):
    overrides, start = CASES[case]
    code, out = cli(tmp_path, *overrides(tmp_path))
    err = capsys.readouterr().err
    start = start.format(data=tmp_path / "data")
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith(start), err
    assert not out.exists()  # the fresh run directory is gone: no events file, no fit.log, no summary
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


@pytest.mark.parametrize("argv, line", [
    (["solver.max_iterations=abc"], "error: solver.max_iterations: expected an integer, got 'abc'"),
    (["solver=dogleg", "solver.initial_radius=big"], "error: solver.initial_radius: expected a number, got 'big'"),
    (["solver=gn", "solver.verbose=3"], "error: solver.verbose: expected true or false, got 3"),
    (["solver.max_iteration=3"], "error: solver.max_iteration: not an option of solver=lm"),
])
def test_solver_overrides_are_checked_before_hydra(argv, line, capsys):
    """Our solvers' options have schemas: a wrong one is one line and exit 2 before Hydra composes."""
    from fitutil import fit_module

    with pytest.raises(SystemExit) as e:
        fit_module().check_solver_overrides(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(line), err
    fit_module().check_solver_overrides(["solver.max_iterations=7", "solver=adam", "solver.lr=0.1"])  # fine
    # exponents without a dot are numbers (YAML 1.1 alone would read a string; Hydra reads a float)
    fit_module().check_solver_overrides(["solver.function_tolerance=1e-12", "solver.initial_damping=2E3"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda(tmp_path, capsys):
    code, out = cli(tmp_path, "device=cuda")
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err == ("error: device=cuda but CUDA is not available in this torch build/machine; "
                                       "use device=cpu or device=auto\n")


def test_zero_area_mesh_message_names_the_file(tmp_path, capsys):
    code, _ = cli(tmp_path, *TEAPOT, f"scene.mesh={_degenerate_mesh(tmp_path)}")
    assert code == 2
    assert capsys.readouterr().err == f"error: mesh {tmp_path / 'flat.obj'}: all 2 faces have zero area, " \
                                      "nothing can be rendered\n"


def test_resume_from_a_torch_file_that_is_not_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "old_run"
    run.mkdir()
    torch.save({"weights": torch.zeros(3)}, run / "checkpoint.pt")
    code, out = cli(tmp_path, f"resume={run}")
    assert code == 2 and out == run
    assert capsys.readouterr().err == (f"error: {run / 'checkpoint.pt'} is not a fit checkpoint (a torch file "
                                       "without config, stage, state, step, x)\n")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint.pt"]  # the user's directory is left alone


def test_unsafe_override_with_resume_is_refused_before_anything_is_written(tmp_path, capsys):
    code, out = cli(tmp_path, *TEAPOT, "solver.max_iterations=2")
    assert code == 0
    before = sorted(p.name for p in out.iterdir())
    code, _ = cli(tmp_path, f"resume={out}", "scene.start_eye=[1,2,3]")
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        "error: resume= continues the saved run with its saved config and cannot change scene.start_eye")
    assert sorted(p.name for p in out.iterdir()) == before
    assert len(list(out.glob("events.out.tfevents.*"))) == 1  # no second, empty event file


def test_a_solver_failure_after_some_iterations_exits_2_with_outputs(tmp_path, capsys):
    code, out = cli(tmp_path, *TEAPOT, "solver=custom", "solver._target_=fitutil.MySolver",
                    "+solver.fail_after=2", "+solver.step=1e-5")
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: the solver failed (gave up); outputs of the best point so far are in {out}\n"
    summary = read_json(out / "summary.json")
    assert summary["termination"] == "failure" and summary["iterations"] == 2
    assert (out / "final_strip.png").is_file() and (out / "pose.json").is_file()


def test_look_at_checks_only_plain_tensors():
    """The degenerate-camera check must not break torch.func.linearize's tracing of a residual."""
    from diffrender.camera import look_at

    eye = torch.tensor([[0.5, 2.0, 2.0]], dtype=torch.float64)
    f = lambda e: look_at(e, torch.zeros(3, dtype=torch.float64))[0]  # noqa: E731
    _, jvp = torch.func.linearize(f, eye)
    u = torch.randn_like(eye)
    h = 1e-6
    fd = (f(eye + h * u) - f(eye - h * u)) / (2 * h)
    torch.testing.assert_close(jvp(u), fd, rtol=1e-6, atol=1e-8)
