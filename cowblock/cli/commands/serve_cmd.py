import os
import signal
import sys
import threading
import time

import click

from ... import errors
from ...control import client
from ...nbd.tls import MODES
from ..common import emit


def _on_full(text):
    if text == "error":
        return 0.0
    if text.startswith("wait="):
        try:
            return float(text[5:])
        except ValueError:
            pass
    raise click.BadParameter(f"{text!r}: use 'error' or 'wait=SECONDS'", param_hint="--on-full")


@click.command("serve")
@click.argument("names", nargs=-1)
@click.option("--socket", "socket_path", metavar="PATH",
              help="Unix socket to listen on (default: nbd.sock in the daemon's runtime "
                   "directory); 0600")
@click.option("--listen", metavar="HOST:PORT",
              help="listen on TCP instead; other than loopback only with --tls=require that "
                   "authenticates clients (--tls-psk, or --tls-verify-peer), or --insecure")
@click.option("--insecure", is_flag=True, help="allow --listen on a non-loopback address "
                                               "without TLS that authenticates clients")
@click.option("--tls", "tls_mode", type=click.Choice(MODES), show_default="on with credentials",
              help="NBD_OPT_STARTTLS: refused, offered, or required before any other option")
@click.option("--tls-psk", metavar="FILE", help="pre-shared keys, USERNAME:HEXKEY lines "
                                                "(psktool -u USERNAME -p FILE)")
@click.option("--tls-certificates", metavar="DIR",
              help="X.509: ca-cert.pem, server-cert.pem, server-key.pem [, ca-crl.pem]")
@click.option("--tls-verify-peer", is_flag=True,
              help="clients must show a certificate that ca-cert.pem signed")
@click.option("--read-only", is_flag=True, help="export every device read-only")
@click.option("--shared", is_flag=True,
              help="allow read-write use of devices that are mounted or exported elsewhere "
                   "with --shared too (cluster filesystems)")
@click.option("--max-connections", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=None,
              help="threads taking turns at each connection, each running the request it "
                   "read  [default: 16, as many as a client keeps in flight]")
@click.option("--on-full", default="error", show_default=True, metavar="error|wait=SECONDS",
              help="when the pool is full: fail writes with ENOSPC, or hold them while it is grown")
@click.option("--detach", is_flag=True,
              help="leave the listener to the daemon and return (`cowblock daemon status` "
                   "lists it, `cowblock daemon stop` ends it)")
@click.option("--pidfile", type=click.Path(dir_okay=False),
              help="write this command's pid here once it serves")
@click.pass_obj
def command(settings, names, socket_path, listen, insecure, tls_mode, tls_psk, tls_certificates,
            tls_verify_peer, read_only, shared, max_connections, workers, on_full, detach,
            pidfile):
    """Export devices over NBD (all of them, or the NAMEs) for qemu, libnbd
    (nbdinfo, nbdcopy, nbdfuse), fio and nbd-client.  The pool's daemon
    serves them (it is started if none runs); this command stays in the
    foreground printing its clients' connections until SIGINT or SIGTERM,
    which remove its listener (and stop the daemon if this command started
    it and nothing else is attached).  Other listeners and mounts of the
    pool are not disturbed.  Removing, renaming or shrinking a device
    while an NBD client uses it fails with EBUSY.

    \b
    Example:
      cowblock serve --socket /tmp/cb.sock base &
      nbdinfo 'nbd+unix:///base?socket=/tmp/cb.sock'
      qemu-img info 'nbd+unix:///base?socket=/tmp/cb.sock'
      psktool -u alice -p keys.psk
      cowblock serve --listen 0.0.0.0:10809 --tls=require --tls-psk keys.psk &
      nbdinfo 'nbds://alice@HOST/base?tls-psk-file=keys.psk'
    """
    if socket_path and listen:
        raise click.UsageError("give --socket or --listen, not both")

    def log(msg):
        click.echo(f"{time.strftime('%H:%M:%S')} {msg}", err=True)
    proxy, started = settings.daemon()
    with proxy:
        listener = proxy.serve(list(names), socket=os.path.abspath(socket_path) if socket_path
                               else None, listen=listen, insecure=insecure, read_only=read_only,
                               shared=shared, max_connections=max_connections, workers=workers,
                               on_full_wait=_on_full(on_full), owned=not detach,
                               tls={"mode": tls_mode,
                                    "psk_file": tls_psk and os.path.abspath(tls_psk),
                                    "certificates": tls_certificates
                                    and os.path.abspath(tls_certificates),
                                    "verify_peer": tls_verify_peer})
        exports = ", ".join(listener["exports"]) if isinstance(listener["exports"], list) \
            else "every device"
        if detach:
            emit(settings, listener, lambda d: click.echo(
                f"serving {exports} on {d['address']} (listener {d['id']} of daemon "
                f"{proxy.runtime.pid()})"))
            return
        log(f"serving {exports} on {listener['address']}"
            + (" read-only" if read_only else ""))
        if pidfile:
            with open(pidfile, "w") as f:
                f.write(f"{os.getpid()}\n")
        lost = _follow(proxy, listener["id"], log)
        if pidfile and os.path.exists(pidfile):
            os.unlink(pidfile)
        if lost:
            log("the pool daemon stopped or removed this listener")
            sys.exit(14)
        if started:
            try:
                proxy.stop(if_idle=True)
            except errors.DaemonError:
                pass   # the daemon went away meanwhile: nothing is left to stop
        log("stopped; pool committed")


def _follow(proxy, listener_id, log):
    """Print the listener's log until it ends.  SIGINT/SIGTERM remove the
    listener (its clients finish, their last lines are printed) and this
    returns False; True when the daemon ended it."""
    asked = threading.Event()

    def unserve():
        try:
            proxy.unserve(listener_id)
        except errors.CowblockError:
            pass

    def on_signal(signum, frame):
        if asked.is_set():
            raise KeyboardInterrupt   # a second signal ends this command at once
        asked.set()
        threading.Thread(target=unserve, daemon=True).start()
    watcher = client.Client(proxy.runtime, timeout=None)
    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for event in watcher.events("watch", listener_id):
            log(event)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        watcher.close()
    return not asked.is_set()
