"""Apply one layer's tar onto a root directory, by the OCI layer rules.

The rules (image-spec layer.md, and what containerd's pkg/archive and
umoci do where it is silent):

- Names are cleaned (`./etc`, `/etc`, `etc//x/.` are normal); one that
  still climbs above the root (`../x`) is refused.  Every parent is
  resolved inside the root (resolve.Root: symlinks followed only where they
  stay beneath it); the last component is never followed.  Missing
  parents are made (0755, root's owner) as containerd does.
- An entry replaces what is at its path unless both are directories, when
  the directory takes the entry's attributes (its xattrs replace the old
  ones).  `.` is the root itself: a directory entry sets its attributes.
- Whiteouts apply to lower layers only.  `.wh.NAME` removes NAME,
  `DIR/.wh..wh..opq` everything below DIR, except what this layer made
  (and the directories above it), wherever in the tar the whiteout is:
  they run after the last entry, against the set of paths this layer made
  (by their names without symlinks).  A whiteout of a missing path does
  nothing; `.wh.`, `.wh..` and `.wh...` are refused; other `.wh..wh.`
  names (aufs' own) are skipped.
- Regular files: zero runs of whole 4 KiB blocks become holes, and GNU
  sparse members are written from their maps, so sparse files stay
  sparse.  Hard links may point at this layer's entries or a lower
  layer's, inside the root.  Directories, symlinks (any target: created,
  never followed), fifos, character and block devices.
- Owner (numeric uid/gid), then xattrs (PAX SCHILY.xattr.* and
  LIBARCHIVE.xattr.*, security.capability included: after chown, which
  clears it), then mode (with setuid/setgid/sticky: after chown, which
  clears them), then times (ns from PAX).  Directories get their times
  after their contents are in; lower directories the layer changed get
  theirs back.  Hard links take no attributes (they share the inode).
- Limits: uncompressed bytes read (a decompression bomb) and entries.

A refused layer may be half applied: the caller throws its filesystem
away.  Nothing outside the root is ever written.
"""
import contextlib
import errno
import io
import os
import queue
import stat
import tarfile
import threading
import time
from base64 import b64decode
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from urllib.parse import unquote_to_bytes

import numpy as np

from ..errors import CowblockError
from . import resolve
from .errors import LayerError, LayerIOError, LayerLimitError, LayerSpaceError, UnsafeLayerError

DEFAULT_MAX_ENTRIES = 1 << 20
FS_SIZE_FACTOR = 4                  # default byte limit: this many times the filesystem's size
MIN_MAX_BYTES = 256 << 20
HOLE_BLOCK = 4096
SMALL_FILE = 64 << 10               # smaller files are written in one go, holes or not
CHUNK = 1 << 20
TAR_BUFFER = 64 << 10
_DIR_CACHE = 256

WH_PREFIX = ".wh."
WH_META = ".wh..wh."
WH_OPAQUE = ".wh..wh..opq"

_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE)
_NODES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK,
          tarfile.FIFOTYPE: stat.S_IFIFO}
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP)


@dataclass
class ApplyStats:
    """What one apply_layer did."""

    entries: int = 0          # tar members, whiteouts included
    bytes: int = 0            # uncompressed tar bytes read
    data_bytes: int = 0       # file contents (logical size)
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    nodes: int = 0            # fifos, character and block devices
    whiteouts: int = 0        # .wh.NAME and opaque markers
    removed: int = 0          # lower entries (trees counted once) removed or replaced
    seconds: float = 0.0
    skipped_xattrs: list = field(default_factory=list)   # (entry, xattr, why)

    def to_dict(self):
        return dict(self.__dict__, skipped_xattrs=[list(s) for s in self.skipped_xattrs])


def default_limits(root):
    """(max_bytes, max_entries) for ROOT's filesystem: FS_SIZE_FACTOR times
    its size (at least MIN_MAX_BYTES), and DEFAULT_MAX_ENTRIES."""
    st = os.statvfs(root)
    return max(FS_SIZE_FACTOR * st.f_blocks * st.f_frsize, MIN_MAX_BYTES), DEFAULT_MAX_ENTRIES


def apply_layer(stream, root, *, label=None, max_bytes=None, max_entries=None):
    """Apply the uncompressed layer tar read from STREAM (anything with
    read(n): a blobs.LayerReader checks its digests at its last read, which
    this reaches) onto the directory ROOT.  LABEL names the layer in errors
    (default: the stream's name).  Returns ApplyStats.

    Raises UnsafeLayerError (an entry would reach outside the root),
    LayerLimitError (over max_bytes or max_entries), LayerError (not a
    valid layer tar), LayerSpaceError (ENOSPC / EDQUOT / no inodes in
    ROOT's filesystem), LayerIOError (another OS error), and whatever
    STREAM raises (BlobError for a bad blob)."""
    label = label or getattr(stream, "name", None) or "layer"
    default_bytes, default_entries = default_limits(root)
    applier = _Applier(root, label, default_bytes if max_bytes is None else max_bytes,
                       default_entries if max_entries is None else max_entries)
    try:
        return applier.run(stream)
    finally:
        applier.close()


class _ReadAhead:
    """The layer stream, read ahead by a thread of its own: decompressing and
    hashing it (zlib, zstd and hashlib let go of the GIL while they work)
    runs on another core while this one makes the files, as `tar -xz` runs
    gzip in a process of its own.  What the stream raises is raised by the
    read that reaches it."""

    DEPTH = 8                       # chunks of CHUNK bytes held ahead

    def __init__(self, stream):
        self._stream = stream
        self._queue = queue.Queue(self.DEPTH)
        self._stop = threading.Event()
        self._chunk, self._pos, self._end = b"", 0, None
        self._thread = threading.Thread(target=self._fill, name="layer-read-ahead", daemon=True)
        self._thread.start()

    def _fill(self):
        try:
            while not self._stop.is_set():
                data = self._stream.read(CHUNK)
                self._put(data)
                if not data:
                    return
        except BaseException as e:  # handed to the reader, raised there
            self._put(e)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    def read(self, n):
        if self._pos >= len(self._chunk):
            if self._end is None:
                item = self._queue.get()
                if isinstance(item, BaseException) or not item:
                    self._end = item
                else:
                    self._chunk, self._pos = item, 0
            if self._end is not None:
                if isinstance(self._end, BaseException):
                    raise self._end
                return b""
        if self._pos == 0 and n >= len(self._chunk):
            data = self._chunk
        else:
            data = self._chunk[self._pos:self._pos + n]
        self._pos += len(data)
        return data

    def close(self):
        """Stop the thread (the stream is the caller's to close after)."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get_nowait()
            self._thread.join(0.05)


class _StreamFailure(Exception):
    """What the layer stream raised (its own error, passed on as it is)."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


class _DamagedTar(Exception):
    """A damaged header after the first, which tarfile takes for the end."""


class _Budget:
    """The layer stream, counted against the byte limit."""

    def __init__(self, stream, limit, label):
        self.stream, self.limit, self.label = stream, limit, label
        self.total = 0

    def read(self, n=-1):
        try:
            data = self.stream.read(n)
        except Exception as e:
            raise _StreamFailure(e) from None
        self.total += len(data)
        if self.total > self.limit:
            raise _StreamFailure(LayerLimitError(
                f"{self.label}: more than {self.limit} bytes uncompressed (a decompression "
                "bomb?); refused"))
        return data


class _Forward(io.RawIOBase):
    """The layer stream as a file tarfile may seek in: forward only, which
    is all it does when it reads members in order.  (tarfile's own stream
    mode copies its buffer at every read; io.BufferedReader over this does
    not.)"""

    def __init__(self, source):
        super().__init__()
        self.source, self.pos = source, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def readinto(self, buf):
        data = self.source.read(len(buf))
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def tell(self):
        return self.pos

    def seek(self, pos, whence=io.SEEK_SET):
        if whence == io.SEEK_CUR:
            pos += self.pos
        elif whence != io.SEEK_SET:
            raise io.UnsupportedOperation("a layer stream has no end to seek from")
        if pos < self.pos:
            raise io.UnsupportedOperation("a layer stream cannot seek backwards")
        while self.pos < pos:
            data = self.source.read(min(CHUNK, pos - self.pos))
            if not data:
                break
            self.pos += len(data)
        return self.pos


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile ends an archive quietly at a damaged or truncated header;
    a layer must not lose its tail so."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
            if tar.offset == 0:
                raise
            raise _DamagedTar(f"a damaged tar header at byte {tar.offset} ({e})") from None


def clean_name(name):
    """A tar name as a path relative to the root ('' for the root itself);
    UnsafeLayerError when it climbs above the root."""
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise UnsafeLayerError(f"entry {name!r} climbs out of the root ('..'); refused")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


def _join(parent, base):
    return f"{parent}/{base}" if parent else base


def _ns(member, key, fallback):
    value = member.pax_headers.get(key)
    if value is not None:
        try:
            return int(Decimal(value).scaleb(9))
        except (InvalidOperation, ValueError, OverflowError):
            pass
    return fallback


def _xattrs(member):
    out = []
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out.append((key[len("SCHILY.xattr."):],
                        value.encode("utf-8", "surrogateescape")))
        elif key.startswith("LIBARCHIVE.xattr."):
            name = unquote_to_bytes(key[len("LIBARCHIVE.xattr."):]).decode(
                "utf-8", "surrogateescape")
            try:
                out.append((name, b64decode(value + "=" * (-len(value) % 4))))
            except ValueError:
                raise LayerError(f"entry {member.name!r}: xattr {name!r} is not base64") \
                    from None
    return out


class _Applier:
    def __init__(self, root, label, max_bytes, max_entries):
        self.label, self.max_bytes, self.max_entries = label, max_bytes, max_entries
        self.root = resolve.Root(root)
        self.stats = ApplyStats()
        self._dirs = {}            # parent path as named -> (O_PATH fd, canonical path)
        self._stale = []           # fds of forgotten cache entries, closed after the entry
        self.made = set()          # canonical paths this layer made
        self.above = set()         # their parent directories
        self.whiteouts = []        # (entry name, path)
        self.opaques = []          # (entry name, directory path)
        self.dir_times = []        # (canonical, atime ns, mtime ns) of this layer's dirs
        self.lower_times = {}      # canonical -> (atime ns, mtime ns) of lower dirs changed

    def close(self):
        self._forget()
        self._close_stale()
        self.root.close()

    # ---- the directory cache ----
    def _forget(self):
        """Drop every cached directory (after anything is removed, a path
        may resolve elsewhere).  Their fds live until the entry is done."""
        self._stale.extend(fd for fd, _ in self._dirs.values())
        self._dirs.clear()

    def _close_stale(self):
        for fd in self._stale:
            os.close(fd)
        self._stale.clear()

    def _dir(self, path):
        """(fd, canonical) of the existing directory PATH (as named)."""
        hit = self._dirs.get(path)
        if hit is not None:
            return hit
        if len(self._dirs) >= _DIR_CACHE:
            self._forget()
        fd, canonical = self.root.open_dir(path)
        self._dirs[path] = (fd, canonical)
        if canonical not in self.made and canonical not in self.lower_times:
            st = os.fstat(fd)
            self.lower_times[canonical] = (st.st_atime_ns, st.st_mtime_ns)
        return fd, canonical

    def _ensure_dir(self, path):
        """_dir(PATH), making the directories missing on the way."""
        missing, cur = [], path
        while True:
            try:
                fd, _ = self._dir(cur)
                break
            except FileNotFoundError:
                if not cur:
                    raise
                cur, _, base = cur.rpartition("/")
                missing.append(base)
        for base in reversed(missing):
            try:
                os.mkdir(base, 0o755, dir_fd=fd)
            except FileExistsError:
                pass    # a dangling symlink, or a non-directory: _dir says which
            else:
                os.chmod(base, 0o755, dir_fd=fd)
            cur = _join(cur, base)
            fd, _ = self._dir(cur)
        return self._dir(path)

    # ---- the run ----
    def run(self, stream):
        start = time.monotonic()
        ahead = _ReadAhead(stream)
        budget = _Budget(ahead, self.max_bytes, self.label)
        try:
            self._run(budget)
        except _StreamFailure as failure:
            raise failure.error from None
        finally:
            ahead.close()
        self.stats.bytes = budget.total
        self.stats.seconds = time.monotonic() - start
        return self.stats

    def _run(self, budget):
        try:
            tar = tarfile.open(fileobj=io.BufferedReader(_Forward(budget), TAR_BUFFER),
                               mode="r:", tarinfo=_StrictTarInfo)
        except tarfile.ReadError as e:
            if budget.total == 0:       # an empty blob: an empty layer
                return
            raise LayerError(f"{self.label}: not a tar archive ({e})") from None
        name = None
        try:
            while True:
                member = tar.next()
                if member is None:
                    break
                tar.members.clear()      # tarfile would keep every member
                name = member.name
                self.stats.entries += 1
                if self.stats.entries > self.max_entries:
                    raise LayerLimitError(f"{self.label}: more than {self.max_entries} entries; "
                                          "refused")
                self._guarded(f"entry {name!r}", self._entry, tar, member)
            self._drain(tar)
        except (tarfile.TarError, _DamagedTar) as e:
            where = f" after entry {name!r}" if name else ""
            raise LayerError(f"{self.label}: the tar is damaged{where}: {e}") from None
        self._guarded("its whiteouts", self._finish)

    def _guarded(self, what, fn, *args):
        """FN(*ARGS), its errors named after the layer and WHAT it did."""
        try:
            fn(*args)
        except LayerError as e:          # raised here, by the entry code
            raise type(e)(f"{self.label}: {e}") from None
        except resolve.Escape as e:
            raise UnsafeLayerError(f"{self.label}: {what}: {e}; refused") from None
        except (_StreamFailure, CowblockError):
            raise
        except OSError as e:
            raise self._os_error(e, what) from None
        except (OverflowError, ValueError) as e:
            raise LayerError(f"{self.label}: {what}: {e}") from None
        finally:
            self._close_stale()

    def _os_error(self, e, what):
        if e.errno in _NO_SPACE:
            try:
                st = os.fstatvfs(self.root.fd)
                why = "no free inodes" if st.f_favail == 0 else "no free blocks"
            except OSError:
                why = "no space"
            return LayerSpaceError(f"{self.label}: {what}: the filesystem is full ({why})",
                                   e.errno)
        if e.errno in (errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP):
            return LayerError(f"{self.label}: {what}: {e.strerror}"
                              + (" (a parent is not a directory)" if e.errno == errno.ENOTDIR
                                 else ""))
        return LayerIOError(f"{self.label}: {what}: {e.strerror}", e.errno)

    def _drain(self, tar):
        """Read what follows the end-of-archive block, so that the stream
        reaches its end (and checks its digests): zeros only."""
        while True:
            data = tar.fileobj.read(CHUNK)
            if not data:
                return
            if data.count(0) != len(data):
                raise LayerError(f"{self.label}: data follows the end of the tar archive")

    # ---- entries ----
    def _entry(self, tar, m):
        path = clean_name(m.name)
        if not path:
            return self._root_entry(m)
        parent, _, base = path.rpartition("/")
        if base.startswith(WH_PREFIX):
            return self._whiteout(m, parent, base)
        if m.type in _REGULAR or m.type == tarfile.DIRTYPE or m.type in _NODES:
            pass
        elif m.type == tarfile.SYMTYPE:
            if not m.linkname:
                raise LayerError(f"entry {m.name!r} is a symlink with an empty target")
        elif m.type == tarfile.LNKTYPE:
            pass
        else:
            raise LayerError(f"entry {m.name!r} has tar type {m.type!r}, which a layer "
                             "cannot hold")
        try:
            pfd, pcanon = self._ensure_dir(parent)
        except FileNotFoundError:
            raise LayerError(f"entry {m.name!r}: its parent {parent!r} is a dangling "
                             "symlink") from None
        key = _join(pcanon, base)
        if m.type in _REGULAR:
            self._file(tar, m, pfd, base)
        elif m.type == tarfile.DIRTYPE:
            self._directory(m, pfd, base, key)
        elif m.type == tarfile.SYMTYPE:
            self._symlink(m, pfd, base)
        elif m.type == tarfile.LNKTYPE:
            self._hardlink(m, path, key)
        else:
            self._node(m, pfd, base)
        self._mark(key)

    def _mark(self, key):
        self.made.add(key)
        while key:
            key = key.rpartition("/")[0]
            if key in self.above:
                break
            self.above.add(key)

    def _owner(self, m):
        if m.uid < 0 or m.gid < 0:
            raise LayerError(f"entry {m.name!r} has a negative owner {m.uid}:{m.gid}")
        return m.uid, m.gid

    def _times(self, m):
        mtime = _ns(m, "mtime", int(m.mtime) * 10 ** 9)
        return _ns(m, "atime", mtime), mtime

    def _replace(self, pfd, base, keep_dir):
        """Make room at BASE: remove what is there, unless it is a directory
        and KEEP_DIR.  Returns whether a directory was kept."""
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        if keep_dir and stat.S_ISDIR(st.st_mode):
            return True
        self._remove(pfd, base, st)
        return False

    def _remove(self, pfd, base, st):
        if stat.S_ISDIR(st.st_mode):
            self._remove_tree(pfd, base)
        else:
            os.unlink(base, dir_fd=pfd)
        self.stats.removed += 1
        self._forget()

    def _remove_tree(self, pfd, base):
        """rm -r of directory BASE, by fds, never following a symlink;
        iterative (a deep tree cannot exhaust the stack)."""
        stack = [(pfd, base, os.open(base, _OPEN_DIR, dir_fd=pfd), None)]
        while stack:
            parent, name, fd, children = stack[-1]
            if children is None:
                children = iter(os.listdir(fd))
                stack[-1] = (parent, name, fd, children)
            for child in children:
                st = os.stat(child, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    stack.append((fd, child, os.open(child, _OPEN_DIR, dir_fd=fd), None))
                    break
                os.unlink(child, dir_fd=fd)
            else:
                stack.pop()
                os.close(fd)
                os.rmdir(name, dir_fd=parent)

    def _set_xattrs(self, m, target, follow, replace_old=False):
        """Set M's xattrs on TARGET (an fd, or a path not to follow);
        REPLACE_OLD also removes those it does not name."""
        wanted = _xattrs(m)
        if replace_old:
            names = {n for n, _ in wanted}
            try:
                old = os.listxattr(target, follow_symlinks=follow)
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                old = []
            for name in old:
                if name not in names:
                    os.removexattr(target, name, follow_symlinks=follow)
        for name, value in wanted:
            try:
                os.setxattr(target, name, value, follow_symlinks=follow)
            except OSError as e:
                # The kernel allows user.* only on files and directories;
                # a filesystem may lack a namespace.  containerd skips both.
                if e.errno in _UNSUPPORTED or (e.errno == errno.EPERM
                                               and name.startswith("user.")):
                    self.stats.skipped_xattrs.append((m.name, name, e.strerror))
                    continue
                raise

    def _attributes(self, m, fd, replace_old=False):
        """Owner, xattrs and mode on an open file or directory."""
        os.fchown(fd, *self._owner(m))
        self._set_xattrs(m, fd, True, replace_old)
        os.fchmod(fd, m.mode & 0o7777)

    def _root_entry(self, m):
        if m.type != tarfile.DIRTYPE:
            raise UnsafeLayerError(f"entry {m.name!r} would replace the root directory with "
                                   "a non-directory; refused")
        self._attributes(m, self.root.fd, replace_old=True)
        self.dir_times.append(("",) + self._times(m))
        self.made.add("")
        self.stats.dirs += 1

    def _directory(self, m, pfd, base, key):
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
            merged = False
        except FileExistsError:
            merged = self._replace(pfd, base, keep_dir=True)
            if not merged:
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, _OPEN_DIR, dir_fd=pfd)
        try:
            self._attributes(m, fd, replace_old=merged)
        finally:
            os.close(fd)
        self.dir_times.append((key,) + self._times(m))
        self.stats.dirs += 1

    def _create(self, pfd, base):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(base, flags, 0o600, dir_fd=pfd)
        except FileExistsError:
            self._replace(pfd, base, keep_dir=False)
            return os.open(base, flags, 0o600, dir_fd=pfd)

    def _file(self, tar, m, pfd, base):
        if tar.fileobj.tell() != m.offset_data:
            raise LayerError(f"entry {m.name!r}: the tar reader lost its place")
        fd = self._create(pfd, base)
        try:
            if m.issparse():
                self._write_sparse(tar.fileobj, m, fd)
            else:
                self._write(tar.fileobj, m, fd)
            self._attributes(m, fd)
            os.utime(fd, ns=self._times(m))
        finally:
            os.close(fd)
        self.stats.files += 1
        self.stats.data_bytes += m.size

    def _read(self, src, n, m):
        data = src.read(n)
        if len(data) < n:
            raise LayerError(f"entry {m.name!r}: the tar ends inside its data")
        return data

    def _write(self, src, m, fd):
        size = m.size
        if size <= SMALL_FILE:
            if size:
                _pwrite_all(fd, self._read(src, size, m), 0)
            return
        pos = end = 0
        while pos < size:
            chunk = self._read(src, min(CHUNK, size - pos), m)
            end = max(end, _write_nonzero(fd, chunk, pos))
            pos += len(chunk)
        if end < size:
            os.ftruncate(fd, size)

    def _write_sparse(self, src, m, fd):
        last = 0
        for offset, length in m.sparse:
            if length == 0:
                continue
            if offset < last or offset + length > m.size:
                raise LayerError(f"entry {m.name!r}: its sparse map is not in order "
                                 f"or goes past its size {m.size}")
            done = 0
            while done < length:
                chunk = self._read(src, min(CHUNK, length - done), m)
                _write_nonzero(fd, chunk, offset + done)
                done += len(chunk)
            last = offset + length
        os.ftruncate(fd, m.size)

    def _symlink(self, m, pfd, base):
        try:
            os.symlink(m.linkname, base, dir_fd=pfd)
        except FileExistsError:
            self._replace(pfd, base, keep_dir=False)
            os.symlink(m.linkname, base, dir_fd=pfd)
        self._node_attributes(m, pfd, base, is_link=True)
        self.stats.symlinks += 1

    def _node(self, m, pfd, base):
        kind = _NODES[m.type]
        device = os.makedev(m.devmajor, m.devminor) if kind != stat.S_IFIFO else 0
        try:
            os.mknod(base, kind | 0o600, device, dir_fd=pfd)
        except FileExistsError:
            self._replace(pfd, base, keep_dir=False)
            os.mknod(base, kind | 0o600, device, dir_fd=pfd)
        self._node_attributes(m, pfd, base, is_link=False)
        self.stats.nodes += 1

    def _node_attributes(self, m, pfd, base, is_link):
        """Attributes of a symlink or device node, which cannot be opened:
        by name in its directory, never following it."""
        os.chown(base, *self._owner(m), dir_fd=pfd, follow_symlinks=False)
        if _xattrs(m):
            # /proc/self/fd/N is our own directory fd; BASE is not followed.
            self._set_xattrs(m, f"/proc/self/fd/{pfd}/{base}", False)
        if not is_link:
            os.chmod(base, m.mode & 0o7777, dir_fd=pfd)    # BASE is the node just made
        os.utime(base, ns=self._times(m), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, m, path, key):
        target = clean_name(m.linkname)
        if not target:
            raise UnsafeLayerError(f"entry {m.name!r} is a hard link to the root directory; "
                                   "refused")
        tparent, _, tbase = target.rpartition("/")
        parent, _, base = path.rpartition("/")
        try:
            tfd, tcanon = self._dir(tparent)
        except FileNotFoundError:
            raise LayerError(f"entry {m.name!r} is a hard link to {m.linkname!r}, which "
                             "does not exist") from None
        if _join(tcanon, tbase) == key:
            raise LayerError(f"entry {m.name!r} is a hard link to itself")
        pfd, _ = self._dir(parent)
        try:
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileExistsError:
            old = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            new = os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
            if (old.st_dev, old.st_ino) == (new.st_dev, new.st_ino):
                return
            self._replace(pfd, base, keep_dir=False)
            os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            raise LayerError(f"entry {m.name!r} is a hard link to {m.linkname!r}, which "
                             "does not exist") from None
        except PermissionError:
            if stat.S_ISDIR(os.stat(tbase, dir_fd=tfd, follow_symlinks=False).st_mode):
                raise LayerError(f"entry {m.name!r} is a hard link to the directory "
                                 f"{m.linkname!r}") from None
            raise
        self.stats.hardlinks += 1

    # ---- whiteouts ----
    def _whiteout(self, m, parent, base):
        self.stats.whiteouts += 1
        if base == WH_OPAQUE:
            self.opaques.append((m.name, parent))
        elif base.startswith(WH_META):
            pass            # aufs' own metadata (.wh..wh.plnk, .wh..wh.aufs)
        else:
            target = base[len(WH_PREFIX):]
            if target in ("", ".", ".."):
                what = repr(target) if target else "nothing"
                raise UnsafeLayerError(f"entry {m.name!r} is a whiteout of {what}; refused")
            self.whiteouts.append((m.name, _join(parent, target)))

    def _finish(self):
        for name, path in self.whiteouts:
            parent, _, base = path.rpartition("/")
            try:
                pfd, pcanon = self._whiteout_dir(name, parent)
            except (FileNotFoundError, NotADirectoryError):
                continue
            self._prune(pfd, pcanon, [(base, _join(pcanon, base))])
            self._forget()
            self._close_stale()
        for name, path in self.opaques:
            try:
                dfd, dcanon = self._whiteout_dir(name, path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
            try:
                self._prune(listing, dcanon,
                            [(c, _join(dcanon, c)) for c in os.listdir(listing)])
            finally:
                os.close(listing)
            self._forget()
            self._close_stale()
        self._close_stale()
        for key, (atime, mtime) in self.lower_times.items():
            if key not in self.made:
                self._set_dir_time(key, atime, mtime)
        for key, atime, mtime in self.dir_times:
            self._set_dir_time(key, atime, mtime)

    def _whiteout_dir(self, name, path):
        try:
            return self._dir(path)
        except resolve.Escape as e:
            raise UnsafeLayerError(f"whiteout {name!r}: {e}; refused") from None

    def _keeps(self, key):
        return key in self.made or key in self.above

    def _prune(self, dfd, dkey, items):
        """Remove ITEMS ((name, canonical) in directory DFD at DKEY) and what
        is below them, except this layer's entries and their parents."""
        stack = [(dfd, dkey, items, False)]
        while stack:
            fd, key, pending, owned = stack[-1]
            if not pending:
                stack.pop()
                if owned:
                    os.close(fd)
                continue
            name, child_key = pending.pop()
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not self._keeps(child_key):
                if key not in self.made and key not in self.lower_times:
                    parent_st = os.fstat(fd)
                    self.lower_times[key] = (parent_st.st_atime_ns, parent_st.st_mtime_ns)
                if stat.S_ISDIR(st.st_mode):
                    self._remove_tree(fd, name)
                else:
                    os.unlink(name, dir_fd=fd)
                self.stats.removed += 1
            elif stat.S_ISDIR(st.st_mode):
                cfd = os.open(name, _OPEN_DIR, dir_fd=fd)
                stack.append((cfd, child_key,
                              [(c, _join(child_key, c)) for c in os.listdir(cfd)], True))

    def _set_dir_time(self, key, atime, mtime):
        try:
            if not key:
                os.utime(self.root.fd, ns=(atime, mtime))
                return
            parent, _, base = key.rpartition("/")
            pfd, _ = self.root.open_dir(parent, follow=False)
        except (FileNotFoundError, NotADirectoryError, resolve.Escape):
            return
        except OSError as e:
            if e.errno == errno.ELOOP:
                return       # replaced by a symlink since: not the directory it was
            raise
        try:
            st = os.stat(base, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                os.utime(base, ns=(atime, mtime), dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        finally:
            os.close(pfd)


def _pwrite_all(fd, data, offset):
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _write_nonzero(fd, chunk, offset):
    """Write CHUNK at OFFSET, leaving whole zero 4 KiB blocks as holes;
    returns the end of the last byte written (OFFSET if none)."""
    n = len(chunk)
    blocks = n // HOLE_BLOCK
    view = memoryview(chunk)
    end = offset
    if blocks:
        words = np.frombuffer(chunk, dtype=np.uint64, count=blocks * HOLE_BLOCK // 8)
        nonzero = words.reshape(blocks, HOLE_BLOCK // 8).any(axis=1)
        if nonzero.all():
            _pwrite_all(fd, view[:blocks * HOLE_BLOCK], offset)
            end = offset + blocks * HOLE_BLOCK
        elif nonzero.any():
            edges = np.flatnonzero(np.diff(nonzero.astype(np.int8))) + 1
            starts = [0] + edges.tolist()
            stops = edges.tolist() + [blocks]
            for s, e in zip(starts, stops):
                if nonzero[s]:
                    _pwrite_all(fd, view[s * HOLE_BLOCK:e * HOLE_BLOCK],
                                offset + s * HOLE_BLOCK)
                    end = offset + e * HOLE_BLOCK
    tail = bytes(view[blocks * HOLE_BLOCK:])
    if tail.count(0) != len(tail):
        _pwrite_all(fd, tail, offset + blocks * HOLE_BLOCK)
        end = offset + n
    return end
