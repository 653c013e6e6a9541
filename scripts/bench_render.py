"""Benchmark the soft rasterizer: forward, forward+backward, linearized JVP, reused VJP, memory, pairs.

    python scripts/bench_render.py                       # the full grid (meshes x sizes x views x modes)
    python scripts/bench_render.py --mesh spot --size 256 --views 1 --mode silhouette
    python scripts/bench_render.py --json bench_render.jsonl

Times are medians over --repeats runs after a warm-up. "prep" is the pair search (no gradients) that a
solver pays once per new point; "fwd", "fwd+bwd", "jvp" and "vjp" are the differentiable render given
the pairs, which a solver pays per product. Peak memory is what one forward+backward adds on top of
the scene and its pairs: torch.cuda.max_memory_allocated on CUDA; on CPU the growth of the peak
resident set in a fresh process whose allocator returns large blocks at once (MALLOC_MMAP_THRESHOLD_),
so that resident memory tracks live tensors (Linux /proc, peak reset through clear_refs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchutil import median_ms, peak_mb  # noqa: E402

from diffrender.camera import camera_from_look_at, orbit_eyes  # noqa: E402
from diffrender.mesh import Mesh, icosphere, load_obj, normalize, subdivide  # noqa: E402
from diffrender.raster.shading import Lights, Material  # noqa: E402
from diffrender.render import RenderSettings, prepare, render  # noqa: E402

MESHES = {
    "ico3": lambda: icosphere(3),
    "spot": lambda: normalize(load_obj(ROOT / "assets" / "spot.obj")),
    "spot_sub": lambda: subdivide(normalize(load_obj(ROOT / "assets" / "spot.obj"))),
}


def peak_in_subprocess(mesh: str, size: int, views: int, mode: str, cull: str, threads: int) -> float:
    """CPU peak memory of one row, measured in a fresh process (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--peak-only", "--mesh", mesh, "--size", str(size), "--views", str(views),
           "--mode", mode, "--cull", cull, "--device", "cpu", "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def setup(mesh: Mesh, size: int, views: int, mode: str, device: torch.device, cull: str = "on"):
    """The scene of one row and its differentiable function f(verts, colors) -> image."""
    dtype = torch.float32
    verts = mesh.verts.to(device, dtype)
    faces = mesh.faces.to(device)
    eyes = orbit_eyes(views, 2.7, (20.0, -10.0, 40.0), dtype=dtype, device=device)
    cam = camera_from_look_at(eyes, fov_deg=50, height=size, width=size)
    settings = RenderSettings(sigma=1e-4, gamma=1e-4, cull_backfaces=cull == "on")
    pairs = prepare(verts, faces, cam, settings)
    colors = torch.full_like(verts, 0.7)
    lights = Lights.create(ambient=(0.3,) * 3, directional_dirs=[(0.3, -1.0, -0.4)],
                           directional_colors=[(0.7,) * 3], dtype=dtype, device=device)
    material = Material(specular=0.2, shininess=16.0)

    if mode == "silhouette":
        def f(v, c):
            return render(v, faces, cam, pairs, settings, outputs=("alpha",))["alpha"]
    else:
        def f(v, c):
            return render(v, faces, cam, pairs, settings, colors=c, lights=lights, material=material,
                          outputs=("rgb",))["rgb"]

    v_req = verts.clone().requires_grad_()
    c_req = colors.clone().requires_grad_()

    def fwd_bwd():
        out = f(v_req, c_req)
        out.backward(torch.ones_like(out))

    return verts, faces, colors, cam, settings, pairs, f, fwd_bwd


def bench_row(mesh: Mesh, mesh_name: str, size: int, views: int, mode: str, device: torch.device,
              repeats: int, cull: str = "on") -> dict:
    verts, faces, colors, cam, settings, pairs, f, fwd_bwd = setup(mesh, size, views, mode, device, cull)

    with torch.no_grad():
        fwd_ms = median_ms(lambda: f(verts, colors), device, repeats)
    fwd_bwd_ms = median_ms(fwd_bwd, device, repeats)
    prep_ms = median_ms(lambda: prepare(verts, faces, cam, settings), device, repeats)
    if device.type == "cuda":
        peak = peak_mb(fwd_bwd, device)
    else:
        peak = peak_in_subprocess(mesh_name, size, views, mode, cull, torch.get_num_threads())
    u = (torch.randn_like(verts) * 1e-3, torch.randn_like(colors))
    _, jvp_fn = torch.func.linearize(f, verts, colors)
    jvp_ms = median_ms(lambda: jvp_fn(*u), device, repeats)
    out, vjp_fn = torch.func.vjp(f, verts, colors)
    w = torch.randn_like(out)
    vjp_ms = median_ms(lambda: vjp_fn(w), device, repeats)
    return dict(mesh=mesh_name, faces=int(faces.shape[0]), height=size, width=size, views=views, mode=mode,
                cull=cull, pairs=len(pairs), prep_ms=prep_ms, fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, jvp_ms=jvp_ms, vjp_ms=vjp_ms,
                total_ms=prep_ms + fwd_bwd_ms, ns_per_pair=fwd_bwd_ms * 1e6 / max(len(pairs), 1), peak_mb=peak, device=str(device),
                dtype="float32")


COLUMNS = [("mesh", "{:>8}"), ("faces", "{:>6}"), ("height", "{:>5}"), ("views", "{:>5}"), ("mode", "{:>10}"), ("cull", "{:>4}"),
           ("pairs", "{:>9}"), ("prep_ms", "{:>8.1f}"), ("fwd_ms", "{:>8.1f}"), ("fwd_bwd_ms", "{:>10.1f}"),
           ("jvp_ms", "{:>8.1f}"), ("vjp_ms", "{:>8.1f}"), ("total_ms", "{:>8.1f}"), ("ns_per_pair", "{:>11.1f}"), ("peak_mb", "{:>8.0f}")]


def print_header() -> None:
    print(" ".join(f"{name:>{len(fmt.format(0) if 'f' in fmt else fmt.format('x'))}}" for name, fmt in COLUMNS))


def print_row(row: dict) -> None:
    print(" ".join(fmt.format(row[name]) for name, fmt in COLUMNS), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", choices=sorted(MESHES), action="append", help="mesh (repeatable; default: all)")
    p.add_argument("--size", type=int, action="append", help="square image size (default: 128, 256, 512)")
    p.add_argument("--views", type=int, action="append", help="views per render (default: 1, 8)")
    p.add_argument("--mode", choices=["silhouette", "shaded"], action="append", help="default: both")
    p.add_argument("--cull", choices=["on", "off"], action="append", help="back-face culling (default: on)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also append the rows as JSON lines to this file")
    p.add_argument("--peak-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            print("error: --device cuda asked for, but CUDA is not available", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.peak_only:  # internal: one row's CPU peak memory, measured in this fresh process
        _, _, _, _, _, _, _, fwd_bwd = setup(MESHES[args.mesh[0]](), args.size[0], args.views[0], args.mode[0],
                                             device, (args.cull or ["on"])[0])
        print(peak_mb(fwd_bwd, device))
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, float32, "
          f"sigma=1e-4, median of {args.repeats}")
    print_header()
    for mesh_name in args.mesh or list(MESHES):
        mesh = MESHES[mesh_name]()
        for size in args.size or [128, 256, 512]:
            for views in args.views or [1, 8]:
                for mode in args.mode or ["silhouette", "shaded"]:
                    for cull in args.cull or ["on"]:
                        row = bench_row(mesh, mesh_name, size, views, mode, device, args.repeats, cull)
                        print_row(row)
                        if args.json:
                            with args.json.open("a") as fh:
                                fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
