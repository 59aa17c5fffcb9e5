"""An NBD export as a regular file, through nbdfuse (libnbd-bin).

The fallback way to attach a device where the in-process FUSE server is not
available, and the way the benchmarks mount other systems' NBD exports
(qemu-nbd's).  nbdfuse runs as its own process; its FUSE mount is a
directory holding one file, `dev`.
"""
import contextlib
import os
import shutil
import subprocess
import time

from .blockdev import MountError

PACKAGE = {"nbdfuse": "libnbd-bin", "fusermount3": "fuse3"}


def missing():
    why = [f"{tool} is not installed (Debian package {pkg})"
           for tool, pkg in PACKAGE.items() if not shutil.which(tool)]
    if not os.path.exists("/dev/fuse"):
        why.append("/dev/fuse is missing (no FUSE in this kernel or container)")
    return why


class NbdfuseFile:
    """nbdfuse serving `uri` as the file `<directory>/dev` until close()."""

    def __init__(self, uri, directory, *, read_only=False, timeout=30):
        self.directory = directory
        self.path = os.path.join(directory, "dev")
        os.makedirs(directory, exist_ok=True)
        self.pidfile, log_path = f"{directory}.pid", f"{directory}.log"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pidfile)
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["nbdfuse", *(["-r"] if read_only else []), "-P", self.pidfile, self.path, uri],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if os.path.exists(self.pidfile) and os.path.exists(self.path):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.close()
        with open(log_path, errors="replace") as f:
            tail = f.read().strip()[-500:]
        raise MountError(f"nbdfuse did not attach {uri}: "
                         + (tail or f"no file after {timeout} s"))

    @property
    def pid(self):
        return self.proc.pid

    def close(self):
        """Unmount the FUSE file and wait for nbdfuse to exit."""
        subprocess.run(["fusermount3", "-u", self.directory], capture_output=True)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", self.directory], capture_output=True)
        for p in (self.pidfile, f"{self.directory}.log"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)
