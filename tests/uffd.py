"""A buffer whose first touch blocks until the test lets it go (userfaultfd).

It stands for memory that is slow to fault in (a destination mapped from a
network filesystem, a page swapped out), so a test can hold a thread inside
a memcpy into it for as long as it likes, and know that it is there.
"""
import ctypes
import errno
import mmap
import os
import select
import struct

SYS_USERFAULTFD = 323  # x86_64
UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F        # _IOWR(0xAA, 0x3F, struct uffdio_api)
UFFDIO_REGISTER = 0xC020AA00   # _IOWR(0xAA, 0x00, struct uffdio_register)
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_EVENT_PAGEFAULT = 0x12

_libc = ctypes.CDLL(None, use_errno=True)


def unavailable():
    """Why userfaultfd cannot be used here, or None."""
    if os.uname().machine != "x86_64":
        return "userfaultfd syscall number known for x86_64 only"
    fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        return f"userfaultfd: {os.strerror(ctypes.get_errno())}"
    os.close(fd)
    return None


def _ioctl(fd, request, buf):
    if _libc.ioctl(fd, ctypes.c_ulong(request), buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"userfaultfd ioctl {request:#x}: {os.strerror(e)}")


class StallingBuffer:
    """An anonymous mapping registered for missing-page faults: a thread
    that touches it blocks until release()."""

    def __init__(self, size):
        self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.fd = _libc.syscall(SYS_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "userfaultfd")
        api = ctypes.create_string_buffer(struct.pack("QQQ", UFFD_API, 0, 0), 24)
        _ioctl(self.fd, UFFDIO_API, api)
        anchor = ctypes.c_char.from_buffer(self.map)
        self.address = ctypes.addressof(anchor)
        del anchor
        reg = ctypes.create_string_buffer(
            struct.pack("QQQQ", self.address, size, UFFDIO_REGISTER_MODE_MISSING, 0), 32)
        _ioctl(self.fd, UFFDIO_REGISTER, reg)

    def wait_for_fault(self, timeout):
        """True once a thread is blocked on a page of the buffer."""
        if not select.select([self.fd], [], [], timeout)[0]:
            return False
        try:
            msg = os.read(self.fd, 32)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                return False
            raise
        return msg[0] == UFFD_EVENT_PAGEFAULT

    def release(self):
        """Let blocked threads go: closing the descriptor unregisters the
        range, and the faults are served with zero pages as usual."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
