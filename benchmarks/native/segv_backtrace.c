/* LD_PRELOAD helper for diagnostics: on SIGSEGV/SIGBUS/SIGABRT print the native call stack (function
 * names from the dynamic symbol tables) to stderr, then die of the same signal. For machines without gdb.
 *   gcc -shared -fPIC -O1 -o segv_backtrace.so segv_backtrace.c
 *   LD_PRELOAD=$PWD/segv_backtrace.so python crashing.py
 */
#define _GNU_SOURCE
#include <execinfo.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static void on_fatal(int sig) {
  void *frames[64];
  int n = backtrace(frames, 64);
  static const char head[] = "\n== native backtrace (segv_backtrace.so) ==\n";
  write(STDERR_FILENO, head, sizeof head - 1);
  backtrace_symbols_fd(frames, n, STDERR_FILENO);
  signal(sig, SIG_DFL);
  raise(sig);
}

__attribute__((constructor)) static void install(void) {
  void *warm[1];
  backtrace(warm, 1); /* loads libgcc's unwinder now, not inside the signal handler */
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_fatal;
  sa.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &sa, NULL);
  sigaction(SIGBUS, &sa, NULL);
  sigaction(SIGABRT, &sa, NULL);
}
