/*
 * The I/O seam: every write, fsync and size change of a pool file goes
 * through these functions, so that tests can cut the power or fail an
 * operation at any point.
 *
 * Fault injection (cb_fault_set) is process-wide and meant for tests:
 *  - power cut at the Nth operation: every write made since the last fsync
 *    of its file is undone (its old bytes put back from an undo log kept
 *    while the mode is on); with CB_CUT_KEEP_NEWEST all but the most recent
 *    one, with CB_CUT_KEEP_RANDOM a random half of them (seeded by N), which
 *    model a disk that reordered writes; with CB_CUT_TEAR the Nth operation,
 *    when it is a write, reaches the disk torn (up to the 512-byte sector
 *    boundary nearest its middle).  Then every later operation fails with EIO, as if the machine
 *    were gone.
 *  - fail the Nth operation with EIO, once.
 * When injection is off the only cost is one relaxed load per call.
 */
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cowblock.h"

enum { FAULT_OFF, FAULT_POWER_CUT, FAULT_FAIL };

struct undo_rec {
    int fd;
    uint64_t off;
    size_t len;
    uint8_t *old;
};

static pthread_mutex_t fault_lock = PTHREAD_MUTEX_INITIALIZER;
static int fault_mode;
static int64_t fault_nth;
static int64_t fault_count;
static int fault_flags;
static bool dead;
static struct undo_rec *undo;
static size_t undo_n, undo_cap;

static void undo_clear_fd(int fd)
{
    size_t j = 0;
    for (size_t i = 0; i < undo_n; i++) {
        if (undo[i].fd == fd)
            free(undo[i].old);
        else
            undo[j++] = undo[i];
    }
    undo_n = j;
}

static void undo_all(void)
{
    size_t n = undo_n;
    if ((fault_flags & CB_CUT_KEEP_NEWEST) && n > 0)
        n--; /* the newest write reached the disk, the older ones did not */
    uint64_t rng = (uint64_t)fault_nth * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = n; i-- > 0;) {
        rng = rng * 6364136223846793005ull + 1442695040888963407ull;
        if ((fault_flags & CB_CUT_KEEP_RANDOM) && (rng >> 63))
            continue; /* this one reached the disk */
        ssize_t r = pwrite(undo[i].fd, undo[i].old, undo[i].len, (off_t)undo[i].off);
        (void)r;
    }
    for (size_t i = 0; i < undo_n; i++)
        free(undo[i].old);
    undo_n = 0;
}

/* The old bytes of the sectors a write touches: a disk loses or keeps
 * whole 512-byte sectors, never parts of one. */
static void undo_record(int fd, uint64_t off, size_t len)
{
    uint64_t end = (off + len + 511) & ~(uint64_t)511;
    off &= ~(uint64_t)511;
    len = (size_t)(end - off);
    if (undo_n == undo_cap) {
        undo_cap = undo_cap ? undo_cap * 2 : 256;
        undo = realloc(undo, undo_cap * sizeof *undo);
        if (!undo)
            abort(); /* test-only path */
    }
    uint8_t *old = malloc(len ? len : 1);
    if (!old)
        abort();
    ssize_t r = pread(fd, old, len, (off_t)off);
    undo[undo_n++] = (struct undo_rec){fd, off, r > 0 ? (size_t)r : 0, old};
}

/* Returns 0 to go ahead, -EIO when this operation is the one that fails, or
 * 1 when it is a write to tear: write *torn bytes of it, then fail. */
static int fault_gate(struct cb_file *f, const char *op, bool is_write, uint64_t off, size_t len,
                      size_t *torn)
{
    if (__atomic_load_n(&fault_mode, __ATOMIC_RELAXED) == FAULT_OFF)
        return 0;
    pthread_mutex_lock(&fault_lock);
    int ret = 0;
    if (dead) {
        ret = cb_err(CB_E_IO, "%s of %s failed: simulated power cut", op, f->name);
        goto out;
    }
    fault_count++;
    if (fault_mode == FAULT_POWER_CUT) {
        if (fault_count == fault_nth) {
            dead = true;
            /* Disks tear at sector boundaries of the device, not of the write. */
            uint64_t cut = (off + len / 2) & ~(uint64_t)511;
            if (torn && (fault_flags & CB_CUT_TEAR) && cut > off) {
                *torn = (size_t)(cut - off);
                ret = 1; /* the caller writes the torn part, then loses the rest */
            } else {
                undo_all();
                ret = cb_err(CB_E_IO, "%s of %s failed: simulated power cut", op, f->name);
            }
            goto out;
        }
        if (is_write)
            undo_record(f->fd, off, len);
    } else if (fault_mode == FAULT_FAIL && fault_count == fault_nth) {
        ret = cb_err(CB_E_IO, "%s of %s failed: injected I/O error", op, f->name);
    }
out:
    pthread_mutex_unlock(&fault_lock);
    return ret;
}

/* After an fsync of f returned: its writes survive the power cut.  Unless
 * the cut came (another thread's I/O) while it ran: then it never returned,
 * and the caller must not take its writes for durable. */
static int fault_synced(struct cb_file *f)
{
    if (__atomic_load_n(&fault_mode, __ATOMIC_RELAXED) != FAULT_POWER_CUT)
        return 0;
    pthread_mutex_lock(&fault_lock);
    int r = dead ? cb_err(CB_E_IO, "fsync of %s failed: simulated power cut", f->name) : 0;
    if (!dead)
        undo_clear_fd(f->fd);
    pthread_mutex_unlock(&fault_lock);
    return r;
}

int64_t cb_fault_set(int mode, int64_t nth, int flags)
{
    pthread_mutex_lock(&fault_lock);
    int64_t counted = fault_count;
    for (size_t i = 0; i < undo_n; i++)
        free(undo[i].old);
    undo_n = 0;
    fault_mode = mode;
    fault_nth = nth;
    fault_flags = flags;
    fault_count = 0;
    dead = false;
    pthread_mutex_unlock(&fault_lock);
    return counted;
}

static int io_error(struct cb_file *f, const char *op, uint64_t off, int err)
{
    if (err == ENOSPC || err == EDQUOT)
        return cb_err(CB_E_HOST_SPACE, "%s of %s at byte %llu: the host filesystem is full", op, f->name,
                      (unsigned long long)off);
    return cb_err(CB_E_IO, "%s of %s at byte %llu failed: %s", op, f->name, (unsigned long long)off,
                  strerror(err));
}

/* The iovecs of the first bytes of iov that end at the next multiple of
 * piece after off, in part[]; returns how many. */
static int first_piece(const struct iovec *iov, int cnt, uint64_t off, uint32_t piece,
                       struct iovec *part, int max)
{
    size_t want = piece - off % piece, got = 0;
    int k = 0;
    for (int i = 0; i < cnt && k < max && got < want; i++) {
        size_t len = iov[i].iov_len < want - got ? iov[i].iov_len : want - got;
        part[k++] = (struct iovec){iov[i].iov_base, len};
        got += len;
    }
    return k;
}

/* A write syscall writes at most f->write_piece bytes, up to the next
 * multiple of it in the file.  The page cache takes a buffered write into
 * folios as large as the write, and a later 4 KiB write into a large dirty
 * folio costs the more the larger it is (ext4 walks every block of the
 * folio): over NBD, 4 KiB overwrites of a device filled by 1 MiB writes ran
 * at 42-48k IOPS, 114-126k after a fill in 64 KiB pieces (16 KiB: 156k;
 * 256 KiB: 80-85k; nbdkit's file plugin, whose file takes 1 MiB writes
 * whole: 42-54k), and 1 MiB sequential writes were faster in pieces too
 * (2,500-2,680 MB/s against 2,215-2,475). */
static int write_all(struct cb_file *f, struct iovec *iov, int cnt, uint64_t off)
{
    while (cnt > 0) {
        struct iovec part[64];
        int k = f->write_piece ? first_piece(iov, cnt, off, f->write_piece, part, 64) : 0;
        ssize_t n = k ? pwritev(f->fd, part, k, (off_t)off)
                      : pwritev(f->fd, iov, cnt > 1024 ? 1024 : cnt, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return io_error(f, "write", off, errno);
        }
        off += (uint64_t)n;
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0 && n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* Write the first torn bytes of the vector, then lose the unsynced writes:
 * in that order, the torn sectors hold what the page cache held around the
 * write, as the sectors a disk writes do, and an older write lost after
 * them takes whole sectors with it. */
static int write_torn(struct cb_file *f, struct iovec *iov, int cnt, uint64_t off, size_t torn)
{
    int keep = 0;
    while (keep < cnt && torn > 0) {
        if (iov[keep].iov_len > torn)
            iov[keep].iov_len = torn;
        torn -= iov[keep++].iov_len;
    }
    write_all(f, iov, keep, off);
    pthread_mutex_lock(&fault_lock);
    undo_all();
    pthread_mutex_unlock(&fault_lock);
    return cb_err(CB_E_IO, "write of %s failed: simulated power cut (torn write)", f->name);
}

int io_pwritev(struct cb_file *f, struct iovec *iov, int cnt, uint64_t off)
{
    size_t total = 0, torn = 0;
    for (int i = 0; i < cnt; i++)
        total += iov[i].iov_len;
    int r = fault_gate(f, "write", true, off, total, &torn);
    if (r > 0)
        return write_torn(f, iov, cnt, off, torn);
    if (r || !f->remote)
        return r ? r : write_all(f, iov, cnt, off);
    uint32_t pin = remote_pin(f); /* (a bounded cache drops nothing of it meanwhile) */
    if ((r = remote_will_write(f, off, total)) == 0) {
        remote_begin(f); /* RADOS gets the writes in the order the cache does */
        r = remote_write(f, iov, cnt, off);
        if (!r)
            r = write_all(f, iov, cnt, off);
        remote_end(f);
    }
    remote_unpin(f, pin);
    return r;
}

int io_pwrite(struct cb_file *f, const void *buf, size_t len, uint64_t off)
{
    struct iovec iov = {(void *)buf, len};
    return io_pwritev(f, &iov, 1, off);
}

static const uint8_t zero_page[65536];

int io_write_zeroes(struct cb_file *f, uint64_t off, uint64_t len)
{
    /* Large ranges: let the filesystem zero them (also allocates space). */
    if (len >= (1u << 20)) {
        int r = fault_gate(f, "zero", true, off, len, NULL);
        uint32_t pin = f->remote ? remote_pin(f) : 0;
        if (!r && f->remote)
            r = remote_will_write(f, off, len);
        if (!r && fallocate(f->fd, FALLOC_FL_ZERO_RANGE, (off_t)off, (off_t)len) == 0)
            r = f->remote ? remote_discard(f, off, len) : 0;
        else if (!r && errno != EOPNOTSUPP && errno != EINVAL)
            r = io_error(f, "fallocate", off, errno);
        else if (!r)
            r = 1; /* zeroed below */
        if (pin)
            remote_unpin(f, pin);
        if (r <= 0)
            return r;
    }
    while (len > 0) {
        struct iovec iov[64];
        int cnt = 0;
        uint64_t chunk = 0;
        while (cnt < 64 && chunk < len) {
            uint64_t n = len - chunk < sizeof zero_page ? len - chunk : sizeof zero_page;
            iov[cnt++] = (struct iovec){(void *)zero_page, n};
            chunk += n;
        }
        int r = io_pwritev(f, iov, cnt, off);
        if (r)
            return r;
        off += chunk;
        len -= chunk;
    }
    return 0;
}

int io_fsync(struct cb_file *f)
{
    int r = fault_gate(f, "fsync", false, 0, 0, NULL);
    if (r)
        return r;
    if (f->remote) /* the cache needs no sync: RADOS holds the pool */
        return remote_wait(f);
    if (fdatasync(f->fd) != 0)
        return cb_err(CB_E_IO, "fsync of %s failed: %s", f->name, strerror(errno));
    return fault_synced(f);
}

int io_truncate(struct cb_file *f, uint64_t size)
{
    int r = fault_gate(f, "truncate", false, 0, 0, NULL);
    if (r)
        return r;
    if (ftruncate(f->fd, (off_t)size) != 0)
        return io_error(f, "truncate", size, errno);
    return f->remote ? remote_set_size(f, size) : 0;
}

int io_punch_hole(struct cb_file *f, uint64_t off, uint64_t len)
{
    int r = fault_gate(f, "punch", true, off, len, NULL);
    uint32_t pin = f->remote ? remote_pin(f) : 0;
    if (!r && f->remote)
        r = remote_will_write(f, off, len);
    if (!r && fallocate(f->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                        (off_t)len) != 0)
        r = io_error(f, "punch hole", off, errno);
    if (!r && f->remote)
        r = remote_discard(f, off, len);
    if (pin)
        remote_unpin(f, pin);
    return r;
}
