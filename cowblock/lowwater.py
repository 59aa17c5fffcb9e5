"""The low-water event and its hook, as dm-thin's low-water mark and
no_space_timeout.

The rule, the same over NBD, FUSE device files, the control socket and a
CLI command that holds the pool itself:
  - when free data or metadata space falls under its low-water mark (a
    downward crossing) the pool's hook runs, once; the event is armed again
    only when free space is back above the marks;
  - a write that finds the pool full (ENOSPC) while the hook runs, or after
    it ran for this crossing, waits for it to end, up to the hook timeout
    (health setting hook_timeout, default 60 s, counted from the hook's
    start), and is then tried once more; only that failure reaches the
    writer.  After the timeout (or once the hook has ended) full writes fail
    at once, as a dm-thin pool does after no_space_timeout.

Whether the event fired for the present crossing is kept in the pool's
configuration ("low_water": {"fired": true}) and committed with it, so the
processes that hold the pool in turn (the daemon, CLI commands) agree on it:
a crossing fires once, not once per command.

Who runs the hook depends on who holds the pool:
  Watcher    a long-lived holder (the pool daemon): checks free space twice
             a second and after each full write, runs the hook in the
             background with its output in the holder's log, and is the
             pool's space_wait (Pool.space_wait: what Device.pwrite and the
             NBD and FUSE loops in C call on ENOSPC).
  due/run    a short-lived holder (a CLI command): the hook opens the pool to
             grow it, so the caller runs it with the pool closed
             (Pool.released), to its end or its timeout (then it is killed),
             its output on the command's stderr, before the command returns.
"""
import os
import signal
import subprocess
import threading
import time

from . import errors, health

CONFIG_KEY = "low_water"
POLL_INTERVAL = 0.5     # seconds between the watcher's looks at free space
STOP_GRACE = 5.0        # seconds a hook gets after SIGTERM (daemon stop, CLI timeout)


def _fired(pool):
    state = pool.config.get(CONFIG_KEY)
    return isinstance(state, dict) and state.get("fired") is True


def _set_fired(pool, fired):
    pool.update_config(CONFIG_KEY, {"fired": fired})


def due(pool):
    """Move a writable pool's event on.  Returns (hook, timeout, environment)
    when the hook is due now (the event is then marked fired: the caller
    must run it), else None; above the marks the event is armed again."""
    cfg = health.settings(pool)
    data_free, meta_free = health.free_pct(pool.stats())
    below, fired = health.below_low_water(data_free, meta_free, cfg), _fired(pool)
    if not below:
        if fired:
            _set_fired(pool, False)
        return None
    if fired or not cfg["hook"]:
        return None
    _set_fired(pool, True)
    env = dict(os.environ, COWBLOCK_POOL=os.path.abspath(pool.path),
               COWBLOCK_DATA_FREE_PCT=f"{data_free:.1f}",
               COWBLOCK_METADATA_FREE_PCT=f"{meta_free:.1f}")
    return cfg["hook"], cfg["hook_timeout"], env


def _start(hook, env, **kw):
    # Its own session: a timeout or a daemon stop ends the hook's children too.
    return subprocess.Popen(hook, shell=True, env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True, **kw)


def _end(proc):
    """SIGTERM the hook's process group, SIGKILL it after STOP_GRACE."""
    for sig, wait in ((signal.SIGTERM, STOP_GRACE), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue


def run(hook, timeout, env, output):
    """Run a due hook to its end, its stdout and stderr into output (a file
    descriptor, None: inherited; a CLI command gives its stderr, so its
    stdout stays its own); returns its exit status, or None when it ran past
    timeout and was stopped."""
    proc = _start(hook, env, stdout=output, stderr=output)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _end(proc)
        return None
    except BaseException:
        _end(proc)
        raise


class Watcher:
    """The low-water event of a pool held by a long-lived process."""

    def __init__(self, pool, log=None):
        self.pool = pool
        self.log = log or (lambda msg: None)
        self._cond = threading.Condition()
        self._proc = None          # the hook's process while it runs
        self._deadline = 0.0       # when writes stop waiting for it (monotonic)
        self._said_late = False
        self._stop = threading.Event()
        self._thread = None
        # Checks that writers asked the watcher's thread for, and the last one
        # it began after being asked: a hook is started only from that thread
        # (or the caller of check), never from an NBD or FUSE thread of C,
        # whose blocked signals it would inherit (SIGTERM could not end it).
        self._wake = threading.Event()
        self._asked = self._served = 0

    def start(self):
        self.pool.space_wait = self.wait_for_space
        self._thread = threading.Thread(target=self._poll, daemon=True, name="cowblock-lowwater")
        self._thread.start()
        return self

    def stop(self):
        """Stop watching; a hook still running is ended (its process group)."""
        self._stop.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()   # writes waiting for the hook fail now
        if self.pool.space_wait == self.wait_for_space:
            self.pool.space_wait = None
        if self._thread:
            self._thread.join()
        with self._cond:
            proc = self._proc
        if proc is not None:
            self.log(f"low-water hook (pid {proc.pid}) still running at stop: ending it")
            _end(proc)

    def _poll(self):
        while not self._stop.is_set():
            self._wake.wait(POLL_INTERVAL)
            self._wake.clear()
            with self._cond:
                asked = self._asked
            try:
                self.check()
            except errors.PoolClosedError:
                return
            except errors.CowblockError as e:
                self.log(f"low-water check: {e}")
            finally:
                with self._cond:
                    self._served = asked
                    self._cond.notify_all()

    def check(self):
        """Fire the hook on a downward crossing, re-arm above the marks
        (from a thread with the ordinary signal mask: the hook inherits it)."""
        with self._cond:
            if self._proc is not None or self._stop.is_set() or self.pool.read_only:
                return
            hook = due(self.pool)
            if hook is None:
                return
            command, timeout, env = hook
            self._proc = _start(command, env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
            self._deadline = time.monotonic() + timeout
            self._said_late = False
            self.log(f"low-water hook (pid {self._proc.pid}) started: "
                     f"{env['COWBLOCK_DATA_FREE_PCT']}% data and "
                     f"{env['COWBLOCK_METADATA_FREE_PCT']}% metadata free: {command}")
            threading.Thread(target=self._relay, args=(self._proc,), daemon=True,
                             name="cowblock-hook-output").start()
            threading.Thread(target=self._follow, args=(self._proc,), daemon=True,
                             name="cowblock-hook").start()

    def _relay(self, proc):
        # Till EOF: that may come after the hook's exit, from a child it left.
        with proc.stdout:
            for line in proc.stdout:
                self.log(f"low-water hook: {line.decode(errors='replace').rstrip()}")

    def _follow(self, proc):
        status = proc.wait()
        self.log(f"low-water hook (pid {proc.pid}) exited {status}")
        with self._cond:
            self._proc = None
            self._cond.notify_all()
        try:
            self.check()     # grown above the marks: armed again
        except errors.CowblockError:
            pass

    def wait_for_space(self):
        """Called by a write that found the pool full: fire the hook if it is
        due, wait while it runs (up to its timeout).  The writer then tries
        once more."""
        with self._cond:
            self._asked += 1
            mine = self._asked
            self._wake.set()
            while (self._served < mine and not self._stop.is_set()  # a check begun after this
                   and self._thread.is_alive()):
                self._cond.wait(POLL_INTERVAL)
            while self._proc is not None and not self._stop.is_set():
                left = self._deadline - time.monotonic()
                if left <= 0:
                    if not self._said_late:
                        self._said_late = True
                        self.log(f"low-water hook (pid {self._proc.pid}) still running after "
                                 "its timeout: writes into the full pool fail with ENOSPC")
                    return
                self._cond.wait(left)
