"""Cold caches for `cowblock bench`: sync, page out what a system's server
keeps mapped, drop the page cache.

drop_caches leaves alone every page a process has mapped.  The pool daemon's
engine copies reads out of a shared mapping of its data file, so without
this, a file read once stays in memory for cowblock while it is cold for
every other system: the cold reads after the first were warm on the host
(6 ms against 20 ms truly cold for an 8 MiB file written through a mount).
process_madvise(MADV_PAGEOUT) (Linux 5.10, CAP_SYS_NICE) makes the daemon's
mappings give their pages back, as memory pressure would, without stopping it."""
import ctypes
import os

_SYS_PROCESS_MADVISE = 440   # the same number on every architecture (asm-generic)
_MADV_PAGEOUT = 21


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def mapped_ranges(pid, paths):
    """(start, length) of every mapping of the files in paths by process pid."""
    wanted = {os.path.realpath(p) for p in paths}
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() in wanted:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                out.append((start, end - start))
    return out


def page_out(pid, paths):
    """Make process pid give back the pages of its mappings of paths.  Returns
    None, or why it could not (the reads it serves are then warm on the host)."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        ranges = mapped_ranges(pid, paths)
        pidfd = os.pidfd_open(pid)
    except OSError as e:
        return f"cannot reach process {pid}: {e.strerror}"
    try:
        for start, length in ranges:
            v = _IoVec(start, length)
            if libc.syscall(_SYS_PROCESS_MADVISE, pidfd, ctypes.byref(v), 1, _MADV_PAGEOUT, 0) < 0:
                return f"process_madvise(MADV_PAGEOUT) failed: {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(pidfd)
    return None


def drop_caches(system=None):
    """Sync, page out what the system's server maps (System.page_out), and
    drop the page cache (as root; a no-op otherwise)."""
    os.sync()
    if system is not None:
        system.page_out()
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        except OSError:
            pass
