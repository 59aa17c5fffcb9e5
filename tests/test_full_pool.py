"""Full data space and full metadata space: ENOSPC for what needs more,
nothing else changes, the pool stays writable, growing it fixes it."""
import errno

import pytest

from cowblock import MetadataSpaceError, NoSpaceError, Pool, health
from helpers import pattern

BS = 4096


def test_data_space_full_then_grow(tmp_path):
    with Pool.create(tmp_path / "p", 64 * BS, BS, commit_interval=0) as pool:
        a, b = pool.create_thin("a", 256 * BS), pool.create_thin("b", 256 * BS)
        for i in range(32):
            a.pwrite(pattern(i, BS), i * BS)
            b.pwrite(pattern(100 + i, BS), i * BS)
        assert pool.stats().data_free == 0
        before_a, before_b = a.pread(32 * BS, 0), b.pread(32 * BS, 0)
        with pytest.raises(NoSpaceError) as exc:
            a.pwrite(b"x" * BS, 100 * BS)
        assert exc.value.errno == errno.ENOSPC and "out of data space" in str(exc.value)
        with pytest.raises(NoSpaceError) as exc:   # new devices are refused when nearly full
            pool.snapshot("a", "snap")
        assert "min_free_space" in str(exc.value)
        health.configure(pool, min_free_space=0)
        snap = pool.snapshot("a", "snap")          # metadata-only operations still work
        with pytest.raises(NoSpaceError):          # a CoW needs a block too
            a.pwrite(b"y", 0)
        b.pwrite(pattern(7, BS), 3 * BS)           # b owns its blocks: overwrites in place work...
        with pytest.raises(NoSpaceError):
            a.pwrite(b"z" * BS, 40 * BS)
        assert a.pread(32 * BS, 0) == before_a     # ...and nothing else changed
        assert snap.pread(32 * BS, 0) == before_a
        assert b.pread(BS, 0) == before_b[:BS]
        assert not pool.stats().read_only
        pool.delete("snap")
        b.discard(0, 16 * BS)                      # frees blocks: reusable after a commit,
        a.pwrite(b"w" * BS, 200 * BS)              # which the write does by itself
        pool.resize(128 * BS)
        for i in range(40, 72):
            a.pwrite(pattern(i, BS), i * BS)
        assert a.pread(BS, 200 * BS) == b"w" * BS
        report = pool.check()
        assert report.ok, str(report)


def test_metadata_space_full_then_grow(tmp_path):
    blocks = 4096
    with Pool.create(tmp_path / "p", blocks * BS, BS, metadata_size=512 * 1024,
                     commit_interval=0, _node_capacity=3) as pool:
        dev = pool.create_thin("a", blocks * BS)
        written = {}
        with pytest.raises(MetadataSpaceError) as exc:
            for i in range(blocks):
                b = (i * 2654435761) % blocks   # scattered: many small leaves
                dev.pwrite(pattern(i, 64), b * BS)
                written[b] = pattern(i, 64)
        assert exc.value.errno == errno.ENOSPC
        assert "resize_metadata" in str(exc.value)
        stats = pool.stats()
        assert not stats.read_only and not stats.needs_check
        pool.commit()                              # the reserve keeps commits possible
        for b, data in list(written.items())[:200]:
            assert dev.pread(64, b * BS) == data
        pool.resize_metadata(4 << 20)
        dev.pwrite(b"after", 5)
        assert dev.pread(5, 5) == b"after"
        report = pool.check()
        assert report.ok, str(report)
