"""The `cowblock` command: a thin layer over the library.

Each subcommand lives in cowblock/cli/commands/<name>.py: it parses its
arguments, calls one library function and reports (as a table, or JSON with
--json).  Errors become exit codes by exception class (common.EXIT_CODES).
"""
import importlib
import sys

import click

from .. import errors
from .common import Settings, exit_code

COMMANDS = ["pool", "create", "snapshot", "rm", "rename", "resize", "set", "rollback", "ls",
            "info", "diff", "read", "write", "import", "export", "image", "container", "serve", "mount", "umount", "daemon", "bench"]


class LazyGroup(click.Group):
    """Loads a subcommand's module only when it runs (fast --help and startup)."""

    def list_commands(self, ctx):
        return COMMANDS

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"cowblock.cli.commands.{name.replace('-', '_')}_cmd")
        return module.command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"],
                                              "max_content_width": 100})
@click.option("--pool", "pool", metavar="PATH", default=None,
              help="pool directory (default: $COWBLOCK_POOL, else "
                   "$XDG_DATA_HOME/cowblock/pool, made on first use)")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--timeout", type=float, default=30.0, show_default=True,
              help="seconds to wait for another command that holds the pool")
@click.version_option(package_name="cowblock")
@click.pass_context
def cli(ctx, pool, as_json, timeout):
    """cowblock: thin pools, copy-on-write devices and snapshots.

    \b
    Example:
      cowblock create base --size 10G
      cowblock snapshot base snap1 --read-only
      cowblock ls
    """
    ctx.obj = Settings(pool, as_json, timeout)


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="cowblock", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("cowblock: aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except errors.CowblockError as e:
        click.echo(f"cowblock: error: {e}", err=True)
        if e.hint:
            click.echo(f"cowblock: hint: {e.hint}", err=True)
        sys.exit(exit_code(e))
    except BrokenPipeError:
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(0)
