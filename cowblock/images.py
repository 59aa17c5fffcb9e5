"""Docker-style images and containers on a pool, kept in device labels.

Nothing is stored besides the devices themselves, so there is no second
source of truth to drift:

  image layer  a read-only device labelled {"cowblock.kind": "image"}; the
               layer below it is its origin (the device it is a snapshot of).
               A layer committed from a container has that container as its
               origin and names its parent image in "cowblock.parent" (used
               when the container is gone).  Every layer is an image: the
               chain of layers under it, bottom to top, is its history.
  container    a writable snapshot of an image, labelled
               {"cowblock.kind": "container", "cowblock.image": IMAGE}.

A device being built (import_image, add_layer) is labelled
{"cowblock.kind": "incomplete"} until it is complete and read-only; on an
error it is removed, so only a crash can leave one behind (`cowblock rm` it).

What depends on what, and what that guards (an image with containers or
layers is not removed, nor made writable, unless forced), is the owner and
dependency model of cowblock.owners, which reads these labels.
"""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import errors, owners, transfer
from .owners import CONTAINER, IMAGE, IMAGE_LABEL, INCOMPLETE, PARENT_LABEL

KIND = owners.KIND_LABEL
_kind = owners.kind

_ARTICLE = {IMAGE: "an image", CONTAINER: "a container", INCOMPLETE: "an incomplete image"}


@dataclass(frozen=True)
class Image:
    name: str
    parent: Optional[str]
    layers: list          # bottom -> top, ending with this image
    size: int             # device bytes
    length: int           # image bytes (the "cowblock.length" label, else size)
    mapped_bytes: int
    created: object       # datetime
    containers: list = field(default_factory=list)

    def to_dict(self):
        return {"name": self.name, "parent": self.parent, "layers": list(self.layers),
                "size": self.size, "length": self.length, "mapped": self.mapped_bytes,
                "created": self.created.isoformat(timespec="seconds"),
                "containers": list(self.containers)}


@dataclass(frozen=True)
class Container:
    name: str
    image: Optional[str]
    size: int
    mapped_bytes: int
    read_only: bool
    created: object       # datetime

    def to_dict(self):
        return {"name": self.name, "image": self.image, "size": self.size,
                "mapped": self.mapped_bytes, "read_only": self.read_only,
                "created": self.created.isoformat(timespec="seconds")}


# ---- reading the model out of the labels (the rules are cowblock.owners') ----
def _describe(info):
    kind = _kind(info)
    if kind in _ARTICLE:
        return _ARTICLE[kind]
    return "a plain device" + (f" (cowblock.kind={kind!r})" if kind else "")


def _require(pool, name, kind, doing):
    info = pool.info(name)  # DeviceNotFoundError when absent
    if _kind(info) != kind:
        how = {IMAGE: "images are made with `cowblock image import`, `cowblock image layer` "
                      "or `cowblock container commit`",
               CONTAINER: "containers are made with `cowblock container create`"}[kind]
        raise errors.InvalidArgumentError(
            f"cannot {doing} {name!r}: it is {_describe(info)}, not {_ARTICLE[kind]}; {how}")
    return info


def _chain(info, by_name):
    layers, seen, cur = [], set(), info
    while cur is not None and cur.name not in seen:
        seen.add(cur.name)
        layers.append(cur.name)
        parent = owners.parent_of(cur, by_name)
        cur = by_name.get(parent) if parent else None
    return layers[::-1]


def _image(info, by_name, containers=()):
    return Image(name=info.name, parent=owners.parent_of(info, by_name),
                 layers=_chain(info, by_name), size=info.size, length=transfer.info_length(info),
                 mapped_bytes=info.mapped_bytes, created=info.created,
                 containers=list(containers))


def _container(info, by_name):
    image = owners.image_of(info, by_name) or info.labels.get(owners.OCI_REF_LABEL)
    return Container(name=info.name, image=image, size=info.size,
                     mapped_bytes=info.mapped_bytes, read_only=info.read_only,
                     created=info.created)


def _index(pool):
    return {i.name: i for i in pool.list()}


def list_images(pool):
    """Every image (every layer is one), in creation order, each with its
    chain of layers bottom -> top and the containers made from it."""
    by_name = _index(pool)
    users = {}
    for info in by_name.values():
        if _kind(info) == CONTAINER:
            users.setdefault(owners.image_of(info, by_name), []).append(info.name)
    return [_image(i, by_name, users.get(i.name, ())) for i in by_name.values()
            if _kind(i) == IMAGE]


def image_info(pool, name):
    """One image, as list_images gives it."""
    _require(pool, name, IMAGE, "describe the image")
    return next(i for i in list_images(pool) if i.name == name)


def list_containers(pool):
    """Every container, in creation order, with the image it was made from."""
    by_name = _index(pool)
    return [_container(i, by_name) for i in by_name.values() if _kind(i) == CONTAINER]


def container_info(pool, name):
    """One container, as list_containers gives it."""
    _require(pool, name, CONTAINER, "describe the container")
    return _container(pool.info(name), _index(pool))


# ---- changing it ----
def _publish(pool, name, length):
    """Make a finished build read-only, then label it an image."""
    pool.set_read_only(name, True)
    pool.set_labels(name, transfer.length_labels({KIND: IMAGE}, length), _internal=True)


def import_image(pool, name, file, progress=None, *, fmt=None):
    """A read-only base image NAME from a raw or qcow2 file (any format
    qemu-img reads; fmt None detects it), or "-" for stdin; returns its Image."""
    transfer.check_new_name(pool, name)
    transfer.import_file(pool, name, file, progress=progress, fmt=fmt,
                         labels={KIND: INCOMPLETE})
    with transfer.removed_on_error(pool, name):
        _publish(pool, name, transfer.device_length(pool, name))
    return image_info(pool, name)


def add_layer(pool, parent, name, file, progress=None, *, fmt=None):
    """A new image layer NAME on image PARENT holding FILE's content.

    A snapshot of PARENT gets only the pool blocks whose bytes differ from
    it: blocks where FILE is all zeroes are discarded (whole blocks) or
    zeroed (a partial block), never left with the parent's bytes; blocks
    with other data are written whole.  The layer's size is FILE's, rounded
    up to 4096 (grown or shrunk from PARENT's); then it turns read-only.
    Returns its Image."""
    _require(pool, parent, IMAGE, "add a layer on")
    transfer.check_new_name(pool, name)
    with transfer.host_file_errors("read", transfer.display_name(file)), \
            transfer.open_source(pool, file, fmt) as src:
        if src.size == 0:
            raise errors.InvalidArgumentError(f"cannot make layer {name!r}: the source is empty")
        dev = pool.snapshot(parent, name, labels={KIND: INCOMPLETE}, _internal=True)
        with transfer.removed_on_error(pool, name):
            length = _apply(pool, dev, src, progress)
            pool.commit()
            _publish(pool, name, length)
    return image_info(pool, name)


def _apply(pool, dev, src, progress):
    """Make dev hold src's bytes (zero-padded to 4096), changing only the
    blocks that differ; returns src's length."""
    step = transfer.chunk_size(pool)
    if src.size is not None:
        total = src.size
        size = transfer.round_up(total)
        if dev.size != size:
            dev.resize(size)
        data = src.data_ranges()
        if progress:
            progress(0, total)
        for off in range(0, size, step):
            n = min(step, size - off)
            has_data = any(s < off + n and off < e for s, e in data)
            _apply_chunk(dev, off, n, src.pread(n, off) if has_data else None)
            if progress:
                progress(min(off + n, total), total)
        return total
    pos, size = 0, dev.size
    while True:
        buf = src.read(step)
        if not buf:
            break
        n = transfer.round_up(len(buf))
        if pos + n > size:  # grow by doubling; cut to the length at the end
            size = max(pos + n, 2 * size)
            dev.resize(size)
        _apply_chunk(dev, pos, n, buf)
        pos += len(buf)
        if progress:
            progress(pos, None)
    if pos == 0:
        raise errors.InvalidArgumentError(f"cannot make layer {dev.name!r}: the source is empty")
    if dev.size != transfer.round_up(pos):
        dev.resize(transfer.round_up(pos))
    if progress:
        progress(pos, pos)
    return pos


_SKIP, _WRITE, _ZERO = 0, 1, 2


def _apply_chunk(dev, off, n, new):
    """Bring dev's bytes [off, off + n) to new (None: zeroes; shorter than n:
    zero-padded), block by block."""
    bs = dev.pool.block_size
    mapped = any(e.mapped for e in dev.block_status(off, n))
    if new is None and not mapped:
        return
    padded = transfer.round_up(n, bs)
    old = bytearray(padded)
    if mapped:
        dev.readinto(memoryview(old)[:n], off)
    if new is None:
        new = bytearray(padded)
    elif len(new) < padded:
        new = bytes(new) + bytes(padded - len(new))
    blocks = padded // bs
    a = np.frombuffer(new, dtype=np.uint64, count=padded // 8).reshape(blocks, bs // 8)
    b = np.frombuffer(old, dtype=np.uint64).reshape(blocks, bs // 8)
    action = np.where((a != b).any(axis=1), np.where(a.any(axis=1), _WRITE, _ZERO), _SKIP)
    edges = np.flatnonzero(np.diff(action)) + 1
    view, dev_size = memoryview(new), dev.size
    for s, e in zip(np.concatenate(([0], edges)), np.concatenate((edges, [blocks]))):
        kind = action[s]
        lo, hi = int(s) * bs, min(int(e) * bs, n)
        if kind == _SKIP or lo >= hi:
            continue
        if kind == _WRITE:
            dev.pwrite(view[lo:hi], off + lo)
        elif (off + hi) % bs == 0 or off + hi == dev_size:
            dev.discard(off + lo, hi - lo)        # whole blocks: unmapped
        else:
            dev.write_zeroes(off + lo, hi - lo)   # ends in a partial block


def create_container(pool, image, name):
    """A writable container NAME: a snapshot of IMAGE (a device, else the
    ref or id of an OCI image: cowblock.ociimages); returns its Container."""
    if image not in pool:
        from . import ociimages   # (imported when used: it brings the OCI readers)
        ociimages.create_container(pool, image, name)
        return container_info(pool, name)
    _require(pool, image, IMAGE, "create a container from")
    pool.snapshot(image, name, labels={KIND: CONTAINER, IMAGE_LABEL: image}, _internal=True)
    return container_info(pool, name)


def commit_container(pool, container, image_name):
    """A read-only snapshot of CONTAINER as it is now, an image whose parent
    is the container's image; the container goes on.  Returns the Image."""
    info = _require(pool, container, CONTAINER, "commit")
    by_name = _index(pool)
    parent = owners.image_of(info, by_name)
    labels = {KIND: IMAGE}
    if parent is not None:
        labels[PARENT_LABEL] = parent
    # (run by the daemon, a mounted container's filesystem is frozen around
    # this: see the call table, control.calls)
    pool.snapshot(container, image_name, read_only=True, labels=labels, _internal=True)
    return image_info(pool, image_name)


def remove_container(pool, name, deferred=False):
    """Delete a container (only containers: images are left alone)."""
    _require(pool, name, CONTAINER, "remove the container")
    pool.delete(name, deferred=deferred)


def remove_containers(pool, names, deferred=False):
    """Delete several containers: every one is checked before any is removed.
    Returns the names removed."""
    names = list(dict.fromkeys(names))
    for name in names:
        _require(pool, name, CONTAINER, "remove the container")
    pool.delete(*names, deferred=deferred)
    return names
