"""Random sequences of pool operations against a plain in-memory model.

The pool is made with a tiny b-tree node capacity, so that node splits,
root growth and shared-node copies happen all the time.  After every step
each device reads back exactly as the model says and check() is clean.
"""
import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, initialize,
                                 invariant, precondition, rule)

from cowblock import Pool, ReadOnlyError
from helpers import Model, assert_matches, pattern

NAMES = st.text("abcdefgh", min_size=1, max_size=3)


class PoolMachine(RuleBasedStateMachine):
    block_size = 4096
    blocks_per_dev = 24
    node_capacity = 3

    devices = Bundle("devices")

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="cowblock-prop-")
        self.pool = Pool.create(self.dir + "/pool", 2048 * self.block_size, self.block_size,
                                commit_interval=0, _node_capacity=self.node_capacity)
        self.model = Model(self.block_size)
        self.seed = 0

    def teardown(self):
        if self.pool._h is not None:
            self.pool.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _size(self):
        return self.blocks_per_dev * self.block_size

    @initialize(target=devices)
    def first(self):
        self.pool.create_thin("base", self._size())
        self.model.create("base", self._size())
        return "base"

    @rule(target=devices, name=NAMES, blocks=st.integers(1, 24))
    def create(self, name, blocks):
        if name in self.model.devs:
            return "base" if "base" in self.model.devs else name
        size = blocks * self.block_size if blocks % 3 else blocks * 4096 + 4096
        self.pool.create_thin(name, size)
        self.model.create(name, size)
        return name

    @rule(target=devices, origin=devices, name=NAMES, read_only=st.booleans())
    def snapshot(self, origin, name, read_only):
        if origin not in self.model.devs or name in self.model.devs:
            return origin
        self.pool.snapshot(origin, name, read_only=read_only)
        self.model.snapshot(origin, name, read_only)
        return name

    def _span(self, name, data):
        size = len(self.model.devs[name])
        off = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(0, min(size - off, 3 * self.block_size)))
        return off, length

    @rule(name=devices, data=st.data())
    def write(self, name, data):
        if name not in self.model.devs:
            return
        off, length = self._span(name, data)
        self.seed += 1
        buf = pattern(self.seed, length)
        if self.model.read_only[name]:
            with pytest.raises(Exception):
                self.pool.device(name).pwrite(buf, off)
            return
        assert self.pool.device(name).pwrite(buf, off) == length
        self.model.write(name, off, buf)

    @rule(name=devices, data=st.data())
    def discard(self, name, data):
        if name not in self.model.devs or self.model.read_only[name]:
            return
        off, length = self._span(name, data)
        self.pool.device(name).discard(off, length)
        self.model.discard(name, off, length)

    @rule(name=devices, data=st.data(), may_unmap=st.booleans())
    def write_zeroes(self, name, data, may_unmap):
        if name not in self.model.devs or self.model.read_only[name]:
            return
        off, length = self._span(name, data)
        self.pool.device(name).write_zeroes(off, length, may_unmap=may_unmap)
        self.model.write_zeroes(name, off, length)

    @rule(name=consumes(devices))
    def delete(self, name):
        if name not in self.model.devs:
            return
        self.pool.delete(name)
        self.model.delete(name)

    @rule(name=devices, blocks=st.integers(1, 30), extra=st.sampled_from([0, 4096]))
    def resize(self, name, blocks, extra):
        if name not in self.model.devs:
            return
        size = blocks * self.block_size + extra
        if self.model.read_only[name]:
            with pytest.raises(ReadOnlyError):
                self.pool.device(name).resize(size)
            return
        self.pool.device(name).resize(size)
        self.model.resize(name, size)

    @rule()
    def commit(self):
        self.pool.commit()

    @rule()
    def reopen(self):
        self.pool.close()
        self.pool = Pool.open(self.dir + "/pool", commit_interval=0)

    @invariant()
    def matches_model(self):
        assert_matches(self.pool, self.model)
        report = self.pool.check()
        assert report.ok, str(report)


class PoolMachine64K(PoolMachine):
    block_size = 65536
    blocks_per_dev = 8
    node_capacity = 4


# COWBLOCK_EXAMPLES raises the example count for long runs (`make torture`).
EXAMPLES = int(os.environ.get("COWBLOCK_EXAMPLES", "40"))
SETTINGS = settings(max_examples=EXAMPLES, stateful_step_count=30, deadline=None,
                    suppress_health_check=list(HealthCheck))

TestPool4K = PoolMachine.TestCase
TestPool4K.settings = SETTINGS
TestPool64K = PoolMachine64K.TestCase
TestPool64K.settings = settings(SETTINGS, max_examples=max(EXAMPLES // 2, 1))


def test_ten_thousand_mappings(tmp_path):
    """A device with over 10,000 mappings in a tiny-node tree, snapshotted and
    partly rewritten, against the model; then reopened and checked."""
    bs, n = 4096, 12000
    with Pool.create(tmp_path / "p", 3 * n * bs, bs, metadata_size=64 << 20, commit_interval=0,
                     _node_capacity=5) as pool:
        model = Model(bs)
        dev = pool.create_thin("big", n * bs)
        model.create("big", n * bs)
        order = list(range(n))
        random.Random(7).shuffle(order)
        for i, b in enumerate(order):
            buf = pattern(i, 16)
            dev.pwrite(buf, b * bs + 5)
            model.write("big", b * bs + 5, buf)
        pool.snapshot("big", "snap")
        model.snapshot("big", "snap")
        for i, b in enumerate(order[:3000]):
            buf = pattern(i + n, 8)
            dev.pwrite(buf, b * bs)
            model.write("big", b * bs, buf)
        dev.discard(100 * bs, 2000 * bs)
        model.discard("big", 100 * bs, 2000 * bs)
        assert_matches(pool, model)
        assert pool.check().ok
    with Pool.open(tmp_path / "p") as pool:
        assert pool.info("snap").mapped_blocks == n
        assert_matches(pool, model)
        report = pool.check()
        assert report.ok, str(report)
