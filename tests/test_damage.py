"""The damage tool: each kind of damage is reported precisely by check, and
repair recovers what can be recovered (and says what was lost)."""
import shutil
import subprocess
import threading

import pytest

from cowblock import CorruptMetadataError, InvalidArgumentError, Pool, format
from cowblock.damage import MetadataFile, damage
from helpers import pattern

BS = 4096


@pytest.fixture
def pool_dir(tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, 1024 * BS, BS, commit_interval=0) as pool:
        a = pool.create_thin("a", 64 * BS)
        a.pwrite(pattern(1, 20 * BS), 0)
        b = pool.create_thin("b", 64 * BS)
        b.pwrite(pattern(2, 10 * BS), 0)
    return path


def contents(path):
    with Pool.open(path, read_only=True) as pool:
        return {d.name: pool.device(d.name).pread(d.size, 0) for d in pool.list()}


@pytest.mark.parametrize("kind,found,after", [
    ("refcount", "reference count 2, but 1 references found", "clean"),
    ("map-free", "reference count 0, but 1 references found", "clean"),
    ("double-map", "reference count 1, but 2 references found", "clean"),
    ("mapped-count", "mapped-block count says 21, its tree holds 20", "clean"),
    ("unsorted", "keys not sorted", "dropped device"),
    ("flip:map-leaf", "checksum", "dropped device"),
])
def test_check_reports_and_repair_recovers(pool_dir, kind, found, after):
    before = contents(pool_dir)
    damage(pool_dir, kind)
    with Pool.open(pool_dir, commit_interval=0) as pool:
        report = pool.check()
        assert not report.ok
        assert any(found in line for line in report.errors + report.leaks), str(report)
        fixed = pool.check(repair=True)
        assert fixed.ok, str(fixed)
        text = "\n".join(fixed.repaired)
        assert "repaired:" in text
        if after == "dropped device":
            assert "dropped device" in text and "data is lost" in text
            assert len(pool.list()) == 1          # the other device survives intact
            survivor = pool.list()[0].name
            assert pool.device(survivor).pread(64 * BS, 0) == before[survivor]
        else:
            names = {d.name for d in pool.list()}
            assert names == {"a", "b"}
            if kind in ("refcount", "mapped-count"):   # nothing else was wrong: data intact
                for n in names:
                    assert pool.device(n).pread(64 * BS, 0) == before[n]
    with Pool.open(pool_dir) as pool:
        assert pool.check().ok


@pytest.mark.parametrize("kind,words", [
    ("truncate", "truncated"), ("block-size", "power of two"),
])
def test_damage_found_at_open(pool_dir, kind, words):
    damage(pool_dir, kind)
    with pytest.raises(CorruptMetadataError) as exc:
        Pool.open(pool_dir).close()
    assert words in str(exc.value)


def test_flip_of_space_map_is_refused_by_repair(pool_dir):
    damage(pool_dir, "flip:sm-refs")
    with Pool.open(pool_dir, commit_interval=0) as pool:
        assert not pool.check().ok
        with pytest.raises(CorruptMetadataError) as exc:
            pool.check(repair=True)
        assert "cannot repair" in str(exc.value)


@pytest.mark.parametrize("kind", ["stale-superblock", "flip:superblock"])
def test_newest_superblock_damaged_opens_the_previous_commit(pool_dir, kind):
    with Pool.open(pool_dir) as pool:
        txn = pool.stats().transaction_id
    damage(pool_dir, kind)
    with Pool.open(pool_dir) as pool:
        assert pool.stats().transaction_id == txn - 1
        assert pool.check().ok


def test_cli_damage(pool_dir):
    cowblock = shutil.which("cowblock")
    if not cowblock:
        pytest.skip("the cowblock command is not installed")
    r = subprocess.run([cowblock, "--pool", str(pool_dir), "pool", "damage", "refcount"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "damaged:" in r.stdout
    assert subprocess.run([cowblock, "--pool", str(pool_dir), "pool", "check"]).returncode == 9
    assert subprocess.run([cowblock, "--pool", str(pool_dir), "pool", "check", "--repair"],
                          capture_output=True).returncode == 0


def test_walks_over_a_leaf_whose_keys_go_back_end_with_an_error(pool_dir):
    """Found by the metadata fuzzer: a mapping leaf whose last key is below
    the ones before it sent every walk of the tree round forever.  Now each
    one stops with an error naming the block."""
    m = MetadataFile(str(pool_dir))
    leaf = m.commit.map_leaves[0]
    last = format.NODE_HEADER.unpack(m.block(leaf)).nr_entries - 1
    m.rewrite(leaf, lambda b: format.write_uint(b, format.node_key_offset(last),
                                                format.NODE_KEY_SIZE, 0))
    m.save()
    with Pool.open(pool_dir, read_only=True) as pool:
        walks = {
            "read": lambda: pool.device("a").pread(64 * BS, 0),
            "usage": lambda: pool.usage("a"),
            "mappings": lambda: pool.mappings("a"),
            "diff": lambda: pool.diff("a", "b"),
        }
        done = {}

        def run_all():
            for name, walk in walks.items():
                try:
                    walk()
                    done[name] = "no error"
                except CorruptMetadataError as e:
                    done[name] = str(e)

        t = threading.Thread(target=run_all, daemon=True)
        t.start()
        t.join(30)
        assert not t.is_alive(), f"a walk went round forever after {sorted(done)}"
        assert all("out of order" in why for name, why in done.items() if name != "diff"), done
        assert not pool.check().ok


@pytest.mark.parametrize("kind", ["refcount", "mapped-count", "flip:map-leaf", "block-size"])
def test_damage_writes_only_the_blocks_it_changes(pool_dir, kind):
    """The metadata file is sparse (64 MiB, a few blocks written): damaging
    one block writes that block, not the whole file."""
    meta = pool_dir / "metadata"
    before, allocated = meta.read_bytes(), meta.stat().st_blocks
    damage(pool_dir, kind)
    after = meta.read_bytes()
    block = format.META_BLOCK_SIZE
    changed = [n for n in range(len(before) // block)
               if before[n * block:(n + 1) * block] != after[n * block:(n + 1) * block]]
    assert len(changed) == 1, changed
    assert meta.stat().st_blocks <= allocated + block // 512


# ---- the records store ----

@pytest.fixture
def records_pool_dir(tmp_path):
    """Devices, and 60 records in several levels of nodes (capacity 4),
    every tenth one in value blocks."""
    path = tmp_path / "r"
    with Pool.create(path, 1024 * BS, BS, commit_interval=0, _node_capacity=4) as pool:
        pool.create_thin("a", 64 * BS).pwrite(pattern(1, 20 * BS), 0)
        with pool.atomic():
            for i in range(60):
                pool.put_record(f"ns/{i:02d}/snap {i}", pattern(i, 9000 if i % 10 == 0 else 30))
    return path


def records_of(path):
    with Pool.open(path, read_only=True) as pool:
        return {r.key: r.value for r in pool.records()}


@pytest.mark.parametrize("kind,found,kept", [
    ("record-count", "the superblock says 61 records, its tree holds 60", "all"),
    ("record-unsorted", "keys out of order", "some"),
    ("flip:rec-leaf", "checksum", "some"),
    ("flip:rec-internal", "checksum", "some"),
    ("flip:rec-value", "checksum", "all but one"),
])
def test_records_damage_is_found_and_repair_keeps_or_rebuilds_the_store(records_pool_dir, kind,
                                                                        found, kept):
    before, data = records_of(records_pool_dir), contents(records_pool_dir)
    damage(records_pool_dir, kind)
    with Pool.open(records_pool_dir, commit_interval=0) as pool:
        report = pool.check()
        assert not report.ok and any(found in line for line in report.errors), str(report)
        assert all("records store" in line for line in report.errors), str(report)
        fixed = pool.check(repair=True)
        assert fixed.ok, str(fixed)
        text = "\n".join(fixed.repaired)
        assert "records store" in text
        after = {r.key: r.value for r in pool.records()}
        assert pool.record_count() == len(after)
    assert all(before[k] == v for k, v in after.items())        # what is kept is intact
    if kept == "all":
        assert after == before and "count set from 61 to 60" in text
    elif kept == "all but one":
        lost = set(before) - set(after)
        assert len(lost) == 1 and f'record "{lost.pop().decode()}" dropped' in text
    else:
        assert 0 < len(after) < len(before) and "unreadable nodes" in text
    assert contents(records_pool_dir) == data                  # the devices are untouched
    with Pool.open(records_pool_dir) as pool:
        assert pool.check().ok


def test_records_damage_kinds_need_records(pool_dir):
    with pytest.raises(InvalidArgumentError, match="no records leaf"):
        damage(pool_dir, "record-unsorted")
    with pytest.raises(InvalidArgumentError, match="no rec-leaf block"):
        damage(pool_dir, "flip:rec-leaf")
