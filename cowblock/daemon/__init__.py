"""The pool daemon: one process per pool that owns the pool and everything
attached to it.

It holds the pool lock (it is the pool's one writer), the control socket in
the pool's runtime directory (cowblock.runtime), and a table of
attachments:

  listener   an NBD server on a Unix socket or TCP address, exporting some
             devices or all; owned by the control session that asked for it
             (a foreground `cowblock serve`: it goes when that connection
             closes) or by the daemon
  mount      a device's filesystem on a directory: a device file (attach
             path), a loop device over it, the mount; owned by the daemon
  snapshotter  containerd's Snapshots gRPC service on a Unix socket
             (cowblock.containerd), serving device files; owned by the daemon

It also watches the pool's low-water marks (cowblock.lowwater.Watcher): the
hook runs here, once per crossing, its output in the daemon's log and in the
log of every listener (a foreground `cowblock serve` prints it), and writes
into the full pool from NBD, device files or control calls wait for it.

Who may use a device at once (the rule every attachment is checked by, where
the use begins: a mount, an NBD client entering transmission): two uses
conflict when either writes, unless both were asked for with --shared
(cluster filesystems) or both are connections of one NBD listener (one
client's multi-conn).  Read-only uses never conflict.  While a device is in
use, calls that would pull it from under its users (delete, rename,
rollback, shrink, set read-only) fail with EBUSY naming the use.

Life: `cowblock daemon` runs one in the foreground; any command that needs
one (serve, mount) starts one detached (python -m cowblock.daemon --auto),
which exits once nothing is attached and no client is connected for `grace`
seconds.  Stopping: close the control socket, stop the listeners (each
finishes its clients' requests), unmount, commit and close the pool
(releasing its lock), remove the runtime directory.  A daemon that dies
leaves its mounts to the next command that takes the pool lock, which
cleans them up (daemon.leftovers) and says so.
"""
import contextlib
import itertools
import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from .. import errors
from .. import lowwater
from ..attach import blockdev
from ..control import protocol as P
from ..control.server import ControlServer
from ..nbd.server import NBDServer
from ..pool import Pool
from ..runtime import RuntimeDir
from . import leftovers

DEFAULT_GRACE = 5.0
DEFAULT_COMMIT_INTERVAL = 1.0   # a timed commit at least this often (0: only on flush/stop)
EVENTS_KEPT = 1000    # log lines a listener keeps for a watcher that comes later
STREAMED = P.STREAMED


@dataclass
class Use:
    """One use of a device: what it is, whether it writes, who owns it."""
    what: str
    writes: bool
    shared: bool
    owner: tuple


@dataclass
class Listener:
    id: int
    server: NBDServer
    names: list
    read_only: bool
    shared: bool
    session: Optional[int]          # the control session that owns it; None: the daemon
    mount: Optional[int] = None     # the mount whose device file it serves (internal)
    thread: Optional[threading.Thread] = None
    events: list = field(default_factory=list)   # its log lines, the last EVENTS_KEPT
    seen: int = 0                   # how many were ever logged
    ended: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    def add_event(self, msg):
        with self.changed:
            self.events.append(msg)
            del self.events[:-EVENTS_KEPT]
            self.seen += 1
            self.changed.notify_all()

    def end(self):
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    @property
    def address(self):
        a = self.server.address
        return a if isinstance(a, str) else f"{a[0]}:{a[1]}"

    def describe(self):
        conns = self.server.connections()
        return {"id": self.id, "kind": "listener", "address": self.address,
                "exports": self.names or "all", "read_only": self.read_only,
                "shared": self.shared, "owner": "session" if self.session else "daemon",
                "connections": [{"device": d, "read_only": ro} for d, ro in conns]}


@dataclass
class Mount:
    id: int
    device: str
    dir: str
    read_only: bool
    shared: bool
    fstype: str = ""
    loop: str = ""
    file: str = ""
    helper: object = None           # what serves the device file (closed at umount)
    listener: Optional[Listener] = None

    def record(self):
        return {"id": self.id, "device": self.device, "dir": self.dir, "loop": self.loop,
                "file": self.file, "read_only": self.read_only, "shared": self.shared,
                "fstype": self.fstype, "helper_pid": getattr(self.helper, "pid", None)}

    def describe(self):
        return {"kind": "mount", **self.record()}


class PoolDaemon:
    def __init__(self, pool_path, *, auto_exit=False, grace=DEFAULT_GRACE, log=None,
                 commit_interval=DEFAULT_COMMIT_INTERVAL):
        self.pool_path = os.path.abspath(os.fspath(pool_path))
        self.auto_exit = auto_exit
        self.grace = grace
        self.commit_interval = commit_interval
        self._log = log or (lambda msg: None)
        self.runtime = RuntimeDir(self.pool_path)
        self.pool = None
        self.control = None
        self.started = None
        self._lock = threading.RLock()
        self._ids = itertools.count(1)
        self.listeners = {}     # id -> Listener
        self.mounts = {}        # id -> Mount
        self.snapshotters = {}  # id -> containerd.service.SnapshotterServer
        self._fuse = None       # the in-process FUSE server of device files, once started
        self._low_water = None  # the low-water hook's watcher, while the pool is held
        self._file_users = {}   # device name -> mounts using its device file
        self._work = {}         # id -> what a long call is doing (an image load)
        self._stopping = False
        self._finished = threading.Event()

    # ---- life ----
    def start(self):
        """Take the pool, clean what a dead predecessor left, listen.
        Returns notes on what was cleaned up."""
        self.pool = Pool.open(self.pool_path, timeout=0, commit_interval=self.commit_interval)
        try:
            notes = leftovers.clean(self.runtime, self.pool)
            for note in leftovers.sweep_orphans(skip={self.runtime.path}):
                self._log(note)   # about other pools: the log, not this start's notes
            self.runtime.make()
            self.runtime.write_pid()
            self._save_state()
            self._low_water = lowwater.Watcher(self.pool, log=self._hook_log).start()
            self.control = ControlServer(self.pool, daemon=self, path=self.runtime.control)
            self.control.start()
        except BaseException:
            if self._low_water:
                self._low_water.stop()
            self.pool.close()
            raise
        self.started = time.time()
        for note in notes:
            self.log(f"note: {note}")
        self.log(f"daemon {os.getpid()} holds pool {self.pool_path}; control socket "
                 f"{self.runtime.control}" + (f"; exits {self.grace:g} s after the last "
                                              "attachment" if self.auto_exit else ""))
        if self.auto_exit:
            threading.Thread(target=self._exit_when_idle, daemon=True,
                             name="cowblock-idle").start()
        return notes

    def wait(self):
        """Block until the daemon has stopped (and its last reply is sent)."""
        while not self._finished.wait(0.5):
            pass

    def log(self, msg):
        self._log(msg)

    def _hook_log(self, msg):
        """The low-water hook's lines: the daemon's log, and each listener's."""
        self.log(msg)
        with self._lock:
            listeners = [lst for lst in self.listeners.values() if lst.mount is None]
        for lst in listeners:
            lst.add_event(msg)

    def _exit_when_idle(self):
        idle_since = None
        while not self._stopping:
            time.sleep(0.2)
            with self._lock:
                busy = bool(self.listeners or self.mounts or self.snapshotters) \
                    or self.control.session_count()
            if busy:
                idle_since = None
            elif idle_since is None:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= self.grace:
                self.log(f"nothing attached for {self.grace:g} s: stopping")
                self.stop(force=True)
                self._finished.set()
                return

    def stop(self, force=False, session=None):
        """Detach everything, commit, release the pool.  Without force, refuse
        while mounts or NBD clients would be cut off.  Returns what was
        detached."""
        with self._lock:
            if self._stopping:
                return []
            if not force:
                in_use = self._in_use_attachments()
                if in_use:
                    raise errors.BusyError(
                        "the pool daemon has attachments in use: " + "; ".join(in_use)
                        + ": stop them first, or pass --force to detach them")
            self._stopping = True
        self.log("stopping")
        if self.control:
            self.control.stop(exclude=session)
        self._low_water.stop()    # writes waiting for the hook fail; a running hook is ended
        detached = []
        for snap in list(self.snapshotters.values()):
            self._remove_snapshotter(snap)
            detached.append(f"stopped the containerd snapshotter on {snap.socket_path}")
        for m in list(self.mounts.values()):
            try:
                self._umount(m, lazy=True)
                detached.append(f"unmounted {m.device} from {m.dir}")
            except errors.CowblockError as e:
                detached.append(f"could not unmount {m.device} from {m.dir}: {e}")
                self.log(detached[-1])
        for lst in list(self.listeners.values()):
            n = len(lst.server.connections())
            self._remove_listener(lst)
            detached.append(f"stopped the NBD listener on {lst.address}"
                            + (f" ({n} client{'s' if n != 1 else ''} cut off)" if n else ""))
        if self._fuse is not None:
            try:
                self._fuse.stop(force=True)
            except errors.CowblockError as e:
                self.log(f"stopping the device files: {e}")
            self._fuse = None
        self.pool.close()
        self.runtime.remove(keep_log=False)
        self.log("stopped; pool committed and released")
        return detached

    @contextlib.contextmanager
    def working(self, what):
        """A long call runs in the body: stopping without force is refused
        meanwhile, naming WHAT."""
        key = next(self._ids)
        with self._lock:
            if self._stopping:
                raise errors.DaemonError("the pool daemon is stopping")
            self._work[key] = what
        try:
            yield
        finally:
            with self._lock:
                del self._work[key]

    def _in_use_attachments(self):
        out = list(self._work.values())
        out += [f"{m.device} mounted on {m.dir}" for m in self.mounts.values()]
        for lst in self.listeners.values():
            n = len(lst.server.connections())
            if n and lst.mount is None:
                out.append(f"{n} NBD client{'s' if n != 1 else ''} on {lst.address}")
        return out

    def _save_state(self):
        self.runtime.save_state({"pid": os.getpid(),
                                 "mounts": [m.record() for m in self.mounts.values()]})

    # ---- who uses a device ----
    def _uses(self, name):
        uses = []
        for m in self.mounts.values():
            if m.device == name:
                uses.append(Use(f"mounted on {m.dir}", not m.read_only, m.shared, ("mount", m.id)))
        for lst in self.listeners.values():
            if lst.mount is not None:
                continue   # a mount's own device file: the mount is the use
            conns = [ro for d, ro in lst.server.connections() if d == name]
            if conns:
                n = len(conns)
                uses.append(Use(f"exported over NBD on {lst.address} ({n} client"
                                f"{'s' if n != 1 else ''})", not all(conns), lst.shared,
                                ("listener", lst.id)))
        return uses

    def in_use(self, name):
        """What uses device `name` now (a description), or None."""
        with self._lock:
            uses = self._uses(name)
        return uses[0].what if uses else None

    def _conflict(self, name, writes, shared, owner):
        for use in self._uses(name):
            if use.owner == owner or not (writes or use.writes) or (shared and use.shared):
                continue
            return use
        return None

    def _admit(self, listener):
        def admit(export):
            owner = ("listener", listener.id)
            with self._lock:
                use = self._conflict(export.name, not export.read_only, listener.shared, owner)
                if use:
                    raise errors.BusyError(
                        f"device {export.name!r} is {use.what}: it cannot also be used "
                        f"{'read-write' if not export.read_only else 'read-only'} over NBD "
                        "(export it read-only, or use --shared on both for a cluster "
                        "filesystem)")
            return lambda: None   # the connection's end shows in server.connections()
        return admit

    @contextlib.contextmanager
    def frozen(self, name):
        """Freeze the filesystems of device `name` mounted read-write, so a
        snapshot taken inside is clean."""
        with self._lock:
            dirs = [m.dir for m in self.mounts.values() if m.device == name and not m.read_only]
        frozen = []
        try:
            for d in dirs:
                blockdev.freeze(d)
                frozen.append(d)
            yield
        finally:
            for d in frozen:
                blockdev.thaw(d)

    # ---- listeners ----
    def add_listener(self, names=(), *, socket_path=None, listen=None, insecure=False, tls=None,
                     read_only=False, shared=False, max_connections=16, workers=None,
                     on_full_wait=0.0, session=None, mount=None):
        """tls: a nbd.tls.TLSConfig for this listener (None: no TLS)."""
        if socket_path and listen:
            raise errors.InvalidArgumentError("give a socket path or a TCP address, not both")
        if not listen:
            socket_path = os.path.abspath(socket_path or self.runtime.nbd)
            for other in self.listeners.values():
                if other.address == socket_path:
                    raise errors.BusyError(f"an NBD listener on {socket_path} exists already "
                                           f"(exporting {', '.join(other.names) or 'all'})")
        lst = Listener(next(self._ids), None, list(names or []), read_only, shared,
                       session.id if session else None, mount)
        server = NBDServer(self.pool, names, socket_path=socket_path, listen=listen,
                           insecure=insecure, tls=tls, read_only=read_only,
                           max_connections=max_connections, workers=workers,
                           on_full_wait=on_full_wait, log=lambda m: self._listener_log(lst, m),
                           admit=None if mount else self._admit(lst))
        lst.server = server
        try:
            server.start()
        except OSError as e:
            where = socket_path or listen
            raise errors.HostFileError(f"cannot listen on {where}: {e.strerror or e}",
                                       e.errno) from None
        lst.thread = threading.Thread(target=server.serve_forever, daemon=True,
                                      name=f"cowblock-nbd-{lst.id}")
        with self._lock:
            self.listeners[lst.id] = lst
        lst.thread.start()
        if session is not None:
            session.on_close.append(lambda: self._end_session_listener(lst))
        if mount is None:
            self.log(f"listener {lst.id}: serving {', '.join(lst.names) or 'every device'} "
                     f"on {lst.address}" + (" read-only" if read_only else ""))
        return lst

    def _end_session_listener(self, lst):
        if lst.id in self.listeners and not self._stopping:
            self.log(f"listener {lst.id}: its owner's connection closed")
            self._remove_listener(lst)

    def _remove_listener(self, lst):
        with self._lock:
            if self.listeners.pop(lst.id, None) is None:
                return
        lst.server.stop()          # finishes in-flight requests, commits
        if lst.thread:
            lst.thread.join(timeout=30)
        lst.end()
        if lst.mount is None:
            self.log(f"listener {lst.id} on {lst.address}: stopped")

    def _listener_log(self, lst, msg):
        if lst.mount is None:
            self.log(f"listener {lst.id}: {msg}")
            lst.add_event(msg)

    # ---- device files (the attach path) ----
    def file_server(self):
        """The in-process FUSE server of device files, started on first use;
        None where it is unavailable (mounts then use nbdfuse)."""
        from ..attach import fuse
        with self._lock:
            if self._fuse is None:
                ok, why = fuse.available()
                if os.environ.get("COWBLOCK_ATTACH") == "nbdfuse":
                    ok, why = False, "COWBLOCK_ATTACH=nbdfuse"
                if not ok:
                    if not getattr(self, "_said_no_fuse", False):
                        self.log(f"device files through nbdfuse: {why}")
                        self._said_no_fuse = True
                    return None
                self._fuse = fuse.FuseAttach(self.pool, self.runtime.dev).start()
                self.log(f"device files served on {self.runtime.dev}")
            return self._fuse

    def attach_file(self, name, read_only):
        """The device file of `name` (counted: detach_file when done)."""
        server = self.file_server()
        with self._lock:
            if self._file_users.get(name):
                self._file_users[name] += 1
                return server.path(name)
            path = server.add(name, read_only=True if read_only else None)
            self._file_users[name] = 1
            return path

    def detach_file(self, name):
        """Give back a use of the file; the last one removes it (BusyError
        while something still has it open: the use is kept)."""
        with self._lock:
            if self._file_users[name] > 1:
                self._file_users[name] -= 1
                return
            self._fuse.remove(name)
            del self._file_users[name]

    def changed(self, name):
        """Device `name` changed under its users (grown, written by a shared
        NBD client): its device file takes its new size, caches are dropped."""
        with self._lock:
            if self._fuse is not None and name in self._file_users:
                self._fuse.changed(name)

    # ---- mounts ----
    def mount(self, name, directory, *, mkfs=None, read_only=None, shared=False):
        from . import mounts
        return mounts.mount(self, name, directory, mkfs=mkfs, read_only=read_only,
                            shared=shared)

    def umount(self, directory, *, force=False):
        directory = os.path.realpath(directory)
        with self._lock:
            m = next((m for m in self.mounts.values() if m.dir == directory), None)
        if m is None:
            raise errors.InvalidArgumentError(f"{directory} is not a mount of this pool's daemon")
        self._umount(m, lazy=force)
        return m

    def _umount(self, m, lazy=False):
        from . import mounts
        mounts.undo(self, m, lazy=lazy)

    # ---- control calls (the "daemon" entries of control.calls) ----
    def call_status(self, session):
        with self._lock:
            attachments = [lst.describe() for lst in self.listeners.values() if lst.mount is None]
            attachments += [m.describe() for m in self.mounts.values()]
            attachments += [s.describe() for s in self.snapshotters.values()]
        return {"pid": os.getpid(), "version": P.VERSION, "pool": self.pool_path,
                "runtime_dir": self.runtime.path, "control_socket": self.runtime.control,
                "log": self.runtime.log, "started": self.started, "auto_exit": self.auto_exit,
                "grace": self.grace,
                "commit_interval": self.commit_interval, "calls_served": self.control.calls_served,
                "sessions": self.control.session_count(), "attachments": attachments}

    def call_stop(self, session, *, force=False, if_idle=False):
        """Stop the daemon (the reply comes once the pool is released).
        if_idle: only if nothing is attached and no other client is connected."""
        with self._lock:
            if if_idle and (self.listeners or self.mounts or self.snapshotters
                            or self.control.session_count() > 1):
                return {"stopped": False, "detached": []}
        detached = self.stop(force=force, session=session)
        if session is not None:
            session.on_close.append(self._finished.set)
        else:
            self._finished.set()
        return {"stopped": True, "detached": detached}

    def call_serve(self, session, names=(), *, socket=None, listen=None, insecure=False,
                   read_only=False, shared=False, max_connections=16, workers=None,
                   on_full_wait=0.0, owned=True, tls=None):
        """Add an NBD listener; owned: it goes when this session's connection closes.
        tls: the keywords of nbd.tls.TLSConfig (mode, psk_file, certificates,
        verify_peer), or None."""
        for name in names:
            self.pool.device(name)   # unknown names fail here
        from ..nbd.tls import TLSConfig
        if tls is not None and not isinstance(tls, dict):
            raise errors.InvalidArgumentError(f"tls {tls!r:.100} is not a dict of TLS settings")
        tls = TLSConfig(**tls) if tls else None
        lst = self.add_listener(names, socket_path=socket, listen=listen, insecure=insecure,
                                tls=tls,
                                read_only=read_only, shared=shared,
                                max_connections=max_connections, workers=workers,
                                on_full_wait=on_full_wait, session=session if owned else None)
        return lst.describe()

    def call_unserve(self, session, listener):
        with self._lock:
            lst = self.listeners.get(listener)
        if lst is None or lst.mount is not None:
            raise errors.InvalidArgumentError(f"no NBD listener {listener!r} in this daemon")
        self._remove_listener(lst)
        return {"removed": listener}

    def call_watch(self, session, listener):
        """Stream the log lines of a listener (from its first) until it or the
        connection ends."""
        with self._lock:
            lst = self.listeners.get(listener)
        if lst is None:
            raise errors.InvalidArgumentError(f"no NBD listener {listener!r} in this daemon")
        sent = 0
        try:
            while True:
                with lst.changed:
                    lst.changed.wait_for(lambda: lst.seen > sent or lst.ended or self._stopping,
                                         timeout=0.2)
                    new = lst.events[len(lst.events) - (lst.seen - sent):] if lst.seen > sent \
                        else []
                    sent, ended = lst.seen, lst.ended or self._stopping
                for msg in new:
                    session.send({"event": msg})
                if ended:
                    return STREAMED
                readable, _, _ = select.select([session.conn], [], [], 0)
                if readable and not session.conn.recv(1):
                    return STREAMED     # the client closed its end
        except OSError:
            return STREAMED

    def call_mount(self, session, name, directory, *, mkfs=None, read_only=None, shared=False):
        return self.mount(name, directory, mkfs=mkfs, read_only=read_only,
                          shared=shared).describe()

    def call_umount(self, session, directory, *, force=False):
        return self.umount(directory, force=force).describe()

    def call_snapshotter(self, session, *, socket=None, default_size=None):
        """Start containerd's Snapshots service on a Unix socket (default: the
        runtime directory's containerd.sock); it runs until the daemon stops
        or unsnapshotter is called."""
        from ..containerd import service, store
        socket_path = os.path.abspath(socket or os.path.join(self.runtime.path,
                                                             "containerd.sock"))
        with self._lock:
            if self._stopping:
                raise errors.DaemonError("the pool daemon is stopping")
            for other in self.snapshotters.values():   # one: they would share the records
                raise errors.BusyError(f"a containerd snapshotter runs in this daemon "
                                       f"already, on {other.socket_path}")
            snapshots = store.Snapshots(self, **({"default_size": default_size}
                                                 if default_size is not None else {}))
            snap = service.SnapshotterServer(snapshots, socket_path, next(self._ids), self.log)
            snap.start()
            self.snapshotters[snap.id] = snap
        threading.Thread(target=snapshots.warm, args=(self.log,), daemon=True,
                         name="cowblock-ctrd-template").start()
        self.log(f"snapshotter {snap.id}: containerd's Snapshots service on {socket_path}")
        return snap.describe()

    def call_unsnapshotter(self, session, snapshotter):
        with self._lock:
            snap = self.snapshotters.get(snapshotter)
        if snap is None:
            raise errors.InvalidArgumentError(f"no snapshotter {snapshotter!r} in this daemon")
        self._remove_snapshotter(snap)
        return {"removed": snapshotter}

    def _remove_snapshotter(self, snap):
        with self._lock:
            if self.snapshotters.pop(snap.id, None) is None:
                return
        snap.stop()
        self.log(f"snapshotter {snap.id} on {snap.socket_path}: stopped")


# ---- running one ----

def run(pool_path, *, auto_exit=False, grace=DEFAULT_GRACE, ready_fd=None, log=None,
        commit_interval=DEFAULT_COMMIT_INTERVAL):
    """Run a daemon until it is stopped (by a control call, SIGTERM or
    SIGINT, or idleness with auto_exit).  ready_fd: report readiness (or
    the error that prevented it) there as one JSON line, then close it."""
    d = PoolDaemon(pool_path, auto_exit=auto_exit, grace=grace, log=log,
                   commit_interval=commit_interval)
    try:
        notes = d.start()
    except Exception as e:
        if ready_fd is None:
            raise
        _report(ready_fd, P.error_reply(e))
        return 1

    def on_signal(signum, frame):
        threading.Thread(target=_stop_on_signal, args=(d, signum), daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if ready_fd is not None:
        _report(ready_fd, {"ok": True, "pid": os.getpid(), "notes": notes})
    d.wait()
    return 0


def _stop_on_signal(d, signum):
    d.log(f"{signal.Signals(signum).name}: stopping")
    for line in d.stop(force=True):
        d.log(line)
    d._finished.set()


def _report(fd, obj):
    import json
    with contextlib.suppress(OSError):
        os.write(fd, (json.dumps(obj) + "\n").encode())
    with contextlib.suppress(OSError):
        os.close(fd)


def stderr_log(msg):
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
    sys.stderr.flush()
