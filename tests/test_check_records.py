"""pool.check() returns records: for each problem its kind, the block or
device it concerns, and what was expected and found, as the C checker made
them (no text is parsed); through the daemon's control socket too."""
import json
import shutil
import signal
import subprocess
import time

import pytest

import cowblock
from cowblock import CheckRecord, Pool, format
from cowblock.damage import MetadataFile, damage
from helpers import pattern

BS = 4096
COWBLOCK = shutil.which("cowblock")


@pytest.fixture
def pool_dir(tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, 1024 * BS, BS, commit_interval=0) as pool:
        pool.create_thin("a", 64 * BS).pwrite(pattern(1, 20 * BS), 0)
        pool.create_thin("b", 64 * BS).pwrite(pattern(2, 10 * BS), 0)
    return path


def first_leaf_target(path):
    commit = MetadataFile(str(path)).commit
    _, _, values = format.node(commit.block(commit.map_leaves[0]))
    return commit, format.block_number(values[0])


def test_a_leak_names_the_data_block_and_both_counts(pool_dir):
    _, target = first_leaf_target(pool_dir)
    damage(pool_dir, "refcount")
    with Pool.open(pool_dir, read_only=True) as pool:
        report = pool.check()
    assert not report.ok and report.leak_count == 1 and report.error_count == 0
    [leak] = report.records
    assert leak == CheckRecord(kind="leak", message=leak.message, block=target, space="data",
                               expected=1, found=2)
    assert report.leaks == [f"leak: {leak.message}"] and report.errors == []
    assert f"data block {target}: reference count 2, but 1 references found" in leak.message


def test_a_wrong_mapped_count_names_the_device(pool_dir):
    damage(pool_dir, "mapped-count")
    with Pool.open(pool_dir, read_only=True) as pool:
        ids = {d.name: d.id for d in pool.list()}
        [rec] = pool.check().records
    assert rec.kind == "error" and rec.device == ids["a"] and rec.block is None
    assert (rec.expected, rec.found) == (20, 21)


def test_a_bad_checksum_names_the_block_and_both_checksums(pool_dir):
    commit = MetadataFile(str(pool_dir)).commit
    leaf = commit.map_leaves[0]
    damage(pool_dir, "flip:map-leaf")
    with open(pool_dir / "metadata", "rb") as f:
        f.seek(leaf * format.META_BLOCK_SIZE)
        block = f.read(format.META_BLOCK_SIZE)
    with Pool.open(pool_dir, read_only=True) as pool:
        records = pool.check().records
    bad = [r for r in records if r.block == leaf and r.space == "metadata"]
    assert bad and bad[0].kind == "error" and bad[0].device == commit.blocks[leaf].device
    assert bad[0].expected == format.block_checksum(block)
    assert bad[0].found == format.BLOCK_HEADER.unpack(block).csum


def test_repair_records_what_it_found_and_what_it_did(pool_dir):
    _, target = first_leaf_target(pool_dir)
    damage(pool_dir, "refcount")
    with Pool.open(pool_dir, commit_interval=0) as pool:
        report = pool.check(repair=True)
    assert report.ok and report.records == []
    found, *done = report.repair_records
    assert found.before_repair and found.kind == "leak" and found.block == target
    assert [r.kind for r in done] == ["repaired"] and not done[0].before_repair
    assert report.repaired == [str(found), str(done[0])]
    assert report.repaired[-1].startswith("repaired: 1 reference counts set from the trees")


def test_records_cross_the_control_socket(pool_dir, tmp_path):
    if COWBLOCK is None:
        pytest.skip("the cowblock command is not installed")
    _, target = first_leaf_target(pool_dir)
    damage(pool_dir, "refcount")
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen([COWBLOCK, "--pool", str(pool_dir), "serve", "--socket", str(sock)],
                            stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if (pool_dir / "control.sock").exists():
                break
            time.sleep(0.05)
        with cowblock.connect(pool_dir) as proxy:
            assert isinstance(proxy, cowblock.PoolProxy)
            [leak] = proxy.check().records
        assert isinstance(leak, CheckRecord) and (leak.kind, leak.block) == ("leak", target)
        r = subprocess.run([COWBLOCK, "--pool", str(pool_dir), "--json", "pool", "check"],
                           capture_output=True, text=True)
        assert r.returncode == 9
        out = json.loads(r.stdout)
        assert out["records"] == [leak._asdict()] and out["leaks"] == [str(leak)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
