// Log side of the launch recorder (see cuda_recorder.h). Log lines, one record each:
//   alloc <ptr> <bytes>        heap blocks of at least 4 KiB (operator new: the driver's buffers;
//                              a pointer belongs to the latest block logged that contains it)
//   launch <kernel> <gx> <gy> <gz> <bx> <by> <bz> <smem> stack <return addresses...>
//   ptr <ptr>                  a pointer argument of the launch above (null included)
//   end <threads run>          threads executed for the line profile (0: none)
//   memset <ptr> <bytes> stack <return addresses...>
//   profile <folder>           gcov data of the launch above
#include <execinfo.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <new>
#include <string>

#include "cuda_recorder.h"

namespace capsnet_report {
namespace {

FILE* log_file() {
  static FILE* f = [] {
    const char* path = std::getenv("CAPSNET_REPORT_LOG");
    FILE* out = path ? std::fopen(path, "w") : nullptr;
    return out ? out : stderr;
  }();
  return f;
}

std::atomic<int> launch_counter{0};
thread_local bool in_hook = false;

void write_stack(FILE* f) {
  void* frames[32];
  const int n = backtrace(frames, 32);
  std::fprintf(f, " stack");
  for (int i = 1; i < n; ++i) std::fprintf(f, " %p", frames[i]);
  std::fprintf(f, "\n");
}

}  // namespace

void begin_launch(const void* kernel, dim3 grid, dim3 block, size_t smem) {
  FILE* f = log_file();
  std::fprintf(f, "launch %p %u %u %u %u %u %u %zu", kernel, grid.x, grid.y, grid.z, block.x, block.y, block.z,
               smem);
  write_stack(f);
}

void note_pointer(const void* ptr) { std::fprintf(log_file(), "ptr %p\n", ptr); }

void end_launch(unsigned threads_run) {
  std::fprintf(log_file(), "end %u\n", threads_run);
  std::fflush(log_file());
  ++launch_counter;
}

void memset_async(void* ptr, int value, size_t bytes) {
  FILE* f = log_file();
  std::fprintf(f, "memset %p %zu", ptr, bytes);
  write_stack(f);
  std::memset(ptr, value, bytes);
}

}  // namespace capsnet_report

#ifdef CAPSNET_REPORT_PROFILE
extern "C" void __gcov_dump(void);
extern "C" void __gcov_reset(void);

namespace capsnet_report {
void reset_profile() { __gcov_reset(); }

// Moves the .gcda files gcov just wrote (next to the objects, $CAPSNET_REPORT_GCDA_SRC) into
// a folder per launch under $CAPSNET_REPORT_GCDA_OUT: gcov merges into existing files, so
// moving them away keeps every launch's counts separate.
void dump_profile() {
  __gcov_dump();
  const char* src = std::getenv("CAPSNET_REPORT_GCDA_SRC");
  const char* out = std::getenv("CAPSNET_REPORT_GCDA_OUT");
  if (!src || !out) return;
  namespace fs = std::filesystem;
  const fs::path dest = fs::path(out) / ("launch-" + std::to_string(launch_counter.load()));
  fs::create_directories(dest);
  for (const auto& entry : fs::directory_iterator(src)) {
    if (entry.path().extension() == ".gcda") fs::rename(entry.path(), dest / entry.path().filename());
  }
  std::fprintf(log_file(), "profile %s\n", dest.c_str());
}
}  // namespace capsnet_report
#else
namespace capsnet_report {
void reset_profile() {}
void dump_profile() {}
}  // namespace capsnet_report
#endif

// Heap blocks of at least 4 KiB are logged so that pointer arguments can be matched to the
// buffer they point into (frees are not logged: the latest block containing a pointer is its).
void* operator new(std::size_t bytes) {
  void* p = std::malloc(bytes > 0 ? bytes : 1);
  if (!p) throw std::bad_alloc();
  if (bytes >= 4096 && !capsnet_report::in_hook) {
    capsnet_report::in_hook = true;
    std::fprintf(capsnet_report::log_file(), "alloc %p %zu\n", p, bytes);
    capsnet_report::in_hook = false;
  }
  return p;
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { operator delete(p); }
