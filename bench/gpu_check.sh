#!/usr/bin/env bash
# One pass over a fresh GPU machine (PyTorch preinstalled, no network), from the repository root:
#   1. build spngd_ext._C in place for the local card (parallel ninja),
#   2. python3 -m spngd_ext.selftest --json $OUT/selftest.json (every kernel against the float64
#      PyTorch path, the raw-op error cases, an end-to-end step; under two minutes),
#   3. the remaining GPU tests: python3 -m pytest -m gpu tests -q (skipped with GPU_CHECK_QUICK=1),
#   4. python3 -m spngd_ext.bench --json $OUT/bench.json (kernel microbenchmarks, the full sweep when
#      time allows, and whole ResNet-50 steps: SGD vs SP-NGD every step vs stale),
#   5. time the curvature phase of a ResNet-50 step, CUDA kernels vs pure PyTorch on this GPU
#      (bench/step_overhead.py, batch 32, $OUT/curvature_phase.json),
# logging everything under $OUT (default ./gpu_out) and ending with a short summary table.
# Budget: one device call (at most 600 s): every stage's timeout is cut so that the whole script
# ends within GPU_CHECK_BUDGET seconds (default 540; 300 with GPU_CHECK_QUICK=1) while leaving the
# later stages a minimum.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/gpu_out}"
# GPU_CHECK_QUICK=1: a short lease (at most 5 minutes of command time): the self-test without the
# pytest GPU suite, the quick benchmark sweep, tight stage timeouts.
QUICK="${GPU_CHECK_QUICK:-0}"
# T_*: each stage's own cap; R_*: what a stage leaves of the budget for the stages after it.
if [ "$QUICK" = 1 ]; then
  T_BUILD=120; T_SELF=120; T_BENCH=60; T_CURV=60; R_BUILD=170; R_SELF=110; R_BENCH=50
else
  T_BUILD=300; T_SELF=130; T_TEST=120; T_BENCH=150; T_CURV=120; R_BUILD=280; R_SELF=230; R_TEST=160; R_BENCH=100
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

# 2. The self-test: the packaged kernel checks, with a report and a ready-to-paste table row.
echo "== selftest"
set +e
timeout "$(stage_timeout $T_SELF $R_SELF)" python3 -m spngd_ext.selftest --json "$OUT/selftest.json" 2>&1 | tee "$OUT/selftest.log"
self_rc=${PIPESTATUS[0]}
set -e

# 3. The rest of the GPU tests (the kernel tests repeat the self-test's checks under pytest).
test_rc=0
if [ "$QUICK" != 1 ]; then
  echo "== tests"
  set +e
  timeout "$(stage_timeout $T_TEST $R_TEST)" python3 -m pytest -m gpu tests -q -p no:cacheprovider 2>&1 | tee "$OUT/pytest.log"
  test_rc=${PIPESTATUS[0]}
  set -e
fi

# 4. Benchmarks: the full kernel sweep when the first stages left time, else the quick one.
echo "== bench"
full=""
[ "$(elapsed)" -lt 240 ] && [ "$QUICK" != 1 ] && full="--full"
step=""
[ "$QUICK" = 1 ] && step="--no-step"  # the curvature stage below times ResNet-50 steps anyway
set +e
timeout "$(stage_timeout $T_BENCH $R_BENCH)" python3 -m spngd_ext.bench $full $step --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
set -e

# 5. Curvature phase of a whole ResNet-50 step (target: kernels ≥ 3× the pure-PyTorch path): both backends, interleaved.
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
  if [ -f "$OUT/selftest.json" ]; then
    python3 - "$OUT/selftest.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
checks = data["checks"]
count = {s: sum(c["status"] == s for c in checks) for s in ("passed", "failed", "skipped")}
print(f"selftest: exit {data['exit_status']}, {count['passed']} passed, {count['failed']} failed, {count['skipped']} skipped")
for c in checks:
    if c["status"] == "failed":
        print(f"  FAIL {c['name']}: {c['detail']}")
PY
  else
    echo "selftest: rc=$self_rc, no report"
  fi
  if [ -f "$OUT/pytest.log" ]; then
    counts=$(grep -E "[0-9]+ (passed|failed|skipped|errors?)( |,|$)" "$OUT/pytest.log" | tail -n 1 || true)
    echo "tests:   rc=$test_rc  ${counts:-no summary line}"
  fi
  echo "bench:   rc=$bench_rc ${full:-(quick kernel sweep)}"
  if [ -f "$OUT/bench.json" ]; then
    python3 - "$OUT/bench.json" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
kernels = data.get("kernels")
if kernels:
    print(f"  copy bandwidth {kernels['copy_GBps']:.0f} GB/s on {kernels['device']}")
    for t in kernels["targets"]:
        status = "info" if t["met"] is None else ("met" if t["met"] else "NOT MET")
        print(f"  {status:>7}  {t['target']}: {t['detail']}")
step = data.get("step")
if step:
    ratios = ", ".join(f"{n} {s['mean_ms']:.1f} ms ({s['ratio_mean']:.2f}x)" for n, s in step["timing"].items())
    print(f"  whole step, {step['case']}: {ratios}")
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
  echo "rows for the \"Reported runs\" table of docs/results.md:"
  grep -h "^| " "$OUT/selftest.log" "$OUT/bench.log" 2>/dev/null | grep -v "^| card \|^|---\|^| measurement " || true
}
summary | tee "$OUT/summary.txt"
[ "$self_rc" -eq 0 ] && [ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$curv_rc" -eq 0 ]
