"""Stale data: a freed data block is reused without being zeroed, so every
write into a newly allocated block must fill the whole block (old bytes or
zeroes around the new piece) before any mapping points at it.

Each test first fills data blocks with a marker byte (0xFD, a value that
helpers.pattern never produces), frees them, and then makes devices use
them in every way that allocates: small unaligned writes, CoW writes into
snapshots, write_zeroes, shrink and regrow, reuse within one transaction,
blocks a pool resize adds.  The marker must never show up in a read.
Runs at all three block sizes, in pools of 96 blocks (the marker is
written to every block of the pool, and smaller pools keep that fast).
"""
import io
import os
import random

import pytest

from cowblock import Pool
from helpers import pattern

MARK = 0xFD
BLOCKS = 96
MARK_BYTE = bytes([MARK])


def data_file(pool):
    return os.path.join(pool.path, "data")


def marked_blocks(pool, blocks=None):
    """Data blocks of the pool's data file holding at least one marker byte."""
    bs = pool.block_size
    n = pool.stats().data_blocks if blocks is None else blocks
    found = 0
    with open(data_file(pool), "rb") as f:
        for b in range(n):
            f.seek(b * bs)
            if MARK_BYTE in f.read(bs):
                found += 1
    return found


def poison_free_space(pool, name="marker"):
    """Fill every free data block with the marker, then free them all."""
    bs = pool.block_size
    free = pool.stats().data_free
    dev = pool.create_thin(name, free * bs)
    chunk = MARK_BYTE * (min(free, 16) * bs)
    for off in range(0, free * bs, len(chunk)):
        dev.pwrite(chunk[:free * bs - off], off)
    assert pool.stats().data_free == 0
    pool.delete(name)
    assert pool.stats().data_free == free
    return free


def assert_no_marker(dev, model=None):
    got = dev.pread(dev.size, 0)
    if MARK_BYTE in got:
        at = got.index(MARK_BYTE)
        bs = dev.pool.block_size
        raise AssertionError(f"device {dev.name}: stale marker at byte {at} "
                             f"(block {at // bs}, offset {at % bs} in it)")
    if model is not None:
        assert got == bytes(model), f"device {dev.name}: contents differ from the model"


@pytest.fixture
def pool(pool_dir, block_size):
    """A pool of BLOCKS blocks (overrides conftest's), checked clean at the end."""
    p = Pool.create(pool_dir, BLOCKS * block_size, block_size, commit_interval=0)
    yield p
    if p._h is not None:
        report = p.check()
        assert report.ok, str(report)
        p.close()


@pytest.fixture
def poisoned(pool):
    poison_free_space(pool)
    # the data file really holds the marker in every block now
    assert marked_blocks(pool) == pool.stats().data_blocks
    return pool


def test_small_unaligned_writes_into_recycled_blocks(poisoned, block_size):
    pool, bs = poisoned, block_size
    rng = random.Random(bs)
    dev = pool.create_thin("a", 64 * bs)
    model = bytearray(dev.size)
    assert_no_marker(dev, model)  # nothing mapped yet
    offsets = [0, 1, bs // 2, bs - 1, bs - 13, 4095, 4096, bs - 4097 if bs > 4097 else 7]
    for i in range(64):
        inner = offsets[i % len(offsets)] if i < 16 else rng.randrange(bs)
        length = rng.randint(1, 13)
        off = min(i * bs + inner, dev.size - length)  # some writes straddle two blocks
        data = pattern(i, length)
        dev.pwrite(data, off)
        model[off:off + length] = data
    assert pool.stats().data_used == dev.info().mapped_blocks == 64
    assert_no_marker(dev, model)
    # and through the file interface, in odd-sized reads
    with dev.open("rb") as f:
        buf = io.BytesIO()
        while True:
            piece = f.read(12345)
            if not piece:
                break
            buf.write(piece)
    assert buf.getvalue() == bytes(model)


def test_writes_to_several_new_devices(poisoned, block_size):
    pool, bs = poisoned, block_size
    models = {}
    for d in range(4):
        dev = pool.create_thin(f"d{d}", 10 * bs + 4096)
        models[dev.name] = bytearray(dev.size)
        for k in range(0, 10, 3):
            off = k * bs + 100 * d + 5
            data = pattern(10 * d + k, 33)
            dev.pwrite(data, off)
            models[dev.name][off:off + 33] = data
        # the last, partial block too
        dev.pwrite(b"\x01\x02", dev.size - 2)
        models[dev.name][-2:] = b"\x01\x02"
    for name, model in models.items():
        assert_no_marker(pool.device(name), model)


def test_cow_writes_into_snapshots(poisoned, block_size):
    pool, bs = poisoned, block_size
    origin = pool.create_thin("origin", 8 * bs)
    base = pattern(1, 8 * bs)
    origin.pwrite(base, 0)
    models = {"origin": bytearray(base)}
    prev = "origin"
    for depth in range(1, 5):
        name = f"snap{depth}"
        snap = pool.snapshot(prev, name)
        models[name] = bytearray(models[prev])
        for k in range(8):
            off = k * bs + (depth * 997 + k * 31) % (bs - 8)
            data = pattern(depth * 10 + k, 1 + (k % 7))
            snap.pwrite(data, off)  # the first write to a shared block: copy on write
            models[name][off:off + len(data)] = data
        # and the origin diverges too
        off = depth * bs + 11
        origin.pwrite(b"\x07" * 3, off)
        models["origin"][off:off + 3] = b"\x07" * 3
        prev = name
    for name, model in models.items():
        assert_no_marker(pool.device(name), model)


def test_cow_of_partly_written_blocks(poisoned, block_size):
    """A block first written in part (the rest must be zeroes), then shared,
    then written in part again through the snapshot."""
    pool, bs = poisoned, block_size
    a = pool.create_thin("a", 4 * bs)
    model = bytearray(4 * bs)
    for k in range(4):
        off = k * bs + 17 * (k + 1)
        a.pwrite(b"\x11" * 5, off)
        model[off:off + 5] = b"\x11" * 5
    s = pool.snapshot("a", "s")
    smodel = bytearray(model)
    for k in range(4):
        off = k * bs + bs - 9 - k
        s.pwrite(b"\x22" * 4, off)
        smodel[off:off + 4] = b"\x22" * 4
    assert_no_marker(a, model)
    assert_no_marker(s, smodel)


@pytest.mark.parametrize("may_unmap", [True, False])
def test_write_zeroes_and_discard_on_recycled_blocks(poisoned, block_size, may_unmap):
    pool, bs = poisoned, block_size
    dev = pool.create_thin("a", 8 * bs)
    model = bytearray(dev.size)
    # zeroes into unmapped blocks: allocates (may_unmap False) or not (True)
    dev.write_zeroes(bs + 10, 2 * bs, may_unmap=may_unmap)
    assert_no_marker(dev, model)
    # partial data, then zeroes over part of it and discards around it
    dev.pwrite(pattern(3, 3 * bs), 4 * bs + 100)
    model[4 * bs + 100:7 * bs + 100] = pattern(3, 3 * bs)
    dev.write_zeroes(4 * bs + 50, bs, may_unmap=may_unmap)
    model[4 * bs + 50:5 * bs + 50] = bytes(bs)
    dev.discard(5 * bs + 1, 2 * bs)  # whole block 6 only
    model[6 * bs:7 * bs] = bytes(bs)
    assert_no_marker(dev, model)
    # a snapshot, and zeroes over its shared blocks
    s = pool.snapshot("a", "s")
    smodel = bytearray(model)
    dev.write_zeroes(4 * bs + 7, 3, may_unmap=may_unmap)
    model[4 * bs + 7:4 * bs + 10] = bytes(3)
    assert_no_marker(dev, model)
    assert_no_marker(s, smodel)


def test_shrink_and_regrow(poisoned, block_size):
    pool, bs = poisoned, block_size
    dev = pool.create_thin("a", 4 * bs)
    dev.pwrite(pattern(4, 2 * bs + 300), 1000)
    model = bytearray(4 * bs)
    model[1000:2 * bs + 1300] = pattern(4, 2 * bs + 300)
    snap = pool.snapshot("a", "s")
    cut = bs + 4096 if bs > 4096 else bs
    dev.resize(cut)
    dev.resize(4 * bs)
    smodel = bytes(model)
    model[cut:] = bytes(4 * bs - cut)
    assert_no_marker(dev, model)
    assert_no_marker(snap, smodel)
    dev.pwrite(b"\x05", 3 * bs + 3)  # a fresh block past the old cut
    model[3 * bs + 3] = 5
    assert_no_marker(dev, model)


def test_blocks_freed_in_the_same_transaction(pool, block_size):
    """The pool is full; a discard frees marked blocks without a commit; the
    next allocation commits to reuse them, and must still fill them."""
    bs = pool.block_size
    dev = pool.create_thin("a", 32 * bs)
    free = pool.stats().data_free
    marker = pool.create_thin("marker", free * bs)
    chunk = MARK_BYTE * (min(free, 16) * bs)
    for off in range(0, free * bs, len(chunk)):
        marker.pwrite(chunk, off)
    assert pool.stats().data_free == 0
    marker.discard(0, marker.size)  # freed now, reusable only after a commit
    txn = pool.stats().transaction_id
    model = bytearray(dev.size)
    for k in range(32):
        off = k * bs + 3 * k + 1
        dev.pwrite(b"\x09" * 2, off)
        model[off:off + 2] = b"\x09" * 2
    assert dev.info().mapped_blocks == 32
    assert pool.stats().transaction_id > txn  # the write had to commit to reuse them
    assert_no_marker(dev, model)
    assert_no_marker(marker)
    # the device's blocks are former marker blocks, now filled whole
    assert marked_blocks(pool) == pool.stats().data_blocks - 32


def test_blocks_added_by_a_pool_resize(pool, block_size):
    """Bytes past the end of the data file (a file longer than the pool says)
    become data blocks when the pool grows; they are as stale as any."""
    bs = pool.block_size
    keep = pool.create_thin("keep", pool.stats().data_free * bs)
    keep.write_zeroes(0, keep.size, may_unmap=False)  # every existing block in use
    extra = 8
    with open(data_file(pool), "r+b") as f:
        f.seek(BLOCKS * bs)
        f.write(MARK_BYTE * (extra * bs))
    assert marked_blocks(pool, BLOCKS + extra) == extra
    pool.resize((BLOCKS + extra) * bs)
    assert marked_blocks(pool) == extra
    dev = pool.create_thin("a", extra * bs)
    model = bytearray(dev.size)
    for k in range(extra):
        off = k * bs + bs // 3 + k
        dev.pwrite(b"\x03" * 6, off)
        model[off:off + 6] = b"\x03" * 6
    assert pool.stats().data_free == 0
    assert_no_marker(dev, model)


def test_marker_survives_where_it_belongs(pool, block_size):
    """The check itself can fail: a device that holds marker data reads it,
    and so does its snapshot after the device is deleted."""
    bs = block_size
    dev = pool.create_thin("m", 2 * bs)
    dev.pwrite(MARK_BYTE * (2 * bs), 0)
    pool.snapshot("m", "s")
    pool.delete("m")
    with pytest.raises(AssertionError, match="stale marker at byte 0"):
        assert_no_marker(pool.device("s"))
