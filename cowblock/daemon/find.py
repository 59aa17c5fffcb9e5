"""From a mount point to the daemon that made it (`cowblock umount DIR`
needs no --pool): the mount's loop device is backed by a device file in a
pool's runtime directory, which names its pool."""
import os

from .. import errors, runtime
from ..attach import blockdev


def owner(directory):
    """(pool path, runtime directory) of the cowblock mount on directory."""
    directory = os.path.realpath(directory)
    source = blockdev.mounted_at(directory)
    if source is None:
        raise errors.InvalidArgumentError(f"{directory} is not mounted")
    back = blockdev.loop_backing_file(source) if source.startswith("/dev/loop") else None
    root = os.path.realpath(runtime.root()) + os.sep
    if not back or not os.path.realpath(back).startswith(root):
        raise errors.InvalidArgumentError(f"{directory} is not a cowblock mount (it is {source})")
    key = os.path.realpath(back)[len(root):].split(os.sep)[0]
    try:
        with open(os.path.join(root, key, runtime.POOL)) as f:
            pool_path = f.read().strip()
    except OSError:
        raise errors.InvalidArgumentError(
            f"{directory} is mounted from {back}, whose pool is unknown (its runtime "
            "directory is gone)") from None
    return pool_path, runtime.RuntimeDir(pool_path)


def umount(directory, *, force=False, on_note=None):
    """Unmount a cowblock mount through its daemon.  If that daemon has died,
    clean up what it left (reported to on_note)."""
    from ..control import client
    directory = os.path.realpath(directory)
    pool_path, rt = owner(directory)
    lost = [m for m in rt.load_state().get("mounts", []) if m.get("dir") == directory]
    target = client.connect(pool_path, on_note=on_note, timeout=30)
    with target:
        if isinstance(target, client.PoolProxy):
            return target.umount(directory, force=force)
    # its daemon is gone: connect() cleaned up after it (and said so)
    if blockdev.mounted_at(directory) is not None:
        raise errors.DaemonError(f"{directory} is left from a daemon that died, and could not "
                                 "be unmounted; try `umount -l` as root")
    return {"kind": "mount", "device": lost[0]["device"] if lost else "?", "dir": directory,
            "lost": True}
