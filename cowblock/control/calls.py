"""The control call table: every call a client may make of the pool daemon.

This table is the one description of the control API.  The daemon's
dispatch (control.server) and the client's proxy (control.client) are both
derived from it: a call missing here does not exist on either side.

Each Call names:
  target   what runs in the daemon, as "module:qualname"; it takes the pool
           first (Pool methods take it as self; "device" calls take the
           device, found by the name the client sends first; "daemon" calls
           take the daemon and the caller's session)
  busy     the parameter naming the device(s) the call must not touch while
           they are in use (exported over NBD, mounted, their file open):
           such a call fails with EBUSY naming the user
  busy_if  when given, the busy rule applies only if busy_if(device, args)
  doing    what the call does to such a device, for the message ("remove it")
  changes  the parameter naming a device whose size or content the call
           changes under its users: its device file is told afterwards (new
           size, caches dropped)
  freeze   the parameter naming a device whose mounted filesystem is frozen
           (fsfreeze) for the instant of the call, so a snapshot of it is clean
  returns  "device": the call makes a device; the reply is its DeviceInfo and
           the proxy returns a device of the proxy
  limit    a check of the arguments before the call runs
  query    the call changes nothing, so it may be asked again of whoever holds
           the pool next if the daemon dies before answering it
"""
from dataclasses import dataclass
from typing import Callable, Optional

from .. import errors
from .protocol import MAX_READ

POOL, DEVICE, FUNCTION, DAEMON = "pool", "device", "function", "daemon"


@dataclass(frozen=True)
class Call:
    name: str
    kind: str
    target: str
    busy: Optional[str] = None
    busy_if: Optional[Callable] = None
    doing: Optional[str] = None
    changes: Optional[str] = None
    freeze: Optional[str] = None
    returns: Optional[str] = None
    limit: Optional[Callable] = None
    query: bool = False


def _shrinks(device, args):
    return not isinstance(args.get("size"), int) or args["size"] < device.size


def _resize_shrinks(device, args):
    if args.get("by") is not None:
        return not isinstance(args["by"], int) or args["by"] < 0
    return _shrinks(device, args)


def _pread_limit(args):
    length = args.get("length")
    if isinstance(length, int) and length > MAX_READ:
        raise errors.InvalidArgumentError(
            f"device.pread of {length} bytes: at most {MAX_READ} bytes a call through the "
            "control socket")


def _no_repair(args):
    if args.get("repair"):
        raise errors.BusyError("a repair needs the pool to itself, not through its daemon: "
                               "stop what is attached (`cowblock daemon stop`) first")


def _pool(name, busy=None, **kw):
    return Call(name, POOL, f"cowblock.pool:Pool.{name}", busy=busy, **kw)


def _device(name, **kw):
    return Call(f"device.{name}", DEVICE, f"cowblock.device:Device.{name}", **kw)


def _function(name, target, **kw):
    return Call(name, FUNCTION, target, **kw)


def _daemon(name, method=None, **kw):
    return Call(name, DAEMON, f"cowblock.daemon:PoolDaemon.call_{method or name}", **kw)


_TABLE = [
    # the pool
    _pool("create_thin", returns="device"),
    _pool("snapshot", returns="device", freeze="origin"),
    _pool("delete", busy="names", doing="remove it"),
    _pool("rename", busy="old", doing="rename it"),
    _pool("rollback", busy="name", doing="roll it back", changes="name"),
    _pool("set_read_only", busy="name", busy_if=lambda dev, a: a.get("flag", True),
          doing="make it read-only"),
    _pool("set_labels"),
    _pool("update", busy="name", busy_if=lambda dev, a: a.get("read_only") is True,
          doing="make it read-only"),
    _pool("resize_device", busy="name", busy_if=_resize_shrinks, doing="shrink it",
          changes="name"),
    _pool("info", query=True),
    _pool("list", query=True),
    _pool("usage", query=True),
    _pool("stats", query=True),
    _pool("commit"),
    _pool("resize"),
    _pool("resize_metadata"),
    _pool("set_config"),
    _pool("update_config"),
    _pool("trim"),
    _pool("check", limit=lambda a: _no_repair(a)),
    _pool("mappings", query=True),
    _pool("add_mappings"),
    _pool("pending_removals", query=True),
    # the records store (cowblock.records)
    _pool("put_record"),
    _pool("get_record", query=True),
    _pool("delete_record"),
    _pool("record_count", query=True),
    _function("records", "cowblock.control.calls:records", query=True),
    _function("contains", "cowblock.control.calls:contains", query=True),
    _function("get_config", "cowblock.control.calls:get_config", query=True),
    _function("diff", "cowblock.control.calls:diff", query=True),
    # a device's I/O and properties
    _device("pread", limit=_pread_limit, query=True),
    _device("pwrite"),
    _device("discard"),
    _device("write_zeroes"),
    _device("flush"),
    _device("block_status", query=True),
    _device("resize", busy="self", busy_if=_shrinks, doing="shrink it", changes="self"),
    Call("device.size", DEVICE, "cowblock.control.calls:device_size", query=True),
    Call("device.read_only", DEVICE, "cowblock.control.calls:device_read_only",
         query=True),
    # what a CLI command does in one round trip
    _function("health", "cowblock.health:pool_health", query=True),
    _function("pool_report", "cowblock.health:report", query=True),
    _function("list_images", "cowblock.images:list_images", query=True),
    _function("image_info", "cowblock.images:image_info", query=True),
    _function("list_containers", "cowblock.images:list_containers", query=True),
    _function("container_info", "cowblock.images:container_info", query=True),
    _function("create_container", "cowblock.images:create_container"),
    _function("commit_container", "cowblock.images:commit_container", freeze="container"),
    _function("remove_containers", "cowblock.images:remove_containers", busy="names",
              doing="remove it"),
    _function("device_length", "cowblock.transfer:device_length", query=True),
    # OCI images (cowblock.ociimages): loading mounts layers, so it runs in the daemon
    Call("image_load", DAEMON, "cowblock.ociimages:load_call"),
    Call("image_rm", DAEMON, "cowblock.ociimages:remove_call"),
    Call("image_prune", DAEMON, "cowblock.ociimages:prune_call"),
    _function("oci_images", "cowblock.ociimages:list_images", query=True),
    _function("oci_image_info", "cowblock.ociimages:info", query=True),
    _function("all_images", "cowblock.ociimages:all_images", query=True),
    # the daemon itself
    _daemon("status"),
    _daemon("stop"),
    _daemon("serve"),
    _daemon("unserve"),
    _daemon("watch"),
    _daemon("mount"),
    _daemon("umount"),
    _daemon("snapshotter"),
    _daemon("unsnapshotter"),
]

CALLS = {c.name: c for c in _TABLE}
BY_TARGET = {c.target: c for c in _TABLE}


# ---- small targets: what the Pool API has as properties or generators ----
def contains(pool, name):
    return name in pool


def get_config(pool):
    return pool.config


def diff(pool, a, b, *, same=False):
    return list(pool.diff(a, b, same=same))


def records(pool, prefix=b"", start_after=None, limit=None, *, values=True):
    """pool.records() as a list: what one reply can carry, at most MAX_READ
    bytes of keys and values (page with limit and start_after beyond)."""
    out, size = [], 0
    for record in pool.records(prefix, start_after, limit, values=values):
        size += len(record.key) + len(record.value or b"")
        if size > MAX_READ:
            raise errors.InvalidArgumentError(
                f"records of more than {MAX_READ} bytes in one call through the control socket: "
                "page them with limit= and start_after=")
        out.append(record)
    return out


def device_size(device):
    return device.size


def device_read_only(device):
    return device.read_only
