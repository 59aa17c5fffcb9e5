import sys

import click

from ..common import SIZE, emit, with_pool

CHUNK = 1 << 20


@click.command("write")
@click.argument("name")
@click.option("--offset", type=SIZE, default=0, help="first byte (any alignment)")
@with_pool()
def command(settings, pool, name, offset):
    """Write stdin into a device at --offset.

    \b
    Example:
      echo hello | cowblock write base --offset 1M
    """
    dev = pool.device(name)
    pos = offset
    src = sys.stdin.buffer
    while True:
        chunk = src.read(CHUNK)
        if not chunk:
            break
        dev.pwrite(chunk, pos)
        pos += len(chunk)
    pool.commit()
    emit(settings, {"name": name, "offset": offset, "written": pos - offset},
         lambda d: click.echo(f"wrote {d['written']} bytes to {name} at {offset}", err=True))
