"""Mount a thin device as a filesystem, Docker-style.

Without a kernel NBD client (this kernel has none), the chain is:
`cowblock serve` (the pool's daemon, started if no one serves the pool) ->
nbdfuse (the export as a file on a FUSE mount) -> a loop device -> mount.
Read-only devices (image layers) mount read-only.  What is mounted is
recorded under <pool>/run/mounts/, so `umount` and `container commit` can
find it; a commit of a mounted container freezes its filesystem (fsfreeze)
for the instant of the snapshot so the new layer is clean.
"""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time

from . import errors
from .daemon import CONTROL_SOCKET, connect

TOOLS = {"nbdfuse": "libnbd-bin", "losetup": "util-linux", "fusermount3": "fuse3",
         "mount": "mount", "umount": "mount", "blkid": "util-linux", "fsfreeze": "util-linux"}


class MountError(errors.CowblockError):
    """This machine cannot mount a device, or a mount step failed."""


def missing_capabilities():
    """Why this machine cannot mount devices (an empty list when it can)."""
    why = [f"{tool} is not installed (Debian package {pkg})"
           for tool, pkg in TOOLS.items() if not shutil.which(tool)]
    if os.geteuid() != 0:
        why.append("mounting needs root (loop devices and mount)")
    if not os.path.exists("/dev/fuse"):
        why.append("/dev/fuse is missing (no FUSE in this kernel or container)")
    if not os.path.exists("/dev/loop-control"):
        why.append("/dev/loop-control is missing (no loop devices)")
    return why


def _run(*argv, what):
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        raise MountError(f"{what} failed: {' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def _run_dir(pool_path):
    return os.path.join(os.path.abspath(pool_path), "run")


def _records(pool_path):
    d = os.path.join(_run_dir(pool_path), "mounts")
    if not os.path.isdir(d):
        return []
    out = []
    for name in sorted(os.listdir(d)):
        with open(os.path.join(d, name)) as f:
            out.append(json.load(f))
    return out


def mounts(pool_path):
    """What is mounted from this pool: dicts with device, dir, loop, read_only."""
    return _records(pool_path)


def _wait(cond, seconds, what):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise MountError(f"timed out waiting for {what}")


def _ensure_daemon(pool_path):
    """The NBD socket of the pool's daemon; starts `cowblock serve` if needed."""
    ctl = os.path.join(pool_path, CONTROL_SOCKET)
    nbd = os.path.join(pool_path, "nbd.sock")

    def alive():
        if not os.path.exists(ctl):
            return False
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(ctl)
            return True
        except OSError:
            return False
        finally:
            s.close()
    if alive() and os.path.exists(nbd):
        return nbd, False
    run = _run_dir(pool_path)
    os.makedirs(run, exist_ok=True)
    log = open(os.path.join(run, "serve.log"), "ab")
    subprocess.Popen([shutil.which("cowblock") or "cowblock", "--pool", pool_path, "serve",
                      "--socket", nbd, "--pidfile", os.path.join(run, "serve.pid")],
                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    _wait(lambda: alive() and os.path.exists(nbd), 30, "the pool daemon to start")
    return nbd, True


def attach_uri(uri, directory, fuse_dir, *, ro=False, mkfs=None, what="the export"):
    """Mount the filesystem of any NBD export (ours, qemu-nbd's, nbdkit's) on
    directory: nbdfuse on fuse_dir, a loop device, mount.  Returns
    (fuse_dir, loop); detach() undoes it."""
    os.makedirs(fuse_dir, exist_ok=True)
    os.makedirs(directory, exist_ok=True)
    pidfile, log_path = f"{fuse_dir}.pid", f"{fuse_dir}.log"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pidfile)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(["nbdfuse", *(["-r"] if ro else []), "-P", pidfile,
                                 os.path.join(fuse_dir, "dev"), uri], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True)
    image = os.path.join(fuse_dir, "dev")
    try:
        _wait(lambda: (os.path.exists(pidfile) and os.path.exists(image)) or proc.poll() is not None,
              30, "nbdfuse")
        if proc.poll() is not None and not os.path.exists(image):
            raise MountError("nbdfuse exited")
    except MountError as e:
        with open(log_path, errors="replace") as f:
            raise MountError(f"{e}: {f.read().strip()[-500:]}") from None
    loop = None
    try:
        loop = _run("losetup", "-f", "--show", *(["--read-only"] if ro else []), image,
                    what="attaching a loop device")
        has_fs = subprocess.run(["blkid", "-p", loop], capture_output=True).returncode == 0
        if not has_fs:
            if not mkfs:
                raise MountError(f"{what} has no filesystem; pass --mkfs ext4 to make one")
            if ro:
                raise MountError(f"{what} is read-only and has no filesystem")
            _run(f"mkfs.{mkfs}", "-q", *(["-F"] if mkfs.startswith("ext") else []), loop,
                 what=f"mkfs.{mkfs}")
        fstype = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", loop],
                                capture_output=True, text=True).stdout.strip()
        # A read-only ext3/4 snapshot of a mounted filesystem may hold an
        # unreplayed journal: noload mounts it as it is, without replaying.
        opts = ["-o", "ro,noload" if fstype in ("ext3", "ext4") else "ro"] if ro else []
        _run("mount", *opts, loop, directory, what="mount")
    except BaseException:
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["fusermount3", "-u", fuse_dir], capture_output=True)
        raise
    return fuse_dir, loop


def detach(directory, loop, fuse_dir):
    """Undo attach_uri()."""
    _run("umount", directory, what="umount")
    subprocess.run(["losetup", "-d", loop], capture_output=True)
    subprocess.run(["fusermount3", "-u", fuse_dir], capture_output=True)


def mount(pool_path, name, directory, *, mkfs=None, read_only=None):
    """Mount device `name` of the pool on `directory` (made if missing)."""
    why = missing_capabilities()
    if why:
        raise MountError("this machine cannot mount devices: " + "; ".join(why))
    pool_path = os.path.abspath(os.fspath(pool_path))
    directory = os.path.abspath(directory)
    if any(r["dir"] == directory for r in _records(pool_path)):
        raise errors.BusyError(f"{directory} is already a cowblock mount")
    nbd, started = _ensure_daemon(pool_path)
    with contextlib.closing(connect(pool_path)) as pool:
        info = pool.info(name)
    ro = info.read_only if read_only is None else (read_only or info.read_only)
    run = _run_dir(pool_path)
    fuse_dir, loop = attach_uri(f"nbd+unix:///{name}?socket={nbd}", directory,
                                os.path.join(run, f"fuse-{info.id}"), ro=ro, mkfs=mkfs, what=name)
    record = {"device": name, "id": info.id, "dir": directory, "loop": loop, "fuse": fuse_dir,
              "read_only": ro, "started_daemon": started}
    d = os.path.join(run, "mounts")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"{info.id}-{abs(hash(directory))}.json"), "w") as f:
        json.dump(record, f)
    return record


def _find(directory):
    """The record of a cowblock mount on directory, and its pool."""
    directory = os.path.abspath(directory)
    with open("/proc/mounts") as f:
        devs = [line.split()[0] for line in f if line.split()[1] == directory]
    for dev in devs:
        r = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", dev], capture_output=True, text=True)
        back = r.stdout.strip()
        if back.endswith("/dev") and "/run/fuse-" in back:
            pool_path = back.split("/run/fuse-")[0]
            for rec in _records(pool_path):
                if rec["dir"] == directory:
                    return pool_path, rec
    raise errors.InvalidArgumentError(f"{directory} is not a cowblock mount")


def umount(directory):
    """Unmount a device mounted with mount(); stops the daemon mount() started
    once nothing of the pool is mounted any more."""
    pool_path, rec = _find(directory)
    detach(rec["dir"], rec["loop"], rec["fuse"])
    d = os.path.join(_run_dir(pool_path), "mounts")
    for name in os.listdir(d):
        with open(os.path.join(d, name)) as f:
            if json.load(f)["dir"] == rec["dir"]:
                os.unlink(os.path.join(d, name))
    if not _records(pool_path):
        pidfile = os.path.join(_run_dir(pool_path), "serve.pid")
        if os.path.exists(pidfile):
            with open(pidfile) as f:
                pid = int(f.read().strip() or 0)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)

                def gone():
                    try:
                        os.kill(pid, 0)
                        return False
                    except ProcessLookupError:
                        return True
                _wait(gone, 60, "the pool daemon to stop")  # it commits first
    return rec


@contextlib.contextmanager
def frozen(pool_path, name):
    """Freeze the filesystem of device `name` if it is mounted read-write
    (fsfreeze), so a snapshot taken inside sees it clean."""
    recs = [r for r in _records(os.path.abspath(os.fspath(pool_path)))
            if r["device"] == name and not r["read_only"]]
    for r in recs:
        _run("fsfreeze", "-f", r["dir"], what="fsfreeze")
    try:
        yield recs
    finally:
        for r in recs:
            subprocess.run(["fsfreeze", "-u", r["dir"]], capture_output=True)
