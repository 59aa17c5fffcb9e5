"""The control protocol's wire format: framing, values, limits, version.

Each message is a 4-byte big-endian length and a JSON object.

  request  {"v": VERSION, "call": NAME, "args": [...], "kwargs": {...}}
           optionally "health": true (attach the pool's health to the reply)
  reply    {"ok": VALUE} or {"error": {"class": NAME, "message": TEXT, "errno": N}},
           with "health": HEALTH when it was asked for
  event    {"event": VALUE}: what a `watch` call streams until the connection closes
  stopping {"stopping": TEXT}: the daemon is stopping and closes the connection without
           running another request; a request sent before or after it did not run

A connection that ends without a reply and without the stopping notice
ends with a daemon that died: the call in flight may or may not have run.

Values are JSON, with tagged objects for what JSON lacks: {"$bytes": base64},
{"$datetime": iso}, {"$dict": [[k, v], ...]} (keys that are not strings) and
{"$type": NAME, "fields": {...}} for the dataclasses in TYPES.  Anything
malformed is an InvalidArgumentError, never another exception.

A client of another VERSION gets a VersionError naming both versions (and
how to restart the daemon) instead of failing oddly after an upgrade.
"""
import base64
import dataclasses
import datetime
import importlib
import json
import struct

from .. import errors

VERSION = 2              # 1 was session 2's <pool>/control.sock protocol
MAX_MESSAGE = 64 << 20
MAX_ITEMS = 1 << 20      # JSON values in one request (each costs tens of bytes to parse)
MAX_DEPTH = 32           # nesting of one message's values
MAX_READ = 32 << 20      # bytes of one device.pread (its reply is base64, 4/3 larger)

# The dataclasses that travel in messages, and the module of each (imported
# when one is first decoded: a client needs images' only if it asks for one).
TYPES = {"DeviceInfo": "cowblock.infos", "PoolStats": "cowblock.infos", "Usage": "cowblock.infos",
         "DiffRange": "cowblock.infos", "CheckReport": "cowblock.infos",
         "Extent": "cowblock.device", "Health": "cowblock.health",
         "Image": "cowblock.images", "Container": "cowblock.images"}


class _Streamed:
    """What a streaming call returns: its events were sent, no reply follows."""

    def __repr__(self):
        return "STREAMED"


STREAMED = _Streamed()


def encode(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(v)).decode()}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        if type(v).__name__ not in TYPES:
            raise TypeError(f"{type(v).__name__} cannot travel in a control message")
        return {"$type": type(v).__name__,
                "fields": {f.name: encode(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, datetime.datetime):
        return {"$datetime": v.isoformat()}
    if isinstance(v, dict):
        if all(isinstance(k, str) for k in v):
            return {k: encode(x) for k, x in v.items()} if not any(
                k.startswith("$") for k in v) else {"$dict": [[k, encode(x)] for k, x in v.items()]}
        return {"$dict": [[encode(k), encode(x)] for k, x in v.items()]}
    if isinstance(v, (list, tuple)):
        return [encode(x) for x in v]
    return v


def decode(v, depth=0):
    """The inverse of encode; anything malformed is an InvalidArgumentError."""
    if depth > MAX_DEPTH:
        raise errors.InvalidArgumentError(f"control message nested deeper than {MAX_DEPTH}")
    if isinstance(v, list):
        return [decode(x, depth + 1) for x in v]
    if isinstance(v, dict):
        tag = next((k for k in v if k.startswith("$")), None)
        if tag is None:
            return {k: decode(x, depth + 1) for k, x in v.items()}
        try:
            if tag == "$bytes":
                return base64.b64decode(v["$bytes"], validate=True)
            if tag == "$datetime":
                return datetime.datetime.fromisoformat(v["$datetime"])
            if tag == "$dict":
                return {decode(k, depth + 1): decode(x, depth + 1) for k, x in v["$dict"]}
            if tag == "$type":
                cls = getattr(importlib.import_module(TYPES[v["$type"]]), v["$type"])
                fields = v["fields"]
                return cls(**{k: decode(x, depth + 1) for k, x in fields.items()})
        except errors.CowblockError:
            raise
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise errors.InvalidArgumentError(
                f"malformed {tag} value in a control message: {type(e).__name__}: {e}") from None
        raise errors.InvalidArgumentError(f"unknown tag {tag!r:.40} in a control message")
    return v


def send(sock, obj):
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


def recv_frame(sock):
    """One message's bytes; a length over MAX_MESSAGE is refused unread (and
    the stream is lost: the caller closes the connection)."""
    (n,) = struct.unpack(">I", _recv_exact(sock, 4))
    if n > MAX_MESSAGE:
        raise errors.InvalidArgumentError(f"control message of {n} bytes is over the limit "
                                          f"of {MAX_MESSAGE}")
    return _recv_exact(sock, n)


def parse(buf, max_items=None):
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


def recv(sock):
    return parse(recv_frame(sock))


STOPPING = {"stopping": "the pool daemon is stopping"}


def error_reply(e):
    return {"error": {"class": type(e).__name__, "message": str(e),
                      "errno": getattr(e, "errno", None)}}


# Where error classes a reply names are found (each a CowblockError).
ERROR_MODULES = ("cowblock.errors", "cowblock.oci.errors")


def _error_class(name):
    for module in ERROR_MODULES:
        cls = getattr(importlib.import_module(module), name, None) if name else None
        if isinstance(cls, type) and issubclass(cls, errors.CowblockError):
            return cls
    return None


def raise_error(err):
    """Raise the exception an error reply describes: cowblock's own classes
    as themselves, anything else as a CowblockError naming the class."""
    cls = _error_class(err.get("class", ""))
    message = err.get("message", "")
    if isinstance(cls, type) and issubclass(cls, errors.CowblockError):
        if issubclass(cls, OSError):
            raise cls(message, err.get("errno"))
        raise cls(message)
    if err.get("class") in ("TypeError", "ValueError", "MemoryError"):
        raise {"TypeError": TypeError, "ValueError": ValueError,
               "MemoryError": MemoryError}[err["class"]](message)
    raise errors.CowblockError(f"{err.get('class')}: {message}")
