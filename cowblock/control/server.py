"""The daemon side of the control socket: dispatch from the call table.

One thread per connection; each connection is a session (what a client
attaches through it and asks to be removed with it, such as the listener of
a foreground `cowblock serve`, goes when it closes).  Only the pool owner's
uid (or root) may connect (SO_PEERCRED); the socket is 0600.

A malformed request (not JSON, not a request object, a bad $-value, nesting
deeper than MAX_DEPTH, more than MAX_ITEMS JSON values, arguments that do
not fit the call) gets an InvalidArgumentError or TypeError reply and the
connection goes on; a length over MAX_MESSAGE gets one and the connection
is dropped.

Stopping: stop() unlinks the listening socket and closes it, then lets each
connection finish the call it is running (its reply is sent) and closes it
with the stopping notice (protocol.STOPPING), as it closes those still
waiting to be accepted; a request read after that is dropped unread.  Only
the notice tells a client that its call did not run and may be retried: a
connection that ends without it ended with a daemon that died (SIGKILL
closes the socket before the process is gone, so the client cannot tell by
the pid), and the call may have run.
"""
import contextlib
import errno as _errno
import importlib
import inspect
import itertools
import os
import socket
import struct
import threading

from .. import errors
from . import protocol as P
from .calls import CALLS, DAEMON, DEVICE, FUNCTION, POOL


def _resolve(target):
    module, _, qualname = target.partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


class Session:
    """One control connection."""

    _ids = itertools.count(1)

    def __init__(self, conn):
        self.id = next(self._ids)
        self.conn = conn
        self.send_lock = threading.Lock()
        self.on_close = []        # callables run when the connection ends

    def send(self, obj):
        with self.send_lock:
            P.send(self.conn, obj)


class ControlServer:
    """Runs the calls of the table against `pool`.  `daemon` (a PoolDaemon)
    answers the daemon calls and the busy and freeze rules; without one,
    `busy_devices` (a callable giving the names in use) serves the busy rule."""

    def __init__(self, pool, busy_devices=None, *, daemon=None, path=None):
        self.pool = pool
        self.daemon = daemon
        self.busy_devices = busy_devices
        self.path = path
        self.calls_served = 0
        self._targets = {name: _resolve(c.target) for name, c in CALLS.items()
                         if c.kind != DAEMON or daemon is not None}
        self._signatures = {name: inspect.signature(t) for name, t in self._targets.items()}
        self._lock = threading.Lock()
        self._sessions = set()
        self._busy_sessions = set()
        self._stopping = False
        self._sock = None
        self._acceptor = None

    # ---- the listening socket ----
    def start(self):
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            s.bind(tmp)
        finally:
            os.umask(old)
        s.listen(64)
        os.replace(tmp, self.path)   # appears only once it accepts
        self._sock = s
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="cowblock-control")
        self._acceptor.start()

    def stop(self, exclude=None):
        """Stop accepting, unlink the socket, end every session but `exclude`
        after its running call."""
        with self._lock:
            self._stopping = True
            sessions = [s for s in self._sessions if s is not exclude]
            idle = [s for s in sessions if s not in self._busy_sessions]
        if self.path:   # first, so that no connection comes after the ones drained below
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if self._sock:
            # Connections still waiting to be accepted would be reset by the
            # close, and a reset says nothing of whether a call ran: they get
            # the notice too.  (Non-blocking: the accept thread ends at its
            # next accept, with nothing left for it.)
            self._sock.setblocking(False)
            while True:
                try:
                    conn, _ = self._sock.accept()
                except OSError:
                    break
                conn.setblocking(True)
                self._join(conn)
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            if self._acceptor is not threading.current_thread():
                self._acceptor.join(timeout=10)   # it has told what it took meanwhile
        for s in idle:
            self._end_stopping(s)

    @staticmethod
    def _end_stopping(session):
        """Close a session because the daemon stops, saying so first."""
        with contextlib.suppress(OSError):
            session.send(P.STOPPING)
        with contextlib.suppress(OSError):
            session.conn.shutdown(socket.SHUT_RDWR)

    def session_count(self):
        with self._lock:
            return len(self._sessions)

    def _accept(self):
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            session = self._join(conn)
            if session is not None:
                threading.Thread(target=self._serve, args=(session,), daemon=True,
                                 name="cowblock-control-conn").start()

    # ---- one connection ----
    @staticmethod
    def _allowed(conn):
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        return uid == 0 or uid == os.getuid()

    def _join(self, conn):
        """conn's session, counted from now on (a stop from now on tells it);
        None, conn told and closed, once the daemon stops."""
        session = Session(conn)
        with self._lock:
            stopping = self._stopping
            if not stopping:
                self._sessions.add(session)
        if stopping:
            self._end_stopping(session)
            conn.close()
            return None
        return session

    def serve_connection(self, conn):
        """Serve one connection until it ends, and close it."""
        session = self._join(conn)
        if session is not None:
            self._serve(session)

    def _serve(self, session):
        conn = session.conn
        with conn:
            try:
                if conn.family == socket.AF_UNIX and not self._allowed(conn):
                    with contextlib.suppress(OSError):
                        session.send({"error": {"class": "PermissionError", "errno": _errno.EPERM,
                                                "message": "only the pool's owner may use its "
                                                           "control socket"}})
                    return
                self._requests(session)
            finally:
                with self._lock:
                    self._sessions.discard(session)
                    self._busy_sessions.discard(session)
                for fn in reversed(session.on_close):
                    with contextlib.suppress(Exception):
                        fn()

    def _requests(self, session):
        while True:
            try:
                frame = P.recv_frame(session.conn)
            except (EOFError, OSError):
                return
            except errors.CowblockError as e:  # too long: the stream is lost
                with contextlib.suppress(OSError):
                    session.send(P.error_reply(e))
                return
            with self._lock:
                stopping = self._stopping
                if not stopping:
                    self._busy_sessions.add(session)
            if stopping:            # dropped unread: the client may retry elsewhere
                self._end_stopping(session)
                return
            try:
                reply = self.handle(frame, session)
                if reply is None:   # a streaming call ended the session
                    return
                try:
                    session.send(reply)
                except (TypeError, ValueError) as e:  # a result JSON cannot carry
                    session.send(P.error_reply(e))
            except OSError:
                return
            finally:
                with self._lock:
                    self._busy_sessions.discard(session)
                    stop = self._stopping
            if stop:
                self._end_stopping(session)
                return

    def handle(self, frame, session=None):
        """The reply (a JSON-ready dict) to one request message's bytes."""
        req = None
        try:
            req = P.parse(frame, P.MAX_ITEMS)
            if not isinstance(req, dict):
                raise errors.InvalidArgumentError("a control request is a JSON object")
            version = req.get("v")
            if version != P.VERSION:
                raise errors.VersionError(
                    f"the pool daemon speaks control protocol {P.VERSION}, this client "
                    f"{version if version is not None else 1}: one of them is from another "
                    "cowblock version; restart the daemon (`cowblock daemon stop`) once both "
                    "are upgraded")
            name, args, kwargs = req.get("call"), req.get("args", []), req.get("kwargs", {})
            if not isinstance(name, str):
                raise errors.InvalidArgumentError(f"control call name {name!r:.100} is not a string")
            if not isinstance(args, list):
                raise errors.InvalidArgumentError(f"control call {name!r:.100}: args is not a list")
            args, kwargs = P.decode(args), P.decode(kwargs)
            if not isinstance(kwargs, dict):
                raise errors.InvalidArgumentError(f"control call {name!r:.100}: kwargs is not an object")
            result = self.call(name, args, kwargs, session)
            self.calls_served += 1
            if result is P.STREAMED:
                return None
            reply = {"ok": P.encode(result)}
        except Exception as e:  # every error goes back to the caller, typed
            self.calls_served += 1
            reply = P.error_reply(e)
        if isinstance(req, dict) and req.get("health") is True and self.pool is not None:
            from ..health import pool_health
            with contextlib.suppress(Exception):
                reply["health"] = P.encode(pool_health(self.pool))
        return reply

    def call(self, name, args, kwargs, session=None):
        if not isinstance(name, str) or name not in self._targets:
            raise errors.InvalidArgumentError(f"unknown control call {name!r:.100}")
        if not all(isinstance(k, str) for k in kwargs):
            raise errors.InvalidArgumentError(f"control call {name}: keyword names must be strings")
        spec, target, sig = CALLS[name], self._targets[name], self._signatures[name]
        if spec.kind == DAEMON:
            bound = self._bind(name, sig, (self.daemon, session, *args), kwargs)
            return target(*bound.args, **bound.kwargs)
        pool = self.pool
        if spec.kind == DEVICE:
            if not args:
                raise TypeError(f"{name} needs the device name as its first argument")
            device_name = args[0]
            device = pool.device(device_name)
            bound = self._bind(name, sig, (device, *args[1:]), kwargs)
            subject = device
        else:
            device_name = None
            bound = self._bind(name, sig, (pool, *args), kwargs)
            subject = pool
        if spec.kind in (POOL, DEVICE) and spec.target.startswith(("cowblock.pool:Pool.",
                                                                  "cowblock.device:Device.")):
            # the bound method of the object itself: the daemon uses only its public API
            method = getattr(subject, spec.target.rsplit(".", 1)[1])
            target = lambda *a, **k: method(*a[1:], **k)  # noqa: E731
        with_defaults = sig.bind(*bound.args, **bound.kwargs)
        with_defaults.apply_defaults()
        arguments = dict(with_defaults.arguments)
        if spec.limit:
            spec.limit(arguments)
        if spec.busy:
            targets = device_name if spec.busy == "self" else arguments.get(spec.busy)
            for target_name in (targets if isinstance(targets, (list, tuple)) else [targets]):
                if not isinstance(target_name, str):
                    continue
                if spec.busy_if and not spec.busy_if(
                        device if spec.kind == DEVICE else _existing(pool, target_name), arguments):
                    continue
                use = self._in_use(target_name)
                if use:
                    raise errors.BusyError(f"device {target_name!r} is {use}: cannot "
                                           f"{spec.doing or name}")
        freeze = arguments.get(spec.freeze) if spec.freeze else None
        with self._frozen(freeze):
            result = target(*bound.args, **bound.kwargs)
        if spec.changes and self.daemon is not None:
            self.daemon.changed(device_name if spec.changes == "self" else
                                arguments.get(spec.changes))
        if spec.returns == "device":
            return result.info()
        return result

    @staticmethod
    def _bind(name, sig, args, kwargs):
        try:
            return sig.bind(*args, **kwargs)
        except TypeError as e:
            raise TypeError(f"{name}: {e}") from None

    def _in_use(self, name):
        if self.daemon is not None:
            return self.daemon.in_use(name)
        if self.busy_devices is not None and name in self.busy_devices():
            return "exported over NBD"
        return None

    def _frozen(self, name):
        if self.daemon is not None and isinstance(name, str):
            return self.daemon.frozen(name)
        return contextlib.nullcontext()


def _existing(pool, name):
    """The device a busy_if predicate looks at (None when there is none:
    the call itself then reports the unknown name)."""
    try:
        return pool.device(name)
    except errors.CowblockError:
        return None
