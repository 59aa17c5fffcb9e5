import click

from ..common import SIZE, emit, format_size, with_pool


@click.command("resize")
@click.argument("name")
@click.argument("size", type=SIZE)
@with_pool()
def command(settings, pool, name, size):
    """Grow or shrink a device (shrinking drops the blocks past the new end).

    \b
    Example:
      cowblock resize base 20G
    """
    pool.device(name).resize(size)   # one round trip through a daemon
    emit(settings, {"name": name, "size": size},
         lambda d: click.echo(f"{name} is now {format_size(size)}"))
