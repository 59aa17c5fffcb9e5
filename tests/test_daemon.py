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


def test_connect_without_daemon_opens_the_pool(tmp_path):
    with Pool.create(tmp_path / "p", 64 * MiB, 65536):
        pass
    with cowblock.connect(tmp_path / "p") as pool:
        assert isinstance(pool, Pool)
