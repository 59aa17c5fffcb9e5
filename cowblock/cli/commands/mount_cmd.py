import click

from ... import mount
from ..common import emit


@click.command("mount")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--mkfs", metavar="TYPE", help="make a filesystem first if the device has none (ext4)")
@click.option("--read-only", is_flag=True, default=None, help="mount read-only (image layers always are)")
@click.pass_obj
def command(settings, name, directory, mkfs, read_only):
    """Mount device NAME on DIRECTORY: the pool's NBD daemon (started if
    needed), nbdfuse and a loop device.  Needs root, FUSE and loop devices;
    says what is missing otherwise.

    \b
    Example:
      cowblock mount web-1 /mnt/web-1 --mkfs ext4
      cowblock umount /mnt/web-1
    """
    rec = mount.mount(settings.pool_path, name, directory, mkfs=mkfs, read_only=read_only)
    emit(settings, rec, lambda d: click.echo(
        f"mounted {name} on {d['dir']} ({d['loop']}{', read-only' if d['read_only'] else ''})"))
