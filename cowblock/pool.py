"""The thin pool: devices, snapshots, transactions, over the C core.

The C core (csrc/) owns blocks, mappings, reference counts and commits;
this layer adds names and labels (cowblock.catalog), the pool lock, the
periodic commit, argument checking, and Python types for what it returns.
"""
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import threading
import uuid as _uuid
from uuid import uuid4

from . import atomic, catalog, errors, format, health, owners, rados
from ._native import check, ffi, lib
from .device import Device
from .lock import PoolLock
from .infos import CheckRecord, CheckReport, DeviceInfo, DiffRange, PoolStats, Usage
from .records import RecordStore

DEFAULT_BLOCK_SIZE = 65536
READ_ONLY_FLAG = format.DEV_READ_ONLY
DELETING_FLAG = format.DEV_DELETING   # removal deferred, reclaimed in the background
# The pool setting of a pool being built by cowblock.poolcopy: no open but
# the copy's own takes it for a pool until the copy's last commit drops it.
UNFINISHED_COPY = "unfinished_copy"
RECLAIM_CHUNK = 1 << 30  # bytes unmapped per step of a deferred removal
_DEVICE_ID = re.compile(r"\bdevice (\d+)\b")   # how the C core names a device in its errors


_CHECK_KINDS = {lib.CB_CHECK_ERROR: "error", lib.CB_CHECK_LEAK: "leak",
                lib.CB_CHECK_REPAIRED: "repaired"}
_CHECK_SPACES = {lib.CB_SPACE_METADATA: "metadata", lib.CB_SPACE_DATA: "data"}


def _of_repair(record):
    """Found by the check a repair ran first, or done by the repair."""
    return record.before_repair or record.kind == "repaired"


def _check_record(r):
    space = _CHECK_SPACES.get(r.space)
    return CheckRecord(
        kind=_CHECK_KINDS[r.kind], message=ffi.string(r.message).decode("utf-8", "replace"),
        block=r.block if space else None, space=space, device=r.device or None,
        expected=r.expected if r.has_values else None, found=r.found if r.has_values else None,
        before_repair=bool(r.before_repair))


_DIFF_KINDS = {lib.CB_DIFF_LEFT_ONLY: "left_only", lib.CB_DIFF_RIGHT_ONLY: "right_only",
               lib.CB_DIFF_DIFFERENT: "different", lib.CB_DIFF_SAME: "same"}


def _uint(what, value):
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise errors.InvalidArgumentError(f"{what} {value!r} is not an integer from 0 to 2^64 - 1")
    return value


def _pool_path(path):
    """A pool directory path as str (bytes and path-likes too); a NUL byte
    would cut the path short in C, so it is refused."""
    try:
        path = os.fsdecode(os.fspath(path))
    except TypeError:
        raise errors.InvalidArgumentError(
            f"pool path {path!r} is not a str, bytes or os.PathLike") from None
    if not path or "\0" in path:
        raise errors.InvalidArgumentError(f"pool path {path!r} is empty or has a NUL byte")
    return path


def _create_remote(path, loc, data_size, block_size, metadata_size, node_capacity):
    """Make a pool on RADOS: its superblock object (refused if the name is
    taken), its lock, then the format, written through the cache at path."""
    lock = PoolLock(path, exclusive=True)
    try:
        with rados.Remote(loc) as remote:
            remote.create()
            try:
                remote.lock()
                for name in ("data", "metadata"):   # the cache of an old pool of that name
                    try:
                        os.unlink(os.path.join(path, name))
                    except FileNotFoundError:
                        pass
                _pool_error(lib.cb_pool_create_remote(os.fsencode(path), remote.h, data_size,
                                                      block_size, metadata_size, node_capacity,
                                                      _uuid.uuid4().bytes))
            except BaseException:
                remote.destroy()   # no half-made pool keeps the name
                raise
    finally:
        lock.release()


def _unfinished_copy_of(pool):
    """The pool setting UNFINISHED_COPY (a dict), or None; an unreadable
    configuration is for the caller's own use of it to report."""
    try:
        config = pool.config
    except (errors.CowblockError, ValueError):
        return None
    marker = config.get(UNFINISHED_COPY) if isinstance(config, dict) else None
    return marker if isinstance(marker, dict) else None


def _seconds(what, value, *, none_ok, inf_ok=False):
    if value is None and none_ok:
        return value
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value)
            or value < 0 or (math.isinf(value) and not inf_ok)):
        raise errors.InvalidArgumentError(
            f"{what} {value!r} is not a{'' if inf_ok else ' finite'} number of seconds >= 0"
            + (" (or None)" if none_ok else ""))
    return value


def _pool_error(code):
    return check(code, not_found=errors.PoolNotFoundError, exists=errors.PoolExistsError)


class Pool(RecordStore):
    """A thin pool in a directory: ``Pool.create(...)`` or ``Pool.open(...)``.

    A context manager; ``close()`` commits.  One writer at a time (flock);
    changes commit at least every ``commit_interval`` seconds (the metadata,
    with the data of newly allocated blocks; data overwritten in place is
    durable at the next ``commit()``, as on a disk with a write cache).  Records (keys
    to values, cowblock.records) live beside the devices; ``atomic()`` puts
    several changes in one commit (cowblock.atomic).
    """

    def __init__(self, path, handle, read_only, lock, commit_interval, background_reclaim=True,
                 remote=None):
        self.path = os.fspath(path)
        self._h = handle
        self._remote = remote   # a pool on RADOS: its connection (cowblock.rados)
        self.read_only = read_only
        self._lock = lock
        self._names = {}      # name -> id
        self._meta = {}       # id -> (name, labels)
        self._reclaim = []    # ids of devices whose removal was deferred
        # Held by every change of names and records, and for the whole of an
        # atomic section (cowblock.atomic), so other threads wait for it.
        self._catalog_lock = threading.RLock()
        self._config_lock = threading.RLock()   # set_config and update_config, one at a time
        self._sections = atomic.new_pool_state()
        self._load_catalog()
        self.block_size = self.stats().block_size
        # What a write that finds the pool full calls before it is tried once
        # more (None: nothing): the low-water hook's wait (cowblock.lowwater).
        self.space_wait = None
        # One reclaim loop at a time: reclaim() and the background thread both
        # work on the head of the list.
        self._reclaim_lock = threading.Lock()
        self._background_reclaim = background_reclaim
        self._commit_interval = commit_interval
        self._start_threads()

    def _start_threads(self):
        self._stop = threading.Event()
        self._committer = None
        self._reclaimer = None
        if not self.read_only and self._commit_interval:
            self._committer = threading.Thread(target=self._commit_loop,
                                               args=(self._commit_interval,),
                                               name="cowblock-commit", daemon=True)
            self._committer.start()
        if not self.read_only and self._reclaim:
            self._start_reclaim()

    # ---- lifecycle ----
    @classmethod
    def create(cls, path, data_size, block_size=DEFAULT_BLOCK_SIZE, *, metadata_size=0,
               commit_interval=1.0, _node_capacity=0):
        """Create a pool directory with a data file of data_size bytes and open it."""
        _uint("data size", data_size)
        _uint("block size", block_size)
        _uint("metadata size", metadata_size)
        _seconds("commit_interval", commit_interval, none_ok=True)
        if block_size < 4096 or block_size > 1 << 30 or block_size & (block_size - 1):
            raise errors.InvalidArgumentError(
                f"block size {block_size} is not a power of two from 4096 (4 KiB) to 1073741824 (1 GiB)")
        if data_size < block_size or data_size % block_size:
            raise errors.InvalidArgumentError(
                f"data size {data_size} is not a positive multiple of the block size {block_size}")
        path = rados.resolve(_pool_path(path))
        loc = rados.location_of(path)
        if loc is not None:
            _create_remote(path, loc, data_size, block_size, metadata_size, _node_capacity)
            return cls.open(path, commit_interval=commit_interval)
        if os.path.exists(path) and not os.path.isdir(path):
            raise errors.InvalidArgumentError(
                f"cannot create a pool at {path}: it is a file, and a pool is a directory")
        if os.path.exists(os.path.join(path, "metadata")):
            raise errors.PoolExistsError(f"a pool exists at {path} already")
        _pool_error(lib.cb_pool_create(os.fsencode(path), data_size, block_size, metadata_size,
                                       _node_capacity, _uuid.uuid4().bytes))
        return cls.open(path, commit_interval=commit_interval)

    @classmethod
    def open(cls, path, read_only=False, *, timeout=0.0, commit_interval=1.0,
             background_reclaim=True, _unfinished_copy=False):
        """Open a pool.  A second writer gets PoolLockedError naming the holder,
        or waits up to ``timeout`` seconds (None: forever) for it.
        background_reclaim: reclaim deferred removals in a thread (else call
        reclaim())."""
        path = rados.resolve(_pool_path(path))
        _seconds("timeout", timeout, none_ok=True, inf_ok=True)
        _seconds("commit_interval", commit_interval, none_ok=True)
        loc = rados.location_of(path)
        if loc is None and not os.path.isfile(os.path.join(path, "metadata")):
            raise errors.PoolNotFoundError(f"no pool at {path} (no metadata file there)")
        # A RADOS pool's open empties its cache: one process on a host at a time.
        lock = PoolLock(path, exclusive=not read_only or loc is not None, timeout=timeout)
        remote = None
        try:
            out = ffi.new("cb_pool **")
            if loc is None:
                _pool_error(lib.cb_pool_open(os.fsencode(path), 1 if read_only else 0, out))
            else:
                remote = rados.Remote(loc)
                if not read_only:
                    remote.lock(timeout)
                remote.fetch(path)
                _pool_error(lib.cb_pool_open_remote(os.fsencode(path), remote.h,
                                                    1 if read_only else 0, out))
            pool = cls(path, out[0], read_only, lock, commit_interval, background_reclaim, remote)
        except BaseException:
            if remote is not None:
                remote.close()
            lock.release()
            raise
        unfinished = None if _unfinished_copy else _unfinished_copy_of(pool)
        if unfinished is not None:
            pool.close()
            raise errors.PoolNotFoundError(
                f"no pool at {path}: it holds an unfinished copy of {unfinished.get('from')} "
                "(a `cowblock pool copy` that was cut short); run the copy again, which "
                "starts it over")
        if not read_only and pool.stats().needs_check:
            report = pool.check()
            if not report.ok:
                pool.close()
                raise errors.NeedsCheckError(
                    f"pool {path} needs check (an I/O error was recorded) and its check "
                    f"found problems:\n{report}")
            check(lib.cb_pool_clear_needs_check(pool._h))
        return pool

    def close(self):
        """Commit and close.  Devices of this pool are unusable afterwards."""
        if self._h is None:
            return
        if atomic.depth(self):
            raise errors.InvalidArgumentError(
                f"pool {self.path} closed inside an atomic section: end the section first")
        self._stop.set()
        for thread in (self._committer, self._reclaimer):
            if thread:
                thread.join()
        h, self._h = self._h, None
        try:
            check(lib.cb_pool_close(h))
        finally:
            try:
                if self._remote is not None:
                    self._remote.close()   # after the last commit: unlocks
            finally:
                self._lock.release()

    @contextlib.contextmanager
    def released(self, timeout=None):
        """Commit, close and unlock the pool for the time of the block, so
        another process may open it (the low-water hook, to grow it); then
        open it again in this object, whose Device objects work on.  Waits up
        to timeout seconds (None: forever) to get the pool back."""
        space_wait = self.space_wait
        self.close()
        try:
            yield
        finally:
            again = Pool.open(self.path, self.read_only, timeout=timeout, commit_interval=None,
                              background_reclaim=False)
            state = dict(again.__dict__)
            again._h = None        # this object owns the handle and the lock now
            for key in ("_commit_interval", "_background_reclaim"):
                state.pop(key)
            self.__dict__.update(state)
            self.space_wait = space_wait
            self._start_threads()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _handle(self):
        if self._h is None:
            raise errors.PoolClosedError(f"pool {self.path} is closed")
        return self._h

    def _commit_loop(self, interval):
        while not self._stop.wait(interval):
            h = self._h
            if h is None:
                return
            if lib.cb_pool_checkpoint(h) < 0:
                return  # the pool turned read-only; callers see it on their next call

    # ---- names ----
    def _load_catalog(self):
        h = self._h
        n = lib.cb_pool_list(h, ffi.NULL, 0)
        ids = ffi.new("uint32_t[]", max(n, 1))
        n = lib.cb_pool_list(h, ids, n)
        buf = ffi.new("char[]", catalog.MAX_BYTES)
        info = ffi.new("cb_devinfo *")
        for i in range(n):
            did = ids[i]
            length = check(lib.cb_dev_catalog(h, did, buf, catalog.MAX_BYTES))
            name, labels = catalog.decode(ffi.buffer(buf, length)[:])
            check(lib.cb_dev_info(h, did, info))
            if info.flags & DELETING_FLAG:
                self._reclaim.append(did)
                continue
            self._names[name] = did
            self._meta[did] = (name, labels)

    def _id(self, name):
        if self._h is None:
            raise errors.PoolClosedError(f"pool {self.path} is closed")
        try:
            return self._names[name]
        except (KeyError, TypeError):
            raise errors.DeviceNotFoundError(f"no device named {name!r} in pool {self.path}") from None

    def _new_name(self, name):
        catalog.check_name(name)
        if name in self._names:
            raise errors.DeviceExistsError(f"a device named {name!r} exists already")
        return name

    # ---- errors ----
    def _check(self, code, **kw):
        """check(), with the devices the C core names by id named by name."""
        try:
            return check(code, **kw)
        except errors.CowblockError as e:
            raise self._named(e) from None

    def _named(self, exc):
        text = str(exc)
        named = self._name_ids(text)
        if named == text:
            return exc
        return type(exc)(named, exc.errno) if isinstance(exc, OSError) else type(exc)(named)

    def _name_ids(self, text, names=None):
        """text with "device 5" written "device 'web'" (names: id -> name;
        default this pool's devices)."""
        names = names if names is not None else {did: m[0] for did, m in self._meta.items()}

        def by_name(m):
            name = names.get(int(m.group(1)))
            return f"device {name!r}" if name is not None else m.group(0)
        return _DEVICE_ID.sub(by_name, text)

    # ---- devices ----
    def create_thin(self, name, size, *, labels=None, _internal=False, _device_uuid=None):
        """A new thin device of size bytes (a multiple of 4096), reading as zeroes.
        Labels starting with "cowblock." are cowblock's own (cowblock.owners)."""
        _uint("device size", size)
        if size == 0 or size % 4096:
            raise errors.InvalidArgumentError(
                f"device size {size} is not a positive multiple of 4096")
        if not _internal:
            owners.refuse_reserved(labels, f"create {name!r} with these labels")
        with self._catalog_lock:
            self._new_name(name)
            health.check_room_for_device(self)
            blob = catalog.encode(name, labels)
            out = ffi.new("uint32_t *")
            self._check(lib.cb_dev_create(self._handle(), size, (_device_uuid or uuid4()).bytes,
                                          blob, len(blob), out))
            self._register(out[0], name, labels)
        return Device(self, out[0])

    def snapshot(self, origin, name, read_only=False, *, labels=None, _internal=False):
        """A snapshot of origin (any device, at any depth) as it is now.

        O(1): shares the origin's mapping tree.  Includes a flush.  Writes that
        completed before the call are in it; writes started after it returns
        are not.  It holds the same image as its origin, so it keeps the
        origin's exact length (the "cowblock.length" label)."""
        if not _internal:
            owners.refuse_reserved(labels, f"snapshot {origin!r} as {name!r} with these labels")
        with self._catalog_lock:
            oid = self._id(origin)
            self._new_name(name)
            health.check_room_for_device(self)
            labels = dict(labels or {})
            length = self._meta[oid][1].get(owners.LENGTH_LABEL)
            if length is not None:
                labels.setdefault(owners.LENGTH_LABEL, length)
            blob = catalog.encode(name, labels)
            out = ffi.new("uint32_t *")
            self._check(lib.cb_dev_snapshot(self._handle(), oid, READ_ONLY_FLAG if read_only else 0,
                                            _uuid.uuid4().bytes, blob, len(blob), out))
            self._register(out[0], name, labels)
        return Device(self, out[0])

    def _register(self, did, name, labels):
        atomic.note_catalog(self, did)
        self._names[name] = did
        self._meta[did] = (name, dict(labels or {}))

    def _set_catalog(self, did, name, labels):
        """Write a device's name and labels (catalog lock held)."""
        blob = catalog.encode(name, labels)
        self._check(lib.cb_dev_set_catalog(self._handle(), did, blob, len(blob)))
        old = self._meta[did][0]
        if old != name:
            del self._names[old]
        self._register(did, name, labels)

    def _index(self, ids=None):
        """DeviceInfo by name of every device, or of those ids, in creation
        order (catalog lock held): what the owner and dependency rules read."""
        return {self._meta[did][0]: self._device_info(did)
                for did in sorted(self._meta if ids is None else ids)}

    def _ancestors(self, info):
        """The names of a device's origins, nearest first, as far as they
        still exist."""
        out, raw = [], self._info(info.id)
        while raw.origin_id and raw.origin_id in self._meta and len(out) < len(self._meta):
            out.append(self._meta[raw.origin_id][0])
            raw = self._info(raw.origin_id)
        return out

    def _is_image(self, did):
        return self._meta[did][1].get(owners.KIND_LABEL) == owners.IMAGE

    def device(self, name):
        """The device of that name."""
        return Device(self, self._id(name))

    def __contains__(self, name):
        try:
            return name in self._names
        except TypeError:  # unhashable: no device has such a name
            return False

    def delete(self, *names, deferred=False, force=False, owner=None):
        """Delete devices; every block only they used is freed.  Every name
        must exist before any device is removed.

        Refused (ProtectedError) while devices not being deleted depend on
        one of them (an image's containers and layers), or while one is
        owned by another subsystem than `owner`; force: go ahead, taking
        the references out of the dependants' labels (cowblock.owners).

        deferred: return at once; each device is marked for removal in the
        metadata (hidden, its name free again) and its blocks are reclaimed
        by a background thread, or at the next open if the pool closes first.
        Inside an atomic section every removal is deferred so (the section can
        be undone), and reclaimed once the section has ended."""
        with self._catalog_lock:
            ids = [self._id(name) for name in names]
            if len(set(ids)) != len(ids):
                raise errors.InvalidArgumentError(f"a device is named twice in {list(names)}")
            # only images have dependants: the other devices' rules need only themselves
            index = self._index(None if any(map(self._is_image, ids)) else ids)
            fixes = owners.check_delete(index, names, force=force, caller=owner)
            for dependant, labels in fixes.items():   # no label names what is gone
                self._set_catalog(self._names[dependant], dependant, labels)
            in_section = atomic.depth(self) > 0
            for name, did in zip(names, ids):
                if deferred or in_section:
                    info = self._info(did)
                    self._check(lib.cb_dev_set_flags(self._handle(), did,
                                                     info.flags | DELETING_FLAG))
                    if in_section:
                        atomic.note_delete(self, did, info.flags)
                    else:
                        self._reclaim.append(did)
                else:
                    self._check(lib.cb_dev_delete(self._handle(), did))
                del self._names[name]
                del self._meta[did]
        if deferred and not in_section:
            self._start_reclaim()

    def reclaim(self):
        """Finish every deferred removal now, in this thread."""
        self._reclaim_loop()
        return not self._reclaim

    def _start_reclaim(self):
        if not self._background_reclaim:
            return
        if self._reclaimer is None or not self._reclaimer.is_alive():
            self._reclaimer = threading.Thread(target=self._reclaim_loop,
                                               name="cowblock-reclaim", daemon=True)
            self._reclaimer.start()

    def _reclaim_loop(self):
        """Unmap deferred-removal devices a chunk at a time (each a short
        metadata change), then delete them; stops early when the pool closes."""
        with self._reclaim_lock:
            self._reclaim_pending()

    def _reclaim_pending(self):
        while self._reclaim and not self._stop.is_set():
            did = self._reclaim[0]
            h = self._h
            if h is None:
                return
            info = ffi.new("cb_devinfo *")
            if lib.cb_dev_info(h, did, info) < 0:
                self._reclaim.pop(0)
                continue
            for off in range(0, info.size, RECLAIM_CHUNK):
                if self._stop.is_set():
                    return
                if lib.cb_dev_discard(h, did, off, min(RECLAIM_CHUNK, info.size - off)) < 0:
                    return  # e.g. the pool turned read-only: the next open retries
            if lib.cb_dev_delete(h, did) < 0:
                return
            self._reclaim.pop(0)

    def pending_removals(self):
        """Devices whose deferred removal has not finished yet."""
        return len(self._reclaim)

    def wait_reclaimed(self, timeout=None):
        """Wait for deferred removals to finish (for tests and scripts)."""
        if self._reclaimer:
            self._reclaimer.join(timeout)
        return not self._reclaim

    def rename(self, old, new, *, force=False, owner=None):
        """Rename a device; labels of other devices that name it (a
        container's image, a layer's parent) follow.  An owned device is
        renamed only by its owner, or with force (cowblock.owners)."""
        with self._catalog_lock:
            did = self._id(old)
            if old == new:
                return
            self._new_name(new)
            naming = [i for i, (_, labels) in self._meta.items()
                      if any(labels.get(k) == old for k in owners.REFERENCE_LABELS)]
            fixes = owners.check_rename(self._index([did, *naming]), old, new, force=force,
                                        caller=owner)
            self._set_catalog(did, new, self._meta[did][1])
            for dependant, labels in fixes.items():
                self._set_catalog(self._names[dependant], dependant, labels)

    def set_labels(self, name, labels, *, _internal=False):
        """Replace a device's labels.  Labels starting with "cowblock." are
        cowblock's own: changing them is refused here, and the device's are
        kept."""
        with self._catalog_lock:
            did = self._id(name)
            catalog.encode(name, labels)   # refuses what is not a dict of strings
            labels = dict(labels or {})
            if not _internal:
                owners.refuse_reserved(labels, f"set the labels of {name!r}", self._meta[did][1])
                labels.update(owners.reserved(self._meta[did][1]))
            self._set_catalog(did, name, labels)

    def rollback(self, name, snapshot, *, force=False, owner=None):
        """Make device name a copy of snapshot again, in O(1) (qemu-img
        snapshot -a, lvconvert --merge): it shares the snapshot's blocks and
        takes its size and exact length.  Only to a device of its own
        lineage (a snapshot of it, or one of its origins), and not of a
        device another subsystem owns, unless force (cowblock.owners).
        Returns its DeviceInfo."""
        with self._catalog_lock:
            did, sid = self._id(name), self._id(snapshot)
            target, snap = self._device_info(did), self._device_info(sid)
            if not (target.read_only or did == sid or self.read_only):  # C refuses those first
                owners.check_rollback(target, snap, self._ancestors, force=force, caller=owner)
            self._check(lib.cb_dev_rollback(self._handle(), did, sid))
            labels = {k: v for k, v in target.labels.items() if k != owners.LENGTH_LABEL}
            if owners.LENGTH_LABEL in snap.labels:
                labels[owners.LENGTH_LABEL] = snap.labels[owners.LENGTH_LABEL]
            if labels != target.labels:
                self._set_catalog(did, name, labels)
        return self.info(name)

    def update(self, name, *, read_only=None, labels=None, force=False):
        """Change a device's read-only flag and/or labels (a dict of changes:
        a value of None or "" removes that label); returns its DeviceInfo.
        Changes of labels starting with "cowblock." (cowblock's own) are
        refused; an image is made writable only with force (cowblock.owners)."""
        if labels and not isinstance(labels, dict):
            raise errors.InvalidArgumentError(f"label changes {labels!r:.100} are not a dict")
        if labels:
            owners.refuse_reserved(labels, f"change the labels of {name!r}",
                                   self.info(name).labels)
        if read_only is not None:
            self.set_read_only(name, read_only, force=force)
        if labels:
            merged = {**self.info(name).labels, **labels}
            self.set_labels(name, {k: v for k, v in merged.items() if v not in (None, "")},
                            _internal=True)
        return self.info(name)

    def set_read_only(self, name, flag=True, *, force=False):
        """Set or clear a device's read-only flag; an image is made writable
        only with force (cowblock.owners)."""
        did = self._id(name)
        info = self._info(did)
        if not flag:
            owners.check_writable(self._device_info(did, info), force=force)
        flags = (info.flags | READ_ONLY_FLAG) if flag else (info.flags & ~READ_ONLY_FLAG)
        self._check(lib.cb_dev_set_flags(self._handle(), did, flags))
        atomic.note_flags(self, did, info.flags)

    def resize_device(self, name, size=None, *, by=None):
        """Grow or shrink device name to size bytes, or by `by` bytes
        (negative: shrink); the new size is a positive multiple of 4096.
        Shrinking drops the blocks past the new end.  A device of a new size
        no longer holds an imported file of its exact length, so that
        label ("cowblock.length") goes.  Returns its DeviceInfo."""
        if (size is None) == (by is None):
            raise errors.InvalidArgumentError("give a device's new size or the change of its "
                                              "size, one of the two")
        with self._catalog_lock:
            did = self._id(name)
            old = self._info(did).size
            if by is not None:
                if not isinstance(by, int) or isinstance(by, bool):
                    raise errors.InvalidArgumentError(f"size change {by!r} is not an integer")
                if old + by <= 0:
                    raise errors.InvalidArgumentError(
                        f"cannot shrink device {name!r} by {-by} bytes: it has {old}")
                size = old + by
            Device(self, did).resize(size)
            labels = self._meta[did][1]
            if size != old and owners.LENGTH_LABEL in labels:
                self._set_catalog(did, name, {k: v for k, v in labels.items()
                                              if k != owners.LENGTH_LABEL})
        return self.info(name)

    def _info(self, did):
        out = ffi.new("cb_devinfo *")
        self._check(lib.cb_dev_info(self._handle(), did, out))
        return out

    def _device_info(self, did, raw=None):
        raw = raw or self._info(did)
        name, labels = self._meta[did]
        origin = self._meta.get(raw.origin_id, (None,))[0] if raw.origin_id else None
        return DeviceInfo(
            name=name, id=did, uuid=str(_uuid.UUID(bytes=bytes(raw.uuid))), size=raw.size,
            mapped_blocks=raw.mapped_blocks, block_size=self.block_size,
            read_only=bool(raw.flags & READ_ONLY_FLAG), origin=origin,
            created=datetime.datetime.fromtimestamp(raw.created_ns / 1e9, datetime.timezone.utc),
            transaction_id=raw.transaction_id, labels=dict(labels),
            creation_time=raw.creation_time, snap_time=raw.snap_time)

    def info(self, name, *, usage=False):
        """A device's DeviceInfo; usage: with its exclusive and shared blocks
        (walks its tree)."""
        did = self._id(name)
        return self._with_usage(self._device_info(did), did) if usage else self._device_info(did)

    def list(self, *, usage=False):
        """Every device, in id (creation) order; usage: as info(usage=True)."""
        out = ffi.new("cb_devinfo *")
        h = self._handle()
        result = []
        with self._catalog_lock:  # no device vanishes half-way through
            for did in sorted(self._meta):
                self._check(lib.cb_dev_info(h, did, out))
                info = self._device_info(did, out)
                result.append(self._with_usage(info, did) if usage else info)
        return result

    def _usage(self, did):
        ex, sh = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        self._check(lib.cb_dev_usage(self._handle(), did, ex, sh))
        return Usage(ex[0], sh[0], self.block_size)

    def _with_usage(self, info, did):
        u = self._usage(did)
        return dataclasses.replace(info, exclusive_blocks=u.exclusive_blocks,
                                   shared_blocks=u.shared_blocks)

    def usage(self, name):
        """Exclusive and shared blocks of a device, like thin_ls (walks its tree)."""
        return self._usage(self._id(name))

    def diff(self, a, b, *, same=False):
        """Yield DiffRange runs of virtual blocks whose mappings differ between
        devices a and b; reads only the parts of their trees they do not share."""
        ida, idb = self._id(a), self._id(b)
        out, count = ffi.new("cb_range **"), ffi.new("uint64_t *")
        self._check(lib.cb_pool_diff(self._handle(), ida, idb, 1 if same else 0, out, count))
        try:
            ranges = [DiffRange(_DIFF_KINDS[r.kind], r.begin, r.length)
                      for r in (out[0][i] for i in range(count[0]))]
        finally:
            lib.cb_free(out[0])
        yield from ranges

    def mappings(self, name=None):
        """Mappings, in order, as (virtual block, data block, shared with another
        device) triples: of one device, or of every device as of one instant
        (a dict name -> list), for interchange formats such as thin_dump XML."""
        ids, counts = ffi.new("uint32_t **"), ffi.new("uint64_t **")
        keys, values = ffi.new("uint32_t **"), ffi.new("uint32_t **")
        shared, total, ndev = ffi.new("uint8_t **"), ffi.new("uint64_t *"), ffi.new("uint32_t *")
        if name is not None:
            self._check(lib.cb_dev_mappings(self._handle(), self._id(name), keys, values, shared,
                                            total))
        else:
            with self._catalog_lock:
                self._check(lib.cb_pool_mappings(self._handle(), ids, counts, ndev, keys, values,
                                                 shared, total))
                names = {did: self._meta[did][0] for did in ffi.unpack(ids[0], ndev[0])}
        try:
            n = total[0]
            triples = list(zip(ffi.unpack(keys[0], n), ffi.unpack(values[0], n),
                               map(bool, ffi.unpack(shared[0], n)))) if n else []
            if name is not None:
                return triples
            out, at = {}, 0
            for did, cnt in zip(ffi.unpack(ids[0], ndev[0]), ffi.unpack(counts[0], ndev[0])):
                if did in names:
                    out[names[did]] = triples[at:at + cnt]
                at += cnt
            return out
        finally:
            for ptr in (ids[0], counts[0], keys[0], values[0], shared[0]):
                lib.cb_free(ptr)

    def add_mappings(self, name, pairs):
        """Map (virtual block, data block) pairs, sorted, into an empty device:
        restoring from an interchange format.  Each data block gains a reference."""
        try:
            pairs = [(k, v) for k, v in pairs]
            keys = ffi.new("uint32_t[]", [k for k, _ in pairs] or [0])
            values = ffi.new("uint32_t[]", [v for _, v in pairs] or [0])
        except (TypeError, ValueError, OverflowError) as e:
            raise errors.InvalidArgumentError(
                "mappings must be (virtual block, data block) pairs of integers from 0 to "
                f"2^32 - 1: {e}") from None
        self._check(lib.cb_dev_add_mappings(self._handle(), self._id(name), keys, values,
                                            len(pairs)))

    # ---- whole data blocks, for copying a pool (cowblock.poolcopy) ----
    def read_data(self, first, count, out=None):
        """count whole data blocks from data block first on: into out (a
        writable buffer of at least that many bytes), else a new bytearray;
        returns the buffer."""
        _uint("data block", first)
        _uint("block count", count)
        buf = bytearray(count * self.block_size) if out is None else out
        if memoryview(buf).nbytes < count * self.block_size:
            raise errors.InvalidArgumentError(
                f"a buffer of {memoryview(buf).nbytes} bytes cannot hold {count} blocks")
        check(lib.cb_pool_read_data(self._handle(), first, count,
                                    ffi.from_buffer(buf, require_writable=True)))
        return buf

    def write_data(self, first, buf):
        """Write whole data blocks from data block first on; only blocks that
        no device maps (BusyError otherwise), so nothing any device reads
        changes.  Durable at the next commit."""
        _uint("data block", first)
        view = memoryview(buf).cast("B")
        if view.nbytes % self.block_size:
            raise errors.InvalidArgumentError(
                f"{view.nbytes} bytes are not whole blocks of {self.block_size}")
        check(lib.cb_pool_write_data(self._handle(), first, view.nbytes // self.block_size,
                                     ffi.from_buffer(view)))

    def set_history(self, name, info, origin=None):
        """Give device name the creation time and dm-thin times of info (the
        DeviceInfo of the device it copies) and origin (a device name, or None)."""
        did, oid = self._id(name), self._id(origin) if origin is not None else 0
        self._check(lib.cb_dev_set_history(self._handle(), did, oid,
                                           int(info.created.timestamp() * 1e9),
                                           info.creation_time, info.snap_time))

    # ---- atomic sections (cowblock.atomic) ----
    def atomic(self, *, commit=True):
        """A context manager: the changes made in it by this thread land in
        one commit (made as it ends, or with commit=False left to the next
        one); if its body raises, what it did is undone first."""
        return atomic.Section(self, commit)

    def _section_journal(self):
        return atomic.journal(self)

    # ---- pool ----
    def stats(self):
        s = ffi.new("cb_stats *")
        check(lib.cb_pool_stats(self._handle(), s))
        return PoolStats(
            block_size=s.data_block_size, data_blocks=s.nr_data_blocks, data_used=s.data_used,
            data_free=s.data_free, metadata_used_bytes=s.meta_used * format.META_BLOCK_SIZE,
            metadata_capacity_bytes=s.nr_meta_blocks * format.META_BLOCK_SIZE,
            metadata_reserve_bytes=s.meta_reserve * format.META_BLOCK_SIZE,
            transaction_id=s.transaction_id,
            devices=s.nr_devices, needs_check=bool(s.needs_check), read_only=bool(s.read_only),
            uuid=str(_uuid.UUID(bytes=bytes(s.pool_uuid))), node_capacity=s.node_capacity,
            time=s.snap_time)

    def commit(self):
        """Make every change so far durable, atomically; returns the transaction id."""
        check(lib.cb_pool_commit(self._handle()))
        return self.stats().transaction_id

    def resize(self, data_size):
        """Grow the data file to data_size bytes (pools only grow)."""
        _uint("data size", data_size)
        check(lib.cb_pool_resize(self._handle(), data_size))

    def resize_metadata(self, metadata_size):
        """Grow the metadata capacity to metadata_size bytes."""
        _uint("metadata size", metadata_size)
        check(lib.cb_pool_resize_metadata(self._handle(), metadata_size))

    @property
    def config(self):
        """Pool settings (a dict) kept in the superblock, committed atomically."""
        buf = ffi.new("char[]", format.POOL_CONFIG_MAX)
        n = check(lib.cb_pool_config(self._handle(), buf, format.POOL_CONFIG_MAX))
        return json.loads(ffi.buffer(buf, n)[:]) if n else {}

    def set_config(self, settings):
        """Replace the pool settings: a dict of JSON values, with string keys."""
        if not isinstance(settings, dict):
            raise errors.InvalidArgumentError(
                f"pool configuration {settings!r:.100} is not a dict")
        if "health" in settings:
            if not isinstance(settings["health"], dict):
                raise errors.InvalidArgumentError(
                    f"health settings {settings['health']!r:.100} are not a dict")
            health.validate(settings["health"])
        try:
            blob = json.dumps(settings, separators=(",", ":"), sort_keys=True,
                              allow_nan=False).encode()
        except (TypeError, ValueError) as e:
            raise errors.InvalidArgumentError(f"pool configuration is not plain JSON: {e}") from None
        with self._config_lock:
            check(lib.cb_pool_set_config(self._handle(), blob, len(blob)))

    def update_config(self, key, value):
        """Set one top-level key of the settings, keeping the others: no
        set_config of another thread lands between the read and the write."""
        if not isinstance(key, str):
            raise errors.InvalidArgumentError(f"pool configuration key {key!r:.100} is not a string")
        with self._config_lock:
            config = self.config
            config[key] = value
            self.set_config(config)

    def trim(self):
        """Give unused data-file space back to the host (punch holes in free
        blocks, like thin_trim); returns the bytes released."""
        data = os.path.join(self.path, "data")
        before = os.stat(data).st_blocks
        out = ffi.new("uint64_t *")
        check(lib.cb_pool_trim(self._handle(), out))
        return max(0, before - os.stat(data).st_blocks) * 512

    def check(self, repair=False):
        """Verify all metadata (like thin_check); commits first when writable.

        repair: set every reference count from the trees (leaks, miscounts),
        then check again; refused when the trees themselves are damaged.  It
        also takes the pool files' permissions back to owner-only."""
        summary = ffi.new("cb_check_summary *")
        out, count = ffi.new("cb_check_record **"), ffi.new("uint64_t *")
        fn = lib.cb_pool_repair if repair else lib.cb_pool_check
        check(fn(self._handle(), summary, out, count))
        try:
            records = [_check_record(out[0][i]) for i in range(count[0])]
        finally:
            lib.cb_free(out[0])
        done = [r for r in records if _of_repair(r)]
        if any(r.kind == "repaired" for r in done):
            with self._catalog_lock:  # devices whose trees were lost are gone
                self._names.clear()
                self._meta.clear()
                self._load_catalog()
        if repair:
            done += [CheckRecord("repaired", line) for line in health.tighten_permissions(self.path)]
        return CheckReport(ok=summary.errors == 0 and summary.leaks == 0,
                           error_count=summary.errors, leak_count=summary.leaks,
                           nodes_checked=summary.nodes_checked,
                           blocks_checked=summary.blocks_checked,
                           records=[r for r in records if not _of_repair(r)], repair_records=done,
                           warnings=health.permission_warnings(self.path))

    def _counters(self):
        w, v = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        lib.cb_pool_counters(self._handle(), w, v)
        return w[0], v[0]

    def __repr__(self):
        state = "closed" if self._h is None else ("read-only" if self.read_only else "open")
        return f"<cowblock.Pool {self.path!r} {state}>"
