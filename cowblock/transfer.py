"""Whole devices in and out of image files: raw, qcow2 (or any format
qemu-img reads and writes), stdin and stdout; sparse both ways.

Import skips the holes of the source (SEEK_DATA/SEEK_HOLE) and every
4 KiB-aligned chunk of zeroes, so they stay unallocated in the pool.  Export
skips unmapped extents (block_status) and all-zero chunks of mapped data,
leaving holes in a regular file (zeroes are written to a pipe or a device).

A device is a whole number of 4 KiB pages; a file whose length is not keeps
its exact length in the device label "cowblock.length", and export writes
exactly that many bytes.  Snapshots (and so containers and committed images)
keep their origin's label; a resize drops it, and a label that does not fit
the device's size (length rounded up to 4 KiB) is not applied.  Formats other than raw go through a temporary
sparse raw file and `qemu-img convert`.
"""
import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import numpy as np

from . import catalog, errors, owners
from .sizes import PAGE, round_up

CHUNK = 1 << 20              # bytes per read and write (at least a pool block)
GRAIN = PAGE                 # zero detection and device size granularity
LENGTH_LABEL = owners.LENGTH_LABEL
QEMU_IMG_TIMEOUT = 3600      # seconds for one qemu-img run

# First bytes of the image formats qemu-img knows, to name them when it is
# not installed (a raw file is anything else).
_MAGIC = [(b"QFI\xfb", "qcow2"), (b"KDMV", "vmdk"), (b"conectix", "vpc"),
          (b"vhdxfile", "vhdx"), (b"QED\0", "qed"), (b"LUKS\xba\xbe", "luks")]
_VDI_MAGIC = (64, b"\x7f\x10\xda\xbe")


# errnos that mean a bad path (the caller's to fix) rather than a failing disk
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM,
                errno.ENAMETOOLONG, errno.ELOOP, errno.EROFS, errno.EEXIST}


@contextlib.contextmanager
def host_file_errors(doing, path):
    """Turn an OSError of a host file (not a cowblock error, not a broken
    pipe) into InvalidArgumentError (a bad path) or HostFileError."""
    try:
        yield
    except OSError as e:
        if isinstance(e, (errors.CowblockError, BrokenPipeError)):
            raise
        where = f" ({e.filename})" if e.filename and os.fspath(e.filename) != path else ""
        message = f"cannot {doing} {path}{where}: {e.strerror or e}"
        if e.errno in _PATH_ERRNOS:
            raise errors.InvalidArgumentError(message) from e
        raise errors.HostFileError(message, e.errno or errno.EIO) from e


@dataclass(frozen=True)
class ExportResult:
    """What export_file wrote: length is the bytes of the image (raw), data
    the bytes written that were not left as holes."""
    name: str
    dest: str
    format: str
    length: int
    data_bytes: int


def chunk_size(pool):
    return max(CHUNK, pool.block_size)


# ---- qemu-img ----
def qemu_img_path():
    """The qemu-img binary, or None when it is not installed."""
    return shutil.which("qemu-img")


def _qemu_img(*args):
    exe = qemu_img_path()
    if exe is None:
        raise errors.InvalidArgumentError(
            "qemu-img is not installed: it is needed for image formats other than raw "
            "(Debian/Ubuntu: apt install qemu-utils; Fedora: dnf install qemu-img)")
    try:
        run = subprocess.run([exe, *args], capture_output=True, text=True,
                             timeout=QEMU_IMG_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise errors.HostFileError(f"qemu-img {args[0]} took more than {QEMU_IMG_TIMEOUT} s",
                            errno.ETIMEDOUT) from None
    if run.returncode != 0:
        msg = (run.stderr or run.stdout).strip().replace("\n", "; ")
        raise errors.InvalidArgumentError(f"qemu-img {args[0]} failed: {msg}")
    return run.stdout


def detect_format(path):
    """The image format of a file: qemu-img's answer when it is installed,
    else "raw" unless the file starts with a known image header."""
    path = os.fspath(path)
    if qemu_img_path():
        # an absolute path: qemu-img reads "name:..." as a protocol otherwise
        return json.loads(_qemu_img("info", "--output=json", "--", os.path.abspath(path)))["format"]
    with open(path, "rb") as f:
        head = f.read(_VDI_MAGIC[0] + len(_VDI_MAGIC[1]))
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            break
    else:
        if head[_VDI_MAGIC[0]:] == _VDI_MAGIC[1]:
            fmt = "vdi"
        else:
            return "raw"
    raise errors.InvalidArgumentError(
        f"{path} is a {fmt} image and qemu-img is not installed to read it "
        "(Debian/Ubuntu: apt install qemu-utils), or pass the format raw to copy its bytes "
        "as they are")


def _check_format(fmt):
    if not isinstance(fmt, str) or not fmt or not fmt.replace("-", "").replace("_", "").isalnum():
        raise errors.InvalidArgumentError(f"image format {fmt!r} is not a format name "
                                          "(raw, qcow2, vmdk, vdi, vpc, vhdx, ...)")
    return fmt.lower()


def _temp_dir(pool):
    """$TMPDIR when set, else the directory holding the pool (same disk,
    usually room), else the system's temporary directory."""
    env = os.environ.get("TMPDIR")
    if env and os.path.isdir(env):
        return os.path.abspath(env)
    near = os.path.dirname(os.path.abspath(pool.path))
    return near if os.access(near, os.W_OK | os.X_OK) else tempfile.gettempdir()


@contextlib.contextmanager
def _temp_file(directory, suffix):
    fd, path = tempfile.mkstemp(prefix=".cowblock-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# ---- sources ----
class _Source:
    """Bytes to import: a regular file read with pread and its data ranges
    known (size set), or a stream read in order (size None)."""

    def __init__(self, fd=None, size=None, stream=None):
        self.fd, self.size, self.stream = fd, size, stream
        self.eof = False

    def data_ranges(self):
        """(start, end) runs that may hold data, widened to 4 KiB and merged;
        holes of the file are left out (the whole file if SEEK_DATA fails)."""
        size, ranges, pos = self.size, [], 0
        try:
            while pos < size:
                try:
                    start = os.lseek(self.fd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data after pos
                        break
                    raise
                end = os.lseek(self.fd, start, os.SEEK_HOLE)
                start, end = start // GRAIN * GRAIN, min(round_up(end), round_up(size))
                if ranges and start <= ranges[-1][1]:
                    ranges[-1] = (ranges[-1][0], max(ranges[-1][1], end))
                else:
                    ranges.append((start, end))
                pos = max(end, pos + 1)
        except (OSError, AttributeError):
            return [(0, round_up(size))] if size else []
        return ranges

    def pread(self, length, offset):
        """Up to length bytes at offset (short only at the end of the file)."""
        out = bytearray()
        while len(out) < length:
            piece = os.pread(self.fd, length - len(out), offset + len(out))
            if not piece:
                break
            out += piece
        return out

    def read(self, length):
        """The next length bytes of the stream (short only at its end)."""
        out = bytearray()
        while len(out) < length and not self.eof:
            piece = self.stream.read(length - len(out))
            if not piece:
                self.eof = True
                break
            out += piece
        return out


def _regular_fd(obj):
    try:
        fd = obj.fileno()
        st = os.fstat(fd)
    except (AttributeError, OSError, ValueError):
        return None
    if stat.S_ISREG(st.st_mode) and os.lseek(fd, 0, os.SEEK_CUR) == 0:
        return fd
    return None


@contextlib.contextmanager
def open_source(pool, source, fmt=None):
    """A _Source for source: a path (raw, or any format qemu-img reads:
    converted to a temporary sparse raw file), "-" for stdin or a binary
    file object (raw unless fmt names another format)."""
    if fmt is not None:
        fmt = _check_format(fmt)
    if source == "-" or hasattr(source, "read"):
        stream = sys.stdin.buffer if source == "-" else source
        fd = _regular_fd(stream)
        if fmt not in (None, "raw"):
            with _temp_file(_temp_dir(pool), "." + fmt) as spool:
                with open(spool, "wb") as f:
                    shutil.copyfileobj(stream, f, CHUNK)
                with open_source(pool, spool, fmt) as src:
                    yield src
        elif fd is not None:
            yield _Source(fd=fd, size=os.fstat(fd).st_size)
        else:
            yield _Source(stream=stream)
        return
    path = os.fspath(source)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise errors.InvalidArgumentError(f"no file {path}") from None
    if stat.S_ISDIR(st.st_mode):
        raise errors.InvalidArgumentError(f"{path} is a directory, not an image file")
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        # a pipe or a character device: read in order, never probed (that would eat it)
        with open(path, "rb") as f:
            with open_source(pool, f, fmt) as src:
                yield src
        return
    fmt = fmt or detect_format(path)
    if fmt == "raw":
        with open(path, "rb") as f:
            fd = f.fileno()
            size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
            yield _Source(fd=fd, size=size)
        return
    with _temp_file(_temp_dir(pool), ".raw") as raw:
        _qemu_img("convert", "-f", fmt, "-O", "raw", "--", os.path.abspath(path), raw)
        with open_source(pool, raw, "raw") as src:
            yield src


# ---- zero detection ----
def nonzero_runs(buf, grain=GRAIN):
    """(start, end) byte runs of buf made of grain-sized chunks that are not
    all zeroes (the last chunk may be short)."""
    n = len(buf)
    full = n // grain
    flags = np.zeros(full + (1 if n % grain else 0), dtype=np.int8)
    if full:
        words = np.frombuffer(buf, dtype=np.uint64, count=full * grain // 8)
        flags[:full] = words.reshape(full, grain // 8).any(axis=1)
    if n % grain:
        flags[full] = any(memoryview(buf)[full * grain:])
    edges = np.flatnonzero(np.diff(np.concatenate(([0], flags, [0]))))
    return [(int(s) * grain, min(int(e) * grain, n)) for s, e in zip(edges[::2], edges[1::2])]


def _write_nonzero(dev, buf, offset):
    """pwrite the non-zero 4 KiB chunks of buf at offset; returns bytes written."""
    mv, written = memoryview(buf), 0
    for s, e in nonzero_runs(buf):
        dev.pwrite(mv[s:e], offset + s)
        written += e - s
    return written


# ---- import ----
def import_file(pool, name, source, *, progress=None, fmt=None, labels=None):
    """Create thin device NAME from an image file (raw, qcow2 or any format
    qemu-img reads; fmt None detects it), "-" for stdin, or a binary file
    object; returns the Device.

    Holes and 4 KiB chunks of zeroes are not written, so they use no pool
    space.  The device size is the file size rounded up to 4096; when they
    differ the exact length is kept in the label "cowblock.length".  On any
    error the device is removed again.  progress(done_bytes, total_bytes)
    is called as it goes (total None for a stream of unknown length)."""
    check_new_name(pool, name)   # before any conversion
    with host_file_errors("import", display_name(source)), open_source(pool, source, fmt) as src:
        if src.size is not None:
            return _import_sized(pool, name, src, progress, labels)
        return _import_stream(pool, name, src, progress, labels)


def display_name(source):
    """How messages name a source."""
    if source == "-":
        return "stdin"
    if hasattr(source, "read"):
        return str(getattr(source, "name", "the stream"))
    return os.fspath(source)


def check_new_name(pool, name):
    """InvalidArgumentError or DeviceExistsError unless name can be a new device."""
    catalog.check_name(name)
    if name in pool:
        raise errors.DeviceExistsError(f"a device named {name!r} exists already")


def length_labels(labels, length):
    """labels with "cowblock.length" set to length when it is not a multiple
    of 4096 (and dropped when it is)."""
    out = dict(labels or {})
    out.pop(LENGTH_LABEL, None)
    if length % GRAIN:
        out[LENGTH_LABEL] = str(length)
    return out


@contextlib.contextmanager
def removed_on_error(pool, name):
    """Delete device name if the block raises (a half-written device is
    never left behind under its name).  It is the builder's own device,
    whatever its labels say (cowblock.owners), so the removal is forced."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            if name in pool:
                pool.delete(name, force=True)
        raise


def _import_sized(pool, name, src, progress, labels):
    size = src.size
    if size == 0:
        raise errors.InvalidArgumentError(f"cannot import {name!r}: the source is empty")
    dev = pool.create_thin(name, round_up(size), labels=length_labels(labels, size),
                           _internal=True)
    step = chunk_size(pool)
    with removed_on_error(pool, name):
        if progress:
            progress(0, size)
        for start, end in src.data_ranges():
            for off in range(start, end, step):
                buf = src.pread(min(step, end - off), off)
                _write_nonzero(dev, buf, off)
                if progress:
                    progress(min(off + len(buf), size), size)
        pool.commit()
        if progress:
            progress(size, size)
    return dev


def _import_stream(pool, name, src, progress, labels):
    step = chunk_size(pool)
    buf = src.read(step)
    if not buf:
        raise errors.InvalidArgumentError(f"cannot import {name!r}: the source is empty")
    dev = pool.create_thin(name, round_up(len(buf)), labels=labels, _internal=True)
    with removed_on_error(pool, name):
        size, pos = dev.size, 0
        while buf:
            need = round_up(pos + len(buf))
            if need > size:  # grow by doubling; trimmed to the length at the end
                size = max(need, 2 * size)
                dev.resize(size)
            _write_nonzero(dev, buf, pos)
            pos += len(buf)
            if progress:
                progress(pos, None)
            buf = src.read(step)
        if dev.size != round_up(pos):
            dev.resize(round_up(pos))
        if pos % GRAIN:
            pool.set_labels(name, length_labels(labels, pos), _internal=True)
        pool.commit()
        if progress:
            progress(pos, pos)
    return dev


# ---- export ----
_EXISTS = "{} exists already (`--force` replaces it)"


def info_length(info):
    """Bytes of the image a device holds (its DeviceInfo): the exact length
    of the file it was imported from, in its "cowblock.length" label, while
    the device's size is that length rounded up to 4096; else its size.  (A
    label that does not fit is stale, left by a resize that a crash cut
    short: the whole device is the image then, nothing of it is lost.)"""
    text = info.labels.get(LENGTH_LABEL, "")
    if not (text.isascii() and text.isdigit()):
        return info.size
    length = int(text)
    return length if length and round_up(length) == info.size else info.size


def device_length(pool, name):
    """Bytes of the image device `name` holds (see info_length)."""
    return info_length(pool.info(name))


def export_file(pool, name, dest, *, progress=None, fmt="raw", overwrite=False):
    """Write device NAME to DEST ("-" for stdout) as fmt (raw, or any format
    qemu-img writes, through a temporary raw file); returns an ExportResult.

    Unmapped extents and all-zero 4 KiB chunks become holes in a regular
    file (zeroes on stdout, a pipe or a block device).  Writes exactly the
    "cowblock.length" label's bytes if the device has one, else its size.
    A regular file is written beside DEST and renamed into place at the
    end, so DEST never holds half an image; an existing DEST is refused
    unless overwrite.  progress(done_bytes, total_bytes) is called as it goes."""
    fmt = _check_format(fmt)
    dev = pool.device(name)
    length = device_length(pool, name)
    with host_file_errors("export to", "stdout" if dest == "-" else os.fspath(dest)):
        return _export(pool, dev, name, length, dest, progress, fmt, overwrite)


def _export(pool, dev, name, length, dest, progress, fmt, overwrite):
    if dest != "-":
        dest = os.fspath(dest)
        if os.path.lexists(dest) and not overwrite:
            raise errors.InvalidArgumentError(_EXISTS.format(dest))
    if fmt == "raw":
        if dest == "-":
            data = _write_raw(dev, length, sys.stdout.buffer, sparse=False, progress=progress)
        else:
            data = _to_path(dest, overwrite, lambda f, sparse, path: _write_raw(
                dev, length, f, sparse=sparse, progress=progress))
        return ExportResult(name, dest, fmt, length, data)
    with _temp_file(_temp_dir(pool), ".raw") as raw:
        with open(raw, "wb") as f:
            data = _write_raw(dev, length, f, sparse=True, progress=progress)
        if dest == "-":
            with _temp_file(_temp_dir(pool), "." + fmt) as out:
                _qemu_img("convert", "-f", "raw", "-O", fmt, "--", raw, out)
                with open(out, "rb") as f:
                    shutil.copyfileobj(f, sys.stdout.buffer, CHUNK)
                sys.stdout.buffer.flush()
        else:
            _to_path(dest, overwrite, lambda f, sparse, path: _qemu_img(
                "convert", "-f", "raw", "-O", fmt, "--", raw, path), converted=True)
    return ExportResult(name, dest, fmt, length, data)


def _to_path(dest, overwrite, write, converted=False):
    """Run write(file, sparse, path) into a new file beside dest, then move it into
    place (atomically; without overwrite only if dest is still absent).  An
    existing block or character device, or a pipe, is written in place."""
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if converted:
            raise errors.InvalidArgumentError(
                f"{dest} is not a regular file: export it as raw, or convert to a file first")
        with open(dest, "r+b" if stat.S_ISBLK(st.st_mode) else "wb") as f:
            return write(f, False, dest)
    directory = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(directory):
        raise errors.InvalidArgumentError(f"cannot export to {dest}: no directory {directory}")
    fd, tmp = _new_file_beside(dest)
    try:
        with os.fdopen(fd, "r+b") as f:
            result = write(f, True, tmp)
        if st is not None and overwrite:   # a replaced file keeps its mode, as cp's would
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
        with open(tmp, "rb") as f:  # qemu-img may have replaced the file: sync what is there
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, dest)
        else:
            try:
                os.link(tmp, dest)   # fails if dest appeared meanwhile
            except FileExistsError:
                raise errors.InvalidArgumentError(_EXISTS.format(dest)) from None
            except OSError:          # no hard links on this file system
                if os.path.lexists(dest):
                    raise errors.InvalidArgumentError(_EXISTS.format(dest)) from None
                os.rename(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return result


def _new_file_beside(dest):
    """A new empty file in dest's directory, named after it, made as open(2)
    makes files (mode 0666 less the umask, as qemu-img's and cp's are;
    mkstemp's are 0600): its descriptor and path."""
    directory, base = os.path.split(os.path.abspath(dest))
    while True:
        path = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.cowblock-export")
        try:
            return os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), path
        except FileExistsError:
            continue


def _write_raw(dev, length, f, *, sparse, progress):
    """Write the first length bytes of dev to f; returns the data bytes written.

    sparse: f is a new regular file, positioned at 0: holes are seeked over
    and the file truncated to length at the end; else every byte is written
    in order."""
    step = chunk_size(dev.pool)
    zeroes = bytes(step) if not sparse else b""
    buf = bytearray(step)
    written = 0
    fd = f.fileno() if sparse else None
    if progress:
        progress(0, length)
    for ext in dev.block_status(0, length):
        end = ext.offset + ext.length
        for off in range(ext.offset, end, step):
            n = min(step, end - off)
            if not ext.mapped:
                if not sparse:
                    f.write(memoryview(zeroes)[:n])
            else:
                view = memoryview(buf)[:n]
                dev.readinto(view, off)
                if sparse:
                    for s, e in nonzero_runs(view):
                        _pwrite_all(fd, view[s:e], off + s)
                        written += e - s
                else:
                    f.write(view)
                    written += n
            if progress:
                progress(off + n, length)
    if sparse:
        os.ftruncate(fd, length)
    else:
        f.flush()
    return written


def _pwrite_all(fd, data, offset):
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
