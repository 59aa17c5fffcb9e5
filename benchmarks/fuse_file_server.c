/*
 * The FUSE ceiling for benchmarks/attach_compare.py: the least a libfuse3
 * server can do to serve one plain file as /MOUNT/file (pread and pwrite
 * on it, fsync -> fdatasync), with the same mount and open flags as
 * cowblock's server (csrc/attach/fuse.c), so the difference between the
 * two is the engine.  Built by the benchmark script; not part of cowblock.
 *
 *   fuse_file_server FILE MOUNTPOINT [direct_io] [parallel] [keep_cache]
 *                    [writeback] [threads=N] [max_background=N]
 * Runs in the foreground until unmounted.
 */
#define FUSE_USE_VERSION 312
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <linux/fuse.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define FILE_INO 2

static int backing = -1;
static int direct_io, parallel, keep_cache, writeback;
static unsigned threads = 4, max_background = 64;

static void fill(fuse_ino_t ino, struct stat *st)
{
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    if (ino == FUSE_ROOT_ID) {
        st->st_mode = S_IFDIR | 0700;
        st->st_nlink = 2;
        return;
    }
    struct stat b;
    fstat(backing, &b);
    st->st_mode = S_IFREG | 0600;
    st->st_nlink = 1;
    st->st_size = b.st_size;
}

static void op_init(void *u, struct fuse_conn_info *c)
{
    c->max_write = 1 << 20;
    c->max_background = max_background;
    c->congestion_threshold = max_background * 3 / 4;
    c->want &= ~FUSE_CAP_AUTO_INVAL_DATA;
    if (c->capable & FUSE_CAP_ASYNC_DIO)
        c->want |= FUSE_CAP_ASYNC_DIO;
    if (writeback && (c->capable & FUSE_CAP_WRITEBACK_CACHE))
        c->want |= FUSE_CAP_WRITEBACK_CACHE;
    else
        c->want &= ~FUSE_CAP_WRITEBACK_CACHE;
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e = {.ino = FILE_INO, .attr_timeout = 3600, .entry_timeout = 3600};
    if (parent != FUSE_ROOT_ID || strcmp(name, "file")) {
        fuse_reply_err(req, ENOENT);
        return;
    }
    fill(FILE_INO, &e.attr);
    fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct stat st;
    fill(ino, &st);
    fuse_reply_attr(req, &st, 3600);
}

/* The writeback cache sends times with its flushes: take none of it. */
static void op_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                       struct fuse_file_info *fi)
{
    struct stat st;
    fill(ino, &st);
    fuse_reply_attr(req, &st, 3600);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fuse_open_out out = {.fh = 0, .open_flags = FOPEN_NOFLUSH};
    if (direct_io)
        out.open_flags |= FOPEN_DIRECT_IO | (parallel ? FOPEN_PARALLEL_DIRECT_WRITES : 0);
    if (keep_cache)
        out.open_flags |= FOPEN_KEEP_CACHE;
    struct iovec iov = {&out, sizeof out};
    fuse_reply_iov(req, &iov, 1);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                    struct fuse_file_info *fi)
{
    static __thread char *buf;
    if (!buf && !(buf = malloc(1 << 20))) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    ssize_t n = pread(backing, buf, size > (1 << 20) ? (1 << 20) : size, off);
    if (n < 0)
        fuse_reply_err(req, errno);
    else
        fuse_reply_buf(req, buf, (size_t)n);
}

static void op_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    ssize_t n = pwrite(backing, buf, size, off);
    if (n < 0)
        fuse_reply_err(req, errno);
    else
        fuse_reply_write(req, (size_t)n);
}

static void op_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    fuse_reply_err(req, fdatasync(backing) ? errno : 0);
}

static void op_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                         struct fuse_file_info *fi)
{
    fuse_reply_err(req, fallocate(backing, mode, off, len) ? errno : 0);
}

static void op_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    fuse_reply_err(req, 0);
}

static const struct fuse_lowlevel_ops ops = {
    .init = op_init, .lookup = op_lookup, .getattr = op_getattr, .setattr = op_setattr, .open = op_open,
    .read = op_read, .write = op_write, .fsync = op_fsync, .fallocate = op_fallocate,
    .flush = op_flush,
};

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s FILE MOUNTPOINT [direct_io] [parallel] [keep_cache] "
                "[writeback] [threads=N] [max_background=N]\n", argv[0]);
        return 2;
    }
    for (int i = 3; i < argc; i++) {
        direct_io |= !strcmp(argv[i], "direct_io");
        parallel |= !strcmp(argv[i], "parallel");
        keep_cache |= !strcmp(argv[i], "keep_cache");
        writeback |= !strcmp(argv[i], "writeback");
        sscanf(argv[i], "threads=%u", &threads);
        sscanf(argv[i], "max_background=%u", &max_background);
    }
    if ((backing = open(argv[1], O_RDWR)) < 0) {
        perror(argv[1]);
        return 1;
    }
    prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0); /* as cowblock's server; EPERM without CAP_SYS_RESOURCE */
    char *fargv[] = {argv[0], "-ofsname=fuse_file_server,default_permissions", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(2, fargv);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
    if (!se || fuse_session_mount(se, argv[2]) != 0)
        return 1;
    struct fuse_loop_config *cfg = fuse_loop_cfg_create();
    fuse_loop_cfg_set_max_threads(cfg, threads);
    fuse_loop_cfg_set_clone_fd(cfg, 1);
    int r = fuse_session_loop_mt(se, cfg);
    fuse_session_unmount(se);
    fuse_session_destroy(se);
    return r ? 1 : 0;
}
