/* A host-side crash tracer for the GPU check: LD_PRELOAD this library into a Python process,
 * and a SIGSEGV, SIGBUS, SIGILL, SIGFPE or SIGABRT prints the native call stack (the frames
 * Python's faulthandler cannot name) to stderr before the process dies as it would have.
 *
 *   gcc -shared -fPIC -O0 -o segv_trace.so benchmarks/segv_trace.c
 *   LD_PRELOAD=$PWD/segv_trace.so python3 -X faulthandler -m pytest ...
 *
 * Each frame is printed as "[native] object(symbol+offset) [address]" and, for frames in
 * shared objects, as "[native-offset] /path/to/object 0xOFFSET", which
 * `addr2line -f -C -e /path/to/object 0xOFFSET` turns into a function and source line
 * (the GPU check does this for the project's own library).
 *
 * backtrace() is not async-signal-safe; this is a last-words diagnostic for a process that is
 * crashing anyway. The handler is installed before Python's (a constructor), and faulthandler
 * chains to it, so both stacks are printed. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static void print_frames(int sig) {
  void *frames[64];
  int n = backtrace(frames, 64);
  char line[512];
  int len = snprintf(line, sizeof line, "\n[native] signal %d (%s): %d frames\n", sig, strsignal(sig), n);
  write(2, line, (size_t)len);
  backtrace_symbols_fd(frames, n, 2);
  for (int i = 0; i < n; ++i) {
    Dl_info info;
    if (dladdr(frames[i], &info) && info.dli_fname) {
      len = snprintf(line, sizeof line, "[native-offset] %s 0x%lx\n", info.dli_fname,
                     (unsigned long)((char *)frames[i] - (char *)info.dli_fbase));
      write(2, line, (size_t)len);
    }
  }
}

static void on_signal(int sig) {
  print_frames(sig);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  const int signals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
  for (unsigned i = 0; i < sizeof signals / sizeof signals[0]; ++i) signal(signals[i], on_signal);
}
