"""The pool lock: one writer, or any number of readers, at a time.

flock() on ``<pool>/lock``: the kernel drops it when the holder dies, so a
killed process never leaves the pool locked (no pidfile to go stale).  The
writer also writes who it is into the file, and /proc/locks tells which
processes hold it, so a refused opener can be told who is in the way.
"""
import fcntl
import os
import time

from .errors import PoolLockedError


def _holders(fd):
    """(pid, "WRITE" or "READ") of the processes holding a flock on fd's file,
    from /proc/locks."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if "->" in parts:
                    continue  # a waiter, not a holder
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want:
                    pids.append((int(parts[4]), parts[3]))
    except OSError:
        pass
    return pids


def _describe(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = " ".join(f.read().replace(b"\0", b" ").decode(errors="replace").split())
        if len(cmd) > 100:
            cmd = cmd[:97] + "..."
    except OSError:
        cmd = ""
    return f"process {pid} ({cmd})" if cmd else f"process {pid}"


class PoolLock:
    def __init__(self, pool_dir, exclusive, timeout=0.0):
        path = os.path.join(pool_dir, "lock")
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:  # a read-only pool directory: read-only opens still lock
            self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + (timeout or 0.0)
        while True:
            try:
                fcntl.flock(self._fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if timeout is not None and time.monotonic() >= deadline:
                    who = self._who()
                    os.close(self._fd)
                    self._fd = None
                    waited = f" after waiting {timeout:g} s" if timeout else ""
                    raise PoolLockedError(f"pool {pool_dir} is in use: {who}{waited}") from None
                time.sleep(0.05)
        if exclusive:
            info = f"pid={os.getpid()}\n".encode()
            try:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, info, 0)
            except OSError:
                pass

    def _who(self):
        holders = _holders(self._fd)
        writers = [p for p, kind in holders if kind == "WRITE"]
        readers = [p for p, kind in holders if kind != "WRITE"]
        parts = []
        if writers:
            parts.append("open for writing by " + ", ".join(
                "this process (another Pool object)" if p == os.getpid() else _describe(p)
                for p in writers))
        if readers:
            parts.append("open read-only by " + ", ".join(
                "this process (another Pool object)" if p == os.getpid() else _describe(p)
                for p in readers))
        return "; ".join(parts) or "another process holds its lock"

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
