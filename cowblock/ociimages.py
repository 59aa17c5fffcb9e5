"""OCI and Docker images on the pool: `cowblock image load` and what it made.

An image is a chain of layer devices (cowblock.layers: ext4 filesystems,
one read-only thin snapshot per layer, found by chain ID and filesystem
size) and a record naming its top.  Loading one reads an archive
(cowblock.oci), finds or builds each layer in turn, and commits the image's
records in the atomic section that publishes its top layer (or in one of
its own when every layer was there already), so the pool never holds an
image whose layers are not all done.  Two images that share their lower
layers (same diff_ids, same filesystem size) share those devices: the
second load finds them and unpacks nothing of them.

Records (the pool's records store):
  images/ref/REF       {"ref", "id", "manifest_digest", "fs_key", "size", "chain_ids",
                        "diff_ids", "layers", "top", "platform", "form", "loaded"}:
                        REF normalised (docker.io/library/debian:latest); id is the
                        config digest; layers are the devices bottom first.  Being
                        under a prefix of layers.USERS, it keeps its layers.
  images/config/ID     the config blob as the archive held it (often more than a
                        device's labels may hold), kept while a ref has that id

A load that fails (a bad blob, a hostile layer, a full filesystem) removes
the layers it built that nothing else keeps, and the template it made, so
the pool is as it was.  A crash mid-load leaves finished layers, which the
next load reuses and `image prune` removes, and building leftovers, which
both remove (cowblock.layers).

A container of an image is a writable snapshot of its top layer, labelled
with the image's ref (OCI_REF_LABEL); `image rm` refuses an image while
containers of it exist, unless forced.  These functions run where the pool
is: load in its daemon (it mounts), the others anywhere.
"""
import json
import os
import time

from . import errors, layers, oci, owners
from .oci.archive import split_transport

REF_PREFIX = b"images/ref/"
CONFIG_PREFIX = b"images/config/"
OCI_REF_LABEL = owners.OCI_REF_LABEL
assert REF_PREFIX in layers.USERS


def _ref_key(ref):
    return REF_PREFIX + ref.encode()


def _config_key(image_id):
    return CONFIG_PREFIX + image_id.encode()


_NEEDED = {"ref", "id", "top", "layers", "chain_ids", "diff_ids", "fs_key", "size"}


def _records(pool):
    out = {}
    for r in pool.records(REF_PREFIX):
        try:
            rec = json.loads(r.value)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not _NEEDED <= rec.keys():
            raise errors.CorruptMetadataError(
                f"image record {r.key!r:.200} is damaged: not JSON naming "
                f"{', '.join(sorted(_NEEDED))}")
        out[r.key[len(REF_PREFIX):].decode()] = rec
    return out


def _normalize(text):
    try:
        return oci.normalize(text)
    except oci.ImageError as e:
        raise errors.InvalidArgumentError(str(e)) from None


def find(pool, text):
    """The record (a dict) of the image TEXT names: a reference in any form
    docker takes (`debian`, `example.com/x:1`), or an image id or a unique
    prefix of one (at least 12 hex digits).  None when no image matches."""
    recs = _records(pool)
    try:
        ref = oci.normalize(text)
    except oci.ImageError:
        ref = None
    if ref in recs:
        return recs[ref]
    hexid = text[len("sha256:"):] if text.startswith("sha256:") else text
    if len(hexid) >= 12 and all(c in "0123456789abcdef" for c in hexid):
        hits = {r["id"]: r for r in recs.values() if r["id"][7:].startswith(hexid)}
        if len(hits) == 1:
            return next(iter(hits.values()))
    return None


def require(pool, text, *, or_device=False):
    """find(), or DeviceNotFoundError; or_device: TEXT could have named a
    device too (the message says it names neither)."""
    rec = find(pool, text)
    if rec is None:
        what = f"no device named {text!r}, nor an OCI image" if or_device else \
            f"no OCI image {text!r}"
        raise errors.DeviceNotFoundError(
            f"{what} loaded with `cowblock image load` of that reference or id (`cowblock "
            "image ls` lists them)")
    return rec


# ---- loading ----
def load(d, archive, *, ref=None, platform=None, size=None):
    """Load the image at ARCHIVE (a docker-save tar, an OCI archive, an OCI
    layout directory, `PATH:TAG`) into daemon d's pool, under reference REF
    (default: the references the archive gives it), for PLATFORM (default:
    the host's), on filesystems of SIZE bytes (default layers.DEFAULT_SIZE).
    Returns what was loaded: info() of it, with "layers" telling which were
    reused."""
    why = layers.missing_tools()
    if why:
        raise errors.MountError("cannot load images on this machine: " + "; ".join(why))
    size = layers.check_size(layers.DEFAULT_SIZE if size is None else size)
    pool = d.pool
    layers.remove_leftovers(pool)   # what a crashed load left half-built
    with oci.open_archive(archive) as arc:
        image = arc.image(platform=platform)
        if not image.layers:
            raise oci.ImageError(f"{archive}: the image has no layers (nothing to make a "
                                 "filesystem of)")
        refs = [_normalize(ref)] if ref else list(image.refs)
        if not refs:
            raise oci.ImageError(
                f"{archive} does not name its image with a reference (only "
                f"{', '.join(image.tags) or 'no tags'}): give it one with --name")
        had_template = any(fk == layers.fs_key(size) for fk, _ in layers.templates(pool))
        built, replaced = [], []
        try:
            with layers.pinned(size, image.chain_ids):
                _build_chain(d, image, size, refs, built, replaced)
        except BaseException:
            layers.discard(pool, size, built, template=not had_template, in_use=d.in_use)
            raise
        for old in replaced:
            if old["id"] != image.config_digest or old["fs_key"] != layers.fs_key(size):
                _forget(pool, [old])
        out = info(pool, refs[0])
        out["loaded"] = refs
        out["layers"] = [dict(layer, reused=layer["chain_id"] not in built)
                         for layer in out["layers"]]
        return out


def _build_chain(d, image, size, refs, built, replaced):
    """Find or build every layer of IMAGE; commit its records with the top
    one.  Appends to BUILT the chain ids built, to REPLACED the records the
    refs named before."""
    pool, parent, committed = d.pool, None, []
    devices = []

    def commit(pool_, top):
        replaced.extend(r for r in (_json(pool_, _ref_key(ref)) for ref in refs) if r)
        chain = devices if devices[-1:] == [top] else devices + [top]
        rec = {"id": image.config_digest, "manifest_digest": image.manifest_digest,
               "fs_key": layers.fs_key(size), "size": size,
               "chain_ids": list(image.chain_ids), "diff_ids": list(image.diff_ids),
               "layers": chain, "top": top,
               "platform": str(image.platform) if image.platform else None,
               "form": image.form, "loaded": time.time()}
        pool_.put_record(_config_key(image.config_digest), image.config_bytes)
        for ref in refs:
            pool_.put_record(_ref_key(ref), json.dumps(dict(rec, ref=ref)).encode())
        committed.append(top)

    last = len(image.layers) - 1
    for i, layer in enumerate(image.layers):
        def apply(root, layer=layer):
            with layer.open() as stream:
                oci.apply_layer(stream, root, label=layer.label)

        def publish(pool_, device, layer=layer, top=i == last):
            built.append(layer.chain_id)    # (only a layer built here is published here)
            if top:
                commit(pool_, device)

        device = layers.layer(d, size, layer.chain_id, parent, apply, diff_id=layer.diff_id,
                              on_publish=publish)
        devices.append(device)
        parent = device
    if not committed:   # every layer was there already: the records commit alone
        with pool.atomic():
            commit(pool, parent)
    return parent


def _json(pool, key):
    raw = pool.get_record(key)
    return json.loads(raw) if raw is not None else None


# ---- reading ----
def _by_device(pool):
    return {rec["device"]: rec for _, _, rec in layers.layers(pool)}


def _containers(pool, rec):
    """The containers of the image of record REC: writable snapshots of its
    top labelled with its ref (or, for a label that names no image, made of
    its top)."""
    recs = _records(pool)
    out = []
    for dev in pool.list():
        if owners.kind(dev) != owners.CONTAINER:
            continue
        label = dev.labels.get(OCI_REF_LABEL)
        if label == rec["ref"] or (label not in recs and dev.origin == rec["top"]):
            out.append(dev.name)
    return out


def info(pool, text):
    """One image: its record, its config (parsed), its layers (device,
    diff_id, chain_id, pool bytes each), its size (the pool bytes of its
    layers), how much of that other images share, and its containers."""
    rec = dict(require(pool, text))
    by_device = _by_device(pool)
    others = {}
    for other in _records(pool).values():
        if other["id"] != rec["id"] or other["fs_key"] != rec["fs_key"]:
            for c in other["chain_ids"]:
                others.setdefault(c, []).append(other["ref"])
    out_layers = []
    for device, chain, diff in zip(rec["layers"], rec["chain_ids"], rec["diff_ids"]):
        lrec = by_device.get(device, {})
        out_layers.append({"device": device, "chain_id": chain, "diff_id": diff,
                           "bytes": lrec.get("bytes", 0),
                           "shared_with": sorted(set(others.get(chain, ())))})
    config = pool.get_record(_config_key(rec["id"]))
    rec.update(layers=out_layers, config=json.loads(config) if config else None,
               bytes=sum(la["bytes"] for la in out_layers),
               shared_bytes=sum(la["bytes"] for la in out_layers if la["shared_with"]),
               containers=_containers(pool, rec))
    return rec


def list_images(pool):
    """Every loaded image, as info() gives it without its config, by ref."""
    out = []
    for ref in sorted(_records(pool)):
        i = info(pool, ref)
        i.pop("config")
        out.append(i)
    return out


def all_images(pool):
    """What `image ls` shows, in one call: (the raw images of
    cowblock.images, the loaded OCI images of list_images)."""
    from . import images
    return images.list_images(pool), list_images(pool)


# ---- containers ----
def create_container(pool, text, name):
    """A writable container NAME of the image TEXT names: a snapshot of its
    top layer, labelled with its ref.  Returns the device's info."""
    rec = require(pool, text, or_device=True)
    pool.snapshot(rec["top"], name, labels={owners.KIND_LABEL: owners.CONTAINER,
                                            OCI_REF_LABEL: rec["ref"]}, _internal=True)
    return pool.info(name)


# ---- removing ----
def _forget(pool, recs, in_use=None):
    """After records RECS are gone: drop their configs no ref needs, then
    the layers of theirs nothing keeps.  Returns the devices removed."""
    left = _records(pool)
    with pool.atomic():
        for rec in recs:
            if not any(r["id"] == rec["id"] for r in left.values()):
                pool.delete_record(_config_key(rec["id"]))
    removed = []
    for rec in recs:
        removed += layers.discard(pool, rec["size"], rec["chain_ids"], in_use=in_use)
    return removed


def remove(pool, texts, *, force=False, in_use=None):
    """Remove the images TEXTS name (refs or ids; an id removes every ref
    of it), then the layers nothing else keeps.  Refused while containers
    of one exist, unless forced: then the containers keep their data (and
    the layer they are a snapshot of) and lose the ref label.  Returns
    {"untagged": refs, "removed": devices}."""
    recs = {}
    for text in dict.fromkeys(texts):
        rec = require(pool, text)
        ids = text.startswith("sha256:") or rec["ref"] != _maybe_normalize(text)
        for r in (_records(pool).values() if ids else [rec]):
            if r["id"] == rec["id"]:
                recs[r["ref"]] = r
    users = {ref: _containers(pool, r) for ref, r in recs.items()}
    busy = {ref: c for ref, c in users.items() if c}
    if busy and not force:
        what = "; ".join(f"{ref}: container{'s' if len(c) > 1 else ''} {', '.join(c)} "
                         f"{'use' if len(c) > 1 else 'uses'} it" for ref, c in busy.items())
        raise errors.ProtectedError(
            f"cannot remove image {what}; remove the containers first (`cowblock container "
            "rm`), or force it (--force) to go ahead (they keep their data)")
    with pool.atomic():
        for ref in recs:
            pool.delete_record(_ref_key(ref))
        for ref, containers in busy.items():
            for c in containers:
                labels = {k: v for k, v in pool.info(c).labels.items() if k != OCI_REF_LABEL}
                pool.set_labels(c, labels, _internal=True)
    with layers.users_lock():
        removed = _forget(pool, list(recs.values()), in_use)
    return {"untagged": sorted(recs), "removed": removed}


def _maybe_normalize(text):
    try:
        return oci.normalize(text)
    except oci.ImageError:
        return None


def prune(pool, *, in_use=None):
    """Remove every layer no image, container or running load keeps (what
    a crashed or replaced load left) and what crashed builds left.  Returns
    the devices removed."""
    return layers.prune(pool, in_use=in_use)


# ---- the daemon's calls (control.calls): the same, with its busy rule ----
def load_call(d, session, archive, *, ref=None, platform=None, size=None):
    if not isinstance(archive, str) or not os.path.isabs(split_transport(archive)[1]):
        raise errors.InvalidArgumentError(
            f"archive {archive!r:.200} is not an absolute path (the daemon's working "
            "directory is not the caller's)")
    with d.working(f"loading image {archive}"):
        return load(d, archive, ref=ref, platform=platform, size=size)


def remove_call(d, session, texts, *, force=False):
    return remove(d.pool, texts, force=force, in_use=d.in_use)


def prune_call(d, session):
    return prune(d.pool, in_use=d.in_use)
