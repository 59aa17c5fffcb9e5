/*
 * The data path: reads, writes, discards and block status of thin devices.
 *
 * Reads take the pool lock shared to walk the mapping tree with a cursor,
 * then copy straight out of the data file's mapping without it (see
 * cb_dev_read); unmapped blocks read as zeroes.
 *
 * A write is split into per-block pieces.  For each piece:
 *  - fast path (lock shared): the block is mapped and nothing shares it (no
 *    node on its path has a count above 1, the data block's count is 1):
 *    write in place, no metadata change.
 *  - slow path (lock exclusive): allocate a new data block, fill it (the old
 *    block's bytes around the piece when it was mapped, zeroes when it was
 *    not, so a recycled block never shows its past), and only then insert
 *    the mapping: a reader never sees a mapping to unwritten data.  A piece
 *    that covers the whole block copies nothing.
 * When the pool has no free block but blocks were freed in this transaction,
 * commit and try again (freed blocks become reusable at commit), as dm-thin
 * does; then fail with ENOSPC having changed nothing.
 */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "cowblock.h"

static const uint8_t zeroes[65536];

static int range_check(cb_pool *p, struct cb_dev *d, uint32_t id, const char *op, uint64_t off,
                       uint64_t len)
{
    (void)p;
    if (!d)
        return cb_err(CB_E_NOT_FOUND, "no device with id %u", id);
    if (off > d->d.size || len > d->d.size - off)
        return cb_err(CB_E_INVALID, "%s of %llu bytes at offset %llu is past the end of the device "
                      "(%llu bytes)", op, (unsigned long long)len, (unsigned long long)off,
                      (unsigned long long)d->d.size);
    return 0;
}

static int bad_block(cb_pool *p, uint32_t blk)
{
    return cb_err(CB_E_CORRUPT, "metadata is corrupt: a mapping names data block %u, past the end of "
                  "the pool (%llu blocks)", blk, (unsigned long long)p->m.sb.nr_data_blocks);
}

/* One piece of a read: bytes of a data block, or zeroes (src NULL). */
struct read_extent {
    const uint8_t *src;
    uint64_t len;
};
enum { READ_BATCH = 64 };

/* Under the lock: resolve [*pos, end) into at most READ_BATCH extents,
 * merging neighbours (zeroes, or blocks adjacent in the data file). */
static int read_resolve(cb_pool *p, struct cb_dev *d, uint64_t *pos, uint64_t end,
                        struct read_extent *ex, int *count)
{
    uint64_t bs = p->block_size;
    int n = 0;
    struct bt_cursor cur = {.m = &p->m};
    int have = d->d.mapping_root ? bt_seek(&cur, d->d.mapping_root, (uint32_t)(*pos >> p->block_shift), false) : 0;
    while (*pos < end) {
        if (have < 0)
            return have;
        uint64_t vb = *pos >> p->block_shift, boff = *pos & (bs - 1);
        uint64_t len = bs - boff < end - *pos ? bs - boff : end - *pos;
        while (have == 1 && bt_cur_key(&cur) < vb)
            have = bt_next(&cur, d->d.mapping_root, false);
        if (have < 0)
            return have;
        const uint8_t *src = NULL;
        if (have == 1 && bt_cur_key(&cur) == vb) {
            uint32_t blk = bt_cur_value(&cur);
            if (blk >= p->m.sb.nr_data_blocks)
                return bad_block(p, blk);
            src = p->data_map + ((uint64_t)blk << p->block_shift) + boff;
        }
        if (n > 0 && (src ? ex[n - 1].src && ex[n - 1].src + ex[n - 1].len == src : !ex[n - 1].src)) {
            ex[n - 1].len += len;
        } else {
            if (n == READ_BATCH)
                break;
            ex[n++] = (struct read_extent){src, len};
        }
        *pos += len;
    }
    *count = n;
    return 0;
}

/* Hand the extents of a read to readahead (MADV_WILLNEED: asynchronous,
 * next to nothing when the pages are cached), all before any is copied, so
 * that their disk reads are in flight together, and then those of as much
 * of the device again after it (cb_dev_read).  Without it a page fault of
 * the mapping (MADV_RANDOM) reads 4 KiB at a time: a cold 8 MiB read took
 * 0.4-1.8 s.  Copying with pread instead streams as well cold but copies 3x
 * slower hot here (1.1 ms against 0.35 ms a MiB).  Small extents fault their
 * few pages in: a syscall each would cost more.  Before, each extent was
 * handed over as it was copied, with as much of the data file again after
 * it: 8 cold 1 MiB reads of a device whose blocks lie in random order took
 * 41 ms, against 14 ms now; 14-16 ms both when they lie in order
 * (benchmarks/cold_read_engine.py).
 *
 * WILLNEED of one range reads at most the larger of the disk's readahead
 * and its largest request (8 MiB here, 128 KiB-1.25 MiB on common hosts)
 * and drops the rest, so a large extent goes in pieces: a cold 32 MiB read
 * in one piece took 526 ms, 85 ms in 512 KiB pieces. */
enum { WILLNEED_MIN = 32 << 10, WILLNEED_CHUNK = 512 << 10, WILLNEED_BATCH = 64 };

/* The pieces go to the kernel in one process_madvise call (Linux 5.10) on a
 * pidfd of this process, not one madvise each: on hot reads the syscalls
 * are the cost (1 MiB reads at snapshot depth 1000, 9 extents each, ran at
 * 0.89-0.91x the base's speed with a madvise each, 0.93-0.95x now).  A
 * forked child must not advise its parent's memory: the pidfd is dropped in
 * the child.  -1: not opened yet; -2: not available (then madvise, piece by
 * piece). */
static int self_pidfd = -1;
static pthread_mutex_t self_pidfd_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t self_pidfd_atfork = PTHREAD_ONCE_INIT;

static void drop_self_pidfd(void)
{
    if (self_pidfd >= 0)
        close(self_pidfd);
    self_pidfd = -1;
}

static void register_drop_self_pidfd(void) { pthread_atfork(NULL, NULL, drop_self_pidfd); }

static int pidfd_of_self(void)
{
    int fd = __atomic_load_n(&self_pidfd, __ATOMIC_ACQUIRE);
    if (fd != -1)
        return fd;
    pthread_once(&self_pidfd_atfork, register_drop_self_pidfd);
    pthread_mutex_lock(&self_pidfd_lock);
    if (self_pidfd == -1) {
#if defined(SYS_pidfd_open) && defined(SYS_process_madvise)
        fd = (int)syscall(SYS_pidfd_open, getpid(), 0); /* close-on-exec */
#else
        fd = -1;
#endif
        __atomic_store_n(&self_pidfd, fd >= 0 ? fd : -2, __ATOMIC_RELEASE);
    }
    fd = self_pidfd;
    pthread_mutex_unlock(&self_pidfd_lock);
    return fd;
}

/* Pieces to hand to readahead, gathered for one call. */
struct willneed {
    struct iovec v[WILLNEED_BATCH];
    int n;
};

static void willneed_flush(struct willneed *w)
{
    if (!w->n)
        return;
#ifdef SYS_process_madvise
    int fd = pidfd_of_self();
    if (fd >= 0 && syscall(SYS_process_madvise, fd, w->v, (size_t)w->n, MADV_WILLNEED, 0) >= 0) {
        w->n = 0;
        return;
    }
    if (fd >= 0 && (errno == ENOSYS || errno == EPERM || errno == EINVAL || errno == EBADF))
        __atomic_store_n(&self_pidfd, -2, __ATOMIC_RELEASE); /* (the fd stays open: harmless) */
#endif
    for (int i = 0; i < w->n; i++)
        madvise(w->v[i].iov_base, w->v[i].iov_len, MADV_WILLNEED);
    w->n = 0;
}

/* Add the extents' data, within the mapping, in WILLNEED_CHUNK pieces. */
static void willneed_add(struct willneed *w, const struct read_extent *ex, int n, uintptr_t map_end)
{
    uintptr_t page = (uintptr_t)sysconf(_SC_PAGESIZE);
    for (int i = 0; i < n; i++) {
        if (!ex[i].src || ex[i].len < WILLNEED_MIN)
            continue;
        uintptr_t start = (uintptr_t)ex[i].src & ~(page - 1), end = (uintptr_t)ex[i].src + ex[i].len;
        if (end > map_end)
            end = map_end;
        for (uintptr_t at = start; at < end; at += WILLNEED_CHUNK) {
            if (w->n == WILLNEED_BATCH)
                willneed_flush(w);
            w->v[w->n++] = (struct iovec){(void *)at, end - at < WILLNEED_CHUNK ? end - at : WILLNEED_CHUNK};
        }
    }
}

/* A pool on RADOS: the blocks of the extents into the cache, all at once
 * (remote.c reads what is not there yet, many requests in flight). */
static int fetch_extents(cb_pool *p, const uint8_t *map, const struct read_extent *ex, int n)
{
    struct cb_range want[READ_BATCH];
    int k = 0;
    for (int i = 0; i < n; i++)
        if (ex[i].src)
            want[k++] = (struct cb_range){(uint64_t)(ex[i].src - map), ex[i].len};
    return k ? remote_need(&p->data, want, k) : 0;
}

/* Reads resolve their blocks under the shared lock, then copy without it,
 * registered as readers with the data space map (which keeps the blocks
 * from being reused or written in place until they are done): a reader
 * blocked in a page fault, of a cold data page or of a destination buffer
 * that is itself slow to fault in, holds up no writer, commit or other
 * device. */
int64_t cb_dev_read(cb_pool *p, uint32_t id, void *buf, uint64_t len, uint64_t off)
{
    uint8_t *dst = buf;
    uint64_t pos = off, end = off + len;
    int r = 0;
    do {
        struct read_extent ex[READ_BATCH];
        int n = 0;
        pthread_rwlock_rdlock(&p->lock);
        struct cb_dev *d = pool_dev(p, id);
        if (!(r = range_check(p, d, id, "read", pos, end - pos)))
            r = read_resolve(p, d, &pos, end, ex, &n);
        /* As much again after the read, of the device: a reader that reads
         * on from here finds its blocks on the way, wherever they lie. */
        struct read_extent ahead[READ_BATCH];
        int n_ahead = 0;
        if (!r && pos == end && len >= WILLNEED_MIN && !p->data.remote && end < d->d.size) {
            uint64_t apos = end;
            if (read_resolve(p, d, &apos, len < d->d.size - end ? end + len : d->d.size, ahead,
                             &n_ahead))
                n_ahead = 0; /* a hint: its errors are the next read's to report */
        }
        uint32_t parity = sm_read_begin(&p->m.dsm);
        const uint8_t *map = p->data_map; /* the map ex[] points into */
        uintptr_t map_end = (uintptr_t)map + p->data_map_len;
        pthread_rwlock_unlock(&p->lock);
        uint32_t pin = remote_pin(&p->data); /* (the cache keeps what is copied) */
        if (!r && p->data.remote)
            r = fetch_extents(p, map, ex, n);
        else if (!r) {
            struct willneed w = {.n = 0};
            willneed_add(&w, ex, n, map_end);
            willneed_add(&w, ahead, n_ahead, map_end);
            willneed_flush(&w);
        }
        for (int i = 0; i < n && !r; i++) {
            if (ex[i].src)
                cb_copy_out(dst, ex[i].src, ex[i].len);
            else
                memset(dst, 0, ex[i].len);
            dst += ex[i].len;
        }
        remote_unpin(&p->data, pin);
        sm_read_end(&p->m.dsm, parity);
    } while (!r && pos < end);
    return r ? r : (int64_t)len;
}

/* Where vb maps, and whether the device may write it in place.
 * Returns 1 mapped, 0 unmapped, negative on error. */
static int lookup(cb_pool *p, struct cb_dev *d, uint32_t vb, uint32_t *blk, bool *exclusive)
{
    *exclusive = false;
    if (!d->d.mapping_root)
        return 0;
    struct bt_cursor cur = {.m = &p->m};
    int r = bt_seek(&cur, d->d.mapping_root, vb, true);
    if (r != 1 || bt_cur_key(&cur) != vb)
        return r < 0 ? r : 0;
    *blk = bt_cur_value(&cur);
    if (*blk >= p->m.sb.nr_data_blocks)
        return bad_block(p, *blk);
    if (!cur.shared_path) {
        uint32_t ref;
        if ((r = sm_get(&p->m, &p->m.dsm, *blk, &ref)) != 0)
            return r;
        /* A block whose count dropped in this transaction may still be
         * shared in the last commit: overwriting it in place would change
         * what another device reads after a crash. */
        *exclusive = ref == 1 && !sm_dropped(&p->m.dsm, *blk);
    }
    return 1;
}

static int write_in_place(cb_pool *p, uint32_t blk, uint64_t boff, const void *src, uint64_t n)
{
    uint64_t at = ((uint64_t)blk << p->block_shift) + boff;
    int r = src ? io_pwrite(&p->data, src, n, at) : io_write_zeroes(&p->data, at, n);
    if (!r)
        __atomic_add_fetch(&p->data_writes, 1, __ATOMIC_SEQ_CST);
    return r;
}

/* Write len bytes at byte at of the data file: from src, or zeroes. */
static int put(cb_pool *p, uint64_t at, const void *src, uint64_t len)
{
    if (!len)
        return 0;
    return src ? io_pwrite(&p->data, src, len, at) : io_write_zeroes(&p->data, at, len);
}

/* The writes that fill a new block at byte base: its first boff bytes and
 * its tail from old_bytes (zeroes when NULL), src (or zeroes) between; one
 * pwritev when the zeroes fit the static buffer, else piece by piece. */
static int fill_block_from(cb_pool *p, uint64_t base, const uint8_t *old_bytes, uint64_t boff,
                           const void *src, uint64_t n, uint64_t tail, bool mapped)
{
    bool zero_fits = (mapped || (boff <= sizeof zeroes && tail <= sizeof zeroes)) &&
                     (src || n <= sizeof zeroes);
    if (!zero_fits) {
        int r = put(p, base, old_bytes, boff);
        if (!r)
            r = put(p, base + boff, src, n);
        if (!r)
            r = put(p, base + boff + n, old_bytes ? old_bytes + boff + n : NULL, tail);
        return r;
    }
    struct iovec iov[3];
    int cnt = 0;
    if (boff)
        iov[cnt++] = (struct iovec){old_bytes ? (void *)old_bytes : (void *)zeroes, boff};
    iov[cnt++] = (struct iovec){src ? (void *)src : (void *)zeroes, n};
    if (tail)
        iov[cnt++] = (struct iovec){old_bytes ? (void *)(old_bytes + boff + n) : (void *)zeroes, tail};
    return io_pwritev(&p->data, iov, cnt, base);
}

/* Fill new block nb: the old block's bytes (or zeroes when unmapped) around
 * [boff, boff + n), src (or zeroes) inside. */
static int fill_new_block(cb_pool *p, uint32_t nb, bool mapped, uint32_t old, uint64_t boff,
                          const void *src, uint64_t n)
{
    uint64_t bs = p->block_size, base = (uint64_t)nb << p->block_shift, tail = bs - boff - n;
    const uint8_t *old_bytes = mapped ? p->data_map + ((uint64_t)old << p->block_shift) : NULL;
    uint32_t pin = 0;
    if (mapped && p->data.remote && (boff || tail)) { /* the old bytes kept, into the cache */
        uint64_t from = (uint64_t)old << p->block_shift;
        struct cb_range keep[2] = {{from, boff}, {from + boff + n, tail}};
        pin = remote_pin(&p->data); /* until they are copied */
        int r = remote_need(&p->data, boff ? keep : keep + 1, boff && tail ? 2 : 1);
        if (r) {
            remote_unpin(&p->data, pin);
            return r;
        }
    }
    int r = fill_block_from(p, base, old_bytes, boff, src, n, tail, mapped);
    remote_unpin(&p->data, pin);
    return r;
}

static int alloc_data_block(cb_pool *p, uint32_t *nb)
{
    uint64_t b;
    int r = sm_find_free(&p->m, &p->m.dsm, &b);
    if (r == -ENOSPC && (p->m.dsm.freed_this_txn > 0 || p->m.dsm.held_free > 0)) {
        /* Blocks freed in this transaction become reusable once it commits
         * and the readers that may still copy from them are done (a reader
         * stuck for long costs this write its ENOSPC, not a hang). */
        sm_wait_readers(&p->m.dsm, 1000);
        if ((r = pool_commit_locked_nowait(p)) != 0) /* not while an atomic section is open */
            return r;
        p->commits_waited++;
        r = sm_find_free(&p->m, &p->m.dsm, &b);
    }
    if (r == -ENOSPC)
        return cb_err(CB_E_DATA_SPACE, "the pool is out of data space: all %llu blocks are in use; grow it "
                      "with resize", (unsigned long long)p->m.sb.nr_data_blocks);
    if (r)
        return r;
    *nb = (uint32_t)b;
    return 0;
}

static int map_new_block(cb_pool *p, struct cb_dev *d, uint32_t vb, uint32_t nb);

/* Where one write's next new block should go: right after its last one, so
 * that a request's blocks are contiguous in the data file whatever other
 * writers allocate meanwhile.  On a local pool a sequential read of them is
 * then one disk read, not one per block: the FUSE server's parallel 1 MiB
 * writes had interleaved their 64 KiB blocks, and a cold 1 MiB read was 16
 * scattered extents.  On RADOS a later overwrite of them is one write per
 * object, not one per block.  The first block of a request moves the
 * allocator's hint past the room the rest of the request may take (blocks
 * skipped stay free; the hint wraps to them). */
struct alloc_goal {
    uint64_t next;   /* the block wanted; UINT64_MAX: none yet */
    uint64_t room;   /* blocks of the request after this piece */
};

static int alloc_near(cb_pool *p, struct alloc_goal *g, uint32_t *nb)
{
    if (!g)
        return alloc_data_block(p, nb);
    int r = g->next == UINT64_MAX ? 0 : sm_take_if_free(&p->m, &p->m.dsm, g->next);
    if (r < 0)
        return r;
    if (r == 1) {
        *nb = (uint32_t)g->next;
    } else {
        if ((r = alloc_data_block(p, nb)) != 0)
            return r;
        if (g->room && g->next == UINT64_MAX)
            p->m.dsm.alloc_hint = (*nb + 1 + g->room) % p->m.dsm.nr_blocks;
    }
    g->next = (uint64_t)*nb + 1;
    return 0;
}

/* One piece of a write inside block vb, with the write lock held: for
 * callers inside a larger change that holds the lock (zeroing, resize).  src NULL
 * writes zeroes; skip_unmapped leaves an unmapped block unmapped (it reads
 * as zeroes already). */
static int write_piece_locked(cb_pool *p, struct cb_dev *d, uint32_t vb, uint64_t boff,
                              const void *src, uint64_t n, bool skip_unmapped)
{
    uint32_t old = 0, nb;
    bool exclusive;
    int mapped = lookup(p, d, vb, &old, &exclusive);
    if (mapped < 0)
        return mapped;
    if (mapped && exclusive)
        return write_in_place(p, old, boff, src, n);
    if (!mapped && skip_unmapped)
        return 0;
    int r = meta_reserve_check(&p->m, 32);
    if (!r)
        r = alloc_data_block(p, &nb);
    if (r)
        return r;
    /* Fill, then count and map.  On failure nb stays busy until the next
     * commit and nothing refers to it. */
    if ((r = fill_new_block(p, nb, mapped, old, boff, src, n)) != 0)
        return r;
    return map_new_block(p, d, vb, nb);
}

/* ---- cells: one slow-path piece at a time per (device, block) ----
 * A piece that allocates fills its new block without the write lock, so
 * another piece of the same block must wait for it (else one of two
 * concurrent writes into different bytes of a block could be lost), and the
 * in-place fast path must not write a block whose copy is being made.  The
 * set of busy cells is small (one per thread in the slow path). */
struct cb_cell {
    uint32_t dev, vb;
};

static bool cell_find(cb_pool *p, uint32_t dev, uint32_t vb, size_t *at)
{
    for (size_t i = 0; i < p->nr_cells; i++) {
        if (p->cells[i].dev == dev && p->cells[i].vb == vb) {
            *at = i;
            return true;
        }
    }
    return false;
}

static int cell_acquire(cb_pool *p, uint32_t dev, uint32_t vb)
{
    size_t at;
    pthread_mutex_lock(&p->cell_lock);
    while (cell_find(p, dev, vb, &at))
        pthread_cond_wait(&p->cell_cond, &p->cell_lock);
    if (p->nr_cells == p->cap_cells) {
        size_t cap = p->cap_cells ? p->cap_cells * 2 : 16;
        struct cb_cell *c = realloc(p->cells, cap * sizeof *c);
        if (!c) {
            pthread_mutex_unlock(&p->cell_lock);
            return cb_err(CB_E_NO_MEMORY, "out of memory");
        }
        p->cells = c;
        p->cap_cells = cap;
    }
    p->cells[p->nr_cells++] = (struct cb_cell){dev, vb};
    __atomic_store_n(&p->cells_busy, p->nr_cells, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&p->cell_lock);
    return 0;
}

static void cell_release(cb_pool *p, uint32_t dev, uint32_t vb)
{
    size_t at;
    pthread_mutex_lock(&p->cell_lock);
    if (cell_find(p, dev, vb, &at))
        p->cells[at] = p->cells[--p->nr_cells];
    __atomic_store_n(&p->cells_busy, p->nr_cells, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->cell_cond);
    pthread_mutex_unlock(&p->cell_lock);
}

static bool cell_busy(cb_pool *p, uint32_t dev, uint32_t vb)
{
    if (!__atomic_load_n(&p->cells_busy, __ATOMIC_ACQUIRE))
        return false;
    size_t at;
    pthread_mutex_lock(&p->cell_lock);
    bool busy = cell_find(p, dev, vb, &at);
    pthread_mutex_unlock(&p->cell_lock);
    return busy;
}

static void pending_remove(cb_pool *p, uint32_t nb)
{
    for (size_t i = 0; i < p->pending.n; i++) {
        if (p->pending.v[i] == nb) {
            p->pending.v[i] = p->pending.v[--p->pending.n];
            return;
        }
    }
}

/* Map vb to the filled block nb, with the write lock held. */
static int map_new_block(cb_pool *p, struct cb_dev *d, uint32_t vb, uint32_t nb)
{
    struct bt_ctx c = {&p->m, CB_BT_MAP_LEAF};
    uint32_t replaced_value;
    bool replaced;
    int r;
    __atomic_add_fetch(&p->data_writes, 1, __ATOMIC_SEQ_CST);
    p->alloc_gen++;
    if ((r = sm_set(&p->m, &p->m.dsm, nb, 1)) != 0 ||
        (r = bt_insert(&c, &d->d.mapping_root, vb, &nb, &replaced_value, &replaced)) != 0)
        return pool_fail(p, r);
    if (replaced) {
        bool z;
        if ((r = sm_dec(&p->m, &p->m.dsm, replaced_value, &z)) != 0)
            return pool_fail(p, r);
    } else {
        d->d.mapped_blocks++;
    }
    d->changed = true;
    p->dirty = true;
    return 0;
}

/* One slow-path piece (no lock held on entry): allocate a block under the
 * write lock, fill it under the shared lock (so fills of different blocks
 * run in parallel, and snapshots and commits wait for them), then map it
 * under the write lock if the block's mapping did not change meanwhile;
 * else start over.  The new block stays "pending" (busy across commits)
 * until it is mapped or dropped. */
static int write_piece(cb_pool *p, uint32_t id, uint32_t vb, uint64_t boff, const void *src,
                       uint64_t n, bool skip_unmapped, struct alloc_goal *goal)
{
    int r = cell_acquire(p, id, vb);
    if (r)
        return r;
    for (;;) {
        pthread_rwlock_wrlock(&p->lock);
        struct cb_dev *d = pool_dev(p, id);
        uint32_t old = 0, nb = 0;
        bool exclusive = false;
        int mapped = !d ? cb_err(CB_E_NOT_FOUND, "no device with id %u", id) : pool_writable(p);
        if (!mapped)
            mapped = lookup(p, d, vb, &old, &exclusive);
        if (mapped < 0 || (mapped && exclusive) || (!mapped && skip_unmapped)) {
            r = mapped < 0 ? mapped : mapped ? write_in_place(p, old, boff, src, n) : 0;
            pthread_rwlock_unlock(&p->lock);
            break;
        }
        if ((r = meta_reserve_check(&p->m, 32)) == 0 && (r = alloc_near(p, goal, &nb)) == 0)
            r = u32vec_push(&p->pending, nb);
        pthread_rwlock_unlock(&p->lock);
        if (r)
            break;
        pthread_rwlock_rdlock(&p->lock);
        r = fill_new_block(p, nb, mapped, old, boff, src, n);
        pthread_rwlock_unlock(&p->lock);
        pthread_rwlock_wrlock(&p->lock);
        pending_remove(p, nb); /* mapped now, or left busy until the next commit */
        d = pool_dev(p, id);
        uint32_t now = 0;
        bool now_excl;
        int now_mapped = r || !d ? 0 : lookup(p, d, vb, &now, &now_excl);
        bool changed = !r && (!d || now_mapped != mapped || now != old);
        if (!r && !changed && now_mapped >= 0)
            r = map_new_block(p, d, vb, nb);
        else if (!r && now_mapped < 0)
            r = now_mapped;
        pthread_rwlock_unlock(&p->lock);
        if (r || !changed)
            break;
    }
    cell_release(p, id, vb);
    return r;
}

/* ---- scattered overwrites, on a pool on RADOS ----
 * Blocks sit in the data file where they were allocated, so after random
 * first writes a virtual MiB is 16 blocks over up to 16 objects, and a
 * 1 MiB overwrite in place is 16 RADOS writes of 64 KiB where RBD sends one
 * (benchmarks/rados_seqwrite.py).  Such a write of whole blocks is
 * redirected instead: the blocks the device owns alone are copied on write
 * like shared ones, and with the unmapped and shared ones among them they
 * get a free run of contiguous blocks, its first at an object's start,
 * filled with one write (one RADOS write per object).  The old blocks are
 * freed (or their counts dropped); like any block dropped in a transaction
 * they are not reused before the commit that unmaps them, so a crash before
 * it finds the old mappings and the old data.  The cost is mapping changes
 * written at the next commit, so this is only done where the usual way
 * would send at least two RADOS writes more than the run, and never when
 * no run is free or metadata space is short (then the usual way).  Local
 * pools write in place: a scattered write costs no more there. */
enum { REDIRECT_MIN = 3, REDIRECT_MAX = 256 }; /* blocks of one redirect */
static int redirect_local; /* cb_fault_redirect_local */

void cb_fault_redirect_local(int on)
{
    __atomic_store_n(&redirect_local, on, __ATOMIC_RELAXED);
}
#define UNMAPPED UINT32_MAX /* (past any data block: CB_MAX_BLOCKS < 2^32) */

/* The mappings of blocks vb.. (up to n: fewer when one is in another
 * writer's slow path, unless cells_ours), UNMAPPED for none, into blk; into
 * owned whether the device owns the block alone. */
static int plan_blocks(cb_pool *p, struct cb_dev *d, uint32_t id, uint32_t vb, uint64_t n,
                       bool cells_ours, uint32_t *blk, bool *owned, uint64_t *k)
{
    *k = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (!cells_ours && cell_busy(p, id, (uint32_t)(vb + i)))
            break;
        int r = lookup(p, d, (uint32_t)(vb + i), &blk[i], &owned[i]);
        if (r < 0)
            return r;
        if (r == 0)
            blk[i] = UNMAPPED;
        *k = i + 1;
    }
    return 0;
}

/* RADOS writes of the usual way: one per run of owned blocks contiguous
 * within an object, and per object's worth of the others (write_piece
 * gives a request's new blocks a contiguous run). */
static uint64_t writes_in_place(const uint32_t *blk, const bool *owned, uint64_t n,
                                uint64_t per_object)
{
    uint64_t writes = 0, fresh = 0;
    for (uint64_t i = 0; i < n; i++) {
        if (!owned[i]) {
            fresh++;
            continue;
        }
        writes += (fresh + per_object - 1) / per_object;
        fresh = 0;
        writes += !i || !owned[i - 1] || blk[i] != blk[i - 1] + 1 || blk[i] % per_object == 0;
    }
    return writes + (fresh + per_object - 1) / per_object;
}

static void cells_release(cb_pool *p, uint32_t id, uint32_t vb, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        cell_release(p, id, (uint32_t)(vb + i));
}

/* Write whole blocks vb.. (up to n of them, src NULL for zeroes) into a
 * fresh run as above when that pays.  Returns the blocks written, 0 when it
 * does not pay (the caller goes the usual way), negative on error. */
static int64_t redirect_scattered(cb_pool *p, uint32_t id, uint32_t vb, const uint8_t *src,
                                  uint64_t n)
{
    uint64_t per_object = remote_object_size() >> p->block_shift, k, same = 0, first = 0;
    uint32_t old[REDIRECT_MAX], now[REDIRECT_MAX];
    bool owned[REDIRECT_MAX];
    if (per_object < 2)
        return 0; /* a block fills an object: one write each anyway */
    n = n < REDIRECT_MAX ? n : REDIRECT_MAX;
    pthread_rwlock_rdlock(&p->lock);
    struct cb_dev *d = p->m.dsm.run_none ? NULL : pool_dev(p, id); /* none: no run is free */
    int r = d ? plan_blocks(p, d, id, vb, n, false, old, owned, &k) : 0;
    pthread_rwlock_unlock(&p->lock);
    if (r || !d || k < REDIRECT_MIN ||
        writes_in_place(old, owned, k, per_object) < (k + per_object - 1) / per_object + 2)
        return r;
    uint64_t held = 0;
    for (; held < k && !r; held++)
        r = cell_acquire(p, id, (uint32_t)(vb + held));
    if (r) {
        cells_release(p, id, vb, held - 1);
        return r;
    }
    /* Under the write lock: the mappings are still the ones planned (for a
     * prefix at least), and a run is free for them. */
    pthread_rwlock_wrlock(&p->lock);
    d = pool_dev(p, id);
    if (d && !(r = pool_writable(p)) && !(r = plan_blocks(p, d, id, vb, k, true, now, owned, &same)))
        for (uint64_t i = 0; i < same; i++)
            if (now[i] != old[i])
                same = i;
    int taken = 0;
    if (!r && same >= REDIRECT_MIN && meta_reserve_check(&p->m, 32 + 2 * same) == 0)
        taken = sm_take_run(&p->m, &p->m.dsm, same, per_object, &first);
    for (uint64_t i = 0; taken == 1 && i < same && !r; i++)
        r = u32vec_push(&p->pending, (uint32_t)(first + i));
    pthread_rwlock_unlock(&p->lock);
    if (taken < 0)
        r = taken;
    if (r || taken != 1) { /* (a run taken stays busy until the next commit) */
        if (taken == 1) {
            pthread_rwlock_wrlock(&p->lock);
            for (uint64_t i = 0; i < same; i++)
                pending_remove(p, (uint32_t)(first + i));
            pthread_rwlock_unlock(&p->lock);
        }
        cells_release(p, id, vb, k);
        return r;
    }
    pthread_rwlock_rdlock(&p->lock);
    r = put(p, first << p->block_shift, src, same << p->block_shift);
    pthread_rwlock_unlock(&p->lock);
    /* Map each block whose mapping nothing changed meanwhile (the cells
     * keep writers out, not discards or deletes); the rest goes the usual
     * way, its new block left busy until the next commit, as write_piece's. */
    bool moved[REDIRECT_MAX] = {false};
    pthread_rwlock_wrlock(&p->lock);
    for (uint64_t i = 0; i < same; i++)
        pending_remove(p, (uint32_t)(first + i));
    d = pool_dev(p, id);
    if (!r && !d)
        r = cb_err(CB_E_NOT_FOUND, "no device with id %u", id);
    for (uint64_t i = 0; i < same && !r; i++) {
        uint32_t blk;
        bool excl;
        int mapped = lookup(p, d, (uint32_t)(vb + i), &blk, &excl);
        if (mapped < 0)
            r = mapped;
        else if ((mapped ? blk : UNMAPPED) == old[i])
            r = map_new_block(p, d, (uint32_t)(vb + i), (uint32_t)(first + i));
        else
            moved[i] = true;
    }
    pthread_rwlock_unlock(&p->lock);
    cells_release(p, id, vb, k);
    for (uint64_t i = 0; i < same && !r; i++)
        if (moved[i])
            r = write_piece(p, id, (uint32_t)(vb + i), 0, src ? src + (i << p->block_shift) : NULL,
                            p->block_size, false, NULL);
    return r ? r : (int64_t)same;
}

/* Write [off, off + len) of a device, src NULL for zeroes.  Pieces in
 * blocks the device owns alone are written in place under the shared lock,
 * runs of them that are contiguous in the data file in one pwrite (on a
 * pool on RADOS, scattered ones may be redirected first); any other piece
 * goes through write_piece. */
static int write_range(cb_pool *p, uint32_t id, const void *src, uint64_t len, uint64_t off,
                       bool skip_unmapped)
{
    const uint8_t *s = src;
    uint64_t pos = off, end = off + len, bs = p->block_size;
    struct alloc_goal goal = {UINT64_MAX, 0};
    bool try_redirect = p->data.remote || __atomic_load_n(&redirect_local, __ATOMIC_RELAXED);
    while (pos < end) {
        uint32_t vb = (uint32_t)(pos >> p->block_shift);
        uint64_t boff = pos & (bs - 1);
        if (try_redirect && !boff && (end - pos) >> p->block_shift >= REDIRECT_MIN) {
            int64_t k = redirect_scattered(p, id, vb, s, (end - pos) >> p->block_shift);
            if (k < 0)
                return (int)k;
            try_redirect = k > 0; /* declined here: in place for the rest of the request */
            if (k > 0) {
                pos += (uint64_t)k << p->block_shift;
                if (s)
                    s += (uint64_t)k << p->block_shift;
                continue;
            }
        }
        pthread_rwlock_rdlock(&p->lock);
        struct cb_dev *d = pool_dev(p, id);
        int r = !d ? cb_err(CB_E_NOT_FOUND, "no device with id %u", id) : pool_writable(p);
        uint64_t run = 0; /* bytes of the in-place run starting at pos */
        uint32_t first_blk = 0;
        while (!r && pos + run < end) {
            uint32_t blk;
            bool exclusive;
            int mapped = lookup(p, d, (uint32_t)(vb + (boff + run) / bs), &blk, &exclusive);
            if (mapped < 0)
                r = mapped;
            if (mapped != 1 || !exclusive || (run && blk != first_blk + (boff + run) / bs) ||
                cell_busy(p, id, (uint32_t)(vb + (boff + run) / bs)))
                break;
            if (!run)
                first_blk = blk;
            uint64_t in_block = bs - (boff + run) % bs;
            run += in_block < end - pos - run ? in_block : end - pos - run;
        }
        if (!r && run)
            r = write_in_place(p, first_blk, boff, s, run);
        pthread_rwlock_unlock(&p->lock);
        if (r)
            return r;
        if (!run) {
            uint64_t n = bs - boff < end - pos ? bs - boff : end - pos;
            goal.room = (end - pos - n + bs - 1) >> p->block_shift;
            if ((r = write_piece(p, id, vb, boff, s, n, skip_unmapped, &goal)) != 0)
                return r;
            run = n;
        }
        pos += run;
        if (s)
            s += run;
    }
    return 0;
}

static int check_write(cb_pool *p, uint32_t id, const char *op, uint64_t off, uint64_t len)
{
    pthread_rwlock_rdlock(&p->lock);
    struct cb_dev *d = pool_dev(p, id);
    int r = range_check(p, d, id, op, off, len);
    if (!r)
        r = pool_writable(p);
    if (!r && (d->d.flags & CB_DEV_READ_ONLY))
        r = cb_err(CB_E_READ_ONLY, "device %u is read-only", id);
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int64_t cb_dev_write(cb_pool *p, uint32_t id, const void *buf, uint64_t len, uint64_t off)
{
    int r = check_write(p, id, "write", off, len);
    if (!r)
        r = write_range(p, id, buf, len, off, false);
    return r ? r : (int64_t)len;
}

/* Unmap whole blocks [first, last). Write lock held. */
static int unmap_blocks_locked(cb_pool *p, struct cb_dev *d, uint64_t first, uint64_t last)
{
    struct bt_ctx c = {&p->m, CB_BT_MAP_LEAF};
    const uint64_t chunk = 64;
    for (uint64_t b = first; b < last; b += chunk) {
        uint64_t e = b + chunk < last ? b + chunk : last, removed = 0;
        int r = meta_reserve_check(&p->m, 3 * chunk + 32);
        if (r)
            return r;
        if ((r = bt_remove_range(&c, &d->d.mapping_root, (uint32_t)b, e, &removed)) != 0)
            return pool_fail(p, r);
        if (removed) {
            d->d.mapped_blocks -= removed;
            d->changed = true;
            p->dirty = true;
        }
    }
    return 0;
}

/* Whole blocks inside [off, off + len); the device's last, partial block
 * counts as whole when the range reaches the end of the device. */
static void whole_blocks(cb_pool *p, struct cb_dev *d, uint64_t off, uint64_t len, uint64_t *first,
                         uint64_t *last)
{
    uint64_t bs = p->block_size, end = off + len;
    *first = (off + bs - 1) >> p->block_shift;
    *last = (end == d->d.size ? end + bs - 1 : end) >> p->block_shift;
    if (*last < *first)
        *last = *first;
}

int cb_dev_discard(cb_pool *p, uint32_t id, uint64_t off, uint64_t len)
{
    int r = check_write(p, id, "discard", off, len);
    if (r)
        return r;
    pthread_rwlock_wrlock(&p->lock);
    struct cb_dev *d = pool_dev(p, id);
    r = d ? pool_writable(p) : cb_err(CB_E_NOT_FOUND, "no device with id %u", id);
    if (!r) {
        uint64_t first, last;
        whole_blocks(p, d, off, len, &first, &last);
        r = unmap_blocks_locked(p, d, first, last);
    }
    pthread_rwlock_unlock(&p->lock);
    return r;
}

/* Zero [off, off + len) of d with the write lock held: unmap whole blocks,
 * write zeroes into mapped partial ones. */
int dev_zero_range_locked(cb_pool *p, struct cb_dev *d, uint64_t off, uint64_t len)
{
    uint64_t first, last, bs = p->block_size, end = off + len;
    whole_blocks(p, d, off, len, &first, &last);
    int r = unmap_blocks_locked(p, d, first, last);
    uint64_t head_end = first << p->block_shift < end ? first << p->block_shift : end;
    if (!r && off < head_end)
        r = write_piece_locked(p, d, (uint32_t)(off >> p->block_shift), off & (bs - 1), NULL,
                               head_end - off, true);
    uint64_t tail_start = last << p->block_shift;
    if (!r && tail_start < end && tail_start >= head_end)
        r = write_piece_locked(p, d, (uint32_t)last, 0, NULL, end - tail_start, true);
    return r;
}

int cb_dev_write_zeroes(cb_pool *p, uint32_t id, uint64_t off, uint64_t len, int may_unmap)
{
    int r = check_write(p, id, "write_zeroes", off, len);
    if (r || len == 0)
        return r;
    if (!may_unmap)
        return write_range(p, id, NULL, len, off, false);
    pthread_rwlock_wrlock(&p->lock);
    struct cb_dev *d = pool_dev(p, id);
    r = d ? pool_writable(p) : cb_err(CB_E_NOT_FOUND, "no device with id %u", id);
    if (!r)
        r = dev_zero_range_locked(p, d, off, len);
    pthread_rwlock_unlock(&p->lock);
    return r;
}

int cb_range_push(cb_range **v, uint64_t *n, uint64_t *cap, uint64_t begin, uint64_t len,
                      uint32_t kind)
{
    if (*n && (*v)[*n - 1].kind == kind && (*v)[*n - 1].begin + (*v)[*n - 1].length == begin) {
        (*v)[*n - 1].length += len;
        return 0;
    }
    if (*n == *cap) {
        uint64_t c = *cap ? *cap * 2 : 64;
        cb_range *nv = realloc(*v, c * sizeof *nv);
        if (!nv)
            return cb_err(CB_E_NO_MEMORY, "out of memory for %llu ranges", (unsigned long long)c);
        *v = nv;
        *cap = c;
    }
    (*v)[(*n)++] = (cb_range){begin, len, kind, 0};
    return 0;
}

int cb_dev_block_status(cb_pool *p, uint32_t id, uint64_t off, uint64_t len, cb_range **out,
                        uint64_t *count)
{
    *out = NULL;
    *count = 0;
    pthread_rwlock_rdlock(&p->lock);
    struct cb_dev *d = pool_dev(p, id);
    int r = range_check(p, d, id, "block status", off, len);
    if (r || len == 0)
        goto out;
    uint64_t first = off >> p->block_shift, last = (off + len - 1) >> p->block_shift, cap = 0;
    uint64_t vb = first;
    struct bt_cursor cur = {.m = &p->m};
    int have = d->d.mapping_root ? bt_seek(&cur, d->d.mapping_root, (uint32_t)first, true) : 0;
    while (vb <= last && r == 0) {
        if (have < 0) {
            r = have;
            break;
        }
        uint64_t key = have == 1 ? bt_cur_key(&cur) : last + 1;
        if (key > vb) { /* a hole up to the next mapping */
            uint64_t hole_end = key < last + 1 ? key : last + 1;
            r = cb_range_push(out, count, &cap, vb, hole_end - vb, CB_RANGE_UNMAPPED);
            vb = hole_end;
            continue;
        }
        uint32_t ref = 1;
        if (!cur.shared_path && (r = sm_get(&p->m, &p->m.dsm, bt_cur_value(&cur), &ref)) != 0)
            break;
        bool shared = cur.shared_path || ref > 1 || sm_dropped(&p->m.dsm, bt_cur_value(&cur));
        r = cb_range_push(out, count, &cap, vb, 1, shared ? CB_RANGE_SHARED : CB_RANGE_MAPPED);
        vb++;
        have = bt_next(&cur, d->d.mapping_root, true);
    }
out:
    pthread_rwlock_unlock(&p->lock);
    if (r) {
        free(*out);
        *out = NULL;
        *count = 0;
    }
    return r;
}

/* ---- whole data blocks, for copying a pool (cowblock/poolcopy.py) ---- */

static int data_range_check(cb_pool *p, uint64_t first, uint64_t count)
{
    if (first > p->m.sb.nr_data_blocks || count > p->m.sb.nr_data_blocks - first)
        return cb_err(CB_E_INVALID, "data blocks %llu..%llu are past the end of the pool "
                      "(%llu blocks)", (unsigned long long)first,
                      (unsigned long long)(first + count),
                      (unsigned long long)p->m.sb.nr_data_blocks);
    return 0;
}

int cb_pool_read_data(cb_pool *p, uint64_t first, uint64_t count, void *buf)
{
    pthread_rwlock_rdlock(&p->lock);
    int r = data_range_check(p, first, count);
    const uint8_t *src = p->data_map + (first << p->block_shift);
    uintptr_t map_end = (uintptr_t)p->data_map + p->data_map_len;
    uint32_t parity = sm_read_begin(&p->m.dsm);
    pthread_rwlock_unlock(&p->lock);
    uint32_t pin = remote_pin(&p->data);
    if (!r && p->data.remote) { /* a pool on RADOS: the blocks into the cache first */
        struct cb_range want = {first << p->block_shift, count << p->block_shift};
        r = remote_need(&p->data, &want, 1);
    }
    if (!r) {
        /* and as much again after it: a pool copy reads the data file in order */
        struct read_extent ahead = {src, 2 * (count << p->block_shift)};
        struct willneed w = {.n = 0};
        willneed_add(&w, &ahead, 1, map_end);
        willneed_flush(&w);
        cb_copy_out(buf, src, count << p->block_shift);
    }
    remote_unpin(&p->data, pin);
    sm_read_end(&p->m.dsm, parity);
    return r;
}

/* Only into blocks nothing maps, now or in the last commit: what any device
 * reads stays as it was.  The next commit fsyncs them before its metadata. */
int cb_pool_write_data(cb_pool *p, uint64_t first, uint64_t count, const void *buf)
{
    pthread_rwlock_wrlock(&p->lock);
    int r = pool_writable(p);
    if (!r)
        r = data_range_check(p, first, count);
    for (uint64_t b = first; !r && b < first + count; b++) {
        uint32_t ref;
        if ((r = sm_get(&p->m, &p->m.dsm, b, &ref)) == 0 && (ref || sm_dropped(&p->m.dsm, b)))
            r = cb_err(CB_E_BUSY, "data block %llu is in use: only free blocks are written "
                       "whole", (unsigned long long)b);
    }
    if (!r)
        r = io_pwrite(&p->data, buf, count << p->block_shift, first << p->block_shift);
    if (!r) {
        __atomic_add_fetch(&p->data_writes, 1, __ATOMIC_SEQ_CST);
        p->alloc_gen++;
    }
    pthread_rwlock_unlock(&p->lock);
    return r;
}
