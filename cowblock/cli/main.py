"""The `cowblock` command: a thin layer over the library.

Each subcommand lives in cowblock/cli/commands/<name>.py: it parses its
arguments, calls one library function and reports (as a table, or JSON with
--json).  Errors become exit codes by exception class (common.EXIT_CODES).
The global options (--pool, --json, --timeout) are options of every
command too, so they work before or after it (`cowblock ls --json`).
"""
import importlib
import os
import sys

import click

from .. import errors
from .common import Settings, report_error

COMMANDS = ["pool", "create", "snapshot", "rm", "rename", "resize", "set", "rollback", "ls",
            "info", "diff", "read", "write", "import", "export", "image", "container", "serve", "mount", "umount", "snapshotter",
            "daemon", "bench"]

POOL_HELP = ("pool directory, or rados:CEPHPOOL/NAME for a pool on Ceph (default: $COWBLOCK_POOL, "
             "else $XDG_DATA_HOME/cowblock/pool, made on first use)")
CEPH_CONF_HELP = "the Ceph cluster of a rados: pool (default: $CEPH_CONF, else Ceph's own search)"
JSON_HELP = "machine-readable output (errors too, as JSON lines on stderr)"
TIMEOUT_HELP = "seconds to wait for another command that holds the pool [default: 30]"


def _setter(attr):
    def store(ctx, param, value):
        if value is not None and value is not False:
            setattr(ctx.ensure_object(Settings), attr, value)
    return store


def _ceph_conf(ctx, param, value):
    # An environment variable, so that a daemon this command starts uses it too.
    if value:
        os.environ["CEPH_CONF"] = os.path.abspath(value)


def _global_options():
    return [click.Option(["--pool"], metavar="PATH", expose_value=False,
                         callback=_setter("pool_arg"), help=POOL_HELP),
            click.Option(["--json"], is_flag=True, default=False, expose_value=False,
                         callback=_setter("json"), help=JSON_HELP),
            click.Option(["--timeout"], type=float, expose_value=False,
                         callback=_setter("timeout"), help=TIMEOUT_HELP),
            click.Option(["--ceph-conf"], metavar="FILE", expose_value=False, callback=_ceph_conf,
                         is_eager=True, help=CEPH_CONF_HELP)]


def with_global_options(cmd):
    """Give a command (and, for a group, each of its subcommands) the global
    options, once."""
    if not getattr(cmd, "_cowblock_globals", False):
        cmd.params.extend(_global_options())
        cmd._cowblock_globals = True
    for sub in getattr(cmd, "commands", {}).values():
        with_global_options(sub)
    return cmd


class LazyGroup(click.Group):
    """Loads a subcommand's module only when it runs (fast --help and startup)."""

    def list_commands(self, ctx):
        return COMMANDS

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"cowblock.cli.commands.{name.replace('-', '_')}_cmd")
        return with_global_options(module.command)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"],
                                              "max_content_width": 100})
@click.version_option(package_name="cowblock")
def cli():
    """cowblock: thin pools, copy-on-write devices and snapshots.

    \b
    Example:
      cowblock create base --size 10G
      cowblock snapshot base snap1 --read-only
      cowblock ls --json
    """


with_global_options(cli)


def main(argv=None):
    settings = Settings()
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        cli.main(args=args, prog_name="cowblock", standalone_mode=False, obj=settings)
    except click.exceptions.Abort:
        report_error(settings, "aborted", code=130)
    except click.ClickException as e:
        # a usage error may come before --json is parsed: look for it too
        settings.json = settings.json or "--json" in args[:args.index("--")
                                                        if "--" in args else len(args)]
        report_error(settings, e)
    except errors.CowblockError as e:
        report_error(settings, e)
    except BrokenPipeError:
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)
