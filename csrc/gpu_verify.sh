#!/usr/bin/env bash
# Verifies the CUDA backend on a GPU in one call and writes everything under $OUT
# (default ./gpu-verify-out):
#   env.txt          GPU, driver, nvcc, torch, triton versions
#   build.log        pip install -e . (the extension, for TORCH_CUDA_ARCH_LIST, default 8.0;9.0)
#   tests.log/.xml   tests/test_cuda.py in full; every GPU test must run (no skips) and pass
#   memcheck.log     the GPU tests once under compute-sanitizer --tool memcheck
#   racecheck.log    one routing test under compute-sanitizer --tool racecheck (shared memory)
#   bench/           capsnet-ext bench at the MNIST shape: eager and compiled reference, Triton, CUDA
#   record.json      the verification record, appended to capsnet_ext/cuda_ops/verified.json
#                    only when the build, the tests and memcheck all passed
#   summary.txt      one line per step
# Usage: bash csrc/gpu_verify.sh     (from the repository root, in the project's environment)
# Knobs: MEMCHECK_FILTER (pytest -k expression; default: the GPU tests but torch.compile,
# gradcheck and the low-precision ratio tests, whose thousands of launches add no coverage),
# SKIP_BENCH=1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-verify-out}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python}"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
ok=1
step() {  # step NAME STATUS
  echo "$1: $2" | tee -a "$SUMMARY"
  [[ "$2" == pass* ]] || ok=0
}

{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  nvcc --version | tail -2 || true
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  "$PYTHON" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not installed"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. Build (falls back to the just-in-time build inside the tests if this fails).
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
if "$PYTHON" -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  step build "pass ($(grep -c 'capsnet_ext._C\|nvcc' "$OUT/build.log") build lines)"
else
  step build "FAIL (see build.log)"
fi
"$PYTHON" -c "from capsnet_ext.cuda_ops import _build; r = _build.load(); print('ops loaded via', _build.how_loaded()) if r is None else print('ops NOT loaded:', r)" \
  >>"$OUT/build.log" 2>&1
tail -1 "$OUT/build.log"

# 2. The test suite. The GPU tests run the kernels whether or not a record exists yet.
export CAPSNET_EXT_CUDA_UNVERIFIED=1
"$PYTHON" -m pytest tests/test_cuda.py -v -rs --junitxml="$OUT/tests.xml" >"$OUT/tests.log" 2>&1
rc=$?
gpu_skips=$(grep -c "SKIPPED.*test_gpu_\|test_gpu_.* SKIPPED" "$OUT/tests.log" || true)
if [[ $rc -eq 0 && $gpu_skips -eq 0 ]]; then
  step tests "pass ($(tail -1 "$OUT/tests.log"))"
else
  step tests "FAIL (pytest exit $rc, $gpu_skips GPU tests skipped; see tests.log)"
fi

# 3. Out-of-bounds and misaligned accesses, uninitialised reads of device memory.
if command -v compute-sanitizer >/dev/null; then
  compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 20 \
    "$PYTHON" -m pytest tests/test_cuda.py -q -x -m gpu -k "${MEMCHECK_FILTER:-gpu and not compiled and not gradcheck and not low_precision}" \
    >"$OUT/memcheck.log" 2>&1
  rc=$?
  [[ $rc -eq 0 ]] && step memcheck "pass ($(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1))" \
                  || step memcheck "FAIL (exit $rc; see memcheck.log)"
  compute-sanitizer --tool racecheck --error-exitcode 99 --print-limit 20 \
    "$PYTHON" -m pytest tests/test_cuda.py -q -x -k "test_gpu_routing_matches_reference and float64 and plain" \
    >"$OUT/racecheck.log" 2>&1
  rc=$?
  [[ $rc -eq 0 ]] && step racecheck "pass ($(grep -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$OUT/racecheck.log" | tail -1))" \
                  || step racecheck "FAIL (exit $rc; see racecheck.log)"
else
  step memcheck "FAIL (compute-sanitizer not found)"
fi

# 4. Benchmark at the MNIST shape against the eager and compiled reference and Triton.
if [[ "${SKIP_BENCH:-0}" != 1 ]]; then
  if "$PYTHON" -m capsnet_ext.cli bench --ops capsule_routing,dynamic_routing,predict --sweeps mnist \
       --dtypes float32,bfloat16 --skip-e2e --out-dir "$OUT/bench" >"$OUT/bench.log" 2>&1; then
    step bench "pass (results in bench/, table in bench.log)"
  else
    echo "bench: FAIL (see bench.log)" | tee -a "$SUMMARY"  # a failed benchmark does not unverify
  fi
fi

# 5. The record, only when everything above that checks correctness passed.
if [[ $ok -eq 1 ]]; then
  "$PYTHON" -c "
import json, sys
from capsnet_ext.cuda_ops import record_verification
rec = record_verification(tests='tests/test_cuda.py', sanitizer='memcheck+racecheck')
json.dump(rec, open(sys.argv[1], 'w'), indent=2)
print('recorded', rec)" "$OUT/record.json" | tee -a "$SUMMARY"
  echo "verified: commit capsnet_ext/cuda_ops/verified.json to make the backend available on this GPU model" | tee -a "$SUMMARY"
  exit 0
fi
echo "NOT verified: see $SUMMARY" | tee -a "$SUMMARY"
exit 1
