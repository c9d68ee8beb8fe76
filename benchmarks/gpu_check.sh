#!/usr/bin/env bash
# One call on a GPU machine: build the extension, run the GPU tests, compute-sanitizer memcheck on the
# CUDA ops, then the benchmarks. Logs and CSVs go to $OUT (default ./bench_out).
#   bash benchmarks/gpu_check.sh [all]      build + tests + sanitizer + bench_gpu + plot + bench_dynamic
#   bash benchmarks/gpu_check.sh tests      build + tests + sanitizer     (if `all` would not fit 10 min)
#   bash benchmarks/gpu_check.sh bench      build + bench_gpu + plot + bench_dynamic
#   bash benchmarks/gpu_check.sh sweep-fp32[-N2,3]  build + the B x D x N grid for fp32 (sweep.csv/png/md),
#                                optionally only some N; also sweep-bf16. The sweep starts no new point
#                                after SWEEP_BUDGET_S (420) seconds, so it ends inside one device call.
# Optional wheels (e.g. torchdeq for the side-by-side numbers) are installed from ./.whl if present.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
t0=$(date +%s)
python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 || { grep -E "error" "$OUT/build.log" | head -20; }
echo "build: $(( $(date +%s) - t0 )) s"
python3 -c "import deqfuse; print('extension:', deqfuse.extension_status()[1]); print('triton:', deqfuse.triton_status()[1])"
MODE=${1:-all}
if [[ $MODE == sweep-* ]]; then  # sweep-fp32 | sweep-bf16, optionally -N2,3 (one device call is <= 10 min)
  spec=${MODE#sweep-}; dtype=${spec%%-N*}; nsel=""
  [[ $spec == *-N* ]] && nsel="--N ${spec#*-N}"
  python3 benchmarks/sweep.py --dtype "$dtype" $nsel --budget-s "${SWEEP_BUDGET_S:-420}" --out "$OUT" 2>&1 \
    | tee "$OUT/sweep.log" | grep -v "^  " | tail -40
  python3 benchmarks/sweep_report.py "$OUT/sweep.csv" "$OUT/sweep.png" "$OUT/sweep.md"
  exit 0
fi
if [[ $MODE == all || $MODE == tests ]]; then
  python3 -m pytest -q tests -p no:cacheprovider --maxfail=25 --durations=10 2>&1 | tee "$OUT/tests.log" | tail -40
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool memcheck --leak-check no python3 benchmarks/sanitize_ops.py 2>&1 | tail -6 | tee "$OUT/sanitizer.log"
  fi
fi
if [[ $MODE == all || $MODE == bench ]]; then
  python3 benchmarks/bench_gpu.py --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -60
  python3 benchmarks/plot_results.py "$OUT/results.csv" "$OUT/results.png"
  python3 benchmarks/bench_dynamic.py --device all --B 1024,8192 2>&1 | tee "$OUT/dynamic.log"
fi
