"""Threads: writes to different devices and to one device at once, readers
of a snapshot while its origin changes, background commits, and the
snapshot's point-in-time rule checked against the clock.

The C calls release the GIL, so these threads really run in parallel in
the engine.  Every pool is checked clean at the end.
"""
import bisect
import random
import struct
import threading
import time

import pytest

import uffd
from cowblock import NoSpaceError, Pool
from helpers import pattern

SLOT = 4096


def run_threads(targets):
    """Run the callables in threads at once; re-raise the first failure."""
    errors = []
    barrier = threading.Barrier(len(targets))

    def wrap(fn):
        try:
            barrier.wait()
            fn()
        except BaseException as e:  # noqa: B902 - reported below
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a thread hung"
    if errors:
        raise errors[0]


def assert_clean(pool):
    report = pool.check()
    assert report.ok, str(report)


# ---------------------------------------------------------------- many writers

def test_threads_writing_different_devices(pool, block_size):
    bs = block_size
    n = 4
    size = 24 * bs + 4096
    devs = [pool.create_thin(f"d{i}", size) for i in range(n)]
    models = [bytearray(size) for _ in range(n)]
    # half of each device is written and shared with a snapshot first
    for i, d in enumerate(devs):
        d.pwrite(pattern(100 + i, 12 * bs), 0)
        models[i][:12 * bs] = pattern(100 + i, 12 * bs)
        pool.snapshot(d.name, f"s{i}")
    snaps = [bytes(m) for m in models]

    def writer(i):
        rng = random.Random(i)
        dev, model = devs[i], models[i]

        def go():
            for k in range(150):
                length = rng.randint(1, min(3 * bs, 200000))  # spans blocks at 4K and 64K
                off = rng.randrange(size - length + 1)
                data = pattern(i * 1000 + k, length)
                dev.pwrite(data, off)
                model[off:off + length] = data
                if k % 10 == 0:
                    assert dev.pread(length, off) == data
        return go

    run_threads([writer(i) for i in range(n)])
    for i in range(n):
        assert devs[i].pread(size, 0) == bytes(models[i]), f"device d{i}"
        assert pool.device(f"s{i}").pread(size, 0) == snaps[i], f"snapshot s{i}"
    assert_clean(pool)


def test_threads_writing_one_device_in_disjoint_ranges(pool, block_size):
    """Pieces of 1000 bytes dealt round-robin to 4 threads: every block is
    written by several threads at once, in unmapped, shared and exclusive
    blocks alike."""
    bs = block_size
    n, piece = 4, max(1000, bs // 12 + 5)  # at least 4 pieces in each block
    blocks = 16
    size = blocks * bs
    dev = pool.create_thin("a", size)
    base = pattern(7, size // 2)
    dev.pwrite(base, 0)  # the first half mapped (and shared below), the rest holes
    snap = pool.snapshot("a", "s")
    model = bytearray(size)
    model[:size // 2] = base
    pieces = [(off, min(piece, size - off)) for off in range(0, size, piece)]

    def writer(t):
        mine = [p for j, p in enumerate(pieces) if j % n == t]
        rng = random.Random(t)

        def go():
            for rnd in range(5):
                order = list(mine)
                rng.shuffle(order)
                for off, length in order:
                    data = pattern(t * 7 + rnd, length)
                    dev.pwrite(data, off)
                    if rnd == 4:
                        model[off:off + length] = data
        return go

    run_threads([writer(t) for t in range(n)])
    got = dev.pread(size, 0)
    if got != bytes(model):
        first = next(i for i in range(size) if got[i] != model[i])
        raise AssertionError(f"first difference at byte {first} (block {first // bs})")
    assert snap.pread(size, 0) == base + bytes(size - size // 2)
    assert dev.info().mapped_blocks == blocks
    assert_clean(pool)


def test_readers_of_a_snapshot_while_its_origin_changes(pool, block_size):
    bs = block_size
    size = 16 * bs
    dev = pool.create_thin("a", size)
    frozen = pattern(3, size)
    dev.pwrite(frozen, 0)
    snap = pool.snapshot("a", "s", read_only=True)
    stop = threading.Event()
    reads = [0]

    def reader():
        rng = random.Random(5)
        while not stop.is_set():
            length = rng.randint(1, 2 * bs)
            off = rng.randrange(size - length + 1)
            assert snap.pread(length, off) == frozen[off:off + length]
            reads[0] += 1

    def writer():
        try:
            rng = random.Random(6)
            for k in range(300):
                length = rng.randint(1, bs)
                off = rng.randrange(size - length + 1)
                dev.pwrite(pattern(k, length), off)
                if k % 50 == 0:
                    dev.discard(rng.randrange(16) * bs, bs)
        finally:
            stop.set()

    run_threads([reader, reader, writer])
    assert reads[0] > 0
    assert snap.pread(size, 0) == frozen
    assert_clean(pool)


# ---------------------------------------------------------------- point in time

class SeqWriter:
    """Writes increasing sequence numbers into successive 4 KiB slots of a
    device, wrapping around, and records (slot, seq, start, end) with
    time.monotonic_ns() around each pwrite."""

    def __init__(self, dev, first_seq):
        self.dev = dev
        self.slots = dev.size // SLOT
        self.seq = first_seq
        self.log = []
        self.stop = threading.Event()

    @staticmethod
    def payload(seq):
        return struct.pack("<Q", seq) * (SLOT // 8)

    def run(self):
        slot = 0
        while not self.stop.is_set():
            self.seq += 1
            data = self.payload(self.seq)
            start = time.monotonic_ns()
            self.dev.pwrite(data, slot * SLOT)
            end = time.monotonic_ns()
            self.log.append((slot, self.seq, start, end))
            slot = (slot + 1) % self.slots

    def _index(self):
        """Per slot: its writes in time order, and their end times."""
        if getattr(self, "_by_slot", None) is None or self._indexed != len(self.log):
            by_slot = {}
            for slot, seq, start, end in self.log:
                by_slot.setdefault(slot, []).append((seq, start, end))
            self._by_slot = {k: (v, [e for _, _, e in v]) for k, v in by_slot.items()}
            self._indexed = len(self.log)
        return self._by_slot

    def check_snapshot(self, snap, s_start, s_end):
        """Every write that ended before the snapshot began is in it, no
        write that began after it returned is."""
        image = snap.pread(snap.size, 0)
        by_slot = self._index()
        checked = 0
        for slot in range(self.slots):
            raw = image[slot * SLOT:(slot + 1) * SLOT]
            value = struct.unpack_from("<Q", raw)[0]
            assert raw == self.payload(value), f"slot {slot} of {snap.name} is torn"
            writes, ends = by_slot.get(slot, ([], []))
            i = bisect.bisect_left(ends, s_start)  # writes[:i] ended before the snapshot
            allowed = {writes[i - 1][0] if i else 0}
            while i < len(writes) and writes[i][1] <= s_end:  # overlapping the call
                allowed.add(writes[i][0])
                i += 1
            if value not in allowed:
                later = {seq for seq, start, end in writes if start > s_end}
                what = ("a write that began after the snapshot returned" if value in later
                        else "not the last write completed before the snapshot")
                raise AssertionError(
                    f"{snap.name} slot {slot} holds seq {value}: {what}; allowed {sorted(allowed)}")
            checked += 1
        return checked


@pytest.mark.parametrize("writers", [1, 2])
@pytest.mark.parametrize("block_size", [4096, 65536, 1 << 20], ids=["4K", "64K", "1M"])
def test_snapshot_is_a_point_in_time(tmp_path, block_size, writers):
    bs = block_size
    data_blocks = max(64, (64 << 20) // bs)
    with Pool.create(tmp_path / "p", data_blocks * bs, bs, commit_interval=0) as pool:
        ws = []
        for w in range(writers):
            dev = pool.create_thin(f"w{w}", 256 * SLOT)  # 1 MiB: 256 slots
            ws.append(SeqWriter(dev, first_seq=w << 40))
        snaps = []  # (writer, snapshot, start, end)

        def snapshotter():
            try:
                time.sleep(0.02)
                for k in range(16):
                    w = ws[k % writers]
                    name = f"{w.dev.name}-snap{k}"
                    start = time.monotonic_ns()
                    snap = pool.snapshot(w.dev.name, name, read_only=True)
                    end = time.monotonic_ns()
                    snaps.append((w, snap, start, end))
                    time.sleep(0.01 + 0.005 * (k % 3))
            finally:
                for w in ws:
                    w.stop.set()

        run_threads([w.run for w in ws] + [snapshotter])
        for w in ws:
            assert len(w.log) > w.slots, "the writer did not wrap around: test too short"
        for w, snap, start, end in snaps:
            assert w.check_snapshot(snap, start, end) == w.slots
        # the snapshots are frozen: the writers went on, they did not change
        for w, snap, start, end in snaps[:3]:
            assert w.check_snapshot(snap, start, end) == w.slots
        # and the check has teeth: the first snapshot is not the last one
        w, first, _, _ = snaps[0]
        _, _, last_start, last_end = [x for x in snaps if x[0] is w][-1]
        with pytest.raises(AssertionError, match="not the last write completed"):
            w.check_snapshot(first, last_start, last_end)
        assert_clean(pool)


# ---------------------------------------------------------------- background commits

def test_background_commits_during_writes_and_snapshots(tmp_path):
    bs = 65536
    path = tmp_path / "p"
    pool = Pool.create(path, 512 * bs, bs, commit_interval=0.005)
    n = 3
    size = 32 * bs
    devs = [pool.create_thin(f"d{i}", size) for i in range(n)]
    models = [bytearray(size) for _ in range(n)]
    snaps = {}

    def writer(i):
        rng = random.Random(40 + i)

        def go():
            for k in range(120):
                length = rng.randint(1, 2 * bs)
                off = rng.randrange(size - length + 1)
                data = pattern(i * 500 + k, length)
                devs[i].pwrite(data, off)
                models[i][off:off + length] = data
                if k == 60:
                    name = f"d{i}-mid"
                    pool.snapshot(devs[i].name, name)
                    snaps[name] = bytes(models[i])
                if k % 40 == 0:
                    devs[i].flush()
        return go

    def committer():
        for _ in range(30):
            pool.commit()
            time.sleep(0.002)

    run_threads([writer(i) for i in range(n)] + [committer])
    txn = pool.stats().transaction_id
    assert txn > 10
    for i in range(n):
        assert devs[i].pread(size, 0) == bytes(models[i])
    pool.close()
    with Pool.open(path, commit_interval=0) as pool:
        for i in range(n):
            assert pool.device(f"d{i}").pread(size, 0) == bytes(models[i]), f"d{i}"
        for name, image in snaps.items():
            assert pool.device(name).pread(size, 0) == image, name
        assert_clean(pool)


def test_concurrent_device_management(pool, block_size):
    """Threads creating, snapshotting, renaming and deleting their own
    devices while others write: the catalog stays consistent."""
    bs = block_size
    n = 4

    def worker(t):
        def go():
            dev = pool.create_thin(f"t{t}", 4 * bs)
            for k in range(10):
                dev.pwrite(pattern(t * 100 + k, bs // 2 + k), k * 977 % (3 * bs))
                snap = pool.snapshot(f"t{t}", f"t{t}-s{k}")
                assert snap.pread(4 * bs, 0) == dev.pread(4 * bs, 0)
                if k % 2:
                    pool.rename(f"t{t}-s{k}", f"t{t}-r{k}")
                if k % 3 == 0:
                    pool.delete(f"t{t}-s{k}" if not k % 2 else f"t{t}-r{k}")
        return go

    run_threads([worker(t) for t in range(n)])
    names = sorted(i.name for i in pool.list())
    expect = []
    for t in range(n):
        expect.append(f"t{t}")
        for k in range(10):
            if k % 3 == 0:
                continue
            expect.append(f"t{t}-r{k}" if k % 2 else f"t{t}-s{k}")
    assert names == sorted(expect)
    assert len(set(i.id for i in pool.list())) == len(names)
    assert pool.stats().devices == len(names)
    assert_clean(pool)


def test_list_while_another_thread_creates_and_deletes(tmp_path):
    pool = Pool.create(tmp_path / "p", 64 * 4096, 4096, commit_interval=0)
    for i in range(50):
        pool.create_thin(f"keep{i}", 4096)
    stop = threading.Event()
    seen = []

    def churn():
        i = 0
        while not stop.is_set():
            pool.create_thin(f"tmp{i}", 4096)
            pool.delete(f"tmp{i}")
            i += 1

    def lister():
        deadline = time.monotonic() + 5
        try:
            while time.monotonic() < deadline:
                names = [info.name for info in pool.list()]
                assert sum(n.startswith("keep") for n in names) == 50
                seen.append(len(names))
        finally:
            stop.set()

    try:
        run_threads([churn, lister])
        assert seen
        assert_clean(pool)
    finally:
        pool.close()


@pytest.mark.parametrize("block_size", [4096, 65536], ids=["4K", "64K"])
def test_no_lost_updates_in_shared_blocks_under_snapshots(tmp_path, block_size):
    """Four threads own interleaved pieces of the same blocks and write
    increasing sequence numbers into them while snapshots keep making the
    blocks shared again, so every block is copied on write by several
    threads at once.  A piece must never go back to an older value: not in
    a later snapshot, not in the device at the end."""
    bs = block_size
    n_threads, per_block, blocks = 4, 8, 8
    piece = bs // per_block
    size = blocks * bs
    data_blocks = 8192 if bs == 4096 else 1024
    with Pool.create(tmp_path / "p", data_blocks * bs, bs, commit_interval=0) as pool:
        dev = pool.create_thin("a", size)
        n_pieces = size // piece
        owner = [i % n_threads for i in range(n_pieces)]
        stop = threading.Event()
        rounds = [0] * n_threads
        snaps = []

        def payload(t, seq):
            return struct.pack("<II", t, seq) * (piece // 8)

        def writer(t):
            def go():
                mine = [i for i in range(n_pieces) if owner[i] == t]
                seq = 0
                try:
                    while not stop.is_set():
                        seq += 1
                        for i in mine:
                            dev.pwrite(payload(t, seq), i * piece)
                        rounds[t] = seq
                finally:
                    stop.set()  # a writer that failed must not leave the snapshotter waiting
            return go

        def snapshotter():
            # Paced by the writers, not the clock (a sanitizer build is slow):
            # snapshot k waits until every writer has done k + 2 rounds.
            try:
                for k in range(30):
                    while min(rounds) < k + 2 and not stop.is_set():
                        time.sleep(0.001)
                    snaps.append(pool.snapshot("a", f"s{k}", read_only=True))
            finally:
                stop.set()

        run_threads([writer(t) for t in range(n_threads)] + [snapshotter])
        assert min(rounds) > 30, rounds

        def decode(image, name):
            seqs = []
            for i in range(n_pieces):
                raw = image[i * piece:(i + 1) * piece]
                if raw == bytes(piece):
                    seqs.append(0)
                    continue
                t, seq = struct.unpack_from("<II", raw)
                assert raw == payload(t, seq), f"{name}: piece {i} is torn"
                assert t == owner[i], f"{name}: piece {i} holds thread {t}'s data"
                seqs.append(seq)
            return seqs

        last = [0] * n_pieces
        for snap in snaps:
            seqs = decode(snap.pread(size, 0), snap.name)
            for i, (was, now) in enumerate(zip(last, seqs)):
                assert now >= was, f"{snap.name}: piece {i} went back from seq {was} to {now}"
            last = seqs
        final = decode(dev.pread(size, 0), "a")
        assert final == [rounds[owner[i]] for i in range(n_pieces)]
        assert_clean(pool)


def test_a_reader_stuck_in_a_page_fault_stalls_no_other_device(tmp_path):
    """A read copies without the pool lock: while one thread is stuck in a
    page fault inside a read of device a, another device allocates, is
    snapshotted, committed, read and grown; and the blocks a discard freed
    under the stuck reader are not handed out until it is done, so it still
    gets a's data, never another device's."""
    why = uffd.unavailable()
    if why:
        pytest.skip(why)
    bs = 4096
    pool = Pool.create(tmp_path / "p", 24 * bs, bs, commit_interval=0)
    a = pool.create_thin("a", 4 * bs)
    a.pwrite(pattern(1, 4 * bs), 0)
    b = pool.create_thin("b", 64 * bs)
    pool.commit()
    stall = uffd.StallingBuffer(4 * bs)
    got = {}

    def read_a():
        a.readinto(stall.map, 0)
        got["a"] = bytes(stall.map)

    reader = threading.Thread(target=read_a)
    reader.start()
    try:
        assert stall.wait_for_fault(10), "the reader never reached the buffer"
        free = pool.stats().data_blocks - pool.stats().data_used
        done = {}

        def other_devices():
            a.discard(0, 4 * bs)              # frees a's blocks under the reader
            pool.commit()
            for i in range(free):             # every block free before the discard
                b.pwrite(pattern(100 + i, bs), i * bs)
            pool.snapshot("b", "b-snap")
            pool.commit()
            done["read"] = b.pread(bs, 0)
            try:
                b.pwrite(pattern(999, bs), free * bs)   # would need a's old blocks
            except NoSpaceError:
                done["held"] = True
            pool.resize(32 * bs)                  # remaps the data file under the reader
            b.pwrite(pattern(998, bs), (free + 1) * bs)
            done["grown"] = b.pread(bs, (free + 1) * bs) == pattern(998, bs)

        worker = threading.Thread(target=other_devices)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "another device stalled behind the stuck reader"
        assert reader.is_alive(), "the reader was not stuck after all"
        assert done == {"read": pattern(100, bs), "held": True, "grown": True}
    finally:
        stall.release()
        reader.join(30)
    assert got["a"] == pattern(1, 4 * bs)
    b.pwrite(pattern(999, bs), free * bs)  # the reader is done: its blocks are free again
    assert b.pread(bs, free * bs) == pattern(999, bs)
    assert pool.check().ok
    pool.close()


def test_reclaim_from_threads_while_the_background_reclaims(tmp_path):
    """pool.reclaim() called from several threads while the background
    thread reclaims deferred removals: each removal is finished once, none
    is skipped, nothing raises (the list's head was taken twice before)."""
    pool = Pool.create(tmp_path / "p", 64 << 20, 4096, commit_interval=0)
    for round_ in range(5):
        names = [f"d{round_}-{i}" for i in range(12)]
        for name in names:
            pool.create_thin(name, 1 << 20).pwrite(pattern(round_, 256 << 10), 0)
        pool.delete(*names, deferred=True)
        run_threads([pool.reclaim] * 4)
        assert pool.wait_reclaimed(30)
        assert pool.pending_removals() == 0
    assert pool.stats().data_used == 0
    assert_clean(pool)
    pool.close()
