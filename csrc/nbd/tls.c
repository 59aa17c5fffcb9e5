/*
 * TLS for the NBD server: GnuTLS server sessions over a connected socket.
 *
 * Design
 *  - Credentials (cb_tls_creds) belong to a listener and are read-only once
 *    made, so every connection's session shares them.  PSK keys stay in
 *    their file, which GnuTLS reads at each handshake (as nbdkit does);
 *    X.509 files are loaded once.  One priority string for all: TLS 1.3 and
 *    1.2 only (the NBD spec: 1.2 is required, older SHOULD NOT be on by
 *    default), plus the PSK key exchanges when there is a PSK file.
 *  - A session (cb_tls_session) is one connection's.  Its first member is
 *    a struct cb_nbd_transport, so cb_nbd_transmit reads and writes through
 *    it without knowing TLS.  GnuTLS allows one sending and one receiving
 *    thread on a session at once, which is how it is used: the handshake is
 *    one thread; in transmission the reader thread receives and the workers
 *    send, one at a time under transmit.c's send_lock.  Renegotiation is
 *    refused (a TLS 1.2 rehandshake would need both directions at once).
 *  - The socket is blocking.  Waits are bounded by the socket's
 *    SO_RCVTIMEO/SO_SNDTIMEO, which Python sets during the handshake and
 *    clears for transmission; an expired one surfaces as -ETIMEDOUT.
 *  - Small pieces of one reply (headers, short payloads) are corked into one
 *    record; a piece over CORK_MAX is sent as it is, after what was corked.
 *
 * Without GnuTLS (COWBLOCK_GNUTLS undefined at build time) every call fails
 * with -ENOTSUP and says which package to install.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include "../cowblock.h"
#include "tls.h"
#include "transport.h"

#ifdef COWBLOCK_GNUTLS
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#define CORK_MAX (64u << 10)
/* Our order wins, so a PSK client that also offers plain PSK still gets an
 * ephemeral key exchange (forward secrecy), and AES-GCM comes before
 * ChaCha20 even for a PSK, whose SHA-256 binder rules out AES-256-GCM in TLS
 * 1.3 (NORMAL would pick ChaCha20 then: 6x slower than AES-128-GCM with
 * AES-NI, which every x86 and ARMv8 server has). */
#define PRIORITY "NORMAL:%SERVER_PRECEDENCE:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2:" \
                 "-CIPHER-ALL:+AES-256-GCM:+AES-128-GCM:+CHACHA20-POLY1305:+AES-256-CCM:+AES-128-CCM"
#define PSK_KX ":+ECDHE-PSK:+DHE-PSK:+PSK"

struct cb_tls_creds {
    gnutls_psk_server_credentials_t psk;       /* NULL: no PSK */
    gnutls_certificate_credentials_t x509;     /* NULL: no certificates */
    bool verify_peer;
    gnutls_priority_t priority;
};

struct cb_tls_session {
    struct cb_nbd_transport transport;         /* first: cb_nbd_conn.transport */
    gnutls_session_t s;
    int fd;
    bool psk;                                  /* the listener has PSK credentials */
    char peer[512];
    char description[256];
};

int cb_tls_available(void) { return 1; }

void cb_tls_creds_free(cb_tls_creds *c)
{
    if (!c)
        return;
    if (c->psk)
        gnutls_psk_free_server_credentials(c->psk);
    if (c->x509)
        gnutls_certificate_free_credentials(c->x509);
    if (c->priority)
        gnutls_priority_deinit(c->priority);
    free(c);
}

static int readable(const char *path, const char *what)
{
    if (access(path, R_OK) != 0)
        return cb_err(cb_host_errno_kind(errno), "%s %s: %s", what, path, strerror(errno));
    return 0;
}

static int load_psk(cb_tls_creds *c, const char *file)
{
    int r = readable(file, "TLS PSK file");
    if (r < 0)
        return r;
    char *abs = realpath(file, NULL);   /* the daemon may change directory */
    if (!abs)
        return cb_err(cb_host_errno_kind(errno), "TLS PSK file %s: %s", file, strerror(errno));
    r = gnutls_psk_allocate_server_credentials(&c->psk);
    if (r == 0)
        r = gnutls_psk_set_server_credentials_file(c->psk, abs);
    free(abs);
    if (r < 0)
        return cb_err(CB_E_INVALID, "TLS PSK file %s: %s", file, gnutls_strerror(r));
    gnutls_psk_set_server_known_dh_params(c->psk, GNUTLS_SEC_PARAM_MEDIUM);
    return 0;
}

static int load_x509(cb_tls_creds *c, const char *dir)
{
    char ca[4096], crl[4096], cert[4096], key[4096];
    snprintf(ca, sizeof ca, "%s/ca-cert.pem", dir);
    snprintf(crl, sizeof crl, "%s/ca-crl.pem", dir);
    snprintf(cert, sizeof cert, "%s/server-cert.pem", dir);
    snprintf(key, sizeof key, "%s/server-key.pem", dir);
    int r;
    if ((r = readable(ca, "TLS CA certificate")) < 0 ||
        (r = readable(cert, "TLS server certificate")) < 0 ||
        (r = readable(key, "TLS server key")) < 0)
        return r;
    if ((r = gnutls_certificate_allocate_credentials(&c->x509)) < 0)
        return cb_err(CB_E_NO_MEMORY, "TLS certificate credentials: %s", gnutls_strerror(r));
    r = gnutls_certificate_set_x509_trust_file(c->x509, ca, GNUTLS_X509_FMT_PEM);
    if (r <= 0)
        return cb_err(CB_E_INVALID, "TLS CA certificate %s: %s", ca,
                      r == 0 ? "no certificate in it" : gnutls_strerror(r));
    if (access(crl, R_OK) == 0 &&
        (r = gnutls_certificate_set_x509_crl_file(c->x509, crl, GNUTLS_X509_FMT_PEM)) < 0)
        return cb_err(CB_E_INVALID, "TLS revocation list %s: %s", crl, gnutls_strerror(r));
    r = gnutls_certificate_set_x509_key_file(c->x509, cert, key, GNUTLS_X509_FMT_PEM);
    if (r < 0)
        return cb_err(CB_E_INVALID, "TLS server certificate %s and key %s: %s", cert, key,
                      gnutls_strerror(r));
    gnutls_certificate_set_known_dh_params(c->x509, GNUTLS_SEC_PARAM_MEDIUM);
    return 0;
}

int cb_tls_creds_new(const char *psk_file, const char *cert_dir, int verify_peer,
                     cb_tls_creds **out)
{
    *out = NULL;
    if (!psk_file && !cert_dir)
        return cb_err(CB_E_INVALID, "TLS needs a PSK file or a certificate directory");
    if (verify_peer && !cert_dir)
        return cb_err(CB_E_INVALID, "verifying client certificates needs a certificate directory "
                              "(its ca-cert.pem signs them)");
    cb_tls_creds *c = calloc(1, sizeof *c);
    if (!c)
        return cb_err(CB_E_NO_MEMORY, "out of memory");
    c->verify_peer = verify_peer != 0;
    int r = 0;
    if (psk_file)
        r = load_psk(c, psk_file);
    if (r == 0 && cert_dir)
        r = load_x509(c, cert_dir);
    if (r == 0) {
        const char *err_pos = NULL;
        int g = gnutls_priority_init(&c->priority, psk_file ? PRIORITY PSK_KX : PRIORITY,
                                     &err_pos);
        if (g < 0)
            r = cb_err(CB_E_INVALID, "TLS priority string at %s: %s", err_pos ? err_pos : "?",
                       gnutls_strerror(g));
    }
    if (r < 0) {
        cb_tls_creds_free(c);
        return r;
    }
    *out = c;
    return 0;
}

/* ---- one session ---- */

static bool is_auth_failure(int g)
{
    switch (g) {
    case GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR:
    case GNUTLS_E_CERTIFICATE_ERROR:
    case GNUTLS_E_NO_CERTIFICATE_FOUND:
    case GNUTLS_E_DECRYPTION_FAILED:
    case GNUTLS_E_INSUFFICIENT_CREDENTIALS:
    case GNUTLS_E_KEY_USAGE_VIOLATION:
#ifdef GNUTLS_E_CERTIFICATE_REQUIRED
    case GNUTLS_E_CERTIFICATE_REQUIRED:
#endif
        return true;
    default:
        return false;
    }
}

static int64_t tls_recv(struct cb_nbd_transport *t, void *buf, size_t len)
{
    struct cb_tls_session *ts = (struct cb_tls_session *)t;
    for (;;) {
        ssize_t n = gnutls_record_recv(ts->s, buf, len);
        if (n >= 0)
            return n;
        switch (n) {
        case GNUTLS_E_INTERRUPTED:
            continue;
        case GNUTLS_E_AGAIN:
            return cb_err(CB_E_TIMEOUT, "TLS read timed out");
        case GNUTLS_E_PREMATURE_TERMINATION:
            return 0; /* EOF without close_notify: the client went away */
        case GNUTLS_E_REHANDSHAKE:
            return cb_err(CB_E_PROTOCOL, "the client asked for TLS renegotiation, which is refused");
        default:
            return cb_err(CB_E_PROTOCOL, "TLS read: %s", gnutls_strerror((int)n));
        }
    }
}

static int send_record(struct cb_tls_session *ts, const uint8_t *p, size_t len)
{
    while (len) {
        ssize_t n = gnutls_record_send(ts->s, p, len);
        if (n == GNUTLS_E_INTERRUPTED)
            continue;
        if (n == GNUTLS_E_AGAIN)
            return cb_err(CB_E_TIMEOUT, "TLS write timed out");
        if (n < 0)
            return cb_err(CB_E_CLOSED, "TLS write: %s", gnutls_strerror((int)n));
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int uncork(struct cb_tls_session *ts)
{
    for (;;) {
        int r = gnutls_record_uncork(ts->s, GNUTLS_RECORD_WAIT);
        if (r >= 0)
            return 0;
        if (r == GNUTLS_E_INTERRUPTED)
            continue;
        if (r == GNUTLS_E_AGAIN)
            return cb_err(CB_E_TIMEOUT, "TLS write timed out");
        return cb_err(CB_E_CLOSED, "TLS write: %s", gnutls_strerror(r));
    }
}

static int tls_sendv(struct cb_nbd_transport *t, struct iovec *iov, int cnt)
{
    struct cb_tls_session *ts = (struct cb_tls_session *)t;
    int r = 0;
    gnutls_record_cork(ts->s);
    for (int i = 0; i < cnt && r == 0; i++) {
        if (iov[i].iov_len > CORK_MAX) {
            /* Large enough to fill records alone: no copy into the cork. */
            if ((r = uncork(ts)) == 0)
                r = send_record(ts, iov[i].iov_base, iov[i].iov_len);
            gnutls_record_cork(ts->s);
        } else {
            r = send_record(ts, iov[i].iov_base, iov[i].iov_len);
        }
    }
    int u = uncork(ts);
    return r < 0 ? r : u;
}

static void describe_peer(struct cb_tls_session *ts)
{
    gnutls_session_t s = ts->s;
    if (gnutls_auth_get_type(s) == GNUTLS_CRD_PSK) {
        const char *user = gnutls_psk_server_get_username(s);
        snprintf(ts->peer, sizeof ts->peer, "psk user %s", user ? user : "?");
        return;
    }
    unsigned n = 0;
    const gnutls_datum_t *certs = gnutls_certificate_get_peers(s, &n);
    gnutls_x509_crt_t crt;
    gnutls_datum_t dn = {NULL, 0};
    snprintf(ts->peer, sizeof ts->peer, "no client certificate");
    if (!certs || n == 0 || gnutls_x509_crt_init(&crt) < 0)
        return;
    if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) == 0 &&
        gnutls_x509_crt_get_dn3(crt, &dn, 0) == 0)
        snprintf(ts->peer, sizeof ts->peer, "x509 %.*s", (int)dn.size, (char *)dn.data);
    gnutls_free(dn.data);
    gnutls_x509_crt_deinit(crt);
}

static void describe_session(struct cb_tls_session *ts)
{
    gnutls_session_t s = ts->s;
    const char *group = gnutls_group_get_name(gnutls_group_get(s));
    const char *kx = gnutls_kx_get_name(gnutls_kx_get(s));
    snprintf(ts->description, sizeof ts->description, "%s %s%s%s %s",
             gnutls_protocol_get_name(gnutls_protocol_get_version(s)), kx ? kx : "",
             group ? "/" : "", group ? group : "",
             gnutls_cipher_get_name(gnutls_cipher_get(s)));
}

static int handshake_error(struct cb_tls_session *ts, int g, bool verified_peer)
{
    if (g == GNUTLS_E_AGAIN || g == GNUTLS_E_TIMEDOUT)
        return cb_err(CB_E_TIMEOUT, "TLS handshake timed out");
    char why[256] = "";
    unsigned status = verified_peer && g == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR
                          ? gnutls_session_get_verify_cert_status(ts->s) : 0;
    gnutls_datum_t out = {NULL, 0};
    if (status && gnutls_certificate_verification_status_print(
                      status, GNUTLS_CRT_X509, &out, 0) == 0) {
        snprintf(why, sizeof why, " (%.*s)", (int)out.size, (char *)out.data);
        gnutls_free(out.data);
    }
    bool psk_mismatch = ts->psk && (g == GNUTLS_E_RECEIVED_ILLEGAL_PARAMETER ||
                                    g == GNUTLS_E_DECRYPTION_FAILED);
    if (psk_mismatch)   /* a TLS 1.3 binder, or a 1.2 Finished, that our key did not make */
        snprintf(why, sizeof why, " (the client's PSK user or key is not in the PSK file)");
    if (g == GNUTLS_E_FATAL_ALERT_RECEIVED || g == GNUTLS_E_WARNING_ALERT_RECEIVED)
        snprintf(why, sizeof why, " (the client sent alert: %s)",
                 gnutls_alert_get_name(gnutls_alert_get(ts->s)));
    return cb_err(is_auth_failure(g) || status || psk_mismatch ? CB_E_DENIED : CB_E_PROTOCOL,
                  "TLS handshake failed: %s%s", gnutls_strerror(g), why);
}

int cb_tls_accept(cb_tls_creds *c, int fd, uint32_t timeout_ms, cb_tls_session **out)
{
    *out = NULL;
    struct cb_tls_session *ts = calloc(1, sizeof *ts);
    if (!ts)
        return cb_err(CB_E_NO_MEMORY, "out of memory");
    ts->transport = (struct cb_nbd_transport){tls_recv, tls_sendv};
    ts->fd = fd;
    ts->psk = c->psk != NULL;
    int g = gnutls_init(&ts->s, GNUTLS_SERVER | GNUTLS_NO_SIGNAL);
    if (g < 0) {
        free(ts);
        return cb_err(CB_E_NO_MEMORY, "gnutls_init: %s", gnutls_strerror(g));
    }
    if ((g = gnutls_priority_set(ts->s, c->priority)) < 0 ||
        (c->psk && (g = gnutls_credentials_set(ts->s, GNUTLS_CRD_PSK, c->psk)) < 0) ||
        (c->x509 && (g = gnutls_credentials_set(ts->s, GNUTLS_CRD_CERTIFICATE, c->x509)) < 0)) {
        int r = cb_err(CB_E_PROTOCOL, "TLS session setup: %s", gnutls_strerror(g));
        gnutls_deinit(ts->s);
        free(ts);
        return r;
    }
    if (c->verify_peer) {
        gnutls_certificate_server_set_request(ts->s, GNUTLS_CERT_REQUIRE);
        gnutls_session_set_verify_cert(ts->s, NULL, 0);   /* chain to ca-cert.pem */
    }
    gnutls_transport_set_int(ts->s, fd);
    gnutls_handshake_set_timeout(ts->s, timeout_ms ? timeout_ms : GNUTLS_INDEFINITE_TIMEOUT);
    do
        g = gnutls_handshake(ts->s);
    while (g == GNUTLS_E_INTERRUPTED);
    if (g < 0) {
        int r = handshake_error(ts, g, c->verify_peer);
        gnutls_deinit(ts->s);
        free(ts);
        return r;
    }
    describe_peer(ts);
    describe_session(ts);
    *out = ts;
    return 0;
}

int64_t cb_tls_recv(cb_tls_session *s, void *buf, size_t len)
{
    return tls_recv(&s->transport, buf, len);
}

int cb_tls_send(cb_tls_session *s, const void *buf, size_t len)
{
    struct iovec iov = {(void *)buf, len};
    return tls_sendv(&s->transport, &iov, 1);
}

const char *cb_tls_peer(cb_tls_session *s) { return s->peer; }

const char *cb_tls_description(cb_tls_session *s) { return s->description; }

void cb_tls_close(cb_tls_session *s)
{
    if (!s)
        return;
    struct timeval second = {1, 0};   /* a client that reads nothing cannot hold us */
    setsockopt(s->fd, SOL_SOCKET, SO_SNDTIMEO, &second, sizeof second);
    gnutls_bye(s->s, GNUTLS_SHUT_WR);
    gnutls_deinit(s->s);
    free(s);
}

#else /* !COWBLOCK_GNUTLS */

static int unavailable(void)
{
    return cb_err(CB_E_UNSUPPORTED, "cowblock was built without GnuTLS, so it has no TLS: install "
                           "libgnutls28-dev (Debian; gnutls-devel on Fedora) and reinstall cowblock");
}

int cb_tls_available(void) { return 0; }

int cb_tls_creds_new(const char *psk_file, const char *cert_dir, int verify_peer,
                     cb_tls_creds **out)
{
    *out = NULL;
    return unavailable();
}

void cb_tls_creds_free(cb_tls_creds *creds) {}

int cb_tls_accept(cb_tls_creds *creds, int fd, uint32_t timeout_ms, cb_tls_session **out)
{
    *out = NULL;
    return unavailable();
}

int64_t cb_tls_recv(cb_tls_session *s, void *buf, size_t len) { return unavailable(); }

int cb_tls_send(cb_tls_session *s, const void *buf, size_t len) { return unavailable(); }

const char *cb_tls_peer(cb_tls_session *s) { return ""; }

const char *cb_tls_description(cb_tls_session *s) { return ""; }

void cb_tls_close(cb_tls_session *s) {}

#endif
