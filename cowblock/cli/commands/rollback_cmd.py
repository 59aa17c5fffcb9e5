import click

from ..common import emit, format_size, with_pool


@click.command("rollback")
@click.argument("name")
@click.argument("snapshot")
@click.option("--force", is_flag=True,
              help="roll back to a device outside NAME's lineage, or a device another tool owns")
@with_pool()
def command(settings, pool, name, snapshot, force):
    """Make NAME a copy of SNAPSHOT again, in O(1) (like qemu-img snapshot -a),
    with its size.  SNAPSHOT must be of NAME's lineage: a snapshot of NAME
    (at any depth) or one of its origins, unless --force.

    \b
    Example:
      cowblock snapshot web-1 web-1-before-upgrade
      cowblock rollback web-1 web-1-before-upgrade
    """
    info = pool.rollback(name, snapshot, force=force)
    emit(settings, {"name": name, "snapshot": snapshot, "size": info.size},
         lambda d: click.echo(f"{name} rolled back to {snapshot} ({format_size(info.size)})"))
