"""Crash atomicity of records and devices: a power cut at every I/O of a
workload of atomic sections (every CB_CUT_* flavour), and SIGKILLs of a
process running it.  After each reopen every record names a device that
exists and agrees with it, every device the workload made has its record,
the state is the one after the last section that returned (or the one in
flight), and check() is clean: a key and a device can never disagree, so
the devmapper snapshotter's "already exists" state cannot arise.

COWBLOCK_CRASH_ITERATIONS sets the SIGKILLs, COWBLOCK_POWER_WORKLOADS the
random workloads cut at every I/O (as for tests/test_crash.py).
"""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cowblock import Pool
from cowblock._native import lib
from records_crashlib import BS, generate, parse_log, run_op, verify

HERE = os.path.dirname(os.path.abspath(__file__))
KILLS = int(os.environ.get("COWBLOCK_CRASH_ITERATIONS", "20"))
POWER_WORKLOADS = int(os.environ.get("COWBLOCK_POWER_WORKLOADS", "2"))
CUTS = {"drop-all": 0, "keep-newest": lib.CB_CUT_KEEP_NEWEST, "keep-random": lib.CB_CUT_KEEP_RANDOM,
        "torn": lib.CB_CUT_TEAR, "torn-keep-random": lib.CB_CUT_TEAR | lib.CB_CUT_KEEP_RANDOM}
# Every kind of section, a deferred removal reclaimed, records inline and in blocks.
FIXED_OPS = [("make", "c1", "default/1/snapshot 1", 9000), ("write", "c1", 100, 1),
             ("snapshot", "c1", "c2", "default/2/snapshot 2", 0),
             ("label", "c1", "default/1/snapshot 1", 3, 2000), ("commit",),
             ("remove", "c1", "default/1/snapshot 1"), ("make", "c3", "default/3/snapshot 3", 100),
             ("reclaim",), ("label", "c2", "default/2/snapshot 2", 8, 9000),
             ("remove", "c2", "default/2/snapshot 2")]


def new_pool(pool_dir):
    Pool.create(pool_dir, 1024 * BS, BS, commit_interval=0, _node_capacity=4).close()


def run_with_power_cut(pool_dir, ops, nth, flags):
    """Run ops until the power cut at I/O number nth; returns (started,
    committed, I/Os counted) as the worker's log would say."""
    new_pool(pool_dir)
    pool = Pool.open(pool_dir, commit_interval=0, background_reclaim=False)
    lib.cb_fault_set(1, nth, flags)
    started = committed = -1
    try:
        for i, op in enumerate(ops):
            started = i
            if run_op(pool, op):
                committed = i
    except OSError:
        pass
    finally:
        try:  # still powered off: close() must not get anything to the disk
            pool.close()
        except OSError:
            pass
        counted = lib.cb_fault_set(0, 0, 0)
    return started, committed, counted


def cut_at_every_io(tmp_path, ops, flags, label):
    tmp_path.mkdir(exist_ok=True)
    _, _, total = run_with_power_cut(tmp_path / "count", ops, 0, 0)
    for nth in range(1, total + 1):
        pool_dir = tmp_path / f"cut{nth}"
        started, committed, _ = run_with_power_cut(pool_dir, ops, nth, flags)
        with Pool.open(pool_dir, commit_interval=0, background_reclaim=False) as pool:
            try:
                verify(pool, ops, started, committed)
            except AssertionError as e:
                raise AssertionError(f"{label}power cut at I/O {nth} of {total}: {e}") from None
        shutil.rmtree(pool_dir)
    return total


@pytest.mark.parametrize("cut", list(CUTS))
def test_power_cut_at_every_io_keeps_records_and_devices_together(tmp_path, cut):
    assert cut_at_every_io(tmp_path, FIXED_OPS, CUTS[cut], "") > 40


@pytest.mark.parametrize("cut", ["drop-all", "torn-keep-random"])
def test_power_cut_at_every_io_of_random_section_workloads(tmp_path, cut):
    cuts = 0
    for w in range(POWER_WORKLOADS):
        ops = generate(2000 + w, 24)
        cuts += cut_at_every_io(tmp_path / f"w{w}", ops, CUTS[cut], f"workload {w}, ")
    print(f"{cuts} power cuts ({cut}) over {POWER_WORKLOADS} section workloads, each verified")


def test_sigkill_at_random_moments_keeps_records_and_devices_together(tmp_path):
    rng = random.Random(4321)
    mid = 0
    for it in range(KILLS):
        pool_dir, log = tmp_path / f"p{it}", tmp_path / f"log{it}"
        new_pool(pool_dir)
        seed = rng.randrange(1 << 30)
        ops = generate(seed, 3000)
        log.write_text("")
        child = subprocess.Popen([sys.executable, os.path.join(HERE, "records_crash_worker.py"),
                                  str(pool_dir), str(seed), str(len(ops)), str(log)])
        time.sleep(rng.uniform(0.2, 1.0))
        child.send_signal(signal.SIGKILL)
        child.wait()
        started, committed = parse_log(log.read_text())
        with Pool.open(pool_dir, commit_interval=0, background_reclaim=False) as pool:
            try:
                verify(pool, ops, started, committed)
            except AssertionError as e:
                raise AssertionError(f"kill {it} (seed {seed}) at operation {started}: {e}") \
                    from None
        mid += committed > 5
        shutil.rmtree(pool_dir)
    print(f"{KILLS} SIGKILLs, {mid} of them after several sections, each reopened and verified")
    assert mid >= KILLS // 2, "the child rarely got going: raise the sleep"
