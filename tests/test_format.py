"""The on-disk format has one source: C (csrc/format.h, exported by
csrc/format.c).  These tests tie the other views to it: cowblock.format
(Python's pack and unpack, built on C's tables) must read and write what the
C core reads and writes, and docs/FORMAT.md's tables must give C's offsetof
and sizeof for every field."""
import json
import os
import re
import uuid

import pytest

from cowblock import Pool, format
from cowblock.format import (CATALOG_BLOCK, DEV_DETAIL, META_BLOCK_SIZE as META, RECORDS,
                             SUPERBLOCK, Commit, block_ok, crc32c, seal)

BS = 4096
EMBEDS_HEADER = ("node_header", "catalog_block", "sm_page", "rec_node", "rec_value_block")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LABELS = {f"label{i}": "v" * 40 for i in range(10)}   # overflows into a catalog block


def test_crc32c_is_castagnoli_and_continues():
    assert crc32c(b"123456789") == 0xE3069283          # the standard check value of CRC-32C
    assert crc32c(b"6789", crc32c(b"12345")) == 0xE3069283
    assert crc32c(b"") == 0


def test_every_record_is_its_fields_in_order_without_gaps():
    assert set(RECORDS) == {"block_header", "superblock", "node_header", "dev_detail",
                            "catalog_block", "sm_page", "rec_node", "rec_leaf_entry",
                            "rec_internal_entry", "rec_value_block"}
    for record in RECORDS.values():
        at = 0
        for f in record.fields:
            assert f.offset == at, (record.name, f.name)
            assert f.size % f.item_size == 0, (record.name, f.name)
            at += f.size
        assert at == record.size, record.name
    for name in ("superblock", "catalog_block", "sm_page", "rec_node", "rec_value_block"):
        assert RECORDS[name].size == META
    header = [(f.name, f.offset, f.size) for f in RECORDS["block_header"].fields]
    for name in EMBEDS_HEADER + ("superblock",):
        assert [(f.name, f.offset, f.size) for f in RECORDS[name].fields[:3]] == header


@pytest.fixture
def pool_path(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 512 * BS, BS, metadata_size=1 << 20, commit_interval=0,
                     _node_capacity=8) as pool:
        a = pool.create_thin("a", 64 * BS)
        a.pwrite(b"x" * (40 * BS), 0)
        pool.snapshot("a", "snap", read_only=True)
        a.pwrite(b"y" * BS, 3 * BS)
        pool.create_thin("b", 16 * BS, labels=LABELS).pwrite(b"z", 0)
        with pool.atomic():
            for i in range(40):   # several levels of records nodes, inline and block values
                pool.put_record(f"images/{i:02d} web", RECORD_VALUE(i))
        pool.commit()
    return path


def RECORD_VALUE(i):
    return bytes([i]) * (i * 300)


def read_meta(path):
    with open(os.path.join(path, "metadata"), "rb") as f:
        return f.read()


def test_python_reads_what_c_wrote(pool_path):
    commit = Commit(read_meta(pool_path))
    with Pool.open(pool_path, read_only=True) as pool:
        stats = pool.stats()
        sb = commit.sb
        assert (sb.magic, sb.version, sb.data_block_size) == (format.MAGIC, format.FORMAT_VERSION,
                                                              stats.block_size)
        assert sb.transaction_id == stats.transaction_id
        assert (sb.nr_data_blocks, sb.data_used) == (stats.data_blocks, stats.data_used)
        assert sb.nr_meta_blocks * META == stats.metadata_capacity_bytes
        assert sb.meta_used * META == stats.metadata_used_bytes
        assert (sb.snap_time, sb.node_capacity) == (stats.time, stats.node_capacity)
        assert str(uuid.UUID(bytes=sb.pool_uuid)) == stats.uuid
        assert sb.config[:sb.config_len] in (b"", json.dumps(pool.config, separators=(",", ":"),
                                                             sort_keys=True).encode())
        infos = {i.id: i for i in pool.list()}
        assert set(commit.devices) == set(infos)
        for did, entry in commit.devices.items():
            d, info = entry.detail, infos[did]
            assert (d.size, d.mapped_blocks) == (info.size, info.mapped_blocks)
            assert (d.transaction_id, d.creation_time, d.snap_time) == (
                info.transaction_id, info.creation_time, info.snap_time)
            assert bool(d.flags & format.DEV_READ_ONLY) == info.read_only
            assert str(uuid.UUID(bytes=d.uuid)) == info.uuid
            assert abs(d.created_ns / 1e9 - info.created.timestamp()) < 1e-3
            assert (infos[d.origin_id].name if d.origin_id else None) == info.origin
            if d.catalog_len <= format.CATALOG_INLINE:
                catalog = d.catalog[:d.catalog_len]
                assert not d.catalog_block
            else:
                assert not any(d.catalog)
                block = CATALOG_BLOCK.unpack(commit.block(d.catalog_block))
                assert block.len == d.catalog_len
                catalog = block.bytes[:block.len]
            assert json.loads(catalog) == {"labels": info.labels, "name": info.name}
        assert infos[max(infos)].labels == LABELS    # one catalog overflowed to its block
        # the space maps count what the superblock says
        for space, used, nr in (("data", sb.data_used, sb.nr_data_blocks),
                                ("meta", sb.meta_used, sb.nr_meta_blocks)):
            assert sum(1 for b in range(nr) if commit.refcount(space, b)) == used
        mapped = {v for triples in pool.mappings().values() for _, v, _ in triples}
        assert {b for b in range(sb.nr_data_blocks) if commit.refcount("data", b)} == mapped
        # the records store, read by Python's view of its nodes and value blocks
        assert list(commit.records()) == [(r.key, r.value) for r in pool.records()]
        assert sb.records_count == pool.record_count() == 40
        assert sb.ro_compat & format.RO_COMPAT_RECORDS
        assert commit.of_type(format.T_REC_VALUE) and len(commit.record_leaves) > 1


def test_checksums_and_records_round_trip_in_every_block(pool_path):
    meta = read_meta(pool_path)
    commit = Commit(meta)
    assert commit.blocks
    for b, used in [(commit.slot, None)] + list(commit.blocks.items()):
        block = commit.block(b)
        assert block_ok(block, b), (b, used)
        assert bytes(seal(bytearray(block))) == block            # Python's checksum is C's
        for record in RECORDS.values():
            assert record.pack(record.unpack(block)) == block[:record.size]
    for entry in commit.devices.values():
        assert DEV_DETAIL.unpack(DEV_DETAIL.pack(entry.detail)) == entry.detail


def test_c_reads_what_python_wrote(pool_path):
    """A superblock changed by Python's pack and sealed by Python's checksum
    is what the C core opens."""
    commit = Commit(read_meta(pool_path))
    config = json.dumps({"written-by": "python"}).encode()
    block = bytearray(commit.block(commit.slot))
    SUPERBLOCK.update(block, config_len=len(config),
                      config=config.ljust(SUPERBLOCK.field("config").size, b"\0"))
    with open(os.path.join(pool_path, "metadata"), "r+b") as f:
        f.seek(commit.slot * META)
        f.write(seal(block))
    with Pool.open(pool_path, read_only=True) as pool:
        assert pool.config == {"written-by": "python"}
        assert pool.stats().transaction_id == commit.txn     # the slot Python wrote is the one read


# ---- docs/FORMAT.md against C ----

SECTIONS = {"## 2.": "block_header", "## 3.": "superblock", "## 4.": "node_header",
            "## 5.": "dev_detail", "### Overflow catalog block": "catalog_block",
            "## 6.": "sm_page", "### Records node": "rec_node", "### Leaf entry": "rec_leaf_entry",
            "### Internal entry": "rec_internal_entry", "### Value block": "rec_value_block"}


def documented_tables():
    """record -> [(field, offset, size)] from the first table of each section."""
    tables, record, seen = {}, None, set()
    with open(os.path.join(ROOT, "docs", "FORMAT.md")) as f:
        for line in f:
            if line.startswith("#"):
                record = next((r for head, r in SECTIONS.items() if line.startswith(head)), None)
                continue
            if record is None or not line.startswith("|"):
                if record in tables:
                    seen.add(record)
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if record in seen or not cells[0].isdigit() or not cells[1].isdigit():
                continue   # the header, or keys and values sized by the node
            name = cells[2].strip("`").split("[")[0]
            tables.setdefault(record, []).append((name, int(cells[0]), int(cells[1])))
    return tables


def c_fields(record):
    """(field, offset, size), the block header as one field h where a record embeds it."""
    fields = [(f.name, f.offset, f.size) for f in RECORDS[record].fields]
    if record in EMBEDS_HEADER:
        fields = [("h", 0, RECORDS["block_header"].size)] + fields[3:]
    return fields


def test_format_md_gives_c_offsets_and_sizes():
    tables = documented_tables()
    assert set(tables) == set(SECTIONS.values())
    for record, rows in tables.items():
        assert rows == c_fields(record), record


def test_format_md_gives_c_constants():
    with open(os.path.join(ROOT, "docs", "FORMAT.md")) as f:
        text = f.read()
    said = re.findall(r"`(CB_[A-Z_0-9]+)`(?: is E = [^*]*)? = \*{0,2}([\d,]+)\*{0,2}(?=[\s.;:)]|$)",
                      text)
    said += [(n, str(int(v, 16))) for n, v in re.findall(r"\| `(CB_BT_\w+)`\s*\| `(0x[0-9a-f]+)`",
                                                         text)]
    assert len({n for n, _ in said}) >= 15, said
    for name, value in said:
        value = value.replace(",", "")
        base = 8 if len(value) > 1 and value.startswith("0") else 10   # modes: 0700
        assert format.CONSTANTS[name] == int(value, base), name
