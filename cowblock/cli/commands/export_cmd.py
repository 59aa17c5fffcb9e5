import click

from ... import transfer
from ..common import emit, format_size, progress_bar, with_pool


@click.command("export")
@click.argument("name")
@click.argument("file", metavar="FILE")
@click.option("--format", "fmt", metavar="FMT", default="raw", show_default=True,
              help="raw, qcow2 or any format qemu-img writes")
@click.option("--force", is_flag=True, help="replace FILE if it exists")
@with_pool(read_only=True)
def command(settings, pool, name, file, fmt, force):
    """Write device NAME to FILE ("-" for stdout), sparse: unmapped and
    all-zero 4K chunks become holes in a regular file.  Writes the exact
    length the device was imported with.  FILE appears only when complete.

    \b
    Example:
      cowblock export web-1 web-1.raw
      cowblock export web-1 web-1.qcow2 --format qcow2 --force
      cowblock export web-1 - | gzip > web-1.raw.gz
    """
    with progress_bar(f"export {name}") as progress:
        r = transfer.export_file(pool, name, file, progress=progress, fmt=fmt, overwrite=force)
    if file == "-":
        return  # stdout holds the image
    emit(settings, {"name": r.name, "file": r.dest, "format": r.format, "length": r.length,
                    "data": r.data_bytes},
         lambda d: click.echo(f"exported {name} to {file} ({d['format']}, "
                              f"{format_size(d['length'])}, {format_size(d['data'])} of data)"))
