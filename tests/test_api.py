"""Unit tests of every public Pool and Device call and their error paths.

Most tests use the ``pool`` fixture (conftest.py): a fresh pool of 256 data
blocks at 4 KiB, 64 KiB and 1 MiB block sizes, checked clean at teardown.
"""
import datetime
import errno
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import uuid

import numpy as np
import pytest

from cowblock import (CheckReport, CowblockError, Device, DeviceExistsError, DeviceFile,
                      DeviceInfo, DeviceNotFoundError, DiffRange, Extent, InvalidArgumentError,
                      MetadataSpaceError, NoSpaceError, Pool, PoolClosedError, PoolExistsError,
                      PoolNotFoundError, PoolStats, ReadOnlyError, Usage)
from cowblock._native import lib
from helpers import Model, assert_matches, pattern


# ---------------------------------------------------------------- helpers

@pytest.fixture
def reopen(pool):
    """reopen(read_only=False): close the fixture pool (and any pool this
    fixture opened before) and open it again; checked clean at teardown."""
    opened = []

    def _reopen(read_only=False):
        for p in [pool] + opened:
            p.close()
        p = Pool.open(pool.path, read_only=read_only, commit_interval=0)
        opened.append(p)
        return p

    yield _reopen
    for p in opened:
        if p._h is not None:
            if not p.read_only:
                report = p.check()
                assert report.ok, str(report)
            p.close()


def extents_as_tuples(extents):
    return [(e.offset, e.length, e.mapped, e.shared) for e in extents]


def assert_exact_cover(extents, offset, length):
    """Extents are contiguous, ordered, non-empty, cover exactly
    [offset, offset + length) and adjacent ones differ in kind."""
    if length == 0:
        assert extents == []
        return
    assert extents, "no extents for a non-empty range"
    assert extents[0].offset == offset
    pos = offset
    for i, e in enumerate(extents):
        assert e.offset == pos, f"gap or overlap at extent {i}: {extents}"
        assert e.length > 0, extents
        if i:
            prev = extents[i - 1]
            assert (prev.mapped, prev.shared) != (e.mapped, e.shared), \
                f"adjacent extents of one kind not merged: {extents}"
        pos += e.length
    assert pos == offset + length, extents


def fill_pool(pool, name="filler"):
    """Map every free data block of the pool with a device of zeroes."""
    free = pool.stats().data_free
    dev = pool.create_thin(name, free * pool.block_size)
    dev.write_zeroes(0, dev.size, may_unmap=False)
    assert pool.stats().data_free == 0
    return dev


# ---------------------------------------------------------------- Pool.create

@pytest.mark.parametrize("bad", [0, 1000, 2048, 3 * 4096, 4096 + 1, 2 ** 31, 2 ** 32, -4096])
def test_create_rejects_bad_block_size(tmp_path, bad):
    path = tmp_path / "p"
    with pytest.raises(InvalidArgumentError) as exc:
        Pool.create(path, 1 << 22, bad)
    assert str(bad) in str(exc.value)
    assert "block size" in str(exc.value)
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, CowblockError)
    assert not (path / "metadata").exists()
    assert not (path / "data").exists()


@pytest.mark.parametrize("bad", [4096.0, "4096", None, True])
def test_create_rejects_non_integer_block_size(tmp_path, bad):
    with pytest.raises(InvalidArgumentError) as exc:
        Pool.create(tmp_path / "p", 1 << 22, bad)
    assert repr(bad) in str(exc.value)


@pytest.mark.parametrize("block_size,data_size", [
    (4096, 4096 * 10 + 1), (4096, 4096 * 10 + 2048), (65536, 65536 * 3 + 4096),
    (65536, 4096), (4096, 0), (1 << 20, (1 << 20) - 4096)])
def test_create_rejects_data_size_not_a_multiple_of_the_block_size(tmp_path, block_size, data_size):
    with pytest.raises(InvalidArgumentError) as exc:
        Pool.create(tmp_path / "p", data_size, block_size)
    assert str(data_size) in str(exc.value)
    assert str(block_size) in str(exc.value)
    assert not (tmp_path / "p" / "metadata").exists()


@pytest.mark.parametrize("bad", [-1, 1.5, "big"])
def test_create_rejects_bad_data_size_type(tmp_path, bad):
    with pytest.raises(InvalidArgumentError):
        Pool.create(tmp_path / "p", bad, 4096)


def test_create_over_an_existing_pool_is_refused(tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, 64 * 4096, 4096, commit_interval=0) as p:
        p.create_thin("keep", 4096).pwrite(b"precious", 0)
        with pytest.raises(PoolExistsError) as exc:  # while it is open
            Pool.create(path, 64 * 4096, 4096)
        assert exc.value.errno == errno.EEXIST
        assert isinstance(exc.value, FileExistsError)
        assert str(path) in str(exc.value)
    with pytest.raises(PoolExistsError):  # and when it is closed
        Pool.create(path, 128 * 65536, 65536)
    with Pool.open(path, commit_interval=0) as p:  # untouched
        assert p.stats().block_size == 4096
        assert p.device("keep").pread(8, 0) == b"precious"


def test_create_refuses_a_directory_holding_a_data_file(tmp_path):
    path = tmp_path / "p"
    path.mkdir()
    (path / "data").write_bytes(b"someone's data")
    with pytest.raises(PoolExistsError):
        Pool.create(path, 64 * 4096, 4096)
    assert (path / "data").read_bytes() == b"someone's data"
    assert not (path / "metadata").exists()


def test_create_with_bad_metadata_size_leaves_nothing_behind(tmp_path):
    path = tmp_path / "p"
    for bad in (4097, 15 * 4096):
        with pytest.raises(InvalidArgumentError) as exc:
            Pool.create(path, 64 * 4096, 4096, metadata_size=bad)
        assert str(bad) in str(exc.value)
        assert not (path / "metadata").exists() and not (path / "data").exists()
    with Pool.create(path, 64 * 4096, 4096, metadata_size=64 * 4096, commit_interval=0) as p:
        assert p.stats().metadata_capacity_bytes == 64 * 4096
        assert os.path.getsize(path / "metadata") == 64 * 4096
        assert os.path.getsize(path / "data") == 64 * 4096


def test_create_makes_files_of_the_requested_sizes(pool, block_size):
    assert os.path.getsize(os.path.join(pool.path, "data")) == 256 * block_size
    meta_size = os.path.getsize(os.path.join(pool.path, "metadata"))
    assert meta_size == pool.stats().metadata_capacity_bytes
    assert pool.block_size == block_size
    assert not pool.read_only


# ---------------------------------------------------------------- Pool.open, close, context manager

def test_open_missing_pool(tmp_path):
    for path in (tmp_path / "nothing", tmp_path):
        with pytest.raises(PoolNotFoundError) as exc:
            Pool.open(path)
        assert exc.value.errno == errno.ENOENT
        assert isinstance(exc.value, FileNotFoundError)
        assert str(path) in str(exc.value)
    with pytest.raises(PoolNotFoundError):
        Pool.open(tmp_path / "nothing", read_only=True)


def test_context_manager_closes_and_commits(tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, 64 * 4096, 4096, commit_interval=0) as p:
        assert isinstance(p, Pool)
        dev = p.create_thin("a", 16 * 4096)
        dev.pwrite(b"committed by close", 5 * 4096 + 3)  # allocating, not committed yet
        txn = p.stats().transaction_id
    assert p._h is None
    with pytest.raises(PoolClosedError):
        p.stats()
    with Pool.open(path, commit_interval=0) as p2:  # the lock was released
        assert p2.stats().transaction_id == txn + 1
        assert p2.device("a").pread(18, 5 * 4096 + 3) == b"committed by close"


def test_context_manager_closes_on_exception(tmp_path):
    path = tmp_path / "p"
    with pytest.raises(RuntimeError):
        with Pool.create(path, 64 * 4096, 4096, commit_interval=0) as p:
            p.create_thin("a", 4096)
            raise RuntimeError("boom")
    assert p._h is None
    with Pool.open(path, commit_interval=0) as p2:
        assert "a" in p2


def test_close_is_idempotent(pool):
    pool.close()
    pool.close()
    assert "closed" in repr(pool)


POOL_CALLS = {
    "create_thin": lambda p: p.create_thin("new", 4096),
    "snapshot": lambda p: p.snapshot("a", "snap"),
    "delete": lambda p: p.delete("a"),
    "rename": lambda p: p.rename("a", "b"),
    "set_labels": lambda p: p.set_labels("a", {"k": "v"}),
    "set_read_only": lambda p: p.set_read_only("a", True),
    "info": lambda p: p.info("a"),
    "list": lambda p: p.list(),
    "usage": lambda p: p.usage("a"),
    "diff": lambda p: list(p.diff("a", "a")),
    "stats": lambda p: p.stats(),
    "commit": lambda p: p.commit(),
    "resize": lambda p: p.resize(512 * p.block_size),
    "resize_metadata": lambda p: p.resize_metadata(8 << 20),
    "check": lambda p: p.check(),
}


@pytest.mark.parametrize("call", sorted(POOL_CALLS))
def test_pool_methods_after_close(pool, call):
    pool.create_thin("a", 4096)
    pool.close()
    with pytest.raises(PoolClosedError) as exc:
        POOL_CALLS[call](pool)
    assert pool.path in str(exc.value)
    assert isinstance(exc.value, CowblockError)


DEVICE_CALLS = {
    "pread": lambda d: d.pread(10, 0),
    "readinto": lambda d: d.readinto(bytearray(10), 0),
    "pwrite": lambda d: d.pwrite(b"x", 0),
    "discard": lambda d: d.discard(0, 4096),
    "write_zeroes": lambda d: d.write_zeroes(0, 4096),
    "write_zeroes_no_unmap": lambda d: d.write_zeroes(0, 4096, may_unmap=False),
    "flush": lambda d: d.flush(),
    "block_status": lambda d: d.block_status(),
    "block_status_range": lambda d: d.block_status(0, 4096),
    "resize": lambda d: d.resize(8192),
    "size": lambda d: d.size,
    "read_only": lambda d: d.read_only,
    "info": lambda d: d.info(),
    "open": lambda d: d.open(),
}


@pytest.mark.parametrize("call", sorted(DEVICE_CALLS))
def test_device_methods_after_close(pool, call):
    dev = pool.create_thin("a", 4 * 4096)
    dev.pwrite(b"data", 0)
    pool.close()
    with pytest.raises(PoolClosedError):
        DEVICE_CALLS[call](dev)
    # a device looked up by name after the close is no more usable
    with pytest.raises(PoolClosedError):
        pool.device("a").pread(4, 0)


def test_device_file_after_pool_close(pool):
    dev = pool.create_thin("a", 4 * 4096)
    f = dev.open()
    pool.close()
    with pytest.raises(PoolClosedError):
        f.read(10)
    with pytest.raises(PoolClosedError):
        f.write(b"x")
    f.close()  # closing the file itself stays possible


# ---------------------------------------------------------------- create_thin

@pytest.mark.parametrize("bad", [0, 1000, 4097, 4096 + 2048, -4096, 4096.0, "4096", None, True])
def test_create_thin_rejects_bad_size(pool, bad):
    txn = pool.stats().transaction_id
    with pytest.raises(InvalidArgumentError) as exc:
        pool.create_thin("a", bad)
    assert repr(bad) in str(exc.value) or str(bad) in str(exc.value)
    assert "a" not in pool and pool.list() == []
    assert pool.stats().transaction_id == txn


def test_create_thin_rejects_more_than_2_to_the_32_blocks(pool, block_size):
    too_big = (1 << 32) * block_size + 4096
    with pytest.raises(InvalidArgumentError) as exc:
        pool.create_thin("huge", too_big)
    assert str(too_big) in str(exc.value)
    assert "huge" not in pool
    dev = pool.create_thin("max", (1 << 32) * block_size)  # exactly 2^32 blocks is fine
    dev.pwrite(b"last", dev.size - 4)
    dev.pwrite(b"first", 0)
    assert dev.pread(4, dev.size - 4) == b"last"
    assert dev.pread(5, 0) == b"first"
    assert dev.info().mapped_blocks == 2


def test_create_thin_reads_zero_and_uses_no_data(pool, block_size):
    dev = pool.create_thin("a", 100 * block_size + 4096)
    assert isinstance(dev, Device)
    assert dev.size == 100 * block_size + 4096
    assert dev.name == "a" and dev.pool is pool and not dev.read_only
    assert dev.pread(dev.size, 0) == bytes(dev.size)
    assert pool.stats().data_used == 0
    assert dev.info().mapped_blocks == 0
    assert extents_as_tuples(dev.block_status()) == [(0, dev.size, False, False)]
    assert pool.usage("a") == Usage(0, 0, block_size)


def test_create_thin_duplicate_name(pool):
    dev = pool.create_thin("a", 4096)
    dev.pwrite(b"mine", 0)
    for make in (lambda: pool.create_thin("a", 8192), lambda: pool.snapshot("a", "a")):
        with pytest.raises(DeviceExistsError) as exc:
            make()
        assert "'a'" in str(exc.value)
        assert isinstance(exc.value, ValueError)
    assert [d.name for d in pool.list()] == ["a"]
    assert pool.device("a").size == 4096
    assert pool.device("a").pread(4, 0) == b"mine"


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 200, "x" * 129, " sp", "sp ", "a b", "-lead",
                                 ".hidden", "_x", "tab\t", "new\nline", "caf\u00e9", "a\0b",
                                 None, 5, b"bytes"])
def test_invalid_device_names(pool, bad):
    pool.create_thin("ok", 4096)
    checks = [lambda: pool.create_thin(bad, 4096), lambda: pool.snapshot("ok", bad),
              lambda: pool.rename("ok", bad)]
    for call in checks:
        with pytest.raises(InvalidArgumentError) as exc:
            call()
        assert repr(bad) in str(exc.value)
    assert [d.name for d in pool.list()] == ["ok"]


@pytest.mark.parametrize("good", ["x" * 128, "A.b_c+d:e@f-g", "0", "9lives", "vm-disk.0@2024:snap"])
def test_valid_device_names(pool, good):
    dev = pool.create_thin(good, 4096)
    assert dev.name == good and good in pool
    assert pool.info(good).name == good
    snap = pool.snapshot(good, good[:-1] + "Z" if len(good) > 1 else "Z")
    assert snap.info().origin == good


# ---------------------------------------------------------------- snapshot

def test_snapshot_of_unknown_origin(pool):
    pool.create_thin("a", 4096)
    txn = pool.stats().transaction_id
    with pytest.raises(DeviceNotFoundError) as exc:
        pool.snapshot("nope", "s")
    assert isinstance(exc.value, LookupError)
    assert "'nope'" in str(exc.value) and pool.path in str(exc.value)
    assert "s" not in pool and pool.stats().transaction_id == txn
    assert pool.stats().devices == 1


def test_snapshot_is_a_point_in_time_copy(pool, block_size):
    bs = block_size
    a = pool.create_thin("a", 6 * bs)
    data = bytearray(pattern(1, 6 * bs))
    a.pwrite(data, 0)
    used = pool.stats().data_used
    s = pool.snapshot("a", "s")
    assert pool.stats().data_used == used  # O(1): nothing copied
    assert s.size == a.size and not s.read_only
    a.pwrite(b"origin changed", bs - 3)
    s.pwrite(b"snap changed", 3 * bs + 100)
    assert s.pread(6 * bs, 0) == bytes(data[:3 * bs + 100]) + b"snap changed" + \
        bytes(data[3 * bs + 112:])
    data[bs - 3:bs + 11] = b"origin changed"
    assert a.pread(6 * bs, 0) == bytes(data)


def test_snapshot_chain_depth_20(pool, block_size):
    bs = block_size
    size = 6 * bs
    models = {}
    prev = "base"
    dev = pool.create_thin(prev, size)
    dev.pwrite(pattern(0, size), 0)
    models[prev] = bytearray(pattern(0, size))
    for depth in range(1, 21):
        name = f"s{depth}"
        snap = pool.snapshot(prev, name)
        models[name] = bytearray(models[prev])
        assert snap.info().origin == prev
        # an unaligned write spanning a block boundary, different in each
        off = (depth % 5) * bs + bs - 5 - depth
        piece = pattern(100 + depth, 10 + 2 * depth)
        snap.pwrite(piece, off)
        models[name][off:off + len(piece)] = piece
        prev = name
    for name, model in models.items():
        assert pool.device(name).pread(size, 0) == bytes(model), name
    assert len(pool.list()) == 21


def test_read_only_snapshot_refuses_writes(pool, block_size):
    bs = block_size
    a = pool.create_thin("a", 4 * bs)
    a.pwrite(pattern(2, 4 * bs), 0)
    ro = pool.snapshot("a", "ro", read_only=True)
    assert ro.read_only and pool.info("ro").read_only
    used = pool.stats().data_used
    writes = [lambda: ro.pwrite(b"nope", 10),
              lambda: ro.pwrite(pattern(1, 2 * bs), bs // 2),
              lambda: ro.discard(0, 4 * bs),
              lambda: ro.write_zeroes(0, 4 * bs),
              lambda: ro.write_zeroes(0, 4 * bs, may_unmap=False),
              lambda: ro.write_zeroes(5, 10)]
    for w in writes:
        with pytest.raises(ReadOnlyError) as exc:
            w()
        assert exc.value.errno == errno.EROFS
        assert isinstance(exc.value, OSError)
        assert "read-only" in str(exc.value)
    f = ro.open()
    with pytest.raises(ReadOnlyError):
        f.write(b"x")
    assert ro.pread(4 * bs, 0) == pattern(2, 4 * bs)
    assert pool.stats().data_used == used
    assert extents_as_tuples(ro.block_status()) == [(0, 4 * bs, True, True)]
    # the origin stays writable
    a.pwrite(b"fine", 0)
    assert ro.pread(4, 0) == pattern(2, 4)


def test_read_only_device_refuses_resize(pool, block_size):
    bs = block_size
    a = pool.create_thin("a", 4 * bs)
    a.pwrite(pattern(3, 4 * bs), 0)
    ro = pool.snapshot("a", "ro", read_only=True)
    with pytest.raises(ReadOnlyError):
        ro.resize(bs)
    assert ro.size == 4 * bs
    assert ro.pread(4 * bs, 0) == pattern(3, 4 * bs)


# ---------------------------------------------------------------- device lookup, delete

def test_device_lookup_of_unknown_names(pool):
    pool.create_thin("a", 4096)
    for bad in ("nope", "", "A", None, 1, ["a"]):
        with pytest.raises(DeviceNotFoundError) as exc:
            pool.device(bad)
        assert repr(bad) in str(exc.value)
        with pytest.raises(DeviceNotFoundError):
            pool.info(bad)
        with pytest.raises(DeviceNotFoundError):
            pool.usage(bad)
        with pytest.raises(DeviceNotFoundError):
            pool.delete(bad)
        with pytest.raises(DeviceNotFoundError):
            pool.set_labels(bad, {})
        with pytest.raises(DeviceNotFoundError):
            pool.set_read_only(bad)
        with pytest.raises(DeviceNotFoundError):
            pool.rename(bad, "z")
        with pytest.raises(DeviceNotFoundError):
            list(pool.diff("a", bad))
        with pytest.raises(DeviceNotFoundError):
            list(pool.diff(bad, "a"))
    # the message is not quoted like a KeyError
    with pytest.raises(DeviceNotFoundError) as exc:
        pool.device("nope")
    assert str(exc.value).startswith("no device named 'nope'")
    assert "nope" not in pool and "a" in pool
    assert pool.device("a").id == pool.info("a").id


def test_delete_frees_blocks(pool, block_size):
    bs = block_size
    keep = pool.create_thin("keep", 2 * bs)
    keep.pwrite(pattern(9, 2 * bs), 0)
    base = pool.stats()
    dev = pool.create_thin("a", 20 * bs)
    dev.pwrite(pattern(1, 7 * bs + 100), bs // 2)  # blocks 0..7
    assert pool.stats().data_used == base.data_used + 8
    assert pool.stats().devices == base.devices + 1
    pool.delete("a")
    st = pool.stats()
    assert st.data_used == base.data_used
    assert st.data_free == base.data_free
    assert st.devices == base.devices
    assert "a" not in pool and [d.name for d in pool.list()] == ["keep"]
    with pytest.raises(DeviceNotFoundError):
        pool.device("a")
    with pytest.raises(DeviceNotFoundError):
        pool.delete("a")
    with pytest.raises(DeviceNotFoundError):  # the old handle is dead
        dev.pread(10, 0)
    with pytest.raises(DeviceNotFoundError):
        dev.pwrite(b"x", 0)
    with pytest.raises(DeviceNotFoundError):
        dev.name
    assert "deleted" in repr(dev)
    # the name is free again and the new device reads zeroes, not the old data
    again = pool.create_thin("a", 20 * bs)
    assert again.id != dev.id
    assert again.pread(20 * bs, 0) == bytes(20 * bs)
    assert keep.pread(2 * bs, 0) == pattern(9, 2 * bs)


def test_delete_origin_keeps_snapshot_data(pool, block_size):
    bs = block_size
    a = pool.create_thin("a", 8 * bs)
    a.pwrite(pattern(4, 8 * bs), 0)
    s = pool.snapshot("a", "s")
    a.pwrite(pattern(5, 3 * bs), 2 * bs + 7)  # CoW blocks 2..5
    assert pool.stats().data_used == 12
    pool.delete("a")
    assert pool.stats().data_used == 8
    assert s.pread(8 * bs, 0) == pattern(4, 8 * bs)
    assert s.info().origin is None  # the origin is gone
    assert pool.usage("s") == Usage(8, 0, bs)
    assert extents_as_tuples(s.block_status()) == [(0, 8 * bs, True, False)]
    s.pwrite(b"still writable", bs)
    assert s.pread(14, bs) == b"still writable"


def test_delete_snapshot_keeps_origin_data(pool, block_size):
    bs = block_size
    a = pool.create_thin("a", 4 * bs)
    a.pwrite(pattern(6, 4 * bs), 0)
    pool.snapshot("a", "s").pwrite(b"s", 0)
    pool.delete("s")
    assert pool.stats().data_used == 4
    assert a.pread(4 * bs, 0) == pattern(6, 4 * bs)
    assert pool.usage("a") == Usage(4, 0, bs)


# ---------------------------------------------------------------- rename, read-only flag, labels

def test_rename(pool, reopen, block_size):
    a = pool.create_thin("a", 2 * block_size, labels={"role": "root"})
    a.pwrite(b"hello", 100)
    pool.create_thin("other", 4096)
    did = a.id
    pool.rename("a", "b")
    assert "a" not in pool and "b" in pool
    with pytest.raises(DeviceNotFoundError):
        pool.device("a")
    assert pool.device("b").id == did
    assert pool.device("b").pread(5, 100) == b"hello"
    assert a.name == "b"  # the old handle follows the device
    assert pool.info("b").labels == {"role": "root"}
    pool.rename("b", "b")  # to itself: nothing
    with pytest.raises(DeviceExistsError):
        pool.rename("b", "other")
    assert pool.device("other").size == 4096 and pool.device("b").id == did
    with pytest.raises(DeviceNotFoundError):
        pool.rename("a", "c")
    p2 = reopen()
    assert sorted(d.name for d in p2.list()) == ["b", "other"]
    assert p2.device("b").id == did
    assert p2.device("b").pread(5, 100) == b"hello"
    assert p2.info("b").labels == {"role": "root"}


def test_rename_origin_updates_snapshot_origin(pool):
    pool.create_thin("a", 4096)
    pool.snapshot("a", "s")
    pool.rename("a", "renamed")
    assert pool.info("s").origin == "renamed"


def test_set_read_only(pool, reopen, block_size):
    a = pool.create_thin("a", 2 * block_size)
    pool.set_read_only("a", True)
    assert a.read_only and pool.info("a").read_only
    with pytest.raises(ReadOnlyError):
        a.pwrite(b"x", 0)
    pool.set_read_only("a", True)  # twice: still read-only
    assert a.read_only
    pool.set_read_only("a", False)
    assert not a.read_only
    assert a.pwrite(b"now", 0) == 3
    pool.set_read_only("a")  # default: True
    p2 = reopen()
    b = p2.device("a")
    assert b.read_only
    with pytest.raises(ReadOnlyError):
        b.discard(0, b.size)
    p2.set_read_only("a", False)
    b.pwrite(b"again", 3)
    assert b.pread(8, 0) == b"nowagain"


def test_labels(pool, reopen):
    small = {"owner": "ops", "tier": "gold"}
    big = {f"key{i:02d}": "v" * 40 for i in range(30)}  # too big for the inline catalog
    pool.create_thin("a", 4096, labels=small)
    pool.create_thin("b", 4096)
    assert pool.info("a").labels == small
    assert pool.info("b").labels == {}
    pool.set_labels("b", big)
    assert pool.info("b").labels == big
    pool.snapshot("a", "s", labels={"snap": "yes"})
    assert pool.info("s").labels == {"snap": "yes"}
    assert pool.info("a").labels == small
    # the returned dict is a copy
    pool.info("a").labels["owner"] = "mallory"
    assert pool.info("a").labels == small
    for bad in ({"k": 1}, {1: "v"}, {"k": None}, {"k": "v" * 5000}):
        with pytest.raises(InvalidArgumentError):
            pool.set_labels("a", bad)
    assert pool.info("a").labels == small
    p2 = reopen()
    assert p2.info("a").labels == small
    assert p2.info("b").labels == big
    assert p2.info("s").labels == {"snap": "yes"}
    p2.set_labels("b", {"now": "small"})  # from a catalog block back to inline
    p2.set_labels("a", big)               # and the other way
    p3 = reopen()
    assert p3.info("b").labels == {"now": "small"}
    assert p3.info("a").labels == big
    p3.set_labels("a", None)
    assert p3.info("a").labels == {}


# ---------------------------------------------------------------- list, info, usage, stats

def test_list_fields(pool, block_size):
    bs = block_size
    before = datetime.datetime.now(datetime.timezone.utc)
    a = pool.create_thin("a", 10 * bs, labels={"x": "1"})
    txn_a = pool.stats().transaction_id
    a.pwrite(pattern(1, 3 * bs), 0)
    s = pool.snapshot("a", "s", read_only=True)
    txn_s = pool.stats().transaction_id
    after = datetime.datetime.now(datetime.timezone.utc)
    infos = pool.list()
    assert [i.name for i in infos] == ["a", "s"]
    ia, is_ = infos
    assert isinstance(ia, DeviceInfo)
    assert (ia.id, is_.id) == (a.id, s.id) and ia.id < is_.id
    assert isinstance(ia.id, int)
    assert uuid.UUID(ia.uuid) != uuid.UUID(is_.uuid)
    assert str(uuid.UUID(ia.uuid)) == ia.uuid
    assert ia.size == is_.size == 10 * bs
    assert ia.mapped_blocks == is_.mapped_blocks == 3
    assert ia.mapped_bytes == 3 * bs and ia.block_size == bs
    assert (ia.read_only, is_.read_only) == (False, True)
    assert (ia.origin, is_.origin) == (None, "a")
    for i in infos:
        assert i.created.tzinfo is not None
        second = datetime.timedelta(seconds=1)
        assert before - second <= i.created <= after + second
    assert ia.created <= is_.created
    assert (ia.transaction_id, is_.transaction_id) == (txn_a, txn_s)
    assert (ia.labels, is_.labels) == ({"x": "1"}, {})
    assert pool.info("a") == ia == a.info()
    assert pool.list() == infos  # stable


def test_list_empty_and_ordering_after_deletes(pool):
    assert pool.list() == []
    for n in ("z", "y", "x"):
        pool.create_thin(n, 4096)
    pool.delete("y")
    pool.create_thin("w", 4096)
    assert [i.name for i in pool.list()] == ["z", "x", "w"]
    ids = [i.id for i in pool.list()]
    assert ids == sorted(ids)


def test_usage_exclusive_and_shared(pool, block_size):
    bs = block_size
    a = pool.create_thin("a", 12 * bs)
    assert pool.usage("a") == Usage(0, 0, bs)
    a.pwrite(pattern(1, 8 * bs), 0)
    assert pool.usage("a") == Usage(8, 0, bs)
    pool.snapshot("a", "s")
    assert pool.usage("a") == Usage(0, 8, bs)
    assert pool.usage("s") == Usage(0, 8, bs)
    a.pwrite(b"partial", 2 * bs + 100)  # CoW of block 2
    a.pwrite(pattern(2, bs), 5 * bs)     # whole block 5
    assert pool.usage("a") == Usage(2, 6, bs)
    assert pool.usage("s").mapped_blocks == 8
    # Sharing is exact once committed (until then a block whose count dropped
    # in the running transaction may still count as shared: it was shared in
    # the last commit)
    pool.commit()
    assert pool.usage("a") == Usage(2, 6, bs)
    assert pool.usage("s") == Usage(2, 6, bs)
    a.pwrite(b"fresh", 9 * bs)           # an unmapped block
    pool.commit()
    u = pool.usage("a")
    assert u == Usage(3, 6, bs)
    assert (u.mapped_blocks, u.exclusive_bytes, u.shared_bytes) == (9, 3 * bs, 6 * bs)
    assert pool.usage("s") == Usage(2, 6, bs)
    assert pool.stats().data_used == 11
    pool.snapshot("s", "s2")
    assert pool.usage("s") == Usage(0, 8, bs)
    assert pool.usage("a") == Usage(3, 6, bs)


def test_stats_fields(pool, block_size):
    st = pool.stats()
    assert isinstance(st, PoolStats)
    assert st.block_size == block_size
    assert st.data_blocks == 256 and st.data_used == 0 and st.data_free == 256
    assert st.metadata_capacity_bytes >= 4 << 20  # the default: sparse, not small
    assert st.metadata_capacity_bytes == os.path.getsize(os.path.join(pool.path, "metadata"))
    assert 0 < st.metadata_used_bytes < st.metadata_capacity_bytes
    assert st.metadata_used_bytes % 4096 == 0
    # 1/64 of the metadata, at least 64 blocks, is kept for commits
    assert st.metadata_reserve_bytes == max(64, st.metadata_capacity_bytes // 4096 // 64) * 4096
    assert st.transaction_id >= 1
    assert st.devices == 0 and not st.needs_check and not st.read_only
    assert str(uuid.UUID(st.uuid)) == st.uuid
    assert st.node_capacity == 0
    dev = pool.create_thin("a", 10 * block_size)
    dev.pwrite(b"x" * (block_size + 1), 0)
    st2 = pool.stats()
    assert (st2.data_used, st2.data_free, st2.devices) == (2, 254, 1)
    assert st2.metadata_used_bytes > st.metadata_used_bytes
    assert st2.uuid == st.uuid


def test_stats_uuid_is_stable_and_unique(tmp_path, pool, reopen):
    u = pool.stats().uuid
    p2 = reopen()
    assert p2.stats().uuid == u
    with Pool.create(tmp_path / "other", 16 * 4096, 4096, commit_interval=0) as other:
        assert other.stats().uuid != u


def test_transaction_ids(pool, block_size):
    txn = pool.stats().transaction_id
    assert pool.commit() == txn  # clean pool: no new transaction
    assert pool.stats().transaction_id == txn
    dev = pool.create_thin("a", 4 * block_size)  # creating commits
    assert pool.stats().transaction_id == txn + 1
    assert pool.commit() == txn + 1
    dev.pwrite(b"x", 0)  # allocates: metadata changes, not committed yet
    assert pool.stats().transaction_id == txn + 1
    assert pool.commit() == txn + 2
    assert pool.stats().transaction_id == txn + 2
    assert pool.commit() == txn + 2
    pool.snapshot("a", "s")
    assert pool.stats().transaction_id == txn + 3
    pool.set_labels("a", {"k": "v"})
    assert pool.stats().transaction_id == txn + 4
    pool.delete("s")
    assert pool.stats().transaction_id == txn + 5


# ---------------------------------------------------------------- pool resize

def test_pool_resize_grow(pool, reopen, block_size):
    bs = block_size
    dev = pool.create_thin("a", 300 * bs)
    dev.pwrite(pattern(1, bs), 0)
    dev.write_zeroes(bs, 255 * bs, may_unmap=False)  # the pool is full now
    assert pool.stats().data_free == 0
    with pytest.raises(NoSpaceError) as exc:
        dev.pwrite(b"no room", 256 * bs)
    assert exc.value.errno == errno.ENOSPC
    assert "256" in str(exc.value) and "resize" in str(exc.value)
    assert dev.info().mapped_blocks == 256
    pool.resize(300 * bs)
    st = pool.stats()
    assert (st.data_blocks, st.data_used, st.data_free) == (300, 256, 44)
    assert os.path.getsize(os.path.join(pool.path, "data")) == 300 * bs
    dev.pwrite(b"room now", 256 * bs)
    dev.pwrite(pattern(2, 43 * bs), 257 * bs)
    assert pool.stats().data_free == 0
    assert dev.pread(8, 256 * bs) == b"room now"
    assert dev.pread(43 * bs, 257 * bs) == pattern(2, 43 * bs)
    assert dev.pread(bs, 0) == pattern(1, bs)
    pool.resize(300 * bs)  # the same size: nothing
    p2 = reopen()
    assert p2.stats().data_blocks == 300
    assert p2.device("a").pread(8, 256 * bs) == b"room now"


def test_pool_resize_shrink_and_bad_sizes_refused(pool, block_size):
    bs = block_size
    for bad in (255 * bs, 0, bs):
        with pytest.raises(InvalidArgumentError) as exc:
            pool.resize(bad)
        assert str(bad) in str(exc.value) and "only grow" in str(exc.value)
    if bs > 4096:
        with pytest.raises(InvalidArgumentError) as exc:
            pool.resize(300 * bs + 4096)
        assert str(300 * bs + 4096) in str(exc.value)
    for bad in (-bs, 1.5 * bs, "1G"):
        with pytest.raises(InvalidArgumentError):
            pool.resize(bad)
    assert pool.stats().data_blocks == 256
    assert os.path.getsize(os.path.join(pool.path, "data")) == 256 * bs


def test_resize_metadata(pool, reopen, block_size):
    cap = pool.stats().metadata_capacity_bytes
    for bad in (cap - 4096, cap + 1, 100, -4096, "x"):
        with pytest.raises(InvalidArgumentError):
            pool.resize_metadata(bad)
    assert pool.stats().metadata_capacity_bytes == cap
    dev = pool.create_thin("a", 8 * block_size)
    dev.pwrite(b"before", 0)
    txn = pool.stats().transaction_id
    pool.resize_metadata(cap * 4)
    st = pool.stats()
    assert st.metadata_capacity_bytes == cap * 4
    assert st.metadata_reserve_bytes == max(64, cap * 4 // 4096 // 64) * 4096
    assert st.transaction_id > txn  # committed
    assert os.path.getsize(os.path.join(pool.path, "metadata")) == cap * 4
    dev.pwrite(b"after", 5 * block_size)
    pool.resize_metadata(cap * 4)  # the same size: nothing
    p2 = reopen()
    assert p2.stats().metadata_capacity_bytes == cap * 4
    assert p2.device("a").pread(6, 0) == b"before"
    assert p2.device("a").pread(5, 5 * block_size) == b"after"


# ---------------------------------------------------------------- diff

def _diff_setup(pool, bs):
    a = pool.create_thin("a", 40 * bs)
    a.pwrite(pattern(1, 10 * bs), 0)        # blocks 0..9
    s = pool.snapshot("a", "s")
    a.pwrite(b"changed", 2 * bs + 5)       # 2: different (CoW)
    a.pwrite(pattern(2, bs), 20 * bs)      # 20: left only
    a.pwrite(pattern(3, 3 * bs), 12 * bs)  # 12..14: left only
    s.pwrite(b"snap only", 30 * bs + 7)    # 30: right only
    a.discard(5 * bs, bs)                  # 5: right only
    a.discard(7 * bs, bs)                  # 7: in neither
    s.discard(7 * bs, bs)
    a.pwrite(b"a8", 8 * bs)                # 8: different (both changed it)
    s.pwrite(b"s8", 8 * bs)
    return a, s


def test_diff_kinds(pool, block_size):
    _diff_setup(pool, block_size)
    got = list(pool.diff("a", "s"))
    assert all(isinstance(r, DiffRange) for r in got)
    assert [(r.kind, r.begin, r.length) for r in got] == [
        ("different", 2, 1), ("right_only", 5, 1), ("different", 8, 1),
        ("left_only", 12, 3), ("left_only", 20, 1), ("right_only", 30, 1)]
    rev = list(pool.diff("s", "a"))
    assert [(r.kind, r.begin, r.length) for r in rev] == [
        ("different", 2, 1), ("left_only", 5, 1), ("different", 8, 1),
        ("right_only", 12, 3), ("right_only", 20, 1), ("left_only", 30, 1)]


def test_diff_with_same(pool, block_size):
    _diff_setup(pool, block_size)
    got = [(r.kind, r.begin, r.length) for r in pool.diff("a", "s", same=True)]
    assert got == [
        ("same", 0, 2), ("different", 2, 1), ("same", 3, 2), ("right_only", 5, 1),
        ("same", 6, 1), ("different", 8, 1), ("same", 9, 1), ("left_only", 12, 3),
        ("left_only", 20, 1), ("right_only", 30, 1)]


def test_diff_identical_unrelated_and_empty(pool, block_size):
    bs = block_size
    a = pool.create_thin("a", 8 * bs)
    a.pwrite(pattern(1, 4 * bs), 0)
    assert list(pool.diff("a", "a")) == []
    assert [(r.kind, r.begin, r.length) for r in pool.diff("a", "a", same=True)] == [("same", 0, 4)]
    pool.snapshot("a", "s")
    assert list(pool.diff("a", "s")) == []
    b = pool.create_thin("b", 8 * bs)  # the same bytes, other blocks
    b.pwrite(pattern(1, 2 * bs), 0)
    assert [(r.kind, r.begin, r.length) for r in pool.diff("a", "b")] == [
        ("different", 0, 2), ("left_only", 2, 2)]
    pool.create_thin("empty", 8 * bs)
    assert [(r.kind, r.begin, r.length) for r in pool.diff("empty", "a")] == [("right_only", 0, 4)]
    assert list(pool.diff("empty", "empty", same=True)) == []


# ---------------------------------------------------------------- check

def test_check_report(pool, block_size):
    report = pool.check()
    assert isinstance(report, CheckReport)
    assert report.ok and report.errors == [] and report.leaks == []
    assert report.error_count == 0 and report.leak_count == 0
    assert "clean" in str(report)
    a = pool.create_thin("a", 8 * block_size)
    a.pwrite(pattern(1, 3 * block_size), 0)  # not committed: check commits first
    txn = pool.stats().transaction_id
    pool.snapshot("a", "s")
    report = pool.check()
    assert report.ok, str(report)
    assert report.nodes_checked >= 2  # the device tree and a mapping tree at least
    assert report.blocks_checked >= 256
    assert pool.stats().transaction_id > txn


# ---------------------------------------------------------------- device I/O

def test_pread_pwrite_unaligned_spanning_blocks(pool, block_size):
    bs = block_size
    size = 6 * bs
    dev = pool.create_thin("a", size)
    model = bytearray(size)
    for i, (off, length) in enumerate([(bs - 7, 2 * bs + 13), (1, 1), (3 * bs + 4095, 4097),
                                       (0, bs), (size - 3, 3), (bs // 2, bs)]):
        data = pattern(i, length)
        assert dev.pwrite(data, off) == length
        model[off:off + length] = data
        assert dev.pread(length, off) == data
    assert dev.pread(size, 0) == bytes(model)
    # reads at odd offsets and lengths
    for off, length in [(3, 5), (bs - 1, 2), (bs + 17, 3 * bs + 5), (size - 1, 1)]:
        assert dev.pread(length, off) == bytes(model[off:off + length])


def test_reads_into_buffers_at_every_alignment(pool, block_size):
    """Reads of pieces from different places in the data file (a snapshot's
    rewritten blocks among its origin's) into destinations at every
    alignment relative to the source: the copy chosen by alignment and
    size (copy.c) gives the same bytes as the model."""
    bs = block_size
    size = 8 * bs
    base = pool.create_thin("a", size)
    model = bytearray(pattern(1, size))
    base.pwrite(bytes(model), 0)
    snap = pool.snapshot("a", "b")
    for i, off in enumerate([bs + 100, 4 * bs - 1, 6 * bs + 4096]):
        data = pattern(10 + i, 3000)
        snap.pwrite(data, off)
        model[off:off + len(data)] = data
    buf = bytearray(size + 128)
    for shift in (0, 1, 15, 16, 31, 32, 63, 64, 65):
        for off, length in [(0, size), (bs - 3, 2 * bs + 7), (3 * bs + 1, 2049), (5, 2047)]:
            view = memoryview(buf)[shift:shift + length]
            assert snap.readinto(view, off) == length
            assert view == model[off:off + length], (shift, off, length)


def test_zero_length_io(pool, block_size):
    dev = pool.create_thin("a", 2 * block_size)
    assert dev.pread(0, 0) == b""
    assert dev.pread(0, dev.size) == b""
    assert dev.pwrite(b"", 0) == 0
    assert dev.pwrite(b"", dev.size) == 0
    assert dev.pwrite(bytearray(), 100) == 0
    assert dev.readinto(bytearray(), dev.size) == 0
    dev.discard(5, 0)
    dev.write_zeroes(5, 0)
    dev.write_zeroes(5, 0, may_unmap=False)
    assert dev.block_status(7, 0) == []
    assert dev.info().mapped_blocks == 0
    assert pool.stats().data_used == 0


def test_io_past_the_end(pool, block_size):
    dev = pool.create_thin("a", 2 * block_size)
    size = dev.size
    cases = [(lambda: dev.pwrite(b"abc", size - 2), "write", 3, size - 2),
             (lambda: dev.pwrite(b"x", size), "write", 1, size),
             (lambda: dev.pwrite(b"", size + 1), "write", 0, size + 1),
             (lambda: dev.pread(2, size - 1), "read", 2, size - 1),
             (lambda: dev.pread(1, size + 4096), "read", 1, size + 4096),
             (lambda: dev.readinto(bytearray(10), size - 9), "read", 10, size - 9),
             (lambda: dev.discard(size - 4096, 8192), "discard", 8192, size - 4096),
             (lambda: dev.write_zeroes(1, size), "write_zeroes", size, 1),
             (lambda: dev.write_zeroes(1, size, may_unmap=False), "write_zeroes", size, 1),
             (lambda: dev.block_status(size, 1), "block status", 1, size)]
    for call, op, length, off in cases:
        with pytest.raises(InvalidArgumentError) as exc:
            call()
        msg = str(exc.value)
        assert op in msg and f"{length} bytes" in msg and f"offset {off}" in msg \
            and f"({size} bytes)" in msg, msg
    assert dev.info().mapped_blocks == 0 and pool.stats().data_used == 0
    with pytest.raises(InvalidArgumentError):
        dev.block_status(size + 1)


@pytest.mark.parametrize("bad", [-1, -4096, 1.5, "0", None])
def test_bad_offsets(pool, bad):
    dev = pool.create_thin("a", 4 * 4096)
    calls = [lambda: dev.pwrite(b"x", bad), lambda: dev.pread(1, bad),
             lambda: dev.readinto(bytearray(1), bad), lambda: dev.discard(bad, 1),
             lambda: dev.write_zeroes(bad, 1), lambda: dev.block_status(bad, 1),
             lambda: dev.discard(0, bad), lambda: dev.write_zeroes(0, bad),
             lambda: dev.pread(bad, 0)]
    if bad is not None:  # block_status's length=None means "to the end"
        calls.append(lambda: dev.block_status(0, bad))
    for call in calls:
        with pytest.raises(InvalidArgumentError) as exc:
            call()
        assert repr(bad) in str(exc.value)
    assert dev.info().mapped_blocks == 0


def test_readinto_buffer_types(pool, block_size):
    bs = block_size
    dev = pool.create_thin("a", 4 * bs)
    data = pattern(7, 4 * bs)
    dev.pwrite(data, 0)
    off = bs - 10
    ba = bytearray(100)
    assert dev.readinto(ba, off) == 100
    assert bytes(ba) == data[off:off + 100]
    backing = bytearray(b"\xee" * 200)
    mv = memoryview(backing)[50:150]
    assert dev.readinto(mv, off) == 100
    assert bytes(backing[50:150]) == data[off:off + 100]
    assert backing[:50] == b"\xee" * 50 and backing[150:] == b"\xee" * 50
    arr8 = np.zeros(bs + 3, dtype=np.uint8)
    assert dev.readinto(arr8, 5) == bs + 3
    assert arr8.tobytes() == data[5:5 + bs + 3]
    arr32 = np.zeros(1000, dtype=np.uint32)
    assert dev.readinto(arr32, 2 * bs - 8) == 4000
    assert arr32.tobytes() == data[2 * bs - 8:2 * bs - 8 + 4000]
    assert (arr32 == np.frombuffer(data[2 * bs - 8:2 * bs - 8 + 4000], dtype=np.uint32)).all()
    with pytest.raises((TypeError, BufferError)):
        dev.readinto(b"immutable", 0)


def test_pwrite_buffer_types(pool, block_size):
    bs = block_size
    dev = pool.create_thin("a", 4 * bs)
    model = bytearray(4 * bs)
    writes = [(b"bytes object", bs - 3),
              (bytearray(b"a bytearray"), 2 * bs - 5),
              (memoryview(b"--a memoryview slice--")[2:-2], 3 * bs + 1),
              (np.arange(1000, dtype=np.uint32), bs + 7),
              (np.full(bs + 1, 0x5a, dtype=np.uint8), 0)]
    for obj, off in writes:
        raw = bytes(memoryview(obj).cast("B")) if not isinstance(obj, np.ndarray) else obj.tobytes()
        assert dev.pwrite(obj, off) == len(raw)
        model[off:off + len(raw)] = raw
    assert dev.pread(4 * bs, 0) == bytes(model)
    arr = np.zeros(1000, dtype=np.uint32)
    dev.readinto(arr, bs + 7)
    assert (arr == np.arange(1000, dtype=np.uint32)).all()


def test_unwritten_blocks_read_zero_and_use_no_data(pool, block_size):
    bs = block_size
    dev = pool.create_thin("a", 50 * bs)
    dev.pwrite(b"one", 20 * bs + 5)
    assert pool.stats().data_used == 1
    assert dev.pread(20 * bs, 0) == bytes(20 * bs)
    assert dev.pread(29 * bs, 21 * bs) == bytes(29 * bs)
    assert dev.pread(bs, 20 * bs) == bytes(5) + b"one" + bytes(bs - 8)
    assert pool.stats().data_used == 1  # reading allocates nothing
    assert dev.info().mapped_blocks == 1


def test_writing_a_shared_block(pool, block_size):
    bs = block_size
    dev = pool.create_thin("a", 4 * bs)
    dev.pwrite(pattern(1, 4 * bs), 0)
    pool.snapshot("a", "s")
    assert pool.stats().data_used == 4
    dev.pwrite(pattern(2, bs), bs)  # the whole block
    assert pool.stats().data_used == 5
    dev.pwrite(b"again", bs + 10)   # now exclusive: in place
    assert pool.stats().data_used == 5
    dev.pwrite(b"partial", 2 * bs + bs // 2)  # part of a shared block: copy
    assert pool.stats().data_used == 6
    dev.pwrite(pattern(3, bs), 2 * bs)
    assert pool.stats().data_used == 6
    assert pool.device("s").pread(4 * bs, 0) == pattern(1, 4 * bs)
    expect = bytearray(pattern(1, 4 * bs))
    expect[bs:2 * bs] = pattern(2, bs)
    expect[bs + 10:bs + 15] = b"again"
    expect[2 * bs:3 * bs] = pattern(3, bs)
    assert dev.pread(4 * bs, 0) == bytes(expect)


# ---------------------------------------------------------------- discard, write_zeroes

def test_discard_unmaps_only_whole_blocks(pool, block_size):
    bs = block_size
    dev = pool.create_thin("a", 6 * bs)
    data = pattern(3, 6 * bs)
    dev.pwrite(data, 0)
    dev.discard(bs // 2, 2 * bs)  # half of 0, all of 1, half of 2
    expect = bytearray(data)
    expect[bs:2 * bs] = bytes(bs)  # only block 1 reads zero; the halves keep their bytes
    assert dev.pread(6 * bs, 0) == bytes(expect)
    assert extents_as_tuples(dev.block_status()) == [
        (0, bs, True, False), (bs, bs, False, False), (2 * bs, 4 * bs, True, False)]
    assert dev.info().mapped_blocks == 5
    assert pool.stats().data_used == 5
    dev.discard(3 * bs + 1, bs - 2)  # inside one block: nothing at all
    assert dev.info().mapped_blocks == 5
    assert dev.pread(bs, 3 * bs) == data[3 * bs:4 * bs]
    dev.discard(3 * bs, 2 * bs)  # blocks 3 and 4
    expect[3 * bs:5 * bs] = bytes(2 * bs)
    assert dev.pread(6 * bs, 0) == bytes(expect)
    assert dev.info().mapped_blocks == 3
    dev.discard(0, 6 * bs)  # everything
    assert dev.pread(6 * bs, 0) == bytes(6 * bs)
    assert dev.info().mapped_blocks == 0 and pool.stats().data_used == 0
    dev.discard(0, 6 * bs)  # discarding holes is fine
    assert extents_as_tuples(dev.block_status()) == [(0, 6 * bs, False, False)]


def test_discard_to_the_end_unmaps_a_partial_last_block(pool, block_size):
    bs = block_size
    size = 2 * bs + 4096  # for 64K and 1M blocks the last block is partial
    dev = pool.create_thin("a", size)
    data = pattern(4, size)
    dev.pwrite(data, 0)
    assert dev.info().mapped_blocks == 3
    dev.discard(2 * bs + 100, size - 2 * bs - 100)  # to the end but not from the block start
    assert dev.info().mapped_blocks == 3
    assert dev.pread(size, 0) == data
    dev.discard(2 * bs, size - 2 * bs)  # the whole partial block, to the end
    assert dev.info().mapped_blocks == 2
    assert pool.stats().data_used == 2
    assert dev.pread(size, 0) == data[:2 * bs] + bytes(size - 2 * bs)
    assert extents_as_tuples(dev.block_status()) == [(0, 2 * bs, True, False),
                                                     (2 * bs, size - 2 * bs, False, False)]
    dev.discard(bs - 100, size - bs + 100)  # from inside block 0 to the end: block 1 and 2
    assert dev.info().mapped_blocks == 1
    assert dev.pread(size, 0) == data[:bs] + bytes(size - bs)


def test_discard_of_a_shared_block_keeps_the_snapshot(pool, block_size):
    bs = block_size
    dev = pool.create_thin("a", 4 * bs)
    dev.pwrite(pattern(5, 4 * bs), 0)
    s = pool.snapshot("a", "s")
    dev.discard(0, 4 * bs)
    assert dev.pread(4 * bs, 0) == bytes(4 * bs)
    assert s.pread(4 * bs, 0) == pattern(5, 4 * bs)
    assert pool.stats().data_used == 4
    pool.commit()  # sharing is exact once committed (see test_usage_exclusive_and_shared)
    assert pool.usage("s") == Usage(4, 0, bs)
    assert dev.info().mapped_blocks == 0 and pool.usage("a") == Usage(0, 0, bs)


@pytest.mark.parametrize("may_unmap", [True, False])
def test_write_zeroes(pool, block_size, may_unmap):
    bs = block_size
    dev = pool.create_thin("a", 6 * bs)
    data = pattern(6, 4 * bs)
    dev.pwrite(data, 0)  # blocks 0..3 mapped, 4 and 5 not
    off, length = bs // 2 + 3, 4 * bs + 10  # to just inside block 4
    dev.write_zeroes(off, length, may_unmap=may_unmap)
    expect = bytearray(data + bytes(2 * bs))
    expect[off:off + length] = bytes(length)
    assert dev.pread(6 * bs, 0) == bytes(expect)
    status = extents_as_tuples(dev.block_status())
    if may_unmap:
        # whole blocks 1..3 unmapped; the partial block 0 stays mapped; the
        # unmapped block 4 stays unmapped (it reads as zeroes already)
        assert status == [(0, bs, True, False), (bs, 5 * bs, False, False)]
        assert pool.stats().data_used == 1
    else:
        # every block written stays mapped, and the unmapped block 4 gets mapped
        assert status == [(0, 5 * bs, True, False), (5 * bs, bs, False, False)]
        assert pool.stats().data_used == 5
    assert dev.info().mapped_blocks == pool.stats().data_used


@pytest.mark.parametrize("may_unmap", [True, False])
def test_write_zeroes_on_shared_blocks(pool, block_size, may_unmap):
    bs = block_size
    dev = pool.create_thin("a", 4 * bs)
    data = pattern(8, 4 * bs)
    dev.pwrite(data, 0)
    s = pool.snapshot("a", "s")
    dev.write_zeroes(bs - 5, 2 * bs + 10, may_unmap=may_unmap)
    expect = bytearray(data)
    expect[bs - 5:3 * bs + 5] = bytes(2 * bs + 10)
    assert dev.pread(4 * bs, 0) == bytes(expect)
    assert s.pread(4 * bs, 0) == data
    mapped = [e.mapped for e in dev.block_status()]
    assert all(mapped) if not may_unmap else len(mapped) == 3


def test_write_zeroes_to_the_end_of_a_partial_last_block(pool, block_size):
    bs = block_size
    size = bs + 8192
    dev = pool.create_thin("a", size)
    dev.pwrite(pattern(9, size), 0)
    dev.write_zeroes(bs, size - bs)  # the whole partial block: unmapped
    assert dev.info().mapped_blocks == 1
    assert dev.pread(size, 0) == pattern(9, bs) + bytes(size - bs)


# ---------------------------------------------------------------- block_status

def test_block_status(pool, block_size):
    bs = block_size
    dev = pool.create_thin("a", 8 * bs)
    assert extents_as_tuples(dev.block_status()) == [(0, 8 * bs, False, False)]
    dev.pwrite(pattern(1, 2 * bs), bs)
    dev.pwrite(b"x", 5 * bs + 17)
    ext = dev.block_status()
    assert all(isinstance(e, Extent) for e in ext)
    assert extents_as_tuples(ext) == [
        (0, bs, False, False), (bs, 2 * bs, True, False), (3 * bs, 2 * bs, False, False),
        (5 * bs, bs, True, False), (6 * bs, 2 * bs, False, False)]
    s = pool.snapshot("a", "s")
    shared = [(0, bs, False, False), (bs, 2 * bs, True, True), (3 * bs, 2 * bs, False, False),
              (5 * bs, bs, True, True), (6 * bs, 2 * bs, False, False)]
    assert extents_as_tuples(dev.block_status()) == shared
    assert extents_as_tuples(s.block_status()) == shared
    dev.pwrite(b"y", 2 * bs)  # CoW: block 2 of each device is its own now
    pool.commit()  # sharing is exact once committed (see test_usage_exclusive_and_shared)
    split = [(0, bs, False, False), (bs, bs, True, True), (2 * bs, bs, True, False),
             (3 * bs, 2 * bs, False, False), (5 * bs, bs, True, True),
             (6 * bs, 2 * bs, False, False)]
    assert extents_as_tuples(dev.block_status()) == split
    assert extents_as_tuples(s.block_status()) == split


def test_block_status_covers_exactly_the_requested_range(pool, block_size):
    bs = block_size
    dev = pool.create_thin("a", 8 * bs)
    dev.pwrite(pattern(1, 2 * bs), bs)
    dev.pwrite(b"x", 5 * bs + 17)
    pool.snapshot("a", "s")
    dev.pwrite(b"y", 2 * bs)
    mapped = {1: True, 2: False, 5: True}  # block -> shared
    ranges = [(0, 8 * bs), (bs // 2 + 3, 4 * bs), (bs + 1, 1), (2 * bs - 1, 2), (3, 5),
              (5 * bs + 100, 3 * bs - 100), (7 * bs + 4096, bs - 4096), (8 * bs - 1, 1),
              (0, 1), (4096, 8 * bs - 8192)]
    for off, length in ranges:
        ext = dev.block_status(off, length)
        assert_exact_cover(ext, off, length)
        for e in ext:  # every byte of the extent has the block's kind
            for b in range(e.offset // bs, (e.offset + e.length - 1) // bs + 1):
                assert e.mapped == (b in mapped), (off, length, ext)
                assert e.shared == mapped.get(b, False), (off, length, ext)
    tail = dev.block_status(3 * bs)  # length defaults to the rest of the device
    assert_exact_cover(tail, 3 * bs, 5 * bs)


def test_block_status_of_a_partial_last_block(pool, block_size):
    bs = block_size
    size = 3 * bs + 4096
    dev = pool.create_thin("a", size)
    dev.pwrite(b"end", size - 3)
    ext = dev.block_status()
    assert_exact_cover(ext, 0, size)
    assert extents_as_tuples(ext) == [(0, 3 * bs, False, False), (3 * bs, 4096, True, False)]


# ---------------------------------------------------------------- flush

def test_flush_commits(pool, block_size):
    dev = pool.create_thin("a", 4 * block_size)
    txn = pool.stats().transaction_id
    dev.pwrite(b"flushed", 3)
    dev.flush()
    assert pool.stats().transaction_id == txn + 1
    dev.flush()  # nothing new
    assert pool.stats().transaction_id == txn + 1


def test_flush_makes_writes_survive_sigkill(pool, block_size):
    bs = block_size
    pool.create_thin("a", 4 * bs)
    pool.close()
    code = f"""
import os, signal
from cowblock import Pool
p = Pool.open({pool.path!r}, commit_interval=0)
d = p.device("a")
d.pwrite(b"durable", {bs} + 5)
d.pwrite(b"also", 3 * {bs})
d.flush()
os.kill(os.getpid(), signal.SIGKILL)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL, r.stderr.decode()
    with Pool.open(pool.path, commit_interval=0) as p:
        d = p.device("a")
        assert d.pread(7, bs + 5) == b"durable"
        assert d.pread(4, 3 * bs) == b"also"
        assert d.info().mapped_blocks == 2
        assert p.check().ok


# ---------------------------------------------------------------- device resize

def test_device_resize_grow(pool, reopen, block_size):
    bs = block_size
    dev = pool.create_thin("a", 2 * bs)
    dev.pwrite(pattern(1, 2 * bs), 0)
    with pytest.raises(InvalidArgumentError):
        dev.pwrite(b"x", 3 * bs)
    dev.resize(5 * bs + 4096)
    assert dev.size == 5 * bs + 4096 == pool.info("a").size
    assert dev.pread(3 * bs + 4096, 2 * bs) == bytes(3 * bs + 4096)
    dev.pwrite(b"grown", 5 * bs + 4091)
    assert dev.pread(5, 5 * bs + 4091) == b"grown"
    assert dev.pread(2 * bs, 0) == pattern(1, 2 * bs)
    p2 = reopen()
    assert p2.device("a").size == 5 * bs + 4096
    assert p2.device("a").pread(5, 5 * bs + 4091) == b"grown"


def test_device_resize_shrink(pool, block_size):
    bs = block_size
    dev = pool.create_thin("a", 6 * bs)
    dev.pwrite(pattern(2, 6 * bs), 0)
    dev.resize(2 * bs)
    assert dev.size == 2 * bs
    assert dev.info().mapped_blocks == 2
    assert pool.stats().data_used == 2
    assert dev.pread(2 * bs, 0) == pattern(2, 2 * bs)
    with pytest.raises(InvalidArgumentError):
        dev.pread(1, 2 * bs)
    with pytest.raises(InvalidArgumentError):
        dev.pwrite(b"x", 2 * bs)
    assert extents_as_tuples(dev.block_status()) == [(0, 2 * bs, True, False)]


def test_device_shrink_then_grow_reads_zeroes(pool, block_size):
    bs = block_size
    size = 4 * bs
    cut = bs + bs // 2 if bs > 4096 else 2 * bs  # inside block 1 when blocks are big
    dev = pool.create_thin("a", size)
    data = pattern(3, size)
    dev.pwrite(data, 0)
    dev.resize(cut)
    assert dev.pread(cut, 0) == data[:cut]
    dev.resize(size)
    assert dev.pread(size, 0) == data[:cut] + bytes(size - cut)
    # the cut block keeps its first part only
    assert dev.info().mapped_blocks == -(-cut // bs)


def test_device_shrink_then_grow_with_a_snapshot(pool, block_size):
    bs = block_size
    size = 4 * bs
    cut = bs + bs // 2 if bs > 4096 else 2 * bs
    dev = pool.create_thin("a", size)
    data = pattern(4, size)
    dev.pwrite(data, 0)
    s = pool.snapshot("a", "s")
    dev.resize(cut)
    dev.resize(size)
    assert dev.pread(size, 0) == data[:cut] + bytes(size - cut)
    assert s.pread(size, 0) == data
    assert s.size == size


@pytest.mark.parametrize("bad", [0, 1000, 4097, -4096, 8192.0, "8192", None])
def test_device_resize_bad_sizes(pool, bad):
    dev = pool.create_thin("a", 8192)
    with pytest.raises(InvalidArgumentError) as exc:
        dev.resize(bad)
    assert repr(bad) in str(exc.value)
    assert dev.size == 8192


def test_failed_device_shrink_changes_nothing(tmp_path):
    bs = 65536
    with Pool.create(tmp_path / "p", 8 * bs, bs, commit_interval=0) as pool:
        a = pool.create_thin("a", 4 * bs)
        a.pwrite(pattern(1, 4 * bs), 0)
        s = pool.snapshot("a", "s")
        fill_pool(pool)
        with pytest.raises(NoSpaceError):
            a.resize(bs + 4096)  # the cut block 1 is shared: zeroing its tail needs a block
        assert a.size == 4 * bs
        assert a.info().mapped_blocks == 4
        assert a.pread(4 * bs, 0) == pattern(1, 4 * bs)
        pool.set_labels("a", {"after": "the shrink"})  # any later commit
        report = pool.check()
        assert report.ok, str(report)
    with Pool.open(tmp_path / "p", commit_interval=0) as pool:
        report = pool.check()
        assert report.ok, str(report)
        pool.delete("filler")
        pool.device("a").pwrite(b"origin only", 2 * bs)
        assert pool.device("s").pread(4 * bs, 0) == pattern(1, 4 * bs)


def test_power_cut_during_device_shrink_leaves_a_consistent_pool(tmp_path):
    bs = 65536

    def run(path, nth):
        pool = Pool.create(path, 5 * bs, bs, commit_interval=0)
        a = pool.create_thin("a", 4 * bs)
        b = pool.create_thin("b", 4 * bs)
        a.pwrite(pattern(1, 2 * bs), 0)
        pool.snapshot("a", "s")
        a.pwrite(pattern(2, 2 * bs), 2 * bs)
        pool.commit()
        b.pwrite(b"b", 0)  # the pool is full, with an uncommitted change
        lib.cb_fault_set(1, nth, 0)
        try:
            a.resize(bs + 4096)
        except OSError:
            pass
        finally:
            try:
                pool.close()
            except OSError:
                pass
            counted = lib.cb_fault_set(0, 0, 0)
        return counted

    total = run(tmp_path / "count", 0)
    assert total > 5
    bad = []
    for nth in range(1, total + 1):
        path = tmp_path / f"cut{nth}"
        run(path, nth)
        with Pool.open(path, commit_interval=0) as pool:
            report = pool.check()
            if not report.ok:
                bad.append((nth, report.errors[:2]))
            assert pool.device("s").pread(2 * bs, 0) == pattern(1, 2 * bs)
    assert not bad, f"inconsistent after a power cut at I/O number(s) {bad} of {total}"


# ---------------------------------------------------------------- the file object

def test_open_returns_a_raw_file(pool, block_size):
    bs = block_size
    dev = pool.create_thin("a", 3 * bs)
    f = dev.open()
    assert isinstance(f, io.RawIOBase) and isinstance(f, DeviceFile)
    assert f.readable() and f.writable() and f.seekable()
    assert f.tell() == 0
    assert f.write(b"hello") == 5
    assert f.tell() == 5
    assert f.seek(bs - 2) == bs - 2
    assert f.write(b"span") == 4  # across a block boundary
    assert f.seek(-4, io.SEEK_CUR) == bs - 2
    assert f.read(4) == b"span"
    assert f.seek(0) == 0
    assert f.read(5) == b"hello"
    buf = bytearray(3)
    f.seek(1)
    assert f.readinto(buf) == 3 and buf == b"ell"
    assert f.seek(0, io.SEEK_END) == 3 * bs
    assert f.read(10) == b""  # at the end
    f.seek(-3, io.SEEK_END)
    assert f.read(10) == bytes(3)  # a short read at the end
    f.seek(3 * bs + 100)  # past the end: reads nothing
    assert f.read(1) == b"" and f.readinto(bytearray(4)) == 0
    with pytest.raises(InvalidArgumentError):
        f.seek(-1)
    f.seek(0)
    with pytest.raises(InvalidArgumentError):
        f.seek(-1, io.SEEK_CUR)
    f.seek(0)
    whole = f.read()
    assert len(whole) == 3 * bs
    assert whole[:5] == b"hello" and whole[bs - 2:bs + 2] == b"span"
    f.close()
    assert f.closed
    with pytest.raises(ValueError):
        f.read(1)
    assert dev.pread(5, 0) == b"hello"


def test_file_write_past_the_end(pool, block_size):
    dev = pool.create_thin("a", 2 * block_size)
    f = dev.open()
    f.seek(dev.size - 2)
    with pytest.raises(OSError) as exc:
        f.write(b"abc")
    assert str(dev.size) in str(exc.value)
    assert f.tell() == dev.size - 2
    assert dev.pread(2, dev.size - 2) == bytes(2)  # nothing written
    f.seek(dev.size + 10)
    with pytest.raises(OSError):
        f.write(b"x")
    f.seek(dev.size - 2)
    assert f.write(b"ab") == 2  # up to the end is fine
    with pytest.raises(OSError):
        f.write(b"x")
    assert dev.pread(2, dev.size - 2) == b"ab"
    assert pool.stats().data_used == 1


def test_file_modes(pool):
    dev = pool.create_thin("a", 4096)
    dev.pwrite(b"ro", 0)
    f = dev.open("rb")
    assert f.readable() and not f.writable()
    assert f.read(2) == b"ro"
    with pytest.raises(io.UnsupportedOperation):
        f.write(b"x")
    for mode in ("r", "w", "a", "ab", "x"):
        with pytest.raises(InvalidArgumentError):
            dev.open(mode)


def test_buffered_file_and_copyfileobj(pool, block_size):
    bs = block_size
    size = 3 * bs + 4096
    dev = pool.create_thin("a", size)
    model = bytearray(size)
    with io.BufferedRandom(dev.open(), buffer_size=8192) as bf:
        for i, off in enumerate([0, 17, bs - 1, 2 * bs + 5000, size - 10]):
            piece = pattern(i, 10)
            bf.seek(off)
            bf.write(piece)
            model[off:off + 10] = piece
        bf.flush()
        bf.seek(0)
        out = io.BytesIO()
        shutil.copyfileobj(bf, out)
        assert out.getvalue() == bytes(model)
        bf.seek(bs - 1)
        assert bf.read(10) == bytes(model[bs - 1:bs + 9])
    assert dev.pread(size, 0) == bytes(model)
    # read a whole device through a buffered reader into a plain file
    with io.BufferedReader(dev.open("rb")) as br, io.BytesIO() as sink:
        shutil.copyfileobj(br, sink, 12345)
        assert sink.getvalue() == bytes(model)


def test_buffered_write_past_the_end_raises(pool):
    dev = pool.create_thin("a", 8192)
    bf = io.BufferedRandom(dev.open(), buffer_size=4096)
    bf.seek(8190)
    with pytest.raises(OSError):
        bf.write(b"abcd")
        bf.flush()
    assert dev.pread(2, 8190) == bytes(2)
    try:
        bf.close()
    except OSError:
        pass


# ---------------------------------------------------------------- read-only pools

def test_read_only_pool(pool, reopen, block_size):
    bs = block_size
    dev = pool.create_thin("a", 4 * bs)
    dev.pwrite(pattern(1, 2 * bs), 0)
    ro = reopen(read_only=True)
    assert ro.read_only and ro.stats().read_only
    txn = ro.stats().transaction_id
    d = ro.device("a")
    assert d.pread(2 * bs, 0) == pattern(1, 2 * bs)
    for call in (lambda: d.pwrite(b"x", 0), lambda: d.discard(0, bs),
                 lambda: d.write_zeroes(0, bs), lambda: ro.create_thin("b", 4096),
                 lambda: ro.snapshot("a", "s"), lambda: ro.delete("a"),
                 lambda: ro.rename("a", "b"), lambda: ro.set_labels("a", {"k": "v"}),
                 lambda: ro.set_read_only("a"), lambda: d.resize(8 * bs),
                 lambda: ro.resize(512 * bs), lambda: ro.resize_metadata(8 << 20)):
        with pytest.raises(ReadOnlyError) as exc:
            call()
        assert exc.value.errno == errno.EROFS
    assert ro.commit() == txn
    assert ro.check().ok
    assert [i.name for i in ro.list()] == ["a"]
    assert d.pread(2 * bs, 0) == pattern(1, 2 * bs)


def test_file_follows_a_device_resize(pool, block_size):
    dev = pool.create_thin("a", 4 * 4096)
    dev.pwrite(b"tail", 4 * 4096 - 4)
    f = dev.open()
    dev.resize(2 * 4096)
    f.seek(0)
    assert f.read() == bytes(2 * 4096)
    dev.resize(8 * 4096)
    assert f.seek(0, io.SEEK_END) == 8 * 4096
    f.seek(6 * 4096)
    assert f.write(b"grown") == 5
    assert dev.pread(5, 6 * 4096) == b"grown"


# ---------------------------------------------------------------- metadata space

def test_metadata_space_exhaustion_and_resize_metadata(tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, 4096 * 4096, 4096, metadata_size=128 * 4096,
                     commit_interval=0) as pool:
        a = pool.create_thin("a", 4096 * 4096)
        a.pwrite(pattern(1, 600 * 4096), 0)
        made = 0
        with pytest.raises(MetadataSpaceError) as exc:
            while True:  # every snapshot and CoW write takes metadata blocks
                pool.snapshot("a", f"s{made}")
                a.pwrite(b"y", (made * 7 % 600) * 4096)
                made += 1
        assert made > 3
        e = exc.value
        assert e.errno == errno.ENOSPC and isinstance(e, NoSpaceError)
        assert "metadata space" in str(e) and "resize_metadata" in str(e)
        st = pool.stats()
        assert not st.read_only and not st.needs_check  # refused before any change
        assert pool.check().ok
        pool.resize_metadata(512 * 4096)
        pool.snapshot("a", "after")
        a.pwrite(b"z", 0)
        assert a.pread(1, 0) == b"z" and pool.device("after").pread(1, 0) == b"y"
        assert pool.check().ok
    with Pool.open(path, commit_interval=0) as pool:
        assert pool.stats().metadata_capacity_bytes == 512 * 4096
        assert pool.check().ok


# ---------------------------------------------------------------- multi-block writes

def test_writes_across_exclusive_blocks_mapped_out_of_order(pool, block_size):
    """In-place writes are coalesced over runs of blocks that are contiguous
    in the data file: runs must break where the data blocks are not."""
    bs = block_size
    dev = pool.create_thin("a", 12 * bs)
    model = bytearray(12 * bs)
    for vb in (5, 4, 3, 0, 1, 2, 9, 7, 8, 6):  # data blocks in a scrambled order
        dev.pwrite(pattern(vb, bs), vb * bs)
        model[vb * bs:(vb + 1) * bs] = pattern(vb, bs)
    pool.snapshot("a", "s")
    frozen = bytes(model)
    dev.pwrite(b"cow", 7 * bs + 1)  # block 7 exclusive again, elsewhere in the file
    model[7 * bs + 1:7 * bs + 4] = b"cow"
    for i, (off, length) in enumerate([(bs // 2, 5 * bs), (2 * bs + 1, 8 * bs),
                                       (0, 12 * bs), (6 * bs - 3, 4 * bs + 6),
                                       (11 * bs - 5, bs + 5)]):
        data = pattern(100 + i, length)
        dev.pwrite(data, off)
        model[off:off + length] = data
        assert dev.pread(12 * bs, 0) == bytes(model), f"after write {i}"
    assert pool.device("s").pread(12 * bs, 0) == frozen


def test_a_requests_new_blocks_are_contiguous_under_concurrent_writers(tmp_path):
    """The blocks one write allocates lie together in the data file however
    many writes allocate at once (as the FUSE server's parallel 1 MiB writes
    do), so a sequential read of them is one disk read, not sixteen."""
    from concurrent.futures import ThreadPoolExecutor
    MiB = 1 << 20
    with Pool.create(str(tmp_path / "p"), 64 * MiB, 65536, commit_interval=0) as p:
        d = p.create_thin("d", 32 * MiB)
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda off: d.pwrite(pattern(off, MiB), off), range(0, 32 * MiB, MiB)))
        blocks = dict((vb, blk) for vb, blk, _ in p.mappings("d"))
        for first in range(0, 512, 16):
            run = [blocks[vb] for vb in range(first, first + 16)]
            assert run == list(range(run[0], run[0] + 16)), (first, run)
        assert d.pread(32 * MiB, 0) == b"".join(pattern(off, MiB) for off in range(0, 32 * MiB, MiB))
        assert p.check().ok


def test_reads_in_a_forked_child_and_in_its_parent(tmp_path):
    """Reads hand their blocks to readahead through a pidfd of the process
    (dataio.c): a forked child gets its own, and the parent keeps reading."""
    MiB = 1 << 20
    with Pool.create(str(tmp_path / "p"), 16 * MiB, 65536, commit_interval=0) as p:
        d = p.create_thin("d", 8 * MiB)
        want = pattern(3, 8 * MiB)
        d.pwrite(want, 0)
        assert d.pread(4 * MiB, 0) == want[:4 * MiB]
        pid = os.fork()
        if pid == 0:
            os._exit(0 if d.pread(8 * MiB, 0) == want else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert d.pread(8 * MiB, 0) == want


@pytest.mark.parametrize("seed", [1, 2])
def test_random_io_against_a_model(pool, block_size, seed):
    bs = block_size
    rng = random.Random(seed)
    size = 16 * bs + 4096
    model = Model(bs)
    pool.create_thin("a", size)
    model.create("a", size)
    names = ["a"]
    for k in range(120):
        op = rng.random()
        name = rng.choice(names)
        dev = pool.device(name)
        if op < 0.55:
            length = rng.randint(1, 5 * bs)
            off = rng.randrange(size - length + 1)
            data = pattern(k, length)
            dev.pwrite(data, off)
            model.write(name, off, data)
        elif op < 0.7:
            length = rng.randint(0, 4 * bs)
            off = rng.randrange(size - length + 1)
            dev.discard(off, length)
            model.discard(name, off, length)
        elif op < 0.8:
            length = rng.randint(0, 4 * bs)
            off = rng.randrange(size - length + 1)
            dev.write_zeroes(off, length, may_unmap=rng.random() < 0.5)
            model.write_zeroes(name, off, length)
        elif op < 0.9 and len(names) < 8:
            new = f"s{k}"
            pool.snapshot(name, new, read_only=False)
            model.snapshot(name, new)
            names.append(new)
        elif op < 0.95 and len(names) > 1:
            victim = rng.choice(names[1:])
            pool.delete(victim)
            model.delete(victim)
            names.remove(victim)
        else:
            pool.commit()
    assert_matches(pool, model)
    for name in names:
        dev = pool.device(name)
        assert_exact_cover(dev.block_status(), 0, dev.size)
        assert sum(e.length for e in dev.block_status() if e.mapped) <= \
            dev.info().mapped_blocks * bs


def test_huge_values_are_invalid_arguments(tmp_path, pool):
    dev = pool.create_thin("a", 4 * 4096)
    huge = 2 ** 64
    calls = [lambda: dev.pwrite(b"x", huge), lambda: dev.pread(1, huge),
             lambda: dev.discard(0, huge), lambda: dev.discard(huge, 0),
             lambda: dev.write_zeroes(0, huge), lambda: dev.block_status(0, huge),
             lambda: dev.resize(huge), lambda: pool.create_thin("b", huge),
             lambda: pool.resize(huge * pool.block_size),
             lambda: pool.resize_metadata(huge), lambda: Pool.create(tmp_path / "p", huge, 4096)]
    wrong = []
    for i, call in enumerate(calls):
        try:
            call()
        except InvalidArgumentError as e:
            assert str(huge) in str(e) or str(huge * pool.block_size) in str(e)
        except Exception as e:  # noqa: B902
            wrong.append((i, repr(e)))
        else:
            wrong.append((i, "no error"))
    assert not wrong, wrong


def metadata_advice(pool_dir):
    """The readahead flags (VmFlags rr: random, sr: sequential) of this
    process's mappings of the pool's metadata file."""
    path = os.path.realpath(os.path.join(pool_dir, "metadata"))
    flags, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:    # a mapping's first line
                current = " ".join(fields[5:]) == path
            elif fields[0] == "VmFlags:" and current:
                flags.append({"rr", "sr"} & set(fields[1:]))
    return flags


def test_the_metadata_mapping_reads_only_what_a_lookup_faults_also_after_walks(tmp_path):
    """Lookups fault single metadata pages (MADV_RANDOM: the kernel's
    read-around would read the disk's whole readahead window around each);
    walks of whole trees read ahead while they run, and every walk, failed
    ones too, gives the mapping back its random advice, also after the
    metadata file grew and was mapped again."""
    with Pool.create(tmp_path / "p", 64 << 20, 65536, commit_interval=0) as p:
        a = p.create_thin("a", 8 << 20)
        a.pwrite(pattern(1, 4 << 20), 0)
        p.snapshot("a", "s")
        a.pwrite(b"x" * 4096, 0)
        assert metadata_advice(tmp_path / "p") == [{"rr"}]
        p.check()
        p.diff("s", "a")
        p.usage("a")
        p.mappings("a")
        p.mappings()
        p.trim()
        p.rollback("a", "s")
        p.create_thin("b", 1 << 20)
        p.delete("b")
        with pytest.raises(DeviceNotFoundError):
            p.delete("b")
        with pytest.raises(DeviceNotFoundError):
            p.usage("b")
        assert metadata_advice(tmp_path / "p") == [{"rr"}]
        p.resize_metadata(2 * p.stats().metadata_capacity_bytes)
        assert metadata_advice(tmp_path / "p") == [{"rr"}]
        assert p.check().ok


def test_a_long_space_map_scan_reads_ahead_and_gives_the_advice_back(tmp_path):
    """An allocation that must scan past many space map pages in use (here
    the 16 pages of b's 4 KiB blocks between the hint and the free ones)
    reads ahead while it scans (one MADV_NORMAL under strace), and every
    scan, found or not, gives the mapping its random advice back: a scan
    that left it reading ahead would undo it for every lookup after."""
    quarter = 16384 * 4096
    with Pool.create(tmp_path / "p", 4 * quarter, 4096, commit_interval=0) as p:
        for name in "abc":
            p.create_thin(name, quarter).pwrite(pattern(ord(name), quarter), 0)
        p.delete("a")
        p.delete("c")
        p.commit()
        p.create_thin("d", quarter).pwrite(pattern(4, quarter), 0)     # back to where a was
        e = p.create_thin("e", 2 * quarter)
        e.pwrite(b"e" * 4096, 0)                 # one block, past b's 16 pages
        e.pwrite(pattern(5, 8 << 20), 1 << 20)   # a run
        with pytest.raises(NoSpaceError):
            p.create_thin("f", 2 * quarter).pwrite(pattern(6, 2 * quarter), 0)
        assert metadata_advice(tmp_path / "p") == [{"rr"}]
        assert p.device("b").pread(quarter, 0) == pattern(ord("b"), quarter)
