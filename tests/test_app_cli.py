"""scripts/fit.py as a real process, where the process is what is tested: exit codes and the one stderr
line, --help and config errors without importing torch, two fits started at the same moment, SIGINT and
SIGTERM, and Hydra's own files. Processes of one test run side by side to keep the suite fast."""

from __future__ import annotations

import signal
import subprocess
import sys

from fitutil import FIT, TEAPOT, eye_errors, fit_cmd, fit_env, read_json

WRAPPER = """import runpy, sys
sys.argv = [{fit!r}, *{args!r}]
try:
    runpy.run_path({fit!r}, run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
print("TORCH_IMPORTED" if "torch" in sys.modules else "NO_TORCH")
sys.exit(code)
"""


def _start(tmp, args, wrapped=False) -> subprocess.Popen:
    cmd = [sys.executable, "-c", WRAPPER.format(fit=str(FIT), args=list(args))] if wrapped else fit_cmd(*args)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=fit_env(), cwd=tmp)


def _finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=300)
    return p.returncode, out, err


def test_help_and_config_errors_answer_without_importing_torch(tmp_path):
    procs = {"help": _start(tmp_path, ["--help"], wrapped=True),
             "abc": _start(tmp_path, ["solver.max_iterations=abc"], wrapped=True),
             "views": _start(tmp_path, ["scene=cow_shape", "scene.views=0"], wrapped=True)}
    res = {k: _finish(p) for k, p in procs.items()}
    code, out, err = res["help"]
    assert code == 0 and "== Configuration groups ==" in out and "scene: " in out and err == ""
    assert out.rstrip().endswith("NO_TORCH")
    for case, line in (("abc", "error: solver.max_iterations: expected an integer, got 'abc'\n"),
                       ("views", "error: scene.views must be at least 1, got 0\n")):
        code, out, err = res[case]
        assert (code, err) == (2, line)
        assert out.rstrip().endswith("NO_TORCH")  # answered before torch was imported
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_exit_codes_and_one_line(tmp_path):
    missing = tmp_path / "no_such_run"
    procs = {"scene": _start(tmp_path, ["scene=nope"]),
             "resume": _start(tmp_path, [f"resume={missing}"]),
             "typo": _start(tmp_path, ["scene.imag_size=3"]),
             "type": _start(tmp_path, ["renderer.image_size=big"])}
    res = {k: _finish(p) for k, p in procs.items()}
    assert res["scene"][0] == 2 and res["scene"][2] == (
        "error: unknown scene 'nope' (available: bunny_silhouette, cow_shape, images, lights_albedo, "
        "teapot_pose, texture)\n")
    assert res["resume"][0] == 2
    assert res["resume"][2] == f"error: no checkpoint to resume from: {missing / 'checkpoint.pt'} does not exist\n"
    assert not missing.exists()  # resume= of a missing directory does not create it
    # Hydra's own composition errors keep Hydra's message and its exit code 1
    assert res["typo"][0] == 1 and "Could not override 'scene.imag_size'" in res["typo"][2]
    assert res["type"][0] == 1 and "renderer.image_size" in res["type"][2] and "big" in res["type"][2]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").iterdir())


def test_two_fits_started_together_get_a_directory_each_and_stop_cleanly_on_sigint_and_sigterm(tmp_path):
    """Both fits ask for the same directory name (as two fits started in the same second do): one gets
    name-2. One is stopped with Ctrl-C (SIGINT), the other with SIGTERM, after a few iterations: each leaves
    its best state, outputs and a summary marked interrupted, and a fit.log with its own lines only. Adam
    runs all its iterations; LM lands on this teapot's exact optimum in ~13 iterations (0.3 s) and stops on a
    zero gradient, which raced with the signal."""
    same = "hydra.run.dir=${fit_run_dir:null,outputs/same}"
    endless = [same, f"cache_dir={tmp_path / 'cache'}", *TEAPOT, "solver=adam", "solver.lr=0.05",
               "solver.max_iterations=500",
               "solver.function_tolerance=0", "solver.parameter_tolerance=0", "solver.gradient_tolerance=0"]
    procs = {sig: subprocess.Popen(fit_cmd(*endless, f"seed={int(sig)}"), stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=fit_env(), cwd=tmp_path,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
             for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, p in procs.items():
        for line in p.stdout:
            if "] it    3 " in line:  # a few iterations done
                p.send_signal(sig)
                break
    for sig, p in procs.items():
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        assert err == "interrupted: outputs written for the best state so far\n", (sig, err)
    runs = sorted((tmp_path / "outputs").iterdir())
    assert [d.name for d in runs] == ["same", "same-2"]
    seeds = set()
    for d in runs:
        summary = read_json(d / "summary.json")
        assert summary["interrupted"] and summary["termination"] == "interrupted"
        n = summary["iterations"]
        assert 3 <= n < 500
        log = (d / "fit.log").read_text()
        its = [int(line.split("] it ")[1].split()[0]) for line in log.splitlines() if "] it " in line]
        # its own lines only: x0, 1, 2, ... once each (the signal may cut the last line short of the file)
        assert its == list(range(len(its))) and len(its) in (n, n + 1) and log.count("final: ") == 1
        seeds |= {line for line in (d / ".hydra" / "overrides.yaml").read_text().splitlines() if "seed=" in line}
        assert len(list(d.glob("events.out.tfevents.*"))) == 1
        deg, _ = eye_errors(read_json(d / "pose.json")["eye"])
        assert deg < eye_errors([0.6, 2.6, 2.0])[0]  # the best state, not the start
        assert (d / "final_strip.png").is_file() and (d / "checkpoint.pt").is_file()
    assert seeds == {f"- seed={int(signal.SIGINT)}", f"- seed={int(signal.SIGTERM)}"}  # each its own .hydra
