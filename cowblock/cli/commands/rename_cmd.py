import click

from ..common import emit, with_pool


@click.command("rename")
@click.argument("old")
@click.argument("new")
@with_pool()
def command(settings, pool, old, new):
    """Rename a device.

    \b
    Example:
      cowblock rename box1 web-1
    """
    pool.rename(old, new)
    emit(settings, {"old": old, "new": new}, lambda d: click.echo(f"renamed {old} to {new}"))
