"""Damage a pool's metadata on purpose, in controlled ways, to prove that
`pool check` finds it and `pool check --repair` recovers what can be
recovered (in the spirit of thin-provisioning-tools' thin_generate_damage).

Only for testing: it writes the metadata file of a pool that no process has
open.  It reads the on-disk format of docs/FORMAT.md directly, and damages
only blocks that the newest commit uses.
"""
import os
import struct

from . import errors
from .lock import PoolLock

META = 4096
SM_ENTRIES = 1016
TYPES = {"superblock": 0x53425550, "internal": 0x4E544E49, "map-leaf": 0x4641454D,
         "dev-leaf": 0x46414544, "sm-index": 0x58444E49, "sm-refs": 0x53464552,
         "catalog": 0x47544143}
KINDS = ["flip:" + t for t in TYPES] + [
    "truncate", "stale-superblock", "block-size", "refcount", "map-free", "double-map",
    "unsorted", "mapped-count"]


def _table():
    t = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t.append(c)
    return t


_T = _table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _T[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _u32(b, o):
    return struct.unpack_from("<I", b, o)[0]


class _Meta:
    """The metadata file, and what its newest commit uses."""

    def __init__(self, pool_dir):
        self.path = os.path.join(pool_dir, "metadata")
        with open(self.path, "rb") as f:
            self.data = bytearray(f.read())
        slots = []
        for s in (0, 1):
            b = self.block(s)
            ok = (b[16:24] == b"CBCOWBLK" and _u32(b, 4) == TYPES["superblock"]
                  and crc32c(b[4:]) ^ TYPES["superblock"] == _u32(b, 0))
            slots.append((struct.unpack_from("<Q", b, 64)[0], s) if ok else (-1, s))
        self.txn, self.slot = max(slots)
        if self.txn < 0:
            raise errors.CorruptMetadataError("no valid superblock to damage")
        sb = self.block(self.slot)
        self.nr_data = struct.unpack_from("<Q", sb, 80)[0]
        self.used = {}          # block -> type
        self.devices = []       # (leaf block, index in leaf)
        self.leaves = []        # mapping leaves
        self._walk_tree(_u32(sb, 120), dev=True)
        for root in (_u32(sb, 112), _u32(sb, 116)):
            self._walk_sm(root)

    def block(self, n):
        return self.data[n * META:(n + 1) * META]

    def _walk_tree(self, b, dev, depth=0):
        if not b or depth > 32 or b in self.used:
            return
        blk = self.block(b)
        t = _u32(blk, 4)
        self.used[b] = t
        nr, mx, vs = _u32(blk, 16), _u32(blk, 20), _u32(blk, 24)
        for i in range(nr):
            v = 32 + 4 * mx + i * vs
            if t == TYPES["internal"]:
                self._walk_tree(_u32(blk, v), dev, depth + 1)
            elif t == TYPES["dev-leaf"]:
                self.devices.append((b, i))
                self._walk_tree(_u32(blk, v), dev=False)
                cat = _u32(blk, v + 56)
                if cat:
                    self.used[cat] = TYPES["catalog"]
        if t == TYPES["map-leaf"]:
            self.leaves.append(b)

    def _walk_sm(self, root):
        if not root:
            return
        self.used[root] = TYPES["sm-index"]
        for i in range(SM_ENTRIES):
            ib = _u32(self.block(root), 32 + 4 * i)
            if ib:
                self.used[ib] = TYPES["sm-index"]
                for j in range(SM_ENTRIES):
                    pb = _u32(self.block(ib), 32 + 4 * j)
                    if pb:
                        self.used[pb] = TYPES["sm-refs"]

    def data_count_page(self):
        """The reference page holding data blocks 0..1015's counts."""
        sb = self.block(self.slot)
        root = _u32(sb, 112)
        return _u32(self.block(_u32(self.block(root), 32)), 32)

    def rewrite(self, n, change, salt=None):
        """change(bytearray) on block n, then a valid checksum."""
        blk = bytearray(self.block(n))
        change(blk)
        struct.pack_into("<I", blk, 0, crc32c(bytes(blk[4:])) ^ (salt or _u32(blk, 4)))
        self.data[n * META:(n + 1) * META] = blk

    def save(self):
        with open(self.path, "r+b") as f:
            f.write(self.data)


def _data_refs(m):
    page = m.block(m.data_count_page())
    return [_u32(page, 32 + 4 * i) for i in range(min(SM_ENTRIES, m.nr_data))]


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
    m = _Meta(pool_dir)
    if kind == "truncate":
        os.truncate(m.path, len(m.data) // 2)
        return f"truncated the metadata file to {len(m.data) // 2} bytes"
    if kind.startswith("flip:"):
        t = TYPES[kind[5:]]
        blocks = [m.slot] if kind == "flip:superblock" else sorted(
            b for b, bt in m.used.items() if bt == t)
        if not blocks:
            raise errors.InvalidArgumentError(f"the pool uses no {kind[5:]} block to damage")
        n = blocks[0]
        m.data[n * META + 200] ^= 0xFF
        m.save()
        return f"flipped byte 200 of metadata block {n} ({kind[5:]})"
    if kind == "stale-superblock":
        old = bytearray(m.block(m.slot))
        struct.pack_into("<Q", old, 64, m.txn - 2 if m.txn >= 2 else 0)
        m.data[m.slot * META:(m.slot + 1) * META] = old
        m.rewrite(m.slot, lambda b: None, TYPES["superblock"])
        m.save()
        return f"set the newest superblock's transaction id back to {max(m.txn - 2, 0)}"
    if kind == "block-size":
        m.rewrite(m.slot, lambda b: struct.pack_into("<I", b, 44, 3 * 4096), TYPES["superblock"])
        m.save()
        return "set the data block size to 12288 (not a power of two)"
    if kind == "mapped-count":
        leaf, i = m.devices[0]
        mx = _u32(m.block(leaf), 20)
        off = 32 + 4 * mx + i * 256 + 16
        m.rewrite(leaf, lambda b: struct.pack_into("<Q", b, off, struct.unpack_from("<Q", b, off)[0] + 1))
        m.save()
        return f"added 1 to the mapped-block count of the device at entry {i} of block {leaf}"
    if not m.leaves:
        raise errors.InvalidArgumentError("the pool maps no block: nothing to damage there")
    leaf = m.leaves[0]
    blk = m.block(leaf)
    nr, mx = _u32(blk, 16), _u32(blk, 20)
    refs = _data_refs(m)
    if kind == "refcount":
        page = m.data_count_page()
        target = _u32(blk, 32 + 4 * mx)
        m.rewrite(page, lambda b: struct.pack_into("<I", b, 32 + 4 * target, _u32(b, 32 + 4 * target) + 1))
        m.save()
        return f"added 1 to the reference count of data block {target}"
    if kind == "map-free":
        free = next(i for i, r in enumerate(refs) if r == 0)
        m.rewrite(leaf, lambda b: struct.pack_into("<I", b, 32 + 4 * mx, free))
        m.save()
        return f"pointed the first mapping of leaf {leaf} at free data block {free}"
    if kind == "double-map":
        if nr < 2:
            raise errors.InvalidArgumentError("the first mapping leaf holds fewer than 2 entries")
        first = _u32(blk, 32 + 4 * mx)
        m.rewrite(leaf, lambda b: struct.pack_into("<I", b, 32 + 4 * mx + 4, first))
        m.save()
        return f"made the second mapping of leaf {leaf} point at data block {first} as the first does"
    if kind == "unsorted":
        if nr < 2:
            raise errors.InvalidArgumentError("the first mapping leaf holds fewer than 2 entries")
        k0, k1 = _u32(blk, 32), _u32(blk, 36)
        m.rewrite(leaf, lambda b: (struct.pack_into("<I", b, 32, k1), struct.pack_into("<I", b, 36, k0)))
        m.save()
        return f"swapped the first two keys of mapping leaf {leaf}"
    raise AssertionError(kind)
