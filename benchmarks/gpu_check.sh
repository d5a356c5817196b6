#!/usr/bin/env bash
# The GPU check: builds, verifies and times every backend on one GPU in under 8 minutes.
#
#   bash benchmarks/gpu_check.sh               # on a GPU machine, from the project root
#   bash benchmarks/gpu_check.sh --dry-run     # anywhere: the parts that need no GPU, and the plan
#   bash benchmarks/gpu_check.sh --stamp       # in a git checkout: write .gpu-check-commit to copy along
#
# Steps, each under its own time budget (`timeout`), all inside a total deadline:
#   env          GPU, driver, torch, Triton, CUDA, nvcc, compute-sanitizer; the commit ($COMMIT,
#                else .gpu-check-commit, else git) and a digest of the sources
#   install      pip install --no-build-isolation --no-deps -e . with MAX_JOBS (setup.py's output kept)
#   extension    fails loudly unless capsnet_ext._C was built, loads, registers its ops for CUDA,
#                and a small capsule_routing(backend="cuda") call agrees with the reference
#   gpu-tests    pytest -m gpu: every GPU test of every backend on the device (JUnit report)
#   crash-trace  the host-side crash reproducers (a CUDA error path, the memcheck driver without
#                the sanitizer) with benchmarks/segv_trace.c preloaded: native stacks, the
#                project library's frames resolved by addr2line (a diagnostic, verifies nothing)
#   memcheck, racecheck, initcheck, synccheck
#                compute-sanitizer over benchmarks/sanitize_driver.py (memcheck and initcheck:
#                every kernel and option at small shapes, PyTorch's caching allocator off;
#                racecheck and synccheck: the "race" profile, every kernel once)
#   profile      torch.profiler kernel tables of capsule_routing at the MNIST shape, forward and
#                forward+backward, every backend and dtype (benchmarks/gpu_profile.py)
#   ncu          Nsight Compute on each kernel backend's routing kernels (SpeedOfLight,
#                Occupancy, LaunchStats, WarpStateStats, stall reasons; bounded launch count),
#                its report as text; the summary names each backend's top kernels
#   bench-mnist, train-step, bench-compiled-fp32, bench-compiled-bf16, sweep-I, sweep-B
#                capsnet-ext bench (CUDA events) at the MNIST shape, fp32 and bf16; one CapsNet
#                training step; with the time left, the compiled reference once per dtype and
#                sweeps over I and B
# A step may also use the time that earlier steps left unused (later steps keep their budgets).
# Everything goes into one results folder, packed after every step into a single archive in
# $OUT (default runs/gpu-check) beside a one-page summary: two files. A failing step is
# recorded and the later steps still run. Fold the archive back into the repository with
#   python -m benchmarks.fold_gpu_check ARCHIVE
# Options: --dry-run, --skip-install, --steps a,b (run only these), --help.
# Environment: OUT, COMMIT, PYTHON, MAX_JOBS, GPU_CHECK_TOTAL_S (default 470),
# GPU_TEST_WORKERS (pytest-xdist workers, default 12), TORCH_CUDA_ARCH_LIST (default: the
# GPU's own architecture, read from torch; one architecture builds in about 130 s),
# GPU_CHECK_BUDGETS (e.g. "memcheck=90": other budgets, for a rerun of some steps with --steps).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

DRY_RUN=0
SKIP_INSTALL=0
ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --skip-install) SKIP_INSTALL=1 ;;
    --steps) ONLY=",$2,"; shift ;;
    --steps=*) ONLY=",${1#--steps=},";;
    --stamp)
      commit="$(git rev-parse HEAD)" || exit 1
      { echo "$commit"; [[ -n "$(git status --porcelain --untracked-files=no)" ]] && echo dirty; } >.gpu-check-commit
      echo "wrote .gpu-check-commit: $(tr '\n' ' ' <.gpu-check-commit)"; exit 0 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON="$(command -v python3 || command -v python || true)"
fi
[[ -n "$PYTHON" ]] || { echo "gpu_check.sh: no python3 on PATH" >&2; exit 2; }
export PYTHONUNBUFFERED=1
export PYTHON  # the ncu step's inner shell uses it
# The project's code in this tree, whether or not the editable install took.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
NAME="gpu-check-$STAMP"
[[ $DRY_RUN -eq 1 ]] && NAME="gpu-check-dryrun-$STAMP"
OUT="${OUT:-$ROOT/runs/gpu-check}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")"
RESULTS="$WORK/$NAME"
mkdir -p "$RESULTS/logs" "$RESULTS/bench"
ARCHIVE="$OUT/$NAME.tar.gz"
SUMMARY="$OUT/$NAME-summary.md"
STEPS_TSV="$RESULTS/steps.tsv"
printf 'step\tstatus\trc\tseconds\tbudget\tnote\n' >"$STEPS_TSV"

TOTAL_BUDGET="${GPU_CHECK_TOTAL_S:-470}"
START="$(date +%s)"
DEADLINE=$((START + TOTAL_BUDGET))
RESERVE=5          # seconds kept for the last summary and archive
MIN_START=10       # a step that would get less than this is skipped, not started

# Budgets in seconds: 465 s, plus the 5 s reserve, within the 470 s deadline; with start-up and
# the last archive the run stays under 480 s = 8 minutes. The steps with budget 0 get what is
# left. The install built routing.cu for one architecture in 135 s (H200, 16 cores, 2026-12-04).
STEP_ORDER=(env install extension gpu-tests crash-trace memcheck racecheck initcheck synccheck profile ncu
            bench-mnist train-step bench-compiled-fp32 bench-compiled-bf16 sweep-I sweep-B)
declare -A BUDGET=(
  [env]=10 [install]=150 [extension]=15 [gpu-tests]=75 [crash-trace]=25
  [memcheck]=35 [racecheck]=20 [initcheck]=15 [synccheck]=10 [profile]=30 [ncu]=35
  [bench-mnist]=35 [train-step]=10
  [bench-compiled-fp32]=0 [bench-compiled-bf16]=0 [sweep-I]=0 [sweep-B]=0
)
# GPU_CHECK_BUDGETS="memcheck=90,gpu-tests=120" changes budgets (e.g. to rerun one step with --steps).
IFS=',' read -r -a _overrides <<<"${GPU_CHECK_BUDGETS:-}"
for kv in "${_overrides[@]}"; do
  [[ "$kv" =~ ^([a-zA-Z0-9-]+)=([0-9]+)$ && -n "${BUDGET[${BASH_REMATCH[1]}]+x}" ]] \
    || { echo "gpu_check.sh: GPU_CHECK_BUDGETS: expected step=seconds with a known step, got '$kv'" >&2; exit 2; }
  BUDGET[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
done
# Limits of the steps that only the dry run has (CPU stand-ins; no GPU budget).
declare -A CPU_LIMIT=([crash-trace-cpu]=30 [gpu-tests-collect]=90 [sanitize-driver-cpu]=60 [profile-cpu]=90 [bench-cpu]=90)
declare -A WHAT  # one line per step for the plan
failed=0

log() { echo "[gpu-check $(($(date +%s) - START))s] $*"; }

selected() { [[ -z "$ONLY" || "$ONLY" == *",$1,"* ]]; }

record() {  # record STEP STATUS RC SECONDS BUDGET NOTE
  local note="${6//$'\t'/ }"
  note="${note//$'\n'/ }"
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "${note:0:300}" >>"$STEPS_TSV"
  case "$2" in pass|skipped|dry-run|"not selected") ;; *) failed=1 ;; esac
  log "$1: $2${6:+ ($6)}"
}

pack() {  # the summary and the archive, rewritten after every step (nothing lost if killed)
  "$PYTHON" -m benchmarks.gpu_check summarize "$RESULTS" --out "$SUMMARY" >"$RESULTS/logs/summarize.log" 2>&1 \
    || echo "summary failed: see logs/summarize.log" >>"$SUMMARY"
  tar -czf "$ARCHIVE.tmp" -C "$WORK" "$NAME" && mv -f "$ARCHIVE.tmp" "$ARCHIVE"
}

time_left() { echo $((DEADLINE - $(date +%s) - RESERVE)); }

reserved_after() {  # the budgets of the selected steps after STEP, kept for them
  local step="$1" seen=0 sum=0 s
  for s in "${STEP_ORDER[@]}"; do
    if [[ $seen -eq 1 ]] && selected "$s" && ! [[ "$s" == install && $SKIP_INSTALL -eq 1 ]]; then
      sum=$((sum + BUDGET[$s]))
    fi
    [[ "$s" == "$step" ]] && seen=1
  done
  echo "$sum"
}

run_step() {  # run_step STEP -- COMMAND...: runs under min(budget, time left); log in logs/STEP.log
  local step="$1"; shift; [[ "$1" == "--" ]] && shift
  local budget="${BUDGET[$step]:-${CPU_LIMIT[$step]}}" left limit t0 rc status seconds note=""
  if ! selected "$step"; then record "$step" "not selected" 0 0 "${BUDGET[$step]:--}" ""; return 0; fi
  left="$(time_left)"
  if [[ $DRY_RUN -eq 1 ]]; then
    # A dry run checks the steps' code on whatever CPU it gets, often a busy one: the GPU
    # budgets do not apply to it.
    limit=$(( budget > 120 ? budget : 120 ))
  else
    # The step's budget, plus whatever earlier steps left unused; the later steps keep theirs.
    limit=$(( left - $(reserved_after "$step") ))
    [[ $limit -lt $budget && $budget -gt 0 ]] && limit=$budget
  fi
  if [[ $left -lt $limit ]]; then limit=$left; fi
  if [[ $limit -lt $MIN_START ]]; then
    record "$step" skipped 0 0 "${BUDGET[$step]:--}" "no time left (${left}s before the deadline)"; pack; return 0
  fi
  log "$step: started (limit ${limit}s)"
  t0="$(date +%s.%N)"
  timeout --kill-after=5 "$limit" "$@" >"$RESULTS/logs/$step.log" 2>&1
  rc=$?
  seconds="$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')"
  if [[ $rc -eq 0 ]]; then status=pass
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then status=TIMEOUT; note="killed after ${limit}s"
  else status=FAIL; note="exit $rc; $(grep -E 'FAIL|Error|error|failed' "$RESULTS/logs/$step.log" | tail -1 | cut -c1-200)"
  fi
  STEP_STATUS="$status"; STEP_RC=$rc; STEP_SECONDS=$seconds; STEP_NOTE="$note"
}

finish_step() {  # finish_step STEP [STATUS [NOTE]]: record what run_step measured, then pack
  [[ -z "${STEP_STATUS:-}" ]] && return 0
  record "$1" "${2:-$STEP_STATUS}" "$STEP_RC" "$STEP_SECONDS" "${BUDGET[$1]:--}" "${3:-$STEP_NOTE}"
  STEP_STATUS=""
  pack
}

step() {  # step STEP -- COMMAND...: run_step + finish_step
  local name="$1"
  STEP_STATUS=""
  run_step "$@"
  finish_step "$name"
}

dry() {  # dry STEP: record what the GPU run would do
  if selected "$1"; then record "$1" dry-run 0 0 "${BUDGET[$1]}" "on a GPU: ${WHAT[$1]}"
  else record "$1" "not selected" 0 0 "${BUDGET[$1]}" ""; fi
}

trap 'log "interrupted"; record interrupted FAIL 130 0 - "the check was interrupted"; pack; exit 130' INT TERM

BENCH=("$PYTHON" -m capsnet_ext.cli bench --out-dir "$RESULTS/bench")
MNIST_OPS="capsule_routing,dynamic_routing,predict"
SANITIZE=("$PYTHON" -m benchmarks.sanitize_driver --backends cuda,triton)
SAN_FLAGS=(--error-exitcode 99 --print-limit 50)
SAN_HELP="$(compute-sanitizer --help 2>/dev/null || true)"
if grep -q -- --report-api-errors <<<"$SAN_HELP"; then
  # API errors surface as Python exceptions in the driver; the tool's own reports of them
  # (PyTorch probes the driver at start-up) would only be noise.
  SAN_FLAGS+=(--report-api-errors no)
fi
if grep -q -- --target-processes <<<"$SAN_HELP"; then
  SAN_FLAGS+=(--target-processes application-only)  # not ptxas or the compilers Triton starts
fi
XDIST=()
if "$PYTHON" -c "import xdist" >/dev/null 2>&1; then XDIST=(-n "${GPU_TEST_WORKERS:-12}"); fi
export MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}"

WHAT[env]="environment record (env.json)"
WHAT[install]="MAX_JOBS=$MAX_JOBS $PYTHON -m pip install --no-build-isolation --no-deps --no-index -v -e ."
WHAT[extension]="$PYTHON -m benchmarks.gpu_check extension (capsnet_ext._C built, loaded, ops registered for CUDA, a small call agrees)"
WHAT[gpu-tests]="TORCHINDUCTOR_COMPILE_THREADS=1 $PYTHON -m pytest -m gpu ${XDIST[*]} --junitxml=gpu-tests.xml tests"
for tool in memcheck initcheck; do
  WHAT[$tool]="PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool $tool ${SAN_FLAGS[*]} ${SANITIZE[*]} --profile full"
done
for tool in racecheck synccheck; do
  WHAT[$tool]="compute-sanitizer --tool $tool ${SAN_FLAGS[*]} ${SANITIZE[*]} --profile race"
done
NCU_ARGS=(--csv --page details --nvtx --nvtx-include "capsnet_profile/" --launch-count 16
          --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
          --metrics "regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio$")
WHAT[crash-trace]="LD_PRELOAD=segv_trace.so: pytest tests/test_cuda.py::test_gpu_errors_name_the_argument; PYTORCH_NO_CUDA_MEMORY_CACHING=1 sanitize_driver --backends cuda --profile full; benchmarks.gpu_check crash-probe (native stacks, addr2line)"
WHAT[profile]="$PYTHON -m benchmarks.gpu_profile torch RESULTS (torch.profiler kernel tables, every backend and dtype)"
WHAT[ncu]="ncu ${NCU_ARGS[*]} $PYTHON -m benchmarks.gpu_profile ncu-target --backend cuda|triton --dtype float32|bfloat16"
WHAT[bench-mnist]="capsnet-ext bench --ops $MNIST_OPS --sweeps mnist --dtypes float32,bfloat16 --contenders reference,triton,cuda,cuda-lanes2 --skip-e2e"
WHAT[bench-compiled-fp32]="capsnet-ext bench --ops capsule_routing --sweeps mnist --dtypes float32 --contenders reference-compiled --skip-e2e"
WHAT[bench-compiled-bf16]="capsnet-ext bench --ops capsule_routing --sweeps mnist --dtypes bfloat16 --contenders reference-compiled --skip-e2e"
WHAT[train-step]="capsnet-ext bench --e2e-only --e2e-modes eager --e2e-precisions float32,bf16-autocast --e2e-batch 128 --e2e-steps 20 --contenders reference,triton,cuda"
WHAT[sweep-I]="capsnet-ext bench --ops capsule_routing --sweeps I --dtypes float32 --contenders reference,triton,cuda --skip-e2e (time left)"
WHAT[sweep-B]="capsnet-ext bench --ops capsule_routing --sweeps B --dtypes float32 --contenders reference,triton,cuda --skip-e2e (time left)"

{
  echo "GPU steps, each under its budget (seconds), all inside a ${TOTAL_BUDGET}s deadline:"
  sum=0
  for s in "${STEP_ORDER[@]}"; do
    b="${BUDGET[$s]}"; sum=$((sum + b))
    printf '  %-20s %4s  %s\n' "$s" "$([[ $b -eq 0 ]] && echo left || echo "$b")" "${WHAT[$s]}"
  done
  printf '  %-20s %4s  (%d min %02d s; the sweeps share what is left of the %ss)\n' "sum of budgets" "$sum" \
    $((sum / 60)) $((sum % 60)) "$TOTAL_BUDGET"
} >"$RESULTS/plan.txt"
cat "$RESULTS/plan.txt"
log "results folder $RESULTS; archive $ARCHIVE; summary $SUMMARY"

# ---------------------------------------------------------------- 1. environment
step env -- "$PYTHON" -m benchmarks.gpu_check env "$RESULTS" --mode "$([[ $DRY_RUN -eq 1 ]] && echo dry-run || echo gpu)"

# ---------------------------------------------------------------- 2. install and the extension
# Later steps (benchmarks) record the commit the check was given, not whatever git finds
# around the copy the check runs in.
if [[ -z "${COMMIT:-}" && -f "$RESULTS/env.json" ]]; then
  COMMIT="$("$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("commit") or "")' "$RESULTS/env.json" 2>/dev/null || true)"
  COMMIT_DIRTY="$("$PYTHON" -c 'import json, sys; print(int(bool(json.load(open(sys.argv[1])).get("dirty"))))' "$RESULTS/env.json" 2>/dev/null || true)"
  [[ -n "$COMMIT" ]] && export COMMIT COMMIT_DIRTY
fi
# Build for the GPU this runs on (one architecture: half the build time of two).
if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" && $DRY_RUN -eq 0 ]]; then
  arch="$("$PYTHON" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || true)"
  if [[ "$arch" =~ ^[0-9]+\.[0-9]+$ ]]; then export TORCH_CUDA_ARCH_LIST="$arch"; log "TORCH_CUDA_ARCH_LIST=$arch (this GPU)"; fi
fi
WHAT[install]="TORCH_CUDA_ARCH_LIST=<this GPU's> ${WHAT[install]}"
if [[ $SKIP_INSTALL -eq 1 ]]; then
  record install skipped 0 0 "${BUDGET[install]}" "--skip-install"
elif selected install; then
  STEP_STATUS=""
  run_step install -- "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -v -e .
  skipped_line="$(grep -m1 'capsnet_ext: .*CUDA extension skipped' "$RESULTS/logs/install.log" || true)"
  if [[ "$STEP_STATUS" == pass && -n "$skipped_line" ]]; then
    if [[ $DRY_RUN -eq 1 ]]; then
      finish_step install pass "installed without the CUDA extension, as expected here: ${skipped_line#*capsnet_ext: }"
    else
      finish_step install FAIL "pip succeeded but setup.py skipped the CUDA extension: ${skipped_line#*capsnet_ext: }"
    fi
  else
    finish_step install
  fi
else
  record install "not selected" 0 0 "${BUDGET[install]}" ""
fi
# From here on, only the extension that was built counts: no just-in-time build fallback.
export CAPSNET_EXT_NO_JIT=1
# The checks run the CUDA backend before it has a verification record; they are that record.
export CAPSNET_EXT_CUDA_UNVERIFIED=1

STEP_STATUS=""
run_step extension -- "$PYTHON" -m benchmarks.gpu_check extension
if [[ "${STEP_RC:-}" == 3 ]]; then
  if [[ $DRY_RUN -eq 1 ]]; then finish_step extension skipped "no GPU here: checked only that the check runs"
  else finish_step extension FAIL "no CUDA GPU is visible to torch"; fi
else
  finish_step extension
fi

# ---------------------------------------------------------------- 3-4. GPU tests and sanitizers
if [[ $DRY_RUN -eq 1 ]]; then
  dry gpu-tests
  step gpu-tests-collect -- "$PYTHON" -m pytest -m gpu --collect-only -q -p no:cacheprovider tests
  dry crash-trace
  # The tracer itself builds and names a native crash on any machine.
  step crash-trace-cpu -- bash -c 'gcc -shared -fPIC -O0 -o "$0/segv_trace.so" benchmarks/segv_trace.c -ldl &&
    ! LD_PRELOAD="$0/segv_trace.so" "$PYTHON" -c "import ctypes; ctypes.string_at(0)" 2>"$0/crash-cpu.log" &&
    grep -q "^\[native\] signal 11" "$0/crash-cpu.log"' "$RESULTS"
  for tool in memcheck racecheck initcheck synccheck; do dry "$tool"; done
  step sanitize-driver-cpu -- "$PYTHON" -m benchmarks.sanitize_driver --backends reference --device cpu \
    --profile tiny --out "$RESULTS/sanitize-driver-cpu.json"
  dry profile
  # The profile step's code on the CPU: the reference at a tiny shape, torch.profiler's CPU table.
  step profile-cpu -- "$PYTHON" -m benchmarks.gpu_profile torch "$RESULTS" --device cpu --tiny
  dry ncu
else
  # Inductor compiles in-process in each test worker: the few small torch.compile tests do not
  # repay a pool of compile processes per worker.
  step gpu-tests -- env TORCHINDUCTOR_COMPILE_THREADS=1 "$PYTHON" -m pytest -m gpu "${XDIST[@]}" \
    -p no:cacheprovider -q -rfEs --junitxml="$RESULTS/gpu-tests.xml" tests
  # Host crashes (2026-12-04: a CUDA error-path test and the memcheck driver died with SIGSEGV
  # on the host): the native stack of each reproducer, through benchmarks/segv_trace.c, with the
  # project library's frames resolved to functions and lines. A diagnostic: it verifies nothing.
  # segv_trace.c prints the faulting pc, every frame as OBJECT 0xOFFSET (relative to the
  # object's load bias, return addresses minus 1) and the C++ runtime objects loaded; here
  # the frames in the project's library and in the C++ runtime and unwinder are resolved by
  # addr2line. The two reproducers run behind Python's faulthandler (both stacks); the probes
  # of `benchmarks.gpu_check crash-probe` run without it (the fault's own pc and address) and
  # tell the hypotheses apart (see CRASH_PROBES there).
  step crash-trace -- bash -c '
    set -u; results="$0"; status=0
    gcc -shared -fPIC -O0 -o "$results/segv_trace.so" benchmarks/segv_trace.c -ldl || exit 1
    resolve() {  # resolve LOG: the native frames of interest, through addr2line
      grep -E "^\[native-(pc|ret|offset)\]" "$1" | grep -E "capsnet|libstdc\+\+|libgcc_s|libc10\.so" |
        while read -r tag lib off _rest; do
          echo "$tag $lib $off ${_rest:-}: $(addr2line -f -C -e "$lib" "$off" 2>/dev/null | tr "\n" " ")"
        done
    }
    trace() {  # trace NAME COMMAND...: run with the tracer; resolve the frames of interest
      local name="$1"; shift
      echo "### $name: $*"
      LD_PRELOAD="$results/segv_trace.so" "$@" >"$results/crash-$name.log" 2>&1
      local rc=$?
      echo "exit $rc"; tail -n 120 "$results/crash-$name.log"
      resolve "$results/crash-$name.log"
      [[ $rc -eq 0 ]] || status=1
    }
    trace error-path "$PYTHON" -X faulthandler -m pytest -q -p no:cacheprovider -p no:xdist \
      tests/test_cuda.py::test_gpu_errors_name_the_argument
    trace driver-no-caching env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$PYTHON" -X faulthandler \
      -m benchmarks.sanitize_driver --backends cuda --profile full --out "$results/crash-driver.json"
    trace probes "$PYTHON" -m benchmarks.gpu_check crash-probe "$results"
    for log in "$results"/crash-probe-*.log; do
      [[ -e "$log" ]] && grep -q "^\[native\] signal" "$log" && { echo "### $(basename "$log")"; resolve "$log"; }
    done
    exit $status' "$RESULTS"
  if command -v compute-sanitizer >/dev/null 2>&1; then
    for tool in memcheck racecheck initcheck synccheck; do
      profile=full; caching=()
      case "$tool" in
        memcheck|initcheck) caching=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1) ;;
        *) profile=race ;;
      esac
      step "$tool" -- "${caching[@]}" compute-sanitizer --tool "$tool" "${SAN_FLAGS[@]}" \
        "${SANITIZE[@]}" --profile "$profile" --out "$RESULTS/sanitize-$tool.json"
    done
  else
    for tool in memcheck racecheck initcheck synccheck; do
      record "$tool" FAIL 127 0 "${BUDGET[$tool]}" "compute-sanitizer not found on PATH"
    done
    pack
  fi

  # ------------------------------------------------------------ 5. where the time goes
  step profile -- "$PYTHON" -m benchmarks.gpu_profile torch "$RESULTS"
  if command -v ncu >/dev/null 2>&1; then
    STEP_STATUS=""
    run_step ncu -- bash -c '
      set -u; status=0; ncu_args=("$@")
      for target in "cuda float32" "triton bfloat16" "triton float32"; do
        read -r backend dtype <<<"$target"
        out="$0/ncu-$backend-$dtype"
        ncu "${ncu_args[@]}" "$PYTHON" -m benchmarks.gpu_profile ncu-target --backend "$backend" --dtype "$dtype" \
          >"$out.csv" 2>"$out.log" || status=1
        "$PYTHON" -m benchmarks.gpu_profile ncu-parse "$out.csv" "$0/profile-ncu-$backend-$dtype.json" || status=1
      done
      exit $status' "$RESULTS" "${NCU_ARGS[@]}"
    finish_step ncu
  else
    record ncu FAIL 127 0 "${BUDGET[ncu]}" "ncu not found on PATH"; pack
  fi
fi

# ---------------------------------------------------------------- 6. timings
if [[ $DRY_RUN -eq 1 ]]; then
  dry bench-mnist
  dry train-step
  dry bench-compiled-fp32
  dry bench-compiled-bf16
  # The same code path on the CPU, at a tiny shape: the op timings and a training step.
  step bench-cpu -- "${BENCH[@]}" --device cpu --quick --shape 2,24,3,4,5,2 --contenders reference \
    --no-plots --e2e-batch 2 --e2e-steps 1 --e2e-modes eager --e2e-precisions float32
  dry sweep-I
  dry sweep-B
else
  CONTENDERS=reference,triton,cuda
  # cuda-lanes2: the CUDA routing kernels with two samples per lane, timed beside the default.
  step bench-mnist -- "${BENCH[@]}" --device cuda --ops "$MNIST_OPS" --sweeps mnist --dtypes float32,bfloat16 \
    --contenders "$CONTENDERS,cuda-lanes2" --skip-e2e --no-plots
  step train-step -- "${BENCH[@]}" --device cuda --e2e-only --e2e-modes eager --e2e-precisions float32,bf16-autocast \
    --e2e-batch 128 --e2e-steps 20 --contenders "$CONTENDERS"
  # With the time left: the compiled reference, one op, one compilation per dtype and grad mode.
  MIN_START=20
  step bench-compiled-fp32 -- "${BENCH[@]}" --device cuda --ops capsule_routing --sweeps mnist --dtypes float32 \
    --contenders reference-compiled --skip-e2e --no-plots
  step bench-compiled-bf16 -- "${BENCH[@]}" --device cuda --ops capsule_routing --sweeps mnist --dtypes bfloat16 \
    --contenders reference-compiled --skip-e2e --no-plots
  MIN_START=40
  step sweep-I -- "${BENCH[@]}" --device cuda --ops capsule_routing --sweeps I --dtypes float32 \
    --contenders "$CONTENDERS" --skip-e2e
  step sweep-B -- "${BENCH[@]}" --device cuda --ops capsule_routing --sweeps B --dtypes float32 \
    --contenders "$CONTENDERS" --skip-e2e
fi

trap - INT TERM
pack
log "done in $(($(date +%s) - START))s: $ARCHIVE and $SUMMARY"
cat "$SUMMARY"
rm -rf "$WORK"
exit $failed
