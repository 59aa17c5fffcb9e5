import click

from ..common import emit, with_pool


@click.command("snapshot")
@click.argument("origin")
@click.argument("name")
@click.option("--read-only", is_flag=True, help="make the snapshot read-only")
@with_pool()
def command(settings, pool, origin, name, read_only):
    """Snapshot ORIGIN as NAME, in O(1); ORIGIN may be any device, a snapshot
    of a snapshot included, even one being written.

    \b
    Example:
      cowblock snapshot base layer1 --read-only
    """
    dev = pool.snapshot(origin, name, read_only=read_only)
    emit(settings, {"name": name, "id": dev.id, "origin": origin, "read_only": read_only},
         lambda d: click.echo(f"snapshot {name} of {origin}" + (" (read-only)" if read_only else "")))
