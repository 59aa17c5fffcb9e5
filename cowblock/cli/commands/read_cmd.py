import sys

import click

from ..common import SIZE, check_range, with_pool

CHUNK = 1 << 20


@click.command("read")
@click.argument("name")
@click.option("--offset", type=SIZE, default=0, help="first byte (any alignment)")
@click.option("--length", type=SIZE, default=None, help="bytes to read (default: to the end)")
@with_pool(read_only=True)
def command(settings, pool, name, offset, length):
    """Write bytes of a device to stdout.  A range that runs past the end
    of the device is refused before anything is written.

    \b
    Example:
      cowblock read base --offset 4K --length 512 | xxd | head
    """
    dev = pool.device(name)
    size = dev.size
    if length is None:
        length = max(size - offset, 0)
    check_range("read", name, offset, length, size)
    out = sys.stdout.buffer
    buf = bytearray(CHUNK)
    for pos in range(offset, offset + length, CHUNK):
        n = min(CHUNK, offset + length - pos)
        view = memoryview(buf)[:n]
        dev.readinto(view, pos)
        out.write(view)
    out.flush()
