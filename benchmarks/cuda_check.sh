#!/usr/bin/env bash
# The CUDA checks, in one call on a GPU machine (the device tool runs it from the repository
# root; results land in $OUT). Uses that machine's python3, which has torch with CUDA,
# safetensors, numpy, psutil and pytest; Ray is not needed. It may lack numba (the H100 had it,
# the H200 did not), and it has no network:
# fill benchmarks/wheels here first and carry it (63 MB; the device tool's `carry`):
#   .venv/bin/pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 -d benchmarks/wheels numba==0.68.1 llvmlite
#   1. tests/test_cuda.py (-k $TESTS) and the CUDA case of tests/test_rng.py: the CUDA
#      output's bytes equal the CPU's, for the weighted sum and every library method.
#   2. benchmarks/methods.py with --device cuda at each scale of $SCALES (1 = full size:
#      its 17 GB of inputs are generated first, and only $FULL_METHODS run there), then at
#      $CPU_SCALE on the CPU (none if empty): time and peak RSS of each method against
#      uniform on the same inputs.
#   3. With RAY_METHODS set: those methods again with --device cuda --executor ray (a private
#      local Ray) at the first scale of $SCALES. Ray is not on the GPU machine and its wheel
#      (79 MB) is over the device tool's 64 MiB: carry `.whl` filled with a trimmed copy, as in
#      benchmarks/README.md ("CUDA with Ray"); its wheels are installed into /tmp/site first.
set -u -o pipefail
OUT=${OUT:-/tmp/cuda_check}
PY=${PY:-python3}
TESTS=${TESTS:-cuda}
SCALES=${SCALES:-2}
METHODS=${METHODS:-uniform,ties,dare,geometric_median}
FULL_METHODS=${FULL_METHODS:-uniform,ties,dare}
CPU_SCALE=${CPU_SCALE-2}  # set it empty for no CPU run
CPU_WORKERS=${CPU_WORKERS:-8}
GPU_WORKERS=${GPU_WORKERS:-2}
GPU_CHUNK_MB=${GPU_CHUNK_MB:-}  # more --chunk-mb values to run CUDA with, after the default (2 MiB, tuned for CPU)
GPU_CACHE_MB=${GPU_CACHE_MB:-}  # more --tensor-cache-mb values to run CUDA with (0: the cache off), after the default
RAY_METHODS=${RAY_METHODS:-}
RUN_TIMEOUT=${RUN_TIMEOUT:-90}
WORK=${WORK:-/tmp/astolfo-methods}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
if ! $PY -c 'import numba' 2>/dev/null; then
  $PY -m pip install -q --no-index --find-links benchmarks/wheels numba 2>&1 | tail -2 \
    || echo "NO NUMBA: carry benchmarks/wheels (see the top of this script)"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c 'import torch, safetensors, numpy; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU", "safetensors", safetensors.__version__,
  "numpy", numpy.__version__)'
$PY -c 'import numba; print("numba", numba.__version__)'
$PY -c 'import ray; print("ray", ray.__version__)' 2>/dev/null || echo "no ray: the Ray cases skip"
timeout 300 $PY -m pytest -p no:cacheprovider -o addopts= --timeout=200 -q -rfE -m cuda -k "$TESTS" \
  tests/test_cuda.py tests/test_rng.py 2>&1 | tee "$OUT/pytest.log" | tail -40
status=${PIPESTATUS[0]}
[ "$status" = 0 ] || echo "CUDA TESTS FAILED: pytest exited $status (see $OUT/pytest.log)"
bench() {  # device workers scale methods [an extra merge option, its value, and a name for it]
  local name="methods-$1-s$3${7:+-$7}" extra=()
  [ -n "${5:-}" ] && extra=("$5" "$6")
  timeout $((RUN_TIMEOUT * 5 + 60)) $PY benchmarks/methods.py --device "$1" --workers "$2" --scales "$3" \
    --methods "$4" ${extra[@]+"${extra[@]}"} --repeats 1 --fresh --keep --dir "$WORK" --full-dir "$WORK" --budget-s 1e9 \
    --timeout-s "$RUN_TIMEOUT" --json "$OUT/$name.json" --markdown "$OUT/$name.md" 2>&1 | tail -3
  sed -n '1p;4,11p' "$OUT/$name.md" 2>/dev/null
}
for scale in $SCALES; do
  if [ "$scale" = 1 ]; then
    rm -rf "$WORK"  # the smaller scale's inputs: room for the full-size ones
    $PY -c "import sys; sys.path.insert(0, 'benchmarks'); import throughput as tp; from pathlib import Path
tp.ensure_inputs(tp.input_paths(Path('$WORK'), 8, 'sd15', 1), 'sd15', 1)"
  fi
  if [ "$scale" = 1 ]; then methods=$FULL_METHODS; else methods=$METHODS; fi
  bench cuda "$GPU_WORKERS" "$scale" "$methods"
  for mb in $GPU_CHUNK_MB; do bench cuda "$GPU_WORKERS" "$scale" "$methods" --chunk-mb "$mb" "c$mb"; done
  for mb in $GPU_CACHE_MB; do bench cuda "$GPU_WORKERS" "$scale" "$methods" --tensor-cache-mb "$mb" "cache$mb"; done
done
first_scale=${SCALES%% *}
if [ -n "$RAY_METHODS" ]; then bench cuda "$GPU_WORKERS" "$first_scale" "$RAY_METHODS" --executor ray ray; fi
if [ -n "$CPU_SCALE" ]; then bench cpu "$CPU_WORKERS" "$CPU_SCALE" "$METHODS"; fi
rm -rf "$WORK"
