#!/usr/bin/env python
"""How a fit scales: with views in one process (bounded memory), and with processes (torchrun).

    python scripts/bench_scale.py                          # both parts at their default sizes
    python scripts/bench_scale.py --part procs --procs 1 2 --json rows.jsonl
    python scripts/bench_scale.py --part views --views 10 20 40 80 --size 96

``views``: one ``scripts/fit.py`` process per row (cow_shape, LM, one iteration of the σ = 1e-3 stage, float32,
CPU, one thread), at the default memory budget (``device.memory_budget_gb``, 2 GB: graphs rebuilt per
product, chunk by chunk, when keeping them all would not fit) and, up to ``--keep-up-to`` views, with
every graph kept (``device.memory_budget_gb=null``). Peak = the process's max RSS; ``it s`` = the LM
iteration; ``build s`` = scene build (targets rendered chunk by chunk, cached by the first row).

``procs``: the same fit by 1, 2, ... processes (``torchrun --standalone``), with the same chunks of views
(``scene.view_chunks`` = the largest process count, so the iterates agree); ``it s`` = median LM iteration
after the first (wall clock), ``cpu s`` = rank 0's CPU time in it (one thread: its compute, whatever else
runs on the machine); peak per rank; collectives and bytes all-reduced per iteration. Then ``t_ar(n)``,
the time of a gloo all-reduce of ``n`` floats between two processes of this machine, and the model

    T(N) = C / N + P * t_ar(n)

(C: one process's compute per LM iteration, P: collectives per iteration, n: parameters), with C the CPU
time of one process; its prediction for 2 processes against rank 0's CPU time there (the difference:
work every process repeats, the serial fraction f of ``T(N) = C (f + (1 - f) / N) + P t_ar``) and the
wall clock; and the predictions of both forms for 8 and 64 GPUs with NCCL (latency and bandwidth assumed,
printed, not measured here) and the compute measured here. Timings on a shared machine are noisy: compare
rows of one run, medians; the CPU times are the steadier figure there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIT = ROOT / "scripts" / "fit.py"
# NCCL all-reduce (ring): t = alpha + 2 (N - 1) / N * bytes / bus bandwidth. Assumed, typical published
# figures (H100/H200 class): NVLink within a node, 400 Gb/s InfiniBand between nodes.
NCCL = {8: (15e-6, 150e9), 64: (60e-6, 40e9)}


DEVICE = "cpu"


def fit(tmp: Path, name: str, procs: int, overrides: list[str]) -> dict:
    out = tmp / name
    head = [sys.executable, str(FIT)] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", str(FIT)]
    args = [*head, "logging=minimal", f"device={DEVICE}", "device.threads=1", f"hydra.run.dir={out}",
            f"cache_dir={tmp / 'cache'}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "true", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    p = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp)
    if p.returncode != 0:
        raise SystemExit(f"{name}: exit {p.returncode}\n{p.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    s["wall_s"] = time.perf_counter() - t
    return s


# ------------------------------------------------------------------------------------------ views
def views_part(a: argparse.Namespace, tmp: Path) -> list[dict]:
    rows = []
    print(f"{'views':>5} {'size':>4} {'budget':>6} {'chunks':>6} {'graphs':>8} {'peak MB':>8} {'it s':>7} "
          f"{'build s':>7}", flush=True)
    for views in a.views:
        for budget in ["2", "null"] if views <= a.keep_up_to else ["2"]:
            s = fit(tmp, f"views{views}_{budget}", 1, [
                "scene=cow_shape", f"scene.views={views}", f"renderer.image_size={a.size}", "solver.max_iterations=1",
                f"device.memory_budget_gb={budget}", "device.memory_check=false"])
            plan = s["views"] or {"view_chunks": 1, "keep_graphs": True}
            r = {"part": "views", "scene": "cow_shape", "views": views, "size": a.size, "budget_gb": budget,
                 "chunks": plan["view_chunks"], "keep_graphs": plan["keep_graphs"], "peak_mb": s["peak_rss_mb"],
                 "iteration_s": s["history"][1]["seconds"], "build_s": s["timings"]["build_s"]}
            rows.append(r)
            print(f"{views:>5} {a.size:>4} {budget:>6} {r['chunks']:>6} {'kept' if r['keep_graphs'] else 'rebuilt':>8} "
                  f"{r['peak_mb']:>8.0f} {r['iteration_s']:>7.2f} {r['build_s']:>7.1f}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------ processes
def _allreduce_worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    res = {}
    for n in sizes:
        t = torch.ones(n)
        for _ in range(3):
            dist.all_reduce(t)
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(t)
            times.append(time.perf_counter() - t0)
        res[n] = statistics.median(times)
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def allreduce_times(sizes: list[int], repeats: int, tmp: Path) -> dict[int, float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / "allreduce.json"
    mp.start_processes(_allreduce_worker, args=(2, port, sizes, repeats, str(out)), nprocs=2, start_method="spawn")
    return {int(k): v for k, v in json.loads(out.read_text()).items()}


def procs_part(a: argparse.Namespace, tmp: Path) -> list[dict]:
    rows = []
    print(f"{'procs':>5} {'views':>5} {'size':>4} {'it s':>7} {'cpu s':>7} {'peak MB per rank':>22} "
          f"{'collectives/it':>14} {'bytes/it':>9} {'final cost':>12}", flush=True)
    for procs, views, chunks in [(procs, a.procs_views, max(a.procs)) for procs in a.procs]:
        s = fit(tmp, f"procs{procs}_{views}", procs, [
            "scene=cow_shape", f"scene.views={views}", f"renderer.image_size={a.procs_size}",
            f"scene.view_chunks={chunks}", f"solver.max_iterations={a.iterations}", "solver.function_tolerance=1.0e-12",
            "logging.metrics_every=0"])
        hist = [h for h in s["history"] if h["iteration"] and h["iteration"] >= 2]
        it_s = statistics.median(h["seconds"] for h in hist) if hist else float("nan")
        cpu = [b["cpu_s"] - a_["cpu_s"] for a_, b in zip(hist, hist[1:], strict=False)]
        cpu_s = statistics.median(cpu) if cpu else float("nan")
        per_it = (0.0, 0.0)
        if procs > 1 and len(hist) >= 2:
            (c0, b0), (c1, b1) = hist[0]["reduced"], hist[-1]["reduced"]
            per_it = ((c1 - c0) / (len(hist) - 1), (b1 - b0) / (len(hist) - 1))
        peaks = s.get("peak_rss_mb_per_rank") or [s["peak_rss_mb"]]
        r = {"part": "procs", "scene": "cow_shape", "procs": procs, "views": views, "size": a.procs_size,
             "iteration_s": it_s, "cpu_s": cpu_s, "peak_mb_per_rank": peaks, "collectives_per_iteration": per_it[0],
             "bytes_per_iteration": per_it[1], "final_cost": s["final_cost"], "parameters": parameters(s)}
        rows.append(r)
        print(f"{procs:>5} {views:>5} {a.procs_size:>4} {it_s:>7.3f} {cpu_s:>7.3f} "
              f"{' '.join(f'{p:.0f}' for p in peaks):>22} {per_it[0]:>14.1f} {per_it[1]:>9.0f} "
              f"{s['final_cost']:>12.6e}", flush=True)
    return rows


def parameters(s: dict) -> int:
    """The tangent size n of the first stage, from its solver report."""
    import re

    m = re.search(r"Parameters \(tangent\)\s+(\d+)", s["stages"][0]["report"])
    return int(m.group(1))


def model(rows: list[dict], t_ar: dict[int, float], n: int) -> list[dict]:
    by = {r["procs"]: r for r in rows if r["part"] == "procs"}
    if 1 not in by or 2 not in by:
        return []
    c, c2, t1, t2 = by[1]["cpu_s"], by[2]["cpu_s"], by[1]["iteration_s"], by[2]["iteration_s"]
    p = by[2]["collectives_per_iteration"]
    sizes = sorted(t_ar)
    ar = t_ar[min(sizes, key=lambda k: abs(k - n))]
    f = min(max(2 * c2 / c - 1, 0.0), 1.0)  # rank 0's compute with 2 processes: C (f + (1 - f) / 2)
    pred2 = c / 2 + p * ar
    out = [{"part": "model", "C_s": c, "P": p, "n": n, "t_ar_s": ar, "predicted_T2_s": pred2, "cpu_T2_s": c2,
            "wall_T1_s": t1, "wall_T2_s": t2, "serial_fraction": f}]
    print(f"\nmodel: T(N) = C/N + P t_ar(n); n = {n} floats, P = {p:.1f} collectives per LM iteration, "
          f"C = {c:.3f} s (one process's CPU time per iteration), t_ar(n) = {ar * 1e6:.0f} us (gloo, 2 processes, "
          f"this machine)")
    print(f"  2 processes: predicted {pred2:.3f} s (communication {p * ar * 1e3:.1f} ms); rank 0 computed "
          f"{c2:.3f} s + communication = {c2 + p * ar:.3f} s: serial fraction f = {f:.2f} "
          f"(T(N) = C (f + (1 - f)/N) + P t_ar); wall clock {t1:.3f} s -> {t2:.3f} s")
    for procs, (alpha_g, bw) in NCCL.items():
        t_nccl = alpha_g + 2 * (procs - 1) / procs * 4 * n / bw
        ideal = c / procs + p * t_nccl
        amdahl = c * (f + (1 - f) / procs) + p * t_nccl
        out.append({"part": "prediction", "procs": procs, "backend": "nccl (assumed)", "t_ar_s": t_nccl,
                    "iteration_s": ideal, "speedup": c / ideal, "iteration_s_with_f": amdahl,
                    "speedup_with_f": c / amdahl, "communication_s": p * t_nccl})
        print(f"  {procs:>2} GPUs (NCCL, assumed alpha {alpha_g * 1e6:.0f} us, {bw / 1e9:.0f} GB/s): t_ar = "
              f"{t_nccl * 1e6:.0f} us, communication {p * t_nccl * 1e3:.2f} ms per iteration; T = {ideal:.3f} s "
              f"({c / ideal:.1f}x), with f: {amdahl:.3f} s ({c / amdahl:.1f}x)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["views", "procs", "both"], default="both")
    ap.add_argument("--views", type=int, nargs="+", default=[10, 20, 40, 80], help="views part: view counts")
    ap.add_argument("--size", type=int, default=96, help="views part: image size")
    ap.add_argument("--keep-up-to", type=int, default=20, help="views part: also keep every graph up to this many")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="procs part: process counts")
    ap.add_argument("--procs-views", type=int, default=16)
    ap.add_argument("--procs-size", type=int, default=64)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="fits on this device (one GPU per "
                    "process; the all-reduce timing stays gloo on the CPU)")
    ap.add_argument("--json", help="append the rows as JSON lines to this file")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        if a.part in ("views", "both"):
            rows += views_part(a, Path(tmp))
        if a.part in ("procs", "both"):
            print() if rows else None
            rows += procs_part(a, Path(tmp))
            n = next(r["parameters"] for r in rows if r["part"] == "procs")
            t_ar = allreduce_times(sorted({16, 1024, n, 65536, 1 << 20}), 50, Path(tmp))
            print("\ngloo all-reduce, 2 processes: "
                  + ", ".join(f"{k} floats {v * 1e6:.0f} us" for k, v in t_ar.items()))
            rows += [{"part": "allreduce", "floats": k, "seconds": v} for k, v in t_ar.items()]
            rows += model(rows, t_ar, n)
    if a.json:
        with open(a.json, "a") as f:
            for r in rows:
                f.write(json.dumps({**r, "device": a.device, "dtype": "float32", "threads": 1}) + "\n")


if __name__ == "__main__":
    main()
