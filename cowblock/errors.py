"""One exception hierarchy for everything cowblock raises.

Each kind of C error (enum cb_error_kind in csrc/api.h) maps to one class
(``from_code``), so callers can catch by meaning: ``NoSpaceError`` is an
``OSError`` with errno ENOSPC (``MetadataSpaceError`` when the metadata ran
out), bad arguments are ``ValueError``s, unknown names are
``LookupError``s.  Every message names the bad value; ``hint`` says what to
do about it.
"""
import errno as _errno



class CowblockError(Exception):
    """Base class of every cowblock error."""

    hint = ""


class InvalidArgumentError(CowblockError, ValueError):
    """A size, offset, name or option that is not acceptable."""


class DeviceNotFoundError(CowblockError, LookupError):
    """No device of that name (or id)."""

    hint = "list the devices with `cowblock ls`"

    def __str__(self):  # LookupError would quote the message like a key
        return str(self.args[0]) if self.args else ""


class DeviceExistsError(CowblockError, ValueError):
    """A device of that name exists already."""


class PoolClosedError(CowblockError, ValueError):
    """The pool (or a device of it) was used after close()."""


class NeedsCheckError(CowblockError):
    """The pool recorded an I/O error or failed its check; it needs repair."""

    hint = "check the pool (`cowblock pool check`) and repair what it reports (`--repair`)"


class _OSErrorBase(CowblockError, OSError):
    default_errno = _errno.EIO

    def __init__(self, message, errno=None):
        super().__init__(errno or self.default_errno, message)

    def __str__(self):
        return self.strerror or ""


class NoSpaceError(_OSErrorBase):
    """The pool has no free data block for a write (errno ENOSPC)."""

    default_errno = _errno.ENOSPC
    hint = "grow the pool (`cowblock pool resize SIZE`), or delete devices, and retry"


class MetadataSpaceError(NoSpaceError):
    """Metadata space is too low for the operation (errno ENOSPC)."""

    hint = "grow the metadata (`cowblock pool resize --metadata SIZE`)"


class ReadOnlyError(_OSErrorBase):
    """A write to a read-only device or pool (errno EROFS)."""

    default_errno = _errno.EROFS


class CorruptMetadataError(_OSErrorBase):
    """Metadata failed a checksum or an invariant (errno EUCLEAN)."""

    default_errno = _errno.EUCLEAN
    hint = "see the extent of the damage with `cowblock pool check`"


class PoolIOError(_OSErrorBase):
    """An I/O error on a pool file; the pool turned read-only (errno EIO)."""

    default_errno = _errno.EIO
    hint = ("look at the host's disk; a pool that meets an I/O error while open turns "
            "read-only until it is checked (`cowblock pool check`)")


class PoolLockedError(_OSErrorBase):
    """Another process has the pool open for writing (errno EAGAIN)."""

    default_errno = _errno.EAGAIN
    hint = "wait for that process, or wait longer for it (`--timeout SECONDS`)"


class HostFileError(_OSErrorBase):
    """An I/O error on a file outside the pool: an image being imported or
    exported, or a temporary file of a conversion (errno as the OS gave it)."""

    hint = "look at that file's disk: free space, permissions, errors"


class BusyError(_OSErrorBase):
    """The device is in use: exported over NBD, or mounted (errno EBUSY)."""

    default_errno = _errno.EBUSY
    hint = "disconnect its NBD clients (or unmount it) first"


class PoolNotFoundError(_OSErrorBase, FileNotFoundError):
    """No pool at that path."""

    default_errno = _errno.ENOENT
    hint = "create one with `cowblock pool create`"


class CephPoolNotFoundError(PoolNotFoundError):
    """The Ceph cluster of a rados: location has no such Ceph pool."""

    hint = "create the Ceph pool first (`ceph osd pool create`), then `cowblock pool create`"


class PoolExistsError(_OSErrorBase, FileExistsError):
    """A pool exists at that path already."""

    default_errno = _errno.EEXIST


class MissingExtraError(CowblockError, ImportError):
    """An optional feature needs a package that is not installed."""


# The class for each kind of C error; "not_found" and "exists" are the
# caller's (a device's, or a pool's).  Built on first use: a command that
# only talks to the pool's daemon never loads the engine.
_BY_KIND = {}


def _class_of_kind(kind):
    if not _BY_KIND:
        from ._core import lib
        _BY_KIND.update({
            lib.CB_E_INVALID: InvalidArgumentError,
            lib.CB_E_NOT_FOUND: "not_found",
            lib.CB_E_EXISTS: "exists",
            lib.CB_E_READ_ONLY: ReadOnlyError,
            lib.CB_E_DATA_SPACE: NoSpaceError,
            lib.CB_E_METADATA_SPACE: MetadataSpaceError,
            lib.CB_E_HOST_SPACE: NoSpaceError,
            lib.CB_E_LIMIT: NoSpaceError,
            lib.CB_E_CORRUPT: CorruptMetadataError,
            lib.CB_E_IO: PoolIOError,
            lib.CB_E_NO_MEMORY: MemoryError,
            lib.CB_E_OVERFLOW: PoolIOError,
            lib.CB_E_BUSY: BusyError,
            lib.CB_E_TIMEOUT: PoolIOError,
            lib.CB_E_PROTOCOL: PoolIOError,
            lib.CB_E_DENIED: PoolIOError,
            lib.CB_E_CLOSED: PoolIOError,
            lib.CB_E_UNSUPPORTED: InvalidArgumentError,
        })
    return _BY_KIND.get(kind, PoolIOError)


def from_code(code, message, kind=None, *, not_found=DeviceNotFoundError,
              exists=DeviceExistsError):
    """The exception for a negative errno the C core just returned; kind is
    its enum cb_error_kind (by default, what the core recorded with it)."""
    if kind is None:
        from ._core import lib
        kind = lib.cb_error_kind(code)
    cls = _class_of_kind(kind)
    cls = {"not_found": not_found, "exists": exists}.get(cls, cls)
    if issubclass(cls, _OSErrorBase):
        return cls(message, -code)
    return cls(message)


class ProtectedError(CowblockError):
    """Refused to protect other devices: devices depend on this one (an
    image's containers and layers), another subsystem owns it, or the change
    would break what the owner/dependency model promises (cowblock.owners).
    force=True (``--force``) goes ahead; the message says what it protects."""


class MountError(CowblockError):
    """This machine cannot mount a device, or a mount step failed."""


class DaemonError(CowblockError):
    """The pool daemon could not be started or reached, or it failed."""

    hint = "see `cowblock daemon status`; its log is in the runtime directory it names"


class VersionError(DaemonError):
    """The pool daemon and this client speak different control protocols."""

    hint = "stop the old daemon (`cowblock daemon stop`); the next command starts a new one"
