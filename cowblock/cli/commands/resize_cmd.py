import click

from ..common import RESIZE, SignedSizeCommand, device_size, emit, format_size, with_pool


@click.command("resize", cls=SignedSizeCommand)
@click.argument("name")
@click.argument("size", type=RESIZE)
@with_pool()
def command(settings, pool, name, size):
    """Grow or shrink a device to SIZE, or by +SIZE / -SIZE (shrinking drops
    the blocks past the new end); sizes are rounded up to whole 4K pages.
    A device imported from a file no longer holds just that file's bytes
    once resized: export then writes the whole device.

    \b
    Example:
      cowblock resize base 20G
      cowblock resize base +512M
      cowblock resize base -1G
    """
    sign, amount = size
    if sign:
        info = pool.resize_device(name, by=device_size(sign * amount, "change"))
    else:
        info = pool.resize_device(name, device_size(amount))
    emit(settings, {"name": name, "size": info.size},
         lambda d: click.echo(f"{name} is now {format_size(info.size)}"))
