/*
 * Device files on an in-process FUSE mount (csrc/attach/fuse.c): each
 * attached device of a pool is a regular file in one flat directory, served
 * by threads created in C straight from the engine (api.h), with no socket
 * or second process in between.
 *
 * This file is also a cffi cdef (csrc/build_ffi.py reads it after api.h),
 * so it holds plain declarations only.  Calls return 0 (or a count) or a
 * negative errno, with cb_last_error() naming the problem, as in api.h.
 * Built without libfuse3, cb_fuse_available() is 0 and every other call
 * fails with -ENOSYS.
 */

typedef struct cb_fuse cb_fuse;

typedef struct {
    uint32_t uid, gid;                /* owner of the directory and files */
    uint32_t threads;                 /* worker threads at most, 1..256 */
    uint32_t max_write;               /* bytes per FUSE_WRITE, 4 KiB..1 MiB */
    uint32_t max_readahead;           /* bytes; 0: the kernel's default */
    uint32_t max_background;          /* async requests in flight (async DIO, readahead) */
    uint32_t direct_io;               /* FOPEN_DIRECT_IO: no page cache for the files */
    uint32_t parallel_direct_writes;  /* FOPEN_PARALLEL_DIRECT_WRITES (kernel 6.2+) */
    uint32_t keep_cache;              /* FOPEN_KEEP_CACHE: cached pages survive an open */
    uint32_t writeback_cache;         /* FUSE_CAP_WRITEBACK_CACHE for the mount */
    uint32_t allow_other;             /* users other than the mounter may reach the files */
    uint32_t on_full_wait_ms;         /* 0: ENOSPC at once; else retry writes this long */
    cb_space_wait_fn space_wait;      /* NULL, or what an ENOSPC write waits for first */
    void *space_ctx;
    double timeout;                   /* seconds the kernel caches names and attributes */
} cb_fuse_config;

/* A file's flags. */
#define CB_FUSE_READ_ONLY 1   /* opens for writing get EROFS */
#define CB_FUSE_SHARED 2      /* any number of read-write opens */
#define CB_FUSE_DENY_RW 4     /* read-write opens get EBUSY (the device is exported rw) */

typedef struct {
    uint64_t requests;
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t errors;              /* requests answered with an error */
    uint32_t threads;             /* worker threads that served a request */
    uint32_t threads_not_flusher; /* of those, ones PR_SET_IO_FLUSHER did not reach */
    int32_t io_flusher_errno;     /* why PR_SET_IO_FLUSHER failed (EPERM: no CAP_SYS_RESOURCE) */
    uint32_t files;
    uint32_t writeback_cache;     /* what the kernel agreed to */
    uint32_t max_write;
    uint32_t proto_minor;
} cb_fuse_stats;

int cb_fuse_available(void);
/* Mount an empty directory of device files on mountpoint (an existing
 * directory) and serve it from worker threads until cb_fuse_stop. */
int cb_fuse_start(cb_pool *p, const char *mountpoint, const cb_fuse_config *cfg, cb_fuse **out);
/* Unmount and free.  Refuses with -EBUSY while a file is open, unless force:
 * then the connection is aborted (I/O in flight and later gets an error). */
int cb_fuse_stop(cb_fuse *f, int force);
int cb_fuse_add(cb_fuse *f, const char *name, uint32_t dev_id, uint32_t flags);
/* -EBUSY while the file is open. */
int cb_fuse_remove(cb_fuse *f, const char *name);
int cb_fuse_set_flags(cb_fuse *f, const char *name, uint32_t flags);
int cb_fuse_opens(cb_fuse *f, const char *name, uint32_t *read_write, uint32_t *read_only);
/* The device changed under the file (writes from elsewhere, rollback,
 * resize): take its size again and drop the kernel's cached pages and
 * attributes. */
int cb_fuse_changed(cb_fuse *f, const char *name);
int cb_fuse_stats_get(cb_fuse *f, cb_fuse_stats *out);
