"""cowblock daemon [run in the foreground] | stop | status"""
import os
import signal
import time

import click

from ... import errors
from ...control import client
from ...runtime import RuntimeDir, process_alive
from ..common import emit, note, table


@click.group("daemon", invoke_without_command=True)
@click.option("--grace", type=click.FloatRange(0), default=None,
              help="exit once nothing has been attached for this many seconds (default: "
                   "run until stopped)")
@click.option("--commit-interval", type=click.FloatRange(0), default=1.0, show_default=True,
              metavar="SECONDS",
              help="commit what was written at least this often; 0: only when a client "
                   "flushes (NBD FLUSH, fsync) and at stop, as nbdkit's file plugin syncs")
@click.pass_context
def command(ctx, grace, commit_interval):
    """Run the pool's daemon in the foreground (logging to stderr), or stop
    it, or show what it holds.  The daemon owns the pool and everything
    attached to it: NBD listeners (`cowblock serve`), mounts (`cowblock
    mount`), containerd's snapshotter (`cowblock snapshotter`).  Commands that need a daemon start one on demand, which exits
    5 s after its last attachment goes.

    \b
    Example:
      cowblock daemon &
      cowblock daemon status
      cowblock daemon stop
    """
    if ctx.invoked_subcommand is not None:
        return
    from ...daemon import run, stderr_log
    settings = ctx.obj
    code = run(settings.pool_path, auto_exit=grace is not None,
               grace=grace if grace is not None else 0, log=stderr_log,
               commit_interval=commit_interval)
    ctx.exit(code)


@command.command("status")
@click.pass_obj
def status(settings):
    """What the pool's daemon holds: its pid, sockets and attachments.

    \b
    Example:
      cowblock daemon status
      cowblock --json daemon status
    """
    proxy, _ = client.daemon(settings.pool_path, start=False, on_note=note) \
        if _running(settings) else (None, False)
    if proxy is None:
        emit(settings, {"running": False}, lambda d: click.echo(
            f"no daemon holds pool {settings.pool_path}"))
        return
    with proxy:
        st = proxy.status()
    st["running"] = True

    def human(d):
        click.echo(f"daemon {d['pid']} holds {d['pool']} (control protocol {d['version']}"
                   + (f", exits {d['grace']:g} s after its last attachment" if d["auto_exit"]
                      else "")
                   + (f", commits every {d['commit_interval']:g} s" if d["commit_interval"]
                      else ", commits only on flush") + ")")
        click.echo(f"runtime directory {d['runtime_dir']}; log {d['log']}")
        rows = []
        for a in d["attachments"]:
            if a["kind"] == "listener":
                exports = ", ".join(a["exports"]) if isinstance(a["exports"], list) else "all"
                rows.append(["listener", a["id"], exports, a["address"],
                             f"{len(a['connections'])} clients"
                             + (", read-only" if a["read_only"] else "")])
            elif a["kind"] == "snapshotter":
                rows.append(["snapshotter", a["id"], "-", a["address"],
                             f"{a['snapshots']} containerd snapshots"])
            else:
                rows.append(["mount", a["id"], a["device"], a["dir"],
                             a["loop"] + (", read-only" if a["read_only"] else "")])
        if rows:
            table(rows, ["KIND", "ID", "DEVICE", "WHERE", "DETAIL"])
        else:
            click.echo("nothing attached")
    emit(settings, st, human)


def _running(settings):
    try:
        rt = RuntimeDir(settings.pool_path)
    except errors.PoolNotFoundError:
        raise
    return os.path.exists(rt.control)


@command.command("stop")
@click.option("--force", is_flag=True,
              help="detach mounts and cut NBD clients off; kill a daemon that does not answer")
@click.pass_obj
def stop(settings, force):
    """Stop the pool's daemon: commit, detach everything, remove its
    sockets.  Refused while devices are mounted or NBD clients connected,
    unless --force (which says what it broke).  A daemon that does not
    answer (hung, or stopped with SIGSTOP) is killed with --force, and what
    it left is cleaned up.

    \b
    Example:
      cowblock daemon stop
      cowblock daemon stop --force
    """
    rt = RuntimeDir(settings.pool_path)
    if not os.path.exists(rt.control) and rt.pid() is None:
        emit(settings, {"stopped": False, "running": False},
             lambda d: click.echo(f"no daemon holds pool {settings.pool_path}"))
        return
    try:
        proxy, _ = client.daemon(settings.pool_path, start=False, on_note=note)
        with proxy:
            proxy._client.timeout = 10.0 if force else client.CALL_TIMEOUT
            result = proxy.stop(force=force)
    except errors.DaemonError as e:
        if not force:
            raise
        result = _kill(rt, str(e))
    emit(settings, result, lambda d: click.echo(
        "\n".join(["stopped the pool daemon"] + [f"  {line}" for line in d["detached"]])))


def _kill(rt, why):
    """End a daemon that does not answer: SIGKILL, then clean up after it."""
    pid = rt.pid()
    detached = [f"the daemon did not answer ({why})"]
    if pid:
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
        for _ in range(200):
            if not process_alive(pid):
                break
            time.sleep(0.05)
        detached.append(f"killed it (pid {pid})")
    target = client.connect(rt.pool_path, timeout=30, on_note=lambda t: detached.append(t))
    target.close()
    return {"stopped": True, "detached": detached}
