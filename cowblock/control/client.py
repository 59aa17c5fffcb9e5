"""The client side of the control socket: the pool API, run in the daemon.

connect(path) returns the Pool itself when no daemon holds it, or a
PoolProxy with the same API whose every call is one round trip to the
daemon.  daemon(path) gives a proxy to the pool's daemon, starting one if
none runs: a detached `python -m cowblock.daemon` that reports readiness
(or why it could not start) on an inherited pipe.

The proxy's methods come from the call table (control.calls): pool calls
are its methods, device calls the methods of proxy.device(name), library
functions run in the daemon through run(pool, function, ...), and the
daemon's own calls (mount, serve, status, stop...) are methods too.

A daemon closes its control socket before it releases the pool lock.  A
client whose connection ends before a reply retries once: through a new
connection, or, when the daemon has gone, on the pool opened here.
"""
import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

from .. import errors, rados
from ..runtime import RuntimeDir
from . import protocol as P
from .calls import BY_TARGET, CALLS, DAEMON, DEVICE, FUNCTION, POOL

START_TIMEOUT = 60.0      # seconds a daemon may take to report ready
# Seconds a call may take before the daemon counts as hung, and seconds an
# auto-started daemon lives on with nothing attached; both can be set in
# the environment (scripts and tests that want them shorter).
CALL_TIMEOUT = float(os.environ.get("COWBLOCK_CONTROL_TIMEOUT", 300))
GRACE = os.environ.get("COWBLOCK_DAEMON_GRACE")
DAEMON_STARTING = 10.0    # seconds to wait for the socket of a daemon that holds the lock


class ConnectionLost(errors.DaemonError):
    """The daemon's connection ended before its reply: the call may have run."""


class DaemonStopping(ConnectionLost):
    """The daemon said it stops before it ran the call."""


class Client:
    """One connection to a daemon's control socket."""

    def __init__(self, runtime, timeout=CALL_TIMEOUT):
        self.runtime = runtime
        self.timeout = timeout
        self._lock = threading.Lock()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(runtime.control)
        except OSError:
            s.close()
            raise
        self._sock = s

    def call(self, name, *args, health=False, timeout=None, **kwargs):
        """Run one call; returns its value (and the health, if asked for, as
        the attribute last_health)."""
        request = {"v": P.VERSION, "call": name, "args": P.encode(list(args)),
                   "kwargs": P.encode(kwargs)}
        if health:
            request["health"] = True
        with self._lock:
            if self._sock is None:
                raise errors.PoolClosedError(f"pool {self.runtime.pool_path} is closed")
            self._sock.settimeout(self.timeout if timeout is None else timeout)
            try:
                try:
                    P.send(self._sock, request)
                except (BrokenPipeError, ConnectionResetError):
                    pass    # it closed: what it said before it did is still there to read
                reply = P.recv(self._sock)
            except socket.timeout:
                raise errors.DaemonError(
                    f"the pool daemon (pid {self.runtime.pid() or '?'}) did not answer {name} "
                    f"in {self.timeout if timeout is None else timeout:g} s: it may be stopped "
                    "(SIGSTOP) or hung; `cowblock daemon stop --force` ends it") from None
            except (EOFError, BrokenPipeError, ConnectionResetError) as e:
                raise ConnectionLost(f"the pool daemon's connection ended during {name}: "
                                     f"{e or type(e).__name__}") from None
        if "stopping" in reply:
            raise DaemonStopping(f"the pool daemon stopped before {name} ran")
        self.last_health = P.decode(reply["health"]) if "health" in reply else None
        if "ok" in reply:
            return P.decode(reply["ok"])
        P.raise_error(reply.get("error", {}))

    def events(self, name, *args, **kwargs):
        """Start a streaming call; yields its events until the daemon ends it."""
        with self._lock:
            self._sock.settimeout(None)
            P.send(self._sock, {"v": P.VERSION, "call": name, "args": P.encode(list(args)),
                                "kwargs": P.encode(kwargs)})
            while True:
                try:
                    msg = P.recv(self._sock)
                except (EOFError, OSError):
                    return
                if "event" in msg:
                    yield P.decode(msg["event"])
                elif "error" in msg:
                    P.raise_error(msg["error"])
                else:
                    return

    def fileno(self):
        return self._sock.fileno()

    def close(self):
        with contextlib.suppress(Exception):
            if self._sock is not None:
                self._sock.close()
        self._sock = None


# ---- the proxy ----

class PoolProxy:
    """The Pool API, run inside the daemon that holds the pool."""

    def __init__(self, runtime, client, *, on_note=None, open_args=None):
        self.runtime = runtime
        self.path = runtime.pool_path
        self.read_only = False
        self.health = None          # the pool's health, from the reply that carried it
        self.want_health = False    # ask for it with the next call (once: it walks every device)
        self._client = client
        self._local = None          # the pool opened here, once the daemon has gone
        self._on_note = on_note
        self._open_args = open_args or {}
        self._block_size = None

    # ---- calls ----
    def call(self, name, *args, **kwargs):
        """Run control call `name` (see control.calls)."""
        if self._local is not None:
            return self._local.call(name, list(args), kwargs)
        want, self.want_health = self.want_health, False
        try:
            value = self._client.call(name, *args, health=want, **kwargs)
        except ConnectionLost as e:
            if CALLS.get(name) is not None and CALLS[name].kind == DAEMON:
                raise
            if not isinstance(e, DaemonStopping) and not getattr(CALLS.get(name), "query", False):
                # It may or may not have been done.  (Whether the pid is still
                # alive tells nothing: a SIGKILLed daemon's socket closes before
                # the process is gone, and a call sent again elsewhere would
                # run on the last commit, without what the dead daemon held.)
                pid = self.runtime.recorded_pid()
                raise errors.DaemonError(
                    f"the pool daemon{f' (pid {pid})' if pid else ''} died during {name}; "
                    "the next command cleans up after it") from e
            # A call the daemon did not run because it stops, or a query that
            # reached a daemon already dying (its socket still takes
            # connections while it exits), is asked again of a new daemon or
            # of the pool itself, once a dead one's leftovers are cleaned up.
            self._reconnect()
            self.want_health = want
            return self.call(name, *args, **kwargs)
        if self._client.last_health is not None:
            self.health = self._client.last_health
        return value

    def _reconnect(self):
        """Once: a new connection, or the pool itself if its daemon is gone."""
        if getattr(self, "_retried", False):
            raise errors.DaemonError(f"lost the pool daemon of {self.path} twice")
        self._retried = True
        self._client.close()
        target = connect(self.path, on_note=self._on_note, **self._open_args)
        if isinstance(target, PoolProxy):
            self._client = target._client
            return
        from .server import ControlServer
        self._local = ControlServer(target)
        self._local_pool = target

    def run(self, function, *args, **kwargs):
        """function(pool, *args, **kwargs) run in the daemon (one round trip)."""
        return self.call(_call_name(function), *args, **kwargs)

    def __getattr__(self, name):
        spec = CALLS.get(name)
        if spec is not None and spec.kind in (POOL, DAEMON, FUNCTION) and not name.startswith("_"):
            if spec.returns == "device":
                return lambda *a, **k: DeviceProxy(self, self.call(name, *a, **k))
            return lambda *a, **k: self.call(name, *a, **k)
        raise AttributeError(name)

    # ---- the parts of the Pool API that are not plain calls ----
    def __contains__(self, name):
        return self.call("contains", name)

    def device(self, name):
        """A device of the pool (no round trip: an unknown name fails at its first use)."""
        return DeviceProxy(self, name)

    def diff(self, a, b, *, same=False):
        yield from self.call("diff", a, b, same=same)

    @property
    def config(self):
        return self.call("get_config")

    @property
    def block_size(self):
        if self._block_size is None:
            self._block_size = self.call("stats").block_size
        return self._block_size

    def close(self):
        self._client.close()
        if self._local is not None:
            self._local_pool.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<cowblock.PoolProxy {self.path!r} via {self.runtime.control}>"


class DeviceProxy:
    def __init__(self, pool, name_or_info):
        self._pool = pool
        if isinstance(name_or_info, str):
            self.name, self._info = name_or_info, None
        else:
            self.name, self._info = name_or_info.name, name_or_info

    @property
    def pool(self):
        return self._pool

    @property
    def id(self):
        return (self._info or self.info()).id

    def info(self):
        self._info = self._pool.call("info", self.name)
        return self._info

    @property
    def size(self):
        return self._pool.call("device.size", self.name)

    @property
    def read_only(self):
        return self._pool.call("device.read_only", self.name)

    def readinto(self, buffer, offset):
        mv = memoryview(buffer).cast("B")
        data = self.pread(len(mv), offset)
        mv[:len(data)] = data
        return len(data)

    def pwrite(self, data, offset):
        return self._pool.call("device.pwrite", self.name, bytes(data), offset)

    def __getattr__(self, name):
        spec = CALLS.get(f"device.{name}")
        if spec is not None and spec.kind == DEVICE:
            return lambda *a, **k: self._pool.call(f"device.{name}", self.name, *a, **k)
        raise AttributeError(name)

    def __repr__(self):
        return f"<cowblock.DeviceProxy {self.name!r} of {self._pool.path!r}>"


def _call_name(function):
    target = f"{function.__module__}:{function.__qualname__}"
    spec = BY_TARGET.get(target)
    if spec is None or spec.kind != FUNCTION:
        raise errors.InvalidArgumentError(f"{target} is not a control call")
    return spec.name


def run(pool, function, *args, **kwargs):
    """function(pool, ...) where the pool lives: in its daemon for a proxy (one
    round trip), here for a Pool."""
    if isinstance(pool, PoolProxy):
        return pool.run(function, *args, **kwargs)
    return function(pool, *args, **kwargs)


# ---- finding the daemon, or the pool ----

def _try_client(runtime):
    try:
        return Client(runtime)
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except OSError as e:
        raise errors.DaemonError(f"cannot reach the pool daemon at {runtime.control}: "
                                 f"{e.strerror or e}") from None


def connect(path, *, read_only=False, timeout=0.0, commit_interval=1.0, on_note=None):
    """The pool at path: a PoolProxy to its daemon when one holds it, else the
    Pool itself (opened with the arguments given, waiting up to timeout
    seconds for another holder).  Leftovers of a daemon that died are
    cleaned up first, each reported to on_note(text)."""
    path = os.fspath(path)
    if not os.path.isfile(os.path.join(path, "metadata")):
        from ..pool import Pool
        return Pool.open(path, read_only=read_only, timeout=timeout,
                         commit_interval=commit_interval)   # says what is missing
    runtime = RuntimeDir(path)
    open_args = {"read_only": read_only, "timeout": timeout, "commit_interval": commit_interval}
    deadline = time.monotonic() + (timeout if timeout is not None else float("inf"))
    while True:
        client = _try_client(runtime)
        if client is not None:
            return PoolProxy(runtime, client, on_note=on_note, open_args=open_args)
        from ..pool import Pool   # (imported only here: a proxy needs none of it)
        try:
            pool = Pool.open(path, read_only=read_only, timeout=0,
                             commit_interval=commit_interval)
        except errors.PoolLockedError:
            now = time.monotonic()
            starting = runtime.pid() is not None and now < deadline + DAEMON_STARTING
            if now >= deadline and not starting:
                raise
            time.sleep(0.05)
            continue
        if runtime.exists():
            from ..daemon.leftovers import clean
            for note in clean(runtime, pool):
                if on_note:
                    on_note(note)
        return pool


def open_exclusive(path, *, read_only=False, timeout=0.0, on_note=None):
    """The Pool itself, opened here, for what must not run inside a daemon
    (repair): an idle daemon is asked to stop first; one that has
    attachments, or clients, makes this a BusyError naming them."""
    stop_idle_daemon(path)
    target = connect(path, read_only=read_only, timeout=timeout, on_note=on_note)
    if isinstance(target, PoolProxy):
        target.close()
        raise errors.BusyError(f"pool {path} is in use by a daemon that just started")
    return target


def stop_idle_daemon(path):
    """Ask the daemon of the pool at path, if one runs, to stop; one that
    has attachments, or clients, makes this a BusyError naming them."""
    runtime = RuntimeDir(path)
    c = _try_client(runtime)
    if c is not None:
        with PoolProxy(runtime, c) as proxy:
            if not proxy.stop(if_idle=True)["stopped"]:
                st = proxy.status()
                what = [f"{a['device']} mounted on {a['dir']}" if a["kind"] == "mount" else
                        f"an NBD listener on {a['address']}" for a in st["attachments"]]
                raise errors.BusyError(
                    f"pool {path} is in use by its daemon (pid {st['pid']}): "
                    + ("; ".join(what) or f"{st['sessions'] - 1} other clients connected")
                    + "; stop them (or `cowblock daemon stop`) first")


def daemon(path, *, start=True, timeout=30.0, on_note=None, grace=None):
    """A proxy to the daemon of the pool at path, and whether this call
    started it.  Without a running daemon: start one (start=True), which
    exits on its own once nothing is attached for `grace` seconds."""
    path = os.fspath(path)
    # (a RADOS pool's cache on a host that never opened it has no metadata
    # file yet: its daemon's open says whether the pool exists)
    if not os.path.isfile(os.path.join(path, "metadata")) and rados.location_of(path) is None:
        from ..pool import Pool
        Pool.open(path)   # raises PoolNotFoundError naming what is missing
    runtime = RuntimeDir(path)
    deadline = time.monotonic() + timeout
    while True:
        client = _try_client(runtime)
        if client is not None:
            return PoolProxy(runtime, client, on_note=on_note), False
        if not start:
            raise errors.DaemonError(f"no daemon serves pool {path}")
        try:
            notes = _start(runtime, grace)
        except errors.PoolLockedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)   # another command holds the pool, or another daemon is starting
            continue
        for note in notes:
            if on_note:
                on_note(note)
        client = _try_client(runtime)
        if client is not None:
            return PoolProxy(runtime, client, on_note=on_note), True


def _start(runtime, grace):
    """Start a detached daemon for the pool; returns its notes once it is
    ready, or raises the error it reported."""
    r, w = os.pipe()
    argv = [sys.executable, "-m", "cowblock.daemon", "--pool", runtime.pool_path,
            "--auto", "--ready-fd", str(w)]
    grace = grace if grace is not None else GRACE
    if grace is not None:
        argv += ["--grace", str(grace)]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, pass_fds=(w,), start_new_session=True,
                                close_fds=True)
    finally:
        os.close(w)
    data = b""
    end = time.monotonic() + START_TIMEOUT
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([r], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                break
            chunk = os.read(r, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    if not data:
        if proc.poll() is None and time.monotonic() >= end:
            proc.kill()
            raise errors.DaemonError(f"the pool daemon did not start in {START_TIMEOUT:g} s")
        raise errors.DaemonError(f"the pool daemon exited while starting: {_log_tail(runtime)}")
    try:
        report = json.loads(data.decode())
    except ValueError:
        raise errors.DaemonError(f"the pool daemon said {data[:200]!r} while starting") from None
    if "error" in report:
        P.raise_error(report["error"])
    return report.get("notes", [])


def _log_tail(runtime):
    try:
        with open(runtime.log, errors="replace") as f:
            return f.read()[-800:].strip() or "(its log is empty)"
    except OSError:
        return "(it left no log)"
