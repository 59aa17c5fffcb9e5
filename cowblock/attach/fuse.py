"""Device files over an in-process FUSE server (csrc/attach/fuse.c).

    attach = FuseAttach(pool, "/var/lib/cowblock/pool/dev").start()
    path = attach.add("c1")                # /var/lib/cowblock/pool/dev/c1
    # losetup --direct-io=on -f --show path; mkfs; mount ...
    attach.remove("c1"); attach.stop()

Requests are served by threads created in C straight from the engine: no
socket, no second process, and no Python (the GIL is never needed).  Each
device is a regular file of its device's size, owned by the pool's owner;
its read, write, fsync (a pool commit) and fallocate (PUNCH_HOLE and
ZERO_RANGE zero the range and unmap whole blocks) reach the engine directly.

The open rule is kept by the server: at most one read-write open of a file
at a time unless it was added shared; read-only opens unlimited; opens for
writing of a read-only device get EROFS, and while deny_read_write(name) is
set (the device is exported read-write elsewhere) they get EBUSY.  The
other direction is the caller's: opens(name) says who has the file open.
"""
import dataclasses
import errno
import os
import shutil
import subprocess

from .. import errors
from .._native import ffi, last_error, lib, space_wait_callback


class AttachError(errors.MountError):
    """FUSE attach is unavailable here, or starting or stopping it failed (a
    MountError: the CLI's exit code 13, cannot mount)."""


_FLAGS = {"read_only": lib.CB_FUSE_READ_ONLY, "shared": lib.CB_FUSE_SHARED,
          "deny_read_write": lib.CB_FUSE_DENY_RW}


def _default_threads():
    return min(16, max(4, 2 * (os.cpu_count() or 2)))


@dataclasses.dataclass(frozen=True)
class FuseOptions:
    """How the mount and its files are served.  The defaults were chosen by
    benchmarks/attach_compare.py (figures in benchmarks/results/attach.md):
    direct I/O with parallel direct writes, under a loop device with
    --direct-io=on, and few threads (2 per CPU, 4 to 16: on 2 CPUs, 4
    threads wrote 1 MiB blocks 1.4x faster than 16).

    direct_io: the files have no page cache of their own (FOPEN_DIRECT_IO);
    the filesystem above caches.  Without it reads of a loop device with
    --direct-io=off are cached twice.
    parallel_direct_writes: direct writes to one file run in parallel
    (FOPEN_PARALLEL_DIRECT_WRITES, kernel 6.2+); without it the kernel runs
    them one at a time and QD16 becomes QD1.
    keep_cache / writeback_cache: page-cache modes, for direct_io=False.
    allow_other: None decides: only when the pool's owner is not the user
    serving it (a root daemon for another user's pool), so the owner may
    open the files; the kernel checks the files' 0600 mode either way
    (default_permissions).
    on_full_wait: seconds a write into a full pool is retried before it
    gets ENOSPC (--on-full wait=S), after it waited for the pool's
    space_wait (the low-water hook, cowblock.lowwater) and was tried once more.
    timeout: seconds the kernel caches names and sizes; changed() drops
    them at once."""
    threads: int = dataclasses.field(default_factory=lambda: _default_threads())
    max_write: int = 1 << 20
    max_readahead: int = 0
    max_background: int = 64
    direct_io: bool = True
    parallel_direct_writes: bool = True
    keep_cache: bool = False
    writeback_cache: bool = False
    allow_other: bool = None
    on_full_wait: float = 0.0
    timeout: float = 3600.0


@dataclasses.dataclass(frozen=True)
class FuseStats:
    requests: int
    bytes_read: int
    bytes_written: int
    errors: int
    threads: int
    threads_not_io_flusher: int
    io_flusher_error: str   # why PR_SET_IO_FLUSHER failed, "" when it did not
    files: int
    writeback_cache: bool
    max_write: int


def available():
    """(True, "") when this process can serve device files over FUSE, else
    (False, why)."""
    if not lib.cb_fuse_available():
        return False, ("cowblock was built without libfuse3: install libfuse3-dev and pkg-config "
                       "(Debian), then reinstall cowblock")
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse is missing (no FUSE in this kernel or container)"
    if os.geteuid() != 0 and not shutil.which("fusermount3"):
        return False, "mounting FUSE as a user needs fusermount3 (Debian package fuse3)"
    return True, ""


def clean_stale(mountpoint):
    """Unmount a FUSE mount left by a process that died (its connection is
    gone: ENOTCONN).  Returns True if there was one; a live mount or a plain
    directory is left alone."""
    try:
        os.statvfs(mountpoint)  # always asks the server; a stat may come from the cache
        return False
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            raise
    argv = ["umount", "-l", mountpoint] if os.geteuid() == 0 else \
        ["fusermount3", "-u", "-z", mountpoint]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        raise AttachError(f"cannot clean the stale FUSE mount on {mountpoint}: "
                          f"{' '.join(argv)}: {r.stderr.strip()}")
    return True


def _fuse_minor(mountpoint):
    """The connection number of the FUSE mount on mountpoint (its st_dev
    minor, from /proc/self/mountinfo: a stat could hang), or None."""
    target = os.path.abspath(os.fspath(mountpoint))
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == target and fields[sep + 1].startswith("fuse"):
                return int(fields[2].split(":")[1])
    return None


def abort_connection(mountpoint):
    """Abort the FUSE connection of the mount on mountpoint, as
    /sys/fs/fuse/connections/N/abort does: every request waiting on its
    server fails at once (a loop device over it gets EIO).  For a server
    that hangs; returns False when nothing is mounted there."""
    n = _fuse_minor(mountpoint)
    if n is None:
        return False
    ctl = "/sys/fs/fuse/connections"
    if not os.path.exists(os.path.join(ctl, str(n))) and not os.listdir(ctl):
        subprocess.run(["mount", "-t", "fusectl", "fusectl", ctl], capture_output=True)
    try:
        with open(os.path.join(ctl, str(n), "abort"), "w") as f:
            f.write("1")
    except OSError as e:
        raise AttachError(f"cannot abort the FUSE connection of {mountpoint}: {e}") from None
    return True


def _check(code):
    """The exception for a failed cb_fuse_* call: AttachError when a mount or
    unmount step failed or FUSE is not built in, else by the kind of error."""
    if code >= 0:
        return code
    message = last_error()
    if message.startswith("cannot") or not lib.cb_fuse_available():
        raise AttachError(message)
    raise errors.from_code(code, message, lib.cb_error_kind(code))


class FuseAttach:
    """One FUSE mount of device files for a Pool (opened for writing, or
    read-only: then every file is read-only).  stop() it before closing the
    pool."""

    def __init__(self, pool, mountpoint, options=None):
        self.pool = pool
        self.mountpoint = os.path.abspath(os.fspath(mountpoint))
        self.options = options or FuseOptions()
        self._h = None
        self._names = {}   # file name -> device name

    # ---- lifecycle ----
    def start(self):
        """Mount (the directory is made if missing) and start serving.
        Returns self."""
        if self._h is not None:
            raise AttachError(f"FUSE attach on {self.mountpoint} is running already")
        ok, why = available()
        if not ok:
            raise AttachError(f"FUSE attach is unavailable: {why}")
        clean_stale(self.mountpoint)
        os.makedirs(self.mountpoint, exist_ok=True)
        st = os.stat(self.pool.path)
        o = self.options
        allow_other = st.st_uid != os.geteuid() if o.allow_other is None else o.allow_other
        cfg = ffi.new("cb_fuse_config *", {
            "uid": st.st_uid, "gid": st.st_gid, "threads": o.threads, "max_write": o.max_write,
            "max_readahead": o.max_readahead, "max_background": o.max_background,
            "direct_io": o.direct_io, "parallel_direct_writes": o.parallel_direct_writes,
            "keep_cache": o.keep_cache, "writeback_cache": o.writeback_cache,
            "allow_other": allow_other, "on_full_wait_ms": int(o.on_full_wait * 1000),
            "timeout": o.timeout})
        # A write into the full pool waits for its low-water hook first (cowblock.lowwater).
        self._space_wait = space_wait_callback(self.pool)
        cfg.space_wait = self._space_wait
        out = ffi.new("cb_fuse **")
        _check(lib.cb_fuse_start(self.pool._handle(), os.fsencode(self.mountpoint), cfg, out))
        self._h = out[0]
        return self

    def stop(self, force=False):
        """Unmount and stop serving.  BusyError while a file is open, unless
        force: then the connection is aborted and whoever holds a file gets
        errors (a loop device over it EIO)."""
        if self._h is None:
            return
        _check(lib.cb_fuse_stop(self._h, 1 if force else 0))
        self._h = None
        self._names.clear()

    def __del__(self):
        # Never leave C threads serving a pool after its last Python
        # reference is gone.  Stop before closing the pool: the server uses it.
        if self._h is not None:
            try:
                self.stop(force=True)
            except Exception:
                pass

    def __enter__(self):
        return self.start() if self._h is None else self

    def __exit__(self, *exc):
        self.stop(force=exc[0] is not None)

    def _handle(self):
        if self._h is None:
            raise AttachError(f"FUSE attach on {self.mountpoint} is not running")
        return self._h

    # ---- files ----
    def path(self, name):
        return os.path.join(self.mountpoint, name)

    def add(self, name, read_only=None, shared=False):
        """Expose device `name` as a file; returns its path.  read_only None:
        as the device (and the pool) is.  shared: allow any number of
        read-write opens (the writers must coordinate, as on a shared disk)."""
        info = self.pool.info(name)
        ro = info.read_only or self.pool.read_only if read_only is None else \
            bool(read_only) or info.read_only or self.pool.read_only
        flags = (_FLAGS["read_only"] if ro else 0) | (_FLAGS["shared"] if shared else 0)
        _check(lib.cb_fuse_add(self._handle(), name.encode(), info.id, flags))
        self._names[name] = flags
        return self.path(name)

    def remove(self, name):
        """Take the file away; BusyError while it is open."""
        _check(lib.cb_fuse_remove(self._handle(), self._cname(name)))
        del self._names[name]

    def files(self):
        return sorted(self._names)

    def opens(self, name):
        """(read-write opens, read-only opens) of the file now."""
        rw, ro = ffi.new("uint32_t *"), ffi.new("uint32_t *")
        _check(lib.cb_fuse_opens(self._handle(), self._cname(name), rw, ro))
        return rw[0], ro[0]

    def deny_read_write(self, name, flag=True):
        """While set, opens of the file for writing get EBUSY (the device is
        exported read-write over NBD).  BusyError if it is open read-write."""
        flags = self._names.get(name, 0) & ~_FLAGS["deny_read_write"]
        flags |= _FLAGS["deny_read_write"] if flag else 0
        _check(lib.cb_fuse_set_flags(self._handle(), self._cname(name), flags))
        self._names[name] = flags

    def changed(self, name):
        """The device changed under its file (written over NBD, rolled back,
        resized): take its size again and drop the kernel's cached data and
        attributes of it."""
        _check(lib.cb_fuse_changed(self._handle(), self._cname(name)))

    def stats(self):
        s = ffi.new("cb_fuse_stats *")
        _check(lib.cb_fuse_stats_get(self._handle(), s))
        flusher = os.strerror(s.io_flusher_errno) if s.io_flusher_errno else ""
        return FuseStats(s.requests, s.bytes_read, s.bytes_written, s.errors, s.threads,
                         s.threads_not_flusher, flusher, s.files, bool(s.writeback_cache),
                         s.max_write)

    def _cname(self, name):
        if name not in self._names:
            raise errors.DeviceNotFoundError(f"{name!r} is not attached on {self.mountpoint}")
        return name.encode()
