import click

from ..common import SIZE, device_size, emit, format_size, with_pool


@click.command("create")
@click.argument("name")
@click.option("--size", type=SIZE, required=True,
              help="device size (rounded up to whole 4K pages)")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="a label (repeatable)")
@with_pool()
def command(settings, pool, name, size, labels):
    """Create a thin device that reads as zeroes and uses no space yet.

    \b
    Example:
      cowblock create base --size 10G --label role=base
    """
    size = device_size(size)
    dev = pool.create_thin(name, size, labels=parse_labels(labels))
    emit(settings, {"name": name, "id": dev.id, "size": size},
         lambda d: click.echo(f"created {name} ({format_size(size)})"))


def parse_labels(items):
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"label {item!r} is not KEY=VALUE", param_hint="--label")
        out[key] = value
    return out
