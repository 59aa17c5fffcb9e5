"""The pool daemon's control socket, and the proxy that talks to it.

While `cowblock serve` holds a pool (it is the pool's one writer), other
tools reach the pool through `<pool>/control.sock`: cowblock.connect(path)
returns the Pool itself when nobody holds it, or a PoolProxy with the same
API that runs each call inside the daemon.  So a snapshot of a device that
NBD clients are writing is taken without stopping anything.

Wire format: each message is a 4-byte big-endian length and a JSON object.
Requests: {"call": name, "args": [...], "kwargs": {...}}; device calls are
"device.<method>" with the device name first.  Replies: {"ok": value} or
{"error": {"class": name, "message": text, "errno": n}}; bytes travel as
{"$bytes": base64}.  Only the pool owner's uid (or root) may connect
(SO_PEERCRED), and the socket is 0600.

Only the calls named in POOL_CALLS and DEVICE_CALLS run.  A malformed
request (not JSON, not a request object, a bad $-value, nesting deeper than
MAX_DEPTH, more than MAX_ITEMS JSON values) gets an InvalidArgumentError
reply and the connection goes on; a length over MAX_MESSAGE gets one and the
connection is dropped.  device.pread reads at most MAX_READ bytes a call.
"""
import base64
import dataclasses
import datetime
import errno as _errno
import inspect
import json
import os
import socket
import struct
import threading

from . import errors
from .device import Extent
from .errors import BusyError
from .pool import CheckReport, DeviceInfo, DiffRange, Pool, PoolStats, Usage

CONTROL_SOCKET = "control.sock"
MAX_MESSAGE = 64 << 20
MAX_ITEMS = 1 << 20      # JSON values in one request (each costs tens of bytes to parse)
MAX_DEPTH = 32           # nesting of one message's values
MAX_READ = 32 << 20      # bytes of one device.pread (its reply is base64, 4/3 larger)

# What the proxy may call: pool methods, and device methods by name.
POOL_CALLS = {"create_thin", "snapshot", "delete", "rename", "set_read_only", "set_labels",
              "rollback", "list", "info", "usage", "diff", "stats", "commit", "resize",
              "resize_metadata", "check", "get_config", "set_config", "trim", "mappings",
              "add_mappings", "contains"}
DEVICE_CALLS = {"pread", "pwrite", "discard", "write_zeroes", "flush", "block_status", "resize",
                "size", "read_only"}
# Changing these under an NBD client would pull the device from under it.
BUSY_CALLS = {"delete", "rename", "rollback"}


# ---- encoding ----

_TYPES = {"DeviceInfo": DeviceInfo, "PoolStats": PoolStats, "Usage": Usage,
          "DiffRange": DiffRange, "CheckReport": CheckReport, "Extent": Extent}


def _encode(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(v)).decode()}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"$type": type(v).__name__,
                "fields": {f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, datetime.datetime):
        return {"$datetime": v.isoformat()}
    if isinstance(v, dict):
        return {"$dict": [[_encode(k), _encode(x)] for k, x in v.items()]}
    if isinstance(v, (list, tuple)):
        return [_encode(x) for x in v]
    return v


def _decode(v, depth=0):
    """The inverse of _encode; anything malformed is an InvalidArgumentError."""
    if depth > MAX_DEPTH:
        raise errors.InvalidArgumentError(f"control message nested deeper than {MAX_DEPTH}")
    if isinstance(v, list):
        return [_decode(x, depth + 1) for x in v]
    if isinstance(v, dict):
        try:
            if "$bytes" in v:
                return base64.b64decode(v["$bytes"], validate=True)
            if "$datetime" in v:
                return datetime.datetime.fromisoformat(v["$datetime"])
            if "$dict" in v:
                return {_decode(k, depth + 1): _decode(x, depth + 1) for k, x in v["$dict"]}
            if "$type" in v:
                cls, fields = _TYPES[v["$type"]], v["fields"]
                return cls(**{k: _decode(x, depth + 1) for k, x in fields.items()})
        except errors.CowblockError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise errors.InvalidArgumentError(
                f"malformed {next(k for k in v if k.startswith('$'))} value in a control "
                f"message: {type(e).__name__}: {e}") from None
    return v


def _send(sock, obj):
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return buf


def _recv_frame(sock):
    """One message's bytes; a length over MAX_MESSAGE is refused unread (and
    the stream is lost: the caller closes the connection)."""
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > MAX_MESSAGE:
        raise errors.InvalidArgumentError(f"control message of {n} bytes is over the limit "
                                          f"of {MAX_MESSAGE}")
    return _recv_exact(sock, n)


def _parse(buf, max_items=None):
    """The JSON of one message.  The daemon passes max_items: parsing
    allocates tens of bytes per JSON value, so a request's number of values
    is bounded as well as its bytes."""
    items = buf.count(b",") + buf.count(b"[") + buf.count(b"{") if max_items else 0
    if items > (max_items or 0):
        raise errors.InvalidArgumentError(
            f"control message of {items} JSON values is over the limit of {MAX_ITEMS}")
    try:
        return json.loads(buf)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError
        raise errors.InvalidArgumentError(f"control message is not JSON: {e}") from None


def _recv(sock):
    return _parse(_recv_frame(sock))


# ---- the daemon side ----

class ControlServer:
    """Runs proxy calls against the pool inside the daemon."""

    def __init__(self, pool, busy_devices, log=None):
        self.pool = pool
        self.busy_devices = busy_devices      # callable -> set of names in use
        self.log = log or (lambda m: None)
        self.path = os.path.join(pool.path, CONTROL_SOCKET)
        self._stop = threading.Event()
        self._sock = None

    def start(self):
        tmp = f"{self.path}.{os.getpid()}.tmp"
        if os.path.exists(tmp):
            os.unlink(tmp)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(tmp)
        finally:
            os.umask(old)
        s.listen(16)
        os.replace(tmp, self.path)
        self._sock = s
        threading.Thread(target=self._accept, daemon=True, name="cowblock-control").start()

    def stop(self):
        self._stop.set()
        if self._sock:
            self._sock.close()
        if os.path.exists(self.path):
            os.unlink(self.path)

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _allowed(self, conn):
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        return uid == 0 or uid == os.getuid()

    def _serve(self, conn):
        with conn:
            if not self._allowed(conn):
                _send(conn, {"error": {"class": "PermissionError", "errno": _errno.EPERM,
                                       "message": "only the pool's owner may use its control socket"}})
                return
            while True:
                try:
                    frame = _recv_frame(conn)
                except (EOFError, OSError):
                    return
                except errors.CowblockError as e:  # too long: the stream is lost
                    try:
                        _send(conn, _error_reply(e))
                    except OSError:
                        pass
                    return
                try:
                    try:
                        _send(conn, self.handle(frame))
                    except (TypeError, ValueError) as e:  # a result JSON cannot carry
                        _send(conn, _error_reply(e))
                except OSError:
                    return

    def handle(self, frame):
        """The reply (a JSON-ready dict) to one request message's bytes."""
        try:
            req = _parse(frame, MAX_ITEMS)
            if not isinstance(req, dict):
                raise errors.InvalidArgumentError("a control request is a JSON object")
            name, args, kwargs = req.get("call"), req.get("args", []), req.get("kwargs", {})
            if not isinstance(name, str):
                raise errors.InvalidArgumentError(f"control call name {name!r:.100} is not a string")
            if not isinstance(args, list):
                raise errors.InvalidArgumentError(f"control call {name!r:.100}: args is not a list")
            args, kwargs = _decode(args), _decode(kwargs)
            if not isinstance(kwargs, dict):
                raise errors.InvalidArgumentError(f"control call {name!r:.100}: kwargs is not an object")
            return {"ok": _encode(self.call(name, args, kwargs))}
        except Exception as e:  # every error goes back to the caller, typed
            return _error_reply(e)

    def call(self, name, args, kwargs):
        pool = self.pool
        if not isinstance(name, str):
            raise errors.InvalidArgumentError(f"control call name {name!r:.100} is not a string")
        args, kwargs = list(args), dict(kwargs)
        if not all(isinstance(k, str) for k in kwargs):
            raise errors.InvalidArgumentError(f"control call {name!r:.100}: keyword names must be strings")
        if name in POOL_CALLS:
            if name in BUSY_CALLS:
                target = _bind(getattr(Pool, name), name, args, kwargs)
                if isinstance(target, str) and target in self.busy_devices():
                    raise BusyError(f"device {target!r} is exported over NBD: {name} refused")
            if name == "get_config":
                _no_args(name, args, kwargs, 0)
                return pool.config
            if name == "contains":
                _no_args(name, args, kwargs, 1)
                return args[0] in pool
            if name == "diff":
                return list(pool.diff(*args, **kwargs))
            if name == "check" and (kwargs.get("repair") or args):
                raise BusyError("the pool is being served: stop `cowblock serve` before repairing")
            if name in ("create_thin", "snapshot"):
                getattr(pool, name)(*args, **kwargs)
                return None
            return getattr(pool, name)(*args, **kwargs)
        if name.startswith("device.") and name[7:] in DEVICE_CALLS:
            method = name[7:]
            if not args:
                raise TypeError(f"{name} needs the device name as its first argument")
            target, rest = args[0], args[1:]
            dev = pool.device(target)
            if method in ("size", "read_only"):
                _no_args(name, rest, kwargs, 0)
                return getattr(dev, method)
            if method == "resize" and isinstance(target, str) and target in self.busy_devices():
                new = rest[0] if rest else kwargs.get("size")
                if not isinstance(new, int) or new < dev.size:   # growing is fine
                    raise BusyError(f"device {target!r} is exported over NBD: {name} refused")
            if method == "pread":
                length = rest[0] if rest else kwargs.get("length")
                if isinstance(length, int) and length > MAX_READ:
                    raise errors.InvalidArgumentError(
                        f"device.pread of {length} bytes: at most {MAX_READ} bytes a call "
                        "through the control socket")
            return getattr(dev, method)(*rest, **kwargs)
        raise errors.InvalidArgumentError(f"unknown control call {name!r:.100}")


def _error_reply(e):
    return {"error": {"class": type(e).__name__, "message": str(e),
                      "errno": getattr(e, "errno", None)}}


def _no_args(name, args, kwargs, n):
    if len(args) != n or kwargs:
        raise TypeError(f"{name} takes {n} argument{'s' if n != 1 else ''}")


def _bind(method, name, args, kwargs):
    """The device name a pool call is about (its first parameter, however
    it was passed), so that keyword arguments cannot dodge the busy check."""
    try:
        bound = inspect.signature(method).bind(None, *args, **kwargs)
    except TypeError as e:
        raise TypeError(f"{name}: {e}") from None
    params = list(inspect.signature(method).parameters)
    return bound.arguments.get(params[1]) if len(params) > 1 else None


# ---- the client side ----

class PoolProxy:
    """The Pool API, run inside the daemon that holds the pool."""

    def __init__(self, path, sock):
        self.path = os.fspath(path)
        self._sock = sock
        self._lock = threading.Lock()
        self.read_only = False
        self.block_size = self.stats().block_size

    def _call(self, name, *args, **kwargs):
        with self._lock:
            if self._sock is None:
                raise errors.PoolClosedError(f"pool {self.path} is closed")
            _send(self._sock, {"call": name, "args": _encode(list(args)), "kwargs": _encode(kwargs)})
            reply = _recv(self._sock)
        if "ok" in reply:
            return _decode(reply["ok"])
        err = reply["error"]
        cls = getattr(errors, err["class"], None)
        if isinstance(cls, type) and issubclass(cls, errors.CowblockError):
            if issubclass(cls, OSError):
                raise cls(err["message"], err["errno"])
            raise cls(err["message"])
        raise errors.CowblockError(f"{err['class']}: {err['message']}")

    def close(self):
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __contains__(self, name):
        return self._call("contains", name)

    def device(self, name):
        if name not in self:
            raise errors.DeviceNotFoundError(f"no device named {name!r} in pool {self.path}")
        return DeviceProxy(self, name)

    def create_thin(self, name, size, *, labels=None):
        self._call("create_thin", name, size, labels=labels)
        return DeviceProxy(self, name)

    def snapshot(self, origin, name, read_only=False, *, labels=None):
        self._call("snapshot", origin, name, read_only, labels=labels)
        return DeviceProxy(self, name)

    def diff(self, a, b, *, same=False):
        yield from self._call("diff", a, b, same=same)

    @property
    def config(self):
        return self._call("get_config")

    def __getattr__(self, name):
        if name in POOL_CALLS:
            return lambda *a, **k: self._call(name, *a, **k)
        raise AttributeError(name)

    def __repr__(self):
        return f"<cowblock.PoolProxy {self.path!r} via {CONTROL_SOCKET}>"


class DeviceProxy:
    def __init__(self, pool, name):
        self._pool, self.name = pool, name

    @property
    def size(self):
        return self._pool._call("device.size", self.name)

    @property
    def read_only(self):
        return self._pool._call("device.read_only", self.name)

    def pread(self, length, offset):
        return self._pool._call("device.pread", self.name, length, offset)

    def readinto(self, buffer, offset):
        mv = memoryview(buffer).cast("B")
        data = self.pread(len(mv), offset)
        mv[:len(data)] = data
        return len(data)

    def pwrite(self, data, offset):
        return self._pool._call("device.pwrite", self.name, bytes(data), offset)

    @property
    def pool(self):
        return self._pool

    @property
    def id(self):
        return self.info().id

    def info(self):
        return self._pool.info(self.name)

    def __getattr__(self, name):
        if name in DEVICE_CALLS:
            return lambda *a, **k: self._pool._call(f"device.{name}", self.name, *a, **k)
        raise AttributeError(name)


def connect(path, *, read_only=False, timeout=0.0, commit_interval=1.0):
    """The pool at path: a PoolProxy to its daemon when one holds it, else the
    Pool itself (opened with the arguments given)."""
    ctl = os.path.join(os.fspath(path), CONTROL_SOCKET)
    if os.path.exists(ctl):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(ctl)
            return PoolProxy(path, s)
        except OSError:
            s.close()  # a stale socket: its daemon is gone; open the pool itself
    return Pool.open(path, read_only=read_only, timeout=timeout, commit_interval=commit_interval)
