"""The pool daemon: while `cowblock serve` holds a pool, the CLI and
cowblock.connect() reach it through its control socket."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

import cowblock
from cowblock import Pool
from cowblock.daemon import PoolProxy
from helpers import pattern
from nbdclient import CMD_WRITE, Client

COWBLOCK = shutil.which("cowblock")
pytestmark = pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")
MiB = 1 << 20


@pytest.fixture
def daemon(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 256 * MiB, 65536) as pool:
        pool.create_thin("disk", 32 * MiB).pwrite(pattern(1, MiB), 0)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen([COWBLOCK, "--pool", str(path), "serve", "--socket", str(sock)],
                            stderr=subprocess.PIPE)
    for _ in range(200):
        if sock.exists() and (path / "control.sock").exists():
            break
        time.sleep(0.05)
    yield path, str(sock)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


def run(path, *args, check=True, stdin=None):
    r = subprocess.run([COWBLOCK, "--pool", str(path), *args], capture_output=True, input=stdin)
    if check and r.returncode:
        raise AssertionError(f"{args}: {r.returncode} {r.stderr.decode()}")
    return r


def test_cli_works_through_the_daemon(daemon):
    path, _ = daemon
    assert os.stat(path / "control.sock").st_mode & 0o777 == 0o600
    run(path, "create", "other", "--size", "8M")
    run(path, "snapshot", "disk", "snap1", "--read-only")
    names = [d["name"] for d in json.loads(run(path, "--json", "ls").stdout)]
    assert names == ["disk", "other", "snap1"]
    run(path, "write", "other", "--offset", "100", stdin=b"via the daemon")
    assert run(path, "read", "other", "--offset", "100", "--length", "14").stdout == b"via the daemon"
    assert json.loads(run(path, "--json", "pool", "info").stdout)["devices"] == 3
    assert json.loads(run(path, "--json", "pool", "check").stdout)["ok"]
    assert b"<superblock" in run(path, "pool", "dump").stdout
    run(path, "rm", "other")


def test_connect_gives_a_proxy_with_the_pool_api(daemon):
    path, _ = daemon
    with cowblock.connect(path) as pool:
        assert isinstance(pool, PoolProxy)
        dev = pool.create_thin("x", 4 * MiB, labels={"a": "b"})
        dev.pwrite(b"hello", 4097)
        assert pool.device("x").pread(5, 4097) == b"hello"
        assert pool.info("x").labels == {"a": "b"}
        pool.snapshot("x", "x2")
        assert [r.kind for r in pool.diff("x", "x2")] == []
        assert pool.usage("x2").shared_blocks == 1
        with pytest.raises(cowblock.DeviceNotFoundError):
            pool.device("nope")
        with pytest.raises(cowblock.DeviceExistsError):
            pool.create_thin("x", 4096)


def test_snapshot_while_an_nbd_client_writes_and_busy_devices(daemon):
    path, sock = daemon
    c = Client(sock)
    c.go("disk", structured=False)
    c.request(CMD_WRITE, 0, 4096, pattern(2, 4096))
    assert c.reply()[1] == 0
    run(path, "snapshot", "disk", "pit")             # taken without stopping the client
    c.request(CMD_WRITE, 0, 4096, pattern(3, 4096))
    assert c.reply()[1] == 0
    assert run(path, "read", "pit", "--length", "4096").stdout == pattern(2, 4096)
    r = run(path, "rm", "disk", check=False)          # exported right now: refused
    assert r.returncode == 12 and b"exported" in r.stderr
    r = run(path, "resize", "disk", "16M", check=False)
    assert r.returncode == 12
    run(path, "resize", "disk", "64M")                 # growing is fine
    c.close()
    time.sleep(0.2)
    run(path, "rename", "disk", "renamed")            # no client any more


def test_cli_snapshots_are_point_in_time_under_a_continuous_nbd_writer(daemon):
    """A writer logs each acknowledged write while the CLI takes snapshots:
    every snapshot holds all writes acknowledged before it began, none sent
    after it returned."""
    import struct
    import threading
    path, sock = daemon
    c = Client(sock)
    c.go("disk", structured=False)
    acked, sent, stop = {}, {}, threading.Event()

    def writer():
        seq = 0
        while not stop.is_set() and seq < 20000:
            seq += 1
            sent[seq] = time.monotonic_ns()
            c.request(CMD_WRITE, (seq % 2048) * 4096, 8, struct.pack(">Q", seq))
            assert c.reply()[1] == 0
            acked[seq] = time.monotonic_ns()
    t = threading.Thread(target=writer)
    t.start()
    snaps = []
    for i in range(4):
        time.sleep(0.05)
        begin = time.monotonic_ns()
        run(path, "snapshot", "disk", f"p{i}", "--read-only")
        snaps.append((f"p{i}", begin, time.monotonic_ns()))
    stop.set()
    t.join()
    c.close()
    time.sleep(0.2)
    for name, begin, end in snaps:
        img = run(path, "read", name, "--length", str(2048 * 4096)).stdout
        for slot in range(2048):
            got = struct.unpack(">Q", img[slot * 4096:slot * 4096 + 8])[0]
            mine = [s for s in acked if s % 2048 == slot]
            before = [s for s in mine if acked[s] < begin]
            if before:  # the newest write acknowledged before the snapshot, or a later one
                assert got >= max(before), (name, slot, got, max(before))
            assert not (got and sent[got] > end), (name, slot, got)


def test_on_full_wait_holds_writes_until_the_pool_grows(tmp_path):
    path = tmp_path / "small"
    with Pool.create(path, 8 * 65536, 65536, commit_interval=0) as pool:
        pool.create_thin("d", 64 * MiB)
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([COWBLOCK, "--pool", str(path), "serve", "--socket", str(sock),
                             "--on-full", "wait=20"], stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if sock.exists() and (path / "control.sock").exists():
                break
            time.sleep(0.05)
        c = Client(str(sock))
        c.go("d", structured=False)
        for i in range(8):
            c.request(CMD_WRITE, i * 65536, 65536, bytes([i + 1]) * 65536)
            assert c.reply()[1] == 0
        c.request(CMD_WRITE, 9 * 65536, 65536, b"\x09" * 65536)  # the pool is full: held
        time.sleep(0.5)
        run(path, "pool", "resize", "16M")                        # grow it through the daemon
        assert c.reply()[1] == 0                                   # and the write goes through
        assert c.read(9 * 65536, 4) == b"\x09" * 4
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_connect_without_daemon_opens_the_pool(tmp_path):
    with Pool.create(tmp_path / "p", 64 * MiB, 65536):
        pass
    with cowblock.connect(tmp_path / "p") as pool:
        assert isinstance(pool, Pool)
