"""ext4 filesystems on thin devices, layered: what OCI images (cowblock.oci
through `cowblock image load`) and containerd's snapshots (`cowblock
snapshotter`) are stored as.  One recipe, one sizing rule, one owner, so the
two share layers.

  recipe     mkfs.ext4 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0,
             as containerd's devmapper snapshotter makes its filesystems:
             everything is written at mkfs time, so no lazy initialisation
             writes behind a container's back; `lost+found` is removed (an
             image's rootfs has none).  RECIPE names it: changing the mkfs
             options means a new RECIPE, and layers of another recipe are
             never shared.
  size       every layer of a chain has the same filesystem size (chosen when
             its bottom layer is made; default DEFAULT_SIZE, sparse: an empty
             8 GiB ext4 takes about 130 MiB of pool space, shared by every
             layer and container above it).  A layer is identified by its
             filesystem (RECIPE and size: the "fs key") and its OCI chain
             ID, so two images, or an image and containerd, share a layer
             device exactly when both agree.
  template   one read-only empty filesystem per fs key, made once; a bottom
             layer is a snapshot of it, so no mkfs runs while an image loads
             or while containerd waits for a Prepare.
  owner      every device here is owned by "layers" (cowblock.owners): plain
             `cowblock rm/rename/rollback` refuse them without --force.

Records (the pool's records store, committed with the devices they name):
  layers/template/FSKEY            {"device", "bytes"}
  layers/layer/FSKEY/CHAINID       {"device", "chain_id", "diff_id", "parent", "size",
                                   "bytes"}; bytes: the pool space the layer itself
                                   takes (blocks it maps differently from its parent)
  layers/building/DEVICE           {"key"}: a device being made; what a crash leaves
                                   of one is removed by remove_leftovers() and prune()

Users.  A layer stays while a user keeps it.  Each user of layers keeps
records under its own prefix, listed in USERS; every record there whose
value is a JSON object with "fs_key" and "chain_ids" keeps those layers
(kept() reads them all; prune() removes every layer nothing keeps).
Besides, kept() keeps the chains of loads running in this process
(pinned()) and every layer that a device outside this module is a
snapshot of (a container's origin).  A new user (containerd's snapshotter)
adds its prefix to USERS and writes "fs_key" and "chain_ids" into its
records; nothing else is needed for prune() to leave its layers alone.
discard() removes given layers nothing keeps (what a failed load built,
and the template it made; what a removed image's records kept).

A layer is built as a writable snapshot of its parent (or the template)
recorded as building, changed (mounted, the OCI layer applied, synced,
unmounted), then in one atomic section made read-only, renamed to its final
name and recorded as a layer (with what the caller commits along with it:
on_publish).  So a crash leaves finished layers (which the next load reuses) and
building leftovers (which it removes), never a half-applied layer marked done.

These functions run in the pool's daemon (they mount devices); `d` is the
PoolDaemon.
"""
import collections
import contextlib
import ctypes
import json
import os
import shutil
import threading
import time
import uuid

from . import errors, owners, runtime
from .attach import blockdev

FSTYPE = "ext4"
MKFS_OPTIONS = ("-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0")
RECIPE = "ext4.1"
DEFAULT_SIZE = 8 << 30
OWNER = "layers"
PREFIX = b"layers/"
TEMPLATE, LAYER, BUILDING = "template", "layer", "building"

# The users of layers: records prefix -> who keeps records there (see above).
USERS = {b"images/ref/": "OCI images (cowblock.ociimages)"}

_locks = {}
_locks_lock = threading.Lock()
_pins = collections.Counter()     # (fs key, chain id) -> loads of this process using it
_in_progress = set()              # building devices this process is making
_users_lock = threading.RLock()   # kept() and prune() against pins being taken


def fs_key(size):
    """What identifies a layer's filesystem besides its chain: recipe and size."""
    return f"{RECIPE}:{size}"


def _key(*parts):
    return PREFIX + "/".join(parts).encode()


def _json(pool, key):
    raw = pool.get_record(key)
    return json.loads(raw) if raw is not None else None


@contextlib.contextmanager
def _building(key):
    """One builder per key at a time in this daemon: a second load of the same
    layer waits, then finds it made."""
    with _locks_lock:
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        yield


def check_size(size):
    if not isinstance(size, int) or isinstance(size, bool) or size < 64 << 20 or size % 4096:
        raise errors.InvalidArgumentError(
            f"filesystem size {size!r} is not a multiple of 4096 of at least 64 MiB")
    return size


def _device_name(kind, size, ident):
    return f"{kind}-{size >> 20}m-{ident}"


def template(d, size):
    """The read-only empty filesystem of this size: made once, then reused."""
    pool, key = d.pool, _key(TEMPLATE, fs_key(check_size(size)))
    with _building(key):
        rec = _json(pool, key)
        if rec and rec["device"] in pool:
            return rec["device"]
        name = _device_name("ext4-template", size, uuid.uuid4().hex[:8])

        def make(tmp):
            path = d.attach_file(tmp, False)
            try:
                blockdev.run("mkfs.ext4", "-q", "-F", *MKFS_OPTIONS, path, what="mkfs.ext4")
                blockdev.run("debugfs", "-w", "-R", "rmdir lost+found", path,
                             what="removing lost+found")
            finally:
                _release_file(d, tmp)
        return _build(d, key, name, None, size, make, {"device": name})


def find(pool, size, chain_id):
    """The device of the layer with this chain on a filesystem of this size,
    or None."""
    rec = _json(pool, _key(LAYER, fs_key(size), chain_id))
    return rec["device"] if rec and rec["device"] in pool else None


def layer(d, size, chain_id, parent, apply, *, diff_id=None, on_publish=None):
    """The device of layer chain_id of size `size`, built if missing: a
    snapshot of `parent` (a layer device, or None for the template) with
    apply(root_directory) run on its mounted filesystem.  on_publish(pool,
    device) runs inside the atomic section that publishes a layer built
    here (not when it was found made), so what it records commits with it."""
    pool, key = d.pool, _key(LAYER, fs_key(size), chain_id)
    with _building(key):
        found = find(pool, size, chain_id)
        if found:
            return found
        origin = parent or template(d, size)
        hexid = chain_id.split(":")[-1]
        name = _device_name("layer", size, hexid[:24])

        def make(tmp):
            root = os.path.join(d.runtime.path, runtime.BUILD, tmp)
            mount = d.mount(tmp, root)
            try:
                apply(root)
                syncfs(root)
            finally:
                d.umount(mount.dir)
                with contextlib.suppress(OSError):
                    os.rmdir(root)
        return _build(d, key, name, origin, size, make,
                      {"device": name, "chain_id": chain_id, "diff_id": diff_id,
                       "parent": parent, "size": size}, on_publish)


_libc = None


def syncfs(path):
    """syncfs(2) of the filesystem holding path: only that one (os.sync
    writes back every filesystem of the host)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise errors.HostFileError(f"syncfs of {path}: {os.strerror(err)}", err)
    finally:
        os.close(fd)


def _own_bytes(pool, origin, name):
    """Pool bytes device `name` maps differently from `origin` (all it maps
    when it has none): the space the device itself adds."""
    if origin is None:
        return pool.info(name).mapped_bytes
    blocks = sum(r.length for r in pool.diff(origin, name) if r.kind != "left_only")
    return blocks * pool.block_size


def _build(d, key, name, origin, size, make, record, on_publish=None):
    """Make device `name` recorded under key: as a snapshot of origin (or a
    new device), changed by make(tmp_name), published atomically."""
    pool = d.pool
    tmp = f"building-{uuid.uuid4().hex[:16]}"
    labels = {owners.OWNER_LABEL: OWNER, owners.KIND_LABEL: BUILDING}
    _in_progress.add(tmp)
    try:
        with pool.atomic():
            if origin is None:
                pool.create_thin(tmp, size, labels=labels, _internal=True)
            else:
                pool.snapshot(origin, tmp, labels=labels, _internal=True)
            pool.put_record(_key(BUILDING, tmp), json.dumps({"key": key.decode()}).encode())
        try:
            make(tmp)
            record = dict(record, bytes=_own_bytes(pool, origin, tmp))
            with pool.atomic():
                pool.set_read_only(tmp, True)
                pool.rename(tmp, name, owner=OWNER)
                pool.set_labels(name, {owners.OWNER_LABEL: OWNER,
                                       owners.KIND_LABEL: TEMPLATE if origin is None else LAYER},
                                _internal=True)
                pool.put_record(key, json.dumps(record).encode())
                pool.delete_record(_key(BUILDING, tmp))
                if on_publish is not None:
                    on_publish(pool, name)
        except BaseException:
            with contextlib.suppress(Exception):
                with pool.atomic():
                    pool.delete(tmp, owner=OWNER)
                    pool.delete_record(_key(BUILDING, tmp))
            raise
    finally:
        _in_progress.discard(tmp)
    return name


def _release_file(d, name):
    end = time.monotonic() + 10
    while True:
        try:
            d.detach_file(name)
            return
        except errors.BusyError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def layers(pool):
    """Every layer record: (fs key, chain id, record)."""
    out = []
    for r in pool.records(_key(LAYER) + b"/"):
        _, _, fskey, chain = r.key.decode().split("/", 3)
        out.append((fskey, chain, json.loads(r.value)))
    return out


def layer_record(pool, fskey, chain_id):
    """The record of one layer (a dict), or None."""
    return _json(pool, _key(LAYER, fskey, chain_id))


def templates(pool):
    """Every template record: (fs key, record)."""
    return [(r.key.decode().split("/", 2)[2], json.loads(r.value))
            for r in pool.records(_key(TEMPLATE) + b"/")]


@contextlib.contextmanager
def pinned(size, chain_ids):
    """Keep these chains of this size from prune() while the body runs (a
    load between building its layers and recording its image)."""
    keys = [(fs_key(size), c) for c in chain_ids]
    with _users_lock:
        _pins.update(keys)
    try:
        yield
    finally:
        with _users_lock:
            _pins.subtract(keys)
            for k in keys:
                if _pins[k] <= 0:
                    del _pins[k]


def kept(pool):
    """Every (fs key, chain id) a user keeps: the records of USERS, the
    loads running here, and the origins of devices that are not layers."""
    with _users_lock:
        keep = set(_pins)
    for prefix in USERS:
        for r in pool.records(prefix):
            try:
                value = json.loads(r.value)
                fk, chains = value["fs_key"], value["chain_ids"]
                keep.update((fk, c) for c in chains)
            except (ValueError, KeyError, TypeError):
                raise errors.CorruptMetadataError(
                    f"record {r.key!r} of {USERS[prefix]} does not name the layers it keeps "
                    "(a JSON object with fs_key and chain_ids): not pruning") from None
    by_device = {rec["device"]: (fk, chain) for fk, chain, rec in layers(pool)}
    for info in pool.list():
        if info.origin in by_device and info.labels.get(owners.OWNER_LABEL) != OWNER:
            keep.add(by_device[info.origin])
    return keep


def remove_leftovers(pool):
    """Remove the building devices a crashed build left (not the builds
    running in this process).  Returns the devices removed."""
    removed = []
    for r in list(pool.records(_key(BUILDING) + b"/")):
        name = r.key.decode().split("/", 2)[2]
        if name in _in_progress:
            continue
        with pool.atomic():
            if name in pool:
                pool.delete(name, owner=OWNER)
                removed.append(name)
            pool.delete_record(r.key)
    return removed


def users_lock():
    """Held, no load can take pins nor prune run: for a user changing its
    records and then discarding what they kept, as one step."""
    return _users_lock


def _remove_layer(pool, fk, chain, rec, removed):
    with pool.atomic():
        if rec["device"] in pool:
            pool.delete(rec["device"], owner=OWNER)
            removed.append(rec["device"])
        pool.delete_record(_key(LAYER, fk, chain))


def discard(pool, size, chain_ids, *, template=False, in_use=None):
    """Remove the layers of these chains (of filesystems of `size`) that no
    user keeps and nothing uses (in_use as for prune); template: also the
    template of that size once no layer of it is left (what a failed load
    that made it leaves).  Returns the devices removed."""
    fk, removed = fs_key(size), []
    with _users_lock:
        keep = kept(pool)
        for chain in reversed(list(chain_ids)):
            rec = layer_record(pool, fk, chain)
            if rec is None or (fk, chain) in keep or (in_use is not None
                                                       and in_use(rec["device"])):
                continue
            _remove_layer(pool, fk, chain, rec, removed)
        if template and not any(f == fk for f, _, _ in layers(pool)) \
                and not any(f == fk for f, _ in _pins):   # (a load of that size may want it)
            rec = _json(pool, _key(TEMPLATE, fk))
            if rec is not None and not (in_use is not None and in_use(rec["device"])):
                with pool.atomic():
                    if rec["device"] in pool:
                        pool.delete(rec["device"], owner=OWNER)
                        removed.append(rec["device"])
                    pool.delete_record(_key(TEMPLATE, fk))
    return removed


def prune(pool, keep=None, in_use=None):
    """Remove what a crash left half-built, and every layer not in `keep` (a
    set of (fs key, chain id); default kept(pool): what images, snapshots and
    running loads still use) nor in use (in_use(device) gives a description
    of its user, or None).  A thin snapshot holds every block it shares, so
    no layer needs the layers under it to keep its data: they are kept only
    to be shared by later loads.  Templates stay (a new one costs a mkfs).
    Returns the devices removed."""
    with _users_lock:
        removed = remove_leftovers(pool)
        keep = kept(pool) if keep is None else keep
        for fk, chain, rec in layers(pool):
            if (fk, chain) in keep or (in_use is not None and in_use(rec["device"])):
                continue
            _remove_layer(pool, fk, chain, rec, removed)
        return removed


def missing_tools():
    """Why layers cannot be made here (an empty list when they can)."""
    why = [f"{tool} is not installed (Debian package e2fsprogs)"
           for tool in ("mkfs.ext4", "debugfs") if not shutil.which(tool)]
    return why + blockdev.missing_capabilities()
