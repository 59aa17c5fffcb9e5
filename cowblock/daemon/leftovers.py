"""Cleaning up after a pool daemon that died.

A daemon records its mounts in its runtime directory (runtime.STATE) as it
makes them.  When it dies (SIGKILL, a crash, the OOM killer) the kernel keeps
what the daemon made: the mount, its loop device over a device file whose
server is gone (reads and writes give EIO), and with the nbdfuse attach path
the nbdfuse process.  clean() undoes all of it and removes the sockets and
pid file; only call it while holding the pool lock, which proves that no
daemon of this pool is alive.
"""
import contextlib
import os
import signal
import subprocess

from .. import errors, runtime as rt
from ..attach import blockdev


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _fuse_mounts_under(directory):
    out = []
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2 and parts[2].startswith("fuse") and \
                    parts[1].startswith(directory.rstrip("/") + "/"):
                out.append(parts[1])
    return out


def clean(runtime, pool=None):
    """Undo what a dead daemon left in runtime (a RuntimeDir); returns notes
    saying what was found and done."""
    if not runtime.exists():
        return []
    state = runtime.load_state()
    dead = state.get("pid")
    try:
        with open(runtime.pidfile) as f:
            dead = dead or int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    who = f"its daemon (pid {dead})" if dead else "its daemon"
    notes = []
    for m in state.get("mounts", []):
        done = []
        try:
            if blockdev.mounted_at(m["dir"]) == m.get("loop"):
                blockdev.umount(m["dir"], lazy=True)
                done.append(f"unmounted {m['dir']}")
        except blockdev.MountError as e:
            done.append(f"could not unmount it: {e}")
        loop = m.get("loop")
        if loop and blockdev.loop_backing_file(loop) == m.get("file"):
            blockdev.loop_detach(loop)
            done.append(f"detached {loop}")
        pid = m.get("helper_pid")
        if pid and "nbdfuse" in _cmdline(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            done.append(f"ended nbdfuse (pid {pid})")
        notes.append(f"device {m['device']} was mounted on {m['dir']} when {who} died; its "
                     f"writes since the last sync may be lost; {', '.join(done) or 'nothing left'}")
    for mnt in _fuse_mounts_under(runtime.path):
        subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
    stale = [p for p in (runtime.control, runtime.pidfile, runtime.state) if os.path.exists(p)]
    runtime.remove()
    if stale and not notes:
        notes.append(f"removed the sockets and state of {who}, which died or was killed")
    return notes


def sweep_orphans(skip=()):
    """Remove the runtime directories of pools that are gone (deleted, or
    replaced by another pool at the same path) and whose daemon is dead,
    with what their daemons left (clean()).  No command of such a pool will
    ever run again to clean them.  Directories in skip, of a live daemon,
    of a pool that is still there, or not made by RuntimeDir.make() (no
    pool file yet) are left alone.  Returns notes."""
    notes = []
    base = rt.root()
    try:
        keys = os.listdir(base)
    except OSError:
        return notes
    for key in keys:
        path = os.path.join(base, key)
        if path in skip:
            continue
        try:
            with open(os.path.join(path, rt.POOL)) as f:
                pool_path = f.read().strip()
            try:
                current = rt.pool_key(pool_path)
            except errors.PoolNotFoundError:
                current = None
            if current == key or not pool_path:
                continue
            runtime = rt.RuntimeDir(pool_path, key=key)
            recorded = runtime.load_state().get("pid")
            if runtime.pid() is not None or (recorded and rt.process_alive(recorded)):
                continue
            clean(runtime)
            runtime.remove(keep_log=False)
            notes.append(f"removed the runtime directory {path} of pool {pool_path}, which is gone")
        except (OSError, errors.CowblockError):
            continue   # another sweep got there first, or it cannot be told: leave it
    return notes
