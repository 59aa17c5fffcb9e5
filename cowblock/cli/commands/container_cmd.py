"""cowblock container create|commit|rm|ls"""
import click

from ... import images
from ...control.client import run
from ..common import emit, format_size, table, with_pool


@click.group("container")
def command():
    """Containers: writable snapshots of images.

    \b
    Example:
      cowblock container create debian-web web-1
      cowblock container commit web-1 debian-web-v2
      cowblock container rm web-1
    """


@command.command("create")
@click.argument("image")
@click.argument("name")
@with_pool()
def create(settings, pool, image, name):
    """A writable container NAME from IMAGE, in O(1).

    \b
    Example:
      cowblock container create debian-web web-1
    """
    c = run(pool, images.create_container, image, name)
    emit(settings, c.to_dict(), lambda d: click.echo(f"created container {name} from {image}"))


@command.command("commit")
@click.argument("name")
@click.argument("image")
@with_pool()
def commit(settings, pool, name, image):
    """A read-only image IMAGE of container NAME as it is now, layered on
    the container's image; the container goes on.

    \b
    Example:
      cowblock container commit web-1 debian-web-v2
    """
    i = run(pool, images.commit_container, name, image)
    emit(settings, i.to_dict(),
         lambda d: click.echo(f"committed {name} as image {image} "
                              f"(layers: {' > '.join(d['layers'])})"))


@command.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--deferred", is_flag=True,
              help="return at once; reclaim the blocks in the background or at the next open")
@with_pool()
def rm(settings, pool, names, deferred):
    """Delete containers (never images); the blocks only they used are freed.

    \b
    Example:
      cowblock container rm web-1 web-2
    """
    removed = run(pool, images.remove_containers, list(names), deferred=deferred)
    emit(settings, {"removed": removed, "deferred": deferred},
         lambda d: click.echo(f"removed {', '.join(removed)}"
                              + (" (reclaim deferred)" if deferred else "")))


@command.command("ls")
@with_pool(read_only=True)
def ls(settings, pool):
    """List containers with their images.

    \b
    Example:
      cowblock container ls
      cowblock --json container ls
    """
    def human(rows):
        table([[r["name"], r["image"] or "-", format_size(r["size"]), format_size(r["mapped"]),
                r["created"].replace("T", " ")] for r in rows],
              ["NAME", "IMAGE", "SIZE", "MAPPED", "CREATED"])
    emit(settings, [c.to_dict() for c in run(pool, images.list_containers)], human)
