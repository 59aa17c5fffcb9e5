import signal
import sys
import threading
import time

import click

from ... import errors
from ..common import SIZE, emit

POLL = 1.0   # seconds between looks at the daemon in --foreground


@click.command("snapshotter")
@click.option("--socket", "socket_path", metavar="PATH",
              help="Unix socket of the gRPC service (default: containerd.sock in the daemon's "
                   "runtime directory)")
@click.option("--default-size", type=SIZE, default=None, metavar="SIZE",
              show_default="8G",
              help="filesystem size of a snapshot without a parent (children inherit their "
                   "parent's); the label containerd.io/snapshot/cowblock.size overrides it")
@click.option("--foreground", is_flag=True,
              help="stay until SIGINT or SIGTERM (which stop the snapshotter), or exit 14 when "
                   "the daemon dies: for a service manager that restarts it")
@click.pass_obj
def command(settings, socket_path, default_size, foreground):
    """Serve containerd's Snapshots API (a proxy snapshotter plugin) from
    the pool's daemon, which is started if none runs.  Snapshots are thin
    snapshots of an empty ext4 template (made once per size) or of their
    parent; containerd mounts each through its device file and a loop
    device.  It runs until `cowblock daemon stop`; `cowblock daemon status`
    shows it.  Needs root, FUSE and loop devices, and `cowblock[containerd]`.

    \b
    Example:
      cowblock snapshotter --socket /run/cowblock/containerd.sock
      # containerd's config.toml:
      #   [proxy_plugins.cowblock]
      #     type = "snapshot"
      #     address = "/run/cowblock/containerd.sock"
      ctr run --rm --snapshotter cowblock docker.io/library/busybox:latest t1 echo hi
    """
    proxy, started = settings.daemon()
    with proxy:
        rec = proxy.snapshotter(socket=socket_path, default_size=default_size)
        emit(settings, rec, lambda d: click.echo(
            f"containerd snapshotter on {d['address']} (snapshots: {d['snapshots']})\n"
            "containerd's config.toml:\n  [proxy_plugins.cowblock]\n    type = \"snapshot\"\n"
            f"    address = \"{d['address']}\""))
        if foreground:
            _follow(proxy, rec["id"], started)


def _follow(proxy, snapshotter_id, started):
    """Wait for SIGINT/SIGTERM (stop the snapshotter, and the daemon if this
    command started it and nothing else is attached) or for the daemon to
    end (exit 14)."""
    asked = threading.Event()
    old = {sig: signal.signal(sig, lambda signum, frame: asked.set())
           for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not asked.wait(POLL):
            try:
                running = [a for a in proxy.status()["attachments"]
                           if a["kind"] == "snapshotter" and a["id"] == snapshotter_id]
            except errors.DaemonError:
                running = []
            if not running:
                click.echo(f"{time.strftime('%H:%M:%S')} the pool daemon stopped or removed "
                           "the snapshotter", err=True)
                sys.exit(14)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    try:
        proxy.unsnapshotter(snapshotter_id)
        if started:
            proxy.stop(if_idle=True)
    except errors.DaemonError:
        pass    # the daemon went away meanwhile: nothing is left to stop
