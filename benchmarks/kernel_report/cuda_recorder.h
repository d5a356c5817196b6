// Launch recorder for the static kernel report (benchmarks/kernel_report/cuda_backend.py).
//
// Force-included (g++ -include) into every translation unit of the host-emulation build of
// csrc/ (-DCAPSNET_HOST_EMULATION, csrc/emulation/driver.cpp as the program). It takes over
// CAPSNET_LAUNCH and cudaMemsetAsync after csrc/emulation/cuda_emulation.h has defined them:
// every launch and memset is written to the log named by $CAPSNET_REPORT_LOG (kernel address,
// grid, block, dynamic shared memory, pointer arguments, the host call stack) instead of
// running every block. With -DCAPSNET_REPORT_PROFILE (a --coverage build) the first and the
// last block of each launch do run, through the emulation's block machinery, and the line
// counts of that launch are dumped to a folder of their own (gcov), so the report can weight
// each SASS instruction by how often its source line ran.
#pragma once

#include <cstddef>
#include <cstdio>
#include <type_traits>

#include "emulation/cuda_emulation.h"

namespace capsnet_report {

void begin_launch(const void* kernel, dim3 grid, dim3 block, size_t smem);
void note_pointer(const void* ptr);
void end_launch(unsigned threads_run);
void memset_async(void* ptr, int value, size_t bytes);
void dump_profile();
void reset_profile();

template <typename T>
inline void note_arg(const T& value) {
  if constexpr (std::is_pointer_v<T>) note_pointer(static_cast<const void*>(value));
}

#ifdef CAPSNET_REPORT_PROFILE
// One block of a launch, as csrc/emulation/cuda_emulation.h runs every block.
template <typename Kernel, typename... Args>
void run_block(Kernel kernel, dim3 grid, dim3 block, size_t smem, dim3 index, Args... args) {
  const unsigned threads = block.x * block.y * block.z;
  ::capsnet_emu::Block blk(threads);
  std::unique_ptr<unsigned char, void (*)(void*)> smem_block(
      static_cast<unsigned char*>(std::malloc(smem > 0 ? smem : 1)), std::free);
  std::memset(smem_block.get(), 0xff, smem > 0 ? smem : 1);
  blk.smem = smem_block.get();
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = dim3(t);
      blockIdx = index;
      blockDim = block;
      gridDim = grid;
      ::capsnet_emu::tl_block = &blk;
      kernel(args...);
    });
  }
  for (auto& th : pool) th.join();
}
#endif

template <typename Kernel>
struct RecordedLaunch {
  Kernel kernel;
  dim3 grid, block;
  size_t smem;

  template <typename... Args>
  void operator()(Args... args) const {
    begin_launch(reinterpret_cast<const void*>(kernel), grid, block, smem);
    (note_arg(args), ...);
    unsigned threads_run = 0;
#ifdef CAPSNET_REPORT_PROFILE
    const unsigned threads = block.x * block.y * block.z;
    if (threads > 0 && threads % 32 == 0 && threads <= 1024 && block.y == 1 && block.z == 1) {
      reset_profile();
      const dim3 first(0, 0, 0), last(grid.x - 1, grid.y - 1, grid.z - 1);
      run_block(kernel, grid, block, smem, first, args...);
      threads_run += threads;
      if (grid.x * grid.y * grid.z > 1) {
        run_block(kernel, grid, block, smem, last, args...);
        threads_run += threads;
      }
      dump_profile();
    }
#endif
    end_launch(threads_run);
  }
};

template <typename Kernel>
RecordedLaunch<Kernel> make_launch(Kernel kernel, dim3 grid, dim3 block, size_t smem) {
  return RecordedLaunch<Kernel>{kernel, grid, block, smem};
}

}  // namespace capsnet_report

#undef CAPSNET_LAUNCH
#define CAPSNET_LAUNCH(kernel, grid, block, smem, stream) ::capsnet_report::make_launch(kernel, grid, block, smem)
#define cudaMemsetAsync(ptr, value, bytes, stream) \
  (::capsnet_report::memset_async((ptr), (value), (bytes)), cudaSuccess)
