import click

from ..common import emit, with_pool
from .create_cmd import parse_labels


@click.command("set")
@click.argument("name")
@click.option("--read-only/--writable", "read_only", default=None, help="the read-only flag")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="set a label (repeatable); KEY= removes it")
@with_pool()
def command(settings, pool, name, read_only, labels):
    """Change a device's read-only flag or labels.

    \b
    Example:
      cowblock set layer1 --read-only
      cowblock set web-1 --label tier=front
    """
    if read_only is None and not labels:
        raise click.UsageError("give --read-only, --writable or --label")
    if read_only is not None:
        pool.set_read_only(name, read_only)
    if labels:
        merged = {**pool.info(name).labels, **parse_labels(labels)}
        pool.set_labels(name, {k: v for k, v in merged.items() if v != ""})
    info = pool.info(name)
    emit(settings, {"name": name, "read_only": info.read_only, "labels": info.labels},
         lambda d: click.echo(f"{name}: {'read-only' if d['read_only'] else 'writable'}"
                              + "".join(f", {k}={v}" for k, v in d["labels"].items())))
