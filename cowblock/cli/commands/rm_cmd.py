import click

from ..common import emit, with_pool


@click.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--deferred", is_flag=True,
              help="return at once; reclaim the blocks in the background or at the next open")
@click.option("--force", is_flag=True,
              help="remove an image even though containers or layers depend on it (they keep "
                   "their data), or a device another tool owns")
@with_pool()
def command(settings, pool, names, deferred, force):
    """Delete devices; the blocks only they used are freed.  An image that
    containers or other layers depend on is kept unless --force, and so is
    a device another tool owns (label cowblock.owner).

    \b
    Example:
      cowblock rm old-container other-container
      cowblock rm --deferred big-device
    """
    pool.delete(*names, deferred=deferred, force=force)   # every name must exist before any goes
    emit(settings, {"removed": list(names), "deferred": deferred},
         lambda d: click.echo(f"removed {', '.join(names)}" + (" (reclaim deferred)" if deferred else "")))
