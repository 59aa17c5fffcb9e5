/*
 * TLS for the NBD server (csrc/nbd/tls.c): GnuTLS sessions owned by C.
 *
 * The handshake is Python (cowblock/nbd/handshake.py); when a client sends
 * NBD_OPT_STARTTLS it calls cb_tls_accept on the connection's socket and
 * from then on reads and writes the options only through cb_tls_recv and
 * cb_tls_send.  Transmission (cb_nbd_transmit) goes through the same
 * session: cb_nbd_conn.transport = the session.  Python's ssl cannot do this
 * (no PSK before 3.13, and its session cannot be handed to C).
 *
 * This file is also a cffi cdef (csrc/build_ffi.py reads it): plain
 * declarations only.  Calls return 0 (or a count) or a negative errno, with
 * cb_last_error() naming the problem.  Built without GnuTLS, every call
 * but cb_tls_available fails with -ENOTSUP and a message naming the
 * package to install.
 */

typedef struct cb_tls_creds cb_tls_creds;
typedef struct cb_tls_session cb_tls_session;

/* 1 when cowblock was built with GnuTLS, else 0. */
int cb_tls_available(void);

/* A listener's server credentials, shared by its sessions (read-only once
 * made).  psk_file: username:hexkey lines, as psktool writes them and
 * nbdkit, qemu and libnbd read them (read again at every handshake, so keys
 * can change without a restart).  cert_dir: ca-cert.pem, server-cert.pem,
 * server-key.pem and optionally ca-crl.pem (nbdkit's --tls-certificates
 * layout).  Either may be NULL, not both.  verify_peer: a client must show
 * a certificate that ca-cert.pem signed (needs cert_dir).  -ENOENT/-EACCES
 * for a file that cannot be read, -EINVAL for one GnuTLS cannot use. */
int cb_tls_creds_new(const char *psk_file, const char *cert_dir, int verify_peer,
                     cb_tls_creds **out);
void cb_tls_creds_free(cb_tls_creds *creds);

/* The server side of the TLS handshake on connected socket fd (a blocking
 * socket; its SO_RCVTIMEO/SO_SNDTIMEO bound each wait and timeout_ms, if
 * not 0, the whole handshake).  -EACCES when the client fails to
 * authenticate, -ETIMEDOUT, -EPROTO otherwise.  The session uses fd until
 * cb_tls_close; the caller still owns (and closes) it. */
int cb_tls_accept(cb_tls_creds *creds, int fd, uint32_t timeout_ms, cb_tls_session **out);

/* Up to len bytes: the count, 0 at the end of the stream (close_notify or
 * EOF), -ETIMEDOUT, or -EPROTO. */
int64_t cb_tls_recv(cb_tls_session *s, void *buf, size_t len);
/* All len bytes, or -ETIMEDOUT, -EPIPE. */
int cb_tls_send(cb_tls_session *s, const void *buf, size_t len);

/* Who the client proved to be: "psk user NAME", "x509 DN" or "no client
 * certificate"; and the negotiated protocol and ciphers. */
const char *cb_tls_peer(cb_tls_session *s);
const char *cb_tls_description(cb_tls_session *s);

/* Send close_notify (waiting a second at most) and free the session. */
void cb_tls_close(cb_tls_session *s);
