/*
 * How the NBD transmission loop (transmit.c) reads and writes when the
 * connection is not a plain socket: a transport is a small table of two
 * calls, so transmit.c knows nothing of TLS (tls.c provides one, as the
 * first member of its session) and builds without GnuTLS.
 *
 * sendv is only ever called by one thread at a time (transmit.c holds its
 * send_lock); recv only by the reader thread.  A TLS session allows exactly
 * that: one sender and one receiver at once.
 */
#ifndef COWBLOCK_NBD_TRANSPORT_H
#define COWBLOCK_NBD_TRANSPORT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

struct cb_nbd_transport {
    /* Up to len bytes into buf: the count, 0 at the end of the stream, or a
     * negative errno. */
    int64_t (*recv)(struct cb_nbd_transport *t, void *buf, size_t len);
    /* Every byte of the iovecs (which it may change), or a negative errno. */
    int (*sendv)(struct cb_nbd_transport *t, struct iovec *iov, int cnt);
};

#endif
