import os
import signal
import sys
import time

import click

from ...daemon import ControlServer
from ...nbd.server import NBDServer
from ...nbd.tls import MODES, TLSConfig
from ..common import with_pool


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
              help="Unix socket to listen on (default: nbd.sock in the pool directory); 0600")
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
@click.option("--max-connections", type=int, default=16, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=min(os.cpu_count() or 2, 16),
              show_default="the number of CPUs", help="threads serving each connection's requests")
@click.option("--on-full", default="error", show_default=True, metavar="error|wait=SECONDS",
              help="when the pool is full: fail writes with ENOSPC, or hold them while it is grown")
@click.option("--pidfile", type=click.Path(dir_okay=False), help="write the server's pid here once ready")
@with_pool()
def command(settings, pool, names, socket_path, listen, insecure, tls_mode, tls_psk,
            tls_certificates, tls_verify_peer, read_only, max_connections, workers, on_full,
            pidfile):
    """Export devices over NBD (all of them, or the NAMEs) for qemu, libnbd
    (nbdinfo, nbdcopy, nbdfuse), fio and nbd-client.  Runs in the foreground;
    SIGINT or SIGTERM stop it cleanly after committing.  While it runs it is
    the pool's daemon: other cowblock commands reach the pool through its
    control socket (control.sock in the pool directory), and removing,
    renaming or shrinking an exported device fails with EBUSY.

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
    tls = TLSConfig(tls_mode, psk_file=tls_psk, certificates=tls_certificates,
                    verify_peer=tls_verify_peer)
    server = NBDServer(pool, names, socket_path=socket_path or os.path.join(pool.path, "nbd.sock"),
                       listen=listen, insecure=insecure, tls=tls, read_only=read_only,
                       max_connections=max_connections, workers=workers,
                       on_full_wait=_on_full(on_full), log=log)
    address = server.start()
    control = ControlServer(pool, server.busy_devices, log)
    control.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server._stop.set())
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    log(f"serving {', '.join(server.catalog.names()) or 'no devices'} on {address}")
    try:
        server.serve_forever()
    finally:
        control.stop()
        server.stop()
        if pidfile and os.path.exists(pidfile):
            os.unlink(pidfile)
        log("stopped; pool committed")
    sys.stdout.flush()
