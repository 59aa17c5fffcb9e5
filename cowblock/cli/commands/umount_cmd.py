import click

from ... import mount
from ..common import emit


@click.command("umount")
@click.argument("directory", type=click.Path(file_okay=False))
@click.pass_obj
def command(settings, directory):
    """Unmount a device mounted with `cowblock mount`.

    \b
    Example:
      cowblock umount /mnt/web-1
    """
    rec = mount.umount(directory)
    emit(settings, rec, lambda d: click.echo(f"unmounted {d['device']} from {d['dir']}"))
