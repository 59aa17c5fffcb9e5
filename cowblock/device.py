"""Thin devices: byte-addressed I/O on a pool's device, and a file object.

Buffers cross into C without copies (``ffi.from_buffer``); the C calls
release the GIL, so threads doing I/O run in parallel.
"""
import errno
import io
import operator
from dataclasses import dataclass

from . import errors
from ._native import ffi, lib


@dataclass(frozen=True)
class Extent:
    """A byte range of a device: mapped (allocated) or a hole reading as zeroes;
    shared means another device maps the same data (an overwrite allocates)."""
    offset: int
    length: int
    mapped: bool
    shared: bool = False


_from_buffer = ffi.from_buffer
_read = lib.cb_dev_read
_write = lib.cb_dev_write


U64 = 1 << 64
_BIG_READ = 1 << 20  # pread checks lengths over this against the size before allocating


def _bad(what, value):
    return errors.InvalidArgumentError(f"{what} {value!r} is not an integer from 0 to 2^64 - 1")


def _check(what, value):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < U64:
        raise _bad(what, value)
    return value


class Device:
    """A thin device of a Pool.  Get one from pool.create_thin, pool.snapshot
    or pool.device; it stays valid until the device is deleted or the pool
    closed."""

    __slots__ = ("_pool", "_id", "_rbuf", "_rptr")

    def __init__(self, pool, dev_id):
        self._pool = pool
        self._id = dev_id
        self._rbuf = self._rptr = None  # the last readinto buffer and its C pointer

    def _h(self):
        h = self._pool._h
        if h is None:
            raise errors.PoolClosedError(f"pool {self._pool.path} is closed")
        return h

    def _raw(self):
        out = ffi.new("cb_devinfo *")
        self._pool._check(lib.cb_dev_info(self._h(), self._id, out))
        return out

    @property
    def id(self):
        return self._id

    @property
    def name(self):
        try:
            return self._pool._meta[self._id][0]
        except KeyError:
            raise errors.DeviceNotFoundError(f"device {self._id} was deleted") from None

    @property
    def size(self):
        return self._raw().size

    @property
    def read_only(self):
        return bool(self._raw().flags & 1)

    @property
    def pool(self):
        return self._pool

    def info(self):
        return self._pool._device_info(self._id)

    # ---- I/O ----
    def pread(self, length, offset):
        """Read length bytes at offset (any alignment); holes read as zeroes."""
        if not isinstance(length, int) or not 0 <= length < U64:
            raise _bad("length", length)
        if length > _BIG_READ:  # refuse a read past the end before allocating for it
            end = _check("offset", offset) + length
            size = self.size
            if end > size:
                raise errors.InvalidArgumentError(
                    f"read of {length} bytes at offset {offset} is past the end of the device "
                    f"({size} bytes)")
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    # readinto and pwrite are the hot path: one C call, with the closed-pool
    # and argument checks folded into the exceptions cffi raises anyway.
    # ffi.from_buffer costs more than the read itself (~0.6-1 us), so the
    # pointer to the last buffer read into is kept: reusing one buffer costs
    # nothing.  The price: that buffer stays exported (a bytearray cannot be
    # resized) until another buffer is used with this Device or it is freed.
    def readinto(self, buffer, offset):
        """Fill buffer from offset; returns the number of bytes read."""
        try:
            if buffer is self._rbuf:
                p = self._rptr
            else:
                p = _from_buffer(buffer, require_writable=True)
                self._rbuf, self._rptr = buffer, p
            r = _read(self._pool._h, self._id, p, len(p), offset)
        except (OverflowError, TypeError) as e:
            raise self._bad_call(e, offset) from None
        except BufferError as e:
            raise TypeError(f"readinto needs a writable, contiguous bytes-like buffer: {e}") from None
        if r < 0:
            self._pool._check(r)
        return r

    def pwrite(self, data, offset):
        """Write data at offset (any alignment); returns len(data) in bytes."""
        try:
            p = _from_buffer(data)
            r = self._once_more_if_full(lambda: _write(self._pool._h, self._id, p, len(p), offset))
        except (OverflowError, TypeError) as e:
            raise self._bad_call(e, offset) from None
        except BufferError as e:
            raise TypeError(f"pwrite needs a contiguous bytes-like object: {e}") from None
        if r < 0:
            self._pool._check(r)
        return r

    def _once_more_if_full(self, call):
        """call() (a C call returning 0 or a count, or a negative errno); when
        it finds the pool full and the pool has a space_wait (the low-water
        hook, cowblock.lowwater), wait for that and call once more."""
        r = call()
        wait = self._pool.space_wait
        if r == -errno.ENOSPC and wait is not None:
            wait()
            r = call()
        return r

    def _bad_call(self, exc, offset):
        if self._pool._h is None:
            return errors.PoolClosedError(f"pool {self._pool.path} is closed")
        if not isinstance(offset, int) or isinstance(exc, OverflowError):
            return _bad("offset", offset)
        return exc

    def discard(self, offset, length):
        """Unmap the whole blocks inside the range; bytes of blocks it only
        partly covers stay as they are."""
        self._range_call(lib.cb_dev_discard, offset, length)

    def write_zeroes(self, offset, length, may_unmap=True):
        """Make the range read as zeroes: whole blocks are unmapped when
        may_unmap, else zeroes are written (allocating)."""
        self._range_call(lib.cb_dev_write_zeroes, offset, length, 1 if may_unmap else 0)

    def _range_call(self, fn, offset, length, *extra):
        h, offset, length = self._h(), _check("offset", offset), _check("length", length)
        self._pool._check(self._once_more_if_full(lambda: fn(h, self._id, offset, length, *extra)))

    def flush(self):
        """Make every write so far durable (commits the pool's transaction)."""
        self._pool._check(lib.cb_pool_commit(self._h()))

    def block_status(self, offset=0, length=None):
        """Mapped and unmapped extents covering [offset, offset + length)."""
        _check("offset", offset)
        if length is None:
            length = max(self.size - offset, 0)
        _check("length", length)
        out, count = ffi.new("cb_range **"), ffi.new("uint64_t *")
        self._pool._check(lib.cb_dev_block_status(self._h(), self._id, offset, length, out,
                                                  count))
        bs = self._pool.block_size
        end = offset + length
        extents = []
        try:
            for i in range(count[0]):
                r = out[0][i]
                start = max(r.begin * bs, offset)
                stop = min((r.begin + r.length) * bs, end)
                extents.append(Extent(start, stop - start, r.kind != 0, r.kind == 2))
        finally:
            lib.cb_free(out[0])
        return extents

    def resize(self, size):
        """Grow or shrink the device; shrinking drops the blocks past the end."""
        if _check("device size", size) == 0 or size % 4096:
            raise errors.InvalidArgumentError(
                f"device size {size!r} is not a positive multiple of 4096")
        self._pool._check(lib.cb_dev_resize(self._h(), self._id, size))

    def open(self, mode="r+b"):
        """A standard io.RawIOBase file object over the device."""
        return DeviceFile(self, mode)

    def __repr__(self):
        try:
            return f"<cowblock.Device {self.name!r} id={self._id}>"
        except errors.CowblockError:
            return f"<cowblock.Device id={self._id} (deleted)>"


class DeviceFile(io.RawIOBase):
    """Seekable raw file over a device: readinto, write, seek, tell."""

    def __init__(self, device, mode="r+b"):
        super().__init__()
        if mode not in ("rb", "r+b", "wb", "rb+", "w+b"):
            raise errors.InvalidArgumentError(f"mode {mode!r}: use 'rb' or 'r+b'")
        device.size  # fails now if the device or its pool is gone
        self._dev = device
        self._writable = "+" in mode or "w" in mode
        self._readable = "r" in mode or "+" in mode
        self._pos = 0

    @property
    def _size(self):
        return self._dev.size  # live: the device may be resized while open

    def readable(self):
        return self._readable

    def writable(self):
        return self._writable

    def seekable(self):
        return True

    def readinto(self, b):
        self._checkClosed()
        if not self._readable:
            raise io.UnsupportedOperation("not readable")
        n = min(len(memoryview(b).cast("B")), max(self._size - self._pos, 0))
        if n <= 0:
            return 0
        self._dev.readinto(memoryview(b).cast("B")[:n], self._pos)
        self._pos += n
        return n

    def write(self, b):
        self._checkClosed()
        if not self._writable:
            raise io.UnsupportedOperation("not writable")
        mv = memoryview(b).cast("B")
        n = min(len(mv), max(self._size - self._pos, 0))
        if n < len(mv):
            raise errors.NoSpaceError(
                f"write of {len(mv)} bytes at {self._pos} runs past the end of the device "
                f"({self._size} bytes)")
        self._dev.pwrite(mv, self._pos)
        self._pos += n
        return n

    def seek(self, offset, whence=io.SEEK_SET):
        self._checkClosed()
        offset = operator.index(offset)  # TypeError for non-integers, as io does
        if whence not in (io.SEEK_SET, io.SEEK_CUR, io.SEEK_END):
            raise errors.InvalidArgumentError(f"invalid whence {whence!r}: use 0, 1 or 2")
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise errors.InvalidArgumentError(f"seek to {base + offset} is before the start")
        self._pos = base + offset
        return self._pos

    def tell(self):
        return self._pos

    def flush(self):
        if not self.closed and self._writable and self._dev._pool._h is not None:
            self._dev.flush()
