"""containerd's snapshots as thin devices and records: what the Snapshots
service (cowblock.containerd.service) does, without gRPC.

Each snapshot is one device of the pool, owned by "containerd"
(cowblock.owners: plain `cowblock rm/rename/rollback` refuse it without
--force), and one record naming it:

  containerd/snapshot/KEY   {"device", "kind", "parent", "labels", "created",
                             "updated", "size", "origin", "usage"}

KEY is containerd's key or committed name (`<namespace>/<seq>/<name>`, any
text).  kind is "active" (writable), "view" (read-only) or "committed";
parent the committed snapshot it was made from ("" for none); size the
filesystem size, which children inherit; origin the device it was
snapshotted from (the parent's, or the empty ext4 template); usage the
bytes a committed snapshot has of its own, fixed when it was committed.

Every change of a snapshot is one atomic section of the pool (cowblock.atomic)
holding both the device change and the record change, so a crash at any
instant leaves both or neither: no key naming a missing device, no device
without its key, and no "already exists" for a Prepare that never
returned.  Devices are made by snapshotting, never by mkfs: a parentless
snapshot is a snapshot of the ext4 template of its size (cowblock.layers),
made once, before the section.

The errors containerd tells apart are classes here: NotFound, AlreadyExists,
FailedPrecondition (and cowblock's InvalidArgumentError); the service maps
them to gRPC codes.
"""
import contextlib
import json
import threading
import time
import uuid

from .. import errors, layers, owners
from ..sizes import parse_size
from . import filters

OWNER = "containerd"
PREFIX = b"containerd/snapshot/"
SIZE_LABEL = "containerd.io/snapshot/cowblock.size"
ACTIVE, VIEW, COMMITTED = "active", "view", "committed"
FSTYPE = layers.FSTYPE
CLOSE_WAIT = 10.0    # seconds Commit and Remove wait for the device file to be closed
LABELS_MAX = 4096    # bytes of one label's key and value (containerd's rule)


class NotFound(errors.CowblockError, LookupError):
    """No snapshot with that key (gRPC NOT_FOUND)."""


class AlreadyExists(errors.CowblockError):
    """A snapshot with that key exists (gRPC ALREADY_EXISTS)."""


class FailedPrecondition(errors.CowblockError):
    """The snapshot is not in a state for it (gRPC FAILED_PRECONDITION)."""


def _record_key(key):
    return PREFIX + key.encode("utf-8")


def _check_key(key, what="key"):
    if not isinstance(key, str) or not key:
        raise errors.InvalidArgumentError(f"snapshot {what} {key!r:.80} is empty or not text")
    if "\0" in key or len(_record_key(key)) > 1024:
        raise errors.InvalidArgumentError(
            f"snapshot {what} {key[:60]!r}... has a NUL byte or is longer than "
            f"{1024 - len(PREFIX)} bytes")
    return key


def _check_labels(labels):
    labels = dict(labels or {})
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise errors.InvalidArgumentError(f"label {k!r:.60}={v!r:.60} is not text=text")
        if len(k.encode()) + len(v.encode()) > LABELS_MAX:
            raise errors.InvalidArgumentError(
                f"label {k[:60]!r}: key and value are more than {LABELS_MAX} bytes together")
    return labels


class Snapshots:
    """containerd's snapshots in daemon d's pool.  default_size: the
    filesystem size of a parentless snapshot without the SIZE_LABEL."""

    def __init__(self, d, default_size=layers.DEFAULT_SIZE):
        self.d = d
        self.pool = d.pool
        self.default_size = layers.check_size(default_size)
        self._lock = threading.RLock()    # one change of the snapshot table at a time
        self._files = {}                  # device -> its attach file, while attached
        self._kids = None                 # parent key -> keys of its children (from the records)
        if d.file_server() is None:
            from ..attach import fuse
            raise errors.MountError(
                "the containerd snapshotter hands out device files from the daemon's FUSE "
                f"attach, which is unavailable here: {fuse.available()[1] or 'COWBLOCK_ATTACH=nbdfuse'}")

    def warm(self, log=lambda msg: None):
        """Make the template of the default size now (on start), so the first
        parentless Prepare does not wait for its mkfs."""
        try:
            layers.template(self.d, self.default_size)
        except errors.CowblockError as e:
            log(f"snapshotter: the ext4 template of {self.default_size} bytes: {e}")

    # ---- records ----
    def _get(self, key):
        raw = self.pool.get_record(_record_key(_check_key(key)))
        if raw is None:
            raise NotFound(f"snapshot {key!r} does not exist")
        return json.loads(raw)

    def _put(self, key, rec):
        self.pool.put_record(_record_key(key), json.dumps(rec).encode())

    def _all(self):
        for r in self.pool.records(PREFIX):
            yield r.key[len(PREFIX):].decode("utf-8"), json.loads(r.value)

    def _children(self):
        """parent -> set of child keys, read from the records once, then kept
        by the calls here (the only writers of these records) as their
        sections succeed."""
        if self._kids is None:
            kids = {}
            for key, rec in self._all():
                if rec["parent"]:
                    kids.setdefault(rec["parent"], set()).add(key)
            self._kids = kids
        return self._kids

    def _link(self, parent, key):
        if parent:
            self._children().setdefault(parent, set()).add(key)

    def _unlink(self, parent, key):
        kids = self._children()
        if parent in kids:
            kids[parent].discard(key)
            if not kids[parent]:
                del kids[parent]

    # ---- the calls ----
    def prepare(self, key, parent="", labels=None, *, kind=ACTIVE):
        """A writable (ACTIVE) or read-only (VIEW) snapshot of committed
        snapshot parent (or of an empty filesystem); returns its mounts."""
        _check_key(key)
        labels = _check_labels(labels)
        with self._lock:
            if self.pool.get_record(_record_key(key)) is not None:
                raise AlreadyExists(f"snapshot {key!r} already exists")
            if parent:
                prec = self._get(parent)
                if prec["kind"] != COMMITTED:
                    raise FailedPrecondition(
                        f"parent {parent!r} is not a committed snapshot (it is {prec['kind']})")
                size, origin = prec["size"], prec["device"]
            else:
                size = self._size(labels)
                origin = layers.template(self.d, size)   # made once per size, not in the section
            now = time.time()
            rec = {"device": f"ctrd-{uuid.uuid4().hex[:16]}", "kind": kind, "parent": parent,
                   "labels": labels, "created": now, "updated": now, "size": size,
                   "origin": origin}
            self._children()           # read before the change, which it then follows
            with self.pool.atomic():
                self.pool.snapshot(origin, rec["device"], read_only=kind == VIEW,
                                   labels={owners.OWNER_LABEL: OWNER}, _internal=True)
                self._put(key, rec)
            self._link(parent, key)
            return self._mounts(rec)

    def _size(self, labels):
        text = labels.get(SIZE_LABEL)
        if text is None:
            return self.default_size
        return layers.check_size(parse_size(text, f"label {SIZE_LABEL}"))

    def mounts(self, key):
        with self._lock:
            rec = self._get(key)
            if rec["kind"] == COMMITTED:
                raise FailedPrecondition(f"snapshot {key!r} is committed: only active snapshots "
                                         "and views have mounts")
            return self._mounts(rec)

    def _mounts(self, rec):
        """The mount containerd applies: the device's file with a loop device
        (which containerd sets up and clears itself)."""
        device, read_only = rec["device"], rec["kind"] == VIEW
        path = self._files.get(device)
        if path is None:
            path = self._files[device] = self.d.attach_file(device, read_only)
        return [{"type": FSTYPE, "source": path,
                 "options": ["loop", "ro"] if read_only else ["loop"]}]

    def _detach(self, device, doing):
        """Give the device file back, waiting up to CLOSE_WAIT seconds for its
        users (a loop device containerd has not cleared yet) to close it."""
        if device not in self._files:
            return
        end = time.monotonic() + CLOSE_WAIT
        while True:
            try:
                self.d.detach_file(device)
                break
            except errors.BusyError:
                if time.monotonic() > end:
                    raise FailedPrecondition(
                        f"cannot {doing}: its device file {self._files[device]} is still open "
                        f"after {CLOSE_WAIT:g} s (unmount the filesystem on it first)") from None
                time.sleep(0.05)
        del self._files[device]

    def commit(self, name, key, labels=None):
        """Active snapshot key becomes committed snapshot name (read-only;
        key is gone).  Its labels are replaced by labels."""
        _check_key(name, "name")
        labels = _check_labels(labels)
        with self._lock:
            rec = self._get(key)
            if rec["kind"] != ACTIVE:
                raise FailedPrecondition(f"snapshot {key!r} is not active (it is {rec['kind']})")
            if self.pool.get_record(_record_key(name)) is not None:
                raise AlreadyExists(f"snapshot {name!r} already exists")
            self._detach(rec["device"], f"commit {key!r}")
            now = time.time()
            done = dict(rec, kind=COMMITTED, labels=labels, created=now, updated=now,
                        usage=self._own_bytes(rec))
            self._children()
            with self.pool.atomic():
                self.pool.set_read_only(rec["device"], True)
                self.pool.delete_record(_record_key(key))
                self._put(name, done)
            self._unlink(rec["parent"], key)     # an active snapshot has no children
            self._link(rec["parent"], name)

    def remove(self, key):
        """The snapshot goes, its device with it (reclaimed in the background).
        Refused while other snapshots have it as parent."""
        with self._lock:
            rec = self._get(key)
            children = sorted(self._children().get(key, ()))
            if children:
                raise FailedPrecondition(
                    f"snapshot {key!r} has children ({', '.join(map(repr, children[:3]))}"
                    f"{', ...' if len(children) > 3 else ''}): remove them first")
            self._detach(rec["device"], f"remove {key!r}")
            with self.pool.atomic():
                if rec["device"] in self.pool:
                    self.pool.delete(rec["device"], owner=OWNER)
                self.pool.delete_record(_record_key(key))
            self._unlink(rec["parent"], key)

    def stat(self, key):
        with self._lock:
            return self._info(key, self._get(key))

    def update(self, key, labels, paths=()):
        """Change the labels: paths "labels" (all of them) or "labels.KEY"
        (that one; an empty value removes it); no paths: all of them."""
        labels = _check_labels(labels)
        with self._lock:
            rec = self._get(key)
            new = dict(rec["labels"])
            for path in paths or ["labels"]:
                if path == "labels":
                    new = dict(labels)
                elif path.startswith("labels.") and len(path) > 7:
                    k = path[7:]
                    if labels.get(k):
                        new[k] = labels[k]
                    else:
                        new.pop(k, None)
                else:
                    raise errors.InvalidArgumentError(
                        f"cannot update field {path!r} of snapshot {key!r}: only its labels "
                        "(\"labels\", \"labels.KEY\") change")
            rec = dict(rec, labels=new, updated=time.time())
            self._put(key, rec)
            return self._info(key, rec)

    def list(self, filter_texts=()):
        """The Info of every snapshot matching any of the filters (all if none)."""
        match = filters.matcher(filter_texts)
        with self._lock:
            infos = [self._info(k, r) for k, r in self._all()]
        return [i for i in infos if match(i)]

    def usage(self, key):
        """Bytes the snapshot has of its own: those its device maps
        differently from the device it was made from (as the devmapper
        snapshotter counts, the parent's bytes not included)."""
        with self._lock:
            rec = self._get(key)
            if rec["kind"] == COMMITTED:
                return rec["usage"]
            return self._own_bytes(rec)

    def _own_bytes(self, rec):
        pool, dev, origin = self.pool, rec["device"], rec.get("origin")
        if origin and origin in pool:
            blocks = sum(r.length for r in pool.diff(origin, dev) if r.kind != "left_only")
        else:
            blocks = pool.usage(dev).mapped_blocks
        return blocks * pool.block_size

    def cleanup(self):
        """Remove the devices containerd owns that no snapshot names (none,
        unless removed by hand); returns their names."""
        with self._lock:
            named = {r["device"] for _, r in self._all()}
            stray = [i.name for i in self.pool.list()
                     if i.labels.get(owners.OWNER_LABEL) == OWNER and i.name not in named]
            for name in stray:
                with contextlib.suppress(errors.DeviceNotFoundError):
                    self.pool.delete(name, owner=OWNER)
            return stray

    def count(self):
        return self.pool.record_count(PREFIX)

    def close(self):
        """Give back every device file (the daemon is stopping)."""
        with self._lock:
            for device in list(self._files):
                with contextlib.suppress(errors.CowblockError, KeyError):
                    self.d.detach_file(device)
                self._files.pop(device, None)

    @staticmethod
    def _info(key, rec):
        return {"name": key, "parent": rec["parent"], "kind": rec["kind"],
                "labels": rec["labels"], "created": rec["created"], "updated": rec["updated"]}
