"""The compiled kernels (``kernels.c``): building, loading, and calling them on CPU tensors.

The C file includes no Python or torch headers, so any C compiler builds it in about a second. It is
built on first use into a per-user cache (``$DIFFRENDER_CACHE``, else ``~/.cache/diffrender``), under a
name keyed by the source, the flags and the machine, and loaded with ctypes. Without a compiler, or
with ``DIFFRENDER_NATIVE=0``, ``available()`` is False and the renderer keeps to its PyTorch path, which
is also the reference the tests compare these kernels with. Work is split over
``torch.get_num_threads()`` threads (ctypes releases the GIL while C runs).

The differentiable sweeps are registered as ``torch.library`` custom ops, so that tracing (the
``make_fx`` inside ``torch.func.linearize``) records them as opaque calls instead of their outputs.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("kernels.c")
# -fno-trapping-math lets branch-free selects vectorize; it changes no result (no trap handlers are used).
FLAGS = ["-O3", "-fPIC", "-shared", "-fno-math-errno", "-fno-trapping-math", "-fopenmp-simd"]
ARCH_FLAGS = ["-march=native"]  # dropped if the compiler refuses it
ROWS = 19  # values of a per-(view, face) table row, see raster/geometry.py
MIN_PARALLEL = 1 << 15  # fewer pairs than this run on one thread

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None
_pool: tuple[int, ThreadPoolExecutor] | None = None


class _Params(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("xy", "z", "attrs", "faces", "runs", "band_off")] + \
        [(name, ctypes.c_int64) for name in ("NP", "V", "F", "H", "W", "C", "blend", "band_rows", "cull")] + \
        [(name, ctypes.c_double) for name in ("scale", "r2", "kz")] + \
        [(name, ctypes.c_void_p) for name in ("alpha", "out", "state", "t_xy", "t_z", "t_attrs", "t_alpha", "t_out",
                                              "g_alpha", "g_out", "g_xy", "g_z", "g_attrs", "pair_off", "c_coef",
                                              "c_idx")]


def _cache_dir() -> Path:
    env = os.environ.get("DIFFRENDER_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffrender"


def _machine() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux tells them."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        flags = next(line for line in lines if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.platform()} {platform.machine()} {flags}"


def _compile(cc: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        for arch in (ARCH_FLAGS, []):
            done = subprocess.run([cc, *FLAGS, *arch, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
                return
        raise subprocess.CalledProcessError(done.returncode, cc, done.stdout, done.stderr)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join([cc, *FLAGS, *ARCH_FLAGS]).encode(),
                                     _machine().encode()])).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{key}.so"
    if not target.exists():
        _compile(cc, target)
        for old in target.parent.glob("kernels-*.so"):  # builds of other versions, unused for a week
            with contextlib.suppress(OSError):
                if old != target and time.time() - old.stat().st_atime > 7 * 86400:
                    old.unlink()
    lib = ctypes.CDLL(str(target))
    p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for sfx in ("f32", "f64"):
        fn = getattr(lib, f"dr_plan_{sfx}")
        fn.argtypes = [p, p, p, i64, i64, i64, i64, i64, f64, i64, f64, i64, p]
        fn.restype = p
        fn = getattr(lib, f"dr_valid_{sfx}")
        fn.argtypes = [p, p, p, i64, i64, i64, f64, i64, p]
        fn.restype = None
        for name in ("forward", "jvp", "vjp", "coef"):
            fn = getattr(lib, f"dr_{name}_{sfx}")
            fn.argtypes = [ctypes.POINTER(_Params), i64, i64]
            fn.restype = ctypes.c_int
        for name in ("coef_jvp", "coef_vjp"):
            fn = getattr(lib, f"dr_{name}_{sfx}")
            fn.argtypes = [p, p, i64, i64, p, p]
            fn.restype = None
        fn = getattr(lib, f"dr_jvp_many_{sfx}")
        fn.argtypes = [ctypes.POINTER(_Params), i64, i64, i64]
        fn.restype = ctypes.c_int
    for name, args in (("dr_search", [p, i64, i64, p, p, p]), ("dr_compact", [p, p, p, i64, i64, p, p]),
                       ("dr_plan_ub", [p, p]), ("dr_plan_free", [p]), ("dr_cover", [p, i64, p])):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first call; None if that is impossible or disabled."""
    global _lib, _error
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            if os.environ.get("DIFFRENDER_NATIVE", "1") in ("0", "false", "off"):
                _error = "disabled by DIFFRENDER_NATIVE"
            else:
                try:
                    _lib = _build()
                except (OSError, subprocess.SubprocessError) as exc:
                    detail = getattr(exc, "stderr", None) or str(exc)
                    _error = f"could not build {SOURCE.name}: {detail.strip().splitlines()[-1] if detail else exc}"
    return _lib


def available() -> bool:
    """Whether the compiled kernels can be used (they serve CPU tensors only)."""
    return library() is not None


def status() -> str:
    """One line for benchmark headers: which rasterizer path is in use and why."""
    return "compiled kernels" if available() else f"PyTorch path ({_error})"


def _suffix(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "f32"
    if dtype == torch.float64:
        return "f64"
    raise TypeError(f"compiled kernels support float32 and float64, got {dtype}")


def _run(fn: Callable[[int, int], None], bounds: Sequence[int]) -> None:
    """Call ``fn(lo, hi)`` on consecutive ranges of ``bounds``, one per thread."""
    global _pool
    ranges = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True) if hi > lo]
    if len(ranges) <= 1:
        for lo, hi in ranges:
            fn(lo, hi)
        return
    with _lock:
        if _pool is None or _pool[0] < len(ranges):
            _pool = (len(ranges), ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="diffrender"))
        pool = _pool[1]
    for future in [pool.submit(fn, lo, hi) for lo, hi in ranges]:
        future.result()


def _split(cumulative: Tensor, parts: int, min_total: int | None = None) -> list[int]:
    """Indices cutting ``cumulative`` (non-decreasing, starting at 0) into ``parts`` pieces of equal weight
    (one piece below ``min_total``, default ``MIN_PARALLEL``)."""
    min_total = MIN_PARALLEL if min_total is None else min_total
    total = int(cumulative[-1])
    n = cumulative.numel() - 1
    if parts <= 1 or total < min_total:
        return [0, n]
    goals = torch.arange(1, parts, dtype=cumulative.dtype, device=cumulative.device) * total // parts
    cuts = torch.searchsorted(cumulative, goals).clamp(0, n).tolist()
    return [0, *cuts, n]


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


# ---------------------------------------------------------------- pair search


def band_rows_for(width: int) -> int:
    """Rows per band: a band's pixel planes (a few floats per pixel) should stay in the L2 cache."""
    return max(1, min(16, 4096 // max(width, 1)))


@torch.no_grad()
def valid_faces(xy: Tensor, z: Tensor, faces: Tensor, near: float, cull: bool) -> Tensor:
    """(N*F,) bool: the view-faces that can have pairs (raster/coverage.py's valid_faces, computed as the
    compiled search does). xy: (N, V, 2); z: (N, V); faces: (F, 3) int64."""
    xy, z, faces = _contig(xy, z, faces.long())
    out = torch.empty(xy.shape[0] * faces.shape[0], dtype=torch.uint8)
    getattr(library(), f"dr_valid_{_suffix(xy.dtype)}")(xy.data_ptr(), z.data_ptr(), faces.data_ptr(), xy.shape[0],
                                                         xy.shape[1], faces.shape[0], float(near), int(cull),
                                                         out.data_ptr())
    return out.bool()


@torch.no_grad()
def find_runs(xy: Tensor, z: Tensor, faces: Tensor, height: int, width: int, radius: float, near: float,
              cull: bool) -> tuple[Tensor, Tensor, Tensor, int]:
    """The pairs within ``radius`` px of (or inside) each valid view-face, as runs of pixels.

    xy: (N, V, 2) pixel coordinates, z: (N, V) depths, faces: (F, 3). Returns runs (R, 3) int64
    (view_face, first pixel, length): the consecutive pixels of one image row near one face; band_off
    (NB + 1,): the runs of band b (``band_rows`` rows of one view) are ``band_off[b]:band_off[b + 1]``,
    ordered by face then row; band_pairs (NB + 1,): cumulative pairs per band; and band_rows. The valid
    faces are binned into the bands their grown bounding box overlaps; for each face and row, the run is
    the interval of the triangle grown by the radius (a convex set), computed in closed form.
    """
    lib = library()
    xy, z, faces = _contig(xy, z, faces.long())
    i64 = dict(dtype=torch.long)
    band_rows = band_rows_for(width)
    sizes = (ctypes.c_int64 * 2)()
    plan = getattr(lib, f"dr_plan_{_suffix(xy.dtype)}")(
        xy.data_ptr(), z.data_ptr(), faces.data_ptr(), xy.shape[0], xy.shape[1], faces.shape[0], height, width,
        float(near), int(cull), float(radius), band_rows, sizes)
    if not plan:
        raise MemoryError("pair search: out of memory for the search plan")
    try:
        ub, nbands = sizes[0], sizes[1]
        ub_off = torch.empty(nbands + 1, **i64)
        lib.dr_plan_ub(plan, ub_off.data_ptr())
        ub_runs = torch.empty(ub, 3, **i64)
        band_count, band_pairs = torch.empty(nbands, **i64), torch.zeros(nbands + 1, **i64)
        bounds = _split(ub_off, torch.get_num_threads(), min_total=MIN_PARALLEL // 8)
        _run(lambda lo, hi: lib.dr_search(plan, lo, hi, ub_runs.data_ptr(), band_count.data_ptr(),
                                          band_pairs[1:].data_ptr()), bounds)
        run_off = torch.zeros(nbands + 1, **i64)
        torch.cumsum(band_count, 0, out=run_off[1:])
        runs = torch.empty(int(run_off[-1]), 3, **i64)
        _run(lambda lo, hi: lib.dr_compact(plan, run_off.data_ptr(), band_count.data_ptr(), lo, hi,
                                           ub_runs.data_ptr(), runs.data_ptr()), bounds)
    finally:
        lib.dr_plan_free(plan)
    return runs, run_off, torch.cumsum(band_pairs, 0), band_rows


def covered(runs: Tensor, num_pixels: int) -> Tensor:
    """(num_pixels,) bool: the pixels of at least one run."""
    mask = torch.zeros(num_pixels, dtype=torch.uint8)
    runs = runs.contiguous()
    library().dr_cover(runs.data_ptr(), runs.shape[0], mask.data_ptr())
    return mask.bool()


# ---------------------------------------------------------------- the fused sweep: forward, J, Jᵀ


def _params(xy: Tensor, z: Tensor, attrs: Tensor, faces: Tensor, runs: Tensor, band_off: Tensor,
            dims: Sequence[int], consts: Sequence[float], **tensors: Tensor | None) -> _Params:
    npix, f, h, w, blend, band_rows, cull = dims
    prm = _Params(xy=_ptr(xy), z=_ptr(z), attrs=_ptr(attrs), faces=_ptr(faces), runs=_ptr(runs),
                  band_off=_ptr(band_off), NP=npix, V=z.shape[1], F=f, H=h, W=w, C=attrs.shape[1], blend=blend,
                  band_rows=band_rows, cull=cull)
    prm.scale, prm.r2, prm.kz = consts
    for name, t in tensors.items():
        setattr(prm, name, _ptr(t))
    return prm


def _sweep(kind: str, dtype: torch.dtype, band_pairs: Tensor, prms: Callable[[int], _Params],
           *extra: int) -> int:
    """Run ``dr_<kind>`` over all bands, split by pairs over threads; ``prms(i)`` gives thread i's params and
    ``extra`` come before the band range. Returns the number of threads used."""
    fn = getattr(library(), f"dr_{kind}_{_suffix(dtype)}")
    bounds = _split(band_pairs, torch.get_num_threads())
    slot = {lo: i for i, lo in enumerate(bounds[:-1])}
    params = [prms(i) for i in range(len(bounds) - 1)]
    failed = []

    def call(lo: int, hi: int) -> None:
        if fn(ctypes.byref(params[slot[lo]]), *extra, lo, hi):
            failed.append(lo)

    _run(call, bounds)
    if failed:
        raise MemoryError(f"rasterizer sweep ({kind}): out of memory for a band's scratch")
    return len(params)


def _contig(*ts: Tensor) -> list[Tensor]:
    return [t.contiguous() for t in ts]


def _all_zero(*ts: Tensor) -> bool:
    """Whether every (co)tangent is zero, so the linear map's product is zero without a sweep: the "transpose"
    JVP mode builds its graph by one VJP of a zero cotangent, a whole sweep otherwise. A data-dependent test
    is safe here: a custom op's body is opaque to tracing and runs on real tensors."""
    return not any(bool(t.any()) for t in ts)


class _LinearCache:
    """The explicit per-pair coefficients of silhouette sweeps' J (``dr_coef``), kept for the products that
    follow at the same point: a Gauss-Newton step applies J and Jᵀ ten times and more at one point (the
    gradient, CG's products, Hutchinson's probes), and each sweep recomputed every pair's nearest edge and
    sigmoid; with the coefficients a product is one gather-scatter pass. Building them costs about one sweep
    back (cow_shape, 153k pairs: 7.2 ms against 8.1 ms, a product then 0.4-0.6 ms), so the first product at a
    point builds them, and a single backward (Adam's) costs what it did. An entry is keyed by the forward's
    per-pixel ``state`` and holds a reference to it, so that memory cannot be reused by another point while
    the entry lives; entries are dropped oldest first beyond ``max_entries`` or ``max_bytes``: a problem
    with more terms than that rebuilds them per product, about the cost of the sweep it replaces."""

    def __init__(self, max_entries: int = 4, max_bytes: int = 256 << 20) -> None:
        self.enabled = os.environ.get("DIFFRENDER_KEEP_LINEAR", "1") not in ("0", "false", "off")
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.entries: OrderedDict[tuple, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, state: Tensor, build: Callable[[], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor] | None:
        """(coef (P, 4), idx (P, 3)) at the point of ``state`` (built if new), or None where it is off."""
        if not self.enabled:
            return None
        key = (state.data_ptr(), tuple(state.shape), state.dtype)
        with self.lock:
            hit = self.entries.get(key)
            if hit is not None:
                self.entries.move_to_end(key)
                return hit[1], hit[2]
        coef, idx = build()
        if _nbytes(coef, idx) > self.max_bytes:
            return coef, idx
        with self.lock:
            self.entries[key] = (state, coef, idx)
            total = sum(_nbytes(*e[1:]) for e in self.entries.values())
            while len(self.entries) > self.max_entries or total > self.max_bytes:
                total -= _nbytes(*self.entries.popitem(last=False)[1][1:])
        return coef, idx

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


def _nbytes(*ts: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


_linear = _LinearCache()


def keep_linear_maps(enabled: bool) -> None:
    """Whether silhouette sweeps keep their per-pair coefficients for repeated products (default on; off with
    ``DIFFRENDER_KEEP_LINEAR=0``). Off, every product sweeps: the reference the tests compare with."""
    _linear.enabled = bool(enabled)
    _linear.clear()


def clear_linear_cache() -> None:
    """Drop the kept per-pair coefficients (they are rebuilt where needed)."""
    _linear.clear()


def _coefficients(xy: Tensor, z: Tensor, attrs: Tensor, state: Tensor, faces: Tensor, runs: Tensor,
                  band_off: Tensor, band_pairs: Tensor, dims: Sequence[int],
                  consts: Sequence[float]) -> tuple[Tensor, Tensor]:
    """coef (P, 4) and idx (P, 3) of a silhouette sweep's J (kernels.c's dr_coef), P its number of pairs."""
    pairs = int(band_pairs[-1])
    coef = torch.zeros(pairs, 4, dtype=xy.dtype)
    idx = torch.zeros(pairs, 3, dtype=torch.int32)
    band_pairs = band_pairs.contiguous()
    _sweep("coef", xy.dtype, band_pairs,
           lambda i: _params(xy, z, attrs, faces, runs, band_off, dims, consts, state=state, pair_off=band_pairs,
                             c_coef=coef, c_idx=idx))
    return coef, idx


def _products(kind: str, coef: Tensor, idx: Tensor, band_pairs: Tensor, src: Tensor, dst: Tensor) -> None:
    """``dr_coef_jvp`` (dst: t_alpha (NP,)) or ``dr_coef_vjp`` (dst: g_xy (parts, N, V, 2), one per thread)
    over the kept rows, split over threads at band boundaries."""
    fn = getattr(library(), f"dr_{kind}_{_suffix(coef.dtype)}")
    bounds = _split(band_pairs, torch.get_num_threads())
    rows = band_pairs.tolist()
    slot = {lo: i for i, lo in enumerate(bounds[:-1])}
    src = src.contiguous()
    per_thread = kind == "coef_vjp"

    def call(lo: int, hi: int) -> None:
        out = dst[slot[lo]] if per_thread else dst
        fn(coef.data_ptr(), idx.data_ptr(), rows[lo], rows[hi], src.data_ptr(), out.data_ptr())

    _run(call, bounds)


def _linear_map(xy: Tensor, z: Tensor, attrs: Tensor, state: Tensor, faces: Tensor, runs: Tensor, band_off: Tensor,
                band_pairs: Tensor, dims: Sequence[int], consts: Sequence[float]) -> tuple[Tensor, Tensor] | None:
    """The kept coefficients of a silhouette sweep's J at this point (see ``_LinearCache``), or None."""
    if dims[4] or attrs.shape[1] or max(dims[0], xy.shape[0] * xy.shape[1]) >= 2**31:  # idx is int32
        return None
    return _linear.get(state, lambda: _coefficients(xy, z, attrs, state, faces, runs, band_off, band_pairs, dims,
                                                    consts))


# The three sweeps. dims: N*H*W, F, H, W, blend (0/1), band_rows, cull (0/1); consts: scale, r2, kz (kernels.c's
# Params).
# xy: (N, V, 2) pixel coordinates and z: (N, V) depths of the vertices; attrs: (V, C); faces: (F, 3);
# runs, band_off, band_pairs: the pairs (raster/coverage.py's Pairs).


@torch.library.custom_op("diffrender::sweep_forward", mutates_args=())
def sweep_forward(xy: Tensor, z: Tensor, attrs: Tensor, faces: Tensor, runs: Tensor, band_off: Tensor,
                  band_pairs: Tensor, dims: list[int], consts: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    """α (NP,), blended (NP, 1 + C) (NP, 0 without blending) and per-pixel state (3, NP)."""
    xy, z, attrs, faces, runs = _contig(xy, z, attrs, faces, runs)
    npix, blend = dims[0], dims[4]
    alpha = torch.empty(npix, dtype=xy.dtype)
    out = torch.empty(npix, (1 + attrs.shape[1]) if blend else 0, dtype=xy.dtype)
    state = torch.empty(3, npix, dtype=xy.dtype)
    _sweep("forward", xy.dtype, band_pairs,
           lambda i: _params(xy, z, attrs, faces, runs, band_off, dims, consts, alpha=alpha, out=out, state=state))
    return alpha, out, state


@sweep_forward.register_fake
def _(xy, z, attrs, faces, runs, band_off, band_pairs, dims, consts):
    npix, blend = dims[0], dims[4]
    return (xy.new_empty(npix), xy.new_empty(npix, (1 + attrs.shape[1]) if blend else 0), xy.new_empty(3, npix))


@torch.library.custom_op("diffrender::sweep_jvp", mutates_args=())
def sweep_jvp(t_xy: Tensor, t_z: Tensor, t_attrs: Tensor, xy: Tensor, z: Tensor, attrs: Tensor, out: Tensor,
              state: Tensor, faces: Tensor, runs: Tensor, band_off: Tensor, band_pairs: Tensor, dims: list[int],
              consts: list[float]) -> tuple[Tensor, Tensor]:
    """J·(t_xy, t_z, t_attrs) at the forward's point: tangents of α (NP,) and of the blended values."""
    if _all_zero(t_xy, t_z, t_attrs):
        return xy.new_zeros(dims[0]), torch.zeros_like(out)
    t_xy, t_z, t_attrs, xy, z, attrs, out, state, faces, runs = _contig(t_xy, t_z, t_attrs, xy, z, attrs, out, state,
                                                                        faces, runs)
    kept = _linear_map(xy, z, attrs, state, faces, runs, band_off, band_pairs, dims, consts)
    if kept is not None:
        t_alpha = xy.new_zeros(dims[0])
        _products("coef_jvp", *kept, band_pairs, t_xy, t_alpha)
        return t_alpha, torch.zeros_like(out)
    t_alpha, t_out = torch.empty(dims[0], dtype=xy.dtype), torch.empty_like(out)
    _sweep("jvp", xy.dtype, band_pairs,
           lambda i: _params(xy, z, attrs, faces, runs, band_off, dims, consts, out=out, state=state, t_xy=t_xy,
                             t_z=t_z, t_attrs=t_attrs, t_alpha=t_alpha, t_out=t_out))
    return t_alpha, t_out


@sweep_jvp.register_fake
def _(t_xy, t_z, t_attrs, xy, z, attrs, out, state, faces, runs, band_off, band_pairs, dims, consts):
    return xy.new_empty(dims[0]), torch.empty_like(out)


@torch.library.custom_op("diffrender::sweep_jvp_many", mutates_args=())
def sweep_jvp_many(t_xy: Tensor, t_z: Tensor, xy: Tensor, z: Tensor, attrs: Tensor, out: Tensor, state: Tensor,
                   faces: Tensor, runs: Tensor, band_off: Tensor, band_pairs: Tensor, dims: list[int],
                   consts: list[float]) -> Tensor:
    """J·(t_xy[b], t_z[b]) of a silhouette sweep (no blending) for a batch of B tangents t_xy (B, N, V, 2),
    t_z (B, N, V) at once: α's tangents (B, NP), each pair's geometry computed once for the whole batch."""
    t_xy, t_z, xy, z, attrs, out, state, faces, runs = _contig(t_xy, t_z, xy, z, attrs, out, state, faces, runs)
    t_alpha = torch.empty(t_xy.shape[0], dims[0], dtype=xy.dtype)
    _sweep("jvp_many", xy.dtype, band_pairs,
           lambda i: _params(xy, z, attrs, faces, runs, band_off, dims, consts, out=out, state=state, t_xy=t_xy,
                             t_z=t_z, t_alpha=t_alpha), t_xy.shape[0])
    return t_alpha


@sweep_jvp_many.register_fake
def _(t_xy, t_z, xy, z, attrs, out, state, faces, runs, band_off, band_pairs, dims, consts):
    return xy.new_empty(t_xy.shape[0], dims[0])


@torch.library.custom_op("diffrender::sweep_vjp", mutates_args=())
def sweep_vjp(g_alpha: Tensor, g_out: Tensor, xy: Tensor, z: Tensor, attrs: Tensor, out: Tensor, state: Tensor,
              faces: Tensor, runs: Tensor, band_off: Tensor, band_pairs: Tensor, dims: list[int],
              consts: list[float]) -> tuple[Tensor, Tensor, Tensor]:
    """Jᵀ·(g_alpha, g_out) at the forward's point: cotangents of xy (N, V, 2), z (N, V), attrs (V, C)."""
    if _all_zero(g_alpha, g_out):
        return torch.zeros_like(xy), torch.zeros_like(z), torch.zeros_like(attrs)
    g_alpha, g_out, xy, z, attrs, out, state, faces, runs = _contig(g_alpha, g_out, xy, z, attrs, out, state, faces,
                                                                    runs)
    parts = len(_split(band_pairs, torch.get_num_threads())) - 1
    g_xy = torch.zeros(parts, *xy.shape, dtype=xy.dtype)
    g_z = torch.zeros(parts, *z.shape, dtype=xy.dtype)
    g_attrs = torch.zeros(parts, *attrs.shape, dtype=xy.dtype)
    kept = _linear_map(xy, z, attrs, state, faces, runs, band_off, band_pairs, dims, consts)
    if kept is not None:  # a silhouette's: the depths and attributes get nothing, as from the sweep
        _products("coef_vjp", *kept, band_pairs, g_alpha, g_xy)
    else:
        _sweep("vjp", xy.dtype, band_pairs,
               lambda i: _params(xy, z, attrs, faces, runs, band_off, dims, consts, out=out, state=state,
                                 g_alpha=g_alpha, g_out=g_out, g_xy=g_xy[i], g_z=g_z[i], g_attrs=g_attrs[i]))
    if parts == 1:
        return g_xy[0], g_z[0], g_attrs[0]
    return g_xy.sum(0), g_z.sum(0), g_attrs.sum(0)


@sweep_vjp.register_fake
def _(g_alpha, g_out, xy, z, attrs, out, state, faces, runs, band_off, band_pairs, dims, consts):
    return torch.empty_like(xy), torch.empty_like(z), torch.empty_like(attrs)


# ---------------------------------------------------------------- vmap rules
# A vmap over the sweeps (a dense Jacobian's columns: torch.func.vmap over the solvers' JVP maps) calls these
# with the batch dimension of every batched argument given by in_dims. Two batches are one sweep: a
# silhouette's (no blending) tangents of the geometry, by dr_jvp_many, which computes each pair's geometry
# once for the whole batch; and tangents of the attributes alone (lights, albedo, texture: the geometric
# ones zero), where each channel's tangent Σ_j ŵ_j Σ_k λ_jk da_k is independent of the other channels, so
# the batch's distinct channels are those of one call. Anything else loops over the batch.


def _tensor_dims(args: Sequence, in_dims: Sequence) -> list[int | None]:
    """Each argument's batch dimension, None where it is unbatched (non-tensor arguments included)."""
    return [d if isinstance(a, Tensor) else None for a, d in zip(args, in_dims, strict=True)]


def _loop_rule(op: Callable) -> Callable:
    def rule(info, in_dims, *args):
        in_dims = _tensor_dims(args, in_dims)
        args = [a if d is None else a.movedim(d, 0) for a, d in zip(args, in_dims, strict=True)]
        outs = [op(*(a if d is None else a[i] for a, d in zip(args, in_dims, strict=True)))
                for i in range(info.batch_size)]
        return tuple(torch.stack(o) for o in zip(*outs, strict=True)), (0,) * len(outs[0])
    return rule


def _sweep_jvp_vmap(info, in_dims, t_xy, t_z, t_attrs, xy, z, attrs, out, state, *rest):
    args = (t_xy, t_z, t_attrs, xy, z, attrs, out, state, *rest)
    in_dims, dims = _tensor_dims(args, in_dims), rest[-2]
    point_fixed = all(d is None for d in in_dims[3:])
    if point_fixed and not dims[4] and attrs.shape[1] == 0:  # silhouette: one batched sweep
        b = info.batch_size
        t_xy, t_z = (t.expand(b, *t.shape) if d is None else t.movedim(d, 0) for t, d in ((t_xy, in_dims[0]),
                                                                                         (t_z, in_dims[1])))
        t_alpha = sweep_jvp_many(t_xy, t_z, xy, z, attrs, out, state, *rest)
        return (t_alpha, out.new_zeros(b, *out.shape)), (0, 0)
    attrs_only = in_dims[2] is not None and point_fixed and in_dims[0] is None and in_dims[1] is None
    if not (attrs_only and dims[4] and _all_zero(t_xy, t_z)):
        return _loop_rule(sweep_jvp)(info, in_dims, *args)
    # Σ_j ŵ_j Σ_k λ_jk da_k per channel, with weights that do not depend on the tangent (dlogw = 0): the
    # attribute and blended values only enter through (F - O) dlogw, so zeros stand in for them, and only
    # the distinct non-zero channels of the whole batch are swept (a dense Jacobian's one-hot tangents
    # touch one channel each, often with the same per-vertex values).
    b, (v, c) = info.batch_size, attrs.shape
    chans = t_attrs.movedim(in_dims[2], 0).permute(1, 0, 2).reshape(v, b * c)  # (V, B·C)
    live = chans.any(dim=0).nonzero().squeeze(1)
    t_out = out.new_zeros(out.shape[0], b * c)
    if live.numel():
        distinct, inverse = torch.unique(chans.index_select(1, live), dim=1, return_inverse=True)
        k = distinct.shape[1]
        _, swept = sweep_jvp(t_xy, t_z, distinct.contiguous(), xy, z, attrs.new_zeros(v, k),
                             out.new_zeros(out.shape[0], 1 + k), state, *rest)
        t_out[:, live] = swept[:, 1:].index_select(1, inverse)
    t_out = torch.cat([out.new_zeros(out.shape[0], b, 1), t_out.view(-1, b, c)], dim=2)  # (NP, B, 1 + C)
    return (out.new_zeros(out.shape[0]), t_out), (None, 1)


torch.library.register_vmap("diffrender::sweep_forward", _loop_rule(sweep_forward))
torch.library.register_vmap("diffrender::sweep_jvp", _sweep_jvp_vmap)
torch.library.register_vmap("diffrender::sweep_vjp", _loop_rule(sweep_vjp))


__all__ = ["available", "band_rows_for", "clear_linear_cache", "covered", "find_runs", "keep_linear_maps", "library",
           "status", "sweep_forward", "sweep_jvp", "sweep_jvp_many", "sweep_vjp", "valid_faces"]

if sys.platform == "win32":  # the build line above is for Unix compilers
    _error = "compiled kernels are built on Unix-like systems only"
