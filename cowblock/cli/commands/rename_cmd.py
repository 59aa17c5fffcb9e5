import click

from ..common import emit, with_pool


@click.command("rename")
@click.argument("old")
@click.argument("new")
@click.option("--force", is_flag=True, help="rename a device another tool owns")
@with_pool()
def command(settings, pool, old, new, force):
    """Rename a device; containers and layers that name it follow.  A
    device another tool owns (label cowblock.owner) needs --force.

    \b
    Example:
      cowblock rename box1 web-1
    """
    pool.rename(old, new, force=force)
    emit(settings, {"old": old, "new": new}, lambda d: click.echo(f"renamed {old} to {new}"))
