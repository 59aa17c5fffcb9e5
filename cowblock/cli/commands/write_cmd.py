import os
import stat
import sys
import tempfile

import click

from ..common import SIZE, check_range, emit, naming_pool, with_pool

CHUNK = 1 << 20
SPOOL_IN_MEMORY = 64 << 20   # bytes of a piped stdin held in memory; more go to a temporary file


@click.command("write")
@click.argument("name")
@click.option("--offset", type=SIZE, default=0, help="first byte (any alignment)")
@with_pool()
def command(settings, pool, name, offset):
    """Write stdin into a device at --offset.  Data that would run past the
    end of the device is refused before anything is written.

    \b
    Example:
      echo hello | cowblock write base --offset 1M
    """
    dev = pool.device(name)
    size = dev.size
    check_range("write", name, offset, 0, size)
    room = size - offset
    with _stdin_within(room) as (src, length):
        check_range("write", name, offset, min(length, room), size, more=length > room)
        pos = offset
        while True:
            chunk = src.read(CHUNK)
            if not chunk:
                break
            naming_pool(settings, lambda: dev.pwrite(chunk, pos))
            pos += len(chunk)
    pool.commit()
    emit(settings, {"name": name, "offset": offset, "written": pos - offset},
         lambda d: click.echo(f"wrote {d['written']} bytes to {name} at {offset}", err=True))


class _stdin_within:
    """stdin and its length, known before any of it is written: a regular
    file's from its size; a pipe's by reading it into a spool, up to one
    byte more than `room` (enough to know it does not fit)."""

    def __init__(self, room):
        self.room = room
        self.spool = None

    def __enter__(self):
        src = sys.stdin.buffer
        try:
            st = os.fstat(src.fileno())
            if stat.S_ISREG(st.st_mode):
                return src, max(st.st_size - src.tell(), 0)
        except (OSError, ValueError):
            pass
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY)
        length = 0
        while length <= self.room:
            chunk = src.read(min(CHUNK, self.room + 1 - length))
            if not chunk:
                break
            self.spool.write(chunk)
            length += len(chunk)
        self.spool.seek(0)
        return self.spool, length

    def __exit__(self, *exc):
        if self.spool is not None:
            self.spool.close()
