"""Directories resolved inside a root, never outside it.

A layer's entries name paths under the root of the filesystem being
built; the parents of those paths may be symlinks that earlier entries or
lower layers made.  Root.open_dir follows a symlink only where it stays
beneath the root: a relative target inside the tree (`bin -> usr/bin`) is
followed, as containerd and umoci do; an absolute target, a `..` that
climbs above the root, a /proc magic link or a mount crossing is refused
(Escape).  Absolute symlinks are created as they are, never followed:
outside a container they point at the host.

Two ways to do it, the same rules: openat2(2) with RESOLVE_BENEATH |
RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV (Linux 5.6; the kernel checks
every step), used when a probe at run time shows it works; else a walk of
directory fds, one component at a time with O_NOFOLLOW, reading each
symlink and refusing what would leave the root.
"""
import ctypes
import errno
import os
import platform
import stat

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "armv7l": 437, "i686": 437,
                "riscv64": 437, "ppc64le": 437, "s390x": 437, "loongarch64": 437}
_NR_OPENAT2 = _SYS_OPENAT2.get(platform.machine())
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_MAX_LINKS = 40          # as the kernel's MAXSYMLINKS

# None: probe at first use; tests set False to run the fd walk.
USE_OPENAT2 = None


class Escape(Exception):
    """The path leaves the root (or crosses a mount, or loops)."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_syscall = None


def _openat2(dirfd, path, flags, resolve):
    global _syscall
    if _syscall is None:
        libc = ctypes.CDLL(None, use_errno=True)
        _syscall = libc.syscall
        _syscall.restype = ctypes.c_long
        _syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p,
                             ctypes.POINTER(_OpenHow), ctypes.c_size_t]
    how = _OpenHow(flags, 0, resolve)
    encoded = os.fsencode(path) if path else b"."
    while True:
        fd = _syscall(_NR_OPENAT2, dirfd, encoded, ctypes.byref(how),
                      ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err not in (errno.EINTR, errno.EAGAIN):   # EAGAIN: a rename raced the lookup
            raise OSError(err, os.strerror(err), path)


_probed = None


def openat2_works():
    """Whether openat2 with RESOLVE_BENEATH works here (probed once)."""
    global _probed
    if _probed is None:
        _probed = False
        if _NR_OPENAT2 is not None:
            fd = os.open("/", _DIR_FLAGS)
            try:
                os.close(_openat2(fd, ".", _DIR_FLAGS, RESOLVE_BENEATH | RESOLVE_NO_XDEV))
                _probed = True
            except (OSError, AttributeError):    # ENOSYS, or EPERM from a seccomp filter
                _probed = False
            finally:
                os.close(fd)
    return _probed


def _escape_message(err, path):
    if err == errno.EXDEV:
        return (f"{path!r} leads outside the root (an absolute symlink, a '..' above the "
                "root, or a mount point on the way)")
    return f"{path!r} has a symlink loop or a /proc magic link on the way"


class Root:
    """An open root directory and resolution of paths beneath it.

    Paths given are relative, already cleaned (no '', '.', '..' parts);
    '' is the root itself.  Each returned fd is an O_PATH directory fd the
    caller closes; the canonical path is the same directory named without
    symlinks, relative to the root."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.dev = os.fstat(self.fd).st_dev
        self.openat2 = openat2_works() if USE_OPENAT2 is None else USE_OPENAT2
        self._prefix = None

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open_dir(self, rel, follow=True):
        """(fd, canonical) of directory REL.  follow=False refuses any
        symlink on the way (OSError ELOOP).  Escape when REL leads outside;
        FileNotFoundError / NotADirectoryError as the OS says."""
        if self.openat2:
            return self._open_openat2(rel, follow)
        return self._walk(rel, follow)

    def _open_openat2(self, rel, follow):
        base = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
        try:
            return _openat2(self.fd, rel, _DIR_FLAGS, base | RESOLVE_NO_SYMLINKS), rel
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise Escape(_escape_message(e.errno, rel)) from None
            if e.errno != errno.ELOOP or not follow:
                raise
        try:
            fd = _openat2(self.fd, rel, _DIR_FLAGS, base)
        except OSError as e:
            if e.errno in (errno.EXDEV, errno.ELOOP):
                raise Escape(_escape_message(e.errno, rel)) from None
            raise
        canonical = self._canonical(fd)
        if canonical is None:          # /proc did not say: ask the walk
            os.close(fd)
            return self._walk(rel, follow)
        return fd, canonical

    def _canonical(self, fd):
        try:
            if self._prefix is None:
                self._prefix = os.readlink(f"/proc/self/fd/{self.fd}")
            here = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return None
        prefix = self._prefix.rstrip("/")
        if here == self._prefix:
            return ""
        if here.startswith(prefix + "/"):
            return here[len(prefix) + 1:]
        return None

    def _walk(self, rel, follow):
        fds, names = [os.dup(self.fd)], []
        todo = rel.split("/")[::-1] if rel else []
        links = 0
        try:
            while todo:
                part = todo.pop()
                if part in ("", "."):
                    continue
                if part == "..":
                    if not names:
                        raise Escape(_escape_message(errno.EXDEV, rel))
                    os.close(fds.pop())
                    names.pop()
                    continue
                st = os.stat(part, dir_fd=fds[-1], follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    if not follow:
                        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), rel)
                    links += 1
                    target = os.readlink(part, dir_fd=fds[-1])
                    if links > _MAX_LINKS:
                        raise Escape(_escape_message(errno.ELOOP, rel))
                    if target.startswith("/"):
                        raise Escape(_escape_message(errno.EXDEV, rel))
                    todo.extend(target.split("/")[::-1])
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), rel)
                if st.st_dev != self.dev:
                    raise Escape(_escape_message(errno.EXDEV, rel))
                fds.append(os.open(part, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fds[-1]))
                names.append(part)
            return fds.pop(), "/".join(names)
        finally:
            for fd in fds:
                os.close(fd)
