"""Mounts made by the pool daemon: device file -> loop device -> filesystem.

A mount is one attachment in the daemon's table.  Each step is undone, in
reverse, when a later one fails, so a failed mount leaves no process, FUSE
mount, loop device, socket or directory it made.  The daemon's state file
records each step as it is taken, so a daemon killed half-way leaves enough
for the next one to clean up (daemon.leftovers).

The device file comes from the attach path: today an internal NBD listener
serving just this device and nbdfuse showing it as a file.
"""
import contextlib
import os

from .. import errors
from ..attach import blockdev, nbdfuse

READAHEAD = 4 << 20   # bytes the loop device over a FUSE device file reads ahead


def _capabilities():
    why = blockdev.missing_capabilities() + nbdfuse.missing()
    if why:
        raise blockdev.MountError("this machine cannot mount devices: " + "; ".join(why))


def mount(d, name, directory, *, mkfs=None, read_only=None, shared=False):
    """Mount device `name` of daemon d's pool on directory (made if missing)."""
    _capabilities()
    if mkfs is not None:
        blockdev.check_mkfs(mkfs)
    if not isinstance(directory, str) or not directory:
        raise errors.InvalidArgumentError(f"mount point {directory!r} is not a directory path")
    directory = os.path.realpath(directory)
    info = d.pool.info(name)
    ro = info.read_only or bool(read_only)
    from . import Mount
    with d._lock:
        if d._stopping:
            raise errors.DaemonError("the pool daemon is stopping")
        for other in d.mounts.values():
            if other.dir == directory:
                raise errors.BusyError(f"{directory} is a cowblock mount already "
                                       f"(of {other.device})")
        use = d._conflict(name, not ro, shared, owner=None)
        if use:
            raise errors.BusyError(
                f"device {name!r} is {use.what}: it cannot be mounted "
                f"{'read-only' if ro else 'read-write'} as well"
                + (" (only a read-only device may be mounted many times)" if not ro or
                   not info.read_only else ""))
        m = Mount(next(d._ids), name, directory, ro, shared)
        d.mounts[m.id] = m      # reserved: a second mount of the device conflicts from now
    steps = contextlib.ExitStack()
    try:
        _mount_steps(d, m, steps, mkfs, info)
    except BaseException:
        with contextlib.suppress(Exception):
            steps.close()
        with d._lock:
            d.mounts.pop(m.id, None)
        d._save_state()
        raise
    steps.pop_all()
    d.log(f"mounted {name} on {directory} ({m.loop}, {m.fstype}"
          f"{', read-only' if ro else ''})")
    return m


def _mount_steps(d, m, steps, mkfs, info):
    if blockdev.mounted_at(m.dir) is not None:
        raise errors.BusyError(f"{m.dir} is a mount point already")
    if os.path.lexists(m.dir) and not os.path.isdir(m.dir):
        raise errors.InvalidArgumentError(f"{m.dir} exists and is not a directory")
    if not os.path.exists(m.dir):
        try:
            os.makedirs(m.dir)
        except OSError as e:
            raise errors.HostFileError(f"cannot make the mount point {m.dir}: {e.strerror}",
                                       e.errno) from None
        steps.callback(_quiet, os.rmdir, m.dir)
    _attach_file(d, m, steps)
    d._save_state()
    # direct I/O on the loop device: the filesystem above caches, the FUSE file
    # need not (benchmarks/results/attach.md: about twice the write speed)
    m.loop = blockdev.loop_attach(m.file, m.read_only, direct_io=m.helper is None)
    steps.callback(blockdev.loop_detach, m.loop)
    if m.helper is None:   # cold reads: 29 -> 22 ms for 8 MiB (benchmarks/results/attach.md)
        blockdev.set_readahead(m.loop, READAHEAD)
    d._save_state()
    fstype = blockdev.fs_type(m.loop)
    if fstype is None:
        if m.read_only:
            raise blockdev.MountError(f"{m.device} is read-only and has no filesystem")
        if not mkfs:
            raise blockdev.MountError(f"{m.device} has no filesystem; pass --mkfs ext4 to "
                                      "make one")
        blockdev.mkfs(m.loop, mkfs)
        fstype = mkfs
    m.fstype = fstype
    blockdev.mount(m.loop, m.dir, fstype, m.read_only)
    d._save_state()


def _attach_file(d, m, steps):
    """The device file: one of the daemon's in-process FUSE server, or where
    that is unavailable an internal listener for just this device and nbdfuse."""
    if d.file_server() is not None:
        m.file = d.attach_file(m.device, m.read_only)
        steps.callback(d.detach_file, m.device)
        return
    os.makedirs(d.runtime.files, mode=0o700, exist_ok=True)
    sock = os.path.join(d.runtime.files, f"m{m.id}.sock")
    m.listener = d.add_listener([m.device], socket_path=sock, read_only=m.read_only, mount=m.id)
    steps.callback(d._remove_listener, m.listener)
    m.helper = nbdfuse.NbdfuseFile(f"nbd+unix:///{m.device}?socket={sock}",
                                   os.path.join(d.runtime.files, f"m{m.id}"),
                                   read_only=m.read_only)
    steps.callback(m.helper.close)
    m.file = m.helper.path


def undo(d, m, lazy=False):
    """Unmount m and detach everything under it.  A busy filesystem is
    refused unless lazy (then the kernel detaches it once it is free)."""
    try:
        blockdev.umount(m.dir, lazy=lazy)
    except blockdev.MountError as e:
        if blockdev.mounted_at(m.dir) != m.loop:
            pass   # already gone (unmounted by hand): detach the rest
        elif "busy" in str(e):
            raise errors.BusyError(
                f"{m.dir} is busy (a process has files open there or works in it): end it, "
                "or use `cowblock umount --force` to detach it lazily") from None
        else:
            raise
    blockdev.loop_detach(m.loop)
    if m.helper is not None:
        m.helper.close()
    if m.listener is not None:
        d._remove_listener(m.listener)
    if m.helper is None and m.listener is None and m.file:
        _detach_file_when_released(d, m)
    with d._lock:
        d.mounts.pop(m.id, None)
    d._save_state()
    d.log(f"unmounted {m.device} from {m.dir}")


def _quiet(fn, *args):
    with contextlib.suppress(OSError):
        fn(*args)


def _detach_file_when_released(d, m):
    """The loop device lets go of its file a moment after losetup -d (later
    still after a lazy unmount): retry the file's removal until then."""
    import time
    end = time.monotonic() + 10
    while True:
        try:
            d.detach_file(m.device)
            return
        except errors.BusyError:
            if time.monotonic() > end:
                d.log(f"the device file of {m.device} is still open after its unmount; "
                      "it goes with the daemon")
                return
            time.sleep(0.05)
