/*
 * Device files on an in-process FUSE mount: the fast local attach.
 *
 * Design
 *  - One mount per pool daemon: a flat directory (inode 1) of regular files,
 *    one per attached device.  The libfuse3 low-level API; its multi-threaded
 *    loop runs in a thread created here, so no request ever needs the
 *    caller's interpreter (the Python side calls in through cffi, which
 *    drops the GIL).
 *  - Requests go straight to the engine's public API (api.h): FUSE_READ ->
 *    cb_dev_read, FUSE_WRITE -> cb_dev_write, FSYNC -> cb_pool_commit (the
 *    durability point, as NBD FLUSH; FUSE_FLUSH comes on every close and is
 *    not one), fallocate PUNCH_HOLE and ZERO_RANGE -> cb_dev_write_zeroes
 *    (a punched range must read as zeroes, which discard does not promise
 *    for partly covered blocks).  This file knows nothing of mappings.
 *  - The file table (files[], each file malloc()ed on its own so its address
 *    is stable) is protected by `lock`; it holds each file's flags and open
 *    counts.  An open file's struct is the request's fh, read without the
 *    lock on the I/O path: a file cannot be removed while it is open, and
 *    its dev_id and size only change under the lock between requests
 *    that see either value (size is read once per request).
 *  - The open rule, enforced in op_open under the lock: read-only devices
 *    refuse opens for writing (EROFS); a DENY_RW file (its device exported
 *    read-write elsewhere) refuses them with EBUSY; unless SHARED, a second
 *    read-write open gets EBUSY.  Read-only opens are unlimited.
 *  - Inode numbers are never reused: a name removed and added again is a new
 *    inode, so the kernel's stale entry can never reach the new device.
 *  - Worker threads are IO_FLUSHERs (PR_SET_IO_FLUSHER, set on the loop
 *    thread and inherited by the workers libfuse creates from it): a loop
 *    device over these files needs them to make progress under memory
 *    reclaim, else reclaim can wait on writeback that waits on them.
 *  - A killed process closes /dev/fuse, which makes the kernel abort the
 *    connection: nothing waits for a reply that cannot come.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>

#include "../cowblock.h"
#include "fuse.h"

#ifndef COWBLOCK_HAVE_FUSE

int cb_fuse_available(void) { return 0; }
#define UNAVAILABLE cb_err(CB_E_INVALID, "cowblock was built without libfuse3 (install libfuse3-dev " \
                           "and pkg-config, then reinstall cowblock)")
int cb_fuse_start(cb_pool *p, const char *mp, const cb_fuse_config *c, cb_fuse **out)
{
    *out = NULL;
    return UNAVAILABLE;
}
int cb_fuse_stop(cb_fuse *f, int force) { return UNAVAILABLE; }
int cb_fuse_add(cb_fuse *f, const char *n, uint32_t id, uint32_t fl) { return UNAVAILABLE; }
int cb_fuse_remove(cb_fuse *f, const char *n) { return UNAVAILABLE; }
int cb_fuse_set_flags(cb_fuse *f, const char *n, uint32_t fl) { return UNAVAILABLE; }
int cb_fuse_opens(cb_fuse *f, const char *n, uint32_t *rw, uint32_t *ro) { return UNAVAILABLE; }
int cb_fuse_changed(cb_fuse *f, const char *n) { return UNAVAILABLE; }
int cb_fuse_stats_get(cb_fuse *f, cb_fuse_stats *out) { return UNAVAILABLE; }

#else

#define FUSE_USE_VERSION 312
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/fs.h>
#include <linux/fuse.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#define PR_GET_IO_FLUSHER 58
#endif
#ifndef FOPEN_PARALLEL_DIRECT_WRITES
#define FOPEN_PARALLEL_DIRECT_WRITES (1 << 6)
#endif
#define ROOT_INO FUSE_ROOT_ID
#define NAME_MAX_LEN 255

struct file {
    char name[NAME_MAX_LEN + 1];
    uint64_t ino;
    uint32_t dev_id;
    uint32_t flags;            /* CB_FUSE_* */
    uint64_t size;
    struct timespec changed;   /* mtime and ctime: when added or last changed */
    uint32_t open_rw, open_ro;
};

struct cb_fuse {
    cb_pool *p;
    cb_fuse_config cfg;
    struct fuse_session *se;
    char *mountpoint;
    dev_t dev;                     /* the mount's st_dev: the connection to abort */
    pthread_t loop;
    bool loop_started;
    int loop_result;

    pthread_mutex_t lock;          /* protects everything below */
    pthread_cond_t cond;           /* init done, or the loop ended */
    bool init_done, loop_done;
    struct file **files;
    size_t nr_files, cap_files;
    uint64_t next_ino;
    struct timespec started;
    cb_fuse_stats st;
    uint32_t block_size;
};

/* ---- libfuse's messages: kept for the caller, never printed ---- */

static __thread char fuse_msg[256];

static void capture_log(enum fuse_log_level level, const char *fmt, va_list ap)
{
    if (level <= FUSE_LOG_ERR) {
        vsnprintf(fuse_msg, sizeof fuse_msg, fmt, ap);
        size_t n = strlen(fuse_msg);
        while (n && fuse_msg[n - 1] == '\n')
            fuse_msg[--n] = 0;
    }
}

/* ---- the file table (lock held) ---- */

static struct file *by_name(cb_fuse *f, const char *name)
{
    for (size_t i = 0; i < f->nr_files; i++)
        if (strcmp(f->files[i]->name, name) == 0)
            return f->files[i];
    return NULL;
}

static struct file *by_ino(cb_fuse *f, uint64_t ino)
{
    for (size_t i = 0; i < f->nr_files; i++)
        if (f->files[i]->ino == ino)
            return f->files[i];
    return NULL;
}

static void fill_stat(cb_fuse *f, const struct file *fl, struct stat *st)
{
    memset(st, 0, sizeof *st);
    st->st_uid = f->cfg.uid;
    st->st_gid = f->cfg.gid;
    st->st_blksize = f->block_size;
    if (!fl) {
        st->st_ino = ROOT_INO;
        st->st_mode = S_IFDIR | 0700;
        st->st_nlink = 2;
        st->st_mtim = st->st_ctim = st->st_atim = f->started;
        return;
    }
    st->st_ino = fl->ino;
    st->st_mode = S_IFREG | ((fl->flags & CB_FUSE_READ_ONLY) ? 0400 : 0600);
    st->st_nlink = 1;
    st->st_size = (off_t)fl->size;
    st->st_blocks = (blkcnt_t)((fl->size + 511) / 512);
    st->st_mtim = st->st_ctim = st->st_atim = fl->changed;
}

/* ---- per-request bookkeeping ---- */

static __thread bool thread_seen;

static void note_request(cb_fuse *f)
{
    if (!thread_seen) {
        thread_seen = true;
        bool flusher = prctl(PR_GET_IO_FLUSHER, 0, 0, 0, 0) == 1;
        pthread_mutex_lock(&f->lock);
        f->st.threads++;
        if (!flusher)
            f->st.threads_not_flusher++;
        pthread_mutex_unlock(&f->lock);
    }
    __atomic_fetch_add(&f->st.requests, 1, __ATOMIC_RELAXED);
}

/* Engine errors to what the writer sees: the engine's own errno for the
 * ones a file can return (ENOSPC, EROFS, EIO, ENOMEM), EIO for the rest
 * (corrupt metadata, anything unexpected): a device that cannot serve a
 * request failed it, as a disk would. */
static int file_errno(int r)
{
    switch (-r) {
    case ENOSPC: case EROFS: case ENOMEM: case EINVAL: return -r;
    default: return EIO;
    }
}

static void reply_err(cb_fuse *f, fuse_req_t req, int err)
{
    if (err)
        __atomic_fetch_add(&f->st.errors, 1, __ATOMIC_RELAXED);
    fuse_reply_err(req, err);
}

static bool space_wait(cb_fuse *f, int r, int attempt)
{
    return cb_space_retry(r, attempt, f->cfg.space_wait, f->cfg.space_ctx, f->cfg.on_full_wait_ms);
}

/* ---- the directory ---- */

static void op_init(void *userdata, struct fuse_conn_info *conn)
{
    cb_fuse *f = userdata;
    conn->max_write = f->cfg.max_write;
    if (f->cfg.max_readahead)
        conn->max_readahead = f->cfg.max_readahead;
    conn->max_background = f->cfg.max_background;
    conn->congestion_threshold = f->cfg.max_background * 3 / 4;
    /* The daemon invalidates explicitly (cb_fuse_changed): no invalidation
     * from attribute changes seen on getattr. */
    conn->want &= ~(unsigned)FUSE_CAP_AUTO_INVAL_DATA;
    if (conn->capable & FUSE_CAP_ASYNC_DIO)
        conn->want |= FUSE_CAP_ASYNC_DIO;
    if (f->cfg.writeback_cache && (conn->capable & FUSE_CAP_WRITEBACK_CACHE))
        conn->want |= FUSE_CAP_WRITEBACK_CACHE;
    else
        conn->want &= ~(unsigned)FUSE_CAP_WRITEBACK_CACHE;
    pthread_mutex_lock(&f->lock);
    f->st.writeback_cache = !!(conn->want & FUSE_CAP_WRITEBACK_CACHE);
    f->st.max_write = conn->max_write;
    f->st.proto_minor = conn->proto_minor;
    f->init_done = true;
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->lock);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    cb_fuse *f = fuse_req_userdata(req);
    note_request(f);
    struct fuse_entry_param e = {0};
    pthread_mutex_lock(&f->lock);
    struct file *fl = parent == ROOT_INO ? by_name(f, name) : NULL;
    if (fl) {
        e.ino = fl->ino;
        e.attr_timeout = e.entry_timeout = f->cfg.timeout;
        fill_stat(f, fl, &e.attr);
    }
    pthread_mutex_unlock(&f->lock);
    if (!fl)
        reply_err(f, req, parent == ROOT_INO ? ENOENT : ENOTDIR);
    else
        fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    cb_fuse *f = fuse_req_userdata(req);
    note_request(f);
    struct stat st;
    pthread_mutex_lock(&f->lock);
    struct file *fl = ino == ROOT_INO ? NULL : by_ino(f, ino);
    bool found = ino == ROOT_INO || fl;
    if (found)
        fill_stat(f, fl, &st);
    pthread_mutex_unlock(&f->lock);
    if (!found)
        reply_err(f, req, ENOENT);
    else
        fuse_reply_attr(req, &st, f->cfg.timeout);
}

/* A device file's size is its device's; times may be set (touch) and
 * are ignored; anything else is refused. */
static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    cb_fuse *f = fuse_req_userdata(req);
    note_request(f);
    const int times = FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW |
                      FUSE_SET_ATTR_MTIME_NOW | FUSE_SET_ATTR_CTIME;
    struct stat st;
    int err = 0;
    pthread_mutex_lock(&f->lock);
    struct file *fl = ino == ROOT_INO ? NULL : by_ino(f, ino);
    if (ino != ROOT_INO && !fl)
        err = ENOENT;
    else if ((to_set & ~(times | FUSE_SET_ATTR_SIZE)) ||
             ((to_set & FUSE_SET_ATTR_SIZE) && (!fl || (uint64_t)attr->st_size != fl->size)))
        err = EPERM;
    else
        fill_stat(f, fl, &st);
    pthread_mutex_unlock(&f->lock);
    if (err)
        reply_err(f, req, err);
    else
        fuse_reply_attr(req, &st, f->cfg.timeout);
}

static void op_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    cb_fuse *f = fuse_req_userdata(req);
    note_request(f);
    if (ino != ROOT_INO) {
        reply_err(f, req, ENOTDIR);
        return;
    }
    char *buf = malloc(size ? size : 1);
    if (!buf) {
        reply_err(f, req, ENOMEM);
        return;
    }
    /* Entry i (0 ".", 1 "..", then the files) has offset i + 1. */
    size_t used = 0;
    pthread_mutex_lock(&f->lock);
    for (size_t i = (size_t)off; i < f->nr_files + 2; i++) {
        struct stat st = {0};
        const char *name = i == 0 ? "." : i == 1 ? ".." : f->files[i - 2]->name;
        st.st_ino = i < 2 ? ROOT_INO : f->files[i - 2]->ino;
        st.st_mode = i < 2 ? S_IFDIR : S_IFREG;
        size_t n = fuse_add_direntry(req, buf + used, size - used, name, &st, (off_t)(i + 1));
        if (n > size - used)
            break;
        used += n;
    }
    pthread_mutex_unlock(&f->lock);
    fuse_reply_buf(req, buf, used);
    free(buf);
}

static void op_statfs(fuse_req_t req, fuse_ino_t ino)
{
    cb_fuse *f = fuse_req_userdata(req);
    note_request(f);
    cb_stats s;
    struct statvfs v = {0};
    if (cb_pool_stats(f->p, &s) == 0) {
        v.f_bsize = v.f_frsize = s.data_block_size;
        v.f_blocks = s.nr_data_blocks;
        v.f_bfree = v.f_bavail = s.data_free;
    }
    pthread_mutex_lock(&f->lock);
    v.f_files = f->nr_files + 1;
    pthread_mutex_unlock(&f->lock);
    v.f_namemax = NAME_MAX_LEN;
    fuse_reply_statfs(req, &v);
}

/* Names are the daemon's to make and remove. */
static void op_mknod(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode, dev_t rdev)
{
    reply_err(fuse_req_userdata(req), req, EPERM);
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi)
{
    reply_err(fuse_req_userdata(req), req, EPERM);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    reply_err(fuse_req_userdata(req), req, EPERM);
}

/* ---- open and release: the open rule ---- */

static bool opens_for_write(int flags)
{
    return (flags & O_ACCMODE) != O_RDONLY;
}

/* fuse_reply_open of libfuse 3.14 knows no FOPEN_PARALLEL_DIRECT_WRITES:
 * the reply is the kernel's fuse_open_out, sent whole. */
static void reply_open(cb_fuse *f, fuse_req_t req, struct file *fl)
{
    struct fuse_open_out out = {.fh = (uint64_t)(uintptr_t)fl};
    if (f->cfg.direct_io)
        out.open_flags |= FOPEN_DIRECT_IO;
    if (f->cfg.direct_io && f->cfg.parallel_direct_writes)
        out.open_flags |= FOPEN_PARALLEL_DIRECT_WRITES;
    if (f->cfg.keep_cache)
        out.open_flags |= FOPEN_KEEP_CACHE;
    out.open_flags |= FOPEN_NOFLUSH; /* nothing to do at close: FLUSH is no durability point */
    struct iovec iov = {&out, sizeof out};
    fuse_reply_iov(req, &iov, 1);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    cb_fuse *f = fuse_req_userdata(req);
    note_request(f);
    bool rw = opens_for_write(fi->flags);
    int err = 0;
    pthread_mutex_lock(&f->lock);
    struct file *fl = by_ino(f, ino);
    if (!fl)
        err = ino == ROOT_INO ? EISDIR : ENOENT;
    else if (rw && (fl->flags & CB_FUSE_READ_ONLY))
        err = EROFS;
    else if (rw && (fl->flags & CB_FUSE_DENY_RW))
        err = EBUSY;
    else if (rw && fl->open_rw && !(fl->flags & CB_FUSE_SHARED))
        err = EBUSY;
    else if (rw)
        fl->open_rw++;
    else
        fl->open_ro++;
    pthread_mutex_unlock(&f->lock);
    if (err) {
        reply_err(f, req, err);
        return;
    }
    reply_open(f, req, fl);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    cb_fuse *f = fuse_req_userdata(req);
    note_request(f);
    struct file *fl = (struct file *)(uintptr_t)fi->fh;
    pthread_mutex_lock(&f->lock);
    if (opens_for_write(fi->flags))
        fl->open_rw--;
    else
        fl->open_ro--;
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->lock);
    fuse_reply_err(req, 0);
}

/* ---- I/O ---- */

static pthread_key_t read_buf_key;
static pthread_once_t read_buf_once = PTHREAD_ONCE_INIT;
struct read_buf {
    size_t cap;
    char data[];
};

static void make_read_buf_key(void) { pthread_key_create(&read_buf_key, free); }

/* A buffer per worker thread, kept for its life: a fresh 1 MiB malloc per
 * read would be an mmap and page faults every time. */
static char *read_buffer(size_t size)
{
    pthread_once(&read_buf_once, make_read_buf_key);
    struct read_buf *b = pthread_getspecific(read_buf_key);
    if (!b || b->cap < size) {
        size_t cap = size < (128u << 10) ? (128u << 10) : size;
        struct read_buf *nb = malloc(sizeof *nb + cap);
        if (!nb)
            return NULL;
        nb->cap = cap;
        free(b);
        pthread_setspecific(read_buf_key, nb);
        b = nb;
    }
    return b->data;
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    cb_fuse *f = fuse_req_userdata(req);
    note_request(f);
    struct file *fl = (struct file *)(uintptr_t)fi->fh;
    uint64_t dev_size = __atomic_load_n(&fl->size, __ATOMIC_RELAXED);
    if (off < 0 || (uint64_t)off >= dev_size) {
        fuse_reply_buf(req, NULL, 0); /* at or past the end: a short read */
        return;
    }
    if (size > dev_size - (uint64_t)off)
        size = (size_t)(dev_size - (uint64_t)off);
    char *buf = read_buffer(size);
    if (!buf) {
        reply_err(f, req, ENOMEM);
        return;
    }
    int64_t n = cb_dev_read(f->p, fl->dev_id, buf, size, (uint64_t)off);
    if (n < 0) {
        reply_err(f, req, file_errno((int)n));
        return;
    }
    __atomic_fetch_add(&f->st.bytes_read, (uint64_t)n, __ATOMIC_RELAXED);
    fuse_reply_buf(req, buf, (size_t)n);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    cb_fuse *f = fuse_req_userdata(req);
    note_request(f);
    struct file *fl = (struct file *)(uintptr_t)fi->fh;
    uint64_t dev_size = __atomic_load_n(&fl->size, __ATOMIC_RELAXED);
    if (fl->flags & CB_FUSE_READ_ONLY) {
        reply_err(f, req, EROFS);
        return;
    }
    /* A device does not grow by writing past its end: no space there. */
    if (off < 0 || (uint64_t)off > dev_size || size > dev_size - (uint64_t)off) {
        reply_err(f, req, ENOSPC);
        return;
    }
    int64_t n;
    for (int attempt = 0;; attempt++) {
        n = cb_dev_write(f->p, fl->dev_id, buf, size, (uint64_t)off);
        if (!space_wait(f, (int)(n < 0 ? n : 0), attempt))
            break;
    }
    if (n < 0) {
        reply_err(f, req, file_errno((int)n));
        return;
    }
    __atomic_fetch_add(&f->st.bytes_written, size, __ATOMIC_RELAXED);
    fuse_reply_write(req, size);
}

/* FUSE_FLUSH comes at every close; with FOPEN_NOFLUSH the kernel mostly
 * spares it.  It is not a durability point: nothing to do. */
static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    note_request(fuse_req_userdata(req));
    fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    cb_fuse *f = fuse_req_userdata(req);
    note_request(f);
    int r = cb_pool_commit(f->p);
    reply_err(f, req, r < 0 ? file_errno(r) : 0);
}

/* Punching a hole and zeroing a range both make the range read as zeroes
 * and unmap the whole blocks inside it.  ZERO_RANGE's promise to keep the
 * space allocated means little on a thin device, where an overwrite of a
 * shared block allocates anyway, and keeping it costs: zeroing 256 MiB of
 * mapped 64 KiB blocks took 44 ms and kept 256 MiB in use with may_unmap 0,
 * 3.8 ms and freed it with 1 (median of 3; a loop device sends ZERO_RANGE
 * for REQ_NOUNMAP zeroing: mkfs, ext4's inode table initialisation).
 * Plain allocation (mode 0) gets EOPNOTSUPP, as from a block device (glibc's
 * posix_fallocate then writes a zero byte into each hole block itself). */
static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                         struct fuse_file_info *fi)
{
    cb_fuse *f = fuse_req_userdata(req);
    note_request(f);
    struct file *fl = (struct file *)(uintptr_t)fi->fh;
    uint64_t dev_size = __atomic_load_n(&fl->size, __ATOMIC_RELAXED);
    int zero = mode & ~FALLOC_FL_KEEP_SIZE;
    if (zero != FALLOC_FL_PUNCH_HOLE && zero != FALLOC_FL_ZERO_RANGE) {
        reply_err(f, req, EOPNOTSUPP);
        return;
    }
    if (zero == FALLOC_FL_PUNCH_HOLE && !(mode & FALLOC_FL_KEEP_SIZE)) {
        reply_err(f, req, EOPNOTSUPP); /* as every filesystem answers */
        return;
    }
    if (fl->flags & CB_FUSE_READ_ONLY) {
        reply_err(f, req, EROFS);
        return;
    }
    if (off < 0 || len <= 0) {
        reply_err(f, req, EINVAL);
        return;
    }
    uint64_t end = (uint64_t)off + (uint64_t)len;
    if (end > dev_size) {
        if (!(mode & FALLOC_FL_KEEP_SIZE)) { /* would grow the file */
            reply_err(f, req, EFBIG);
            return;
        }
        end = dev_size;
    }
    int r = 0;
    for (int attempt = 0; (uint64_t)off < end; attempt++) {
        r = cb_dev_write_zeroes(f->p, fl->dev_id, (uint64_t)off, end - (uint64_t)off, 1);
        if (!space_wait(f, r, attempt))
            break;
    }
    reply_err(f, req, r < 0 ? file_errno(r) : 0);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init,
    .lookup = op_lookup,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .readdir = op_readdir,
    .statfs = op_statfs,
    .mknod = op_mknod,
    .create = op_create,
    .unlink = op_unlink,
    .open = op_open,
    .release = op_release,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .fsync = op_fsync,
    .fallocate = op_fallocate,
};

/* ---- lifecycle ---- */

static void *loop_main(void *arg)
{
    cb_fuse *f = arg;
    /* Needs CAP_SYS_RESOURCE; without it the threads are counted in
     * threads_not_flusher and the caller can say so. */
    if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0) {
        pthread_mutex_lock(&f->lock);
        f->st.io_flusher_errno = errno;
        pthread_mutex_unlock(&f->lock);
    }
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    int r = -ENOMEM;
    if (cfg) {
        fuse_loop_cfg_set_max_threads(cfg, f->cfg.threads);
        fuse_loop_cfg_set_clone_fd(cfg, 1);
        r = fuse_session_loop_mt(f->se, cfg);
        fuse_loop_cfg_destroy(cfg);
    }
    pthread_mutex_lock(&f->lock);
    f->loop_result = r;
    f->loop_done = true;
    pthread_cond_broadcast(&f->cond);
    pthread_mutex_unlock(&f->lock);
    return NULL;
}

static int check_config(const cb_fuse_config *c)
{
    if (c->threads < 1 || c->threads > 256)
        return cb_err(CB_E_INVALID, "threads %u is not from 1 to 256", c->threads);
    if (c->max_write < 4096 || c->max_write > (1u << 20))
        return cb_err(CB_E_INVALID, "max_write %u is not from 4 KiB to 1 MiB", c->max_write);
    if (c->max_background < 1 || c->max_background > 65535)
        return cb_err(CB_E_INVALID, "max_background %u is not from 1 to 65535",
                      c->max_background);
    if (!(c->timeout >= 0 && c->timeout <= 86400))
        return cb_err(CB_E_INVALID, "timeout %g is not from 0 to 86400 seconds", c->timeout);
    return 0;
}

static void free_fuse(cb_fuse *f)
{
    for (size_t i = 0; i < f->nr_files; i++)
        free(f->files[i]);
    free(f->files);
    free(f->mountpoint);
    pthread_mutex_destroy(&f->lock);
    pthread_cond_destroy(&f->cond);
    free(f);
}

/* Wait for a condition on f (lock held) up to seconds; false on timeout. */
static bool wait_for(cb_fuse *f, bool *flag, int seconds)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += seconds;
    while (!*flag)
        if (pthread_cond_timedwait(&f->cond, &f->lock, &until) == ETIMEDOUT)
            return *flag;
    return true;
}

/* Opens of fl (of every file when NULL), lock held. */
static uint32_t open_count(cb_fuse *f, struct file *fl, uint32_t *rw, uint32_t *ro)
{
    *rw = *ro = 0;
    for (size_t i = 0; i < f->nr_files; i++) {
        if (!fl || f->files[i] == fl) {
            *rw += f->files[i]->open_rw;
            *ro += f->files[i]->open_ro;
        }
    }
    return *rw + *ro;
}

/* The kernel sends RELEASE after close(2) has returned: a caller that
 * closed the file and then removes it must not see it open.  Waits up to a
 * second for the opens of fl to end (lock held); returns those left. */
static uint32_t wait_released(cb_fuse *f, struct file *fl, uint32_t *rw, uint32_t *ro)
{
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += 1;
    while (open_count(f, fl, rw, ro))
        if (pthread_cond_timedwait(&f->cond, &f->lock, &until) == ETIMEDOUT)
            return open_count(f, fl, rw, ro);
    return 0;
}

int cb_fuse_available(void) { return 1; }

int cb_fuse_start(cb_pool *p, const char *mountpoint, const cb_fuse_config *cfg, cb_fuse **out)
{
    *out = NULL;
    int r = check_config(cfg);
    cb_stats s;
    if (r || (r = cb_pool_stats(p, &s)) < 0)
        return r;
    struct stat st;
    if (stat(mountpoint, &st) != 0 || !S_ISDIR(st.st_mode))
        return cb_err(CB_E_INVALID, "mount point %s is not a directory", mountpoint);
    cb_fuse *f = calloc(1, sizeof *f);
    if (!f || !(f->mountpoint = strdup(mountpoint))) {
        free(f);
        return cb_err(CB_E_NO_MEMORY, "out of memory");
    }
    f->p = p;
    f->cfg = *cfg;
    f->block_size = s.data_block_size;
    f->next_ino = ROOT_INO + 1;
    clock_gettime(CLOCK_REALTIME, &f->started);
    pthread_mutex_init(&f->lock, NULL);
    pthread_cond_init(&f->cond, NULL);

    fuse_set_log_func(capture_log);
    fuse_msg[0] = 0;
    char opts[160];
    snprintf(opts, sizeof opts, "-ofsname=cowblock,subtype=cowblock,default_permissions%s",
             cfg->allow_other ? ",allow_other" : "");
    char *argv[] = {"cowblock", opts, NULL};
    struct fuse_args args = FUSE_ARGS_INIT(2, argv);
    f->se = fuse_session_new(&args, &ops, sizeof ops, f);
    if (!f->se) {
        r = cb_err(CB_E_IO, "cannot set up a FUSE session: %s", fuse_msg);
        goto fail;
    }
    if (fuse_session_mount(f->se, mountpoint) != 0) {
        r = cb_err(CB_E_IO, "cannot mount FUSE on %s: %s", mountpoint,
                   fuse_msg[0] ? fuse_msg : "fuse_session_mount failed");
        goto fail_session;
    }
    if (pthread_create(&f->loop, NULL, loop_main, f) != 0) {
        r = cb_err(CB_E_IO, "cannot start the FUSE loop thread");
        goto fail_mount;
    }
    f->loop_started = true;
    /* The kernel sends INIT at mount time; until it is answered the mount
     * cannot be used and notifications fail. */
    pthread_mutex_lock(&f->lock);
    bool ready = wait_for(f, &f->init_done, 30);
    pthread_mutex_unlock(&f->lock);
    if (!ready) {
        r = cb_err(CB_E_IO, "cannot use the FUSE mount on %s: the kernel did not initialise it "
                   "in 30 s", mountpoint);
        goto fail_mount;
    }
    if (stat(mountpoint, &st) == 0)
        f->dev = st.st_dev;
    *out = f;
    return 0;

fail_mount:
    umount2(mountpoint, MNT_DETACH);
    if (f->loop_started)
        pthread_join(f->loop, NULL);
    fuse_session_unmount(f->se);
fail_session:
    fuse_session_destroy(f->se);
fail:
    free_fuse(f);
    return r;
}

/* Abort the connection (/sys/fs/fuse/connections/N/abort): every request
 * in flight and to come fails, so nothing holding a file waits on us.  The
 * fusectl filesystem is mounted there if no one did (systemd does). */
static void abort_connection(cb_fuse *f)
{
    char path[96];
    snprintf(path, sizeof path, "/sys/fs/fuse/connections/%u/abort", (unsigned)minor(f->dev));
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT &&
        mount("fusectl", "/sys/fs/fuse/connections", "fusectl", 0, NULL) == 0)
        fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd >= 0) {
        (void)!write(fd, "1", 1);
        close(fd);
    }
}

int cb_fuse_stop(cb_fuse *f, int force)
{
    uint32_t rw, ro;
    pthread_mutex_lock(&f->lock);
    uint32_t open = force ? open_count(f, NULL, &rw, &ro) : wait_released(f, NULL, &rw, &ro);
    pthread_mutex_unlock(&f->lock);
    if (open && !force)
        return cb_err(CB_E_BUSY, "device files on %s are open (%u read-write, %u read-only)",
                      f->mountpoint, rw, ro);
    /* Unmounting the last mount of the connection makes the kernel end it,
     * so the workers' reads of /dev/fuse fail and the loop returns. */
    if (umount2(f->mountpoint, force ? MNT_DETACH : 0) != 0) {
        int e = errno;
        if (e != EINVAL) /* EINVAL: not mounted any more (cleaned up by hand) */
            return cb_err(e == EBUSY ? CB_E_BUSY : CB_E_IO, "cannot unmount %s: %s",
                          f->mountpoint, strerror(e));
    }
    if (force)
        abort_connection(f);
    pthread_mutex_lock(&f->lock);
    bool done = wait_for(f, &f->loop_done, 30);
    pthread_mutex_unlock(&f->lock);
    if (!done) { /* something still holds the superblock (lazily unmounted) */
        abort_connection(f);
        pthread_mutex_lock(&f->lock);
        wait_for(f, &f->loop_done, 30);
        pthread_mutex_unlock(&f->lock);
    }
    pthread_join(f->loop, NULL);
    fuse_session_unmount(f->se);
    fuse_session_destroy(f->se);
    free_fuse(f);
    return 0;
}

static int check_name(const char *name)
{
    size_t n = strlen(name);
    if (n == 0 || n > NAME_MAX_LEN || strchr(name, '/') || !strcmp(name, ".") || !strcmp(name, ".."))
        return cb_err(CB_E_INVALID,
                      "%.300s is not a valid file name (1-255 bytes, no '/', not . or ..)", name);
    return 0;
}

int cb_fuse_add(cb_fuse *f, const char *name, uint32_t dev_id, uint32_t flags)
{
    int r = check_name(name);
    cb_devinfo info;
    if (r || (r = cb_dev_info(f->p, dev_id, &info)) < 0)
        return r;
    if (flags & ~(uint32_t)(CB_FUSE_READ_ONLY | CB_FUSE_SHARED | CB_FUSE_DENY_RW))
        return cb_err(CB_E_INVALID, "unknown file flags %#x", flags);
    struct file *fl = calloc(1, sizeof *fl);
    if (!fl)
        return cb_err(CB_E_NO_MEMORY, "out of memory");
    strcpy(fl->name, name);
    fl->dev_id = dev_id;
    fl->flags = flags;
    fl->size = info.size;
    clock_gettime(CLOCK_REALTIME, &fl->changed);
    pthread_mutex_lock(&f->lock);
    if (by_name(f, name)) {
        r = cb_err(CB_E_EXISTS, "a file named %s is already attached", name);
    } else if (f->nr_files == f->cap_files) {
        size_t cap = f->cap_files ? f->cap_files * 2 : 16;
        struct file **v = realloc(f->files, cap * sizeof *v);
        if (!v)
            r = cb_err(CB_E_NO_MEMORY, "out of memory");
        else {
            f->files = v;
            f->cap_files = cap;
        }
    }
    if (!r) {
        fl->ino = f->next_ino++;
        f->files[f->nr_files++] = fl;
        f->st.files = (uint32_t)f->nr_files;
    }
    pthread_mutex_unlock(&f->lock);
    if (r)
        free(fl);
    return r;
}

int cb_fuse_remove(cb_fuse *f, const char *name)
{
    pthread_mutex_lock(&f->lock);
    struct file *fl = by_name(f, name);
    int r = 0;
    uint32_t rw, ro;
    if (!fl)
        r = cb_err(CB_E_NOT_FOUND, "no file named %.300s is attached", name);
    else if (wait_released(f, fl, &rw, &ro))
        r = cb_err(CB_E_BUSY, "%s is open (%u read-write, %u read-only)", name, rw, ro);
    uint64_t ino = 0;
    if (!r) {
        ino = fl->ino;
        for (size_t i = 0; i < f->nr_files; i++)
            if (f->files[i] == fl)
                f->files[i] = f->files[--f->nr_files];
        f->st.files = (uint32_t)f->nr_files;
        free(fl);
    }
    pthread_mutex_unlock(&f->lock);
    /* Drop the kernel's entry now, not when its timeout runs out (outside
     * the lock: the kernel may call us back meanwhile). */
    if (!r)
        fuse_lowlevel_notify_delete(f->se, ROOT_INO, ino, name, strlen(name));
    return r;
}

int cb_fuse_set_flags(cb_fuse *f, const char *name, uint32_t flags)
{
    if (flags & ~(uint32_t)(CB_FUSE_READ_ONLY | CB_FUSE_SHARED | CB_FUSE_DENY_RW))
        return cb_err(CB_E_INVALID, "unknown file flags %#x", flags);
    pthread_mutex_lock(&f->lock);
    struct file *fl = by_name(f, name);
    int r = 0;
    if (!fl)
        r = cb_err(CB_E_NOT_FOUND, "no file named %.300s is attached", name);
    else if (fl->open_rw && (flags & (CB_FUSE_READ_ONLY | CB_FUSE_DENY_RW)))
        r = cb_err(CB_E_BUSY, "%s is open read-write", name);
    else if (fl->open_rw > 1 && !(flags & CB_FUSE_SHARED))
        r = cb_err(CB_E_BUSY, "%s is open read-write %u times", name, fl->open_rw);
    else
        fl->flags = flags;
    uint64_t ino = fl ? fl->ino : 0;
    pthread_mutex_unlock(&f->lock);
    if (!r) /* the mode bits changed with the flags */
        fuse_lowlevel_notify_inval_inode(f->se, ino, -1, 0);
    return r;
}

int cb_fuse_opens(cb_fuse *f, const char *name, uint32_t *read_write, uint32_t *read_only)
{
    pthread_mutex_lock(&f->lock);
    struct file *fl = by_name(f, name);
    if (fl) {
        *read_write = fl->open_rw;
        *read_only = fl->open_ro;
    }
    pthread_mutex_unlock(&f->lock);
    return fl ? 0 : cb_err(CB_E_NOT_FOUND, "no file named %.300s is attached", name);
}

int cb_fuse_changed(cb_fuse *f, const char *name)
{
    pthread_mutex_lock(&f->lock);
    struct file *fl = by_name(f, name);
    uint32_t dev_id = fl ? fl->dev_id : 0;
    pthread_mutex_unlock(&f->lock);
    if (!fl)
        return cb_err(CB_E_NOT_FOUND, "no file named %.300s is attached", name);
    cb_devinfo info;
    int r = cb_dev_info(f->p, dev_id, &info);
    if (r < 0)
        return r;
    pthread_mutex_lock(&f->lock);
    fl = by_name(f, name);
    uint64_t ino = fl ? fl->ino : 0;
    if (fl) {
        __atomic_store_n(&fl->size, info.size, __ATOMIC_RELAXED);
        clock_gettime(CLOCK_REALTIME, &fl->changed);
    }
    pthread_mutex_unlock(&f->lock);
    if (!fl)
        return cb_err(CB_E_NOT_FOUND, "no file named %.300s is attached", name);
    /* Attributes (the size) and every cached page. */
    r = fuse_lowlevel_notify_inval_inode(f->se, ino, 0, 0);
    if (r < 0 && r != -ENOENT) /* ENOENT: the kernel holds no inode for it */
        return cb_err(CB_E_IO, "cannot invalidate the kernel's cache of %s: %s", name,
                      strerror(-r));
    return 0;
}

int cb_fuse_stats_get(cb_fuse *f, cb_fuse_stats *out)
{
    pthread_mutex_lock(&f->lock);
    *out = f->st;
    out->requests = __atomic_load_n(&f->st.requests, __ATOMIC_RELAXED);
    out->bytes_read = __atomic_load_n(&f->st.bytes_read, __ATOMIC_RELAXED);
    out->bytes_written = __atomic_load_n(&f->st.bytes_written, __ATOMIC_RELAXED);
    out->errors = __atomic_load_n(&f->st.errors, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&f->lock);
    return 0;
}

#endif /* COWBLOCK_HAVE_FUSE */
