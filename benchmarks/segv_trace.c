/* A host-side crash tracer for the GPU check: LD_PRELOAD this library into a Python process,
 * and a SIGSEGV, SIGBUS, SIGILL, SIGFPE or SIGABRT prints the native call stack (the frames
 * Python's faulthandler cannot name) to stderr before the process dies as it would have.
 *
 *   gcc -shared -fPIC -O0 -o segv_trace.so benchmarks/segv_trace.c -ldl
 *   LD_PRELOAD=$PWD/segv_trace.so python3 -m pytest -p no:faulthandler ...
 *
 * What it prints, all with write(2) on an unbuffered descriptor (nothing is lost when the
 * process dies right after):
 *   [native] signal 11 (Segmentation fault): si_code 1, fault address 0x..., pid N
 *   [native-pc] OBJECT 0xOFFSET           the faulting instruction (from the signal context)
 *   [native-ret] OBJECT 0xOFFSET          the word at the stack pointer: the return address
 *                                         when the fault is a call through a bad pointer
 *   [native] N frames:                    backtrace(), then for every frame in an object
 *   [native-offset] OBJECT 0xOFFSET       the frame's address minus the object's load bias,
 *                                         minus 1 (a return address points after its call)
 *   [native-lib] OBJECT                   the C++ runtime and unwinder objects the process
 *                                         loaded (libstdc++, libgcc_s) and the project's own
 * OFFSET is relative to the object's load bias (link_map l_addr, from dladdr1), which is what
 * `addr2line -f -C -e OBJECT 0xOFFSET` expects for shared objects and for executables alike
 * (the GPU check resolves the project library's frames this way).
 *
 * The handler is installed by a constructor, before Python starts, on an alternate signal
 * stack (a stack overflow still reports). A handler installed later (Python's faulthandler,
 * `-X faulthandler` or pytest's plugin) runs first and re-raises the signal to this one with
 * raise(): the signal context is then raise()'s, which the first line says (si_code -6,
 * SI_TKILL); the faulting frames still appear in the backtrace, after the second signal
 * frame. Run without faulthandler (`-p no:faulthandler`, no `-X faulthandler`) to get the
 * fault's own pc and address.
 *
 * backtrace() is not async-signal-safe; this is a last-words diagnostic for a process that is
 * crashing anyway. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <link.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>
#include <unistd.h>

static const int kSignals[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT};
#define NUM_SIGNALS (sizeof kSignals / sizeof kSignals[0])

static void say(const char *text) {
  size_t len = strlen(text);
  while (len > 0) {
    ssize_t n = write(2, text, len);
    if (n <= 0) return;
    text += n;
    len -= (size_t)n;
  }
}

/* "TAG OBJECT 0xOFFSET (symbol+0xN)" for an address inside a loaded object; "TAG ?? 0xADDR"
 * otherwise. bias_back is subtracted from the offset (1 for return addresses). */
static void describe(const char *tag, uintptr_t addr, uintptr_t bias_back) {
  char line[1024];
  Dl_info info;
  struct link_map *map = NULL;
  if (addr != 0 && dladdr1((void *)addr, &info, (void **)&map, RTLD_DL_LINKMAP) && info.dli_fname && map) {
    const char *name = info.dli_fname[0] ? info.dli_fname : "(main program)";
    uintptr_t off = addr - (uintptr_t)map->l_addr - bias_back;
    if (info.dli_sname && info.dli_saddr)
      snprintf(line, sizeof line, "%s %s 0x%lx (%s+0x%lx)\n", tag, name, (unsigned long)off, info.dli_sname,
               (unsigned long)(addr - (uintptr_t)info.dli_saddr));
    else
      snprintf(line, sizeof line, "%s %s 0x%lx\n", tag, name, (unsigned long)off);
  } else {
    snprintf(line, sizeof line, "%s ?? 0x%lx (in no loaded object)\n", tag, (unsigned long)addr);
  }
  say(line);
}

static int list_runtime(struct dl_phdr_info *info, size_t size, void *data) {
  (void)size;
  (void)data;
  const char *name = info->dlpi_name;
  if (name && (strstr(name, "libstdc++") || strstr(name, "libgcc_s") || strstr(name, "capsnet") ||
               strstr(name, "libc10.so") || strstr(name, "libcudart"))) {
    char line[1024];
    snprintf(line, sizeof line, "[native-lib] %s (load bias 0x%lx)\n", name, (unsigned long)info->dlpi_addr);
    say(line);
  }
  return 0;
}

static void on_signal(int sig, siginfo_t *si, void *context) {
  /* Any further fault (in backtrace() itself, say) takes the default action at once. */
  for (unsigned i = 0; i < NUM_SIGNALS; ++i) signal(kSignals[i], SIG_DFL);
  char line[512];
  snprintf(line, sizeof line, "\n[native] signal %d (%s): si_code %d, fault address %p, pid %d\n", sig, strsignal(sig),
           si ? si->si_code : 0, si ? si->si_addr : NULL, (int)getpid());
  say(line);
  if (si && si->si_code <= 0)
    say("[native] (sent by raise() or kill(): another handler, e.g. Python's faulthandler, ran first and "
        "re-raised it; the registers below are raise()'s, the fault's frames follow the second signal frame)\n");
  uintptr_t pc = 0, sp = 0;
  const ucontext_t *uc = (const ucontext_t *)context;
#if defined(__x86_64__)
  if (uc) {
    pc = (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
    sp = (uintptr_t)uc->uc_mcontext.gregs[REG_RSP];
  }
#elif defined(__aarch64__)
  if (uc) {
    pc = (uintptr_t)uc->uc_mcontext.pc;
    sp = (uintptr_t)uc->uc_mcontext.sp;
  }
#endif
  if (pc) {
    snprintf(line, sizeof line, "[native] pc 0x%lx, sp 0x%lx\n", (unsigned long)pc, (unsigned long)sp);
    say(line);
    describe("[native-pc]", pc, 0);
#if defined(__x86_64__)
    if (sp) describe("[native-ret]", *(const uintptr_t *)sp, 1);
#endif
  }
  void *frames[128];
  int n = backtrace(frames, 128);
  snprintf(line, sizeof line, "[native] %d frames:\n", n);
  say(line);
  backtrace_symbols_fd(frames, n, 2);
  for (int i = 0; i < n; ++i) describe("[native-offset]", (uintptr_t)frames[i], 1);
  dl_iterate_phdr(list_runtime, NULL);
  say("[native] end of native stack\n");
  raise(sig); /* default action now: the process dies as it would have */
}

__attribute__((constructor)) static void install(void) {
  static char alt_stack[1 << 16];
  stack_t ss;
  memset(&ss, 0, sizeof ss);
  ss.ss_sp = alt_stack;
  ss.ss_size = sizeof alt_stack;
  sigaltstack(&ss, NULL);
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_sigaction = on_signal;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  for (unsigned i = 0; i < NUM_SIGNALS; ++i) sigaction(kSignals[i], &sa, NULL);
}
