// Device helpers shared by the capsnet_ext kernels: element-type conversions, the
// accumulation type, warp reductions, launch checks. Plain CUDA C++, no torch headers.
#pragma once

#include <cfloat>
#include <cstdint>
#include <type_traits>

#ifdef CAPSNET_HOST_EMULATION
// Host build of the kernels for testing without a GPU (csrc/emulation/): each CUDA thread
// is a host thread; float and double only.
#include "emulation/cuda_emulation.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include "capsnet_kernels.h"

namespace capsnet {

// float16, bfloat16 and float32 accumulate in float32; float64 in float64.
template <typename scalar_t> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename scalar_t> using acc_t = typename AccType<scalar_t>::type;

// Explicit conversions: torch builds define __CUDA_NO_HALF_CONVERSIONS__ and friends, so the
// implicit operators of __half / __nv_bfloat16 must not be relied on.
template <typename acc, typename scalar_t> __device__ __forceinline__ acc load_as(const scalar_t* p) {
  return static_cast<acc>(*p);
}
#ifndef CAPSNET_HOST_EMULATION
template <> __device__ __forceinline__ float load_as<float, __half>(const __half* p) { return __half2float(*p); }
template <> __device__ __forceinline__ float load_as<float, __nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
#endif

template <typename scalar_t, typename acc> __device__ __forceinline__ void store_from(scalar_t* p, acc x) {
  *p = static_cast<scalar_t>(x);
}
#ifndef CAPSNET_HOST_EMULATION
template <> __device__ __forceinline__ void store_from<__half, float>(__half* p, float x) { *p = __float2half_rn(x); }
template <> __device__ __forceinline__ void store_from<__nv_bfloat16, float>(__nv_bfloat16* p, float x) {
  *p = __float2bfloat16_rn(x);
}
#endif

// Smallest normal number of the accumulation type: the reference squash clamps |s|^2 there.
template <typename acc> __host__ __device__ constexpr acc tiny_normal();
template <> __host__ __device__ constexpr float tiny_normal<float>() { return FLT_MIN; }
template <> __host__ __device__ constexpr double tiny_normal<double>() { return DBL_MIN; }

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float sqrt_acc(float x) { return sqrtf(x); }
__device__ __forceinline__ double sqrt_acc(double x) { return sqrt(x); }

template <typename acc> __device__ __forceinline__ acc warp_sum(acc x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
template <typename acc> __device__ __forceinline__ acc warp_max(acc x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x = max_acc(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Sums and maxima over aligned groups of kWidth lanes (a power of two <= 32). Every lane of
// the warp takes part (the butterfly never crosses a group), so the full mask is right.
template <int kWidth, typename acc> __device__ __forceinline__ acc group_sum(acc x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset, kWidth);
  return x;
}
template <int kWidth, typename acc> __device__ __forceinline__ acc group_max(acc x) {
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset >>= 1)
    x = max_acc(x, __shfl_xor_sync(0xffffffffu, x, offset, kWidth));
  return x;
}

// Grid size for a grid-stride loop over n elements with `threads` threads per block.
inline unsigned grid_for(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks < 1) blocks = 1;
  if (blocks > 65535LL * 16) blocks = 65535LL * 16;  // grid-stride loops cover the rest
  return static_cast<unsigned>(blocks);
}

// Kernel launch: CAPSNET_LAUNCH(kernel, grid, block, smem_bytes, stream)(args...). The kernel
// must be a single name (alias template instances that contain commas first).
#ifndef CAPSNET_HOST_EMULATION
#define CAPSNET_LAUNCH(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (stream)>>>
// Dynamic shared memory of a kernel, as bytes.
#define CAPSNET_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

// Launch-error checks that never clear an error and never blame a kernel for an error that
// was there before it: CAPSNET_CHECK_PENDING(where) at the start of a launcher reports a
// pending error as earlier work's (it stays pending for the caller); CAPSNET_CHECK_LAUNCH(name)
// after each launch reports the kernel by name. Both use cudaPeekAtLastError, which leaves
// the error in place for torch's own checks.
#define CAPSNET_CHECK_PENDING(where)                                                      \
  do {                                                                                    \
    cudaError_t err_ = cudaPeekAtLastError();                                             \
    if (err_ != cudaSuccess) return Status{static_cast<int>(err_), "earlier work (error pending before " where ")"}; \
  } while (0)

#define CAPSNET_CHECK_LAUNCH(name)                                              \
  do {                                                                          \
    cudaError_t err_ = cudaPeekAtLastError();                                   \
    if (err_ != cudaSuccess) return Status{static_cast<int>(err_), name};       \
  } while (0)

#define CAPSNET_RETURN_IF_ERROR(expr)            \
  do {                                           \
    Status st_ = (expr);                         \
    if (!st_.ok()) return st_;                   \
  } while (0)

// Calls f with a typed null pointer selecting the element type for a DType.
template <typename F> Status dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
#ifndef CAPSNET_HOST_EMULATION
    case DType::kFloat16: return f(static_cast<__half*>(nullptr));
    case DType::kBFloat16: return f(static_cast<__nv_bfloat16*>(nullptr));
#else
    case DType::kFloat16:
    case DType::kBFloat16: break;
#endif
// A host emulation build may hold one dtype's instances only (CAPSNET_EMULATION_DTYPE = 32 or
// 64), so that the two builds compile in parallel.
#if !defined(CAPSNET_EMULATION_DTYPE) || CAPSNET_EMULATION_DTYPE == 32
    case DType::kFloat32: return f(static_cast<float*>(nullptr));
#endif
#if !defined(CAPSNET_EMULATION_DTYPE) || CAPSNET_EMULATION_DTYPE == 64
    case DType::kFloat64: return f(static_cast<double*>(nullptr));
#endif
    default: break;
  }
  return Status{static_cast<int>(cudaErrorInvalidValue), "dtype dispatch"};
}

}  // namespace capsnet
