
import click

from ... import transfer
from ..common import emit, format_size, progress_bar, with_pool


def device_report(pool, name):
    info = pool.info(name)
    return {"name": name, "id": info.id, "size": info.size,
            "length": transfer.device_length(pool, name),
            "mapped": info.mapped_bytes, "read_only": info.read_only, "labels": info.labels}


@click.command("import")
@click.argument("name")
@click.argument("file", metavar="FILE")
@click.option("--format", "fmt", metavar="FMT", default=None,
              help="format of FILE: raw, qcow2 or any qemu-img reads (default: detected; "
                   "raw for stdin)")
@with_pool()
def command(settings, pool, name, file, fmt):
    """Create device NAME from an image FILE ("-" for stdin), sparse: holes
    and 4K chunks of zeroes take no pool space.  Formats other than raw need
    qemu-img.  A length that is not a multiple of 4K is kept (label
    cowblock.length) and given back by export.

    \b
    Example:
      cowblock import disk disk.qcow2
      xzcat disk.raw.xz | cowblock import disk -
    """
    with progress_bar(f"import {name}") as progress:
        transfer.import_file(pool, name, file, progress=progress, fmt=fmt)
    emit(settings, device_report(pool, name),
         lambda d: click.echo(f"imported {name}: {format_size(d['length'])}, "
                              f"{format_size(d['mapped'])} mapped"))
