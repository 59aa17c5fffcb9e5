"""The on-disk format as Python sees it: the one Python view of csrc/format.h.

No offset, size or constant is written down here.  The C core exports its
layout (csrc/format.c: the offsetof and sizeof of every field of every
record, and the format's constants), and each record below packs and
unpacks with a struct built from that table, side by side.  Checksums are
the C core's crc32c.  docs/FORMAT.md describes the same layout in prose.

    sb = SUPERBLOCK.unpack(block)          # a namedtuple, fields in C order
    block = SUPERBLOCK.pack(sb._replace(data_block_size=8192))
    seal(block)                            # a valid checksum for its type

Commit reads what the newest commit of a metadata file uses (for the damage
tool and the tests); it trusts what it reads, so give it a pool that check()
finds clean.
"""
import collections
import struct
from dataclasses import dataclass, field

from ._native import ffi, lib

_UINT = {1: "B", 2: "H", 4: "I", 8: "Q"}


def _uint_code(size):
    """The struct code of a little-endian unsigned integer of size bytes."""
    return _UINT[size]


def read_uint(buf, offset, size):
    """The little-endian unsigned integer of size bytes at buf[offset:]."""
    return struct.unpack_from(f"<{_uint_code(size)}", buf, offset)[0]


def write_uint(buf, offset, size, value):
    struct.pack_into(f"<{_uint_code(size)}", buf, offset, value)


# ---- the C tables ----

def _table(fn):
    n = ffi.new("uint32_t *")
    rows = fn(n)
    return [rows[i] for i in range(n[0])]


def _text(c):
    return ffi.string(c).decode()


CONSTANTS = {_text(c.name): c.value for c in _table(lib.cb_format_constants)}

META_BLOCK_SIZE = CONSTANTS["CB_META_BLOCK_SIZE"]
MAGIC = CONSTANTS["CB_MAGIC"]
FORMAT_VERSION = CONSTANTS["CB_FORMAT_VERSION"]
POOL_CONFIG_MAX = CONSTANTS["CB_POOL_CONFIG_MAX"]
SB_NEEDS_CHECK = CONSTANTS["CB_SB_NEEDS_CHECK"]
NODE_KEY_SIZE = CONSTANTS["CB_NODE_KEY_SIZE"]
DEV_READ_ONLY = CONSTANTS["CB_DEV_READ_ONLY"]
DEV_DELETING = CONSTANTS["CB_DEV_DELETING"]
CATALOG_INLINE = CONSTANTS["CB_CATALOG_INLINE"]
CATALOG_MAX = CONSTANTS["CB_CATALOG_MAX"]
SM_ENTRIES = CONSTANTS["CB_SM_ENTRIES"]
MAX_BLOCKS = CONSTANTS["CB_MAX_BLOCKS"]
MAX_DEV_ID = CONSTANTS["CB_MAX_DEV_ID"]
MAX_TREE_DEPTH = CONSTANTS["CB_MAX_TREE_DEPTH"]
RO_COMPAT_RECORDS = CONSTANTS["CB_RO_COMPAT_RECORDS"]
REC_IN_BLOCKS = CONSTANTS["CB_REC_IN_BLOCKS"]
REC_VALUE_BYTES = CONSTANTS["CB_REC_VALUE_BYTES"]

# Block types by their short names ("map-leaf" for CB_BT_MAP_LEAF); each is
# also its checksum's salt.
BLOCK_TYPES = {name[len("CB_BT_"):].lower().replace("_", "-"): value
               for name, value in CONSTANTS.items() if name.startswith("CB_BT_")}
T_SUPERBLOCK = BLOCK_TYPES["superblock"]
T_INTERNAL = BLOCK_TYPES["internal"]
T_MAP_LEAF = BLOCK_TYPES["map-leaf"]
T_DEV_LEAF = BLOCK_TYPES["dev-leaf"]
T_SM_INDEX = BLOCK_TYPES["sm-index"]
T_SM_REFS = BLOCK_TYPES["sm-refs"]
T_CATALOG = BLOCK_TYPES["catalog"]
T_REC_INTERNAL = BLOCK_TYPES["rec-internal"]
T_REC_LEAF = BLOCK_TYPES["rec-leaf"]
T_REC_VALUE = BLOCK_TYPES["rec-value"]


# ---- records: pack and unpack side by side ----

@dataclass(frozen=True)
class Field:
    name: str
    offset: int
    size: int
    item_size: int     # size of one element; == size unless the field is an array

    @property
    def count(self):
        return self.size // self.item_size

    @property
    def code(self):
        """Its struct code: bytes for byte arrays, unsigned integers otherwise."""
        if self.item_size == 1 and self.size > 1:
            return f"{self.size}s"
        n = self.count
        return f"{n if n > 1 else ''}{_uint_code(self.item_size)}"


class Record:
    """A record of format.h: its fields in C order, packed and unpacked by one
    struct.Struct built from their offsets and sizes.  Values are namedtuples;
    array fields of integers are tuples, byte arrays are bytes."""

    def __init__(self, name, size, fields):
        self.name, self.size = name, size
        self.fields = tuple(sorted(fields, key=lambda f: f.offset))
        codes, at = ["<"], 0
        for f in self.fields:
            if f.offset > at:           # never, while format.c's size check holds
                codes.append(f"{f.offset - at}x")
            codes.append(f.code)
            at = f.offset + f.size
        codes.append(f"{size - at}x" if size > at else "")
        self._struct = struct.Struct("".join(codes))
        self.type = collections.namedtuple(name, [f.name for f in self.fields])
        self._by_name = {f.name: f for f in self.fields}

    def field(self, name):
        return self._by_name[name]

    def offset(self, name, index=0):
        """Byte offset of a field (of element `index` of an array field)."""
        f = self._by_name[name]
        return f.offset + index * f.item_size

    def unpack(self, buf, offset=0):
        flat = iter(self._struct.unpack_from(buf, offset))
        return self.type(*(tuple(next(flat) for _ in range(f.count))
                           if f.count > 1 and f.item_size > 1 else next(flat)
                           for f in self.fields))

    def _flat(self, value):
        for f, v in zip(self.fields, value):
            if f.count > 1 and f.item_size > 1:
                yield from v
            else:
                yield v

    def pack(self, value):
        return self._struct.pack(*self._flat(value))

    def pack_into(self, buf, offset, value):
        self._struct.pack_into(buf, offset, *self._flat(value))

    def update(self, buf, offset=0, **changes):
        """Change some fields of the record at buf[offset:] in place."""
        self.pack_into(buf, offset, self.unpack(buf, offset)._replace(**changes))


def _records():
    fields = collections.defaultdict(list)
    for f in _table(lib.cb_format_fields):
        fields[_text(f.record)].append(Field(_text(f.name), f.offset, f.size, f.item_size))
    return {_text(r.record): Record(_text(r.record), r.size, fields[_text(r.record)])
            for r in _table(lib.cb_format_records)}


RECORDS = _records()
BLOCK_HEADER = RECORDS["block_header"]
SUPERBLOCK = RECORDS["superblock"]
NODE_HEADER = RECORDS["node_header"]
DEV_DETAIL = RECORDS["dev_detail"]
CATALOG_BLOCK = RECORDS["catalog_block"]
SM_PAGE = RECORDS["sm_page"]
REC_NODE = RECORDS["rec_node"]
REC_LEAF_ENTRY = RECORDS["rec_leaf_entry"]
REC_INTERNAL_ENTRY = RECORDS["rec_internal_entry"]
REC_VALUE_BLOCK = RECORDS["rec_value_block"]


# ---- checksums (the C core's crc32c) ----

def crc32c(data, crc=0):
    """CRC-32C of data, continuing from crc."""
    return lib.cb_crc32c(crc, ffi.from_buffer(data), len(data))


def block_checksum(block, block_type=None):
    """The checksum a metadata block must carry: crc32c of bytes 4.. XOR its
    type (the block's own type field unless block_type is given)."""
    if len(block) != META_BLOCK_SIZE:
        raise ValueError(f"a metadata block is {META_BLOCK_SIZE} bytes, not {len(block)}")
    if block_type is None:
        block_type = BLOCK_HEADER.unpack(block).type
    return lib.cb_block_csum(ffi.from_buffer(block), block_type)


def seal(block, block_type=None):
    """Give a metadata block (a bytearray) a valid checksum, in place."""
    BLOCK_HEADER.update(block, csum=block_checksum(block, block_type))
    return block


def block_ok(block, number):
    """Does this block carry its own checksum and location?"""
    h = BLOCK_HEADER.unpack(block)
    return h.csum == block_checksum(block) and h.blocknr == number


# ---- b-tree nodes ----

def node_key_offset(index):
    return NODE_HEADER.size + index * NODE_KEY_SIZE


def node_value_offset(header, index):
    """Offset of value `index` in a node: after max_entries keys."""
    return node_key_offset(header.max_entries) + index * header.value_size


def node(block):
    """A node's header, its keys, and its values (bytes of value_size each)."""
    h = NODE_HEADER.unpack(block)
    keys = list(struct.unpack_from(f"<{h.nr_entries}{_uint_code(NODE_KEY_SIZE)}", block,
                                   node_key_offset(0)))
    values = [bytes(block[node_value_offset(h, i):node_value_offset(h, i + 1)])
              for i in range(h.nr_entries)]
    return h, keys, values


def block_number(value):
    """A u32 node value: a child block (internal nodes) or a data block (leaves)."""
    return read_uint(value, 0, len(value))


# ---- the records store ----

@dataclass
class RecEntry:
    offset: int          # of the entry, in the block
    key: bytes
    header: tuple        # REC_LEAF_ENTRY's or REC_INTERNAL_ENTRY's namedtuple
    value: bytes = None  # an inline value (leaf entries)
    first_block: int = 0 # the value's first block (leaf entries with REC_IN_BLOCKS)


def rec_node(block):
    """A records node's header and its entries, decoded."""
    h = REC_NODE.unpack(block)
    leaf = h.type == T_REC_LEAF
    record = REC_LEAF_ENTRY if leaf else REC_INTERNAL_ENTRY
    at, entries = REC_NODE.offset("entries"), []
    for _ in range(h.nr_entries):
        e = record.unpack(block, at)
        key_at = at + record.size
        entry = RecEntry(at, bytes(block[key_at:key_at + e.key_len]), e)
        at = key_at + e.key_len
        if leaf and e.flags & REC_IN_BLOCKS:
            entry.first_block = read_uint(block, at, 4)
            at += 4
        elif leaf:
            entry.value = bytes(block[at:at + e.value_len])
            at += e.value_len
        entries.append(entry)
    return h, entries


# ---- space maps ----

def count_location(block):
    """Where a space map keeps block's count: the indexes into the root page,
    the index page and the reference page."""
    return block // SM_ENTRIES ** 2, block // SM_ENTRIES % SM_ENTRIES, block % SM_ENTRIES


# ---- what a commit uses ----

def superblock_slot(meta, slot):
    """(valid, superblock) of slot 0 or 1 of a metadata file's bytes."""
    block = meta[slot * META_BLOCK_SIZE:(slot + 1) * META_BLOCK_SIZE]
    sb = SUPERBLOCK.unpack(block)
    valid = (len(block) == META_BLOCK_SIZE and sb.magic == MAGIC and sb.type == T_SUPERBLOCK
             and sb.blocknr == slot and block_checksum(block, T_SUPERBLOCK) == sb.csum)
    return valid, sb


@dataclass
class UsedBlock:
    type: int
    what: str            # "mapping tree", "data space map page", "device 3 catalog", ...
    device: int = 0      # the device whose tree or catalog it is, 0 for none (or several)


@dataclass
class DeviceEntry:
    id: int
    detail: tuple        # DEV_DETAIL's namedtuple
    leaf: int            # the device-details leaf that holds it
    index: int           # its entry in that leaf
    nodes: set = field(default_factory=set)   # its mapping tree's nodes


class Commit:
    """What the newest commit of a metadata file (its bytes) uses, block by
    block: the superblock it chose (FORMAT.md §10), both trees, both space
    maps, the catalog blocks, the records store."""

    def __init__(self, meta):
        self.meta = meta
        self.slots = [superblock_slot(meta, s) for s in (0, 1)]
        valid = [(sb.transaction_id, s) for s, (ok, sb) in enumerate(self.slots) if ok]
        if not valid:
            raise ValueError("the metadata file has no valid superblock")
        self.slot = max(valid)[1]
        self.sb = self.slots[self.slot][1]
        self.blocks = {}          # block -> UsedBlock
        self.devices = {}         # id -> DeviceEntry
        self.map_leaves = []      # every mapping leaf, once, in walk order
        self.record_leaves = []   # every records leaf, in key order
        self._dev_tree(self.sb.device_root, 0)
        self._records_tree(self.sb.records_root, 0)
        for d in self.devices.values():
            self._map_tree(d, d.detail.mapping_root, 0)
            if d.detail.catalog_block:
                self.blocks[d.detail.catalog_block] = UsedBlock(T_CATALOG, f"device {d.id} catalog",
                                                               d.id)
        for name, root in (("data", self.sb.data_sm_root), ("meta", self.sb.meta_sm_root)):
            self._space_map(name, root)

    @property
    def txn(self):
        return self.sb.transaction_id

    def block(self, n):
        return self.meta[n * META_BLOCK_SIZE:(n + 1) * META_BLOCK_SIZE]

    def of_type(self, block_type, what=None):
        return sorted(b for b, u in self.blocks.items()
                      if u.type == block_type and (what is None or what in u.what))

    def _dev_tree(self, b, depth):
        if not b or depth > MAX_TREE_DEPTH:
            return
        h, keys, values = node(self.block(b))
        self.blocks[b] = UsedBlock(h.type, "device tree")
        for i, (k, v) in enumerate(zip(keys, values)):
            if h.type == T_INTERNAL:
                self._dev_tree(block_number(v), depth + 1)
            else:
                self.devices[k] = DeviceEntry(k, DEV_DETAIL.unpack(v), b, i)

    def _map_tree(self, dev, b, depth):
        if not b or depth > MAX_TREE_DEPTH:
            return
        h, _, values = node(self.block(b))
        dev.nodes.add(b)
        shared = b in self.blocks
        self.blocks[b] = UsedBlock(h.type, "mapping tree", 0 if shared else dev.id)
        if h.type == T_INTERNAL:
            for v in values:
                self._map_tree(dev, block_number(v), depth + 1)
        elif not shared:
            self.map_leaves.append(b)

    def _records_tree(self, b, depth):
        if not b or depth > MAX_TREE_DEPTH:
            return
        h, entries = rec_node(self.block(b))
        self.blocks[b] = UsedBlock(h.type, "records store")
        if h.type == T_REC_INTERNAL:
            for e in entries:
                self._records_tree(e.header.child, depth + 1)
            return
        self.record_leaves.append(b)
        for e in entries:
            for v in self._value_chain(e):
                self.blocks[v] = UsedBlock(T_REC_VALUE, "record value")

    def _value_chain(self, entry):
        """The blocks of a record's value, in order."""
        v, chain = entry.first_block, []
        for _ in range(-(-entry.header.value_len // REC_VALUE_BYTES) if v else 0):
            chain.append(v)
            v = REC_VALUE_BLOCK.unpack(self.block(v)).next
        return chain

    def records(self):
        """Every record, (key, value), in key order."""
        for leaf in self.record_leaves:
            for e in rec_node(self.block(leaf))[1]:
                if e.value is not None:
                    yield e.key, e.value
                    continue
                blocks = (REC_VALUE_BLOCK.unpack(self.block(v)) for v in self._value_chain(e))
                yield e.key, b"".join(b.bytes[:b.len] for b in blocks)

    def _space_map(self, name, root):
        if not root:
            return
        self.blocks[root] = UsedBlock(T_SM_INDEX, f"{name} space map root")
        for index in SM_PAGE.unpack(self.block(root)).entries:
            if not index:
                continue
            self.blocks[index] = UsedBlock(T_SM_INDEX, f"{name} space map index")
            for page in SM_PAGE.unpack(self.block(index)).entries:
                if page:
                    self.blocks[page] = UsedBlock(T_SM_REFS, f"{name} space map page")

    def count_page(self, space, block):
        """(reference page, byte offset in it) of block's count; space is
        "data" or "meta".  None if no page holds it (the count is 0)."""
        i0, i1, k = count_location(block)
        page = self.sb.data_sm_root if space == "data" else self.sb.meta_sm_root
        for i in (i0, i1):
            if not page:
                return None
            page = SM_PAGE.unpack(self.block(page)).entries[i]
        return (page, SM_PAGE.offset("entries", k)) if page else None

    def refcount(self, space, block):
        where = self.count_page(space, block)
        if where is None:
            return 0
        page, offset = where
        return read_uint(self.block(page), offset, SM_PAGE.field("entries").item_size)
