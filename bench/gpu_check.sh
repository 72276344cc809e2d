#!/usr/bin/env bash
# One pass over a fresh GPU machine (PyTorch preinstalled, no network), from the repository root:
#   1. build spngd_ext._C in place for the local card (parallel ninja),
#   2. run the GPU tests: python3 -m pytest -m gpu tests -x -q,
#   3. run bench/kernels.py --json $OUT/kernels.json,
#   4. time the curvature phase of a ResNet-50 step, CUDA kernels vs pure PyTorch on this GPU
#      (bench/step_overhead.py, batch 32, $OUT/curvature_phase.json),
# logging everything under $OUT (default ./gpu_out) and ending with a short summary table.
# Budget: one device call (at most 600 s): every stage's timeout is cut so that the whole script
# ends within GPU_CHECK_BUDGET seconds (default 540; 300 with GPU_CHECK_QUICK=1) while leaving the
# later stages a minimum.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_out}"
# GPU_CHECK_QUICK=1: a short lease (at most 5 minutes of command time): kernel tests only, the quick
# benchmark sweep, tight stage timeouts.
QUICK="${GPU_CHECK_QUICK:-0}"
# T_*: each stage's own cap; R_*: what a stage leaves of the budget for the stages after it.
if [ "$QUICK" = 1 ]; then
  T_BUILD=120; T_TEST=55; T_BENCH=45; T_CURV=90; R_BUILD=150; R_TEST=120; R_BENCH=90
else
  T_BUILD=330; T_TEST=200; T_BENCH=240; T_CURV=150; R_BUILD=270; R_TEST=210; R_BENCH=150
fi
if [ "$QUICK" = 1 ]; then BUDGET="${GPU_CHECK_BUDGET:-300}"; else BUDGET="${GPU_CHECK_BUDGET:-540}"; fi
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
# stage_timeout CAP RESERVE: CAP, or less so that RESERVE seconds of the budget stay for the stages
# after this one (never under 20 s: a stage that cannot start is better reported than skipped).
stage_timeout() {
  local left=$(( BUDGET - $(elapsed) - $2 ))
  [ "$left" -lt "$1" ] || left=$1
  [ "$left" -ge 20 ] || left=20
  echo "$left"
}

if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to PyTorch"
  exit 2
fi
arch=$(python3 -c "import torch; c = torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
export TORCH_CUDA_ARCH_LIST="$arch"
export MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null; then
  export CUDA_HOME=/usr/local/cuda
fi

# 1. Build. --force and removing old objects: a .so left by another machine/torch must not survive.
echo "== build (TORCH_CUDA_ARCH_LIST=$arch, MAX_JOBS=$MAX_JOBS)"
python3 -c "import ninja" 2>/dev/null || command -v ninja >/dev/null ||
  echo "warning: ninja not found: torch falls back to a serial build (several minutes)"
rm -f spngd_ext/_C*.so
set +e
timeout "$(stage_timeout $T_BUILD $R_BUILD)" python3 setup.py build_ext --inplace --force > "$OUT/build.log" 2>&1
build_rc=$?
set -e
echo "build: rc=$build_rc after $(elapsed) s" | tee -a "$OUT/build.log"
if [ "$build_rc" -ne 0 ] || ! python3 -c "import spngd_ext._C" >> "$OUT/build.log" 2>&1; then
  echo "BUILD FAILED (rc=$build_rc). Compiler errors:"
  grep -nE "error|Error" "$OUT/build.log" | tail -n 40 || true
  echo "-- last lines of $OUT/build.log:"
  tail -n 30 "$OUT/build.log"
  exit 1
fi
build_s=$(elapsed)

# 2. GPU tests. If collection breaks (rc 2..4: e.g. another test file's optional dependency is
# missing) or a test fails, the kernel tests are rerun on their own without -x for the full list.
echo "== tests"
set +e
if [ "$QUICK" = 1 ]; then
  timeout "$(stage_timeout $T_TEST $R_TEST)" python3 -m pytest tests/test_ops_cuda.py tests/test_ops_extension.py -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
else
  timeout "$(stage_timeout $T_TEST $R_TEST)" python3 -m pytest -m gpu tests -x -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
fi
test_rc=${PIPESTATUS[0]}
if [ "$test_rc" -ne 0 ] && [ "$QUICK" != 1 ]; then
  echo "== rerun of the kernel tests without -x (first run rc=$test_rc)"
  timeout "$(stage_timeout 200 $R_TEST)" python3 -m pytest tests/test_ops_cuda.py tests/test_ops_extension.py -q -p no:cacheprovider \
    2>&1 | tee "$OUT/pytest_kernels.log"
fi
set -e
test_s=$(( $(elapsed) - build_s ))

# 3. Benchmarks (the smaller sweep if the first stages ran long).
echo "== bench"
quick=""
{ [ "$(elapsed)" -gt 300 ] || [ "$QUICK" = 1 ]; } && quick="--quick"
set +e
timeout "$(stage_timeout $T_BENCH $R_BENCH)" python3 bench/kernels.py $quick --json "$OUT/kernels.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
set -e

# 4. Curvature phase of a whole ResNet-50 step (issue 3's last target): both backends, interleaved.
echo "== curvature phase (ResNet-50, batch 32)"
set +e
timeout "$(stage_timeout $T_CURV 5)" python3 bench/step_overhead.py --model resnet50 --batch-sizes 32 --quick --rounds 20 --warmup 3 \
  --configs sgd,spngd-every-step-cuda,spngd-every-step-torch --profile-steps 5 --top-ops 5 \
  --json "$OUT/curvature_phase.json" > "$OUT/curvature_phase.md" 2> "$OUT/curvature_phase.log"
curv_rc=$?
set -e
tail -n 25 "$OUT/curvature_phase.md"

# Summary.
summary() {
  local counts
  echo "==================== gpu_check summary ===================="
  echo "gpu:     $( (nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || python3 -c 'import torch; print(torch.cuda.get_device_name())' 2>/dev/null) | head -n 1)"
  echo "torch:   $(python3 -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
  echo "commit:  $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)')"
  echo "build:   ok in ${build_s} s (arch $arch)"
  counts=$(grep -E "[0-9]+ (passed|failed|skipped|errors?)( |,|$)" "$OUT/pytest.log" | tail -n 1 || true)
  echo "tests:   rc=$test_rc  ${counts:-no summary line}"
  if [ -f "$OUT/pytest_kernels.log" ]; then
    counts=$(grep -E "[0-9]+ (passed|failed|skipped|errors?)( |,|$)" "$OUT/pytest_kernels.log" | tail -n 1 || true)
    echo "kernels: ${counts:-no summary line} (rerun without -x)"
  fi
  echo "bench:   rc=$bench_rc ${quick:+(quick)}"
  if [ -f "$OUT/kernels.json" ]; then
    python3 - "$OUT/kernels.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
print(f"  copy bandwidth {data['copy_GBps']:.0f} GB/s on {data['device']}")
for t in data["targets"]:
    status = "info" if t["met"] is None else ("met" if t["met"] else "NOT MET")
    print(f"  {status:>7}  {t['target']}: {t['detail']}")
PY
  fi
  echo "curv:    rc=$curv_rc"
  if [ -f "$OUT/curvature_phase.json" ]; then
    python3 - "$OUT/curvature_phase.json" <<'PY'
import json, sys
entry = json.load(open(sys.argv[1]))["batch_sizes"]["32"]
if "error" in entry:
    print(f"  ResNet-50 batch 32: {entry['error']}")
for name, why in entry.get("skipped_configs", {}).items():
    print(f"  skipped {name}: {why}")
timing = entry.get("timing", {})
if "spngd-every-step-cuda" in timing and "spngd-every-step-torch" in timing:
    c, t = timing["spngd-every-step-cuda"]["mean_ms"], timing["spngd-every-step-torch"]["mean_ms"]
    print(f"  whole step: cuda {c:.1f} ms, torch {t:.1f} ms ({t / c:.2f}x), sgd {timing['sgd']['mean_ms']:.1f} ms")
for t in entry.get("targets", []):
    if t["target"].startswith("curvature phase"):
        status = "info" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        print(f"  {status:>7}  {t['target']}: " + (f"{t['value']:.2f}x, {t['detail']}" if t["value"] is not None else t["why"]))
PY
  fi
  echo "logs:    $OUT  (total $(elapsed) s)"
}
summary | tee "$OUT/summary.txt"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$curv_rc" -eq 0 ]
