"""cowblock: a userspace copy-on-write block device and snapshot engine.

    from cowblock import Pool
    with Pool.create("/tmp/pool", 1 << 30) as pool:
        base = pool.create_thin("base", 256 << 20)
        base.pwrite(b"hello", 0)
        snap = pool.snapshot("base", "snap", read_only=True)
"""
import importlib

# Names are imported on first use (PEP 562): a CLI command that only talks
# to the pool's daemon never loads the engine's Python layer.
_WHERE = {
    **dict.fromkeys(["Device", "DeviceFile", "Extent"], "device"),
    **dict.fromkeys(["BusyError", "CorruptMetadataError", "CowblockError", "DeviceExistsError",
                     "DeviceNotFoundError", "HostFileError", "InvalidArgumentError",
                     "MetadataSpaceError", "NeedsCheckError", "NoSpaceError", "PoolClosedError",
                     "PoolExistsError", "PoolIOError", "PoolLockedError", "PoolNotFoundError",
                     "ProtectedError", "ReadOnlyError"], "errors"),
    **dict.fromkeys(["CheckRecord", "CheckReport", "DeviceInfo", "DiffRange", "PoolStats",
                     "Usage"], "infos"),
    "Pool": "pool",
    **dict.fromkeys(["PoolProxy", "connect"], "control.client"),
}


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'cowblock' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_WHERE))


__version__ = "0.1.0"

__all__ = [
    "Pool", "connect", "PoolProxy", "BusyError", "Device", "DeviceFile", "DeviceInfo", "Extent", "Usage", "PoolStats", "DiffRange",
    "CheckReport", "CheckRecord", "CowblockError", "InvalidArgumentError", "DeviceNotFoundError",
    "DeviceExistsError", "PoolClosedError", "NeedsCheckError", "NoSpaceError",
    "MetadataSpaceError", "ReadOnlyError", "CorruptMetadataError", "PoolIOError",
    "PoolLockedError", "PoolNotFoundError", "PoolExistsError", "HostFileError", "ProtectedError",
]
