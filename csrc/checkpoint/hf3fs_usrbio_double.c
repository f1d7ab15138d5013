/* A test double of 3FS's USRBIO C API (libhf3fs_api_shared.so), for tests only.
 *
 * It exports the same symbols with the same struct layouts and return
 * conventions as hf3fs_usrbio.h, and serves them with ordinary file I/O so that
 * jaxinfra.checkpoint's USRBIO path runs without a 3FS cluster:
 *
 *   - a directory is "on 3FS" when it or one of its ancestors holds a
 *     `3fs-virt/` directory (a real mount has `<mount>/3fs-virt/iovs/`);
 *   - an Iov is a file in /dev/shm, mapped shared and announced by a symlink
 *     `<mount>/3fs-virt/iovs/<uuid>` (as the real library does);
 *   - an Ior is a ring of `entries` slots served by one worker thread that
 *     runs pread/pwrite on a dup of the registered fd;
 *   - hf3fs_reg_fd returns -(dup fd) or a positive errno; prep_io checks the
 *     ring direction, the Iov bounds, the registration and the fd's access mode;
 *   - hf3fs_wait_for_ios returns at most `wait_cap` results per call (default 2)
 *     even when more are ready, so callers must loop.
 *
 * Extra symbols, not part of the real API, let tests inject faults and read
 * counters: hf3fs_double_inject, hf3fs_double_set_wait_cap, hf3fs_double_stats,
 * hf3fs_double_reset.
 *
 * Plain C11 + POSIX threads; no XLA or Python headers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

/* ---- The ABI (layouts and signatures as documented for hf3fs_usrbio.h). ---- */

struct hf3fs_iov {
  uint8_t *base;
  void *iovh;
  char id[16];
  char mount_point[256];
  size_t size;
  size_t block_size;
  int numa;
};

struct hf3fs_ior {
  struct hf3fs_iov iov;
  void *iorh;
  char mount_point[256];
  bool for_read;
  int io_depth;
  int priority;
  int timeout;
  uint64_t flags;
};

struct hf3fs_cqe {
  int32_t index;
  int32_t reserved;
  int64_t result;
  const void *userdata;
};

#define EXPORT __attribute__((visibility("default")))

/* ---- Faults and counters (test controls). ---- */

enum { FAULT_NONE = 0, FAULT_EIO = 1, FAULT_SHORT = 2, FAULT_HANG = 3 };
enum { DIR_WRITE = 0, DIR_READ = 1, DIR_BOTH = 2 };

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_fault_kind = FAULT_NONE;
static int g_fault_dir = DIR_BOTH;
static long g_fault_after = 0;  /* matching I/Os let through before the fault */
static long g_fault_count = 0;  /* I/Os affected; -1: all that follow */
static int g_wait_cap = 2;
static long g_ios = 0, g_bytes = 0, g_faults = 0, g_iovs = 0, g_iors = 0;

/* Sets the fault: `kind` (0 none, 1 EIO, 2 short transfer, 3 never completes)
 * for I/Os in direction `dir` (0 write, 1 read, 2 both), after `after` matching
 * I/Os succeed, for `count` I/Os (-1: all). */
EXPORT void hf3fs_double_inject(int kind, int dir, long after, long count) {
  pthread_mutex_lock(&g_lock);
  g_fault_kind = kind;
  g_fault_dir = dir;
  g_fault_after = after;
  g_fault_count = count;
  pthread_mutex_unlock(&g_lock);
}

EXPORT void hf3fs_double_set_wait_cap(int cap) {
  pthread_mutex_lock(&g_lock);
  g_wait_cap = cap > 0 ? cap : INT_MAX;
  pthread_mutex_unlock(&g_lock);
}

/* out[0..5] = I/Os completed, bytes moved, faults injected, live Iovs, live Iors. */
EXPORT void hf3fs_double_stats(long *out) {
  pthread_mutex_lock(&g_lock);
  out[0] = g_ios;
  out[1] = g_bytes;
  out[2] = g_faults;
  out[3] = g_iovs;
  out[4] = g_iors;
  pthread_mutex_unlock(&g_lock);
}

EXPORT void hf3fs_double_reset(void) {
  pthread_mutex_lock(&g_lock);
  g_fault_kind = FAULT_NONE;
  g_fault_count = 0;
  g_wait_cap = 2;
  g_ios = g_bytes = g_faults = 0;
  pthread_mutex_unlock(&g_lock);
}

static int take_fault(bool read) {
  int kind = FAULT_NONE;
  pthread_mutex_lock(&g_lock);
  bool matches = g_fault_kind != FAULT_NONE && g_fault_count != 0 &&
                 (g_fault_dir == DIR_BOTH || g_fault_dir == (read ? DIR_READ : DIR_WRITE));
  if (matches) {
    if (g_fault_after > 0) {
      --g_fault_after;
    } else {
      kind = g_fault_kind;
      if (g_fault_count > 0) --g_fault_count;
      ++g_faults;
    }
  }
  pthread_mutex_unlock(&g_lock);
  return kind;
}

/* ---- Mount detection. ---- */

static bool is_mount_root(const char *dir) {
  char probe[PATH_MAX + 16];
  struct stat st;
  if (snprintf(probe, sizeof(probe), "%s/3fs-virt", dir) >= (int)sizeof(probe)) return false;
  return stat(probe, &st) == 0 && S_ISDIR(st.st_mode);
}

/* The mount root of `path` (which need not exist) into `out`; false if none. */
static bool find_mount(const char *path, char *out) {
  char abs[PATH_MAX], cur[PATH_MAX];
  if (path == NULL || path[0] == '\0') return false;
  if (path[0] == '/') {
    if (snprintf(abs, sizeof(abs), "%s", path) >= (int)sizeof(abs)) return false;
  } else {
    char cwd[PATH_MAX];
    if (getcwd(cwd, sizeof(cwd)) == NULL) return false;
    if (snprintf(abs, sizeof(abs), "%s/%s", cwd, path) >= (int)sizeof(abs)) return false;
  }
  /* The longest existing prefix, resolved. */
  while (realpath(abs, cur) == NULL) {
    char *slash = strrchr(abs, '/');
    if (slash == NULL) return false;
    if (slash == abs) { strcpy(abs, "/"); continue; }
    *slash = '\0';
  }
  for (;;) {
    if (is_mount_root(cur)) {
      strcpy(out, cur);
      return true;
    }
    char *slash = strrchr(cur, '/');
    if (slash == NULL || strcmp(cur, "/") == 0) return false;
    if (slash == cur) slash[1] = '\0'; else *slash = '\0';
  }
}

EXPORT int hf3fs_extract_mount_point(char *hf3fs_mount_point, int size, const char *path) {
  char mount[PATH_MAX];
  if (!find_mount(path, mount)) return -1;
  int need = (int)strlen(mount) + 1;
  if (hf3fs_mount_point != NULL && need <= size) memcpy(hf3fs_mount_point, mount, need);
  return need;
}

static bool fd_path(int fd, char *out) {
  char link[64];
  snprintf(link, sizeof(link), "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, out, PATH_MAX - 1);
  if (n < 0) return false;
  out[n] = '\0';
  return true;
}

EXPORT bool hf3fs_is_hf3fs(int fd) {
  char path[PATH_MAX], mount[PATH_MAX];
  return fd_path(fd, path) && find_mount(path, mount);
}

/* ---- Iov: shared memory in /dev/shm, announced under <mount>/3fs-virt/iovs. ---- */

struct iov_handle {
  char shm_path[128];
  char link_path[PATH_MAX + 128];
  bool wrapped;
};

static void hex_id(const char id[16], char out[33]) {
  for (int i = 0; i < 16; ++i) sprintf(out + 2 * i, "%02x", (unsigned char)id[i]);
}

static int random_id(char id[16]) {
  int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -errno;
  ssize_t n = read(fd, id, 16);
  close(fd);
  return n == 16 ? 0 : -EIO;
}

static int map_iov(struct hf3fs_iov *iov, const char *mount, const char id[16], size_t size,
                   size_t block_size, int numa, bool create) {
  char real_mount[PATH_MAX], hex[33];
  if (iov == NULL || size == 0) return -EINVAL;
  if (!find_mount(mount, real_mount) || strlen(mount) >= sizeof(iov->mount_point)) return -EINVAL;
  struct iov_handle *h = calloc(1, sizeof(*h));
  if (h == NULL) return -ENOMEM;
  hex_id(id, hex);
  snprintf(h->shm_path, sizeof(h->shm_path), "/dev/shm/hf3fs-iov-%s", hex);
  int fd = open(h->shm_path, O_RDWR | O_CLOEXEC | (create ? O_CREAT | O_EXCL : 0), 0600);
  if (fd < 0) { int e = errno; free(h); return -e; }
  if (create && ftruncate(fd, (off_t)size) != 0) {
    int e = errno; close(fd); unlink(h->shm_path); free(h); return -e;
  }
  void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (base == MAP_FAILED) {
    int e = errno; if (create) unlink(h->shm_path); free(h); return -e;
  }
  if (create) {
    char dir[PATH_MAX + 32];
    snprintf(dir, sizeof(dir), "%s/3fs-virt/iovs", real_mount);
    mkdir(dir, 0755);
    if (block_size) {
      snprintf(h->link_path, sizeof(h->link_path), "%s/%s.b%zu", dir, hex, block_size);
    } else {
      snprintf(h->link_path, sizeof(h->link_path), "%s/%s", dir, hex);
    }
    if (symlink(h->shm_path, h->link_path) != 0) {
      int e = errno; munmap(base, size); unlink(h->shm_path); free(h); return -e;
    }
  }
  iov->base = base;
  iov->iovh = h;
  memcpy(iov->id, id, 16);
  snprintf(iov->mount_point, sizeof(iov->mount_point), "%s", mount);
  iov->size = size;
  iov->block_size = block_size;
  iov->numa = numa;
  pthread_mutex_lock(&g_lock);
  ++g_iovs;
  pthread_mutex_unlock(&g_lock);
  return 0;
}

EXPORT int hf3fs_iovcreate(struct hf3fs_iov *iov, const char *hf3fs_mount_point, size_t size,
                           size_t block_size, int numa) {
  char id[16];
  int rc = random_id(id);
  return rc ? rc : map_iov(iov, hf3fs_mount_point, id, size, block_size, numa, true);
}

EXPORT int hf3fs_iovopen(struct hf3fs_iov *iov, const uint8_t id[16],
                         const char *hf3fs_mount_point, size_t size, size_t block_size,
                         int numa) {
  return map_iov(iov, hf3fs_mount_point, (const char *)id, size, block_size, numa, false);
}

EXPORT int hf3fs_iovwrap(struct hf3fs_iov *iov, void *base, const uint8_t id[16],
                         const char *hf3fs_mount_point, size_t size, size_t block_size,
                         int numa) {
  char real_mount[PATH_MAX];
  if (iov == NULL || base == NULL || !find_mount(hf3fs_mount_point, real_mount)) return -EINVAL;
  struct iov_handle *h = calloc(1, sizeof(*h));
  if (h == NULL) return -ENOMEM;
  h->wrapped = true;
  iov->base = base;
  iov->iovh = h;
  memcpy(iov->id, id, 16);
  snprintf(iov->mount_point, sizeof(iov->mount_point), "%s", hf3fs_mount_point);
  iov->size = size;
  iov->block_size = block_size;
  iov->numa = numa;
  return 0;
}

EXPORT void hf3fs_iovunlink(struct hf3fs_iov *iov) {
  struct iov_handle *h = iov ? iov->iovh : NULL;
  if (h == NULL || h->wrapped) return;
  if (h->link_path[0]) unlink(h->link_path);
  unlink(h->shm_path);
  h->link_path[0] = '\0';
}

EXPORT void hf3fs_iovdestroy(struct hf3fs_iov *iov) {
  struct iov_handle *h = iov ? iov->iovh : NULL;
  if (h == NULL || h->wrapped) return;
  hf3fs_iovunlink(iov);
  munmap(iov->base, iov->size);
  free(h);
  iov->iovh = NULL;
  iov->base = NULL;
  pthread_mutex_lock(&g_lock);
  --g_iovs;
  pthread_mutex_unlock(&g_lock);
}

/* ---- Registered fds. ---- */

#define MAX_REG 4096
static pthread_mutex_t g_reg_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_reg_fd[MAX_REG];
static int g_reg_dup[MAX_REG];
static int g_reg_n = 0;

EXPORT int hf3fs_reg_fd(int fd, uint64_t flags) {
  (void)flags;
  if (fd < 0 || fcntl(fd, F_GETFL) < 0 || !hf3fs_is_hf3fs(fd)) return EBADF;
  pthread_mutex_lock(&g_reg_lock);
  for (int i = 0; i < g_reg_n; ++i) {
    if (g_reg_fd[i] == fd) { pthread_mutex_unlock(&g_reg_lock); return EINVAL; }
  }
  if (g_reg_n == MAX_REG) { pthread_mutex_unlock(&g_reg_lock); return EMFILE; }
  int dup_fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (dup_fd < 0) { int e = errno; pthread_mutex_unlock(&g_reg_lock); return e; }
  g_reg_fd[g_reg_n] = fd;
  g_reg_dup[g_reg_n] = dup_fd;
  ++g_reg_n;
  pthread_mutex_unlock(&g_reg_lock);
  return -dup_fd;
}

EXPORT void hf3fs_dereg_fd(int fd) {
  pthread_mutex_lock(&g_reg_lock);
  for (int i = 0; i < g_reg_n; ++i) {
    if (g_reg_fd[i] == fd || -g_reg_dup[i] == fd) {
      close(g_reg_dup[i]);
      --g_reg_n;
      g_reg_fd[i] = g_reg_fd[g_reg_n];
      g_reg_dup[i] = g_reg_dup[g_reg_n];
      break;
    }
  }
  pthread_mutex_unlock(&g_reg_lock);
}

/* The dup behind a registered fd (or the negated dup reg_fd returned); -1 if none. */
static int registered_dup(int fd) {
  int found = -1;
  pthread_mutex_lock(&g_reg_lock);
  for (int i = 0; i < g_reg_n; ++i) {
    if (g_reg_fd[i] == fd || (fd <= 0 && -g_reg_dup[i] == fd)) { found = g_reg_dup[i]; break; }
  }
  pthread_mutex_unlock(&g_reg_lock);
  return found;
}

/* ---- Ior: a ring of slots served by one worker thread. ---- */

enum { SLOT_FREE = 0, SLOT_PREPPED, SLOT_QUEUED, SLOT_HUNG, SLOT_DONE };

struct slot {
  int state;
  uint8_t *ptr;
  int fd;  /* the dup */
  size_t off;
  uint64_t len;
  const void *userdata;
  int64_t result;
  long order;  /* completion order */
};

struct ring {
  int entries;
  bool for_read;
  int io_depth;
  struct slot *slots;
  int prepped;      /* SLOT_PREPPED count, not yet handed to the worker */
  int queued;       /* SLOT_QUEUED count */
  int done;         /* SLOT_DONE count */
  long next_order;
  bool kicked, stop;
  pthread_mutex_t mu;
  pthread_cond_t work, completed;
  pthread_t worker;
  void *shm;        /* the ring's own memory (ior->iov) */
  size_t shm_size;
};

EXPORT size_t hf3fs_ior_size(int entries) {
  return 4096 + (size_t)(entries > 0 ? entries : 0) * 64;
}

static int64_t run_io(bool read, struct slot *s, int fault) {
  if (fault == FAULT_EIO) return -EIO;
  uint64_t want = s->len;
  if (fault == FAULT_SHORT) want = s->len / 2;
  uint64_t done = 0;
  while (done < want) {
    ssize_t n = read ? pread(s->fd, s->ptr + done, want - done, (off_t)(s->off + done))
                     : pwrite(s->fd, s->ptr + done, want - done, (off_t)(s->off + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      return -errno;
    }
    if (n == 0) break;  /* EOF on read */
    done += (uint64_t)n;
  }
  pthread_mutex_lock(&g_lock);
  ++g_ios;
  g_bytes += (long)done;
  pthread_mutex_unlock(&g_lock);
  return (int64_t)done;
}

static void *worker_main(void *arg) {
  struct ring *r = arg;
  pthread_mutex_lock(&r->mu);
  for (;;) {
    /* The daemon polls rings and also wakes on submit: take prepped I/Os either way. */
    while (!r->stop && r->prepped == 0 && r->queued == 0) {
      struct timespec t;
      clock_gettime(CLOCK_REALTIME, &t);
      t.tv_nsec += 5 * 1000 * 1000;
      if (t.tv_nsec >= 1000000000L) { t.tv_sec += 1; t.tv_nsec -= 1000000000L; }
      pthread_cond_timedwait(&r->work, &r->mu, &t);
    }
    if (r->stop) break;
    /* Move prepped slots to the queue (batching by io_depth). */
    for (int i = 0; i < r->entries; ++i) {
      if (r->slots[i].state == SLOT_PREPPED) {
        r->slots[i].state = SLOT_QUEUED;
        --r->prepped;
        ++r->queued;
      }
    }
    int batch = r->queued;
    if (r->io_depth > 0) {
      if (r->queued < r->io_depth) {  /* exact batches only: wait for more */
        pthread_cond_wait(&r->work, &r->mu);
        continue;
      }
      batch = r->io_depth;
    } else if (r->io_depth < 0 && batch > -r->io_depth) {
      batch = -r->io_depth;
    }
    int taken[batch > 0 ? batch : 1];
    int n = 0;
    for (int i = 0; i < r->entries && n < batch; ++i) {
      if (r->slots[i].state == SLOT_QUEUED) taken[n++] = i;
    }
    pthread_mutex_unlock(&r->mu);
    for (int k = 0; k < n; ++k) {
      struct slot *s = &r->slots[taken[k]];
      int fault = take_fault(r->for_read);
      /* A hung I/O never completes; its slot stays taken until the ring is destroyed. */
      int64_t result = fault == FAULT_HANG ? 0 : run_io(r->for_read, s, fault);
      pthread_mutex_lock(&r->mu);
      --r->queued;
      if (fault == FAULT_HANG) {
        s->state = SLOT_HUNG;
      } else {
        s->state = SLOT_DONE;
        s->result = result;
        s->order = r->next_order++;
        ++r->done;
      }
      pthread_cond_broadcast(&r->completed);
      pthread_mutex_unlock(&r->mu);
    }
    pthread_mutex_lock(&r->mu);
  }
  pthread_mutex_unlock(&r->mu);
  return NULL;
}

EXPORT int hf3fs_iorcreate4(struct hf3fs_ior *ior, const char *hf3fs_mount_point, int entries,
                            bool for_read, int io_depth, int timeout, int numa, uint64_t flags) {
  char real_mount[PATH_MAX];
  if (ior == NULL || entries <= 0 || !find_mount(hf3fs_mount_point, real_mount) ||
      strlen(hf3fs_mount_point) >= sizeof(ior->mount_point)) {
    return -EINVAL;
  }
  struct ring *r = calloc(1, sizeof(*r));
  if (r == NULL) return -ENOMEM;
  r->slots = calloc((size_t)entries, sizeof(struct slot));
  r->shm_size = hf3fs_ior_size(entries);
  r->shm = calloc(1, r->shm_size);
  if (r->slots == NULL || r->shm == NULL) {
    free(r->slots); free(r->shm); free(r); return -ENOMEM;
  }
  r->entries = entries;
  r->for_read = for_read;
  r->io_depth = io_depth;
  pthread_mutex_init(&r->mu, NULL);
  pthread_cond_init(&r->work, NULL);
  pthread_cond_init(&r->completed, NULL);
  if (pthread_create(&r->worker, NULL, worker_main, r) != 0) {
    free(r->slots); free(r->shm); free(r); return -EAGAIN;
  }
  memset(ior, 0, sizeof(*ior));
  ior->iov.base = r->shm;
  ior->iov.size = r->shm_size;
  ior->iov.numa = numa;
  snprintf(ior->iov.mount_point, sizeof(ior->iov.mount_point), "%s", hf3fs_mount_point);
  ior->iorh = r;
  snprintf(ior->mount_point, sizeof(ior->mount_point), "%s", hf3fs_mount_point);
  ior->for_read = for_read;
  ior->io_depth = io_depth;
  ior->timeout = timeout;
  ior->flags = flags;
  pthread_mutex_lock(&g_lock);
  ++g_iors;
  pthread_mutex_unlock(&g_lock);
  return 0;
}

EXPORT int hf3fs_iorcreate3(struct hf3fs_ior *ior, const char *hf3fs_mount_point, int entries,
                            bool for_read, int io_depth, int priority, int timeout, int numa) {
  int rc = hf3fs_iorcreate4(ior, hf3fs_mount_point, entries, for_read, io_depth, timeout, numa, 0);
  if (rc == 0) ior->priority = priority;
  return rc;
}

EXPORT int hf3fs_iorcreate2(struct hf3fs_ior *ior, const char *hf3fs_mount_point, int entries,
                            bool for_read, int io_depth, int priority, int numa) {
  return hf3fs_iorcreate3(ior, hf3fs_mount_point, entries, for_read, io_depth, priority, 0, numa);
}

EXPORT int hf3fs_iorcreate(struct hf3fs_ior *ior, const char *hf3fs_mount_point, int entries,
                           bool for_read, int io_depth, int numa) {
  return hf3fs_iorcreate3(ior, hf3fs_mount_point, entries, for_read, io_depth, 0, 0, numa);
}

EXPORT void hf3fs_iordestroy(struct hf3fs_ior *ior) {
  struct ring *r = ior ? ior->iorh : NULL;
  if (r == NULL) return;
  pthread_mutex_lock(&r->mu);
  r->stop = true;
  pthread_cond_broadcast(&r->work);
  pthread_cond_broadcast(&r->completed);
  pthread_mutex_unlock(&r->mu);
  pthread_join(r->worker, NULL);
  pthread_mutex_destroy(&r->mu);
  pthread_cond_destroy(&r->work);
  pthread_cond_destroy(&r->completed);
  free(r->slots);
  free(r->shm);
  free(r);
  ior->iorh = NULL;
  pthread_mutex_lock(&g_lock);
  --g_iors;
  pthread_mutex_unlock(&g_lock);
}

EXPORT int hf3fs_io_entries(const struct hf3fs_ior *ior) {
  const struct ring *r = ior ? ior->iorh : NULL;
  return r ? r->entries : -EINVAL;
}

EXPORT int hf3fs_prep_io(const struct hf3fs_ior *ior, const struct hf3fs_iov *iov, bool read,
                         void *ptr, int fd, size_t off, uint64_t len, const void *userdata) {
  struct ring *r = ior ? ior->iorh : NULL;
  if (r == NULL || iov == NULL || iov->base == NULL) return -EINVAL;
  if (read != r->for_read) return -EINVAL;
  uint8_t *p = ptr;
  if (p < iov->base || len > iov->size || p + len > iov->base + iov->size) return -EINVAL;
  if (iov->block_size) {
    size_t first = (size_t)(p - iov->base) / iov->block_size;
    size_t last = len ? (size_t)(p + len - 1 - iov->base) / iov->block_size : first;
    if (first != last) return -EINVAL;
  }
  int dup_fd = registered_dup(fd);
  if (dup_fd < 0) return -EBADF;
  int mode = fcntl(dup_fd, F_GETFL);
  if (mode < 0) return -EBADF;
  mode &= O_ACCMODE;
  if ((read && mode == O_WRONLY) || (!read && mode == O_RDONLY)) return -EACCES;
  pthread_mutex_lock(&r->mu);
  int index = -1;
  for (int i = 0; i < r->entries; ++i) {
    if (r->slots[i].state == SLOT_FREE) { index = i; break; }
  }
  if (index < 0) { pthread_mutex_unlock(&r->mu); return -EAGAIN; }
  struct slot *s = &r->slots[index];
  s->state = SLOT_PREPPED;
  s->ptr = p;
  s->fd = dup_fd;
  s->off = off;
  s->len = len;
  s->userdata = userdata;
  s->result = 0;
  ++r->prepped;
  pthread_mutex_unlock(&r->mu);
  return index;
}

EXPORT int hf3fs_submit_ios(const struct hf3fs_ior *ior) {
  struct ring *r = ior ? ior->iorh : NULL;
  if (r == NULL) return -EINVAL;
  pthread_mutex_lock(&r->mu);
  pthread_cond_broadcast(&r->work);
  pthread_mutex_unlock(&r->mu);
  return 0;
}

EXPORT int hf3fs_wait_for_ios(const struct hf3fs_ior *ior, struct hf3fs_cqe *cqes, int cqec,
                              int min_results, const struct timespec *abs_timeout) {
  struct ring *r = ior ? ior->iorh : NULL;
  if (r == NULL || cqes == NULL || cqec <= 0 || min_results > cqec) return -EINVAL;
  pthread_mutex_lock(&r->mu);
  bool timed_out = false;
  while (!r->stop && r->done < min_results && !timed_out) {
    if (abs_timeout) {
      timed_out = pthread_cond_timedwait(&r->completed, &r->mu, abs_timeout) == ETIMEDOUT;
    } else {
      pthread_cond_wait(&r->completed, &r->mu);
    }
  }
  pthread_mutex_lock(&g_lock);
  int cap = g_wait_cap;
  pthread_mutex_unlock(&g_lock);
  int n = r->done;
  if (n > cqec) n = cqec;
  if (n > cap && cap >= min_results) n = cap;  /* fewer than ready: callers loop */
  int got = 0;
  while (got < n) {  /* oldest completions first */
    int best = -1;
    for (int i = 0; i < r->entries; ++i) {
      if (r->slots[i].state == SLOT_DONE && (best < 0 || r->slots[i].order < r->slots[best].order)) {
        best = i;
      }
    }
    struct slot *s = &r->slots[best];
    cqes[got].index = best;
    cqes[got].reserved = 0;
    cqes[got].result = s->result;
    cqes[got].userdata = s->userdata;
    s->state = SLOT_FREE;
    --r->done;
    ++got;
  }
  pthread_mutex_unlock(&r->mu);
  if (got == 0 && timed_out) return -ETIMEDOUT;
  return got;
}
