import click

from ..common import SIZE, emit


@click.command("snapshotter")
@click.option("--socket", "socket_path", metavar="PATH",
              help="Unix socket of the gRPC service (default: containerd.sock in the daemon's "
                   "runtime directory)")
@click.option("--default-size", type=SIZE, default=None, metavar="SIZE",
              show_default="8G",
              help="filesystem size of a snapshot without a parent (children inherit their "
                   "parent's); the label containerd.io/snapshot/cowblock.size overrides it")
@click.pass_obj
def command(settings, socket_path, default_size):
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
    proxy, _ = settings.daemon()
    with proxy:
        rec = proxy.snapshotter(socket=socket_path, default_size=default_size)
    emit(settings, rec, lambda d: click.echo(
        f"containerd snapshotter on {d['address']} (snapshots: {d['snapshots']})\n"
        "containerd's config.toml:\n  [proxy_plugins.cowblock]\n    type = \"snapshot\"\n"
        f"    address = \"{d['address']}\""))
