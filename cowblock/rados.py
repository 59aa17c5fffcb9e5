"""Pools on Ceph RADOS: the location ``rados:CEPHPOOL/NAME``.

The pool's data and metadata live as RADOS objects (csrc/remote.c, behind
the C core's I/O seam); this host keeps a cache directory of the two files
the engine maps (emptied at every open, filled from the objects as reads
need them: csrc/remote.c), plus the marker ``rados.json`` that says where
the pool really is.  Everything that takes a
pool directory (the daemon, its runtime directory, the pool lock) takes the
cache directory, and opening it opens the pool on RADOS.

  cache root   $COWBLOCK_RADOS_CACHE, else $XDG_CACHE_HOME/cowblock/rados,
               else ~/.cache/cowblock/rados; the pool's cache is
               ROOT/CEPHPOOL/NAME
  cluster      the ceph.conf named at first use (--ceph-conf, $CEPH_CONF),
               else Ceph's own search; $CEPH_ARGS for --id, --keyring
  cache size   $COWBLOCK_RADOS_CACHE_SIZE (4096, 512M, 1G, ...; 0: no
               bound), else 1G: the most data the cache keeps; past it the
               least recently used clean data is dropped (csrc/remote.c)

One writer at a time across hosts: the RADOS exclusive lock on the pool's
superblock object (its cookie names host and process) and a fencing epoch
compared by every superblock write.  On one host, a RADOS pool is opened by
one process at a time (readers too: an open empties the cache), so share it
through its daemon.
"""
import json
import os
import re
import socket
import time
import uuid

from . import errors
from ._native import check, ffi, lib
from .sizes import parse_size

PREFIX = "rados:"
MARKER = "rados.json"
CONNECT_TIMEOUT = 30.0
# As Ceph's own host-side cache of RADOS objects (the immutable object
# cache, immutable_object_cache_max_size): 1 GiB unless set.
CACHE_SIZE = "1G"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,126}")


class Location:
    """Where a pool on RADOS is: Ceph pool, pool name, ceph.conf (or None)."""

    def __init__(self, ceph_pool, name, conf=None):
        self.ceph_pool, self.name, self.conf = ceph_pool, name, conf

    def __str__(self):
        return f"{PREFIX}{self.ceph_pool}/{self.name}"


def is_location(path):
    return isinstance(path, str) and path.startswith(PREFIX)


def parse(text):
    """The Location a ``rados:CEPHPOOL/NAME`` string names."""
    spec = text[len(PREFIX):]
    pool, sep, name = spec.partition("/")
    if not sep or not _NAME.fullmatch(pool) or not _NAME.fullmatch(name):
        raise errors.InvalidArgumentError(
            f"pool location {text!r} is not rados:CEPHPOOL/NAME (names of letters, digits, '.', "
            "'_' and '-', up to 127, not starting with a dot or dash)")
    conf = os.environ.get("CEPH_CONF") or None
    return Location(pool, name, os.path.abspath(conf) if conf else None)


def cache_root():
    if os.environ.get("COWBLOCK_RADOS_CACHE"):
        return os.environ["COWBLOCK_RADOS_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cowblock", "rados")


def cache_size():
    """Bytes of data a pool's cache on this host may keep (0: no bound)."""
    text = os.environ.get("COWBLOCK_RADOS_CACHE_SIZE") or CACHE_SIZE
    return parse_size(text, "$COWBLOCK_RADOS_CACHE_SIZE")


def cache_dir(text):
    """The cache directory of the pool a ``rados:`` location names, made
    (0700) with its marker: the directory every other layer takes as the
    pool's."""
    loc = parse(text)
    path = os.path.join(cache_root(), loc.ceph_pool, loc.name)
    os.makedirs(path, mode=0o700, exist_ok=True)
    marker = os.path.join(path, MARKER)
    tmp = marker + f".{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"ceph_pool": loc.ceph_pool, "name": loc.name, "ceph_conf": loc.conf}, f)
    os.replace(tmp, marker)
    return path


def location_of(path):
    """The Location of the pool whose cache directory is path, or None (a
    local pool)."""
    try:
        with open(os.path.join(path, MARKER)) as f:
            m = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError) as e:
        raise errors.InvalidArgumentError(f"{path}/{MARKER} is unreadable: {e}") from None
    return Location(m["ceph_pool"], m["name"], m.get("ceph_conf"))


def resolve(path):
    """A pool path as a directory: a ``rados:`` location becomes its cache
    directory; anything else stays as it is."""
    return cache_dir(path) if is_location(path) else path


def cookie():
    """This writer, for the lock's holder list: host, process, and a random
    part so that a reused pid is not taken for the old holder."""
    return f"{socket.gethostname()}:pid={os.getpid()}:{uuid.uuid4().hex[:8]}"


class Remote:
    """A connection to the cluster for one pool (cb_remote in C)."""

    def __init__(self, loc, timeout=CONNECT_TIMEOUT):
        self.location = loc   # (built without librados, connecting says what to install)
        out = ffi.new("cb_remote **")
        check(lib.cb_remote_connect(os.fsencode(loc.conf) if loc.conf else ffi.NULL,
                                    loc.ceph_pool.encode(), loc.name.encode(), timeout, out),
              not_found=errors.CephPoolNotFoundError)
        self.h = out[0]

    def create(self):
        check(lib.cb_remote_create(self.h), exists=errors.PoolExistsError)

    def lock(self, timeout=0.0):
        """Take the pool's lock, waiting up to timeout seconds (None: for
        ever) for a live holder.  A dead holder (its watch no longer answers
        a notify in 5 s) is blocklisted and its lock broken."""
        deadline = None if timeout is None else time.monotonic() + timeout
        me = cookie().encode()
        while True:
            try:
                check(lib.cb_remote_lock(self.h, me, b"cowblock writer"),
                      not_found=errors.PoolNotFoundError)
                return
            except errors.BusyError as e:
                if deadline is not None and time.monotonic() >= deadline:
                    waited = f" after waiting {timeout:g} s" if timeout else ""
                    raise errors.PoolLockedError(f"{e}{waited}", e.errno) from None
            time.sleep(0.5)

    def fetch(self, path):
        """Make path's files the pool's (empty) cache, with its superblock,
        bounded by cache_size()."""
        check(lib.cb_remote_set_cache_limit(self.h, cache_size()))
        check(lib.cb_remote_fetch(self.h, os.fsencode(path)), not_found=errors.PoolNotFoundError)

    def cache_metadata(self):
        """All of the metadata into the cache (for a raw copy of the file)."""
        check(lib.cb_remote_cache_metadata(self.h))

    def destroy(self):
        check(lib.cb_remote_destroy(self.h))

    def requests(self):
        """Requests sent so far: reads (data_reads of them of data objects),
        writes (data_writes of them of data objects), removes; fetched_bytes,
        read from RADOS into the cache; cached_bytes of data the cache holds
        now, evicted_bytes dropped from it."""
        return {k: lib.cb_remote_requests(self.h, i)
                for i, k in enumerate(("reads", "writes", "removes", "data_reads",
                                       "fetched_bytes", "data_writes", "cached_bytes",
                                       "evicted_bytes"))}

    def close(self):
        h, self.h = self.h, None
        if h is not None:
            check(lib.cb_remote_close(h))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def destroy(text):
    """Remove the pool a ``rados:`` location names from RADOS (taking its
    lock first, so not while a writer has it) and its cache here."""
    path = cache_dir(text)
    with Remote(location_of(path)) as remote:
        remote.lock()
        remote.destroy()
    for name in ("data", "metadata", "lock", MARKER):
        try:
            os.unlink(os.path.join(path, name))
        except FileNotFoundError:
            pass
