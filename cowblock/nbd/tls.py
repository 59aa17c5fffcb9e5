"""TLS for NBD: one listener's configuration (TLSConfig) and, after a
client's NBD_OPT_STARTTLS, one connection's session (TLSChannel).

GnuTLS runs in C (csrc/nbd/tls.c), not Python's ssl: ssl has no PSK before
Python 3.13, and its session could not be handed to the C transmission loop.
The handshake stays Python, reading and writing through the C session once
TLS is up; transmission then runs over the same session in C.

Modes, per listener (the NBD spec's names in brackets):
  off      STARTTLS gets ERR_UNSUP [NOTLS]
  on       STARTTLS is offered, plain clients are served too [SELECTIVETLS,
           no export TLS-only]
  require  every option before STARTTLS but ABORT gets ERR_TLS_REQD and
           EXPORT_NAME is dropped [FORCEDTLS]
Credentials are nbdkit's and qemu's: a PSK file of username:hexkey lines
(psktool), and/or a directory with ca-cert.pem, server-cert.pem,
server-key.pem (and optionally ca-crl.pem); verify_peer demands a client
certificate that ca-cert.pem signed.
"""
import binascii
import errno
import os
import socket
import struct

from .. import errors
from .._native import ffi, last_error, lib

OFF, ON, REQUIRE = "off", "on", "require"
MODES = (OFF, ON, REQUIRE)


class TLSError(ConnectionError):
    """The TLS handshake or a TLS read or write failed; drop the connection."""


def check_psk_file(path):
    """Refuse a PSK file GnuTLS would not read as meant, naming the line: it
    only finds that out at a client's handshake, and then only says the key
    did not match."""
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise errors.HostFileError(f"TLS PSK file {path}: {e.strerror}", e.errno) from None
    users = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        user, sep, key = line.rstrip(b" ").partition(b":")
        try:
            if not sep or not user or not key:
                raise ValueError
            binascii.unhexlify(key)
        except (ValueError, binascii.Error):
            raise errors.InvalidArgumentError(
                f"TLS PSK file {path}, line {number}: not USERNAME:HEXKEY (make one with "
                "`psktool -u USERNAME -p FILE`)") from None
        users += 1
    if not users:
        raise errors.InvalidArgumentError(f"TLS PSK file {path} has no keys (make one with "
                                          "`psktool -u USERNAME -p FILE`)")


class TLSConfig:
    """One listener's TLS.  mode None means "on" when credentials are given,
    else "off"; "on" and "require" need credentials."""

    def __init__(self, mode=None, *, psk_file=None, certificates=None, verify_peer=False):
        has_creds = bool(psk_file or certificates)
        mode = mode or (ON if has_creds else OFF)
        if mode not in MODES:
            raise errors.InvalidArgumentError(f"TLS mode {mode!r}: use one of {', '.join(MODES)}")
        if mode == OFF and (has_creds or verify_peer):
            raise errors.InvalidArgumentError("TLS credentials were given with TLS off")
        if mode != OFF and not has_creds:
            raise errors.InvalidArgumentError(
                f"TLS {mode} needs credentials: a PSK file (--tls-psk) or a certificate "
                "directory (--tls-certificates)")
        if verify_peer and not certificates:
            raise errors.InvalidArgumentError(
                "verifying client certificates (--tls-verify-peer) needs a certificate "
                "directory (--tls-certificates) whose ca-cert.pem signs them")
        self.mode = mode
        self.psk_file = os.path.abspath(psk_file) if psk_file else None
        self.certificates = os.path.abspath(certificates) if certificates else None
        self.verify_peer = bool(verify_peer)
        self._creds = None
        if mode != OFF:
            self._creds = self._load()

    def _load(self):
        if self.psk_file and lib.cb_tls_available():  # else the C call says what to install
            check_psk_file(self.psk_file)
        out = ffi.new("cb_tls_creds **")
        code = lib.cb_tls_creds_new(self.psk_file.encode() if self.psk_file else ffi.NULL,
                                    self.certificates.encode() if self.certificates else ffi.NULL,
                                    int(self.verify_peer), out)
        if code < 0:
            if lib.cb_error_kind(code) in (lib.CB_E_NOT_FOUND, lib.CB_E_DENIED, lib.CB_E_IO):
                raise errors.HostFileError(last_error(), -code)
            raise errors.InvalidArgumentError(last_error())
        return ffi.gc(out[0], lib.cb_tls_creds_free)

    @property
    def offered(self):
        """Clients may send NBD_OPT_STARTTLS."""
        return self.mode != OFF

    @property
    def required(self):
        """Nothing but STARTTLS and ABORT before TLS."""
        return self.mode == REQUIRE

    @property
    def authenticates(self):
        """Every client must prove who it is: TLS required, with a PSK or a
        verified client certificate (a server certificate alone only
        encrypts)."""
        return self.required and bool(self.psk_file or self.verify_peer)

    def __str__(self):
        if self.mode == OFF:
            return "TLS off"
        creds = [f"PSK file {self.psk_file}"] if self.psk_file else []
        if self.certificates:
            creds.append(f"certificates in {self.certificates}"
                         + (", client certificates verified" if self.verify_peer else ""))
        return f"TLS {'required' if self.required else 'offered'} ({'; '.join(creds)})"

    def accept(self, sock, timeout):
        """The server side of the TLS handshake on sock, just after the ACK
        of STARTTLS; returns the TLSChannel every later byte goes through."""
        sock.settimeout(None)          # blocking: C waits, bounded by the socket's timeouts
        channel = TLSChannel(sock)
        channel.settimeout(timeout)
        out = ffi.new("cb_tls_session **")
        code = lib.cb_tls_accept(self._creds, sock.fileno(),
                                 int(timeout * 1000) if timeout else 0, out)
        if code < 0:
            if -code == errno.ETIMEDOUT:
                raise socket.timeout("the TLS handshake timed out")
            raise TLSError(-code, last_error())
        channel.session = out[0]
        return channel


class TLSChannel:
    """A connection after STARTTLS: recv, sendall and settimeout as on its
    socket, through the C session (which `session` is, for cb_nbd_conn)."""

    RECV_CHUNK = 1 << 16

    def __init__(self, sock):
        self.sock, self.session, self._timeout = sock, None, None
        self._buf = ffi.new("char[]", self.RECV_CHUNK)

    def recv(self, n):
        got = lib.cb_tls_recv(self._live(), self._buf, min(n, self.RECV_CHUNK))
        self._raise_for(got)
        return ffi.buffer(self._buf, got)[:]

    def sendall(self, data):
        self._raise_for(lib.cb_tls_send(self._live(), ffi.from_buffer(data), len(data)))

    def _live(self):
        """The C session; after close() it is gone, and C must never see NULL."""
        if self.session is None:
            raise TLSError(errno.EBADF, "the TLS session is closed")
        return self.session

    def _raise_for(self, code):
        if code == -errno.ETIMEDOUT:
            raise socket.timeout("timed out")
        if code < 0:
            raise TLSError(-code, last_error())

    def settimeout(self, seconds):
        """Bound each wait, as socket.settimeout does (None: no bound)."""
        self._timeout = seconds
        t = 0.0 if seconds is None else max(seconds, 0.001)
        tv = struct.pack("@ll", int(t), int((t - int(t)) * 1e6))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    def gettimeout(self):
        return self._timeout

    @property
    def peer(self):
        """Who the client proved to be: "psk user NAME", "x509 DN", or
        "no client certificate"."""
        return ffi.string(lib.cb_tls_peer(self._live())).decode("utf-8", "replace")

    @property
    def description(self):
        return ffi.string(lib.cb_tls_description(self._live())).decode("utf-8", "replace")

    def close(self):
        """close_notify and free the session (the socket stays open)."""
        if self.session is not None:
            lib.cb_tls_close(self.session)
            self.session = None
