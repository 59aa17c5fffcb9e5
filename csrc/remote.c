/*
 * Pools on Ceph RADOS: the remote side of the I/O seam (see remote.h for
 * the object layout).
 *
 * Object size: 1 MiB for data and metadata alike, by measurement
 * (benchmarks/rados_object_size.py, results/rados_object_size.json): 4 KiB
 * random writes and reads at QD16 were within noise from 64 KiB to 1 MiB
 * objects and slower at 4 MiB, while 1 MiB sequential I/O ran 2-5x faster
 * into 1 MiB objects than into 64-256 KiB ones (one request per object a
 * range touches).  1 MiB also keeps an open's fetch to few requests and
 * still lets TRIM of 1 MiB-aligned ranges remove whole objects.
 *
 * Writes: every write of the cache is also sent to RADOS with
 * rados_aio_write (the data copied, so the caller's buffer is free at once);
 * up to MAX_INFLIGHT requests are in flight.  remote_wait (the seam's fsync)
 * waits until all of them are acknowledged, which for RADOS means durable
 * on the OSDs.  The commit's order is then the local one: data, new
 * metadata blocks, wait, superblock.  A superblock write is one RADOS op
 * that also compares the pool's epoch xattr with the one this writer set
 * when it took the lock: a writer whose lock was broken and whose epoch was
 * raised by the next one fails atomically (fencing), before it can commit.
 * Any failed request sticks: every later wait fails, and the engine turns
 * the pool read-only with needs_check, as after a failed fsync.
 *
 * Reads: the engine's mmap reads the cache files, which an open leaves
 * empty and reads fill on first use (see "reads" below).
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cowblock.h"
#include "remote.h"

#define OBJECT_SIZE (1u << 20)
#define SB_BYTES (2u * CB_META_BLOCK_SIZE) /* the superblock object: slots 0 and 1 */
#define SB_OBJECT "superblock"
#define LOCK_NAME "cowblock"
#define MAX_INFLIGHT 256
#define HELD_STREAMS 16        /* sequential streams held back at once (writers at QD16) */
#define ALIVE_TIMEOUT_MS 5000  /* a holder that does not answer a notify in this is dead */

uint64_t remote_object_size(void)
{
    return OBJECT_SIZE;
}

#ifndef COWBLOCK_HAVE_RADOS

static int no_rados(void)
{
    return cb_err(CB_E_UNSUPPORTED, "this cowblock was built without librados: install "
                  "librados-dev (Debian) and reinstall cowblock for pools on RADOS");
}
int cb_remote_available(void) { return 0; }
int cb_remote_connect(const char *conf, const char *ceph_pool, const char *name, double timeout,
                      cb_remote **out) { *out = NULL; return no_rados(); }
int cb_remote_create(cb_remote *r) { return no_rados(); }
int cb_remote_lock(cb_remote *r, const char *cookie, const char *description) { return no_rados(); }
int cb_remote_fetch(cb_remote *r, const char *dir) { return no_rados(); }
int cb_remote_destroy(cb_remote *r) { return no_rados(); }
int cb_remote_cache_metadata(cb_remote *r) { return no_rados(); }
int cb_remote_close(cb_remote *r) { return 0; }
uint64_t cb_remote_requests(cb_remote *r, int kind) { return 0; }
void remote_begin(struct cb_file *f) {}
void remote_end(struct cb_file *f) {}
int remote_write(struct cb_file *f, const struct iovec *iov, int cnt, uint64_t off) { return no_rados(); }
int remote_discard(struct cb_file *f, uint64_t off, uint64_t len) { return no_rados(); }
int remote_set_size(struct cb_file *f, uint64_t size) { return no_rados(); }
int remote_wait(struct cb_file *f) { return no_rados(); }
int remote_need(struct cb_file *f, const struct cb_range *ranges, int count) { return no_rados(); }
int remote_will_write(struct cb_file *f, uint64_t off, uint64_t len) { return no_rados(); }
void remote_set_block_size(struct cb_file *f, uint32_t block_size) {}
uint32_t remote_pin(struct cb_file *f) { return 0; }
void remote_unpin(struct cb_file *f, uint32_t pin) {}
int cb_remote_set_cache_limit(cb_remote *r, uint64_t bytes) { return no_rados(); }

#else

#include <rados/librados.h>

struct cb_remote {
    rados_t cluster;
    rados_ioctx_t io;
    bool connected, locked, watching;
    uint64_t watch;            /* our watch on the superblock object: the sign we are alive */
    char pool[128], name[128];
    char cookie[256];
    char epoch[24];            /* ours once locked: every superblock write compares it */
    pthread_mutex_t order;     /* held from a write's local copy to its send */
    pthread_mutex_t mu;        /* the rest */
    pthread_cond_t cond;
    uint32_t inflight;
    int err;                   /* the first failed request's errno (negative), sticky */
    char err_what[256];
    uint64_t requests[4];      /* reads, writes, removes, reads of data objects */
    uint64_t fetched;          /* bytes read from RADOS into the cache */
    uint64_t data_writes;      /* writes (and zeroing writes) of data objects */
    pthread_cond_t fetched_cond; /* a fetch ended (mu) */
    struct lazy {              /* what the cache holds of a file: data [0], metadata [1] */
        uint8_t *state;        /* a byte a unit (UNIT_*); NULL: all of it (a pool made here) */
        uint32_t shift;        /* a unit is 1 << shift bytes */
        int fd;                /* the cache file, read-write even for a read-only open */
        uint64_t size;
        uint8_t *used;         /* bounded data: a bit a unit, read or written since the
                                  clock passed */
        uint64_t present;      /* units present (mu): what the bound counts */
    } lazy[2];
    /* The bound on the data cache (see "the bound" below). */
    uint64_t cache_limit;      /* bytes; 0: none */
    uint64_t evicted;          /* bytes dropped from the cache so far */
    uint32_t pins[2], pin_epoch; /* threads reading or writing the cache, by parity */
    uint64_t hand;             /* the clock's next unit */
    bool evictor_running, evictor_stop;
    pthread_t evictor;
    pthread_cond_t evict_cond; /* the cache grew past the bound, or stop (mu) */
    struct held {              /* writes not sent yet, that the next may extend (order held) */
        char oid[64];
        uint64_t at;
        uint8_t *buf;
        size_t len, cap;
        uint64_t used;         /* when last extended, for choosing one to send */
    } held[HELD_STREAMS];
    uint64_t held_clock;
};

enum { REQ_READ, REQ_WRITE, REQ_REMOVE, REQ_DATA_READ, REQ_KINDS };
enum { UNIT_ABSENT, UNIT_FETCHING, UNIT_PRESENT, UNIT_EVICTING, UNIT_PUNCHING };
/* The state maps, reserved (not committed) for the largest files: data
 * units are at least 1/16 of a block. */
#define UNIT_MIN 4096u
static const uint64_t state_bytes[2] = {16 * CB_MAX_BLOCKS, CB_MAX_BLOCKS};

static const uint8_t zero_object[OBJECT_SIZE];

/* A librados error as an engine error.  A full OSD answers ENOSPC, a pool
 * over its quota EDQUOT: both are no space, named apart because the one is
 * fixed by the cluster's operator and the other by the pool's. */
static int rados_error(int rv, const char *what)
{
    int err = -rv;
    if (err == ENOSPC)
        return cb_err(CB_E_HOST_SPACE, "%s: the Ceph cluster is full (%s; see `ceph health detail`)",
                      what, strerror(err));
    if (err == EDQUOT)
        return cb_err(CB_E_HOST_SPACE, "%s: the Ceph pool's quota is reached (%s; see `ceph osd "
                      "pool get-quota`)", what, strerror(err));
    if (err == ETIMEDOUT)
        return cb_err(CB_E_TIMEOUT, "%s: the Ceph cluster did not answer in time", what);
    if (err == EACCES || err == EPERM)
        return cb_err(CB_E_DENIED, "%s: the Ceph cluster refused this client (%s; see the caps in "
                      "README.md)", what, strerror(err));
    return cb_err(CB_E_IO, "%s failed: %s", what, strerror(err));
}

uint64_t cb_remote_requests(cb_remote *r, int kind)
{
    if (!r || kind < 0 || kind > REQ_KINDS + 3)
        return 0;
    pthread_mutex_lock(&r->mu);
    uint64_t counters[4] = {r->fetched, r->data_writes, r->lazy[0].present << r->lazy[0].shift,
                            r->evicted};
    uint64_t n = kind >= REQ_KINDS ? counters[kind - REQ_KINDS] : r->requests[kind];
    pthread_mutex_unlock(&r->mu);
    return n;
}

int cb_remote_available(void)
{
    return 1;
}

/* $CEPH_ARGS in words, as Ceph's tools split it, after an argv[0]: read at
 * every connect.  (rados_conf_parse_env reads it once per process and keeps
 * that for good, so a second pool opened under another client would
 * connect with the first one's options.) */
#define MAX_CEPH_ARGS 64
struct ceph_args {
    char *copy;
    int argc;
    const char *argv[MAX_CEPH_ARGS + 1];
};

static int ceph_args_split(struct ceph_args *a)
{
    const char *env = getenv("CEPH_ARGS");
    char *save = NULL;
    a->argc = 0;
    a->argv[a->argc++] = "cowblock";
    a->copy = env ? strdup(env) : NULL;
    if (env && !a->copy)
        return cb_err(CB_E_NO_MEMORY, "out of memory");
    for (char *w = a->copy ? strtok_r(a->copy, " \t\n", &save) : NULL; w;
         w = strtok_r(NULL, " \t\n", &save)) {
        if (a->argc > MAX_CEPH_ARGS) {
            free(a->copy);
            return cb_err(CB_E_INVALID, "$CEPH_ARGS has more than %d words", MAX_CEPH_ARGS);
        }
        a->argv[a->argc++] = w;
    }
    return 0;
}

/* The client's name in the words (--id X, -i X, --user X: client.X; --name
 * T.X, -n T.X; each also as --opt=value), into out; false when none is
 * given (client.admin).  Ceph's tools take these in their own argument
 * parsing, before the config's, which skips them. */
static bool ceph_args_name(const struct ceph_args *a, char *out, size_t n)
{
    static const struct {
        const char *opt, *prefix;
    } opts[] = {{"--id", "client."}, {"-i", "client."}, {"--user", "client."}, {"--name", ""},
                {"-n", ""}};
    bool found = false;
    for (int k = 1; k < a->argc; k++) {
        for (size_t i = 0; i < sizeof opts / sizeof *opts; i++) {
            size_t len = strlen(opts[i].opt);
            const char *val;
            if (strcmp(a->argv[k], opts[i].opt) == 0)
                val = k + 1 < a->argc ? a->argv[++k] : NULL;
            else if (strncmp(a->argv[k], opts[i].opt, len) == 0 && a->argv[k][len] == '=')
                val = a->argv[k] + len + 1;
            else
                continue;
            if (val && *val) {   /* the last one given wins, as in Ceph's tools */
                snprintf(out, n, "%s%s", opts[i].prefix, val);
                found = true;
            }
            break;
        }
    }
    return found;
}

int cb_remote_connect(const char *conf, const char *ceph_pool, const char *name, double timeout,
                      cb_remote **out)
{
    *out = NULL;
    if (!ceph_pool || !*ceph_pool || strlen(ceph_pool) >= 128 || !name || !*name ||
        strlen(name) >= 128)
        return cb_err(CB_E_INVALID, "a Ceph pool name and a pool name of 1 to 127 bytes are needed");
    cb_remote *r = calloc(1, sizeof *r);
    if (!r)
        return cb_err(CB_E_NO_MEMORY, "out of memory");
    pthread_mutex_init(&r->order, NULL);
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cond, NULL);
    pthread_cond_init(&r->fetched_cond, NULL);
    pthread_cond_init(&r->evict_cond, NULL);
    for (int i = 0; i < 2; i++)
        r->lazy[i] = (struct lazy){.fd = -1, .shift = 12};
    snprintf(r->pool, sizeof r->pool, "%s", ceph_pool);
    snprintf(r->name, sizeof r->name, "%s", name);
    struct ceph_args args;
    int rv = ceph_args_split(&args);
    if (rv < 0) {
        free(r);
        return rv;
    }
    char client[160] = "";
    bool named = ceph_args_name(&args, client, sizeof client);
    rv = named ? rados_create2(&r->cluster, "ceph", client, 0) : rados_create(&r->cluster, NULL);
    if (rv < 0) {
        free(args.copy);
        free(r);
        return named && rv == -EINVAL ? cb_err(CB_E_INVALID, "$CEPH_ARGS names the Ceph client "
                                               "%s, which is not TYPE.ID (client.NAME)", client)
                                      : rados_error(rv, "creating a Ceph client");
    }
    /* The conf file, and $CEPH_ARGS (--keyring, ...) over it, as Ceph's tools do */
    rv = rados_conf_read_file(r->cluster, conf && *conf ? conf : NULL);
    if (rv < 0) {
        free(args.copy);
        rados_shutdown(r->cluster);
        free(r);
        if (conf && *conf)
            return cb_err(CB_E_INVALID, "cannot read the Ceph configuration %s: %s", conf,
                          strerror(-rv));
        return cb_err(CB_E_INVALID, "no Ceph configuration found (set $CEPH_CONF or --ceph-conf, "
                      "or make /etc/ceph/ceph.conf): %s", strerror(-rv));
    }
    rv = rados_conf_parse_argv(r->cluster, args.argc, args.argv);
    free(args.copy);
    if (rv < 0) {
        rados_shutdown(r->cluster);
        free(r);
        return cb_err(CB_E_INVALID, "Ceph refuses an option in $CEPH_ARGS (%s): %s",
                      getenv("CEPH_ARGS"), strerror(-rv));
    }
    /* Without these, connecting to a cluster that is not there, or a monitor
     * call while no OSD serves a placement group, waits for ever.  Data
     * operations keep Ceph's default (no timeout): they block while an OSD
     * is away, as RBD's do. */
    char t[32];
    snprintf(t, sizeof t, "%g", timeout > 0 ? timeout : 30.0);
    rados_conf_set(r->cluster, "client_mount_timeout", t);
    rados_conf_set(r->cluster, "rados_mon_op_timeout", t);
    rv = rados_connect(r->cluster);
    if (rv < 0) {
        rados_shutdown(r->cluster);
        free(r);
        return rados_error(rv, "connecting to the Ceph cluster");
    }
    r->connected = true;
    rv = rados_ioctx_create(r->cluster, ceph_pool, &r->io);
    if (rv < 0) {
        int e = rv == -ENOENT ? cb_err(CB_E_NOT_FOUND, "the Ceph cluster has no pool %s "
                                       "(ceph osd pool create %s)", ceph_pool, ceph_pool)
                              : rados_error(rv, "opening the Ceph pool");
        rados_shutdown(r->cluster);
        free(r);
        return e;
    }
    rados_ioctx_set_namespace(r->io, name);
    /* A full cluster or a pool over its quota fails writes (ENOSPC,
     * EDQUOT: NoSpaceError) instead of pausing them until space is freed. */
    rados_set_pool_full_try(r->io);
    *out = r;
    return 0;
}

static int get_xattr_u64(cb_remote *r, const char *key, uint64_t *v)
{
    char buf[32];
    int n = rados_getxattr(r->io, SB_OBJECT, key, buf, sizeof buf - 1);
    if (n < 0)
        return n;
    buf[n] = 0;
    char *end;
    *v = strtoull(buf, &end, 10);
    return end == buf ? -EINVAL : 0;
}

int cb_remote_create(cb_remote *r)
{
    rados_write_op_t op = rados_create_write_op();
    rados_write_op_create(op, LIBRADOS_CREATE_EXCLUSIVE, NULL);
    rados_write_op_setxattr(op, "epoch", "00000000000000000000", 20);
    rados_write_op_write(op, (const char *)zero_object, SB_BYTES, 0);
    int rv = rados_write_op_operate(op, r->io, SB_OBJECT, NULL, 0);
    rados_release_write_op(op);
    if (rv == -EEXIST)
        return cb_err(CB_E_EXISTS, "a pool exists at rados:%s/%s already", r->pool, r->name);
    return rv < 0 ? rados_error(rv, "creating the pool's superblock object") : 0;
}

struct holder {
    char client[128], cookie[256], addr[256];
};

static int get_holder(cb_remote *r, struct holder *h)
{
    char tag[256];
    size_t tl = sizeof tag, cl = sizeof h->client, kl = sizeof h->cookie, al = sizeof h->addr;
    int exclusive = 0;
    memset(h, 0, sizeof *h);
    ssize_t n = rados_list_lockers(r->io, SB_OBJECT, LOCK_NAME, &exclusive, tag, &tl, h->client,
                                   &cl, h->cookie, &kl, h->addr, &al);
    return (int)n;
}

/* The holder answers the notify through its watch (on_notify) while its
 * process lives and reaches the cluster; a killed one does not, and its
 * watch times out in the OSD later (osd_client_watch_timeout, 30 s). */
static bool holder_alive(cb_remote *r, const struct holder *h)
{
    char *reply = NULL;
    size_t reply_len = 0;
    int rv = rados_notify2(r->io, SB_OBJECT, "alive?", 6, ALIVE_TIMEOUT_MS, &reply, &reply_len);
    if (rv < 0 && rv != -ETIMEDOUT) {
        if (reply)
            rados_buffer_free(reply);
        return true; /* cannot tell: never break a lock on a guess */
    }
    struct notify_ack_t *acks = NULL;
    struct notify_timeout_t *timeouts = NULL;
    size_t nr_acks = 0, nr_timeouts = 0;
    bool alive = true;
    if (reply && rados_decode_notify_response(reply, reply_len, &acks, &nr_acks, &timeouts,
                                              &nr_timeouts) == 0) {
        alive = false;
        uint64_t gid = strncmp(h->client, "client.", 7) == 0 ? strtoull(h->client + 7, NULL, 10) : 0;
        for (size_t i = 0; i < nr_acks; i++)
            if (acks[i].notifier_id == gid)
                alive = true;
        rados_free_notify_response(acks, nr_acks, timeouts);
    }
    if (reply)
        rados_buffer_free(reply);
    return alive;
}

static void on_notify(void *arg, uint64_t notify_id, uint64_t handle, uint64_t notifier_id,
                      void *data, size_t data_len)
{
    cb_remote *r = arg;
    rados_notify_ack(r->io, SB_OBJECT, notify_id, handle, r->cookie, (unsigned)strlen(r->cookie));
}

/* Our watch failed: we may have been blocklisted, or cut off long enough
 * for another writer to take over.  Nothing more may be committed. */
static void on_watch_error(void *arg, uint64_t cookie, int err)
{
    cb_remote *r = arg;
    pthread_mutex_lock(&r->mu);
    if (!r->err) {
        r->err = err < 0 ? err : -EIO;
        snprintf(r->err_what, sizeof r->err_what, "keeping the pool's lock (its watch was lost: "
                 "this writer was blocklisted or cut off from the cluster)");
    }
    pthread_mutex_unlock(&r->mu);
}

static int take_lock(cb_remote *r, const char *description)
{
    return rados_lock_exclusive(r->io, SB_OBJECT, LOCK_NAME, r->cookie, description, NULL, 0);
}

/* The lock is held: refuse, naming the holder, unless the holder is dead,
 * in which case fence it (blocklist its address, so none of its writes
 * lands any more) and break its lock, as librbd does. */
static int lock_held(cb_remote *r, const char *description)
{
    struct holder h;
    int rv;
    if (get_holder(r, &h) <= 0) { /* released meanwhile */
        rv = take_lock(r, description);
        if (rv == -EBUSY || rv == -EEXIST)
            return cb_err(CB_E_BUSY, "pool rados:%s/%s is in use by another writer", r->pool,
                          r->name);
        return rv < 0 ? rados_error(rv, "taking the pool's lock") : 0;
    }
    if (holder_alive(r, &h))
        return cb_err(CB_E_BUSY, "pool rados:%s/%s is in use: open for writing by %s (Ceph %s at "
                      "%s)", r->pool, r->name, h.cookie, h.client, h.addr);
    rv = rados_blocklist_add(r->cluster, h.addr, 0);
    if (rv < 0)
        return rados_error(rv, "blocklisting the pool's dead writer (it needs the mon cap "
                           "'osd blocklist')");
    rv = rados_break_lock(r->io, SB_OBJECT, LOCK_NAME, h.client, h.cookie);
    if (rv < 0 && rv != -ENOENT)
        return rados_error(rv, "breaking the dead writer's lock");
    rv = take_lock(r, description);
    if (rv == -EBUSY || rv == -EEXIST)
        return cb_err(CB_E_BUSY, "pool rados:%s/%s: another writer took the lock of a dead one "
                      "first", r->pool, r->name);
    return rv < 0 ? rados_error(rv, "taking the pool's lock") : 0;
}

int cb_remote_lock(cb_remote *r, const char *cookie, const char *description)
{
    if (r->locked)
        return 0;
    snprintf(r->cookie, sizeof r->cookie, "%s", cookie);
    uint64_t old, size;
    time_t mtime;
    /* (a lock on a missing object would make it) */
    int rv = rados_stat(r->io, SB_OBJECT, &size, &mtime);
    if (rv == -ENOENT)
        return cb_err(CB_E_NOT_FOUND, "no pool at rados:%s/%s", r->pool, r->name);
    if (rv < 0)
        return rados_error(rv, "looking for the pool's superblock object");
    /* The watch first: a rival that finds our lock asks the watchers
     * whether we live, and a holder that were not watching yet would be
     * taken for dead, blocklisted and robbed of its lock (two writers
     * racing for a free pool, tests/test_rados.py). */
    if (!r->watching) {
        rv = rados_watch3(r->io, SB_OBJECT, &r->watch, on_notify, on_watch_error, 0, r);
        if (rv < 0)
            return rados_error(rv, "watching the pool's superblock object");
        r->watching = true;
    }
    rv = take_lock(r, description);
    if ((rv == -EBUSY || rv == -EEXIST) && (rv = lock_held(r, description)) < 0)
        return rv;
    if (rv < 0)
        return rados_error(rv, "taking the pool's lock");
    r->locked = true;
    /* A new epoch, set only if the old one is still there: two writers that
     * both think they hold the lock cannot both raise it from one value. */
    if ((rv = get_xattr_u64(r, "epoch", &old)) < 0)
        return rv == -ENODATA ? cb_err(CB_E_NOT_FOUND, "no pool at rados:%s/%s (its superblock "
                                       "object has no epoch)", r->pool, r->name)
                              : rados_error(rv, "reading the pool's epoch");
    char was[24];
    snprintf(was, sizeof was, "%020llu", (unsigned long long)old);
    snprintf(r->epoch, sizeof r->epoch, "%020llu", (unsigned long long)old + 1);
    rados_write_op_t op = rados_create_write_op();
    rados_write_op_cmpxattr(op, "epoch", LIBRADOS_CMPXATTR_OP_EQ, was, 20);
    rados_write_op_setxattr(op, "epoch", r->epoch, 20);
    rv = rados_write_op_operate(op, r->io, SB_OBJECT, NULL, 0);
    rados_release_write_op(op);
    return rv < 0 ? rados_error(rv, "raising the pool's epoch") : 0;
}

/* ---- writes ---- */
struct request {
    cb_remote *r;
    uint8_t *buf;              /* freed when done (NULL: static zeroes) */
    char what[96];
    bool enoent_ok;            /* a remove of an object that was never written */
};

/* A request is done (any completion callback): its error, if any, sticks. */
static void finished(cb_remote *r, rados_completion_t c, int rv, bool enoent_ok, const char *what)
{
    pthread_mutex_lock(&r->mu);
    if (rv < 0 && !(rv == -ENOENT && enoent_ok) && !r->err) {
        r->err = rv;
        snprintf(r->err_what, sizeof r->err_what, "%s", what);
    }
    r->inflight--;
    pthread_cond_broadcast(&r->cond);
    pthread_mutex_unlock(&r->mu);
    rados_aio_release(c);
}

static void request_done(rados_completion_t c, void *arg)
{
    struct request *q = arg;
    finished(q->r, c, rados_aio_get_return_value(c), q->enoent_ok, q->what);
    free(q->buf);
    free(q);
}

static void wait_below(cb_remote *r, uint32_t n)
{
    pthread_mutex_lock(&r->mu);
    while (r->inflight > n)
        pthread_cond_wait(&r->cond, &r->mu);
    pthread_mutex_unlock(&r->mu);
}

static int sticky_error(cb_remote *r)
{
    pthread_mutex_lock(&r->mu);
    int rv = r->err;
    char what[256];
    snprintf(what, sizeof what, "%s", r->err_what);
    pthread_mutex_unlock(&r->mu);
    return rv ? rados_error(rv, what) : 0;
}

/* A new request's completion, counted in flight; NULL (and an error) if
 * librados has none to give. */
static rados_completion_t start(cb_remote *r, struct request *q, int kind, bool data)
{
    wait_below(r, MAX_INFLIGHT - 1);
    rados_completion_t c;
    if (rados_aio_create_completion2(q, request_done, &c) < 0)
        return NULL;
    pthread_mutex_lock(&r->mu);
    r->inflight++;
    r->requests[kind]++;
    r->data_writes += data && kind == REQ_WRITE;
    pthread_mutex_unlock(&r->mu);
    return c;
}

/* The object holding byte off of file f, the offset in it and how many
 * bytes from there it holds. */
static void locate(const struct cb_file *f, uint64_t off, char *oid, size_t oid_len,
                   uint64_t *in_obj, uint64_t *room)
{
    if (f->name[0] == 'm' && off < SB_BYTES) {
        snprintf(oid, oid_len, SB_OBJECT);
        *in_obj = off;
        *room = SB_BYTES - off;
        return;
    }
    snprintf(oid, oid_len, "%s.%016llx", f->name, (unsigned long long)(off / OBJECT_SIZE));
    *in_obj = off % OBJECT_SIZE;
    *room = OBJECT_SIZE - *in_obj;
}

static int flush_pending(cb_remote *r);
static void lazy_resize(cb_remote *r, const struct cb_file *f, uint64_t size);

/* Send what is held back, wait until every request is acknowledged, and
 * report the first that failed.  order_held: the caller has r->order (the
 * wait itself is made without it unless so, so writers go on meanwhile). */
static int drain(cb_remote *r, bool order_held)
{
    if (!order_held)
        pthread_mutex_lock(&r->order);
    int rv = flush_pending(r);
    if (!order_held)
        pthread_mutex_unlock(&r->order);
    if (rv)
        return rv;
    wait_below(r, 0);
    return sticky_error(r);
}

/* Superblock writes: after every write sent before them is acknowledged,
 * one op that compares our epoch and writes (fencing). */
static int write_superblock(cb_remote *r, const uint8_t *buf, size_t len, uint64_t off)
{
    int rv = drain(r, true);
    if (rv)
        return rv;
    if (!r->locked)
        return cb_err(CB_E_READ_ONLY, "pool rados:%s/%s is not locked for writing", r->pool, r->name);
    rados_write_op_t op = rados_create_write_op();
    rados_write_op_cmpxattr(op, "epoch", LIBRADOS_CMPXATTR_OP_EQ, r->epoch, 20);
    rados_write_op_write(op, (const char *)buf, len, off);
    rv = rados_write_op_operate(op, r->io, SB_OBJECT, NULL, 0);
    rados_release_write_op(op);
    pthread_mutex_lock(&r->mu);
    r->requests[REQ_WRITE]++;
    pthread_mutex_unlock(&r->mu);
    if (rv == -ECANCELED) {
        pthread_mutex_lock(&r->mu);
        r->err = -EIO;
        snprintf(r->err_what, sizeof r->err_what, "a commit (this writer is fenced)");
        pthread_mutex_unlock(&r->mu);
        return cb_err(CB_E_IO, "pool rados:%s/%s was taken over by another writer (its epoch is no "
                      "longer ours): this writer's commit is refused", r->pool, r->name);
    }
    return rv < 0 ? rados_error(rv, "writing the superblock") : 0;
}

void remote_begin(struct cb_file *f)
{
    pthread_mutex_lock(&f->remote->order);
}

void remote_end(struct cb_file *f)
{
    pthread_mutex_unlock(&f->remote->order);
}

/* Copy n bytes of the vector from byte skip on into dst. */
static void gather(uint8_t *dst, const struct iovec *iov, int cnt, uint64_t skip, uint64_t n)
{
    for (int i = 0; i < cnt && n > 0; i++) {
        if (skip >= iov[i].iov_len) {
            skip -= iov[i].iov_len;
            continue;
        }
        uint64_t take = iov[i].iov_len - skip;
        if (take > n)
            take = n;
        memcpy(dst, (const uint8_t *)iov[i].iov_base + skip, take);
        dst += take;
        n -= take;
        skip = 0;
    }
}

/* Send a write of buf (ours to free) to object oid at byte at. */
static int send_write(cb_remote *r, const char *oid, uint8_t *buf, size_t n, uint64_t at)
{
    struct request *q = calloc(1, sizeof *q);
    if (!q) {
        free(buf);
        return cb_err(CB_E_NO_MEMORY, "out of memory");
    }
    *q = (struct request){r, buf, "", false};
    snprintf(q->what, sizeof q->what, "writing object %s", oid);
    rados_completion_t c = start(r, q, REQ_WRITE, strncmp(oid, "data.", 5) == 0);
    int rv;
    if (!c || (rv = rados_aio_write(r->io, oid, c, (const char *)buf, n, at)) < 0) {
        if (c)
            request_done(c, q); /* counted: uncount it */
        else
            free(buf), free(q);
        return rados_error(c ? rv : -ENOMEM, "sending a write");
    }
    return 0;
}

/* Send one held write (order held). */
static int send_held(cb_remote *r, struct held *h)
{
    if (!h->len)
        return 0;
    uint8_t *buf = h->buf;
    size_t n = h->len;
    h->buf = NULL;
    h->len = h->cap = 0;
    return send_write(r, h->oid, buf, n, h->at);
}

/* Send every write held back (order held): before any request that must
 * follow them (a superblock write, a discard, a wait). */
static int flush_pending(cb_remote *r)
{
    int rv = 0;
    for (int i = 0; i < HELD_STREAMS; i++) {
        int e = send_held(r, &r->held[i]);
        rv = rv ? rv : e;
    }
    return rv;
}

/* Hold a piece back if it may grow: sequential streams of block-sized
 * writes (the engine writes each newly allocated block alone, and writers
 * at QD16 fill several objects at once) go to RADOS as one write per
 * object, not one per block.  A piece that extends no held write of its
 * object first sends those (RADOS sees one object's writes in the cache's
 * order), then starts a stream of its own, sending the stream used longest
 * ago if none is free.  Writes of different objects need no order among
 * themselves: a commit waits for all of them before its superblock. */
static int hold_or_send(cb_remote *r, const char *oid, const struct iovec *iov, int cnt,
                        uint64_t skip, uint64_t n, uint64_t at)
{
    struct held *h = NULL, *lru = NULL;
    int rv;
    for (int i = 0; i < HELD_STREAMS; i++) {
        struct held *s = &r->held[i];
        if (s->len && strcmp(s->oid, oid) == 0) {
            if (!h && s->at + s->len == at)
                h = s;
            else if ((rv = send_held(r, s)) != 0)
                return rv;
        }
    }
    if (!h) {
        for (int i = 0; i < HELD_STREAMS && (!lru || lru->len); i++)
            if (!lru || !r->held[i].len || r->held[i].used < lru->used)
                lru = &r->held[i];
        if ((rv = send_held(r, lru)) != 0)
            return rv;
        h = lru;
        snprintf(h->oid, sizeof h->oid, "%s", oid);
        h->at = at;
    }
    if (h->len + n > h->cap) {
        size_t cap = h->cap ? h->cap : 65536;
        while (cap < h->len + n)
            cap *= 2;
        uint8_t *b = realloc(h->buf, cap);
        if (!b)
            return cb_err(CB_E_NO_MEMORY, "out of memory");
        h->buf = b;
        h->cap = cap;
    }
    gather(h->buf + h->len, iov, cnt, skip, n);
    h->len += n;
    h->used = ++r->held_clock;
    return h->at + h->len == OBJECT_SIZE ? send_held(r, h) : 0; /* it cannot grow */
}

int remote_write(struct cb_file *f, const struct iovec *iov, int cnt, uint64_t off)
{
    cb_remote *r = f->remote;
    int rv = sticky_error(r);
    if (rv)
        return rv;
    uint64_t total = 0;
    for (int i = 0; i < cnt; i++)
        total += iov[i].iov_len;
    for (uint64_t done = 0; done < total;) {
        char oid[64];
        uint64_t at, room;
        locate(f, off + done, oid, sizeof oid, &at, &room);
        uint64_t n = total - done < room ? total - done : room;
        if (strcmp(oid, SB_OBJECT) == 0) {
            uint8_t *buf = malloc(n ? n : 1);
            if (!buf)
                return cb_err(CB_E_NO_MEMORY, "out of memory");
            gather(buf, iov, cnt, done, n);
            rv = write_superblock(r, buf, n, at);
            free(buf);
        } else {
            rv = hold_or_send(r, oid, iov, cnt, done, n, at);
        }
        if (rv)
            return rv;
        done += n;
    }
    return 0;
}

/* Reads of [off, off + len) return zeroes: whole objects are removed, the
 * pieces at either end written with zeroes. */
int remote_discard(struct cb_file *f, uint64_t off, uint64_t len)
{
    cb_remote *r = f->remote;
    int rv = sticky_error(r);
    if (rv)
        return rv;
    pthread_mutex_lock(&r->order);
    rv = flush_pending(r);
    for (uint64_t done = 0; done < len && !rv;) {
        char oid[64];
        uint64_t at, room;
        locate(f, off + done, oid, sizeof oid, &at, &room);
        uint64_t n = len - done < room ? len - done : room;
        bool whole = at == 0 && n == OBJECT_SIZE && strcmp(oid, SB_OBJECT) != 0;
        struct request *q = calloc(1, sizeof *q);
        if (!q) {
            rv = cb_err(CB_E_NO_MEMORY, "out of memory");
            break;
        }
        *q = (struct request){r, NULL, "", whole};
        snprintf(q->what, sizeof q->what, "%s object %s", whole ? "removing" : "zeroing", oid);
        rados_completion_t c = start(r, q, whole ? REQ_REMOVE : REQ_WRITE, f->name[0] == 'd');
        if (!c) {
            free(q);
            rv = rados_error(-ENOMEM, "sending a discard");
            break;
        }
        rv = whole ? rados_aio_remove(r->io, oid, c)
                   : rados_aio_write(r->io, oid, c, (const char *)zero_object, n, at);
        if (rv < 0) {
            request_done(c, q);
            rv = rados_error(rv, "sending a discard");
            break;
        }
        rv = 0;
        done += n;
    }
    pthread_mutex_unlock(&r->order);
    return rv;
}

int remote_set_size(struct cb_file *f, uint64_t size)
{
    cb_remote *r = f->remote;
    lazy_resize(r, f, size);
    int rv = drain(r, false);
    if (rv)
        return rv;
    char key[32], v[24];
    snprintf(key, sizeof key, "%s_size", f->name);
    snprintf(v, sizeof v, "%llu", (unsigned long long)size);
    rados_write_op_t op = rados_create_write_op();
    if (r->locked)
        rados_write_op_cmpxattr(op, "epoch", LIBRADOS_CMPXATTR_OP_EQ, r->epoch, 20);
    rados_write_op_setxattr(op, key, v, strlen(v));
    rv = rados_write_op_operate(op, r->io, SB_OBJECT, NULL, 0);
    rados_release_write_op(op);
    if (rv == -ECANCELED)
        return cb_err(CB_E_IO, "pool rados:%s/%s was taken over by another writer: this writer's "
                      "resize is refused", r->pool, r->name);
    return rv < 0 ? rados_error(rv, "recording the size of the pool's files") : 0;
}

int remote_wait(struct cb_file *f)
{
    return drain(f->remote, false);
}

/* ---- reads: the cache filled on demand ----
 *
 * An open fetches the superblock object alone and starts from empty
 * (sparse) cache files.  What the cache holds is kept unit by unit (a data
 * block, a 4 KiB metadata block): absent, being fetched, or present.  The
 * engine asks for a range before it reads it through its mapping
 * (remote_need: the data of a read, a metadata block on first use), and the
 * absent units of it are read from RADOS, one request per run of them
 * within an object, all in flight at once, then written into the cache.  A
 * metadata miss fetches the rest of its object's absent units with it:
 * metadata is dense and a tree walk goes on nearby.  Data never reads ahead,
 * so blocks the read does not need (unmapped or not) are never read.
 *
 * Writes keep the cache whole (remote_will_write): a unit a write covers
 * becomes present without a fetch (after any fetch of it in flight ends, so
 * that fetch cannot land over the new bytes), and a unit it covers in part
 * is fetched first.  Data may be dropped again while the pool is open when
 * the cache is bounded (below), metadata never; every open starts empty:
 * this writer holds the lock, so
 * nobody else changes the objects under its cache, and the next writer
 * (after a close, or after breaking a dead holder's lock) starts from the
 * objects, never from what an earlier process cached. */

static struct lazy *lazy_of(cb_remote *r, const struct cb_file *f)
{
    return &r->lazy[f->name[0] == 'm'];
}

static uint8_t unit_state(const struct lazy *z, uint64_t u)
{
    return __atomic_load_n(&z->state[u], __ATOMIC_ACQUIRE);
}

/* Units [first, last] of the range, clamped to the file. */
static bool unit_span(const struct lazy *z, uint64_t off, uint64_t len, uint64_t *first,
                      uint64_t *last)
{
    uint64_t units = (z->size + (1ull << z->shift) - 1) >> z->shift;
    if (!len || off >= z->size || !units)
        return false;
    *first = off >> z->shift;
    *last = (off + len - 1) >> z->shift;
    if (*last >= units)
        *last = units - 1;
    return true;
}

/* ---- the bound on the data cache ----
 * Without one, the cache keeps every unit read or written until the close.
 * With cache_limit set ($COWBLOCK_RADOS_CACHE_SIZE, cowblock/rados.py), a
 * thread of its own (the evictor) drops units once more than the limit is
 * present, down to 90% of it (Ceph's read-only object cache does the same
 * with its watermark of 0.9): a clock over the units, a unit read or
 * written since the hand last passed it (its used bit) kept one more turn.
 * A dropped unit's bytes are punched out of the cache file and the unit is
 * absent again, fetched anew when next read.
 *
 * Only clean units go: the evictor marks its victims evicting, then waits
 * until every thread that was reading or writing the cache is done (pins,
 * in two parities, as the data space map's readers), then sends every
 * write held back and waits until all in flight are acknowledged, so that
 * RADOS holds what the cache holds; only then are the victims punched.
 * Meanwhile a thread that finds a victim evicting keeps it (present
 * again: its bytes are still there, and it may be written now); one that
 * finds it being punched waits, as for a fetch.  A unit is never punched
 * under a reader, nor between a write's copy into the cache and its
 * acknowledgement by RADOS.  Metadata is never dropped: the engine keeps
 * pointers into it, as into the local pool's mmap. */

/* Mark units [first, last] used (the clock's reference bits). */
static void touch(struct lazy *z, uint64_t first, uint64_t last)
{
    for (uint64_t u = first; u <= last; u++) {
        uint8_t bit = (uint8_t)(1u << (u & 7));
        if (!(__atomic_load_n(&z->used[u >> 3], __ATOMIC_RELAXED) & bit))
            __atomic_fetch_or(&z->used[u >> 3], bit, __ATOMIC_RELAXED);
    }
}

/* n more units present (mu held): past the bound, wake the evictor. */
static void grew(cb_remote *r, struct lazy *z, uint64_t n)
{
    z->present += n;
    if (z->used && n && (z->present << z->shift) > r->cache_limit)
        pthread_cond_signal(&r->evict_cond);
}

uint32_t remote_pin(struct cb_file *f)
{
    cb_remote *r = f->remote;
    if (!r || !r->evictor_running || f->name[0] != 'd')
        return 0;
    for (;;) { /* registered in the parity that is still current once counted */
        uint32_t parity = __atomic_load_n(&r->pin_epoch, __ATOMIC_SEQ_CST) & 1;
        __atomic_add_fetch(&r->pins[parity], 1, __ATOMIC_SEQ_CST);
        if ((__atomic_load_n(&r->pin_epoch, __ATOMIC_SEQ_CST) & 1) == parity)
            return parity | 2;
        __atomic_sub_fetch(&r->pins[parity], 1, __ATOMIC_SEQ_CST);
    }
}

void remote_unpin(struct cb_file *f, uint32_t pin)
{
    if (pin & 2)
        __atomic_sub_fetch(&f->remote->pins[pin & 1], 1, __ATOMIC_SEQ_CST);
}

int cb_remote_set_cache_limit(cb_remote *r, uint64_t bytes)
{
    if (r->lazy[0].state)
        return cb_err(CB_E_INVALID, "the cache's bound is set before the pool is opened");
    r->cache_limit = bytes;
    return 0;
}

struct piece {
    uint64_t at, len;          /* bytes of the file */
    uint8_t *buf;
    rados_completion_t c;
    char oid[64];
};

/* Claim the absent units among [first, last] (state fetching) as pieces,
 * one per run within an object; *others: some are being fetched by
 * another thread.  mu held. */
static int claim(cb_remote *r, const struct cb_file *f, struct lazy *z, uint64_t first,
                 uint64_t last, struct piece **pieces, size_t *n, size_t *cap, bool *others)
{
    uint64_t unit = 1ull << z->shift;
    for (uint64_t u = first; u <= last; u++) {
        uint8_t st = z->state[u];
        if (st == UNIT_FETCHING || st == UNIT_PUNCHING)
            *others = true;
        if (st == UNIT_EVICTING) /* chosen, not dropped yet: kept after all */
            __atomic_store_n(&z->state[u], UNIT_PRESENT, __ATOMIC_SEQ_CST);
        if (st != UNIT_ABSENT)
            continue;
        __atomic_store_n(&z->state[u], UNIT_FETCHING, __ATOMIC_RELEASE);
        uint64_t at = u << z->shift, len = unit;
        if (at + len > z->size)
            len = z->size - at;
        struct piece *p = *n ? &(*pieces)[*n - 1] : NULL;
        if (p && p->at + p->len == at && p->at / OBJECT_SIZE == at / OBJECT_SIZE) {
            p->len += len;
            continue;
        }
        if (*n == *cap) {
            size_t c = *cap ? *cap * 2 : 16;
            struct piece *v = realloc(*pieces, c * sizeof *v);
            if (!v) {
                __atomic_store_n(&z->state[u], UNIT_ABSENT, __ATOMIC_RELEASE);
                return cb_err(CB_E_NO_MEMORY, "out of memory");
            }
            *pieces = v;
            *cap = c;
        }
        (*pieces)[(*n)++] = (struct piece){.at = at, .len = len};
    }
    return 0;
}

/* Read the pieces (all in flight at once) into the cache; mark their
 * units present, or absent again if their read failed. */
static int fetch_pieces(cb_remote *r, const struct cb_file *f, struct lazy *z, struct piece *v,
                        size_t n)
{
    int rv = 0;
    bool data = f->name[0] == 'd';
    for (size_t i = 0; i < n; i++) {
        uint64_t in_obj, room;
        locate(f, v[i].at, v[i].oid, sizeof v[i].oid, &in_obj, &room);
        v[i].buf = malloc(v[i].len);
        if (!v[i].buf || rados_aio_create_completion2(NULL, NULL, &v[i].c) < 0) {
            v[i].c = NULL;
            rv = rv ? rv : cb_err(CB_E_NO_MEMORY, "out of memory");
            continue;
        }
        int e = rados_aio_read(r->io, v[i].oid, v[i].c, (char *)v[i].buf, v[i].len, in_obj);
        if (e < 0) {
            rados_aio_release(v[i].c);
            v[i].c = NULL;
            rv = rv ? rv : rados_error(e, "sending a read");
        }
    }
    pthread_mutex_lock(&r->mu);
    for (size_t i = 0; i < n; i++)
        if (v[i].c) {
            r->requests[REQ_READ]++;
            r->requests[REQ_DATA_READ] += data;
            r->fetched += v[i].len;
        }
    pthread_mutex_unlock(&r->mu);
    for (size_t i = 0; i < n; i++) {
        int got = -EIO;
        if (v[i].c) {
            rados_aio_wait_for_complete(v[i].c);
            got = rados_aio_get_return_value(v[i].c);
            rados_aio_release(v[i].c);
            if (got == -ENOENT)
                got = 0; /* never written: zeroes, as the cache holds them */
            if (got < 0 && !rv) {
                char what[96];
                snprintf(what, sizeof what, "reading object %s", v[i].oid);
                rv = rados_error(got, what);
            }
            /* a short object: the rest was never written, zeroes as in the cache */
            if (got > 0 && pwrite(z->fd, v[i].buf, (size_t)got, (off_t)v[i].at) != got) {
                if (!rv)
                    rv = cb_err(CB_E_IO, "cannot write the pool's cache file %s: %s", f->name,
                                strerror(errno));
                got = -EIO;
            }
        }
        free(v[i].buf);
        uint8_t to = got >= 0 ? UNIT_PRESENT : UNIT_ABSENT;
        pthread_mutex_lock(&r->mu);
        uint64_t first = v[i].at >> z->shift, last = (v[i].at + v[i].len - 1) >> z->shift;
        for (uint64_t u = first; u <= last; u++)
            __atomic_store_n(&z->state[u], to, __ATOMIC_RELEASE);
        if (to == UNIT_PRESENT)
            grew(r, z, last - first + 1);
        pthread_cond_broadcast(&r->fetched_cond);
        pthread_mutex_unlock(&r->mu);
    }
    return rv;
}

static bool all_present(const struct lazy *z, uint64_t first, uint64_t last)
{
    for (uint64_t u = first; u <= last; u++)
        if (unit_state(z, u) != UNIT_PRESENT)
            return false;
    return true;
}

int remote_need(struct cb_file *f, const struct cb_range *ranges, int count)
{
    cb_remote *r = f->remote;
    struct lazy *z = lazy_of(r, f);
    if (!z->state)
        return 0;
    bool meta = f->name[0] == 'm';
    bool missing = false;
    for (int i = 0; i < count && !missing; i++) {
        uint64_t first, last;
        missing = unit_span(z, ranges[i].off, ranges[i].len, &first, &last) &&
                  !all_present(z, first, last);
    }
    for (int i = 0; i < count && z->used; i++) {
        uint64_t first, last;
        if (unit_span(z, ranges[i].off, ranges[i].len, &first, &last))
            touch(z, first, last);
    }
    if (!missing)
        return 0; /* the common case once warm: no lock taken */
    struct piece *v = NULL;
    size_t n = 0, cap = 0;
    int rv = 0;
    for (;;) {
        bool others = false;
        n = 0;
        pthread_mutex_lock(&r->mu);
        for (int i = 0; i < count && !rv; i++) {
            uint64_t off = ranges[i].off, len = ranges[i].len;
            if (meta) { /* the whole object it falls in */
                uint64_t end = (off + len + OBJECT_SIZE - 1) / OBJECT_SIZE * OBJECT_SIZE;
                off = off / OBJECT_SIZE * OBJECT_SIZE;
                len = end - off;
            }
            uint64_t first, last;
            if (unit_span(z, off, len, &first, &last))
                rv = claim(r, f, z, first, last, &v, &n, &cap, &others);
        }
        pthread_mutex_unlock(&r->mu);
        if (n) {
            int e = fetch_pieces(r, f, z, v, n);
            rv = rv ? rv : e;
        }
        if (rv || !others)
            break;
        /* wait for the other fetches, then claim again what they failed */
        bool absent = false;
        pthread_mutex_lock(&r->mu);
        for (int i = 0; i < count; i++) {
            uint64_t first, last;
            if (!unit_span(z, ranges[i].off, ranges[i].len, &first, &last))
                continue;
            for (uint64_t u = first; u <= last; u++) {
                while (z->state[u] == UNIT_FETCHING || z->state[u] == UNIT_PUNCHING)
                    pthread_cond_wait(&r->fetched_cond, &r->mu);
                absent |= z->state[u] == UNIT_ABSENT || z->state[u] == UNIT_EVICTING;
            }
        }
        pthread_mutex_unlock(&r->mu);
        if (!absent)
            break;
    }
    free(v);
    return rv;
}

int remote_will_write(struct cb_file *f, uint64_t off, uint64_t len)
{
    cb_remote *r = f->remote;
    struct lazy *z = lazy_of(r, f);
    uint64_t first, last;
    if (!z->state || !unit_span(z, off, len, &first, &last))
        return 0;
    uint64_t mask = (1ull << z->shift) - 1, end = off + len;
    /* the units it covers in part keep the rest of their bytes: fetch them */
    struct cb_range ends[2];
    int cnt = 0;
    if (off & mask)
        ends[cnt++] = (struct cb_range){off & ~mask, 1};
    if ((end & mask) && end < z->size && (cnt == 0 || (end >> z->shift) != first))
        ends[cnt++] = (struct cb_range){end & ~mask, 1};
    int rv = cnt ? remote_need(f, ends, cnt) : 0;
    if (rv)
        return rv;
    pthread_mutex_lock(&r->mu);
    uint64_t added = 0;
    for (uint64_t u = first; u <= last; u++) {
        while (z->state[u] == UNIT_FETCHING || z->state[u] == UNIT_PUNCHING)
            pthread_cond_wait(&r->fetched_cond, &r->mu);
        added += z->state[u] == UNIT_ABSENT;
        __atomic_store_n(&z->state[u], UNIT_PRESENT, __ATOMIC_SEQ_CST);
    }
    if (z->used)
        touch(z, first, last);
    grew(r, z, added);
    pthread_mutex_unlock(&r->mu);
    return 0;
}

/* Data units: 4 KiB, so that a write of whole pages fetches nothing, or
 * 1/16 of the block for blocks over 64 KiB (bounding the state map). */
void remote_set_block_size(struct cb_file *f, uint32_t block_size)
{
    uint32_t unit = block_size / 16 > UNIT_MIN ? block_size / 16 : UNIT_MIN;
    lazy_of(f->remote, f)->shift = (uint32_t)__builtin_ctz(unit);
}

/* The file grew: its new bytes are zeroes in the cache, and no block there
 * is read before it is written, so metadata units count as present (data
 * units stay absent, so that the bound counts only what holds bytes: a
 * whole-unit write makes them present without a fetch). */
static void lazy_resize(cb_remote *r, const struct cb_file *f, uint64_t size)
{
    struct lazy *z = lazy_of(r, f);
    pthread_mutex_lock(&r->mu);
    if (z->state && size > z->size && z == &r->lazy[1]) {
        uint64_t unit = 1ull << z->shift;
        uint64_t from = (z->size + unit - 1) >> z->shift, to = (size + unit - 1) >> z->shift;
        for (uint64_t u = from; u < to; u++)
            __atomic_store_n(&z->state[u], UNIT_PRESENT, __ATOMIC_RELEASE);
    }
    z->size = size;
    pthread_mutex_unlock(&r->mu);
}

/* A run of victims: units [first, first + n). */
struct victims {
    struct cb_range *v;        /* (off, len) in units */
    size_t n, cap;
};

static int victims_add(struct victims *w, uint64_t u)
{
    if (w->n && w->v[w->n - 1].off + w->v[w->n - 1].len == u) {
        w->v[w->n - 1].len++;
        return 0;
    }
    if (w->n == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 64;
        struct cb_range *v = realloc(w->v, cap * sizeof *v);
        if (!v)
            return -ENOMEM;
        w->v = v;
        w->cap = cap;
    }
    w->v[w->n++] = (struct cb_range){u, 1};
    return 0;
}

/* Victims in state from turn to state to (mu held); returns how many, and
 * when kept is not NULL, the runs of them into it. */
static uint64_t victims_mark(struct lazy *z, const struct victims *w, uint8_t from, uint8_t to,
                             struct victims *kept)
{
    uint64_t n = 0;
    for (size_t i = 0; i < w->n; i++)
        for (uint64_t u = w->v[i].off; u < w->v[i].off + w->v[i].len; u++)
            if (z->state[u] == from && (!kept || victims_add(kept, u) == 0)) {
                __atomic_store_n(&z->state[u], to, __ATOMIC_SEQ_CST);
                n++;
            }
    return n;
}

/* One turn of the clock, mu held on entry and return (dropped meanwhile);
 * returns the units dropped. */
static uint64_t evict_some(cb_remote *r, struct lazy *z)
{
    uint64_t units = (z->size + (1ull << z->shift) - 1) >> z->shift;
    uint64_t keep = (r->cache_limit - r->cache_limit / 10) >> z->shift;
    uint64_t want = z->present > keep ? z->present - keep : 0, chosen = 0;
    struct victims w = {0};
    /* Choose: the hand goes round at most twice (the first clears used bits). */
    for (uint64_t looked = 0; chosen < want && looked < 2 * units && units; looked++) {
        if (looked % 4096 == 4095) { /* let others at mu */
            pthread_mutex_unlock(&r->mu);
            pthread_mutex_lock(&r->mu);
        }
        uint64_t u = r->hand++ % units;
        uint8_t bit = (uint8_t)(1u << (u & 7));
        if (z->state[u] != UNIT_PRESENT)
            continue;
        if (z->used[u >> 3] & bit) {
            __atomic_fetch_and(&z->used[u >> 3], (uint8_t)~bit, __ATOMIC_RELAXED);
            continue;
        }
        if (victims_add(&w, u) != 0)
            break;
        __atomic_store_n(&z->state[u], UNIT_EVICTING, __ATOMIC_SEQ_CST);
        chosen++;
    }
    pthread_mutex_unlock(&r->mu);
    /* Every thread that may have seen a victim present is done... */
    uint32_t old = __atomic_fetch_add(&r->pin_epoch, 1, __ATOMIC_SEQ_CST) & 1;
    struct timespec nap = {0, 100000};
    while (__atomic_load_n(&r->pins[old], __ATOMIC_SEQ_CST))
        nanosleep(&nap, NULL);
    /* ...and RADOS has every write sent or held until now. */
    pthread_mutex_lock(&r->order);
    int rv = flush_pending(r);
    wait_below(r, 0);
    pthread_mutex_unlock(&r->order);
    pthread_mutex_lock(&r->mu);
    if (rv || r->err) { /* a write failed: the cache may hold what RADOS lacks */
        victims_mark(z, &w, UNIT_EVICTING, UNIT_PRESENT, NULL);
        r->cache_limit = UINT64_MAX >> 1; /* no more eviction */
        free(w.v);
        return 0;
    }
    /* those still evicting (none kept them meanwhile) are punched; any the
     * list has no room for stay */
    struct victims punch = {0};
    victims_mark(z, &w, UNIT_EVICTING, UNIT_PUNCHING, &punch);
    victims_mark(z, &w, UNIT_EVICTING, UNIT_PRESENT, NULL);
    pthread_mutex_unlock(&r->mu);
    size_t punched = 0; /* runs punched: a failed one stays whole */
    while (punched < punch.n) {
        uint64_t off = punch.v[punched].off << z->shift, len = punch.v[punched].len << z->shift;
        if (off + len > z->size)
            len = z->size - off;
        if (fallocate(z->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off,
                      (off_t)len) != 0)
            break;
        punched++;
    }
    pthread_mutex_lock(&r->mu);
    struct victims done = {punch.v, punched, punch.cap}, left = {punch.v + punched,
                                                                 punch.n - punched, 0};
    uint64_t dropped = victims_mark(z, &done, UNIT_PUNCHING, UNIT_ABSENT, NULL);
    z->present -= dropped;
    r->evicted += dropped << z->shift;
    if (victims_mark(z, &left, UNIT_PUNCHING, UNIT_PRESENT, NULL))
        r->cache_limit = UINT64_MAX >> 1; /* a file system without holes: no bound */
    pthread_cond_broadcast(&r->fetched_cond);
    free(w.v);
    free(punch.v);
    return dropped;
}

static void *evictor_main(void *arg)
{
    cb_remote *r = arg;
    struct lazy *z = &r->lazy[0];
    pthread_mutex_lock(&r->mu);
    while (!r->evictor_stop) {
        if ((z->present << z->shift) <= r->cache_limit) {
            pthread_cond_wait(&r->evict_cond, &r->mu);
        } else if (!evict_some(r, z)) { /* all of it kept this turn: not in a loop */
            struct timespec t;
            clock_gettime(CLOCK_REALTIME, &t);
            t.tv_nsec += 50 * 1000 * 1000;
            if (t.tv_nsec >= 1000000000L)
                t.tv_sec++, t.tv_nsec -= 1000000000L;
            pthread_cond_timedwait(&r->evict_cond, &r->mu, &t);
        }
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

static int evictor_start(cb_remote *r)
{
    r->evictor_stop = false;
    if (pthread_create(&r->evictor, NULL, evictor_main, r) != 0)
        return cb_err(CB_E_NO_MEMORY, "cannot start the cache's evictor thread");
    r->evictor_running = true;
    return 0;
}

static void evictor_stop(cb_remote *r)
{
    if (!r->evictor_running)
        return;
    pthread_mutex_lock(&r->mu);
    r->evictor_stop = true;
    pthread_cond_signal(&r->evict_cond);
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->evictor, NULL);
    r->evictor_running = false;
}

static void lazy_free(cb_remote *r)
{
    evictor_stop(r);
    for (int i = 0; i < 2; i++) {
        struct lazy *z = &r->lazy[i];
        if (z->state)
            munmap(z->state, state_bytes[i]);
        if (z->used)
            munmap(z->used, state_bytes[i] / 8);
        if (z->fd >= 0)
            close(z->fd);
        *z = (struct lazy){.fd = -1, .shift = 12};
    }
}

static int open_cache(int dirfd, const char *dir, const char *name, uint64_t size)
{
    int fd = openat(dirfd, name, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, CB_POOL_FILE_MODE);
    if (fd < 0)
        return cb_err(CB_E_IO, "cannot create the cache file %s/%s: %s", dir, name, strerror(errno));
    if (ftruncate(fd, (off_t)size) != 0) {
        int e = errno;
        close(fd);
        return cb_err(e == ENOSPC ? CB_E_HOST_SPACE : CB_E_IO, "cannot size the cache file %s/%s: %s",
                      dir, name, strerror(e));
    }
    return fd;
}

int cb_remote_fetch(cb_remote *r, const char *dir)
{
    uint64_t sizes[2];
    int rv = get_xattr_u64(r, "data_size", &sizes[0]);
    if (rv == 0)
        rv = get_xattr_u64(r, "metadata_size", &sizes[1]);
    if (rv == -ENOENT || rv == -ENODATA)
        return cb_err(CB_E_NOT_FOUND, "no pool at rados:%s/%s", r->pool, r->name);
    if (rv < 0)
        return rados_error(rv, "reading the pool's superblock object");
    if (sizes[1] < SB_BYTES || sizes[1] / CB_META_BLOCK_SIZE > CB_MAX_BLOCKS ||
        sizes[0] / (1u << 30) > CB_MAX_BLOCKS)
        return cb_err(CB_E_CORRUPT, "the pool's superblock object is corrupt: file sizes %llu and "
                      "%llu", (unsigned long long)sizes[0], (unsigned long long)sizes[1]);
    uint8_t sb[SB_BYTES];
    rv = rados_read(r->io, SB_OBJECT, (char *)sb, SB_BYTES, 0);
    if (rv < 0)
        return rados_error(rv, "reading the pool's superblock");
    pthread_mutex_lock(&r->mu);
    r->requests[REQ_READ]++;
    pthread_mutex_unlock(&r->mu);
    if (mkdir(dir, CB_POOL_DIR_MODE) != 0 && errno != EEXIST)
        return cb_err(CB_E_IO, "cannot create the cache directory %s: %s", dir, strerror(errno));
    int dirfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dirfd < 0)
        return cb_err(CB_E_IO, "cannot open the cache directory %s: %s", dir, strerror(errno));
    lazy_free(r);
    const char *names[2] = {"data", "metadata"};
    rv = 0;
    for (int i = 0; i < 2 && rv >= 0; i++) {
        struct lazy *z = &r->lazy[i];
        if ((rv = z->fd = open_cache(dirfd, dir, names[i], sizes[i])) < 0)
            break;
        z->size = sizes[i];
        /* one byte a unit, for the largest pool: only what is touched costs memory */
        z->state = mmap(NULL, state_bytes[i], PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (z->state == MAP_FAILED) {
            z->state = NULL;
            rv = cb_err(CB_E_NO_MEMORY, "out of memory for the cache's map");
        } else if (i == 0 && r->cache_limit) {
            z->used = mmap(NULL, state_bytes[i] / 8, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (z->used == MAP_FAILED) {
                z->used = NULL;
                rv = cb_err(CB_E_NO_MEMORY, "out of memory for the cache's map");
            }
        }
    }
    close(dirfd);
    if (rv >= 0 && pwrite(r->lazy[1].fd, sb, SB_BYTES, 0) != SB_BYTES)
        rv = cb_err(CB_E_IO, "cannot write the cache file %s/metadata: %s", dir, strerror(errno));
    if (rv < 0) {
        lazy_free(r);
        return rv;
    }
    for (uint64_t u = 0; u < SB_BYTES / CB_META_BLOCK_SIZE; u++)
        r->lazy[1].state[u] = UNIT_PRESENT;
    return r->lazy[0].used ? evictor_start(r) : 0;
}

int cb_remote_cache_metadata(cb_remote *r)
{
    struct lazy *z = &r->lazy[1];
    struct cb_file f = {z->fd, "metadata", r};
    struct cb_range all = {0, z->size};
    return z->state ? remote_need(&f, &all, 1) : 0;
}

int cb_remote_destroy(cb_remote *r)
{
    rados_list_ctx_t list;
    int rv = rados_nobjects_list_open(r->io, &list);
    if (rv < 0)
        return rados_error(rv, "listing the pool's objects");
    const char *oid;
    while (rados_nobjects_list_next(list, &oid, NULL, NULL) == 0) {
        if (strcmp(oid, SB_OBJECT) == 0)
            continue; /* last: while it is there the pool is */
        rv = rados_remove(r->io, oid);
        if (rv < 0 && rv != -ENOENT)
            break;
        rv = 0;
    }
    rados_nobjects_list_close(list);
    if (rv >= 0) {
        rv = rados_remove(r->io, SB_OBJECT);
        r->locked = false;
    }
    return rv < 0 && rv != -ENOENT ? rados_error(rv, "removing the pool's objects") : 0;
}

int cb_remote_close(cb_remote *r)
{
    if (!r)
        return 0;
    int rv = 0;
    evictor_stop(r); /* (it sends held writes: before the connection goes) */
    if (r->connected) {
        pthread_mutex_lock(&r->order);
        flush_pending(r); /* (the pool's close committed: nothing is held) */
        pthread_mutex_unlock(&r->order);
        wait_below(r, 0);
        if (r->watching)
            rados_unwatch2(r->io, r->watch);
        if (r->locked && (rv = rados_unlock(r->io, SB_OBJECT, LOCK_NAME, r->cookie)) < 0 &&
            rv != -ENOENT)
            rv = rados_error(rv, "releasing the pool's lock");
        else
            rv = 0;
        rados_ioctx_destroy(r->io);
        rados_shutdown(r->cluster);
    }
    for (int i = 0; i < HELD_STREAMS; i++)
        free(r->held[i].buf);
    lazy_free(r);
    pthread_cond_destroy(&r->fetched_cond);
    pthread_cond_destroy(&r->evict_cond);
    pthread_mutex_destroy(&r->order);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cond);
    free(r);
    return rv;
}

#endif
