import click

from ..common import emit, with_pool


@click.command("rollback")
@click.argument("name")
@click.argument("snapshot")
@with_pool()
def command(settings, pool, name, snapshot):
    """Make NAME a copy of SNAPSHOT again, in O(1) (like qemu-img snapshot -a).

    \b
    Example:
      cowblock rollback web-1 web-1-before-upgrade
    """
    pool.rollback(name, snapshot)
    emit(settings, {"name": name, "snapshot": snapshot},
         lambda d: click.echo(f"{name} rolled back to {snapshot}"))
