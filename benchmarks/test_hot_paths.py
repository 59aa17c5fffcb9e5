"""pytest-benchmark micro-benchmarks of the engine's hot paths (`make bench-micro`).

They live apart from tests/ and assert nothing about time; compare.py puts
the figures that have targets next to their peers.
"""
import os
import random

import pytest

from cowblock import Pool

MiB = 1 << 20
SIZE = 128 * MiB


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    p = Pool.create(tmp_path_factory.mktemp("bench") / "pool", 4 * SIZE, 65536, commit_interval=1.0)
    dev = p.create_thin("base", SIZE)
    chunk = os.urandom(MiB)
    for off in range(0, SIZE, MiB):
        dev.pwrite(chunk, off)
    p.commit()
    yield p
    p.close()


def test_readinto_4k_random(benchmark, pool):
    dev, buf = pool.device("base"), bytearray(4096)
    offsets = [random.randrange(SIZE // 4096) * 4096 for _ in range(10000)]
    it = iter(offsets * 1000)
    benchmark(lambda: dev.readinto(buf, next(it)))


def test_readinto_1m_sequential(benchmark, pool):
    dev, buf = pool.device("base"), bytearray(MiB)
    pos = [0]

    def step():
        dev.readinto(buf, pos[0])
        pos[0] = (pos[0] + MiB) % SIZE
    benchmark(step)


def test_pwrite_1m_overwrite(benchmark, pool):
    dev, data = pool.device("base"), os.urandom(MiB)
    pos = [0]

    def step():
        dev.pwrite(data, pos[0])
        pos[0] = (pos[0] + MiB) % SIZE
    benchmark(step)


def test_pwrite_4k_first_write_cow(benchmark, pool):
    """Each round: a fresh snapshot, then 4 KiB into each of 256 shared 64 KiB blocks."""
    data = os.urandom(4096)
    names = iter(range(10 ** 6))

    def setup():
        name = f"cow{next(names)}"
        return (pool.snapshot("base", name),), {}

    def run(dev):
        for b in range(256):
            dev.pwrite(data, b * 65536)
    benchmark.pedantic(run, setup=setup, rounds=20)


def test_snapshot_of_full_device(benchmark, pool):
    names = iter(range(10 ** 6))
    benchmark(lambda: pool.snapshot("base", f"snap{next(names)}"))


def test_commit_one_change(benchmark, pool):
    dev, data = pool.device("base"), os.urandom(4096)
    benchmark(lambda: (dev.discard(0, 65536), dev.pwrite(data, 0), pool.commit()))
