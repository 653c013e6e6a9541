#!/usr/bin/env bash
# The GPU check in one go (about 4 minutes on an H200): the renderer against the CPU, every scene's fit on
# CUDA, and the CUDA rows of the rasterizer, solver and fit benchmarks. Tables and JSON rows go to $1
# (default gpu_check/). Run from the repository root: bash scripts/gpu_check.sh [OUT_DIR]
set -u
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status=0
$py -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
  || { echo "error: no CUDA device for torch" >&2; exit 2; }

echo "== renderer: CUDA against the CPU"
$py scripts/check_cuda.py | tee "$out/check_cuda.txt" || status=1

echo "== fits on CUDA"
: > "$out/fits.txt"
for run in teapot_pose:float32:60 teapot_pose:float64:60 cow_shape:float32:30 bunny_silhouette:float32:30 \
           lights_albedo:float32:15 texture:float32:15; do
  IFS=: read -r scene dtype iterations <<< "$run"
  dir=$(mktemp -d)
  if $py scripts/fit.py scene="$scene" device=cuda device.dtype="$dtype" logging=minimal \
      solver.max_iterations="$iterations" hydra.run.dir="$dir" > "$dir/stdout.txt" 2>&1; then
    $py - "$dir/summary.json" "$scene" "$dtype" <<'PY' | tee -a "$out/fits.txt"
import json, sys
s = json.load(open(sys.argv[1]))
metrics = ", ".join(f"{k} {v:.4g}" for k, v in s["final_metrics"].items())
print(f"{sys.argv[2]} {sys.argv[3]}: {s['termination']} after {s['iterations']} iterations, "
      f"{s['timings']['solver_s']:.2f} s in the solver, CUDA peak {s.get('cuda_peak_mb') or 0:.0f} MB; {metrics}")
PY
  else
    echo "$scene $dtype: FAILED" | tee -a "$out/fits.txt"; tail -5 "$dir/stdout.txt"; status=1
  fi
done

echo "== rasterizer"
$py scripts/bench_render.py --device cuda --mesh spot --mesh spot_sub --size 512 --views 1 --views 8 --cull off \
  --repeats 5 --json "$out/bench_render.jsonl" | tee "$out/bench_render.txt" || status=1
echo "== solvers (large problem)"
$py scripts/bench_solvers.py --device cuda --skip-mgh --iterations 3 --repeats 3 \
  --json "$out/bench_solvers.jsonl" | tee "$out/bench_solvers.txt" || status=1
echo "== fit benchmark (teapot_pose, quarter budget)"
$py scripts/bench_fit.py --device cuda --scene teapot_pose --solver lm --budget-scale 0.25 --jobs 1 \
  --json "$out/bench_fit.jsonl" --plot "$out/bench_fit.png" | tee "$out/bench_fit.txt" || status=1
exit $status
