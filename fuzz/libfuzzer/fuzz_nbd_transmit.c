/*
 * libFuzzer harness for the NBD transmission phase (csrc/nbd/transmit.c):
 * the request parser, validation, and every command it runs against a real
 * pool.  The input's first byte picks the connection's options (structured
 * replies, read-only, metadata contexts, workers, which device); the rest is
 * what a client sends, after which it hangs up.  A thread drains the
 * replies.  The pool lives across inputs, so writes, trims and flushes
 * accumulate as they would on a long-lived export.
 */
#include <pthread.h>
#include <sys/socket.h>
#include <unistd.h>

#include "fuzz_common.h"

static cb_pool *pool;
static uint32_t devs[2];

static void setup(void)
{
    char dir[300];
    snprintf(dir, sizeof dir, "%s/pool", fuzz_scratch());
    fuzz_must(cb_pool_create(dir, 4u << 20, 4096, 1u << 20, 0, NULL), "create");
    fuzz_must(cb_pool_open(dir, 0, &pool), "open");
    fuzz_must(cb_dev_create(pool, 1u << 20, NULL, NULL, 0, &devs[0]), "device");
    static uint8_t block[4096];
    memset(block, 0xab, sizeof block);
    for (uint64_t off = 0; off < (1u << 20); off += 65536)
        fuzz_must((int)cb_dev_write(pool, devs[0], block, sizeof block, off), "write");
    fuzz_must(cb_dev_snapshot(pool, devs[0], 1 /* read-only */, NULL, NULL, 0, &devs[1]), "snapshot");
    fuzz_must(cb_pool_commit(pool), "commit");
}

static void *drain(void *arg)
{
    int fd = *(int *)arg;
    char buf[65536];
    while (read(fd, buf, sizeof buf) > 0)
        ;
    return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!pool)
        setup();
    if (size < 1 || size > 200000)
        return -1;
    uint8_t opt = data[0];
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) != 0)
        abort();
    int big = 1 << 20;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &big, sizeof big);
    setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    /* The client's whole stream is queued before the server starts. */
    for (size_t done = 1; done < size;) {
        ssize_t n = write(sv[0], data + done, size - done);
        if (n <= 0)
            break;
        done += (size_t)n;
    }
    shutdown(sv[0], SHUT_WR);
    pthread_t t;
    pthread_create(&t, NULL, drain, &sv[0]);
    cb_nbd_conn c = {
        .dev_id = devs[(opt >> 5) & 1],
        .fd = sv[1],
        .structured = opt & 1,
        .read_only = (opt >> 1) & 1,
        .ctx_allocation = (opt >> 2) & 1 ? 1 : 0,
        .ctx_shared = (opt >> 3) & 1 ? 2 : 0,
        .workers = 1 + ((opt >> 4) & 1),
        .max_buffered = (opt >> 6) & 1 ? 65536 : 0,
    };
    cb_nbd_transmit(pool, &c);
    shutdown(sv[1], SHUT_RDWR);
    pthread_join(t, NULL);
    close(sv[0]);
    close(sv[1]);
    return 0;
}
