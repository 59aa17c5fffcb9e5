import click

from ..common import emit, with_pool


@click.command("rm")
@click.argument("names", nargs=-1, required=True)
@click.option("--deferred", is_flag=True,
              help="return at once; reclaim the blocks in the background or at the next open")
@with_pool()
def command(settings, pool, names, deferred):
    """Delete devices; the blocks only they used are freed.

    \b
    Example:
      cowblock rm old-container other-container
      cowblock rm --deferred big-device
    """
    pool.delete(*names, deferred=deferred)   # every name must exist before any goes
    emit(settings, {"removed": list(names), "deferred": deferred},
         lambda d: click.echo(f"removed {', '.join(names)}" + (" (reclaim deferred)" if deferred else "")))
