/* alloc_probe: an LD_PRELOAD heap-allocation counter for bench/nbd_bench.sh (bench builds only;
 * no product code changes).  Counts every malloc, calloc, realloc, posix_memalign,
 * aligned_alloc, memalign and valloc call in the process, on every thread (operator new goes
 * through malloc in libstdc++, so C++ allocations are counted too).
 *
 *   LD_PRELOAD=.../libdst_alloc_probe.so ALLOC_PROBE_FILE=/tmp/x dstd ...
 *   kill -USR2 <pid>     appends "<count>\n" to $ALLOC_PROBE_FILE (default stderr)
 *
 * The bench reads the count right before and right after a measured fio run; the difference
 * over the number of I/Os fio completed is "allocations per I/O" in steady state.
 *
 * The real functions come from glibc's __libc_* aliases (no dlsym, which itself allocates).
 * The counter is a relaxed atomic: one uncontended lock-add per call. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern void* __libc_malloc(size_t);
extern void* __libc_calloc(size_t, size_t);
extern void* __libc_realloc(void*, size_t);
extern void* __libc_memalign(size_t, size_t);
extern void* __libc_valloc(size_t);

static atomic_uint_fast64_t g_count;

static void Count(void) { atomic_fetch_add_explicit(&g_count, 1, memory_order_relaxed); }

void* malloc(size_t n) { Count(); return __libc_malloc(n); }
void* calloc(size_t a, size_t b) { Count(); return __libc_calloc(a, b); }
void* realloc(void* p, size_t n) { Count(); return __libc_realloc(p, n); }
void* memalign(size_t a, size_t n) { Count(); return __libc_memalign(a, n); }
void* aligned_alloc(size_t a, size_t n) { Count(); return __libc_memalign(a, n); }
void* valloc(size_t n) { Count(); return __libc_valloc(n); }
int posix_memalign(void** out, size_t a, size_t n) {
  Count();
  if (a < sizeof(void*) || (a & (a - 1)) != 0) return EINVAL;
  void* p = __libc_memalign(a, n);
  if (!p && n) return ENOMEM;
  *out = p;
  return 0;
}

/* Async-signal-safe: formats the number by hand and write()s it. */
static void Dump(int sig) {
  (void)sig;
  int saved = errno;
  uint64_t v = atomic_load_explicit(&g_count, memory_order_relaxed);
  char buf[32];
  int i = sizeof(buf);
  buf[--i] = '\n';
  do { buf[--i] = (char)('0' + v % 10); v /= 10; } while (v && i > 0);
  const char* path = getenv("ALLOC_PROBE_FILE");
  int fd = path ? open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644) : 2;
  if (fd >= 0) {
    ssize_t r = write(fd, buf + i, sizeof(buf) - (size_t)i);
    (void)r;
    if (fd != 2) close(fd);
  }
  errno = saved;
}

__attribute__((constructor)) static void Init(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof(sa));
  sa.sa_handler = Dump;
  sa.sa_flags = SA_RESTART;
  sigaction(SIGUSR2, &sa, NULL);
}
