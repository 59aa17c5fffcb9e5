import click

from ..common import emit, with_pool
from .create_cmd import parse_labels


@click.command("set")
@click.argument("name")
@click.option("--read-only/--writable", "read_only", default=None, help="the read-only flag")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="set a label (repeatable); KEY= removes it; cowblock.* labels are cowblock's")
@click.option("--force", is_flag=True, help="make an image writable")
@with_pool()
def command(settings, pool, name, read_only, labels, force):
    """Change a device's read-only flag or labels.  An image stays
    read-only (its containers and layers rely on it) unless --force.

    \b
    Example:
      cowblock set layer1 --read-only
      cowblock set web-1 --label tier=front
    """
    if read_only is None and not labels:
        raise click.UsageError("give --read-only, --writable or --label")
    info = pool.update(name, read_only=read_only, labels=parse_labels(labels), force=force)
    emit(settings, {"name": name, "read_only": info.read_only, "labels": info.labels},
         lambda d: click.echo(f"{name}: {'read-only' if d['read_only'] else 'writable'}"
                              + "".join(f", {k}={v}" for k, v in d["labels"].items())))
