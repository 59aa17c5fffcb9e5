"""Atomic sections (pool.atomic(), csrc/txn.c): no commit falls inside one,
every other commit waits for it and does not starve, a failed body is
undone, and what cannot be undone fails the pool rather than commit half."""
import os
import struct
import threading
import time

import pytest

from cowblock import (InvalidArgumentError, NoSpaceError, Pool, PoolIOError, ReadOnlyError,
                      format)
from cowblock._native import check, lib
from cowblock.nbd.server import NBDServer
from nbdclient import CMD_FLUSH, CMD_WRITE, Client

BS = 4096


@pytest.fixture
def pool(tmp_path):
    p = Pool.create(tmp_path / "p", 512 * BS, BS, commit_interval=0)
    p.create_thin("base", 16 * BS).pwrite(b"base", 0)
    p.put_record("dev/base", b"base")
    yield p
    if p._h is not None:
        if not p.stats().read_only:
            assert p.check().ok
        p.close()


def on_disk_txn(pool):
    with open(os.path.join(pool.path, "metadata"), "rb") as f:
        return format.Commit(f.read()).txn


def state(pool):
    return ({d.name: (d.read_only, d.labels) for d in pool.list()},
            [tuple(r) for r in pool.records()])


class Waiter(threading.Thread):
    """Runs fn in a thread; .done says whether it has returned."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.done, self.error, self.at = fn, threading.Event(), None, None
        self.start()

    def run(self):
        try:
            self.fn()
        except BaseException as e:  # noqa: B902 - reported by the test
            self.error = e
        self.at = time.monotonic()
        self.done.set()


def test_no_commit_falls_inside_a_section(tmp_path):
    pool = Pool.create(tmp_path / "p", 512 * BS, BS, commit_interval=0.01)   # a busy committer
    txn = on_disk_txn(pool)
    with pool.atomic():
        pool.create_thin("a", 16 * BS)
        time.sleep(0.1)
        pool.put_record("dev/a", b"a")
        pool.snapshot("a", "b")
        time.sleep(0.1)
        pool.put_record("dev/b", b"b")
        assert on_disk_txn(pool) == txn
    assert on_disk_txn(pool) == txn + 1
    assert pool.check().ok
    pool.close()


def test_commits_of_other_threads_wait_for_the_section(pool):
    txn = on_disk_txn(pool)
    dev = pool.device("base")
    with pool.atomic():
        pool.put_record("a", b"1")
        waiters = [Waiter(pool.commit), Waiter(dev.flush),
                   Waiter(lambda: pool.set_read_only("base", True)),   # waits in C
                   Waiter(lambda: pool.create_thin("other", 16 * BS)),  # waits in Python
                   Waiter(lambda: pool.put_record("b", b"2"))]
        time.sleep(0.3)
        assert not any(w.done.is_set() for w in waiters)
        assert on_disk_txn(pool) == txn
        pool.put_record("c", b"3")
        ended = time.monotonic()
    for w in waiters:
        assert w.done.wait(10) and w.error is None and w.at >= ended
    assert pool.get_record("b") == b"2" and pool.info("base").read_only
    pool.close()
    with Pool.open(pool.path, read_only=True) as again:
        assert [r.key for r in again.records()] == [b"a", b"b", b"c", b"dev/base"]
        assert "other" in again and again.info("base").read_only


def test_an_nbd_flush_waits_for_the_section(pool, tmp_path):
    server = NBDServer(pool, socket_path=str(tmp_path / "s.sock"), workers=2)
    server.start()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    c = Client(str(tmp_path / "s.sock"))
    c.go("base", structured=False)
    try:
        assert c.call(CMD_WRITE, 0, 4, b"nbd!") == 0
        txn = on_disk_txn(pool)
        with pool.atomic():
            pool.put_record("during", b"flush")
            flush = Waiter(lambda: c.call(CMD_FLUSH))
            time.sleep(0.3)
            assert not flush.done.is_set() and on_disk_txn(pool) == txn
        assert flush.done.wait(10) and flush.error is None
        assert on_disk_txn(pool) > txn
    finally:
        c.close()
        server._stop.set()
        t.join()
        server.stop()


def test_a_waiting_commit_holds_new_sections_back(pool):
    """No starvation (in C, where nothing else serialises the threads): once
    a commit waits, a section that begins after it waits for that commit."""
    h = pool._h
    entered, release = threading.Event(), threading.Event()

    def long_section():
        assert lib.cb_pool_txn_begin(h) == 0
        assert lib.cb_rec_put(h, b"first", 5, b"1", 1) == 0
        entered.set()
        release.wait(10)
        assert lib.cb_pool_txn_end(h, 0) == 0
    a = Waiter(long_section)
    assert entered.wait(10)
    commit = Waiter(lambda: check(lib.cb_pool_commit(h)))
    assert not commit.done.wait(0.3)                 # it waits for the section

    def later_section():
        assert lib.cb_pool_txn_begin(h) == 0
        assert lib.cb_rec_put(h, b"later", 5, b"2", 1) == 0
        assert lib.cb_pool_txn_end(h, lib.CB_TXN_COMMIT) == 0
    later = Waiter(later_section)
    assert not later.done.wait(0.3)                  # it waits for the commit
    release.set()
    for w in (a, commit, later):
        assert w.done.wait(10) and w.error is None
    assert commit.at <= later.at
    assert pool.get_record("first") == b"1" and pool.get_record("later") == b"2"


def test_sections_of_two_threads_commit_once_each(pool):
    barrier = threading.Barrier(2)

    def section(n):
        barrier.wait()
        for i in range(20):
            with pool.atomic():
                pool.create_thin(f"t{n}-{i}", 16 * BS)
                pool.put_record(f"dev/t{n}-{i}", b"%d" % i)
    ws = [Waiter(lambda n=n: section(n)) for n in range(2)]
    for w in ws:
        assert w.done.wait(60) and w.error is None
    names = {d.name for d in pool.list()}
    assert {r.key.decode()[4:] for r in pool.records()} == names


@pytest.mark.parametrize("step", ["create", "snapshot", "rename", "labels", "read-only",
                                  "delete", "put", "replace", "delete-record", "everything"])
def test_a_failed_section_is_undone(pool, step):
    pool.create_thin("x", 16 * BS).pwrite(b"x data", 0)
    pool.put_record("dev/x", b"x")
    before, txn = state(pool), on_disk_txn(pool)
    steps = {
        "create": lambda: pool.create_thin("new", 16 * BS),
        "snapshot": lambda: pool.snapshot("x", "snap", read_only=True),
        "rename": lambda: pool.rename("x", "y"),
        "labels": lambda: pool.set_labels("x", {"k": "v"}),
        "read-only": lambda: pool.set_read_only("x", True),
        "delete": lambda: pool.delete("x"),
        "put": lambda: pool.put_record("new record", os.urandom(9000)),
        "replace": lambda: pool.put_record("dev/x", b"other"),
        "delete-record": lambda: pool.delete_record("dev/x"),
    }
    everything = ["create", "snapshot", "labels", "read-only", "put", "replace", "delete-record",
                  "rename"]
    chosen = [steps[s] for s in everything] + [lambda: pool.delete("y", "snap")] \
        if step == "everything" else [steps[step]]
    with pytest.raises(RuntimeError):
        with pool.atomic():
            for fn in chosen:
                fn()
            raise RuntimeError("the body failed")
    assert state(pool) == before
    assert pool.device("x").pread(6, 0) == b"x data"
    assert on_disk_txn(pool) == txn
    pool.commit()
    pool.close()
    with Pool.open(pool.path, commit_interval=0) as again:
        assert state(again) == before and again.check().ok


def test_a_delete_in_a_section_is_reclaimed_after_it(pool):
    pool.create_thin("x", 64 * BS).pwrite(os.urandom(40 * BS), 0)
    used = pool.stats().data_used
    with pool.atomic():
        pool.delete("x")
        pool.delete_record("dev/base")
        assert "x" not in pool and pool.pending_removals() == 0
    assert pool.wait_reclaimed(10) and pool.pending_removals() == 0
    assert pool.stats().data_used == used - 40
    pool.create_thin("x", 16 * BS)                # the name is free again


def test_nested_sections(pool):
    txn = on_disk_txn(pool)
    with pool.atomic():
        pool.put_record("outer", b"1")
        with pool.atomic():
            pool.put_record("inner", b"2")
        assert on_disk_txn(pool) == txn            # the inner end does not commit
        with pytest.raises(KeyError):
            with pool.atomic():
                pool.put_record("undone", b"3")
                raise KeyError("inner fails")
        assert pool.get_record("undone") is None and pool.get_record("inner") == b"2"
    assert on_disk_txn(pool) == txn + 1
    with pytest.raises(ValueError):
        with pool.atomic():
            with pool.atomic():
                pool.put_record("inner2", b"4")
            pool.put_record("outer2", b"5")
            raise ValueError("the outer one fails")
    assert pool.get_record("inner2") is None and pool.get_record("outer2") is None


def test_commit_false_leaves_it_to_the_next_commit(pool):
    txn = on_disk_txn(pool)
    with pool.atomic(commit=False):
        pool.put_record("k", b"v")
    assert on_disk_txn(pool) == txn and pool.stats().read_only is False
    assert pool.commit() == txn + 1


def test_what_needs_a_commit_of_its_own_is_refused_inside(pool):
    with pool.atomic():
        pool.put_record("k", b"v")
        for call, words in [(pool.commit, "commit"), (pool.check, "check"),
                            (pool.trim, "trim"), (pool.device("base").flush, "commit"),
                            (pool.close, "inside an atomic section")]:
            with pytest.raises(InvalidArgumentError, match=words):
                call()
        pool.put_record("still", b"works")
    assert pool.get_record("still") == b"works"


def test_a_section_needs_a_writable_pool(pool):
    pool.close()
    with Pool.open(pool.path, read_only=True) as ro:
        with pytest.raises(ReadOnlyError):
            with ro.atomic():
                pass


def test_an_undo_that_fails_fails_the_pool_instead_of_committing_half(pool):
    txn = on_disk_txn(pool)
    with pytest.raises(RuntimeError):
        with pool.atomic():
            pool.create_thin("half", 16 * BS)
            pool.put_record("dev/half", b"half")
            pool._section_journal().undo.append(lambda: 1 / 0)   # an undo step that fails
            raise RuntimeError("the body failed")
    stats = pool.stats()
    assert stats.read_only and stats.needs_check
    with pytest.raises(PoolIOError):
        pool.put_record("more", b"x")
    assert on_disk_txn(pool) == txn
    pool.close()
    with Pool.open(pool.path, commit_interval=0) as again:
        assert "half" not in again and again.get_record("dev/half") is None
        assert again.check().ok and not again.stats().needs_check


def test_a_write_needing_freed_blocks_gets_enospc_inside_a_section(tmp_path):
    """Outside a section a full pool commits to recycle what the transaction
    freed; inside one it cannot, and says so with ENOSPC."""
    pool = Pool.create(tmp_path / "p", 16 * BS, BS, commit_interval=0)
    pool.create_thin("b", 16 * BS)
    pool.create_thin("a", 16 * BS).pwrite(b"a" * 16 * BS, 0)
    pool.commit()
    pool.device("a").discard(0, 16 * BS)        # freed in the running transaction
    with pool.atomic():
        with pytest.raises(NoSpaceError):
            pool.device("b").pwrite(b"b" * BS, 0)
    pool.device("b").pwrite(b"b" * BS, 0)      # outside, the commit makes room
    assert pool.check().ok
    pool.close()


def test_c_sections_nest_and_end_once(pool):
    h = pool._h
    assert lib.cb_pool_txn_depth(h) == 0
    assert lib.cb_pool_txn_end(h, 0) < 0                       # none open
    assert lib.cb_pool_txn_begin(h) == 0 and lib.cb_pool_txn_begin(h) == 0
    assert lib.cb_pool_txn_depth(h) == 2
    key = b"c"
    assert lib.cb_rec_put(h, key, 1, b"v", 1) == 0
    assert lib.cb_pool_txn_end(h, lib.CB_TXN_COMMIT) == 0      # inner: no commit
    txn = on_disk_txn(pool)
    assert lib.cb_pool_txn_end(h, lib.CB_TXN_COMMIT) == 0
    assert on_disk_txn(pool) == txn + 1 and lib.cb_pool_txn_depth(h) == 0
    assert struct.unpack("<I", struct.pack("<I", lib.CB_TXN_FAIL))[0] == 2
