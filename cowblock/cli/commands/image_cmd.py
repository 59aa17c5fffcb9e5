"""cowblock image import|layer|ls"""
import click

from ... import images
from ...control.client import run
from ..common import emit, format_size, table, with_pool
from .import_cmd import progress_bar

FORMAT_HELP = "format of FILE: raw, qcow2 or any qemu-img reads (default: detected; raw for stdin)"


@click.group("image")
def command():
    """Images: read-only layers, each a snapshot of the one below.

    \b
    Example:
      cowblock image import debian debian.qcow2
      cowblock image layer debian debian-web web.raw
      cowblock image ls
    """


def _report(settings, image, verb):
    emit(settings, image.to_dict(),
         lambda d: click.echo(f"{verb} image {d['name']} ({format_size(d['length'])}, "
                              f"layers: {' > '.join(d['layers'])})"))


@command.command("import")
@click.argument("name")
@click.argument("file", metavar="FILE")
@click.option("--format", "fmt", metavar="FMT", default=None, help=FORMAT_HELP)
@with_pool()
def import_(settings, pool, name, file, fmt):
    """A base image NAME from FILE ("-" for stdin), read-only.

    \b
    Example:
      cowblock image import debian debian-12.qcow2
    """
    with progress_bar(f"import {name}") as progress:
        image = images.import_image(pool, name, file, progress, fmt=fmt)
    _report(settings, image, "imported")


@command.command("layer")
@click.argument("parent")
@click.argument("name")
@click.argument("file", metavar="FILE")
@click.option("--format", "fmt", metavar="FMT", default=None, help=FORMAT_HELP)
@with_pool()
def layer(settings, pool, parent, name, file, fmt):
    """A new layer NAME on image PARENT holding FILE ("-" for stdin): only
    the blocks that differ from PARENT take space; it is read-only.

    \b
    Example:
      cowblock image layer debian debian-web debian-web.raw
    """
    with progress_bar(f"layer {name}") as progress:
        image = images.add_layer(pool, parent, name, file, progress, fmt=fmt)
    _report(settings, image, "added")


@command.command("ls")
@with_pool(read_only=True)
def ls(settings, pool):
    """List images with their layers (bottom to top) and containers.

    \b
    Example:
      cowblock image ls
      cowblock --json image ls
    """
    def human(rows):
        table([[r["name"], r["parent"] or "-", format_size(r["length"]), format_size(r["mapped"]),
                len(r["layers"]), ",".join(r["containers"]) or "-", r["created"].replace("T", " ")]
               for r in rows], ["NAME", "PARENT", "SIZE", "MAPPED", "LAYERS", "CONTAINERS",
                                "CREATED"])
    emit(settings, [i.to_dict() for i in run(pool, images.list_images)], human)
