"""Blobs of an image archive, read in place, and checked as they are read.

An archive is a directory (an OCI image layout) or a tar (a `docker save`
tar, an oci-archive).  Neither is extracted: a tar is indexed once (its
members' data offsets, as tarfile finds them) and each blob is read with
pread from its offset, so blobs are random access and nothing is written
to disk.

A layer blob is streamed: LayerReader decompresses it (gzip with ISA-L's
inflate, python-isal's igzip: the same format, half zlib's CPU time; zstd;
or none) and hashes both sides as the caller reads, and at the end of the
stream checks the blob's size and sha256 against its descriptor and the
uncompressed sha256 against the config's diff_id.  A mismatch raises
BlobError from that last read, so a caller that reads to the end (apply
does) learns of it before it commits anything.
"""
import gzip
import hashlib
import io
import os
import posixpath
import stat
import tarfile
import zlib

from isal import igzip, isal_zlib

from .errors import BlobError, HostFileError, ImageError
from .refs import DIGEST_RE

CHUNK = 1 << 20
JSON_LIMIT = 16 << 20          # a manifest, index or config larger than this is refused
MAX_MEMBERS = 1 << 20          # members of an archive tar
_LINK_DEPTH = 16

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def check_digest(digest, what):
    """DIGEST if it is a sha256 digest (the only algorithm an archive here
    may use); ImageError naming WHAT otherwise."""
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise ImageError(f"{what}: digest {digest!r} is not sha256: and 64 lower-case hex "
                         "digits (other algorithms are not supported)")
    return digest


def blob_path(digest):
    """Where an OCI layout keeps the blob of DIGEST."""
    return "blobs/sha256/" + digest[len("sha256:"):]


def sniff(head):
    """The compression of data starting with HEAD: 'gzip', 'zstd' or 'none'."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class Region:
    """SIZE bytes at OFFSET of an open file: one blob."""

    def __init__(self, fd, offset, size, name, owned):
        self.fd, self.offset, self.size, self.name = fd, offset, size, name
        self._owned = owned

    def pread(self, n, pos):
        """Up to N bytes at POS of the blob; BlobError if the file ends before it does."""
        n = max(0, min(n, self.size - pos))
        if n == 0:
            return b""
        try:
            data = os.pread(self.fd, n, self.offset + pos)
        except OSError as e:
            raise HostFileError(f"cannot read {self.name}: {e.strerror}", e.errno) from None
        if len(data) < n:
            raise BlobError(f"{self.name} is truncated: the file ends at byte "
                            f"{pos + len(data)} of {self.size}")
        return data

    def read_all(self):
        return self.pread(self.size, 0)

    def close(self):
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1


class DirStore:
    """The files of an OCI image layout directory."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def exists(self, name):
        return os.path.isfile(os.path.join(self.path, name))

    def open(self, name):
        full = os.path.join(self.path, name)
        try:
            fd = os.open(full, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ImageError(f"{self.path}: {name} is missing") from None
        except OSError as e:
            raise HostFileError(f"cannot open {full}: {e.strerror}", e.errno) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ImageError(f"{full} is not a regular file")
        return Region(fd, 0, st.st_size, full, owned=True)

    def close(self):
        pass


def _member_name(name):
    name = posixpath.normpath("/" + name).lstrip("/")
    return "" if name == "." else name


class TarStore:
    """The members of a tar (read where they lie: never extracted)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise HostFileError(f"cannot open {self.path}: {e.strerror}", e.errno) from None
        try:
            self._members = self._index()
        except BaseException:
            os.close(self._fd)
            raise

    def _index(self):
        head = os.pread(self._fd, 4, 0)
        kind = sniff(head)
        if kind != "none":
            raise ImageError(f"{self.path} is {kind}-compressed: decompress it first "
                             f"({'gunzip' if kind == 'gzip' else 'unzstd'}); archives are "
                             "read in place, which needs a plain tar")
        members = {}
        with open(self._fd, "rb", closefd=False) as f:
            try:
                with tarfile.open(fileobj=f, mode="r:") as tf:
                    for m in tf:
                        if len(members) >= MAX_MEMBERS:
                            raise ImageError(f"{self.path} has over {MAX_MEMBERS} members: "
                                             "not an image archive")
                        members[_member_name(m.name)] = m
            except tarfile.TarError as e:
                raise ImageError(f"{self.path} is not a tar archive ({e})") from None
        return members

    def exists(self, name):
        try:
            self._resolve(name)
            return True
        except ImageError:
            return False

    def _resolve(self, name):
        name = _member_name(name)
        for _ in range(_LINK_DEPTH):
            m = self._members.get(name)
            if m is None:
                raise ImageError(f"{self.path}: {name} is missing from the archive")
            if m.issym():
                target = m.linkname
                base = posixpath.dirname(name)
            elif m.islnk():
                target, base = m.linkname, ""
            elif m.isreg() and not m.issparse():
                return m
            else:
                raise ImageError(f"{self.path}: member {name} is not a regular file")
            joined = posixpath.normpath(posixpath.join(base, target))
            if target.startswith("/") or joined == ".." or joined.startswith("../"):
                raise ImageError(f"{self.path}: member {name} links outside the archive "
                                 f"({target!r})")
            name = joined
        raise ImageError(f"{self.path}: member {name} is a chain of more than "
                         f"{_LINK_DEPTH} links")

    def open(self, name):
        m = self._resolve(name)
        return Region(self._fd, m.offset_data, m.size, f"{self.path}:{_member_name(name)}",
                      owned=False)

    def close(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_small(store, name, what):
    """The whole of a small file of the archive (index.json, manifest.json)."""
    region = store.open(name)
    try:
        if region.size > JSON_LIMIT:
            raise ImageError(f"{region.name}: {what} of {region.size} bytes is over the "
                             f"limit of {JSON_LIMIT}")
        return region.read_all()
    finally:
        region.close()


def read_blob(store, digest, size, what):
    """The bytes of a small blob (manifest, index, config), checked against
    its descriptor's digest and size."""
    region = open_blob(store, digest, size, what)
    try:
        if size > JSON_LIMIT:
            raise ImageError(f"{what} {digest} of {size} bytes is over the limit of {JSON_LIMIT}")
        data = region.read_all()
    finally:
        region.close()
    found = "sha256:" + hashlib.sha256(data).hexdigest()
    if found != digest:
        raise BlobError(f"{what} {digest}: its bytes have sha256 {found}")
    return data


def open_blob(store, digest, size, what):
    """The Region of a blob, whose size must be its descriptor's."""
    region = store.open(blob_path(digest))
    if size is not None and region.size != size:
        region.close()
        how = "truncated: " if region.size < size else ""
        raise BlobError(f"{what} {digest} is {how}{region.size} bytes in the archive, its "
                        f"descriptor says {size}")
    return region


class _HashingReader:
    """Sequential reads of a Region, hashing what goes by."""

    def __init__(self, region):
        self.region, self.pos = region, 0
        self.sha = hashlib.sha256()

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.region.size - self.pos
        data = self.region.pread(min(n, CHUNK * 4), self.pos)
        self.pos += len(data)
        self.sha.update(data)
        return data

    def readinto(self, buf):    # (igzip reads so)
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def readable(self):
        return True


class LayerReader(io.RawIOBase):
    """A layer's uncompressed tar bytes, checked at the end of the stream.

    DIGEST (None: not known, as for a legacy docker-save layer.tar) and
    SIZE are the blob's; DIFF_ID is the uncompressed sha256.  COMPRESSION is
    'gzip', 'zstd', 'none', or None to tell from the first bytes."""

    def __init__(self, region, *, compression, digest, size, diff_id, label):
        super().__init__()
        self.name = label
        self._region = region
        self._digest, self._size, self._diff_id = digest, size, diff_id
        self._raw = _HashingReader(region)
        if compression is None:
            compression = sniff(region.pread(4, 0))
        self.compression = compression
        self._sha = hashlib.sha256() if compression != "none" else None
        self._count = 0
        self._done = False
        self._zstd_error = ()
        if compression == "gzip":
            self._decoder = igzip.GzipFile(fileobj=self._raw, mode="rb")
        elif compression == "zstd":
            import zstandard
            self._zstd_error = zstandard.ZstdError
            self._decoder = zstandard.ZstdDecompressor().stream_reader(
                self._raw, read_size=CHUNK, read_across_frames=True, closefd=False)
        elif compression == "none":
            self._decoder = self._raw
        else:
            raise ValueError(f"unknown compression {compression!r}")

    def readable(self):
        return True

    def readinto(self, buf):
        data = self.read(len(buf))
        buf[:len(data)] = data
        return len(data)

    def read(self, n=-1):
        if self._done:
            return b""
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        try:
            data = self._decoder.read(n)
        except (BlobError, HostFileError):
            raise
        except Exception as e:
            if not isinstance(e, (gzip.BadGzipFile, igzip.BadGzipFile, EOFError, zlib.error,
                                  isal_zlib.error, self._zstd_error)):
                raise
            raise BlobError(f"{self.name}: the blob is not valid {self.compression} data "
                            f"({e or type(e).__name__})") from None
        if data:
            self._count += len(data)
            if self._sha is not None:
                self._sha.update(data)
            return data
        self._finish()
        return b""

    def _finish(self):
        self._done = True
        raw = self._raw
        if raw.pos < self._region.size:
            raise BlobError(f"{self.name}: {self._region.size - raw.pos} bytes follow the end "
                            f"of the {self.compression} stream in blob {self._digest}")
        found = "sha256:" + raw.sha.hexdigest()
        if self._digest is not None and found != self._digest:
            raise BlobError(f"{self.name}: blob {self._digest} has sha256 {found}: "
                            "it is damaged or altered")
        uncompressed = found if self._sha is None else "sha256:" + self._sha.hexdigest()
        if uncompressed != self._diff_id:
            raise BlobError(f"{self.name}: its uncompressed bytes have sha256 {uncompressed}, "
                            f"the config's diff_id is {self._diff_id}")

    @property
    def uncompressed_bytes(self):
        return self._count

    def close(self):
        if not self.closed:
            self._region.close()
        super().close()
