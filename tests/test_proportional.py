"""Diff, container commit, deferred removal and layers do work in proportion
to what changed, not to the device size: metadata blocks read (verified
after a fresh open) and written are counted at two sizes."""
import os

import pytest

from cowblock import Pool, images
from helpers import pattern

BS = 65536


def build(path, nblocks):
    pool = Pool.create(path, 3 * nblocks * BS, BS, commit_interval=0)
    base = pool.create_thin("base", nblocks * BS)
    chunk = os.urandom(1 << 20)
    for off in range(0, nblocks * BS, 1 << 20):
        base.pwrite(chunk, off)
    pool.snapshot("base", "snap")
    for b in (3, nblocks // 2, nblocks - 2):        # three changed blocks, whatever the size
        base.pwrite(pattern(b, 100), b * BS)
    pool.close()
    # fresh counters: nothing verified yet; deferred removals wait for reclaim()
    return Pool.open(path, commit_interval=0, background_reclaim=False)


@pytest.mark.parametrize("what", ["diff", "commit", "deferred"])
def test_work_does_not_grow_with_the_device(tmp_path, what):
    costs = []
    for nblocks in (2048, 32768):                    # 128 MiB and 2 GiB devices
        pool = build(tmp_path / f"p{nblocks}", nblocks)
        w0, r0 = pool._counters()
        if what == "diff":
            ranges = list(pool.diff("snap", "base"))
            assert sum(r.length for r in ranges) == 3
        elif what == "commit":
            pool.set_labels("base", {"cowblock.kind": "container"}, _internal=True)
            pool.snapshot("base", "layer", read_only=True)
        else:
            pool.delete("snap", deferred=True)
        w1, r1 = pool._counters()
        if what == "deferred":
            assert pool.pending_removals() == 1 and pool.reclaim()
        costs.append((w1 - w0) + (r1 - r0))
        pool.close()
    small, big = costs
    assert big <= small + 4, f"{what}: {small} metadata blocks at 128 MiB, {big} at 2 GiB"


def test_layer_writes_only_what_differs(tmp_path):
    written = []
    for nblocks in (512, 4096):
        pool = build(tmp_path / f"p{nblocks}", nblocks)
        pool.set_read_only("base", True)
        pool.set_labels("base", {"cowblock.kind": "image"}, _internal=True)
        data = bytearray(pool.device("base").pread(nblocks * BS, 0))
        data[5 * BS:5 * BS + 10] = b"0123456789"
        src = tmp_path / f"v{nblocks}.raw"
        src.write_bytes(data)
        before = pool.stats().data_used
        images.add_layer(pool, "base", "v2", str(src))
        written.append(pool.stats().data_used - before)
        pool.close()
    assert written == [1, 1], written
