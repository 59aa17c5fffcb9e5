"""What every subcommand shares: the pool to use, output, notes, warnings
and errors (one reporter: text, or JSON lines on stderr with --json)."""
import contextlib
import functools
import json
import os
import sys
import tempfile

import click

from .. import errors, health, lowwater
from ..control import client
from ..errors import BusyError
from ..paths import default_pool_path, open_or_create
from ..sizes import PAGE, format_size, parse_size, round_up

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
    (errors.ProtectedError, 15),
    (errors.CowblockError, 1),
]
EXIT_CHECK_FAILED = 9


def exit_code(exc):
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


class Settings:
    """Global options, passed to every subcommand as ctx.obj; set by the
    options of the group and of the subcommand alike (see main)."""

    def __init__(self, pool=None, as_json=False, timeout=30.0):
        self.pool_arg = pool
        self.json = as_json
        self.timeout = timeout

    @property
    def pool_location(self):
        """The pool as named: a directory, or rados:CEPHPOOL/NAME."""
        return self.pool_arg or default_pool_path()

    @property
    def pool_path(self):
        """The pool's directory (for a pool on RADOS, its cache here)."""
        location = self.pool_location
        if location.startswith("rados:"):
            from ..rados import cache_dir   # (the engine is imported only for such a pool)
            return cache_dir(location)
        return location

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


# ---- what goes to stderr: notes, warnings, errors ----
def _settings():
    ctx = click.get_current_context(silent=True)
    return ctx.find_object(Settings) if ctx is not None else None


def _say(kind, text):
    settings = _settings()
    if settings is not None and settings.json:
        click.echo(json.dumps({kind: text}), err=True)
    else:
        click.echo(f"cowblock: {kind}: {text}", err=True)


def note(text):
    _say("note", text)


def warn(text):
    _say("warning", text)


def report_error(settings, error, code=None):
    """Say what failed (with its hint) and exit with its code: a
    CowblockError, a click exception (usage errors show the usage), or text."""
    if isinstance(error, click.ClickException):
        code, message, hint = error.exit_code, error.format_message(), None
        if not settings.json:
            error.show()
            sys.exit(code)
    elif isinstance(error, errors.CowblockError):
        code, message, hint = exit_code(error), str(error), error.hint or None
    else:
        code, message, hint = code or 1, str(error), None
    if settings.json:
        kind = type(error).__name__ if not isinstance(error, str) else "error"
        click.echo(json.dumps({"error": {"message": message, "hint": hint, "kind": kind,
                                         "exit_code": code}}), err=True)
    else:
        click.echo(f"cowblock: error: {message}", err=True)
        if hint:
            click.echo(f"cowblock: hint: {hint}", err=True)
    sys.exit(code)


def pass_settings(fn):
    return click.pass_obj(fn)


def with_pool(read_only=False):
    """Open the pool around the command and pass it as the first argument;
    then report the pool's health (through a daemon, as part of the
    command's own reply) and, when this command crossed a low-water mark of
    a pool it holds itself, run the hook before returning (a daemon runs it
    for the pools it holds: cowblock.lowwater).  A write of such a command
    that finds the pool full runs the due hook at once and is tried once
    more (Pool.space_wait, which Device writes call)."""
    def wrap(fn):
        @click.pass_obj
        @functools.wraps(fn)
        def run(settings, *args, **kwargs):
            # Only commands that write make the default pool on first use.
            with settings.open(read_only=read_only, create=not read_only) as pool:
                if isinstance(pool, client.PoolProxy):
                    pool.want_health = True
                elif _holds(pool):
                    pool.space_wait = functools.partial(_hook_when_full, settings, pool)
                result = fn(settings, pool, *args, **kwargs)
                h = getattr(pool, "health", None) or client.run(pool, health.pool_health)
                hook = lowwater.due(pool) if _holds(pool) else None
            for warning in h.warnings:
                warn(warning)
            if hook:  # after closing: the hook may well open the pool itself
                _run_hook(settings, hook, "free space fell under a low-water mark")
            return result
        return run
    return wrap


def _holds(pool):
    """Whether this command holds the pool itself, for writing (not through
    its daemon)."""
    return not isinstance(pool, client.PoolProxy) and not pool.read_only


def _hook_when_full(settings, pool):
    """A held pool's space_wait: the hook, when due, runs now with the pool
    closed (it may open it to grow it)."""
    hook = lowwater.due(pool)
    if hook:
        with pool.released(timeout=settings.timeout):
            _run_hook(settings, hook, "the pool is full")


def _run_hook(settings, hook, why):
    """Run the hook to its end or timeout, its output on stderr: as it
    comes, or under --json as one object once it is over."""
    command, timeout, _ = hook
    note(f"{why}: running the low-water hook ({command})")
    with tempfile.TemporaryFile() as captured:
        if settings.json:
            output = captured.fileno()
        else:
            try:
                output = sys.stderr.fileno()
            except (AttributeError, OSError, ValueError):   # stderr is not a file (in-process)
                output = None
        status = lowwater.run(*hook, output=output)
        if settings.json:
            captured.seek(0)
            click.echo(json.dumps({"low_water_hook": {
                "command": command, "exit_status": status,
                "output": captured.read().decode(errors="replace")}}), err=True)
    if status is None:
        warn(f"the low-water hook ran past its timeout of {timeout:g} s and was stopped")
    elif status:
        warn(f"the low-water hook exited {status}")


def naming_pool(settings, write):
    """write(); a pool-full error names the pool (a write that found it full
    has waited for its low-water hook and was tried once more already)."""
    try:
        return write()
    except errors.NoSpaceError as e:
        raise _naming_pool(settings, e) from None


def _naming_pool(settings, exc):
    return type(exc)(f"pool {settings.pool_path}: {exc}", exc.errno)


@contextlib.contextmanager
def progress_bar(description):
    """A rich progress bar on stderr when stderr is a terminal, as a
    progress(done_bytes, total_bytes) callable; None otherwise."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                               TimeRemainingColumn, TransferSpeedColumn)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done, total):
            bar.update(task, completed=done, total=total)
        yield update


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value, param.human_readable_name if param else "size")
        except errors.InvalidArgumentError as e:
            self.fail(str(e), param, ctx)


SIZE = SizeType()


MINUS = "\u2212"   # what SignedSizeCommand turns the "-" of "-10M" into


class ResizeType(SizeType):
    """A new size, or a change of size: "+10M", "-10M"; as (sign, bytes),
    sign 0 for a new size."""
    name = "[+|-]size"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        text = str(value).strip()
        sign = {"+": 1, "-": -1, MINUS: -1}.get(text[:1], 0)
        return sign, super().convert(text[1:] if sign else text, param, ctx)


RESIZE = ResizeType()


class SignedSizeCommand(click.Command):
    """A command with a RESIZE argument: "-10M" is a size, not an option
    (no option starts with a digit)."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, [MINUS + a[1:] if a[:1] == "-" and a[1:2].isdigit()
                                        else a for a in args])


def device_size(n, what="size"):
    """A size (or a change of size, negative to shrink) the user typed for a
    device, rounded up to whole 4 KiB pages, with a note, as lvcreate rounds
    up to whole extents; so a device's new size is always rounded up."""
    rounded = round_up(n, PAGE)
    if rounded != n:
        human = ("-" if rounded < 0 else "") + format_size(abs(rounded))
        note(f"rounding the {what} {n} up to {rounded} bytes ({human}): a device is a whole "
             "number of 4 KiB pages")
    return rounded


def check_range(doing, name, offset, length, size, more=False):
    """Refuse a range that does not lie inside the device, before anything
    is read or written (one rule for `read` and `write`); more: the data is
    longer than length, how much is not known."""
    if offset + length <= size and not more:
        return
    done = "read" if doing == "read" else "written"
    what = (f"at offset {offset} ({format_size(offset)})" if offset > size else
            f"{'more than ' if more else ''}{length} bytes ({format_size(length)}) at offset "
            f"{offset} ({format_size(offset)})")
    raise errors.InvalidArgumentError(
        f"cannot {doing} {what}: device {name!r} is {size} bytes ({format_size(size)}); "
        f"nothing was {done}")


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


__all__ = ["RESIZE", "SIZE", "Settings", "SignedSizeCommand", "check_range", "device_size", "emit", "exit_code", "format_size",
           "naming_pool", "note", "pass_settings", "progress_bar", "report_error", "table", "warn",
           "with_pool",
           "EXIT_CHECK_FAILED"]
