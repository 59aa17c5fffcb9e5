import click

from ...daemon.find import umount
from ..common import emit, note


@click.command("umount")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True,
              help="detach it even while processes use it (a lazy unmount)")
@click.pass_obj
def command(settings, directory, force):
    """Unmount a device mounted with `cowblock mount`; nothing it used stays
    behind (no loop device, device file or helper process).  Finds the pool
    by itself.

    \b
    Example:
      cowblock umount /mnt/web-1
    """
    rec = umount(directory, force=force, on_note=note)
    emit(settings, rec, lambda d: click.echo(f"unmounted {d['device']} from {d['dir']}"))
