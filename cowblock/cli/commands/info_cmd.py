import click

from ..common import emit, format_size, table, with_pool
from .ls_cmd import device_record

SIZES = ("size", "mapped", "exclusive", "shared")


def shown(key, value):
    """How the table shows a field: sizes as sizes, flags as yes/no, none as -."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format_size(value) if key in SIZES else value


@click.command("info")
@click.argument("name")
@with_pool(read_only=True)
def command(settings, pool, name):
    """Everything about one device, its space use included.

    \b
    Example:
      cowblock info base --json
    """
    record = device_record(pool.info(name, usage=True))

    def human(d):
        rows = [(k.replace("_", "-"), shown(k, v)) for k, v in d.items() if k != "labels"]
        rows += [(f"label {k}", v) for k, v in d["labels"].items()]
        table(rows, ["FIELD", "VALUE"])
    emit(settings, record, human)
