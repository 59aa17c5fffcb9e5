"""cowblock image import|layer|load|ls|inspect|rm|prune"""
import json

import click

from ... import images, ociimages
from ...control import client
from ...control.client import run
from ...oci.archive import absolute_location
from ..common import SIZE, emit, format_size, progress_bar, table, with_pool

FORMAT_HELP = "format of FILE: raw, qcow2 or any qemu-img reads (default: detected; raw for stdin)"


@click.group("image")
def command():
    """Images: read-only layers, each a snapshot of the one below: raw disk
    images (import, layer) and OCI/Docker images (load: one ext4 layer
    device per image layer).

    \b
    Example:
      cowblock image import debian debian.qcow2
      cowblock image layer debian debian-web web.raw
      cowblock image load debian.tar
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


@command.command("load")
@click.argument("archive", metavar="ARCHIVE")
@click.option("--name", metavar="REF", help="the reference to load it as (default: the "
              "archive's own; needed when it names none)")
@click.option("--platform", metavar="OS/ARCH[/VARIANT]",
              help="the image of this platform from a multi-platform index (default: the host's)")
@click.option("--size", type=SIZE, default=None,
              help="filesystem size of its layers (default 8G; sparse; layers are shared only "
                   "between images of the same size)")
@click.pass_obj
def load(settings, archive, name, platform, size):
    """Load a Docker or OCI image: a `docker save` tar, an OCI archive or an
    OCI layout directory (PATH:TAG picks an image).  Each layer becomes a
    read-only ext4 device, a snapshot of the one below; layers already in
    the pool (same diff_ids, same size) are reused, not unpacked again.  The
    pool's daemon does it (started if none runs); needs root.

    \b
    Example:
      cowblock image load debian.tar
      cowblock image load ./layout:v1 --name example.com/app:1
      cowblock container create debian web-1
    """
    proxy, _ = settings.daemon()
    with proxy:
        out = proxy.image_load(absolute_location(archive), ref=name, platform=platform,
                               size=size, timeout=LOAD_TIMEOUT)
    emit(settings, out, lambda d: click.echo(
        f"loaded {', '.join(d['loaded'])} ({_short(d['id'])}, {len(d['layers'])} layers, "
        f"{sum(not la['reused'] for la in d['layers'])} unpacked, "
        f"{sum(la['reused'] for la in d['layers'])} reused)"))


LOAD_TIMEOUT = 24 * 3600.0   # seconds: a load takes as long as its layers take to unpack


def _short(image_id):
    return image_id.split(":")[-1][:12]


def _in_daemon(pool, call, local, *args, **kwargs):
    """The daemon's call (which knows what is mounted) through a proxy, else
    the function on the pool here (nothing is mounted without a daemon)."""
    if isinstance(pool, client.PoolProxy):
        return pool.call(call, *args, **kwargs)
    return local(pool, *args, **kwargs)


@command.command("ls")
@with_pool(read_only=True)
def ls(settings, pool):
    """List raw images with their layers (bottom to top) and containers,
    then loaded OCI images: reference, id, layers, pool bytes (and how many
    of them other images share), containers.

    \b
    Example:
      cowblock image ls
      cowblock --json image ls
    """
    raw, oci = run(pool, ociimages.all_images)
    raw = [i.to_dict() for i in raw]
    oci = [dict(i, kind="oci", name=i["ref"]) for i in oci]

    def human(rows):
        if raw or not oci:
            table([[r["name"], r["parent"] or "-", format_size(r["length"]),
                    format_size(r["mapped"]), len(r["layers"]), ",".join(r["containers"]) or "-",
                    r["created"].replace("T", " ")] for r in raw],
                  ["NAME", "PARENT", "SIZE", "MAPPED", "LAYERS", "CONTAINERS", "CREATED"])
        if raw and oci:
            click.echo()
        if oci:
            table([[r["ref"], _short(r["id"]), len(r["layers"]), format_size(r["bytes"]),
                    format_size(r["shared_bytes"]), ",".join(r["containers"]) or "-"]
                   for r in oci], ["REF", "ID", "LAYERS", "SIZE", "SHARED", "CONTAINERS"])
    emit(settings, raw + oci, human)


@command.command("inspect")
@click.argument("ref")
@with_pool(read_only=True)
def inspect(settings, pool, ref):
    """An OCI image as JSON: its record, layers (device, diff_id, chain_id,
    pool bytes, the images sharing it), config and containers.

    \b
    Example:
      cowblock image inspect debian
    """
    info = run(pool, ociimages.info, ref)
    emit(settings, info, lambda d: click.echo(json.dumps(d, indent=2, default=str)))


@command.command("rm")
@click.argument("refs", nargs=-1, required=True)
@click.option("--force", is_flag=True,
              help="remove it even while containers use it (they keep their data)")
@with_pool()
def rm(settings, pool, refs, force):
    """Remove OCI images (by reference or id) and the layers no other image
    keeps; refused while containers of one exist, unless --force.

    \b
    Example:
      cowblock image rm debian
    """
    out = _in_daemon(pool, "image_rm", ociimages.remove, list(refs), force=force)
    emit(settings, out, lambda d: click.echo(
        f"untagged {', '.join(d['untagged'])}; removed "
        f"{len(d['removed'])} layer device{'s' if len(d['removed']) != 1 else ''}"))


@command.command("prune")
@with_pool()
def prune(settings, pool):
    """Remove the layers no image, container or running load keeps (what a
    failed, crashed or replaced load left).

    \b
    Example:
      cowblock image prune
    """
    removed = _in_daemon(pool, "image_prune", ociimages.prune)
    emit(settings, {"removed": removed}, lambda d: click.echo(
        f"removed {len(removed)} layer device{'s' if len(removed) != 1 else ''}"
        + (f": {', '.join(removed)}" if removed else "")))
