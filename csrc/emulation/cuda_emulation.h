// Host emulation of the small part of CUDA the capsnet_ext kernels use, so that the real
// kernel sources (csrc/*.cu, compiled with -DCAPSNET_HOST_EMULATION by a host C++ compiler)
// can be run and checked without a GPU, under AddressSanitizer or ThreadSanitizer.
//
// Every CUDA thread of a block is a host thread; blocks run one after another. __syncthreads
// and __syncwarp are barriers, warp shuffles exchange through a per-warp buffer between two
// barriers. Lanes are *not* run in lockstep, which is stricter than a GPU: code that relies on
// implicit warp synchronisation instead of __syncwarp shows up as wrong results or sanitizer
// reports. Dynamic shared memory is a heap block of exactly the requested size, filled with
// NaN bytes, so that reads past its end are caught by AddressSanitizer and reads of unwritten
// entries poison the results. Float and double only.
//
// Blocks run one at a time, in the order CAPSNET_EMULATION_BLOCK_ORDER names: "forward"
// (default), "reverse", or "shuffle:<seed>"; the kernels' results must not depend on it
// (the last block to arrive at a reduction node differs between orders). Kernel launches and
// memsets are counted (capsnet_emu::launch_count) so tests can check the launch plan.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <random>
#include <string>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(n)

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace capsnet_emu {

struct Warp {
  std::barrier<> barrier{32};
  double slots[32];
};

struct Block {
  explicit Block(unsigned threads) : barrier(threads) {
    for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(std::make_unique<Warp>());
  }
  std::barrier<> barrier;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* smem = nullptr;
};

inline thread_local Block* tl_block = nullptr;
inline cudaError_t& last_error() {
  static cudaError_t error = cudaSuccess;
  return error;
}
inline long& launch_count() {  // kernel launches and memsets so far
  static long count = 0;
  return count;
}

// The order in which the blocks of a grid of n blocks run (see the header comment).
inline std::vector<unsigned> block_order(unsigned n) {
  std::vector<unsigned> order(n);
  for (unsigned k = 0; k < n; ++k) order[k] = k;
  const char* env = std::getenv("CAPSNET_EMULATION_BLOCK_ORDER");
  const std::string how = env ? env : "forward";
  if (how == "reverse") {
    std::reverse(order.begin(), order.end());
  } else if (how.rfind("shuffle:", 0) == 0) {
    std::mt19937 rng(static_cast<unsigned>(std::stoul(how.substr(8))) + n);
    std::shuffle(order.begin(), order.end(), rng);
  }
  return order;
}

template <typename Kernel>
struct Launch {
  Kernel kernel;
  dim3 grid, block;
  size_t smem;

  template <typename... Args>
  void operator()(Args... args) const {
    ++launch_count();
    const unsigned threads = block.x * block.y * block.z;
    if (threads == 0 || threads % 32 != 0 || block.y != 1 || block.z != 1 || threads > 1024 ||
        grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
      last_error() = cudaErrorInvalidConfiguration;
      return;
    }
    const unsigned per_z = grid.x * grid.y;
    for (unsigned flat : block_order(grid.x * grid.y * grid.z)) {
          const unsigned bz = flat / per_z, by = flat % per_z / grid.x, bx = flat % grid.x;
          Block blk(threads);
          std::unique_ptr<unsigned char, void (*)(void*)> smem_block(
              static_cast<unsigned char*>(std::malloc(smem > 0 ? smem : 1)), std::free);
          std::memset(smem_block.get(), 0xff, smem > 0 ? smem : 1);  // NaN in float and double
          blk.smem = smem_block.get();
          std::vector<std::thread> pool;
          pool.reserve(threads);
          for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
              threadIdx = dim3(t);
              blockIdx = dim3(bx, by, bz);
              blockDim = block;
              gridDim = grid;
              tl_block = &blk;
              kernel(args...);
            });
          }
          for (auto& th : pool) th.join();
    }
  }
};

template <typename Kernel>
Launch<Kernel> make_launch(Kernel kernel, dim3 grid, dim3 block, size_t smem) {
  return Launch<Kernel>{kernel, grid, block, smem};
}

}  // namespace capsnet_emu

#define CAPSNET_LAUNCH(kernel, grid, block, smem, stream) ::capsnet_emu::make_launch(kernel, grid, block, smem)
#define CAPSNET_DYNAMIC_SMEM(name) unsigned char* name = ::capsnet_emu::tl_block->smem

inline void __syncthreads() { capsnet_emu::tl_block->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  capsnet_emu::tl_block->warps[threadIdx.x / 32]->barrier.arrive_and_wait();
}
// Every lane of the warp must call it (the kernels only shuffle with the full mask); lane_mask
// must be below width, so the partner is in the same group of `width` lanes.
template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width = 32) {
  auto& warp = *capsnet_emu::tl_block->warps[threadIdx.x / 32];
  const unsigned lane = threadIdx.x % 32;
  if (lane_mask >= width) std::abort();
  warp.slots[lane] = static_cast<double>(value);
  warp.barrier.arrive_and_wait();
  const T other = static_cast<T>(warp.slots[lane ^ static_cast<unsigned>(lane_mask)]);
  warp.barrier.arrive_and_wait();
  return other;
}

inline unsigned atomicAdd(unsigned* address, unsigned value) {
  return std::atomic_ref<unsigned>(*address).fetch_add(value, std::memory_order_seq_cst);
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
template <typename T> T __ldcg(const T* p) { return *p; }
template <typename T> T __ldg(const T* p) { return *p; }

inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

inline cudaError_t cudaGetLastError() {
  const cudaError_t error = capsnet_emu::last_error();
  capsnet_emu::last_error() = cudaSuccess;
  return error;
}
inline cudaError_t cudaPeekAtLastError() { return capsnet_emu::last_error(); }
inline const char* cudaGetErrorString(cudaError_t error) {
  return error == cudaSuccess ? "no error" : "invalid configuration or argument (emulation)";
}
inline cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  ++capsnet_emu::launch_count();
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}
template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel, cudaFuncAttribute, int) {
  return cudaSuccess;
}
