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
  layers/template/FSKEY            {"device"}
  layers/layer/FSKEY/CHAINID       {"device", "chain_id", "diff_id", "parent", "size"}
  layers/building/DEVICE           {"kind", "key"}: a device being made; what a crash
                                   leaves of one is removed by prune()

A layer is built as a writable snapshot of its parent (or the template)
recorded as building, changed (mounted, the OCI layer applied), then in one
atomic section made read-only, renamed to its final name and recorded as a
layer.  So a crash leaves finished layers (which the next load reuses) and
building leftovers (which it removes), never a half-applied layer marked done.

These functions run in the pool's daemon (they mount devices); `d` is the
PoolDaemon.
"""
import contextlib
import json
import os
import shutil
import threading
import time
import uuid

from . import errors, owners
from .attach import blockdev

FSTYPE = "ext4"
MKFS_OPTIONS = ("-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0")
RECIPE = "ext4.1"
DEFAULT_SIZE = 8 << 30
OWNER = "layers"
PREFIX = b"layers/"
TEMPLATE, LAYER, BUILDING = "template", "layer", "building"

_locks = {}
_locks_lock = threading.Lock()


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


def layer(d, size, chain_id, parent, apply, *, diff_id=None):
    """The device of layer chain_id of size `size`, built if missing: a
    snapshot of `parent` (a layer device, or None for the template) with
    apply(root_directory) run on its mounted filesystem."""
    pool, key = d.pool, _key(LAYER, fs_key(size), chain_id)
    with _building(key):
        found = find(pool, size, chain_id)
        if found:
            return found
        origin = parent or template(d, size)
        hexid = chain_id.split(":")[-1]
        name = _device_name("layer", size, hexid[:24])

        def make(tmp):
            root = os.path.join(d.runtime.path, "build", tmp)
            mount = d.mount(tmp, root)
            try:
                apply(root)
                os.sync()
            finally:
                d.umount(mount.dir)
                with contextlib.suppress(OSError):
                    os.rmdir(root)
        return _build(d, key, name, origin, size, make,
                      {"device": name, "chain_id": chain_id, "diff_id": diff_id,
                       "parent": parent, "size": size})


def _build(d, key, name, origin, size, make, record):
    """Make device `name` recorded under key: as a snapshot of origin (or a
    new device), changed by make(tmp_name), published atomically."""
    pool = d.pool
    tmp = f"building-{uuid.uuid4().hex[:16]}"
    labels = {owners.OWNER_LABEL: OWNER, owners.KIND_LABEL: BUILDING}
    with pool.atomic():
        if origin is None:
            pool.create_thin(tmp, size, labels=labels, _internal=True)
        else:
            pool.snapshot(origin, tmp, labels=labels, _internal=True)
        pool.put_record(_key(BUILDING, tmp), json.dumps({"key": key.decode()}).encode())
    try:
        make(tmp)
        with pool.atomic():
            pool.set_read_only(tmp, True)
            pool.rename(tmp, name, owner=OWNER)
            pool.set_labels(name, {owners.OWNER_LABEL: OWNER,
                                   owners.KIND_LABEL: TEMPLATE if origin is None else LAYER},
                            _internal=True)
            pool.put_record(key, json.dumps(record).encode())
            pool.delete_record(_key(BUILDING, tmp))
    except BaseException:
        with contextlib.suppress(Exception):
            with pool.atomic():
                pool.delete(tmp, owner=OWNER)
                pool.delete_record(_key(BUILDING, tmp))
        raise
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


def prune(pool, keep):
    """Remove what a crash left half-built, and every layer not in `keep` (a
    set of (fs key, chain id) that images or snapshots still use).  A thin
    snapshot holds every block it shares, so no layer needs the layers under
    it to keep its data: they are kept only to be shared by later loads.
    Templates stay (a new one costs a mkfs).  Returns the devices removed."""
    removed = []
    for r in list(pool.records(_key(BUILDING) + b"/")):
        name = r.key.decode().split("/", 2)[2]
        with pool.atomic():
            if name in pool:
                pool.delete(name, owner=OWNER)
                removed.append(name)
            pool.delete_record(r.key)
    for fk, chain, rec in layers(pool):
        if (fk, chain) in keep:
            continue
        with pool.atomic():
            if rec["device"] in pool:
                pool.delete(rec["device"], owner=OWNER)
                removed.append(rec["device"])
            pool.delete_record(_key(LAYER, fk, chain))
    return removed


def missing_tools():
    """Why layers cannot be made here (an empty list when they can)."""
    why = [f"{tool} is not installed (Debian package e2fsprogs)"
           for tool in ("mkfs.ext4", "debugfs") if not shutil.which(tool)]
    return why + blockdev.missing_capabilities()
