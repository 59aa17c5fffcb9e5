"""What every subcommand shares: the pool to use, output, and errors."""
import functools
import json
import os
import sys

import click

from .. import errors, health
from ..control import client
from ..errors import BusyError
from ..paths import default_pool_path, open_or_create
from ..sizes import format_size, parse_size

# Exit codes by exception class (checked in order: subclasses first).
EXIT_CODES = [
    (errors.DeviceNotFoundError, 3), (errors.PoolNotFoundError, 3),
    (errors.DeviceExistsError, 4), (errors.PoolExistsError, 4),
    (errors.InvalidArgumentError, 5),
    (errors.NoSpaceError, 6),
    (errors.ReadOnlyError, 7),
    (errors.PoolLockedError, 8),
    (errors.CorruptMetadataError, 9), (errors.NeedsCheckError, 9),
    (errors.PoolIOError, 10),
    (errors.HostFileError, 11),
    (BusyError, 12),
    (errors.MountError, 13),
    (errors.DaemonError, 14),
    (errors.CowblockError, 1),
]
EXIT_CHECK_FAILED = 9


def exit_code(exc):
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


class Settings:
    """Global options, passed to every subcommand as ctx.obj."""

    def __init__(self, pool, as_json, timeout):
        self.pool_arg = pool
        self.json = as_json
        self.timeout = timeout

    @property
    def pool_path(self):
        return self.pool_arg or default_pool_path()

    def open(self, read_only=False, create=True):
        """The pool, or a proxy to the daemon that holds it.  The embedded
        default is made on first use; a pool named with --pool or
        $COWBLOCK_POOL must exist.  Waits up to --timeout seconds for another
        command holding it, as LVM does."""
        explicit = bool(self.pool_arg or os.environ.get("COWBLOCK_POOL"))
        if not explicit and create and not os.path.isfile(os.path.join(self.pool_path, "metadata")):
            return open_or_create(self.pool_path, read_only=read_only, timeout=self.timeout)
        return client.connect(self.pool_path, read_only=read_only, timeout=self.timeout,
                              on_note=note)

    def daemon(self):
        """A proxy to the pool's daemon (started if none runs), and whether
        this command started it."""
        return client.daemon(self.pool_path, timeout=self.timeout, on_note=note)


def note(text):
    click.echo(f"cowblock: note: {text}", err=True)


def pass_settings(fn):
    return click.pass_obj(fn)


def with_pool(read_only=False):
    """Open the pool around the command and pass it as the first argument;
    then report the pool's health (through a daemon, as part of the
    command's own reply)."""
    def wrap(fn):
        @click.pass_obj
        @functools.wraps(fn)
        def run(settings, *args, **kwargs):
            # Only commands that write make the default pool on first use.
            with settings.open(read_only=read_only, create=not read_only) as pool:
                if isinstance(pool, client.PoolProxy):
                    pool.want_health = True
                result = fn(settings, pool, *args, **kwargs)
                h = getattr(pool, "health", None) or client.run(pool, health.pool_health)
                hook = h.hook if h.below_low_water else None
            for warning in h.warnings:
                click.echo(f"cowblock: warning: {warning}", err=True)
            if hook:  # after closing: the hook may well open the pool itself
                status = health.run_hook(settings.pool_path, hook, h)
                if status:
                    click.echo(f"cowblock: warning: the low-water hook exited {status}", err=True)
            return result
        return run
    return wrap


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value, param.human_readable_name if param else "size")
        except errors.InvalidArgumentError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


def emit(settings, data, human):
    """Print data as JSON with --json, else call human(data)."""
    if settings.json:
        click.echo(json.dumps(data, indent=2, default=str))
    else:
        human(data)


def table(rows, columns, title=None):
    """A plain-text table (rich when stdout is a terminal)."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Table
        t = Table(title=title, box=None, header_style="bold")
        for c in columns:
            t.add_column(c, justify="right" if c in ("SIZE", "MAPPED", "EXCLUSIVE", "SHARED", "ID",
                                                      "BEGIN", "LENGTH") else "left")
        for r in rows:
            t.add_row(*[str(x) for x in r])
        Console().print(t)
        return
    widths = [max([len(c)] + [len(str(r[i])) for r in rows]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    for r in rows:
        click.echo("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


__all__ = ["SIZE", "Settings", "emit", "exit_code", "format_size", "pass_settings", "table",
           "with_pool", "EXIT_CHECK_FAILED"]
