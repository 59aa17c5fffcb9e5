import click

from ..common import emit


@click.command("mount")
@click.argument("name")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--mkfs", metavar="TYPE", help="make a filesystem first if the device has none (ext4)")
@click.option("--read-only", is_flag=True, default=None, help="mount read-only (image layers always are)")
@click.option("--shared", is_flag=True,
              help="allow it while the device is used read-write elsewhere with --shared too "
                   "(cluster filesystems)")
@click.pass_obj
def command(settings, name, directory, mkfs, read_only, shared):
    """Mount device NAME on DIRECTORY (made if missing).  The pool's daemon
    (started if none runs) attaches the device as a file, puts a loop
    device over it and mounts its filesystem.  A writable device has at
    most one mount; read-only devices may be mounted many times.  Needs
    root, FUSE and loop devices; says what is missing otherwise.

    \b
    Example:
      cowblock mount web-1 /mnt/web-1 --mkfs ext4
      cowblock umount /mnt/web-1
    """
    proxy, _ = settings.daemon()
    with proxy:
        rec = proxy.mount(name, directory, mkfs=mkfs, read_only=read_only, shared=shared)
    emit(settings, rec, lambda d: click.echo(
        f"mounted {name} on {d['dir']} ({d['loop']}{', read-only' if d['read_only'] else ''})"))
