/*
 * The pool: files, lifecycle, commit, and pool-wide operations.
 *
 * Locking: p->lock is a reader-writer lock over all metadata.  Reads and
 * overwrites of blocks a device owns alone take it shared; anything that
 * changes metadata (allocating writes, snapshots, commits) takes it
 * exclusive.  So a snapshot waits for the writes in flight and every write
 * after it sees the new sharing: the point-in-time rule.  commit_lock
 * orders whole commits with pool resizes.
 *
 * Failure: after an I/O error on a pool file (a failed fsync above all) the
 * pool turns read-only for good (p->failed), records needs_check in the
 * metadata, and every later change fails with EIO: we cannot know which
 * writes the kernel dropped, so we never retry and paper over it.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cowblock.h"

static int open_at(int dirfd, const char *name, int flags, const char *dir)
{
    int fd = openat(dirfd, name, flags | O_CLOEXEC);
    if (fd < 0)
        return cb_err(errno == ENOENT ? CB_E_NOT_FOUND : CB_E_IO, "cannot open %s/%s: %s", dir, name,
                      strerror(errno));
    return fd;
}

static int map_data(cb_pool *p)
{
    if (p->data_map && !sm_wait_readers(&p->m.dsm, 0)) {
        /* Readers still copy from the old mapping: keep it until close
         * rather than wait for them with the write lock held. */
        struct retired_map *v = realloc(p->retired, (p->nr_retired + 1) * sizeof *v);
        if (!v)
            return cb_err(CB_E_NO_MEMORY, "out of memory");
        v[p->nr_retired++] = (struct retired_map){p->data_map, p->data_map_len};
        p->retired = v;
    } else if (p->data_map) {
        munmap(p->data_map, p->data_map_len);
    }
    p->data_map_len = p->m.sb.nr_data_blocks * p->block_size;
    p->data_map = mmap(NULL, p->data_map_len, PROT_READ, MAP_SHARED, p->data.fd, 0);
    if (p->data_map == MAP_FAILED) {
        p->data_map = NULL;
        return cb_err(CB_E_NO_MEMORY, "cannot map the data file (%llu bytes): %s",
                      (unsigned long long)p->data_map_len, strerror(errno));
    }
    madvise(p->data_map, p->data_map_len, MADV_RANDOM);
    return 0;
}

static int pool_create(const char *dir, struct cb_remote *remote, uint64_t data_size, uint32_t block_size, uint64_t meta_size,
                   uint32_t node_capacity, const uint8_t *uuid16)
{
    if (block_size < 4096 || block_size > (1u << 30) || (block_size & (block_size - 1)))
        return cb_err(CB_E_INVALID, "block size %u is not a power of two from 4 KiB to 1 GiB", block_size);
    if (data_size < block_size || data_size % block_size)
        return cb_err(CB_E_INVALID, "data size %llu is not a positive multiple of the block size %u",
                      (unsigned long long)data_size, block_size);
    uint64_t nr_data = data_size / block_size;
    if (nr_data > CB_MAX_BLOCKS)
        return cb_err(CB_E_INVALID, "data size %llu is %llu blocks, more than a pool holds (%llu)",
                      (unsigned long long)data_size, (unsigned long long)nr_data,
                      (unsigned long long)CB_MAX_BLOCKS);
    if (node_capacity == 1 || node_capacity == 2)
        return cb_err(CB_E_INVALID, "node capacity %u is too small (0 or at least 3)", node_capacity);
    if (meta_size == 0) { /* 64 bytes per data block, 64 MiB .. 16 GiB; sparse until used */
        meta_size = nr_data * 64;
        if (meta_size < (64u << 20))
            meta_size = 64u << 20;
        if (meta_size > (16ull << 30))
            meta_size = 16ull << 30;
        meta_size = (meta_size + CB_META_BLOCK_SIZE - 1) / CB_META_BLOCK_SIZE * CB_META_BLOCK_SIZE;
    }
    if (meta_size % CB_META_BLOCK_SIZE || meta_size < 16 * CB_META_BLOCK_SIZE ||
        meta_size / CB_META_BLOCK_SIZE > CB_MAX_BLOCKS)
        return cb_err(CB_E_INVALID, "metadata size %llu is not a multiple of 4096 from 64 KiB to %llu",
                      (unsigned long long)meta_size,
                      (unsigned long long)CB_MAX_BLOCKS * CB_META_BLOCK_SIZE);
    /* Only the owner may read a pool's blocks, whatever the umask (which can
     * only take bits away, so the modes are set again once made). */
    bool made_dir = mkdir(dir, CB_POOL_DIR_MODE) == 0;
    if (!made_dir && errno != EEXIST)
        return cb_err(CB_E_IO, "cannot create pool directory %s: %s", dir, strerror(errno));
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return cb_err(CB_E_IO, "cannot open pool directory %s: %s", dir, strerror(errno));
    int r = 0, dfd = -1, mfd = -1;
    struct cb_meta m;
    memset(&m, 0, sizeof m);
    m.file.remote = remote;
    if (made_dir && fchmod(dirfd, CB_POOL_DIR_MODE) != 0) {
        r = cb_err(CB_E_IO, "cannot set the mode of pool directory %s: %s", dir, strerror(errno));
        goto out;
    }
    dfd = openat(dirfd, "data", O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, CB_POOL_FILE_MODE);
    if (dfd < 0 || fchmod(dfd, CB_POOL_FILE_MODE) != 0) {
        r = cb_err(errno == EEXIST ? CB_E_EXISTS : CB_E_IO, "cannot create %s/data: %s", dir,
                   strerror(errno));
        goto out;
    }
    mfd = openat(dirfd, "metadata", O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, CB_POOL_FILE_MODE);
    if (mfd < 0 || fchmod(mfd, CB_POOL_FILE_MODE) != 0) {
        r = cb_err(errno == EEXIST ? CB_E_EXISTS : CB_E_IO, "cannot create %s/metadata: %s", dir,
                   strerror(errno));
        goto out;
    }
    struct cb_file data = {dfd, "data", remote};
    if ((r = io_truncate(&data, data_size)) != 0)
        goto out;
    if ((r = meta_format(&m, mfd, meta_size / CB_META_BLOCK_SIZE, block_size, nr_data, node_capacity,
                         uuid16)) != 0)
        goto out;
    if ((r = io_fsync(&data)) != 0)
        goto out;
    if (fsync(dirfd) != 0)
        r = cb_err(CB_E_IO, "cannot sync pool directory %s: %s", dir, strerror(errno));
out:
    meta_close(&m);
    if (r && dfd >= 0)
        unlinkat(dirfd, "data", 0);
    if (r && mfd >= 0)
        unlinkat(dirfd, "metadata", 0);
    if (dfd >= 0)
        close(dfd);
    if (mfd >= 0)
        close(mfd);
    close(dirfd);
    return r;
}

static int pool_open(const char *dir, struct cb_remote *remote, int read_only, cb_pool **out)
{
    *out = NULL;
    cb_pool *p = calloc(1, sizeof *p);
    if (!p)
        return cb_err(CB_E_NO_MEMORY, "out of memory");
    p->data.fd = p->m.file.fd = -1;
    /* Writers first: fills hold the lock shared, and a stream of them must
     * not starve commits and snapshots. */
    pthread_rwlockattr_t attr;
    pthread_rwlockattr_init(&attr);
    pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
    pthread_rwlock_init(&p->lock, &attr);
    pthread_rwlockattr_destroy(&attr);
    pthread_mutex_init(&p->commit_lock, NULL);
    pthread_mutex_init(&p->cell_lock, NULL);
    pthread_cond_init(&p->cell_cond, NULL);
    txn_init(p);
    p->read_only = true; /* until the open succeeds: close() must not commit */
    int r = 0;
    int mode = read_only ? O_RDONLY : O_RDWR;
    p->dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (p->dirfd < 0) {
        r = cb_err(CB_E_NOT_FOUND, "no pool at %s: %s", dir, strerror(errno));
        goto fail;
    }
    int mfd = open_at(p->dirfd, "metadata", mode, dir);
    if (mfd < 0) {
        r = mfd;
        goto fail;
    }
    p->m.file.fd = mfd;
    p->m.file.remote = remote;
    if ((r = meta_open(&p->m, mfd, read_only)) != 0)
        goto fail;
    int dfd = open_at(p->dirfd, "data", mode, dir);
    if (dfd < 0) {
        r = dfd;
        goto fail;
    }
    p->data = (struct cb_file){dfd, "data", remote, CB_DATA_WRITE_PIECE};
    p->block_size = p->m.sb.data_block_size;
    p->block_shift = (uint32_t)__builtin_ctz(p->block_size);
    if (remote)
        remote_set_block_size(&p->data, p->block_size);
    struct stat st;
    if (fstat(dfd, &st) != 0) {
        r = cb_err(CB_E_IO, "cannot stat %s/data: %s", dir, strerror(errno));
        goto fail;
    }
    uint64_t want = p->m.sb.nr_data_blocks * p->block_size;
    if ((uint64_t)st.st_size < want) {
        r = cb_err(CB_E_CORRUPT, "data file %s/data is truncated: %lld bytes, the metadata says %llu "
                   "blocks of %u = %llu bytes", dir, (long long)st.st_size,
                   (unsigned long long)p->m.sb.nr_data_blocks, p->block_size,
                   (unsigned long long)want);
        goto fail;
    }
    if ((r = map_data(p)) != 0 || (r = dev_load_all(p)) != 0)
        goto fail;
    p->read_only = read_only;
    *out = p;
    return 0;
fail:
    cb_pool_close(p);
    return r;
}

int cb_pool_create(const char *dir, uint64_t data_size, uint32_t block_size, uint64_t meta_size,
                   uint32_t node_capacity, const uint8_t *uuid16)
{
    return pool_create(dir, NULL, data_size, block_size, meta_size, node_capacity, uuid16);
}

int cb_pool_open(const char *dir, int read_only, cb_pool **out)
{
    return pool_open(dir, NULL, read_only, out);
}

/* A pool whose files are the cache of RADOS objects (remote.c). */
int cb_pool_create_remote(const char *dir, struct cb_remote *r, uint64_t data_size,
                          uint32_t block_size, uint64_t meta_size, uint32_t node_capacity,
                          const uint8_t *uuid16)
{
    if (!r)
        return cb_err(CB_E_INVALID, "no RADOS connection given");
    return pool_create(dir, r, data_size, block_size, meta_size, node_capacity, uuid16);
}

int cb_pool_open_remote(const char *dir, struct cb_remote *r, int read_only, cb_pool **out)
{
    *out = NULL;
    if (!r)
        return cb_err(CB_E_INVALID, "no RADOS connection given");
    return pool_open(dir, r, read_only, out);
}

int cb_pool_close(cb_pool *p)
{
    if (!p)
        return 0;
    int r = 0;
    if (!p->read_only && !p->failed && p->m.map)
        r = txn_depth(p) ? cb_err(CB_E_INVALID, "the pool was closed inside an atomic section: "
                                  "what changed since the last commit is not committed")
                         : cb_pool_commit(p);
    for (uint32_t i = 0; i < p->devs_cap; i++)
        dev_free(p->devs[i]);
    free(p->devs);
    sm_wait_readers(&p->m.dsm, -1);
    if (p->data_map)
        munmap(p->data_map, p->data_map_len);
    for (size_t i = 0; i < p->nr_retired; i++)
        munmap(p->retired[i].addr, p->retired[i].len);
    free(p->retired);
    int mfd = p->m.file.fd;
    meta_close(&p->m);
    if (mfd >= 0)
        close(mfd);
    if (p->data.fd >= 0)
        close(p->data.fd);
    if (p->dirfd >= 0)
        close(p->dirfd);
    pthread_rwlock_destroy(&p->lock);
    pthread_mutex_destroy(&p->commit_lock);
    pthread_mutex_destroy(&p->cell_lock);
    pthread_cond_destroy(&p->cell_cond);
    txn_destroy(p);
    free(p->cells);
    free(p->pending.v);
    free(p);
    return r;
}

int pool_fail(cb_pool *p, int err)
{
    char why[512];
    snprintf(why, sizeof why, "%s", cb_last_error());
    int kind = cb_error_kind(err);
    if (!p->failed) {
        p->failed = true;
        meta_persist_needs_check(&p->m);
    }
    /* Running out of space or memory stays what it was; anything else is
     * reported as the I/O error it has turned into. */
    if (cb_kind_errno(kind) != ENOSPC && cb_kind_errno(kind) != ENOMEM)
        kind = CB_E_IO;
    return cb_err(kind, "%s; the pool is now read-only and needs check", why);
}

int pool_writable(cb_pool *p)
{
    if (p->failed)
        return cb_err(CB_E_IO, "the pool hit an I/O error and is read-only until it is checked");
    if (p->read_only)
        return cb_err(CB_E_READ_ONLY, "the pool is open read-only");
    return 0;
}

static bool data_unsynced(cb_pool *p, uint64_t *writes)
{
    *writes = __atomic_load_n(&p->data_writes, __ATOMIC_SEQ_CST);
    return __atomic_load_n(&p->data_synced, __ATOMIC_SEQ_CST) < *writes;
}

/* After a data fsync that began once the count was `writes`. */
static void data_synced_up_to(cb_pool *p, uint64_t writes)
{
    uint64_t cur = __atomic_load_n(&p->data_synced, __ATOMIC_SEQ_CST);
    while (cur < writes &&
           !__atomic_compare_exchange_n(&p->data_synced, &cur, writes, false, __ATOMIC_SEQ_CST,
                                        __ATOMIC_SEQ_CST))
        ;
}

/* Commit with the write lock held.  presynced: the caller fsynced the data
 * file after reading alloc_gen as presync_gen, so only blocks allocated
 * since then still need a data fsync before the metadata that maps them. */
static int commit_locked(cb_pool *p, bool presynced, uint64_t presync_gen)
{
    if (p->read_only)
        return 0;
    int r = pool_writable(p);
    if (r)
        return r;
    uint64_t writes; /* exact: no data write runs while the write lock is held */
    bool unsynced = data_unsynced(p, &writes);
    bool data_sync = presynced ? p->alloc_gen != presync_gen : unsynced;
    if (data_sync)
        p->synced_gen = p->alloc_gen; /* no allocation while the write lock is held */
    if (!p->dirty) {
        if (data_sync && (r = io_fsync(&p->data)) != 0)
            return pool_fail(p, r);
        /* Nothing to write, but blocks held for readers may be free to go. */
        sm_commit_done(&p->m.dsm);
    } else {
        if ((r = dev_write_back(p)) != 0 || (r = meta_commit(&p->m, &p->data, data_sync)) != 0)
            return pool_fail(p, r);
        p->dirty = false;
    }
    if (data_sync)
        data_synced_up_to(p, writes);
    for (size_t i = 0; i < p->pending.n; i++) /* still being filled: not free yet */
        if ((r = sm_reserve(&p->m.dsm, p->pending.v[i])) != 0)
            return pool_fail(p, r);
    return 0;
}

int pool_commit_locked(cb_pool *p)
{
    switch (txn_turn(p)) {
    case TXN_DEFER:
        return 0;
    case TXN_WAIT: {
        pthread_rwlock_unlock(&p->lock);
        txn_wait_idle(p);
        pthread_rwlock_wrlock(&p->lock);
        int r = commit_locked(p, false, 0);
        commit_gate_leave(p);
        return r;
    }
    default:
        return commit_locked(p, false, 0);
    }
}

int pool_commit_locked_nowait(cb_pool *p)
{
    return txn_any_open(p) ? 0 : commit_locked(p, false, 0);
}

/* Refuse what needs a commit of its own inside the caller's atomic section. */
static int outside_section(cb_pool *p, const char *what)
{
    return txn_depth(p) ? cb_err(CB_E_INVALID, "%s inside an atomic section would commit half of "
                                 "it; the section commits when it ends", what) : 0;
}

/* fsync the data file outside the write lock: on success the writes counted
 * before it (`writes`) are durable; a failure fails the pool. */
static int data_fsync(cb_pool *p, uint64_t writes)
{
    int r = io_fsync(&p->data);
    if (!r) {
        data_synced_up_to(p, writes);
        return 0;
    }
    pthread_rwlock_wrlock(&p->lock);
    r = pool_fail(p, r);
    pthread_rwlock_unlock(&p->lock);
    return r;
}

/* An explicit commit with no metadata to write (only overwrites in place
 * since the last one): the data fsync is all of it, and it runs beside any
 * other, outside commit_lock, as a plain file's server's FLUSHes do (the
 * kernel merges concurrent fdatasyncs).  No metadata to write means every
 * allocation is committed, so its data was synced before that commit.
 * Returns 0 when done, 1 when a full commit is needed, or an error. */
static int data_only_commit(cb_pool *p)
{
    uint64_t writes;
    pthread_rwlock_rdlock(&p->lock);
    int r = p->read_only ? 0 : pool_writable(p);
    bool idle = !p->dirty && !p->pending.n && sm_commit_idle(&p->m.dsm);
    bool unsynced = data_unsynced(p, &writes);
    pthread_rwlock_unlock(&p->lock);
    if (r || p->read_only)
        return r;
    if (!idle)
        return 1;
    return unsynced ? data_fsync(p, writes) : 0;
}

/* The data file is fsynced before taking the write lock, so that I/O goes on
 * while the bulk of the data reaches the disk; under the lock only the data
 * of blocks allocated meanwhile is synced again, then the metadata.
 * overwrites_too: fsync when anything was written (an explicit commit, a
 * durability point), else only when blocks were allocated (the periodic
 * one: a sequential rewrite of a 1 GiB range at 1.5 GB/s otherwise wrote
 * the whole range to the disk every second, 2.3x the disk writes of a plain
 * file under the same writer; benchmarks/results/attach.md). */
static int commit(cb_pool *p, bool overwrites_too)
{
    int r = outside_section(p, "a commit");
    if (r)
        return r;
    if (overwrites_too && (r = data_only_commit(p)) <= 0)
        return r;
    commit_gate_enter(p);
    /* Group commit: explicit commits that come while one runs wait for it,
     * then the first of them commits for all of them.  A round covers every
     * ticket taken before it began (it reads the data's state after them),
     * so a waiter it covered returns at once.  Else FLUSHes at QD16 queued
     * behind each other, each with its own fdatasync: 41 ms a FLUSH against
     * 21 ms for a plain file's server, whose concurrent fdatasyncs the
     * kernel merges.  A failed round covers nobody. */
    uint64_t ticket = overwrites_too ? __atomic_add_fetch(&p->commit_tickets, 1, __ATOMIC_SEQ_CST) : 0;
    pthread_mutex_lock(&p->commit_lock);
    if (overwrites_too && p->commits_done >= ticket) {
        pthread_mutex_unlock(&p->commit_lock);
        commit_gate_leave(p);
        return 0;
    }
    uint64_t round = __atomic_load_n(&p->commit_tickets, __ATOMIC_SEQ_CST);
    pthread_rwlock_rdlock(&p->lock);
    r = p->read_only ? 0 : pool_writable(p);
    uint64_t writes;
    bool unsynced = data_unsynced(p, &writes);
    uint64_t gen = p->alloc_gen;
    bool sync = overwrites_too ? unsynced : gen != p->synced_gen;
    pthread_rwlock_unlock(&p->lock);
    if (!r && !p->read_only && sync)
        r = data_fsync(p, writes);
    if (!r) {
        /* Overwrites in place change no metadata: when the fsync was all
         * there was to do, the write lock, which would hold up every writer
         * for nothing, is not taken (commit_lock keeps other commits out,
         * the shared lock the writers that would make the pool dirty). */
        pthread_rwlock_rdlock(&p->lock);
        bool idle = !p->dirty && p->alloc_gen == gen && !p->pending.n &&
                    sm_commit_idle(&p->m.dsm);
        if (idle && sync)
            p->synced_gen = gen;
        pthread_rwlock_unlock(&p->lock);
        if (!idle) {
            pthread_rwlock_wrlock(&p->lock);
            if (sync)
                p->synced_gen = gen;
            r = commit_locked(p, true, gen);
            pthread_rwlock_unlock(&p->lock);
        }
    }
    if (!r && overwrites_too)
        p->commits_done = round;
    pthread_mutex_unlock(&p->commit_lock);
    commit_gate_leave(p);
    return r;
}

int cb_pool_commit(cb_pool *p) { return commit(p, true); }

int cb_pool_checkpoint(cb_pool *p) { return commit(p, false); }

int cb_pool_stats(cb_pool *p, cb_stats *s)
{
    pthread_rwlock_rdlock(&p->lock);
    memset(s, 0, sizeof *s);
    const struct cb_superblock *sb = &p->m.sb;
    s->data_block_size = p->block_size;
    s->node_capacity = sb->node_capacity;
    s->nr_data_blocks = sb->nr_data_blocks;
    s->data_used = sb->data_used;
    s->data_free = sb->nr_data_blocks - sb->data_used;
    s->nr_meta_blocks = sb->nr_meta_blocks;
    s->meta_used = sb->meta_used;
    s->meta_reserve = p->m.reserve;
    s->transaction_id = sb->transaction_id;
    s->created_ns = sb->created_ns;
    s->nr_devices = p->nr_devices;
    s->snap_time = sb->snap_time;
    s->needs_check = (sb->flags & CB_SB_NEEDS_CHECK) != 0;
    s->read_only = p->read_only || p->failed;
    uint64_t writes;
    s->dirty = p->dirty || data_unsynced(p, &writes);
    s->commits_waited = p->commits_waited;
    memcpy(s->pool_uuid, sb->pool_uuid, 16);
    pthread_rwlock_unlock(&p->lock);
    return 0;
}

int cb_pool_counters(cb_pool *p, uint64_t *meta_written, uint64_t *meta_verified)
{
    *meta_written = p->m.blocks_written;
    *meta_verified = __atomic_load_n(&p->m.blocks_verified, __ATOMIC_RELAXED);
    return 0;
}

int cb_pool_resize(cb_pool *p, uint64_t data_size)
{
    bool gated = !txn_depth(p); /* inside a section, its end commits the resize */
    if (gated)
        commit_gate_enter(p);
    pthread_mutex_lock(&p->commit_lock);
    pthread_rwlock_wrlock(&p->lock);
    int r = pool_writable(p);
    uint64_t cur = p->m.sb.nr_data_blocks * p->block_size;
    if (r)
        goto out;
    if (data_size % p->block_size) {
        r = cb_err(CB_E_INVALID, "new data size %llu is not a multiple of the block size %u",
                   (unsigned long long)data_size, p->block_size);
        goto out;
    }
    if (data_size < cur) {
        r = cb_err(CB_E_INVALID, "new data size %llu is smaller than the current %llu: pools only grow",
                   (unsigned long long)data_size, (unsigned long long)cur);
        goto out;
    }
    if (data_size / p->block_size > CB_MAX_BLOCKS) {
        r = cb_err(CB_E_INVALID, "new data size %llu is more blocks than a pool holds (%llu)",
                   (unsigned long long)data_size, (unsigned long long)CB_MAX_BLOCKS);
        goto out;
    }
    if (data_size == cur)
        goto out;
    if ((r = io_truncate(&p->data, data_size)) != 0)
        goto out;
    if ((r = sm_grow(&p->m.dsm, data_size / p->block_size)) != 0)
        goto out;
    p->m.sb.nr_data_blocks = data_size / p->block_size;
    if ((r = map_data(p)) != 0) {
        r = pool_fail(p, r);
        goto out;
    }
    p->dirty = true;
    r = pool_commit_locked(p);
out:
    pthread_rwlock_unlock(&p->lock);
    pthread_mutex_unlock(&p->commit_lock);
    if (gated)
        commit_gate_leave(p);
    return r;
}

int cb_pool_resize_metadata(cb_pool *p, uint64_t meta_size)
{
    bool gated = !txn_depth(p);
    if (gated)
        commit_gate_enter(p);
    pthread_mutex_lock(&p->commit_lock);
    pthread_rwlock_wrlock(&p->lock);
    int r = pool_writable(p);
    uint64_t cur = p->m.nr_blocks * CB_META_BLOCK_SIZE;
    if (r)
        goto out;
    if (meta_size % CB_META_BLOCK_SIZE || meta_size < cur ||
        meta_size / CB_META_BLOCK_SIZE > CB_MAX_BLOCKS) {
        r = cb_err(CB_E_INVALID, "new metadata size %llu must be a multiple of 4096, at least the "
                   "current %llu and at most %llu", (unsigned long long)meta_size,
                   (unsigned long long)cur, (unsigned long long)CB_MAX_BLOCKS * CB_META_BLOCK_SIZE);
        goto out;
    }
    if (meta_size == cur)
        goto out;
    if ((r = meta_grow(&p->m, meta_size / CB_META_BLOCK_SIZE)) != 0) {
        r = pool_fail(p, r);
        goto out;
    }
    p->dirty = true;
    r = pool_commit_locked(p);
out:
    pthread_rwlock_unlock(&p->lock);
    pthread_mutex_unlock(&p->commit_lock);
    if (gated)
        commit_gate_leave(p);
    return r;
}

int cb_pool_list(cb_pool *p, uint32_t *ids, uint32_t cap)
{
    pthread_rwlock_rdlock(&p->lock);
    uint32_t n = 0;
    for (uint32_t i = 0; i < p->devs_cap; i++) {
        if (p->devs[i]) {
            if (n < cap)
                ids[n] = i;
            n++;
        }
    }
    pthread_rwlock_unlock(&p->lock);
    return (int)n;
}

int cb_pool_clear_needs_check(cb_pool *p)
{
    pthread_rwlock_wrlock(&p->lock);
    int r = pool_writable(p);
    if (!r && (p->m.sb.flags & CB_SB_NEEDS_CHECK)) {
        p->m.sb.flags &= ~CB_SB_NEEDS_CHECK;
        p->dirty = true;
        r = pool_commit_locked(p);
    }
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_pool_config(cb_pool *p, void *buf, uint32_t cap)
{
    pthread_rwlock_rdlock(&p->lock);
    uint32_t len = p->m.sb.config_len;
    int r = len > CB_POOL_CONFIG_MAX
                ? cb_err(CB_E_CORRUPT, "superblock is corrupt: configuration length %u", len)
                : (int)len;
    if (r > 0)
        memcpy(buf, p->m.sb.config, len < cap ? len : cap);
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_pool_set_config(cb_pool *p, const void *buf, uint32_t len)
{
    if (len > CB_POOL_CONFIG_MAX)
        return cb_err(CB_E_INVALID, "pool configuration of %u bytes is larger than %u", len,
                      CB_POOL_CONFIG_MAX);
    pthread_rwlock_wrlock(&p->lock);
    int r = pool_writable(p);
    if (!r) {
        memset(p->m.sb.config, 0, sizeof p->m.sb.config);
        memcpy(p->m.sb.config, buf, len);
        p->m.sb.config_len = len;
        p->dirty = true;
        r = pool_commit_locked(p);
    }
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_pool_trim(cb_pool *p, uint64_t *bytes)
{
    *bytes = 0;
    int r = outside_section(p, "a trim");
    if (r)
        return r;
    commit_gate_enter(p);
    pthread_mutex_lock(&p->commit_lock);
    pthread_rwlock_wrlock(&p->lock);
    meta_walk_begin(&p->m);
    /* After a commit every block with count 0 is free, except blocks being
     * filled right now (pending, kept busy). */
    r = pool_commit_locked(p);
    uint64_t n = p->m.sb.nr_data_blocks, run_start = 0, run_len = 0;
    for (uint64_t b = 0; !r && b <= n; b++) {
        uint32_t ref = 1;
        if (b < n && (r = sm_get(&p->m, &p->m.dsm, b, &ref)) != 0)
            break;
        bool free_block = b < n && ref == 0 && !(p->m.dsm.busy[b >> 3] & (1u << (b & 7)));
        if (free_block) {
            if (!run_len)
                run_start = b;
            run_len++;
            continue;
        }
        if (run_len) {
            r = io_punch_hole(&p->data, run_start << p->block_shift, run_len << p->block_shift);
            *bytes += run_len << p->block_shift;
            run_len = 0;
        }
    }
    meta_walk_end(&p->m);
    pthread_rwlock_unlock(&p->lock);
    pthread_mutex_unlock(&p->commit_lock);
    commit_gate_leave(p);
    return r;
}
