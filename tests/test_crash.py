"""Crash safety: SIGKILL of a real process, and simulated power cuts.

COWBLOCK_CRASH_ITERATIONS sets how many SIGKILLs the kill test makes (CI
runs a few dozen; `make torture` thousands).
"""
import contextlib
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from cowblock import Pool
from cowblock._native import lib
from crashlib import BS, generate, parse_log, run_op, verify
from helpers import pattern

HERE = os.path.dirname(os.path.abspath(__file__))
KILLS = int(os.environ.get("COWBLOCK_CRASH_ITERATIONS", "20"))
POWER_WORKLOADS = int(os.environ.get("COWBLOCK_POWER_WORKLOADS", "2"))


def test_sigkill_at_random_moments(tmp_path):
    rng = random.Random(1234)
    survived = 0
    for it in range(KILLS):
        pool_dir, log = tmp_path / f"p{it}", tmp_path / f"log{it}"
        with Pool.create(pool_dir, 2048 * BS, BS, commit_interval=0) as pool:
            initial = pool.stats().transaction_id
        seed = rng.randrange(1 << 30)
        ops = generate(seed, 4000)
        log.write_text("")
        child = subprocess.Popen([sys.executable, os.path.join(HERE, "crash_worker.py"),
                                  str(pool_dir), str(seed), str(len(ops)), str(log)])
        time.sleep(rng.uniform(0.15, 0.9))
        child.send_signal(signal.SIGKILL)
        child.wait()
        started, commits = parse_log(log.read_text())
        with Pool.open(pool_dir, commit_interval=0) as pool:
            verify(pool, ops, started, commits, initial)
        survived += started >= 0
    print(f"{KILLS} SIGKILLs, {survived} of them mid-workload, each reopened and verified")
    assert survived >= KILLS // 2, "the child rarely got going: raise the sleep"


def run_with_power_cut(pool_dir, ops, nth, flags):
    """Run ops until the simulated power cut at I/O number nth; returns the
    log the way the crash worker would have written it."""
    with Pool.create(pool_dir, 2048 * BS, BS, commit_interval=0) as pool:
        initial = pool.stats().transaction_id
    pool = Pool.open(pool_dir, commit_interval=0)
    lib.cb_fault_set(1, nth, flags)
    started, commits = -1, []
    try:
        for i, op in enumerate(ops):
            started = i
            if run_op(pool, op):
                commits.append((i, pool.stats().transaction_id))
    except OSError:
        pass
    finally:
        try:  # still powered off: close() must not get anything to the disk
            pool.close()
        except OSError:
            pass
        counted = lib.cb_fault_set(0, 0, 0)
    return initial, started, commits, counted


POWER_OPS = [("create", "a", 48 * BS), ("write", "a", 5, 1, 3 * BS), ("write", "a", 40000, 2, 5000),
             ("commit",), ("snapshot", "a", "b"), ("write", "a", 100, 3, 512),
             ("write", "b", 8 * BS, 4, 2 * BS), ("discard", "a", 0, 2 * BS), ("commit",),
             ("write", "a", 2 * BS, 5, BS), ("delete", "b"), ("write", "a", 20 * BS, 6, 4 * BS),
             ("commit",)]


def cut_at_every_io(tmp_path, ops, flags, label):
    """Count the I/Os of ops, then cut the power at each in turn, reopen and
    verify; returns the number of cuts."""
    tmp_path.mkdir(exist_ok=True)
    _, _, _, total = run_with_power_cut(tmp_path / "count", ops, 0, 0)
    for nth in range(1, total + 1):
        pool_dir = tmp_path / f"cut{nth}"
        initial, started, commits, _ = run_with_power_cut(pool_dir, ops, nth, flags)
        with Pool.open(pool_dir, commit_interval=0) as pool:
            try:
                verify(pool, ops, started, commits, initial)
            except AssertionError as e:
                raise AssertionError(f"{label}power cut at I/O {nth} of {total}: {e}") from None
        shutil.rmtree(pool_dir)
    return total


CUTS = {"drop-all": 0, "keep-newest": lib.CB_CUT_KEEP_NEWEST, "keep-random": lib.CB_CUT_KEEP_RANDOM,
        "torn": lib.CB_CUT_TEAR, "torn-keep-random": lib.CB_CUT_TEAR | lib.CB_CUT_KEEP_RANDOM}


@pytest.mark.parametrize("cut", list(CUTS))
def test_power_cut_at_every_io(tmp_path, cut):
    """Cut the power at each write and fsync in turn (every I/O the workload
    makes, the commits' included); unsynced writes are lost, or all but the
    newest, or a random half of them (a disk that reordered them), and the
    write the power cut interrupts lands torn, half written.  The pool must
    reopen to a commit at or after the last one that returned, matching the
    model."""
    assert cut_at_every_io(tmp_path, POWER_OPS, CUTS[cut], "") > 20


def test_power_cut_under_concurrent_writers_and_commits(tmp_path):
    """Four threads, each rewriting its own block and committing, as NBD
    clients' FLUSHes do; commits that come while one runs share a round
    (group commit), and ones with only overwrites to make durable run their
    fsyncs side by side.  Cut the power at a random I/O: every value whose
    commit returned must be on the disk after reopening (or a later one)."""
    import threading
    rng = random.Random(77)
    threads = 4
    for run in range(8):
        pool_dir = tmp_path / f"p{run}"
        with Pool.create(pool_dir, 64 * BS, BS, commit_interval=0) as pool:
            dev = pool.create_thin("a", threads * BS)
            for t in range(threads):
                dev.pwrite(pattern(1000 * t, BS), t * BS)
            pool.commit()
        pool = Pool.open(pool_dir, commit_interval=0)
        dev = pool.device("a")
        durable, started = [0] * threads, [0] * threads

        def writer(t):
            try:
                for i in range(1, 400):
                    started[t] = i
                    dev.pwrite(pattern(1000 * t + i, BS), t * BS)
                    if t == 0 and i % 50 == 0:
                        pool.snapshot("a", f"s{i}")   # metadata to commit now and then
                    pool.commit()
                    durable[t] = i
            except OSError:
                pass   # the power is off

        lib.cb_fault_set(1, rng.randrange(200, 2000), 0)
        try:
            workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        finally:
            with contextlib.suppress(OSError):
                pool.close()
            lib.cb_fault_set(0, 0, 0)
        with Pool.open(pool_dir, commit_interval=0) as pool:
            dev = pool.device("a")
            for t in range(threads):
                got = dev.pread(BS, t * BS)
                assert any(got == pattern(1000 * t + i, BS)
                           for i in range(durable[t], started[t] + 1)), \
                    f"run {run}, thread {t}: lost the value of commit {durable[t]}"
            assert pool.check().ok


@pytest.mark.parametrize("cut", ["drop-all", "torn-keep-random"])
def test_power_cut_at_every_io_of_random_workloads(tmp_path, cut):
    """The same, over random workloads of the SIGKILL test
    (COWBLOCK_POWER_WORKLOADS of them; `make torture` runs hundreds)."""
    cuts = 0
    for w in range(POWER_WORKLOADS):
        ops = generate(1000 + w, 40) + [("commit",)]  # close() commits nothing more
        cuts += cut_at_every_io(tmp_path / f"w{w}", ops, CUTS[cut], f"workload {w}, ")
    print(f"{cuts} power cuts ({cut}) over {POWER_WORKLOADS} workloads, each reopened and verified")


# Blocks 0-15 first written in a scattered order, then overwritten whole,
# several at a time: with redirects on, the overwrites go to fresh
# contiguous blocks (dataio.c), some of them shared with a snapshot.
SCATTERED = [3, 9, 0, 14, 6, 11, 1, 15, 7, 4, 12, 2, 10, 5, 13, 8]
REDIRECT_OPS = ([("create", "a", 48 * BS)] +
                [("write", "a", vb * BS, 10 + vb, BS) for vb in SCATTERED] +
                [("commit",), ("write", "a", 0, 50, 8 * BS), ("snapshot", "a", "b"),
                 ("write", "a", 4 * BS, 51, 8 * BS), ("write", "a", 100, 52, 3 * BS),
                 ("commit",), ("write", "b", 9 * BS, 53, 6 * BS), ("delete", "b"),
                 ("write", "a", 0, 54, 16 * BS), ("commit",)])


@pytest.mark.parametrize("cut", ["drop-all", "torn-keep-random"])
def test_power_cut_at_every_io_of_redirected_writes(tmp_path, cut):
    """Scattered overwrites of whole blocks redirected to fresh contiguous
    ones (what pools on RADOS do; here on a local pool through
    cb_fault_redirect_local): a power cut at any I/O leaves the pool at a
    commit at or after the last one that returned, matching the model."""
    _, _, _, in_place = run_with_power_cut(tmp_path / "in-place", REDIRECT_OPS, 0, 0)
    lib.cb_fault_redirect_local(1)
    try:
        _, _, _, redirected = run_with_power_cut(tmp_path / "redirected", REDIRECT_OPS, 0, 0)
        assert redirected < in_place   # (one write a run instead of one a block)
        assert cut_at_every_io(tmp_path, REDIRECT_OPS, CUTS[cut], "redirected, ") > 20
    finally:
        lib.cb_fault_redirect_local(0)


def test_redirects_fall_back_in_place_when_no_run_is_free(tmp_path):
    """A pool too full for a fresh run (runs start at an object's start,
    every 256 blocks of 4 KiB) writes scattered blocks in place instead:
    no error, nothing allocated, the data right."""
    import random
    rng = random.Random(3)
    lib.cb_fault_redirect_local(1)
    try:
        with Pool.create(tmp_path / "p", 300 * BS, BS, commit_interval=0) as pool:
            d = pool.create_thin("d", 280 * BS)
            for vb in rng.sample(range(280), 280):
                d.pwrite(pattern(vb, BS), vb * BS)
            pool.commit()
            used = pool.stats().data_used
            # in place: a write a scattered block, not one for a run
            assert _ios(lambda: d.pwrite(pattern(999, 64 * BS), 8 * BS)) > 32
            pool.commit()
            assert pool.stats().data_used == used
            assert d.pread(64 * BS, 8 * BS) == pattern(999, 64 * BS)
            assert pool.check().ok
    finally:
        lib.cb_fault_redirect_local(0)


def test_torn_superblock_write_is_all_or_nothing(tmp_path):
    """The superblock write is the commit point.  Torn in half, it holds the
    new first half (everything that changes between commits lies there) and
    the old second half: the pool opens at the new commit or, if the halves
    do not agree, at the one before; either way exactly, never in between."""
    pool = Pool.create(tmp_path / "p", 256 * BS, BS, commit_interval=0)
    dev = pool.create_thin("a", 16 * BS)
    dev.pwrite(pattern(1, 2 * BS), 0)
    pool.commit()
    before = pool.stats().transaction_id
    dev.pwrite(pattern(2, BS), 4 * BS)
    # A commit is: data fsync, new blocks, fsync, superblock, fsync.
    lib.cb_fault_set(2, 0, 0)  # count only
    pool.commit()
    ios = lib.cb_fault_set(0, 0, 0)
    assert ios >= 5
    dev.pwrite(pattern(3, BS), 5 * BS)  # the next commit has the same shape
    lib.cb_fault_set(1, ios - 1, lib.CB_CUT_TEAR)  # its superblock write, the one before last
    with pytest.raises(OSError):
        pool.commit()
    pool.close()  # failed: it writes nothing more
    lib.cb_fault_set(0, 0, 0)
    slot = ((before + 2) % 2) * 4096
    raw = (tmp_path / "p" / "metadata").read_bytes()[slot:slot + 4096]
    assert struct.unpack_from("<Q", raw, 64)[0] == before + 2, "the tear missed the superblock"
    with Pool.open(tmp_path / "p", commit_interval=0) as pool:
        txn = pool.stats().transaction_id
        assert txn in (before + 1, before + 2)
        newest = pattern(3, BS) if txn == before + 2 else bytes(BS)
        assert pool.device("a").pread(6 * BS, 0) == (pattern(1, 2 * BS) + bytes(2 * BS)
                                                    + pattern(2, BS) + newest)
        assert pool.check().ok


def run_with_failed_io(pool_dir, log, ops, nth):
    """Run ops in a forked child whose I/O number nth fails with EIO; the
    child stops at the first error without closing the pool, as if it died
    there.  Returns the crash log."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            pool = Pool.open(pool_dir, commit_interval=0)
            lib.cb_fault_set(2, nth, 0)
            for i, op in enumerate(ops):
                os.write(fd, f"S {i}\n".encode())
                if run_op(pool, op):
                    os.write(fd, f"C {i} {pool.stats().transaction_id}\n".encode())
        except OSError:
            os.write(fd, b"F\n")
        except BaseException:  # noqa: B902 - anything else is a failure
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"the child failed at I/O {nth}"
    text = log.read_text()
    return parse_log(text) + ("F" in text.split(),)


def test_failed_io_at_every_point(tmp_path):
    """Fail each write and fsync of the workload in turn (one I/O error, not a
    power cut).  The operation fails with an error, and the pool reopens to a
    commit at or after the last one that returned, matching the model."""
    _, _, _, total = run_with_power_cut(tmp_path / "count", POWER_OPS, 0, 0)
    failed_commits = failures = 0
    for nth in range(1, total + 1):
        pool_dir, log = tmp_path / f"fail{nth}", tmp_path / f"log{nth}"
        with Pool.create(pool_dir, 2048 * BS, BS, commit_interval=0) as pool:
            initial = pool.stats().transaction_id
        started, commits, failed = run_with_failed_io(pool_dir, log, POWER_OPS, nth)
        failures += failed
        # Read-only first: a writable open of a pool flagged needs-check
        # checks it and clears the flag, which is a commit of its own.
        with Pool.open(pool_dir, read_only=True) as pool:
            try:
                verify(pool, POWER_OPS, started, commits, initial)
            except AssertionError as e:
                raise AssertionError(f"failed I/O {nth} of {total}: {e}") from None
            flagged = pool.stats().needs_check
            contents = {d.name: pool.device(d.name).pread(d.size, 0) for d in pool.list()}
        with Pool.open(pool_dir, commit_interval=0) as pool:
            assert not pool.stats().needs_check
            assert {d.name: pool.device(d.name).pread(d.size, 0) for d in pool.list()} == contents
        failed_commits += flagged
    assert failures > total * 3 // 4 and failed_commits > total // 3, \
        f"of {total} I/Os, {failures} failed an operation and {failed_commits} a commit"


def test_failed_fsync_turns_pool_read_only(tmp_path):
    """An fsync that fails is never retried: the pool turns read-only with a
    persistent needs-check flag, and the last commit survives."""
    pool = Pool.create(tmp_path / "p", 256 * BS, BS, commit_interval=0)
    dev = pool.create_thin("a", 16 * BS)
    dev.pwrite(b"x" * BS, 0)
    pool.commit()
    dev.pwrite(b"y" * BS, BS)
    lib.cb_fault_set(2, 1, 0)  # the next I/O fails: the data fsync of the commit
    try:
        with pytest.raises(OSError) as exc:
            pool.commit()
        assert "needs check" in str(exc.value)
    finally:
        lib.cb_fault_set(0, 0, 0)
    assert pool.stats().read_only and pool.stats().needs_check
    with pytest.raises(OSError):
        dev.pwrite(b"z", 0)
    pool.close()
    with Pool.open(tmp_path / "p", read_only=True) as ro:
        assert ro.stats().needs_check
        assert ro.device("a").pread(BS, 0) == b"x" * BS
    # A writable open checks the pool, finds it clean, and clears the flag.
    with Pool.open(tmp_path / "p") as pool:
        assert not pool.stats().needs_check
        assert pool.device("a").pread(BS, 0) == b"x" * BS


def _ios(call):
    """I/O operations (writes and fsyncs of the pool's files) that call makes."""
    lib.cb_fault_set(1, 0, 0)  # power cut at I/O 0: never; only counts
    try:
        call()
    finally:
        counted = lib.cb_fault_set(0, 0, 0)
    return counted


def test_periodic_commit_syncs_new_blocks_and_leaves_overwrites(tmp_path):
    """The periodic commit (cb_pool_checkpoint) makes new mappings durable
    with the data they name, and leaves data overwritten in place to the next
    explicit commit: after only overwrites it makes no I/O at all, where a
    commit fsyncs the data file; a power cut after it keeps what it committed."""
    pool = Pool.create(tmp_path / "p", 64 * BS, BS, commit_interval=0)
    dev = pool.create_thin("a", 8 * BS)
    dev.pwrite(pattern(1, 2 * BS), 0)  # two new blocks
    assert _ios(lambda: lib.cb_pool_checkpoint(pool._h)) >= 3  # data fsync, metadata, superblock
    dev.pwrite(pattern(2, BS), 0)      # in place
    assert _ios(lambda: lib.cb_pool_checkpoint(pool._h)) == 0
    assert _ios(pool.commit) == 1      # the data file's fsync; no metadata changed

    lib.cb_fault_set(1, 2, 0)          # I/O 1: the overwrite; I/O 2 cuts the power
    try:
        dev.pwrite(pattern(3, BS), 0)
        assert lib.cb_pool_checkpoint(pool._h) == 0
        with pytest.raises(OSError):
            dev.pwrite(pattern(4, BS), 4 * BS)  # a new block: its fill is I/O 2
    finally:
        with contextlib.suppress(OSError):
            pool.close()
        lib.cb_fault_set(0, 0, 0)
    with Pool.open(tmp_path / "p", commit_interval=0) as pool:
        dev = pool.device("a")
        assert dev.pread(2 * BS, 0) == pattern(2, BS) + pattern(1, 2 * BS)[BS:]
        assert dev.pread(BS, 4 * BS) == bytes(BS)
