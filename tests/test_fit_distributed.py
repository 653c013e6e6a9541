"""scripts/fit.py under torchrun (two gloo processes), where the launcher and its processes are under test:
one run directory (rank 0's), rank 0 alone logs and checkpoints, the iterates of one process; a process
that raises ends the fit with its error line and a non-zero exit, leaving the last checkpoint loadable
but not resumable by another number of processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fitutil import FIT, cli, fit_env, run_fit

from diffrender.checkpoint import load_checkpoint

SMALL = ["scene=bunny_silhouette", "scene.views=4", "renderer.image_size=16", "scene.sphere_level=1",
         "renderer.coarse_to_fine=false", "renderer.sigma=1e-3", "device.dtype=float64", "device.threads=1",
         "logging.progress=never", "logging.image_every=0", "logging.gif=false", "logging.tensorboard=false",
         "logging.checkpoint_every=1", "distributed.timeout_s=60", "solver=custom",
         "solver._target_=distutil.FailingLM", "+solver.linear_solver=dense", "+solver.initial_damping=1.0"]


def torchrun(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(FIT),
           f"cache_dir={tmp / 'cache'}", *overrides]
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.run(cmd, capture_output=True, text=True, env=fit_env(), cwd=tmp, timeout=600)


def test_torchrun_fit_where_a_process_raises(tmp_path, capsys):
    bad = torchrun(tmp_path / "bad", *SMALL, "solver.max_iterations=6", "+solver.fail_at=3")
    # rank 1 raises at iteration 3: its error line and a non-zero exit
    assert bad.returncode != 0
    assert "error: rank 1 of 2: RuntimeError: injected failure at iteration 3" in bad.stderr, bad.stderr[-3000:]
    # one run directory, made by rank 0 and used by both; rank 0 alone logs; no summary of a failed fit
    runs = list((tmp_path / "bad" / "outputs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    log = (run / "fit.log").read_text()
    assert log.count("] it    2 ") == 1 and "] it    3 " not in log
    assert not (run / "summary.json").exists()
    # the checkpoint of iteration 2 is intact: the iterate of one process fitting the same two chunks of views
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2
    one = run_fit(tmp_path, *SMALL, "solver.max_iterations=2", "+solver.fail_at=99", "scene.view_chunks=2")
    assert one["world_size"] == 1 and one["views"]["view_chunks"] == 2 and one["views"]["keep_graphs"]
    ref = load_checkpoint(tmp_path / "run")
    a, b = ckpt["x"]["offsets"], ref["x"]["offsets"]
    assert float(b.norm()) > 1e-3 and float((a - b).norm()) <= 1e-9 * float(b.norm())
    assert ref["step"] == ckpt["step"]
    # resumed by one process: refused with one line, the checkpoint unchanged
    capsys.readouterr()
    code, _ = cli(tmp_path, f"resume={run}")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "was fitted by 2 process(es) and is resumed by 1" in err and "--nproc_per_node=2" in err
    assert load_checkpoint(run)["step"] == 2
