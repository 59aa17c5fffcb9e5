"""cowblock: a userspace copy-on-write block device and snapshot engine.

    from cowblock import Pool
    with Pool.create("/tmp/pool", 1 << 30) as pool:
        base = pool.create_thin("base", 256 << 20)
        base.pwrite(b"hello", 0)
        snap = pool.snapshot("base", "snap", read_only=True)
"""
from .device import Device, DeviceFile, Extent
from .errors import (BusyError, CorruptMetadataError, CowblockError, DeviceExistsError,
                     DeviceNotFoundError, HostFileError, InvalidArgumentError, MetadataSpaceError,
                     NeedsCheckError, NoSpaceError, PoolClosedError, PoolExistsError,
                     PoolIOError, PoolLockedError, PoolNotFoundError, ProtectedError,
                     ReadOnlyError)
from .pool import CheckRecord, CheckReport, DeviceInfo, DiffRange, Pool, PoolStats, Usage
from .control.client import PoolProxy, connect

__version__ = "0.1.0"

__all__ = [
    "Pool", "connect", "PoolProxy", "BusyError", "Device", "DeviceFile", "DeviceInfo", "Extent", "Usage", "PoolStats", "DiffRange",
    "CheckReport", "CheckRecord", "CowblockError", "InvalidArgumentError", "DeviceNotFoundError",
    "DeviceExistsError", "PoolClosedError", "NeedsCheckError", "NoSpaceError",
    "MetadataSpaceError", "ReadOnlyError", "CorruptMetadataError", "PoolIOError",
    "PoolLockedError", "PoolNotFoundError", "PoolExistsError", "HostFileError", "ProtectedError",
]
