"""Damage a pool's metadata on purpose, in controlled ways, to prove that
`pool check` finds it and `pool check --repair` recovers what can be
recovered (in the spirit of thin-provisioning-tools' thin_generate_damage).

Only for testing: it writes the metadata file of a pool that no process has
open.  It reads the format through cowblock.format (the C core's layout),
damages only blocks that the newest commit uses, and writes back only the
blocks it changed.
"""
import os

from . import errors, format
from .lock import PoolLock

KINDS = ["flip:" + t for t in format.BLOCK_TYPES] + [
    "truncate", "stale-superblock", "block-size", "refcount", "map-free", "double-map",
    "unsorted", "mapped-count", "record-count", "record-unsorted"]

BS = format.META_BLOCK_SIZE


class MetadataFile:
    """A pool's metadata file, read whole; blocks changed with rewrite() are
    written back by save(), and nothing else."""

    def __init__(self, pool_dir):
        self.path = os.path.join(pool_dir, "metadata")
        with open(self.path, "rb") as f:
            self.data = bytearray(f.read())
        self.changed = set()
        try:
            self.commit = format.Commit(self.data)
        except ValueError:
            raise errors.CorruptMetadataError("no valid superblock to damage") from None

    def block(self, n):
        return self.data[n * BS:(n + 1) * BS]

    def put(self, n, block):
        self.data[n * BS:(n + 1) * BS] = block
        self.changed.add(n)

    def rewrite(self, n, change, block_type=None):
        """change(bytearray) on block n, then give it a valid checksum."""
        blk = self.block(n)
        change(blk)
        self.put(n, format.seal(blk, block_type))

    def flip(self, n, offset):
        blk = self.block(n)
        blk[offset] ^= 0xFF
        self.put(n, blk)

    def save(self):
        with open(self.path, "r+b") as f:
            for n in sorted(self.changed):
                f.seek(n * BS)
                f.write(self.block(n))


def damage(pool_dir, kind):
    """Damage the pool at pool_dir; returns a sentence saying what was done."""
    if kind not in KINDS:
        raise errors.InvalidArgumentError(f"unknown damage {kind!r}; known: {', '.join(KINDS)}")
    lock = PoolLock(os.fspath(pool_dir), exclusive=True, timeout=0)
    try:
        return _damage(os.fspath(pool_dir), kind)
    finally:
        lock.release()


def _damage(pool_dir, kind):
    m = MetadataFile(pool_dir)
    c = m.commit
    what = _DAMAGE[kind](m, c) if kind in _DAMAGE else _flip(m, c, kind[len("flip:"):])
    if kind != "truncate":
        m.save()
    return what


def _flip(m, c, type_name):
    t = format.BLOCK_TYPES[type_name]
    blocks = [c.slot] if t == format.T_SUPERBLOCK else c.of_type(t)
    if not blocks:
        raise errors.InvalidArgumentError(f"the pool uses no {type_name} block to damage")
    m.flip(blocks[0], 200)
    return f"flipped byte 200 of metadata block {blocks[0]} ({type_name})"


def _truncate(m, c):
    os.truncate(m.path, len(m.data) // 2)
    return f"truncated the metadata file to {len(m.data) // 2} bytes"


def _stale_superblock(m, c):
    txn = max(c.txn - 2, 0)
    m.rewrite(c.slot, lambda b: format.SUPERBLOCK.update(b, transaction_id=txn),
              format.T_SUPERBLOCK)
    return f"set the newest superblock's transaction id back to {txn}"


def _block_size(m, c):
    m.rewrite(c.slot, lambda b: format.SUPERBLOCK.update(b, data_block_size=3 * BS),
              format.T_SUPERBLOCK)
    return f"set the data block size to {3 * BS} (not a power of two)"


def _mapped_count(m, c):
    dev = next(iter(c.devices.values()))
    h = format.NODE_HEADER.unpack(m.block(dev.leaf))
    at = format.node_value_offset(h, dev.index)
    m.rewrite(dev.leaf, lambda b: format.DEV_DETAIL.update(
        b, at, mapped_blocks=dev.detail.mapped_blocks + 1))
    return f"added 1 to the mapped-block count of the device at entry {dev.index} of block {dev.leaf}"


def _first_leaf(m, c, entries=1):
    if not c.map_leaves:
        raise errors.InvalidArgumentError("the pool maps no block: nothing to damage there")
    leaf = c.map_leaves[0]
    h, keys, values = format.node(m.block(leaf))
    if len(keys) < entries:
        raise errors.InvalidArgumentError(f"the first mapping leaf holds fewer than {entries} entries")
    return leaf, h, keys, [format.block_number(v) for v in values]


def _set_value(h, index, block):
    return lambda b: format.write_uint(b, format.node_value_offset(h, index), h.value_size, block)


def _refcount(m, c):
    _, _, _, values = _first_leaf(m, c)
    target = values[0]
    page, at = c.count_page("data", target)
    size = format.SM_PAGE.field("entries").item_size
    m.rewrite(page, lambda b: format.write_uint(b, at, size, format.read_uint(b, at, size) + 1))
    return f"added 1 to the reference count of data block {target}"


def _map_free(m, c):
    leaf, h, _, _ = _first_leaf(m, c)
    free = next(b for b in range(c.sb.nr_data_blocks) if c.refcount("data", b) == 0)
    m.rewrite(leaf, _set_value(h, 0, free))
    return f"pointed the first mapping of leaf {leaf} at free data block {free}"


def _double_map(m, c):
    leaf, h, _, values = _first_leaf(m, c, entries=2)
    m.rewrite(leaf, _set_value(h, 1, values[0]))
    return f"made the second mapping of leaf {leaf} point at data block {values[0]} as the first does"


def _unsorted(m, c):
    leaf, h, keys, _ = _first_leaf(m, c, entries=2)

    def swap(b):
        for i, k in ((0, keys[1]), (1, keys[0])):
            format.write_uint(b, format.node_key_offset(i), format.NODE_KEY_SIZE, k)
    m.rewrite(leaf, swap)
    return f"swapped the first two keys of mapping leaf {leaf}"


def _record_count(m, c):
    count = c.sb.records_count + 1
    m.rewrite(c.slot, lambda b: format.SUPERBLOCK.update(b, records_count=count),
              format.T_SUPERBLOCK)
    return f"set the superblock's record count to {count}, one more than the store holds"


def _record_unsorted(m, c):
    leaf = next((b for b in c.record_leaves if len(format.rec_node(m.block(b))[1]) >= 2), None)
    if leaf is None:
        raise errors.InvalidArgumentError("no records leaf holds two records: nothing to damage")
    h, entries = format.rec_node(m.block(leaf))
    ends = [e.offset for e in entries[1:]] + [format.REC_NODE.offset("entries") + h.used]
    first, second = (bytes(m.block(leaf)[e.offset:end]) for e, end in zip(entries[:2], ends))

    def swap(b):
        b[entries[0].offset:ends[1]] = second + first
    m.rewrite(leaf, swap)
    return f"swapped the first two records of records leaf {leaf}"


_DAMAGE = {"truncate": _truncate, "stale-superblock": _stale_superblock,
           "block-size": _block_size, "mapped-count": _mapped_count, "refcount": _refcount,
           "map-free": _map_free, "double-map": _double_map, "unsorted": _unsorted,
           "record-count": _record_count, "record-unsorted": _record_unsorted}
