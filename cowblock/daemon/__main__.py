"""`python -m cowblock.daemon --pool PATH [--auto] [--grace S] [--ready-fd N]`:
the detached entry point that commands use to start a pool's daemon.

With --ready-fd the daemon reports on that inherited pipe, as one JSON line,
either {"ok": true, "pid": ..., "notes": [...]} once it accepts calls or the
error that kept it from starting; its stdout and stderr then go to its log
in the runtime directory.  `cowblock daemon` is the same in the foreground.
"""
import argparse
import os
import sys

from . import DEFAULT_COMMIT_INTERVAL, DEFAULT_GRACE, run, stderr_log
from ..runtime import RuntimeDir

LOG_LIMIT = 1 << 20   # a log over this is started afresh


def _redirect_to_log(pool):
    rt = RuntimeDir(pool)
    rt.make()
    if os.path.exists(rt.log) and os.path.getsize(rt.log) > LOG_LIMIT:
        os.replace(rt.log, rt.log + ".1")
    fd = os.open(rt.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m cowblock.daemon")
    p.add_argument("--pool", required=True)
    p.add_argument("--auto", action="store_true", help="exit once nothing is attached")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE)
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--commit-interval", type=float, default=DEFAULT_COMMIT_INTERVAL)
    a = p.parse_args(argv)
    if a.ready_fd is not None:
        try:
            _redirect_to_log(a.pool)
        except Exception:
            pass   # run() reports what is wrong with the pool on the pipe
    return run(a.pool, auto_exit=a.auto, grace=a.grace, ready_fd=a.ready_fd, log=stderr_log,
               commit_interval=a.commit_interval)


if __name__ == "__main__":
    sys.exit(main())
