"""Loop devices and filesystems: the host side of mounting a device file.

Each step is one command; a failed one raises MountError naming the command
and what it printed.  Callers undo what they did in reverse order.
"""
import os
import shutil
import subprocess

from .. import errors
from ..errors import MountError

# Tools a mount needs, and the Debian packages they come from.
TOOLS = {"losetup": "util-linux", "mount": "mount", "umount": "mount", "blkid": "util-linux",
         "fsfreeze": "util-linux"}
MKFS_PACKAGES = {"ext2": "e2fsprogs", "ext3": "e2fsprogs", "ext4": "e2fsprogs",
                 "xfs": "xfsprogs", "btrfs": "btrfs-progs", "vfat": "dosfstools"}


def missing_capabilities(extra_tools=None):
    """Why this machine cannot mount devices (an empty list when it can)."""
    tools = {**TOOLS, **(extra_tools or {})}
    why = [f"{tool} is not installed (Debian package {pkg})"
           for tool, pkg in tools.items() if not shutil.which(tool)]
    if os.geteuid() != 0:
        why.append("mounting needs root (loop devices and mount)")
    if not os.path.exists("/dev/loop-control"):
        why.append("/dev/loop-control is missing (no loop devices)")
    return why


def run(*argv, what):
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    except FileNotFoundError:
        raise MountError(f"{what} failed: {argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise MountError(f"{what} failed: {' '.join(argv)} did not finish in 600 s") from None
    if r.returncode:
        raise MountError(f"{what} failed: {' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def check_mkfs(fstype):
    """Refuse a filesystem type whose mkfs is not installed, before any step."""
    if not fstype or "/" in fstype or fstype.startswith("."):
        raise errors.InvalidArgumentError(f"--mkfs {fstype!r} is not a filesystem type")
    if not shutil.which(f"mkfs.{fstype}"):
        pkg = MKFS_PACKAGES.get(fstype)
        raise MountError(f"mkfs.{fstype} is not installed"
                         + (f" (Debian package {pkg})" if pkg else "")
                         + f": cannot make a {fstype} filesystem")


def loop_attach(path, read_only, direct_io=False):
    return run("losetup", "-f", "--show", *(["--read-only"] if read_only else []),
               *(["--direct-io=on"] if direct_io else []), path, what="attaching a loop device")


def set_readahead(dev, nbytes):
    """The block device's readahead (blockdev --setra, in 512-byte sectors)."""
    run("blockdev", "--setra", str(nbytes // 512), dev, what="setting readahead")


def loop_detach(loop):
    subprocess.run(["losetup", "-d", loop], capture_output=True)


def loop_backing_file(loop):
    r = subprocess.run(["losetup", "-n", "-O", "BACK-FILE", loop], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def fs_type(dev):
    """The filesystem type blkid finds on dev, or None."""
    r = subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", dev], capture_output=True,
                       text=True)
    return r.stdout.strip() or None if r.returncode == 0 else None


def mkfs(dev, fstype):
    run(f"mkfs.{fstype}", *(["-q", "-F"] if fstype.startswith("ext") else ["-f"]
                            if fstype in ("xfs", "btrfs") else []), dev, what=f"mkfs.{fstype}")


def mount(dev, directory, fstype, read_only):
    # A read-only ext3/4 snapshot of a mounted filesystem may hold an
    # unreplayed journal: noload mounts it as it is, without replaying.
    opts = ["-o", "ro,noload" if fstype in ("ext3", "ext4") else "ro"] if read_only else []
    run("mount", *opts, dev, directory, what="mount")


def umount(directory, lazy=False):
    run("umount", *(["-l"] if lazy else []), directory, what="umount")


def mounted_at(directory):
    """The source of what is mounted on directory (the last mount), or None."""
    directory = os.path.realpath(directory)
    source = None
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1 and _unescape(parts[1]) == directory:
                source = _unescape(parts[0])
    return source


def _unescape(field):
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n") \
                .replace("\\134", "\\")


def freeze(directory):
    run("fsfreeze", "-f", directory, what="fsfreeze")


def thaw(directory):
    subprocess.run(["fsfreeze", "-u", directory], capture_output=True)
