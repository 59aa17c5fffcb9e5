"""Damaged pool files: flipped bytes in every kind of metadata block,
truncated files, broken superblocks.

Whatever is damaged, the engine must say so (CorruptMetadataError naming
what is wrong: "checksum", "truncated", the block number) when it opens the
pool, when it reads through the damaged block, or in pool.check(); it must
never crash and never return wrong data.

The metadata is read through cowblock.format (the C core's own layout), so
that only blocks the newest commit uses are damaged: stale blocks of old
transactions keep their type field but are unreferenced, and damaging them
must change nothing.
"""
import errno
import os
import random
import subprocess
import sys

import pytest

from cowblock import (CorruptMetadataError, InvalidArgumentError, Pool, PoolNotFoundError,
                      ReadOnlyError)
from cowblock.format import (BLOCK_HEADER, META_BLOCK_SIZE as META, NODE_HEADER, SM_ENTRIES,
                             SM_PAGE, SUPERBLOCK, T_CATALOG, T_DEV_LEAF, T_INTERNAL, T_MAP_LEAF,
                             T_SM_INDEX, T_SM_REFS, Commit, block_ok, node, node_key_offset,
                             node_value_offset, seal, superblock_slot, write_uint)
from helpers import pattern

BS = 4096
METADATA_TYPES = (T_INTERNAL, T_MAP_LEAF, T_SM_INDEX, T_SM_REFS, T_DEV_LEAF, T_CATALOG)

DATA_BLOCKS = 2048
A_SIZE, A_MAPPED = 2000 * BS, 1100   # 1100 entries: an internal node over several leaves
B_SIZE, B_MAPPED = 64 * BS, 10
BIG_LABELS = {f"label{i}": "v" * 40 for i in range(10)}  # overflows into a catalog block


# ---------------------------------------------------------------- the format

def block_type(meta, n):
    return BLOCK_HEADER.unpack(meta, n * META).type


class Layout(Commit):
    """What the newest commit of a metadata file uses, block by block."""

    def nodes(self, did):
        return self.devices[did].nodes

    def described(self, what):
        return [b for b, u in self.blocks.items() if u.what == what]


def read_meta(path):
    with open(os.path.join(path, "metadata"), "rb") as f:
        return f.read()


def patch_meta(path, offset, data):
    with open(os.path.join(path, "metadata"), "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(path, offset, nbytes=1):
    """Invert nbytes of the metadata file at offset."""
    with open(os.path.join(path, "metadata"), "r+b") as f:
        f.seek(offset)
        old = f.read(nbytes)
        f.seek(offset)
        f.write(bytes(x ^ 0xFF for x in old))


def rewrite_block(path, n, change):
    """Apply change(bytearray) to metadata block n and give it a valid checksum."""
    meta = read_meta(path)
    blk = bytearray(meta[n * META:(n + 1) * META])
    change(blk)
    patch_meta(path, n * META, bytes(seal(blk)))


def set_fields(record, offset=0, **changes):
    """A change for rewrite_block: fields of the record at offset set."""
    return lambda blk: record.update(blk, offset, **changes)


def set_value(meta, n, index, value):
    """A change for rewrite_block: value `index` of node n set."""
    h = NODE_HEADER.unpack(meta, n * META)
    return lambda blk: write_uint(blk, node_value_offset(h, index), h.value_size, value)


# ---------------------------------------------------------------- the pool under test

def expected_contents():
    a = bytearray(A_SIZE)
    a[:A_MAPPED * BS] = pattern(1, A_MAPPED * BS)
    s = bytes(a)
    a[10 * BS:10 * BS + 7] = b"changed"
    b = bytearray(B_SIZE)
    b[:B_MAPPED * BS] = pattern(2, B_MAPPED * BS)
    return {"a": bytes(a), "b": bytes(b), "s": s}


EXPECTED = expected_contents()


def build(path):
    """a: 1100 mapped blocks (an internal node and leaves); b: labels in a
    catalog block; s: a snapshot of a, which then diverges from it."""
    with Pool.create(path, DATA_BLOCKS * BS, BS, metadata_size=1 << 20,
                     commit_interval=0) as pool:
        a = pool.create_thin("a", A_SIZE)
        a.pwrite(EXPECTED["s"][:A_MAPPED * BS], 0)
        b = pool.create_thin("b", B_SIZE, labels=BIG_LABELS)
        b.pwrite(EXPECTED["b"][:B_MAPPED * BS], 0)
        pool.snapshot("a", "s")
        a.pwrite(b"changed", 10 * BS)
        pool.commit()
        ids = {i.name: i.id for i in pool.list()}
    return ids


@pytest.fixture
def damaged(tmp_path):
    path = tmp_path / "pool"
    ids = build(path)
    return path, ids, Layout(read_meta(path))


def assert_reads_right_or_raise(pool, name, step=BS, mention=None):
    """Read a device piece by piece: every piece must be right or raise
    CorruptMetadataError (naming `mention` when given).  Returns the number
    of pieces that raised."""
    dev = pool.device(name)
    expect = EXPECTED[name]
    failed = 0
    for off in range(0, dev.size, step):
        n = min(step, dev.size - off)
        try:
            got = dev.pread(n, off)
        except CorruptMetadataError as e:
            failed += 1
            assert e.errno == errno.EUCLEAN
            if mention:
                assert mention in str(e), str(e)
            continue
        assert got == expect[off:off + n], f"device {name}: wrong data at {off}"
    return failed


def check_names(pool, *needles):
    report = pool.check()
    assert not report.ok
    assert report.error_count >= 1 and report.errors
    text = "\n".join(report.errors)
    for needle in needles:
        assert needle in text, text
    return report


# ---------------------------------------------------------------- the parser itself

def test_layout_parser_agrees_with_the_pool(damaged):
    path, ids, layout = damaged
    meta = read_meta(path)
    with Pool.open(path, read_only=True) as pool:
        assert layout.txn == pool.stats().transaction_id
        assert layout.sb.nr_data_blocks == DATA_BLOCKS
        assert set(layout.devices) == set(ids.values())
        for info in pool.list():
            assert layout.devices[info.id].detail.mapped_blocks == info.mapped_blocks
    # every block the commit uses carries the type field the parser expects
    for b, used in layout.blocks.items():
        assert block_type(meta, b) == used.type, (b, used)
        assert block_ok(meta[b * META:(b + 1) * META], b), (b, used)
    # and the kinds this module damages are all there
    assert layout.of_type(T_DEV_LEAF) and layout.of_type(T_CATALOG)
    assert layout.of_type(T_INTERNAL, "mapping") and len(layout.of_type(T_MAP_LEAF)) >= 3
    for what in ("data space map root", "data space map index", "data space map page",
                 "meta space map root", "meta space map index", "meta space map page"):
        assert layout.described(what), what
    # stale blocks of older transactions exist too: a scan of type fields alone
    # finds more blocks than the commit uses
    scanned = [n for n in range(2, len(meta) // META) if block_type(meta, n) in METADATA_TYPES]
    assert set(layout.blocks) <= set(scanned)


def test_superblock_slot_is_transaction_parity(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 64 * BS, BS, metadata_size=1 << 20, commit_interval=0) as pool:
        meta = read_meta(path)
        valid, sb = superblock_slot(meta, 1)
        assert valid and sb.transaction_id == 1
        assert not superblock_slot(meta, 0)[0]  # slot 0 is empty until transaction 2
        for i in range(5):
            pool.create_thin(f"d{i}", BS)
            txn = pool.stats().transaction_id
            meta = read_meta(path)
            for slot, want in ((txn % 2, txn), (1 - txn % 2, txn - 1)):
                valid, sb = superblock_slot(meta, slot)
                assert valid and sb.transaction_id == want


# ---------------------------------------------------------------- superblocks

@pytest.mark.parametrize("where,why", [("csum", "checksum"), ("type", "checksum"),
                                       ("blocknr", "checksum"), ("magic", "magic"),
                                       ("transaction_id", "checksum"), ("device_root", "checksum"),
                                       ("config", "checksum"), ("last byte", "checksum")])
def test_both_superblocks_damaged(damaged, where, why):
    path, _, _ = damaged
    offset = META - 1 if where == "last byte" else SUPERBLOCK.offset(where)
    flip(path, offset)
    flip(path, META + offset)
    for attempt in range(2):  # a failed open leaves no lock behind
        for ro in (False, True):
            with pytest.raises(CorruptMetadataError) as exc:
                Pool.open(path, read_only=ro)
            msg = str(exc.value)
            assert exc.value.errno == errno.EUCLEAN
            assert "no valid superblock" in msg and why in msg, msg
            assert "slot 0" in msg and "slot 1" in msg, msg


def test_both_superblocks_zeroed(damaged):
    path, _, _ = damaged
    patch_meta(path, 0, bytes(2 * META))
    with pytest.raises(CorruptMetadataError) as exc:
        Pool.open(path)
    assert "no valid superblock" in str(exc.value) and "magic" in str(exc.value)


def test_superblock_slots_swapped(damaged):
    """Each slot's copy says where it belongs: a copy in the wrong slot is invalid."""
    path, _, _ = damaged
    meta = read_meta(path)
    patch_meta(path, 0, meta[META:2 * META] + meta[:META])
    with pytest.raises(CorruptMetadataError) as exc:
        Pool.open(path)
    assert "self location" in str(exc.value)


def test_newest_superblock_damaged_opens_the_previous_transaction(tmp_path):
    path = tmp_path / "pool"
    build(path)
    with Pool.open(path, commit_interval=0) as pool:
        prev = pool.stats().transaction_id
        pool.create_thin("late", 8 * BS).pwrite(b"late data", 0)
        pool.commit()
        newest = pool.stats().transaction_id
    assert newest == prev + 2  # create_thin commits, then the write's commit
    meta = read_meta(path)
    assert superblock_slot(meta, newest % 2)[1].transaction_id == newest
    assert superblock_slot(meta, (newest - 1) % 2)[1].transaction_id == newest - 1
    flip(path, (newest % 2) * META + 200, 4)  # damage the newest slot only
    with Pool.open(path, commit_interval=0) as pool:
        assert pool.stats().transaction_id == newest - 1
        assert "late" in pool  # created in newest - 1 ...
        assert pool.device("late").pread(9, 0) == bytes(9)  # ... but its mapping came later
        for name in ("a", "b", "s"):
            assert pool.device(name).pread(len(EXPECTED[name]), 0) == EXPECTED[name]
        assert pool.info("b").labels == BIG_LABELS
        report = pool.check()
        assert report.ok, str(report)
        pool.device("late").pwrite(b"again", 0)
        pool.commit()
        assert pool.stats().transaction_id == newest  # overwrites the damaged slot
    meta = read_meta(path)
    assert superblock_slot(meta, 0)[0] and superblock_slot(meta, 1)[0]
    with Pool.open(path, commit_interval=0) as pool:
        assert pool.stats().transaction_id == newest
        assert pool.device("late").pread(5, 0) == b"again"
        assert pool.check().ok


def test_older_superblock_damaged_changes_nothing(damaged):
    path, _, layout = damaged
    txn = layout.txn
    flip(path, ((txn - 1) % 2) * META + 100, 8)
    with Pool.open(path, commit_interval=0) as pool:
        assert pool.stats().transaction_id == txn
        for name in ("a", "b", "s"):
            assert pool.device(name).pread(len(EXPECTED[name]), 0) == EXPECTED[name]
        assert pool.check().ok


@pytest.mark.parametrize("field,value,error,words", [
    ("version", 2, CorruptMetadataError, ["version 2"]),
    ("data_block_size", 5000, CorruptMetadataError, ["block size 5000"]),
    ("data_block_size", 0, CorruptMetadataError, ["block size 0"]),
    ("nr_meta_blocks", 1 << 20, CorruptMetadataError, ["truncated"]),
    ("nr_meta_blocks", 3, CorruptMetadataError, ["3 metadata blocks"]),
    ("nr_data_blocks", 0, CorruptMetadataError, ["0 data blocks"]),
    ("nr_data_blocks", DATA_BLOCKS * 4, CorruptMetadataError, ["data file", "truncated"]),
    ("incompat", 1, InvalidArgumentError, ["incompatible features"]),
])
def test_newest_superblock_with_bad_fields(damaged, field, value, error, words):
    """A checksum-valid superblock whose fields are impossible is refused,
    with no fallback to the older slot."""
    path, _, layout = damaged
    rewrite_block(path, layout.slot, set_fields(SUPERBLOCK, **{field: value}))
    for ro in (False, True):
        with pytest.raises(error) as exc:
            Pool.open(path, read_only=ro)
        for w in words:
            assert w in str(exc.value), str(exc.value)


def test_unknown_ro_compat_feature_allows_read_only_opens_only(damaged):
    path, _, layout = damaged
    rewrite_block(path, layout.slot, set_fields(SUPERBLOCK, ro_compat=1 << 7))
    with pytest.raises(ReadOnlyError) as exc:
        Pool.open(path)
    assert "read-only" in str(exc.value)
    with Pool.open(path, read_only=True) as pool:
        assert pool.device("a").pread(A_SIZE, 0) == EXPECTED["a"]


# ---------------------------------------------------------------- b-tree nodes and other blocks

@pytest.mark.parametrize("kind", ["device leaf", "catalog"])
def test_damage_found_at_open(damaged, kind):
    path, _, layout = damaged
    t = T_DEV_LEAF if kind == "device leaf" else T_CATALOG
    victim = layout.of_type(t)[0]
    flip(path, victim * META + 1000)
    for attempt in range(2):
        with pytest.raises(CorruptMetadataError) as exc:
            Pool.open(path)
        msg = str(exc.value)
        assert f"metadata block {victim} " in msg and "checksum" in msg, msg
    with pytest.raises(CorruptMetadataError):
        Pool.open(path, read_only=True)


def node_spot(meta, n, where):
    """A byte of node n: in its header, its keys, its values, or past them."""
    h = NODE_HEADER.unpack(meta, n * META)
    return {"header": NODE_HEADER.offset("max_entries"), "keys": node_key_offset(2),
            "values": node_value_offset(h, 2) + 1, "tail": META - 96}[where]


@pytest.mark.parametrize("kind", ["internal", "exclusive leaf", "shared leaf"])
@pytest.mark.parametrize("where", ["header", "keys", "values", "tail"])
def test_mapping_node_damage(damaged, kind, where):
    path, ids, layout = damaged
    a_nodes, s_nodes = layout.nodes(ids["a"]), layout.nodes(ids["s"])
    if kind == "internal":
        victim = layout.devices[ids["a"]].detail.mapping_root
        assert layout.blocks[victim].type == T_INTERNAL
    else:
        leaves = [b for b in layout.of_type(T_MAP_LEAF) if b in a_nodes]
        pick = [b for b in leaves if (b in s_nodes) == (kind == "shared leaf")]
        victim = pick[0]
    flip(path, victim * META + node_spot(read_meta(path), victim, where))
    users = [n for n in ("a", "s", "b") if victim in layout.nodes(ids[n])]
    assert "a" in users and "b" not in users
    with Pool.open(path, commit_interval=0) as pool:
        for name in ("a", "s", "b"):
            failed = assert_reads_right_or_raise(pool, name, step=16 * BS,
                                                 mention=f"metadata block {victim} ")
            if name in users:
                assert failed, f"reading {name} never noticed the damage to block {victim}"
            else:
                assert not failed
        for name in users:
            with pytest.raises(CorruptMetadataError) as exc:
                pool.device(name).pread(pool.device(name).size, 0)
            assert f"metadata block {victim} is corrupt" in str(exc.value)
        check_names(pool, f"node {victim}", f"metadata block {victim} is corrupt")


@pytest.mark.parametrize("what", ["data space map root", "data space map index",
                                  "data space map page", "meta space map root",
                                  "meta space map index", "meta space map page"])
def test_space_map_damage(damaged, what):
    path, _, layout = damaged
    victim = layout.described(what)[0]
    flip(path, victim * META + SM_PAGE.offset("entries", SM_ENTRIES // 2), 2)
    with Pool.open(path, commit_interval=0) as pool:
        # reads do not need the space maps: they stay right
        for name in ("a", "b", "s"):
            assert pool.device(name).pread(len(EXPECTED[name]), 0) == EXPECTED[name]
        try:  # usage() reads reference counts: right, or refused
            assert pool.usage("b").mapped_blocks == B_MAPPED
        except CorruptMetadataError as e:
            assert f"metadata block {victim} " in str(e)
        check_names(pool, f"metadata block {victim} is corrupt", "checksum")
        # a write that must allocate needs the space maps: it is refused
        with pytest.raises(CorruptMetadataError) as exc:
            pool.device("b").pwrite(b"new", 40 * BS)
        assert f"metadata block {victim} " in str(exc.value)
        assert pool.device("b").pread(B_SIZE, 0) == EXPECTED["b"]


@pytest.mark.parametrize("source", ["another mapping leaf", "a space map page"])
def test_misdirected_block(damaged, source):
    """A whole valid block written to the wrong place: its checksum is fine,
    but its self-location or its type gives it away."""
    path, ids, layout = damaged
    a_nodes, s_nodes = layout.nodes(ids["a"]), layout.nodes(ids["s"])
    leaves = [b for b in layout.of_type(T_MAP_LEAF) if b in a_nodes and b not in s_nodes]
    victim = leaves[0]
    if source == "another mapping leaf":
        shared = [b for b in layout.of_type(T_MAP_LEAF) if b in s_nodes and b != victim]
        src, words = shared[0], ["self location"]
    else:
        src, words = layout.of_type(T_SM_REFS)[0], ["expected a", "space map reference page"]
    meta = read_meta(path)
    patch_meta(path, victim * META, meta[src * META:(src + 1) * META])
    with Pool.open(path, commit_interval=0) as pool:
        failed = assert_reads_right_or_raise(pool, "a", step=16 * BS,
                                             mention=f"metadata block {victim} ")
        assert failed
        with pytest.raises(CorruptMetadataError) as exc:
            pool.device("a").pread(A_SIZE, 0)
        for w in words:
            assert w in str(exc.value), str(exc.value)
        assert pool.device("s").pread(A_SIZE, 0) == EXPECTED["s"]
        check_names(pool, f"metadata block {victim} is corrupt")


def test_mapping_to_a_data_block_past_the_end(damaged):
    """A checksum-valid leaf whose value points past the data file."""
    path, ids, layout = damaged
    a_nodes, s_nodes = layout.nodes(ids["a"]), layout.nodes(ids["s"])
    victim = [b for b in layout.of_type(T_MAP_LEAF) if b in a_nodes and b not in s_nodes][0]
    meta = read_meta(path)
    key0 = node(meta[victim * META:(victim + 1) * META])[1][0]
    bad = DATA_BLOCKS + 77
    rewrite_block(path, victim, set_value(meta, victim, 0, bad))
    with Pool.open(path, commit_interval=0) as pool:
        with pytest.raises(CorruptMetadataError) as exc:
            pool.device("a").pread(BS, key0 * BS)
        assert f"data block {bad}" in str(exc.value) and "past the end" in str(exc.value)
        with pytest.raises(CorruptMetadataError):
            pool.device("a").pwrite(b"x", key0 * BS)
        # every other block still reads right
        assert_reads_right_or_raise(pool, "a", mention=f"data block {bad}")
        check_names(pool, f"maps to data block {bad}", "past the end")


def test_mapping_tree_cycle_is_reported_not_looped(damaged):
    path, ids, layout = damaged
    root = layout.devices[ids["a"]].detail.mapping_root
    meta = read_meta(path)
    keys = node(meta[root * META:(root + 1) * META])[1]
    assert len(keys) >= 2
    rewrite_block(path, root, set_value(meta, root, 1, root))  # child 1 -> the root itself
    key1 = keys[1]
    code = f"""
from cowblock import Pool, CorruptMetadataError
p = Pool.open({str(path)!r}, read_only=True)
try:
    p.device("a").pread(4096, {key1 * BS})
except CorruptMetadataError as e:
    print("CORRUPT", e)
else:
    print("READ")
"""
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=4)
    except subprocess.TimeoutExpired:
        pytest.fail("reading through a cyclic mapping tree hangs")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("CORRUPT"), r.stdout


def test_check_reports_a_mapping_tree_cycle(damaged):
    path, ids, layout = damaged
    root = layout.devices[ids["a"]].detail.mapping_root
    rewrite_block(path, root, set_value(read_meta(path), root, 1, root))
    code = f"""
from cowblock import Pool
p = Pool.open({str(path)!r}, read_only=True)
r = p.check()
print(r.ok)
print("\\n".join(r.errors))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("False"), r.stdout
    assert f"metadata block {root}" in r.stdout, r.stdout


def test_random_byte_flips_never_crash_or_misread(tmp_path):
    """Seeded fuzz: flip a few random bytes in blocks the commit uses (the
    superblocks included); the pool must refuse to open, or read right or
    raise CorruptMetadataError, and check() must notice."""
    path = tmp_path / "pool"
    build(path)
    pristine = read_meta(path)
    layout = Layout(pristine)
    newest = layout.slot
    targets = sorted(layout.blocks) + [newest]
    rng = random.Random(20240611)
    outcomes = {"open refused": 0, "read refused": 0, "check only": 0, "old slot": 0}
    for it in range(25):
        patch_meta(path, 0, pristine)
        victims = rng.sample(targets, rng.randint(1, 3))
        for v in victims:
            for off in rng.sample(range(META), rng.randint(1, 4)):  # distinct: no flip undone
                flip(path, v * META + off)
        try:
            pool = Pool.open(path, commit_interval=0)
        except CorruptMetadataError as e:
            assert "corrupt" in str(e) or "superblock" in str(e), str(e)
            outcomes["open refused"] += 1
            continue
        try:
            if newest in victims:
                # the older slot's commit is what opened: a consistent state
                assert pool.stats().transaction_id == layout.txn - 1
                outcomes["old slot"] += 1
                continue
            failed = 0
            for name in ("a", "b", "s"):
                failed += assert_reads_right_or_raise(pool, name, step=64 * BS)
            report = pool.check()
            assert not report.ok, f"flips in blocks {victims} went unnoticed"
            assert any(f"metadata block {v} " in e for v in victims for e in report.errors), \
                report.errors
            outcomes["read refused" if failed else "check only"] += 1
        finally:
            pool.close()
    assert outcomes["open refused"] and outcomes["read refused"]


# ---------------------------------------------------------------- truncated files

@pytest.mark.parametrize("size", ["0", "4096", "8192", "half", "all but a block", "all but a byte"])
def test_truncated_metadata(damaged, size):
    path, _, layout = damaged
    full = os.path.getsize(path / "metadata")
    n = {"0": 0, "4096": 4096, "8192": 8192, "half": full // 2,
         "all but a block": full - META, "all but a byte": full - 1}[size]
    os.truncate(path / "metadata", n)
    for ro in (False, True, False):
        with pytest.raises(CorruptMetadataError) as exc:
            Pool.open(path, read_only=ro)
        msg = str(exc.value)
        assert "metadata file is truncated" in msg and f"{n} bytes" in msg, msg
        if n >= 2 * META:
            assert str(full) in msg, msg  # what the superblock says it should be
    assert os.path.getsize(path / "metadata") == n  # open never "repairs" it


@pytest.mark.parametrize("size", ["0", "half", "all but a block", "all but a byte"])
def test_truncated_data(damaged, size):
    path, _, _ = damaged
    full = os.path.getsize(path / "data")
    assert full == DATA_BLOCKS * BS
    n = {"0": 0, "half": full // 2, "all but a block": full - BS, "all but a byte": full - 1}[size]
    os.truncate(path / "data", n)
    for ro in (False, True):
        with pytest.raises(CorruptMetadataError) as exc:
            Pool.open(path, read_only=ro)
        msg = str(exc.value)
        assert "data file" in msg and "truncated" in msg and f"{n} bytes" in msg, msg
        assert str(full) in msg, msg
    assert os.path.getsize(path / "data") == n


def test_data_file_longer_than_recorded_is_fine(damaged):
    path, _, _ = damaged
    os.truncate(path / "data", (DATA_BLOCKS + 100) * BS)
    with Pool.open(path, commit_interval=0) as pool:
        assert pool.stats().data_blocks == DATA_BLOCKS
        assert pool.device("b").pread(B_SIZE, 0) == EXPECTED["b"]
        assert pool.check().ok


@pytest.mark.parametrize("missing", ["metadata", "data"])
def test_missing_pool_file(damaged, missing):
    path, _, _ = damaged
    os.unlink(path / missing)
    with pytest.raises(PoolNotFoundError) as exc:
        Pool.open(path)
    assert exc.value.errno == errno.ENOENT
    assert missing in str(exc.value)
