"""Crash safety: SIGKILL of a real process, and simulated power cuts.

COWBLOCK_CRASH_ITERATIONS sets how many SIGKILLs the kill test makes (CI
runs a few dozen; `make torture` thousands).
"""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from cowblock import Pool
from cowblock._native import lib
from crashlib import BS, generate, parse_log, run_op, verify

HERE = os.path.dirname(os.path.abspath(__file__))
KILLS = int(os.environ.get("COWBLOCK_CRASH_ITERATIONS", "30"))


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
    assert survived >= KILLS // 2, "the child rarely got going: raise the sleep"


def run_with_power_cut(pool_dir, ops, nth, keep_last):
    """Run ops until the simulated power cut at I/O number nth; returns the
    log the way the crash worker would have written it."""
    with Pool.create(pool_dir, 2048 * BS, BS, commit_interval=0) as pool:
        initial = pool.stats().transaction_id
    pool = Pool.open(pool_dir, commit_interval=0)
    lib.cb_fault_set(1, nth, 1 if keep_last else 0)
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


@pytest.mark.parametrize("keep_last", [False, True], ids=["drop-all", "keep-newest"])
def test_power_cut_at_every_io(tmp_path, keep_last):
    """Cut the power at each write and fsync in turn (every I/O the workload
    makes, the commits' included); unsynced writes are lost, or all but the
    newest.  The pool must reopen to a commit at or after the last one that
    returned, matching the model."""
    _, _, _, total = run_with_power_cut(tmp_path / "count", POWER_OPS, 0, False)
    assert total > 20
    for nth in range(1, total + 1):
        pool_dir = tmp_path / f"cut{nth}"
        initial, started, commits, _ = run_with_power_cut(pool_dir, POWER_OPS, nth, keep_last)
        with Pool.open(pool_dir, commit_interval=0) as pool:
            try:
                verify(pool, POWER_OPS, started, commits, initial)
            except AssertionError as e:
                raise AssertionError(f"power cut at I/O {nth} of {total}: {e}") from None


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
