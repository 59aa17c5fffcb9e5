"""`cowblock serve`: export a pool's devices over NBD.

One thread per connection: the handshake in Python, then the transmission
phase in C (cb_nbd_transmit, which releases the GIL and runs its own worker
threads), over TLS when the client negotiated it (tls.py).  Unix socket
(0600) by default; TCP on loopback when asked, other addresses only with TLS
that authenticates every client, or insecure=True.  Each NBDServer is one
listener with its own TLS configuration.  The socket appears only once it accepts
(bound under a temporary name, then renamed), so its existence is the ready
signal.  stop() closes the listener, shuts every connection down, waits for
in-flight requests and commits.
"""
import ipaddress
import os
import socket
import threading

from .. import errors
from .._native import ffi, lib
from .handshake import Export, HandshakeError, negotiate
from .protocol import CONTEXT_ALLOCATION, CONTEXT_SHARED

# Threads per connection, taking turns at its socket (csrc/nbd/transmit.c):
# as many as a client keeps requests in flight (QD16), as nbdkit's 16, so a
# thread blocked in a FLUSH's fdatasync or in the page cache does not stall
# the rest; an idle one costs a stack and nothing else.
WORKERS = 16


class Catalog:
    """The exports: the named devices, or every device of the pool.
    admit(export) -> a release callable, or raises BusyError: the daemon's
    rule on who may use a device at once (None: anyone)."""

    def __init__(self, pool, names, read_only, admit=None):
        self.pool, self.only, self.read_only = pool, list(names or []), read_only
        self.admit = admit
        for name in self.only:
            pool.device(name)  # unknown names fail at start

    def claim(self, export):
        """Called as a client enters transmission: what to call when it leaves."""
        if self.admit is None:
            return lambda: None
        try:
            return self.admit(export)
        except errors.BusyError as e:
            raise PermissionError(str(e)) from None

    def names(self):
        return self.only or [d.name for d in self.pool.list()]

    def resolve(self, name):
        names = self.names()
        if name == "":
            if len(names) != 1:
                raise LookupError("the default export needs exactly one served device; "
                                  f"name one of: {', '.join(names) or '(none)'}")
            name = names[0]
        if name not in names:
            raise LookupError(f"no export named {name!r}; exports: {', '.join(names) or '(none)'}")
        info = self.pool.info(name)
        return Export(name, info.id, info.size, self.read_only or info.read_only,
                      self.pool.block_size)


def parse_listen(text, insecure=False, tls=None):
    """(host, port) from HOST:PORT.  A non-loopback address needs tls (a
    TLSConfig) that authenticates every client, or insecure."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise errors.InvalidArgumentError(f"--listen {text!r} is not HOST:PORT (a port from 0, "
                                          "any free one, to 65535)")
    host = host.strip("[]") or "127.0.0.1"
    try:
        addr = ipaddress.ip_address(socket.gethostbyname(host) if ":" not in host else host)
    except (OSError, ValueError):
        raise errors.InvalidArgumentError(f"--listen: cannot resolve {host!r}") from None
    if not addr.is_loopback and not insecure and not (tls and tls.authenticates):
        raise errors.InvalidArgumentError(
            f"--listen {text}: {addr} is not a loopback address, so clients must authenticate: "
            "use --tls=require with --tls-psk FILE (or --tls-certificates DIR and "
            "--tls-verify-peer), or --insecure to serve it to anyone")
    return host, int(port)


class NBDServer:
    def __init__(self, pool, names=None, *, socket_path=None, listen=None, insecure=False,
                 tls=None, read_only=False, max_connections=16, workers=None, on_full_wait=0.0,
                 log=None, admit=None):
        """tls: this listener's tls.TLSConfig (None: no TLS); admit: see Catalog."""
        self.pool = pool
        self.catalog = Catalog(pool, names, read_only, admit)
        self.socket_path = socket_path
        self.tls = tls
        self.listen = parse_listen(listen, insecure, tls) if listen else None
        self.max_connections = max_connections
        self.workers = workers or WORKERS
        self.on_full_wait_ms = int(on_full_wait * 1000)
        self.log = log or (lambda msg: None)
        self._lock = threading.Lock()
        self._conns = {}          # thread -> socket
        self._exports = {}        # thread -> export name, once in transmission
        self._stop = threading.Event()
        self._listener = None
        self._serial = 0

    # ---- lifecycle ----
    def start(self):
        """Bind and listen; returns the address clients connect to."""
        if self.listen:
            family = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(self.listen)
            s.listen(64)
            self._listener = s
            self.address = s.getsockname()
        else:
            path = os.path.abspath(self.socket_path)
            tmp = f"{path}.{os.getpid()}.tmp"
            for p in (tmp,):
                if os.path.exists(p):
                    os.unlink(p)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old = os.umask(0o177)          # the socket is born 0600
            try:
                s.bind(tmp)
            finally:
                os.umask(old)
            s.listen(64)
            os.replace(tmp, path)          # appears only now that it accepts
            self._listener = s
            self.address = path
        if self.tls and self.tls.offered:
            self.log(f"{self.address}: {self.tls}")
        if self.listen and not (self.tls and self.tls.authenticates):
            self.log(f"warning: {self.address}: clients are not authenticated; whoever can "
                     "connect reads and writes every export (--tls=require with --tls-psk)")
        return self.address

    def serve_forever(self):
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, peer = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            with self._lock:
                self._serial += 1
                serial = self._serial
                full = len(self._conns) >= self.max_connections
            if full:
                self.log(f"connection {serial}: refused, {self.max_connections} connections open")
                conn.close()
                continue
            t = threading.Thread(target=self._handle, args=(conn, serial, peer), daemon=True)
            with self._lock:
                self._conns[t] = conn
            t.start()

    def stop(self):
        """Stop accepting, end every connection after its in-flight requests,
        commit."""
        self._stop.set()
        if self._listener:
            self._listener.close()
            if not self.listen and os.path.exists(self.address):
                os.unlink(self.address)
        with self._lock:
            conns = dict(self._conns)
        for sock in conns.values():
            try:
                sock.shutdown(socket.SHUT_RD)   # the reader sees EOF; workers finish
            except OSError:
                pass
        for t in conns:
            t.join(timeout=30)
        self.pool.commit()

    # ---- one connection ----
    def _handle(self, sock, serial, peer):
        who = peer if peer else "unix socket"
        session = release = None
        try:
            if self.listen:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(60)            # a silent client cannot hold the handshake forever
            try:
                session = negotiate(sock, self.catalog, self.tls)
            except (HandshakeError, EOFError, OSError, UnicodeDecodeError) as e:
                self.log(f"connection {serial} from {who}: handshake ended: {e}")
                return
            if session is None:
                self.log(f"connection {serial} from {who}: aborted during the handshake")
                return
            tls = session.tls
            (tls or sock).settimeout(None)
            release = session.release
            with self._lock:
                self._exports[threading.current_thread()] = (session.export.name,
                                                             session.read_only)
            c = ffi.new("cb_nbd_conn *")
            c.dev_id = session.export.dev_id
            c.fd = sock.fileno()
            c.transport = tls.session if tls else ffi.NULL
            c.structured = 1 if session.structured else 0
            c.read_only = 1 if session.read_only else 0
            c.ctx_allocation = session.contexts.get(CONTEXT_ALLOCATION, 0)
            c.ctx_shared = session.contexts.get(CONTEXT_SHARED, 0)
            c.workers = self.workers
            c.on_full_wait_ms = self.on_full_wait_ms
            h = self.pool._handle()
            r = lib.cb_nbd_transmit(h, c)
            status = "closed" if r == 0 else f"ended: {os.strerror(-r)}"
            self.log(f"connection {serial} from {who}: export {session.export.name!r} "
                     f"({'ro' if session.read_only else 'rw'}, "
                     f"{'structured' if session.structured else 'simple'} replies"
                     f"{f', {tls.description}, {tls.peer}' if tls else ''}), "
                     f"{c.requests} requests, {c.bytes_read} bytes read, "
                     f"{c.bytes_written} written, {status}")
        finally:
            if session and session.tls:
                session.tls.close()        # close_notify, then the socket
            sock.close()
            with self._lock:
                self._conns.pop(threading.current_thread(), None)
                self._exports.pop(threading.current_thread(), None)
            if release:
                release()

    def busy_devices(self):
        """Names of the devices NBD clients are using now."""
        with self._lock:
            return {name for name, _ in self._exports.values()}

    def connections(self):
        """(device name, read-only) of each connection in transmission."""
        with self._lock:
            return list(self._exports.values())
