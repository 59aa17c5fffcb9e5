"""The pool lock: one writer or any number of readers, across processes and
within one; a refused opener is told who holds the pool; a killed holder
leaves nothing behind."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest

from cowblock import Pool, PoolLockedError

HOLDER = r"""
import sys, time
from cowblock import Pool
path, mode, hold, linger = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
pool = Pool.open(path, read_only=(mode == "r"), commit_interval=0)
if mode == "w":
    pool.device("a").pwrite(b"written by the holder", 4096)
    pool.commit()
print("ready", flush=True)
if hold == "stdin":
    sys.stdin.readline()
else:
    time.sleep(float(hold))
pool.close()
print("closed", flush=True)
time.sleep(linger)
"""


@pytest.fixture
def pool_path(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 64 * 4096, 4096, commit_interval=0) as p:
        p.create_thin("a", 16 * 4096).pwrite(b"initial", 0)
    return path


@pytest.fixture
def holder(pool_path):
    """holder(mode, hold="stdin", linger=0): a process holding the pool open
    ("w" or "r") until told on stdin (or for hold seconds), then lingering."""
    procs = []

    def start(mode, hold="stdin", linger=0.0):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(pool_path), mode, str(hold),
                              str(linger)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        line = p.stdout.readline()
        assert line == "ready\n", f"holder did not start: {line!r} {p.stderr.read()}"
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()


def release(proc):
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline() == "closed\n"


def test_second_writer_in_another_process(pool_path, holder):
    child = holder("w")
    for attempt in range(2):
        with pytest.raises(PoolLockedError) as exc:
            Pool.open(pool_path)
        msg = str(exc.value)
        assert f"process {child.pid}" in msg, msg
        assert str(pool_path) in msg
        assert exc.value.errno == errno.EAGAIN
        assert isinstance(exc.value, OSError)
        assert "timeout" in exc.value.hint
    # the writer wrote who it is into the lock file
    with open(pool_path / "lock") as f:
        assert f.read() == f"pid={child.pid}\n"
    release(child)
    with Pool.open(pool_path, commit_interval=0) as pool:
        assert pool.device("a").pread(21, 4096) == b"written by the holder"


def test_reader_refused_while_a_writer_holds_it(pool_path, holder):
    child = holder("w")
    with pytest.raises(PoolLockedError) as exc:
        Pool.open(pool_path, read_only=True)
    assert f"process {child.pid}" in str(exc.value)
    release(child)
    with Pool.open(pool_path, read_only=True) as pool:
        assert pool.device("a").pread(7, 0) == b"initial"


@pytest.mark.parametrize("timeout", [2, None])
def test_open_with_timeout_waits_for_the_holder(pool_path, holder, timeout):
    child = holder("w", hold=0.5, linger=3)
    t0 = time.monotonic()
    with Pool.open(pool_path, timeout=timeout, commit_interval=0) as pool:
        waited = time.monotonic() - t0
        assert child.poll() is None  # released by close(), not by the process ending
        assert pool.device("a").pread(21, 4096) == b"written by the holder"
    assert 0.2 < waited < 2.0, waited


def test_open_with_too_short_a_timeout(pool_path, holder):
    child = holder("w")
    t0 = time.monotonic()
    with pytest.raises(PoolLockedError) as exc:
        Pool.open(pool_path, timeout=0.3)
    waited = time.monotonic() - t0
    assert 0.25 <= waited < 2.0, waited
    assert "after waiting 0.3 s" in str(exc.value)
    assert f"process {child.pid}" in str(exc.value)


def test_killed_holder_leaves_no_lock(pool_path, holder):
    child = holder("w")
    with pytest.raises(PoolLockedError):
        Pool.open(pool_path)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    with Pool.open(pool_path, commit_interval=0) as pool:  # at once, no timeout
        assert pool.device("a").pread(21, 4096) == b"written by the holder"
        assert pool.check().ok
    child2 = holder("r")
    child2.send_signal(signal.SIGKILL)
    child2.wait()
    with Pool.open(pool_path, commit_interval=0) as pool:
        assert pool.device("a").pread(7, 0) == b"initial"


def test_readers_coexist_but_exclude_a_writer(pool_path, holder):
    r1 = holder("r")
    r2 = holder("r")
    with Pool.open(pool_path, read_only=True) as mine, \
            Pool.open(pool_path, read_only=True) as mine2:
        assert mine.device("a").pread(7, 0) == b"initial"
        assert mine2.device("a").pread(7, 0) == b"initial"
        with pytest.raises(PoolLockedError) as exc:
            Pool.open(pool_path)
        msg = str(exc.value)
        assert f"process {r1.pid}" in msg and f"process {r2.pid}" in msg, msg
    with pytest.raises(PoolLockedError):
        Pool.open(pool_path, timeout=0.1)
    release(r1)
    with pytest.raises(PoolLockedError) as exc:
        Pool.open(pool_path)
    assert f"process {r2.pid}" in str(exc.value)
    assert f"process {r1.pid}" not in str(exc.value)
    release(r2)
    with Pool.open(pool_path, commit_interval=0) as pool:
        assert not pool.read_only


def test_writer_refused_by_readers_is_told_the_truth(pool_path, holder):
    reader = holder("r")
    with pytest.raises(PoolLockedError) as exc:
        Pool.open(pool_path)
    msg = str(exc.value)
    assert f"process {reader.pid}" in msg
    assert "open for writing" not in msg, msg
    assert "read" in msg, msg


def test_two_pool_objects_in_one_process(pool_path):
    first = Pool.open(pool_path, commit_interval=0)
    try:
        for ro in (False, True):
            with pytest.raises(PoolLockedError) as exc:
                Pool.open(pool_path, read_only=ro)
            assert "this process" in str(exc.value), str(exc.value)
        first.device("a").pwrite(b"first", 100)
    finally:
        first.close()
    second = Pool.open(pool_path, commit_interval=0)
    try:
        assert second.device("a").pread(5, 100) == b"first"
    finally:
        second.close()
    reader = Pool.open(pool_path, read_only=True)
    try:
        with pytest.raises(PoolLockedError) as exc:
            Pool.open(pool_path)
        assert "this process" in str(exc.value)
        with Pool.open(pool_path, read_only=True) as reader2:
            assert reader2.device("a").pread(5, 100) == b"first"
    finally:
        reader.close()
    with Pool.open(pool_path, commit_interval=0):
        pass


def test_closing_one_pool_object_releases_only_its_own_lock(pool_path):
    r1 = Pool.open(pool_path, read_only=True)
    r2 = Pool.open(pool_path, read_only=True)
    r1.close()
    with pytest.raises(PoolLockedError):
        Pool.open(pool_path)
    r2.close()
    Pool.open(pool_path, commit_interval=0).close()


def test_failed_open_releases_the_lock(pool_path):
    os.truncate(pool_path / "data", 0)  # the open fails after taking the lock
    with pytest.raises(OSError) as exc:
        Pool.open(pool_path)
    assert not isinstance(exc.value, PoolLockedError)
    with pytest.raises(OSError) as exc:  # the same error again, not "locked"
        Pool.open(pool_path)
    assert not isinstance(exc.value, PoolLockedError)
    assert "truncated" in str(exc.value)


def test_pool_create_holds_the_lock(tmp_path):
    path = tmp_path / "p"
    with Pool.create(path, 16 * 4096, 4096, commit_interval=0):
        with pytest.raises(PoolLockedError):
            Pool.open(path)
    Pool.open(path, commit_interval=0).close()
