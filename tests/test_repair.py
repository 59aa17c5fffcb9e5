"""pool check --repair: reference counts set back from the trees."""
import shutil
import subprocess

import pytest

from cowblock import CorruptMetadataError, Pool
from cowblock.format import NODE_KEY_SIZE, SM_PAGE, T_MAP_LEAF, node_key_offset, write_uint
from helpers import pattern
from test_corruption import Layout, read_meta, rewrite_block

BS = 4096


def make(path):
    with Pool.create(path, 512 * BS, BS, commit_interval=0) as pool:
        a = pool.create_thin("a", 64 * BS)
        a.pwrite(pattern(1, 20 * BS), 0)
        pool.snapshot("a", "s")
        a.pwrite(pattern(2, 3 * BS), 4 * BS)
    return Layout(read_meta(path))


def damage_counts(path):
    layout = make(path)
    page, _ = layout.count_page("data", 0)   # data blocks 0..1015 are counted in one page
    size = SM_PAGE.field("entries").item_size

    def change(blk):
        def set_count(b, count):
            write_uint(blk, SM_PAGE.offset("entries", b), size, count)
        set_count(0, layout.refcount("data", 0) + 1)      # counted once too often: a leak
        set_count(300, layout.refcount("data", 300) + 1)  # a free block counted: a leak
        set_count(5, 0)                                    # a mapped block at 0: an error
        nonzero = sum(1 for c in SM_PAGE.unpack(blk).entries if c)
        SM_PAGE.update(blk, nr_nonzero=nonzero)  # keep the page's own non-zero count true
    rewrite_block(path, page, change)


def test_repair_fixes_reference_counts(tmp_path):
    path = tmp_path / "p"
    damage_counts(path)
    with Pool.open(path, commit_interval=0) as pool:
        before = pool.check()
        assert not before.ok and before.leak_count >= 2 and before.error_count >= 1
        expect = {n: pool.device(n).pread(64 * BS, 0) for n in ("a", "s")}
        after = pool.check(repair=True)
        assert after.ok, str(after)
        assert after.repaired[-1].startswith("repaired: 3 reference counts")
        assert any("data block 5" in line for line in after.repaired)
        for n, data in expect.items():
            assert pool.device(n).pread(64 * BS, 0) == data
        # the block that was counted 0 is not handed out again
        pool.device("a").pwrite(pattern(9, 30 * BS), 30 * BS)
        assert pool.device("s").pread(64 * BS, 0) == expect["s"]
        assert pool.check().ok
    with Pool.open(path) as pool:
        assert pool.check().ok


def test_repair_drops_devices_whose_tree_is_damaged(tmp_path):
    path = tmp_path / "p"
    layout = make(path)
    leaf = layout.of_type(T_MAP_LEAF)[0]
    rewrite_block(path, leaf, lambda blk: write_uint(blk, node_key_offset(0), NODE_KEY_SIZE,
                                                     0xFFFFFFF0))  # a key past the device's end
    with Pool.open(path, commit_interval=0) as pool:
        report = pool.check(repair=True)
        assert report.ok, str(report)
        assert any("dropped device" in line and "data is lost" in line for line in report.repaired)
        assert len(pool.list()) < 2
    with Pool.open(path) as pool:
        assert pool.check().ok


def test_repair_refuses_damaged_space_maps(tmp_path):
    path = tmp_path / "p"
    layout = make(path)
    page = layout.described("data space map page")[0]
    rewrite_block(path, page, lambda blk: SM_PAGE.update(blk, nr_nonzero=999))
    with Pool.open(path, commit_interval=0) as pool:
        with pytest.raises(CorruptMetadataError) as exc:
            pool.check(repair=True)
        assert "cannot repair" in str(exc.value)


def test_cli_repair(tmp_path):
    cowblock = shutil.which("cowblock")
    if not cowblock:
        pytest.skip("the cowblock command is not installed")
    path = tmp_path / "p"
    damage_counts(path)
    r = subprocess.run([cowblock, "--pool", str(path), "pool", "check"], capture_output=True)
    assert r.returncode == 9
    r = subprocess.run([cowblock, "--pool", str(path), "pool", "check", "--repair"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "repaired" in r.stdout
    r = subprocess.run([cowblock, "--pool", str(path), "pool", "check"], capture_output=True)
    assert r.returncode == 0
