#!/usr/bin/env bash
# Compile-check of the CUDA backend without a GPU:
#   1. every csrc/*.cu (plain CUDA C++, no torch headers) with nvcc for sm_80 and sm_90;
#   2. the torch binding csrc/capsnet_ext_ops.cpp with g++ -fsyntax-only against the installed
#      torch's headers (it uses only device-generic torch headers, so a CPU-only torch suffices).
# Exits non-zero on any error. Skips (exit 0, with a message) when nvcc is not installed.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "compile_cuda: nvcc not found; CUDA compile check skipped"
  exit 0
fi
PYTHON="${PYTHON:-python}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

echo "compile_cuda: $("$NVCC" --version | tail -1)"
pids=()
for src in csrc/*.cu; do
  name="$(basename "$src" .cu)"
  # The -D flags are the ones torch's extension build passes to nvcc.
  "$NVCC" -std=c++17 -O3 -lineinfo -Icsrc -Werror all-warnings \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ \
    -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -c "$src" -o "$TMP/$name.o" >"$TMP/$name.log" 2>&1 &
  pids+=("$!:$src:$name")
done

status=0
for entry in "${pids[@]}"; do
  IFS=: read -r pid src name <<<"$entry"
  if wait "$pid"; then
    echo "compile_cuda: ok   $src (sm_80, sm_90)"
  else
    echo "compile_cuda: FAIL $src"; cat "$TMP/$name.log"; status=1
  fi
done

includes="$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(" ".join("-isystem " + p for p in c.include_paths()))')"
CXX="${CXX:-g++}"
# shellcheck disable=SC2086
if "$CXX" -std=c++20 -fsyntax-only -Wall -Wextra -Werror $includes -Icsrc csrc/capsnet_ext_ops.cpp 2>"$TMP/binding.log"; then
  echo "compile_cuda: ok   csrc/capsnet_ext_ops.cpp (syntax, against torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
else
  echo "compile_cuda: FAIL csrc/capsnet_ext_ops.cpp"; cat "$TMP/binding.log"; status=1
fi
exit $status
