"""Who owns a device and what depends on it: the rules that guard removing,
renaming, rolling back and unfreezing devices, as lvremove, docker rmi and
qemu-img snapshot -a have them.  Pool.delete, rename, rollback, set_read_only
and the label calls apply them, so they hold through the API, the CLI and
the pool's daemon alike.

Reserved labels.  Labels whose key starts with "cowblock." are cowblock's
own; only cowblock's own functions set or remove them (they pass the
internal keyword ``_internal=True``, which the CLI never does), and
Pool.set_labels keeps them when it replaces a device's other labels:

  cowblock.owner   the subsystem that manages the device and keeps its own
                   records of it outside the pool: "layers" (the ext4 layer
                   devices of OCI images and containerd, cowblock.layers).
                   Delete, rename
                   and rollback refuse an owned device unless the caller says
                   it is that owner (``owner="layers"``) or forces it
                   (``force=True``, ``--force``).  Devices of `cowblock image`
                   and `cowblock container` have no owner: their whole model
                   is in their labels, which follow renames.
  cowblock.kind    "image", "container" or "incomplete" (cowblock.images)
  cowblock.image   a container's image, by name
  cowblock.parent  the image under a layer committed from a container
  cowblock.length  the exact length of an imported file (cowblock.transfer)
  cowblock.oci-image  the reference of the OCI image a container was made
                   from (cowblock.ociimages), which lives in records, not devices

Dependencies are facts the pool holds already; only images have dependants:
  - a container depends on its image: its origin when that is an image,
    else its cowblock.image label;
  - an image layer depends on its parent image: its origin when that is an
    image; when its origin is a container, that container's image; else its
    cowblock.parent label.
A plain snapshot does not depend on its origin: a thin snapshot holds
every block it shares, and outlives its origin intact.

The rules:
  delete    refused while devices outside the removal depend on one of the
            devices, naming them; with force the references are taken out
            of the dependants' labels (so no container ever names an image
            that is gone: it has none), and they keep all their data.
  rename    labels that name the old name are rewritten to the new one.
  rollback  only to a device of the target's own lineage (an ancestor or a
            descendant, through origins) unless forced.
  writable  an image is not made writable unless forced: containers and
            layers are built on it staying as it is.
Owned devices are refused to all three without force or their owner.
"""
from . import errors

RESERVED_PREFIX = "cowblock."
OWNER_LABEL = "cowblock.owner"
KIND_LABEL = "cowblock.kind"
IMAGE_LABEL = "cowblock.image"
PARENT_LABEL = "cowblock.parent"
LENGTH_LABEL = "cowblock.length"
OCI_REF_LABEL = "cowblock.oci-image"
REFERENCE_LABELS = (IMAGE_LABEL, PARENT_LABEL)   # labels whose value names another device
IMAGE, CONTAINER, INCOMPLETE = "image", "container", "incomplete"

_FORCE = "force it (--force) to go ahead"


def is_reserved(key):
    return isinstance(key, str) and key.startswith(RESERVED_PREFIX)


def refuse_reserved(labels, what, current=None):
    """InvalidArgumentError if labels (a dict of labels, or of label changes
    where None or "" removes one) would change a reserved label of a device
    whose labels are `current` (a new device has none).  Giving back one's
    own reserved labels as they are changes nothing, and is let through."""
    current = current or {}
    try:
        keys = sorted(k for k, v in dict(labels or {}).items() if is_reserved(k)
                      and current.get(k, "") != ("" if v is None else v))
    except (TypeError, ValueError, AttributeError):
        return   # not labels at all: cowblock.catalog says so
    if keys:
        raise errors.InvalidArgumentError(
            f"cannot {what}: {', '.join(map(repr, keys))} "
            f"{'is a reserved label' if len(keys) == 1 else 'are reserved labels'} (labels "
            f"starting with {RESERVED_PREFIX!r} are kept by cowblock's image, container and "
            "import commands)")


def reserved(labels):
    return {k: v for k, v in (labels or {}).items() if is_reserved(k)}


# ---- reading the model out of the labels ----
def kind(info):
    return info.labels.get(KIND_LABEL) if info is not None else None


def owner(info):
    return info.labels.get(OWNER_LABEL) if info is not None else None


def image_of(info, by_name):
    """The image a container was made from: its origin (by id, so renames
    follow), else its cowblock.image label, if that names an image."""
    origin = by_name.get(info.origin) if info.origin else None
    if kind(origin) == IMAGE:
        return origin.name
    label = info.labels.get(IMAGE_LABEL)
    return label if kind(by_name.get(label)) == IMAGE else None


def parent_of(info, by_name):
    """The image a layer is built on, or None for a base image."""
    origin = by_name.get(info.origin) if info.origin else None
    if kind(origin) == IMAGE:
        return origin.name
    if kind(origin) == CONTAINER:
        image = image_of(origin, by_name)
        if image is not None:
            return image
    label = info.labels.get(PARENT_LABEL)
    if label and label != info.name and kind(by_name.get(label)) == IMAGE:
        return label
    return None


def dependants(by_name, name):
    """The devices that depend on device `name`, as (name, what it is) pairs:
    the containers made from it and the layers built on it, in creation
    order."""
    if kind(by_name.get(name)) != IMAGE:
        return []
    out = []
    for info in by_name.values():
        if kind(info) == CONTAINER and image_of(info, by_name) == name:
            out.append((info.name, "container"))
        elif kind(info) == IMAGE and info.name != name and parent_of(info, by_name) == name:
            out.append((info.name, "layer"))
    return out


def _names(pairs):
    words = [f"{what} {name!r}" for name, what in pairs]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _owned(info, doing, caller, force):
    who = owner(info)
    if who and who != caller and not force:
        raise errors.ProtectedError(
            f"cannot {doing} {info.name!r}: it belongs to {who} ({OWNER_LABEL}={who}), which "
            f"keeps its own records of it; do it through {who}, or {_FORCE}")


# ---- the rules ----
def check_delete(by_name, names, *, force=False, caller=None):
    """Refuse to delete `names` while devices outside them depend on them (or
    while one is owned by another); returns the label changes that take the
    references to them out of their dependants, as {name: new labels}."""
    going = set(names)
    fixes = {}
    for name in names:
        _owned(by_name[name], "remove", caller, force)
        left = [(d, what) for d, what in dependants(by_name, name) if d not in going]
        if left and not force:
            raise errors.ProtectedError(
                f"cannot remove image {name!r}: {_names(left)} "
                f"{'depends' if len(left) == 1 else 'depend'} on it; remove "
                f"{'it' if len(left) == 1 else 'them'} first, or {_FORCE} (they keep their data "
                "but no longer name it as their image)")
        for d, _ in left:
            labels = fixes.get(d, by_name[d].labels)
            fixes[d] = {k: v for k, v in labels.items()
                        if not (k in REFERENCE_LABELS and v == name)}
    return fixes


def check_rename(by_name, old, new, *, force=False, caller=None):
    """Refuse to rename an owned device; returns the label changes that make
    references to `old` name `new`, as {name: new labels}."""
    _owned(by_name[old], "rename", caller, force)
    fixes = {}
    for info in by_name.values():
        if info.name != old and any(info.labels.get(k) == old for k in REFERENCE_LABELS):
            fixes[info.name] = {k: (new if k in REFERENCE_LABELS and v == old else v)
                                for k, v in info.labels.items()}
    return fixes


def check_rollback(target, snapshot, ancestors_of, *, force=False, caller=None):
    """Refuse a rollback of `target` (a DeviceInfo) to `snapshot` (one too)
    unless one is an ancestor of the other; ancestors_of(info) gives the
    names of a device's origins, nearest first."""
    _owned(target, "roll back", caller, force)
    if force or snapshot.name in ancestors_of(target) or target.name in ancestors_of(snapshot):
        return
    raise errors.ProtectedError(
        f"cannot roll {target.name!r} back to {snapshot.name!r}: {snapshot.name!r} is not a "
        f"snapshot of {target.name!r}, nor one of its origins, so it would replace its content "
        f"with another device's; {_FORCE}")


def check_writable(info, *, force=False):
    """Refuse to make an image writable unless forced."""
    if kind(info) == IMAGE and info.read_only and not force:
        raise errors.ProtectedError(
            f"cannot make image {info.name!r} writable: its containers and layers are built on "
            "it staying as it is; make a container of it to write (`cowblock container "
            f"create`), or {_FORCE}")
