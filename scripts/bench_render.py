"""Benchmark the soft rasterizer: pair search, forward, forward+backward, JVP, VJP, memory, pairs.

    python scripts/bench_render.py                       # the full grid (meshes x sizes x views x modes x culling)
    python scripts/bench_render.py --mesh spot --size 256 --views 1 --mode silhouette --cull off
    python scripts/bench_render.py --json bench_render.jsonl --vs-pytorch3d

Times are medians over --repeats runs after a warm-up. "prep" is a fresh pair search (no gradients);
"reuse" is a ``PairCache.get`` that finds its list (built with a 1 px margin) still valid, what a solver
pays at a trial point that moved no vertex farther than the margin; "fwd", "fwd+bwd", "jvp" (one
product of a ``torch.func.linearize`` map) and "vjp" (one call of a reused ``torch.func.vjp``) are the
differentiable render given the pairs; "total" = prep + fwd+bwd, what one Adam step costs without
reuse; "prep/fb" = prep / fwd+bwd. Peak memory is what one forward+backward (after a first one) adds
on top of the scene and its pairs: torch.cuda.max_memory_allocated on CUDA; on CPU the growth of the
peak resident set in a fresh process whose allocator maps every block over 4 KiB on its own and
returns it at once (MALLOC_MMAP_THRESHOLD_), so that resident memory tracks live tensors (Linux /proc,
peak reset through clear_refs). With both --cull on and off,
a second table gives what culling changes in the images. --vs-pytorch3d times PyTorch3D's soft
silhouette (same mesh, cameras, σ, γ; K = 50 faces per pixel, no culling) in this process, if it is
importable, and compares the values.
"""

from __future__ import annotations

import argparse
import json
import math
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
from diffrender.raster import native  # noqa: E402
from diffrender.raster.shading import Lights, Material  # noqa: E402
from diffrender.render import PairCache, RenderSettings, prepare, render  # noqa: E402

MESHES = {
    "ico3": lambda: icosphere(3),
    "spot": lambda: normalize(load_obj(ROOT / "assets" / "spot.obj")),
    "spot_sub": lambda: subdivide(normalize(load_obj(ROOT / "assets" / "spot.obj"))),
    "bunny_1k": lambda: normalize(load_obj(ROOT / "assets" / "bunny_1k.obj")),
}
CULL = {"on": True, "off": False, "auto": "auto"}
SIGMA = GAMMA = 1e-4


def peak_in_subprocess(mesh: str, size: int, views: int, mode: str, cull: str, backend: str, threads: int) -> float:
    """CPU peak memory of one row, measured in a fresh process (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4096", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--peak-only", "--mesh", mesh, "--size", str(size), "--views", str(views),
           "--mode", mode, "--cull", cull, "--backend", backend, "--device", "cpu", "--threads", str(threads)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return float("nan")


def cameras(size: int, views: int, dtype: torch.dtype, device: torch.device):
    eyes = orbit_eyes(views, 2.7, (20.0, -10.0, 40.0), dtype=dtype, device=device)
    return camera_from_look_at(eyes, fov_deg=50, height=size, width=size)


def setup(mesh: Mesh, size: int, views: int, mode: str, device: torch.device, cull: str = "on",
          backend: str = "auto"):
    """The scene of one row and its differentiable function f(verts, colors) -> image."""
    dtype = torch.float32
    verts = mesh.verts.to(device, dtype)
    faces = mesh.faces.to(device)
    cam = cameras(size, views, dtype, device)
    settings = RenderSettings(sigma=SIGMA, gamma=GAMMA, cull_backfaces=CULL[cull], backend=backend)
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
              repeats: int, cull: str = "on", backend: str = "auto") -> tuple[dict, torch.Tensor]:
    verts, faces, colors, cam, settings, pairs, f, fwd_bwd = setup(mesh, size, views, mode, device, cull, backend)

    with torch.no_grad():
        image = f(verts, colors)
        fwd_ms = median_ms(lambda: f(verts, colors), device, repeats)
    fwd_bwd_ms = median_ms(fwd_bwd, device, repeats)
    prep_ms = median_ms(lambda: prepare(verts, faces, cam, settings), device, repeats)
    cache = PairCache(faces, settings, margin_px=1.0)
    cache.get(verts, cam)
    reuse_ms = median_ms(lambda: cache.get(verts, cam), device, repeats)
    if device.type == "cuda":
        peak = peak_mb(fwd_bwd, device)  # after the warm-up of median_ms
    else:
        peak = peak_in_subprocess(mesh_name, size, views, mode, cull, backend, torch.get_num_threads())
    u = (torch.randn_like(verts) * 1e-3, torch.randn_like(colors))
    _, jvp_fn = torch.func.linearize(f, verts, colors)
    jvp_ms = median_ms(lambda: jvp_fn(*u), device, repeats)
    out, vjp_fn = torch.func.vjp(f, verts, colors)
    w = torch.randn_like(out)
    vjp_ms = median_ms(lambda: vjp_fn(w), device, repeats)
    n = max(len(pairs), 1)
    row = dict(mesh=mesh_name, faces=int(faces.shape[0]), height=size, width=size, views=views, mode=mode, cull=cull,
               pairs=len(pairs), prep_ms=prep_ms, reuse_ms=reuse_ms, fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms,
               jvp_ms=jvp_ms, vjp_ms=vjp_ms, total_ms=prep_ms + fwd_bwd_ms, prep_per_fb=prep_ms / fwd_bwd_ms,
               ns_per_pair=fwd_bwd_ms * 1e6 / n, peak_mb=peak, bytes_per_pair=peak * 2**20 / n, device=str(device),
               dtype="float32", backend=backend if backend != "auto" else
               ("native" if device.type == "cpu" and native.available() else "torch"))
    return row, image


COLUMNS = [("mesh", "{:>8}"), ("faces", "{:>6}"), ("height", "{:>5}"), ("views", "{:>5}"), ("mode", "{:>10}"),
           ("cull", "{:>4}"), ("pairs", "{:>9}"), ("prep_ms", "{:>8.1f}"), ("reuse_ms", "{:>8.2f}"),
           ("fwd_ms", "{:>8.1f}"), ("fwd_bwd_ms", "{:>10.1f}"), ("jvp_ms", "{:>8.1f}"), ("vjp_ms", "{:>8.1f}"),
           ("total_ms", "{:>8.1f}"), ("prep_per_fb", "{:>11.2f}"), ("ns_per_pair", "{:>11.1f}"),
           ("peak_mb", "{:>7.0f}"), ("bytes_per_pair", "{:>14.0f}")]


def print_table(columns: list[tuple[str, str]], rows: list[dict] | None = None) -> None:
    """The header (rows None) or one row, each column as wide as its name or its format."""
    def width(name: str, fmt: str) -> int:
        try:
            return max(len(name), len(fmt.format(0)))
        except ValueError:
            return max(len(name), len(fmt.format("x")))
    if rows is None:
        print(" ".join(f"{name:>{width(name, fmt)}}" for name, fmt in columns))
        return
    for row in rows:
        print(" ".join(f"{fmt.format(row[name]):>{width(name, fmt)}}" for name, fmt in columns), flush=True)


def cull_effect(off: torch.Tensor, on: torch.Tensor, mode: str) -> dict:
    """How much culling changes the image: mean and max |Δ| and, for silhouettes, IoU of α > 0.5."""
    d = (off - on).abs()
    row = dict(mean_abs_diff=float(d.mean()), max_abs_diff=float(d.max()),
               changed_px=int((d.reshape(*d.shape[:3], -1).amax(-1) > 1e-3).sum()))
    if mode == "silhouette":
        a, b = off > 0.5, on > 0.5
        row["iou"] = float((a & b).sum() / (a | b).sum().clamp(min=1))
    else:
        row["iou"] = math.nan
    return row


def vs_pytorch3d(mesh: Mesh, size: int, views: int, repeats: int, ours_ms: float,
                 ours_alpha: torch.Tensor) -> dict | None:
    """PyTorch3D's soft silhouette of the same scene (no culling, K = 50): time of one forward+backward
    and agreement with ours; None when PyTorch3D is not importable."""
    try:
        from pytorch3d.renderer import (
            BlendParams,
            MeshRasterizer,
            MeshRenderer,
            RasterizationSettings,
            SoftSilhouetteShader,
        )
        from pytorch3d.structures import Meshes
        from pytorch3d.utils import cameras_from_opencv_projection
    except ImportError:
        return None
    cam = cameras(size, views, torch.float32, torch.device("cpu"))
    K = torch.zeros(views, 3, 3)
    K[:, 0, 0], K[:, 1, 1] = cam.focal[:, 0], cam.focal[:, 1]
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = cam.principal[:, 0], cam.principal[:, 1], 1
    p3_cams = cameras_from_opencv_projection(cam.R, cam.t, K, torch.tensor([[size, size]] * views))
    raster = RasterizationSettings(image_size=size, blur_radius=math.log(1 / 1e-4 - 1) * SIGMA, faces_per_pixel=50,
                                   cull_backfaces=False)
    renderer = MeshRenderer(MeshRasterizer(cameras=p3_cams, raster_settings=raster),
                            SoftSilhouetteShader(blend_params=BlendParams(sigma=SIGMA, gamma=GAMMA)))
    verts = mesh.verts.float().clone().requires_grad_()

    def fwd_bwd():
        meshes = Meshes(verts=[verts] * views, faces=[mesh.faces] * views)
        alpha = renderer(meshes)[..., 3]
        alpha.backward(torch.ones_like(alpha))
        return alpha

    alpha = fwd_bwd().detach()
    ms = median_ms(fwd_bwd, torch.device("cpu"), max(1, repeats // 2))
    d = (alpha - ours_alpha).abs()
    a, b = alpha > 0.5, ours_alpha > 0.5
    return dict(p3d_ms=ms, ours_ms=ours_ms, ratio=ms / ours_ms, mean_abs_diff=float(d.mean()),
                max_abs_diff=float(d.max()), iou=float((a & b).sum() / (a | b).sum().clamp(min=1)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mesh", choices=sorted(MESHES), action="append", help="mesh (repeatable; default: ico3, spot, "
                   "spot_sub)")
    p.add_argument("--size", type=int, action="append", help="square image size (default: 128, 256, 512)")
    p.add_argument("--views", type=int, action="append", help="views per render (default: 1, 8)")
    p.add_argument("--mode", choices=["silhouette", "shaded"], action="append", help="default: both")
    p.add_argument("--cull", choices=sorted(CULL), action="append",
                   help="back-face culling: on, off, or auto (the renderer's default); default: off and on")
    p.add_argument("--backend", choices=["auto", "native", "torch"], default="auto",
                   help="rasterizer path: compiled kernels on CPU (auto, native) or PyTorch ops (torch)")
    p.add_argument("--vs-pytorch3d", action="store_true", help="also time PyTorch3D on unculled silhouette rows")
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
    if args.backend == "native" and not (device.type == "cpu" and native.available()):
        print(f"error: --backend native asked for, but {native.status()}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    culls = args.cull or ["off", "on"]
    if args.peak_only:  # internal: one row's CPU peak memory, measured in this fresh process
        fwd_bwd = setup(MESHES[args.mesh[0]](), args.size[0], args.views[0], args.mode[0], device, culls[0],
                        args.backend)[-1]
        fwd_bwd()  # warm-up: one-time allocations (autograd engine, kernels, thread pool) are not per step
        print(peak_mb(fwd_bwd, device))
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    path = native.status() if device.type == "cpu" and args.backend != "torch" else "PyTorch path"
    print(f"# device: {device} ({name}), torch {torch.__version__}, threads {torch.get_num_threads()}, float32, "
          f"sigma=gamma={SIGMA}, median of {args.repeats}; rasterizer: {path}")
    print_table(COLUMNS)
    effects, p3d = [], []
    for mesh_name in args.mesh or ["ico3", "spot", "spot_sub"]:
        mesh = MESHES[mesh_name]()
        for size in args.size or [128, 256, 512]:
            for views in args.views or [1, 8]:
                for mode in args.mode or ["silhouette", "shaded"]:
                    images = {}
                    for cull in culls:
                        row, images[cull] = bench_row(mesh, mesh_name, size, views, mode, device, args.repeats, cull,
                                                      args.backend)
                        print_table(COLUMNS, [row])
                        if args.json:
                            with args.json.open("a") as fh:
                                fh.write(json.dumps(row) + "\n")
                        if args.vs_pytorch3d and mode == "silhouette" and cull == "off":
                            cmp = vs_pytorch3d(mesh, size, views, args.repeats, row["total_ms"], images[cull].cpu())
                            if cmp is None:
                                print("# --vs-pytorch3d: PyTorch3D is not importable here; skipped")
                                args.vs_pytorch3d = False
                            else:
                                p3d.append(dict(mesh=mesh_name, height=size, views=views, **cmp))
                    if "on" in images and "off" in images:
                        effects.append(dict(mesh=mesh_name, height=size, views=views, mode=mode,
                                            **cull_effect(images["off"], images["on"], mode)))
    if effects:
        print("\n# what culling changes (culled vs unculled image of each row)")
        cols = [("mesh", "{:>8}"), ("height", "{:>5}"), ("views", "{:>5}"), ("mode", "{:>10}"),
                ("mean_abs_diff", "{:>13.2e}"), ("max_abs_diff", "{:>12.3f}"), ("changed_px", "{:>10d}"),
                ("iou", "{:>7.4f}")]
        print_table(cols)
        print_table(cols, effects)
    if p3d:
        print("\n# PyTorch3D side by side (unculled silhouette, one forward+backward; ours = pair search + fwd + bwd)")
        cols = [("mesh", "{:>8}"), ("height", "{:>5}"), ("views", "{:>5}"), ("p3d_ms", "{:>9.1f}"),
                ("ours_ms", "{:>8.1f}"), ("ratio", "{:>7.0f}"), ("mean_abs_diff", "{:>13.2e}"),
                ("max_abs_diff", "{:>12.3f}"), ("iou", "{:>7.4f}")]
        print_table(cols)
        print_table(cols, p3d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
