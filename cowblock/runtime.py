"""Where a pool's daemon keeps what lives only while it runs.

A runtime directory apart from the pool directory holds the daemon's
control socket, its default NBD socket, its pid file and log, the state of
its attachments (so a successor can clean up after a daemon that died), and
the mount points of its device files.  Unix socket paths are limited to 108
bytes and a pool on a remote store has no directory of its own, so these
never live in the pool directory.

  root          $COWBLOCK_RUNTIME_DIR, else /run/cowblock for root, else
                $XDG_RUNTIME_DIR/cowblock, else /tmp/cowblock-UID (0700)
  per pool      ROOT/KEY, KEY a hash of the pool directory's identity
                (device and inode), so a moved or symlinked pool keeps its
                key and a copy of a pool gets its own
"""
import contextlib
import hashlib
import json
import os

from . import errors

CONTROL = "control.sock"
NBD = "nbd.sock"
PIDFILE = "daemon.pid"
LOG = "daemon.log"
STATE = "attachments.json"
FILES = "files"     # nbdfuse attach mounts and their sockets
DEV = "dev"         # the in-process FUSE mount of device files
BUILD = "build"     # mount points of image layers being built
POOL = "pool"       # the pool's path: kept with the log, so a sweep can tell whose it is


def root():
    if os.environ.get("COWBLOCK_RUNTIME_DIR"):
        return os.environ["COWBLOCK_RUNTIME_DIR"]
    if os.geteuid() == 0:
        return "/run/cowblock"
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "cowblock")
    return f"/tmp/cowblock-{os.getuid()}"


def pool_key(pool_path):
    try:
        st = os.stat(pool_path)
    except FileNotFoundError:
        raise errors.PoolNotFoundError(f"no pool at {pool_path}") from None
    except OSError as e:
        raise errors.HostFileError(f"cannot look at pool {pool_path}: {e.strerror}", e.errno) from None
    return hashlib.sha256(f"{st.st_dev}:{st.st_ino}".encode()).hexdigest()[:16]


class RuntimeDir:
    """The runtime directory of the pool at pool_path."""

    def __init__(self, pool_path, key=None):
        """key: the directory's name when it is known (a pool that is gone
        has no identity to hash)."""
        self.pool_path = os.path.abspath(os.fspath(pool_path))
        self.path = os.path.join(root(), key or pool_key(self.pool_path))
        self.control = os.path.join(self.path, CONTROL)
        self.nbd = os.path.join(self.path, NBD)
        self.pidfile = os.path.join(self.path, PIDFILE)
        self.log = os.path.join(self.path, LOG)
        self.state = os.path.join(self.path, STATE)
        self.files = os.path.join(self.path, FILES)
        self.dev = os.path.join(self.path, DEV)

    def make(self):
        """Create it (0700, whatever the umask), and say which pool it is for."""
        for d in (os.path.dirname(self.path), self.path):
            with contextlib.suppress(FileExistsError):
                os.mkdir(d, 0o700)
            st = os.stat(d)
            if st.st_uid != os.geteuid():
                raise errors.DaemonError(
                    f"runtime directory {d} belongs to uid {st.st_uid}, not to this user")
            if st.st_mode & 0o077:
                os.chmod(d, 0o700)
        with open(os.path.join(self.path, POOL), "w") as f:
            f.write(self.pool_path + "\n")

    def exists(self):
        return os.path.isdir(self.path)

    def recorded_pid(self):
        """The pid in the pid file (alive or not), or None."""
        try:
            with open(self.pidfile) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def pid(self):
        """The pid in the pid file if that process is alive, else None."""
        pid = self.recorded_pid()
        return pid if pid is not None and process_alive(pid) else None

    def write_pid(self):
        tmp = f"{self.pidfile}.tmp"
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, self.pidfile)

    def load_state(self):
        try:
            with open(self.state) as f:
                state = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {}
        return state if isinstance(state, dict) else {}

    def save_state(self, state):
        tmp = f"{self.state}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state)

    def remove(self, keep_log=True):
        """Remove what is left (sockets, files, empty directories); the log
        stays unless keep_log is false, for whoever wants to know why a
        daemon ended."""
        names = [CONTROL, NBD, PIDFILE, STATE, f"{PIDFILE}.tmp", f"{STATE}.tmp"]
        for name in names + ([] if keep_log else [LOG, f"{LOG}.1", POOL]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.path, name))
        build = os.path.join(self.path, BUILD)
        with contextlib.suppress(OSError):
            for entry in os.listdir(build):   # mount points of builds a dead daemon left
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(build, entry))
        for d in (self.dev, build):
            with contextlib.suppress(OSError):
                os.rmdir(d)
        with contextlib.suppress(OSError):
            for entry in os.listdir(self.files):
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.join(self.files, entry))
            os.rmdir(self.files)
        if not keep_log:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
