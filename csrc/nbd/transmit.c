/*
 * NBD transmission phase, in C: the request loop of `cowblock serve`.
 *
 * Design
 *  - `workers` threads take turns at the socket (leader/follower, as nbdkit's
 *    parallel thread model): the one holding read_lock reads a request (and
 *    its WRITE payload), checks it in one gate (validate), hands the socket
 *    to the next and runs the request itself against the engine's public API
 *    (api.h: this file knows nothing of mappings or nodes), then sends the
 *    reply.  So replies go out of order and a slow request never holds up a
 *    fast one; and no request is handed from thread to thread, which cost
 *    5.3 futex calls a request with a reader thread and a queue (4 KiB
 *    overwrites, benchmarks/nbd_overwrite.py) against about 2 here.
 *  - One mutex serialises writes to the socket (send_lock), so the bytes of
 *    one reply are never interleaved with another's, and a TLS session
 *    (c->transport, csrc/nbd/tls.c) has one sender at a time, as GnuTLS
 *    requires; the reader is its one receiver.
 *  - Memory is bounded: payloads buffered for queued requests never exceed
 *    max_buffered (the reader waits), and a request announcing more than
 *    NBD_MAX_PAYLOAD is refused and the connection dropped, never buffered.
 *  - A request the gate refuses gets its error and the connection goes on;
 *    only a bad magic, an oversized payload or a socket error ends it.
 *  - Disconnect (NBD_CMD_DISC, EOF): stop reading, let running requests
 *    finish, then return.  The caller closes the socket.
 */
#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <endian.h>

#include "../api.h"
#include "protocol.h"
#include "transport.h"

enum { READ_BUFFER = 64 << 10 };
/* Each thread's own buffer for WRITE payloads up to this size: no malloc and
 * free for every small write. */
enum { SPARE_PAYLOAD = 64 << 10 };

struct job {
    struct nbd_request req;   /* host byte order */
    uint8_t *payload;         /* WRITE data: the thread's spare buffer, or malloc'd */
    bool payload_owned;       /* malloc'd: free it when done */
    uint32_t error;           /* set by the gate: reply with this, run nothing */
    const char *why;          /* the gate's reason */
};

struct conn {
    cb_pool *p;
    cb_nbd_conn *c;
    uint64_t size;
    uint64_t block_size;
    pthread_mutex_t read_lock; /* the thread holding it reads the next request */
    uint8_t *rbuf;             /* under read_lock: READ_BUFFER bytes, rpos..rlen not yet taken */
    size_t rpos, rlen;
    bool stopping;             /* under read_lock: no more requests */
    int result;                /* under read_lock: why reading ended (0: disconnect) */
    pthread_mutex_t lock;      /* with room: the reader waiting for buffered to drop */
    pthread_cond_t room;
    uint64_t buffered;         /* atomic: payload bytes of requests not yet done */
    uint32_t reader_waits;     /* atomic: the reader waits on room */
    pthread_mutex_t send_lock; /* one reply at a time on the socket */
    bool send_failed;
    uint64_t requests, bytes_read, bytes_written;
};

/* ---- socket I/O: the plain socket, or the connection's transport (TLS) ---- */

/* One read of whatever the socket (or TLS) has, up to len: >0, 0 at EOF,
 * or a negative errno. */
static ssize_t read_some(struct conn *cn, void *buf, size_t len)
{
    struct cb_nbd_transport *t = cn->c->transport;
    for (;;) {
        ssize_t n = t ? t->recv(t, buf, len) : read(cn->c->fd, buf, len);
        if (t || n >= 0)
            return n;
        if (errno != EINTR)
            return -errno;
    }
}

/* Exactly len bytes, through the connection's read buffer (under
 * read_lock): a client keeping 16 requests in flight has several in the
 * socket at once, so one read() takes many headers and small payloads
 * instead of two reads a request.  Payloads as large as the buffer are
 * read straight into place. */
static int read_full(struct conn *cn, void *buf, size_t len)
{
    uint8_t *p = buf;
    while (len) {
        if (cn->rpos == cn->rlen) {
            cn->rpos = cn->rlen = 0;
            ssize_t n = len >= READ_BUFFER ? read_some(cn, p, len)
                                           : read_some(cn, cn->rbuf, READ_BUFFER);
            if (n <= 0)
                return n == 0 ? -EPIPE : (int)n;
            if (len >= READ_BUFFER) {
                p += n;
                len -= (size_t)n;
                continue;
            }
            cn->rlen = (size_t)n;
        }
        size_t take = cn->rlen - cn->rpos < len ? cn->rlen - cn->rpos : len;
        memcpy(p, cn->rbuf + cn->rpos, take);
        cn->rpos += take;
        p += take;
        len -= take;
    }
    return 0;
}

static int send_all(struct conn *cn, struct iovec *iov, int cnt)
{
    struct cb_nbd_transport *t = cn->c->transport;
    if (t)
        return t->sendv(t, iov, cnt);
    while (cnt > 0) {
        ssize_t n = writev(cn->c->fd, iov, cnt);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* Send under send_lock; a failed socket turns later sends into no-ops. */
static void send_locked(struct conn *cn, struct iovec *iov, int cnt)
{
    if (!cn->send_failed && send_all(cn, iov, cnt) != 0) {
        cn->send_failed = true;
        shutdown(cn->c->fd, SHUT_RDWR); /* wake the reader */
    }
}

static void reply_simple(struct conn *cn, uint64_t cookie, uint32_t error, void *data, size_t len)
{
    struct nbd_simple_reply r = {htobe32(NBD_SIMPLE_REPLY_MAGIC), htobe32(error), cookie};
    struct iovec iov[2] = {{&r, sizeof r}, {data, error ? 0 : len}};
    pthread_mutex_lock(&cn->send_lock);
    send_locked(cn, iov, error || !len ? 1 : 2);
    pthread_mutex_unlock(&cn->send_lock);
}

/* One structured chunk: header, then up to two payload pieces. */
static void chunk(struct conn *cn, uint64_t cookie, uint16_t type, bool done, void *a, size_t alen,
                  void *b, size_t blen)
{
    struct nbd_structured_reply r = {htobe32(NBD_STRUCTURED_REPLY_MAGIC),
                                     htobe16(done ? NBD_REPLY_FLAG_DONE : 0), htobe16(type), cookie,
                                     htobe32((uint32_t)(alen + blen))};
    struct iovec iov[3] = {{&r, sizeof r}, {a, alen}, {b, blen}};
    pthread_mutex_lock(&cn->send_lock);
    send_locked(cn, iov, 1 + (alen ? 1 : 0) + (blen ? 1 : 0));
    pthread_mutex_unlock(&cn->send_lock);
}

static void reply_error(struct conn *cn, uint64_t cookie, uint32_t error, const char *msg)
{
    if (!cn->c->structured) {
        reply_simple(cn, cookie, error, NULL, 0);
        return;
    }
    size_t mlen = strlen(msg) > 1024 ? 1024 : strlen(msg);
    uint8_t head[6];
    uint32_t e = htobe32(error);
    uint16_t ml = htobe16((uint16_t)mlen);
    memcpy(head, &e, 4);
    memcpy(head + 4, &ml, 2);
    chunk(cn, cookie, NBD_REPLY_TYPE_ERROR, true, head, 6, (void *)msg, mlen);
}

static void reply_ok(struct conn *cn, uint64_t cookie)
{
    if (cn->c->structured)
        chunk(cn, cookie, NBD_REPLY_TYPE_NONE, true, NULL, 0, NULL, 0);
    else
        reply_simple(cn, cookie, 0, NULL, 0);
}

/* ---- mapping engine errors to the wire (one place) ---- */

static uint32_t nbd_errno(int err, int type)
{
    switch (-err) {
    case EROFS: case EPERM: return NBD_EPERM;
    case ENOSPC: case EDQUOT: case EFBIG: return NBD_ENOSPC;
    case EINVAL: return type == NBD_CMD_WRITE || type == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
    case ENOMEM: return NBD_ENOMEM;
    case ENOTSUP: return NBD_ENOTSUP;
    case ESHUTDOWN: return NBD_ESHUTDOWN;
    default: return NBD_EIO;
    }
}

/* ---- the gate: every request is checked here before it runs ---- */

static uint32_t validate(struct conn *cn, const struct nbd_request *r, const char **why)
{
    static const uint16_t allowed[] = {
        [NBD_CMD_READ] = NBD_CMD_FLAG_DF,
        [NBD_CMD_WRITE] = NBD_CMD_FLAG_FUA,
        [NBD_CMD_DISC] = 0,
        [NBD_CMD_FLUSH] = 0,
        [NBD_CMD_TRIM] = NBD_CMD_FLAG_FUA,
        [NBD_CMD_CACHE] = 0,
        [NBD_CMD_WRITE_ZEROES] = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
        [NBD_CMD_BLOCK_STATUS] = NBD_CMD_FLAG_REQ_ONE,
    };
    if (r->type > NBD_CMD_BLOCK_STATUS) {
        *why = "unknown command";
        return NBD_EINVAL;
    }
    if (r->flags & ~allowed[r->type]) {
        *why = "flag not valid for this command";
        return NBD_EINVAL;
    }
    if ((r->flags & NBD_CMD_FLAG_DF) && !cn->c->structured) {
        *why = "DF needs structured replies";
        return NBD_EINVAL;
    }
    bool writes = r->type == NBD_CMD_WRITE || r->type == NBD_CMD_TRIM ||
                  r->type == NBD_CMD_WRITE_ZEROES;
    if (writes && cn->c->read_only) {
        *why = "the export is read-only";
        return NBD_EPERM;
    }
    if (r->type == NBD_CMD_FLUSH) {
        if (r->offset || r->length) {
            *why = "flush with an offset or length";
            return NBD_EINVAL;
        }
        return 0;
    }
    if (r->type == NBD_CMD_DISC)
        return 0;
    if (r->offset > cn->size || r->length > cn->size - r->offset) {
        *why = "request past the end of the export";
        return r->type == NBD_CMD_WRITE || r->type == NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
    }
    if (r->type == NBD_CMD_BLOCK_STATUS) {
        if (!cn->c->structured || (!cn->c->ctx_allocation && !cn->c->ctx_shared)) {
            *why = "block status needs structured replies and a meta context";
            return NBD_EINVAL;
        }
    }
    if (r->type == NBD_CMD_READ && r->length > NBD_MAX_PAYLOAD) {
        *why = "read longer than the maximum payload";
        return NBD_EINVAL;
    }
    if (r->type == NBD_CMD_WRITE_ZEROES && (r->flags & NBD_CMD_FLAG_FAST_ZERO) &&
        (r->flags & NBD_CMD_FLAG_NO_HOLE)) {
        *why = "zeroes that must be allocated are not faster than a write";
        return NBD_ENOTSUP;
    }
    return 0;
}

/* ---- running requests ---- */

static int with_space_wait(struct conn *cn, int r, int attempt)
{
    return cb_space_retry(r, attempt, cn->c->space_wait, cn->c->space_ctx, cn->c->on_full_wait_ms);
}

static void do_read(struct conn *cn, struct job *j)
{
    const struct nbd_request *r = &j->req;
    uint8_t *buf = malloc(r->length ? r->length : 1);
    if (!buf) {
        reply_error(cn, r->cookie, NBD_ENOMEM, "out of memory");
        return;
    }
    int64_t n = cb_dev_read(cn->p, cn->c->dev_id, buf, r->length, r->offset);
    cb_range *ext = NULL;
    uint64_t count = 0;
    if (n < 0) {
        reply_error(cn, r->cookie, nbd_errno((int)n, r->type), cb_last_error());
    } else if (!cn->c->structured) {
        reply_simple(cn, r->cookie, 0, buf, r->length);
    } else if (r->length == 0) {
        reply_ok(cn, r->cookie);
    } else if ((r->flags & NBD_CMD_FLAG_DF) ||
               cb_dev_block_status(cn->p, cn->c->dev_id, r->offset, r->length, &ext, &count) < 0 ||
               count == 0) {
        uint64_t off = htobe64(r->offset);
        chunk(cn, r->cookie, NBD_REPLY_TYPE_OFFSET_DATA, true, &off, 8, buf, r->length);
    } else {
        /* Holes as OFFSET_HOLE, data as OFFSET_DATA, from the real mappings. */
        uint64_t bs = cn->block_size, end = r->offset + r->length;
        for (uint64_t i = 0; i < count; i++) {
            bool hole = ext[i].kind == 0;
            uint64_t start = ext[i].begin * bs < r->offset ? r->offset : ext[i].begin * bs;
            while (i + 1 < count && (ext[i + 1].kind == 0) == hole)
                i++;
            uint64_t stop = (ext[i].begin + ext[i].length) * bs;
            if (stop > end)
                stop = end;
            bool last = stop >= end;
            uint64_t off = htobe64(start);
            if (hole) {
                uint32_t len = htobe32((uint32_t)(stop - start));
                chunk(cn, r->cookie, NBD_REPLY_TYPE_OFFSET_HOLE, last, &off, 8, &len, 4);
            } else {
                chunk(cn, r->cookie, NBD_REPLY_TYPE_OFFSET_DATA, last, &off, 8,
                      buf + (start - r->offset), stop - start);
            }
        }
    }
    cb_free(ext);
    free(buf);
    __atomic_fetch_add(&cn->bytes_read, n > 0 ? (uint64_t)n : 0, __ATOMIC_RELAXED);
}

static int commit_if_fua(struct conn *cn, const struct nbd_request *r, int res)
{
    return res >= 0 && (r->flags & NBD_CMD_FLAG_FUA) ? cb_pool_commit(cn->p) : res;
}

static void do_write(struct conn *cn, struct job *j)
{
    const struct nbd_request *r = &j->req;
    int64_t n;
    for (int attempt = 0;; attempt++) {
        n = cb_dev_write(cn->p, cn->c->dev_id, j->payload, r->length, r->offset);
        if (!with_space_wait(cn, (int)(n < 0 ? n : 0), attempt))
            break;
    }
    int res = commit_if_fua(cn, r, n < 0 ? (int)n : 0);
    if (res < 0)
        reply_error(cn, r->cookie, nbd_errno(res, r->type), cb_last_error());
    else
        reply_ok(cn, r->cookie);
    __atomic_fetch_add(&cn->bytes_written, res < 0 ? 0 : r->length, __ATOMIC_RELAXED);
}

static void do_trim_or_zero(struct conn *cn, struct job *j)
{
    const struct nbd_request *r = &j->req;
    int res;
    for (int attempt = 0;; attempt++) {
        res = r->type == NBD_CMD_TRIM
                  ? cb_dev_discard(cn->p, cn->c->dev_id, r->offset, r->length)
                  : cb_dev_write_zeroes(cn->p, cn->c->dev_id, r->offset, r->length,
                                        !(r->flags & NBD_CMD_FLAG_NO_HOLE));
        if (!with_space_wait(cn, res, attempt))
            break;
    }
    res = commit_if_fua(cn, r, res);
    if (res < 0)
        reply_error(cn, r->cookie, nbd_errno(res, r->type), cb_last_error());
    else
        reply_ok(cn, r->cookie);
}

/* One BLOCK_STATUS chunk per selected context, extents clipped to the request. */
static void do_block_status(struct conn *cn, struct job *j)
{
    const struct nbd_request *r = &j->req;
    cb_range *ext = NULL;
    uint64_t count = 0;
    uint64_t len = r->length ? r->length : 1;
    if (r->offset + len > cn->size)
        len = cn->size - r->offset;
    int res = len ? cb_dev_block_status(cn->p, cn->c->dev_id, r->offset, len, &ext, &count) : 0;
    if (res < 0 || count == 0) {
        reply_error(cn, r->cookie, res < 0 ? nbd_errno(res, r->type) : NBD_EINVAL,
                    res < 0 ? cb_last_error() : "empty block status request");
        cb_free(ext);
        return;
    }
    uint32_t ids[2] = {cn->c->ctx_allocation, cn->c->ctx_shared};
    int nctx = (ids[0] != 0) + (ids[1] != 0), sent = 0;
    uint32_t *pairs = malloc(count * 8 + 8);
    for (int c = 0; c < 2 && pairs; c++) {
        if (!ids[c])
            continue;
        uint64_t bs = cn->block_size, end = r->offset + len, n = 0;
        for (uint64_t i = 0; i < count; i++) {
            uint32_t flags = c == 0 ? (ext[i].kind == 0 ? NBD_STATE_HOLE | NBD_STATE_ZERO : 0)
                                    : (ext[i].kind == 2 ? CB_STATE_SHARED : 0);
            uint64_t start = ext[i].begin * bs < r->offset ? r->offset : ext[i].begin * bs;
            uint64_t stop = (ext[i].begin + ext[i].length) * bs;
            if (stop > end)
                stop = end;
            if (n && be32toh(pairs[2 * n - 1]) == flags) { /* merge equal neighbours */
                pairs[2 * n - 2] = htobe32(be32toh(pairs[2 * n - 2]) + (uint32_t)(stop - start));
            } else {
                pairs[2 * n] = htobe32((uint32_t)(stop - start));
                pairs[2 * n + 1] = htobe32(flags);
                n++;
            }
            if (r->flags & NBD_CMD_FLAG_REQ_ONE)
                break;
        }
        uint32_t id = htobe32(ids[c]);
        chunk(cn, r->cookie, NBD_REPLY_TYPE_BLOCK_STATUS, ++sent == nctx, &id, 4, pairs, n * 8);
    }
    if (!pairs)
        reply_error(cn, r->cookie, NBD_ENOMEM, "out of memory");
    free(pairs);
    cb_free(ext);
}

static void run(struct conn *cn, struct job *j)
{
    const struct nbd_request *r = &j->req;
    if (j->error) {
        reply_error(cn, r->cookie, j->error, j->why);
        return;
    }
    switch (r->type) {
    case NBD_CMD_READ: do_read(cn, j); break;
    case NBD_CMD_WRITE: do_write(cn, j); break;
    case NBD_CMD_TRIM:
    case NBD_CMD_WRITE_ZEROES: do_trim_or_zero(cn, j); break;
    case NBD_CMD_BLOCK_STATUS: do_block_status(cn, j); break;
    case NBD_CMD_FLUSH: {
        int res = cb_pool_commit(cn->p);
        if (res < 0)
            reply_error(cn, r->cookie, nbd_errno(res, r->type), cb_last_error());
        else
            reply_ok(cn, r->cookie);
        break;
    }
    default: /* CACHE: a hint; the data is in the page cache or a read away */
        reply_ok(cn, r->cookie);
    }
}

/* Count len payload bytes as buffered, first waiting while what is held
 * would pass max_buffered (a request alone always fits).  Only the thread
 * holding read_lock calls it, and buffered only drops meanwhile, so the
 * check stays true; no mutex unless it must wait.  The seq_cst pair
 * (reader_waits, then buffered; release: buffered, then reader_waits)
 * means a release either is seen by the check or sees the waiter. */
static void buffer_reserve(struct conn *cn, uint64_t len)
{
    uint64_t max = cn->c->max_buffered, held = __atomic_load_n(&cn->buffered, __ATOMIC_SEQ_CST);
    if (held && held + len > max) {
        pthread_mutex_lock(&cn->lock);
        __atomic_store_n(&cn->reader_waits, 1, __ATOMIC_SEQ_CST);
        while ((held = __atomic_load_n(&cn->buffered, __ATOMIC_SEQ_CST)) && held + len > max)
            pthread_cond_wait(&cn->room, &cn->lock);
        __atomic_store_n(&cn->reader_waits, 0, __ATOMIC_SEQ_CST);
        pthread_mutex_unlock(&cn->lock);
    }
    __atomic_fetch_add(&cn->buffered, len, __ATOMIC_SEQ_CST);
}

static void buffer_release(struct conn *cn, uint64_t len)
{
    __atomic_fetch_sub(&cn->buffered, len, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&cn->reader_waits, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&cn->lock);
        pthread_cond_broadcast(&cn->room);
        pthread_mutex_unlock(&cn->lock);
    }
}

/* Read one request, and its payload, into j.  Returns 1 for a request to
 * run, 0 at disconnect, or a negative errno (the connection ends). */
static int read_request(struct conn *cn, struct job *j, uint8_t *spare)
{
    struct nbd_request wire;
    int r = read_full(cn, &wire, sizeof wire);
    if (r)
        return r == -EPIPE ? 0 : r; /* EOF without DISC: the client went away */
    *j = (struct job){.req = {be32toh(wire.magic), be16toh(wire.flags), be16toh(wire.type),
                              wire.cookie, be64toh(wire.offset), be32toh(wire.length)},
                      .why = ""};
    if (j->req.magic != NBD_REQUEST_MAGIC)
        return -EPROTO; /* out of sync: nothing after this can be trusted */
    j->error = validate(cn, &j->req, &j->why);
    if (j->req.type == NBD_CMD_DISC)
        return 0;
    if (j->req.type != NBD_CMD_WRITE)
        return 1;
    if (j->req.length > NBD_MAX_PAYLOAD) {
        /* Refuse, never buffer: the payload cannot be skipped safely. */
        reply_error(cn, j->req.cookie, NBD_EOVERFLOW, "write payload over the maximum");
        return -EPROTO;
    }
    buffer_reserve(cn, j->req.length);
    j->payload_owned = !spare || j->req.length > SPARE_PAYLOAD;
    j->payload = j->payload_owned ? malloc(j->req.length ? j->req.length : 1) : spare;
    if (j->payload && (r = read_full(cn, j->payload, j->req.length)) == 0)
        return 1;
    bool oom = !j->payload;
    buffer_release(cn, j->req.length);
    if (j->payload_owned)
        free(j->payload);
    return oom ? -ENOMEM : r == -EPIPE ? 0 : r;
}

/* One of the connection's threads: read a request, let the next thread
 * read, run it; until the connection ends. */
static void *worker(void *arg)
{
    struct conn *cn = arg;
    uint8_t *spare = malloc(SPARE_PAYLOAD); /* NULL: every payload malloc'd */
    for (;;) {
        struct job j;
        pthread_mutex_lock(&cn->read_lock);
        int r = cn->stopping ? 0 : read_request(cn, &j, spare);
        if (r <= 0) {
            if (!cn->stopping)
                cn->result = r;
            cn->stopping = true;
            pthread_mutex_unlock(&cn->read_lock);
            free(spare);
            return NULL;
        }
        pthread_mutex_unlock(&cn->read_lock);
        run(cn, &j);
        __atomic_fetch_add(&cn->requests, 1, __ATOMIC_RELAXED);
        if (j.payload) {
            if (j.payload_owned)
                free(j.payload);
            buffer_release(cn, j.req.length);
        }
    }
}

int cb_nbd_transmit(cb_pool *p, cb_nbd_conn *c)
{
    cb_devinfo info;
    cb_stats st;
    int r = cb_dev_info(p, c->dev_id, &info);
    if (r < 0 || (r = cb_pool_stats(p, &st)) < 0)
        return r;
    struct conn cn = {.p = p, .c = c, .size = info.size, .block_size = st.data_block_size,
                      .rbuf = malloc(READ_BUFFER)};
    if (!cn.rbuf)
        return -ENOMEM;
    pthread_mutex_init(&cn.read_lock, NULL);
    pthread_mutex_init(&cn.lock, NULL);
    pthread_mutex_init(&cn.send_lock, NULL);
    pthread_cond_init(&cn.room, NULL);
    if (!c->max_buffered)
        c->max_buffered = 4 * (uint64_t)NBD_MAX_PAYLOAD;
    uint32_t nw = c->workers < 1 ? 1 : c->workers > 64 ? 64 : c->workers;
    pthread_t threads[64];
    uint32_t started = 0;
    for (; started + 1 < nw; started++)     /* the calling thread is one of them */
        if (pthread_create(&threads[started], NULL, worker, &cn) != 0)
            break;
    worker(&cn);
    for (uint32_t i = 0; i < started; i++)
        pthread_join(threads[i], NULL);
    c->requests = cn.requests;
    c->bytes_read = cn.bytes_read;
    c->bytes_written = cn.bytes_written;
    pthread_mutex_destroy(&cn.read_lock);
    pthread_mutex_destroy(&cn.lock);
    pthread_mutex_destroy(&cn.send_lock);
    pthread_cond_destroy(&cn.room);
    free(cn.rbuf);
    return cn.result;
}
