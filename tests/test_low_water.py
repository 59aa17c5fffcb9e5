"""The low-water hook (cowblock.lowwater), as dm-thin's low-water event and
no_space_timeout: it runs once per downward crossing of the mark; a write
that finds the pool full waits for it (hook_timeout) and is tried once more,
over the CLI, NBD (qemu-io and a raw client) and the FUSE device files."""
import errno
import json
import os
import shutil
import signal
import subprocess
import threading
import time

import pytest

from cowblock import NoSpaceError, Pool, health, lowwater
from nbdclient import CMD_WRITE, Client
from test_daemon import run, serve, stop, wait_for

COWBLOCK = shutil.which("cowblock")
pytestmark = pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")
K64 = 65536
NBD_ENOSPC = errno.ENOSPC


def make_pool(path, blocks, hook, mark=50, timeout=60):
    with Pool.create(path, blocks * K64, K64, commit_interval=0) as pool:
        pool.create_thin("d", 256 * K64)
        health.configure(pool, low_water_data=mark, hook=hook, hook_timeout=timeout)


def counting(tmp_path, then):
    """A hook that counts its runs in a file, then runs `then`."""
    return f"echo run >> {tmp_path / 'runs'}; {then}", tmp_path / "runs"


def runs(count_file):
    return len(count_file.read_text().split()) if count_file.exists() else 0


def grow(by="1M"):
    return f"{COWBLOCK} --pool \"$COWBLOCK_POOL\" pool resize +{by}"


def hangs(tmp_path):
    """A hook that never grows the pool: it sleeps, its pid in a file."""
    return f"echo $$ > {tmp_path / 'hook.pid'}; exec sleep 60", tmp_path / "hook.pid"


def gone(pidfile):
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return open(f"/proc/{pid}/stat").read().split()[2] == "Z"


# ---- the CLI, holding the pool itself ----

def test_cli_write_runs_the_hook_once_per_crossing_and_succeeds(tmp_path):
    path = tmp_path / "p"
    hook, count = counting(tmp_path, f"echo hook-output; {grow('4M')}")
    make_pool(path, 16, hook)                                # 1 MiB of data space
    r = run(path, "write", "d", stdin=os.urandom(2 << 20))   # would need 2 MiB: ENOSPC mid-write
    assert b"hook-output" in r.stderr                        # before the command returned
    assert b"hook-output" not in r.stdout and runs(count) == 1
    assert json.loads(run(path, "--json", "pool", "info").stdout)["data_size"] == 5 << 20
    run(path, "write", "d", "--offset", "2M", stdin=b"x" * K64)   # 2M + 64K used of 5M: above
    run(path, "ls")
    assert runs(count) == 1
    run(path, "write", "d", "--offset", "3M", stdin=os.urandom(2 << 20))   # 80% used: a crossing
    assert runs(count) == 2
    r = run(path, "pool", "resize", "-1M", check=False)
    assert r.returncode == 2 and b"a pool only grows" in r.stderr
    info = json.loads(run(path, "--json", "pool", "info").stdout)
    assert info["data_size"] == 9 << 20 and not info["below_low_water"]
    run(path, "write", "d", "--offset", "5M", stdin=b"y" * K64)
    assert runs(count) == 2
    assert run(path, "read", "d", "--offset", "5M", "--length", "64K").stdout == b"y" * K64


def test_cli_write_fails_naming_the_pool_after_the_hook_timeout(tmp_path):
    path = tmp_path / "p"
    hook, pidfile = hangs(tmp_path)
    make_pool(path, 16, hook)
    run(path, "pool", "set", "--hook-timeout", "1")
    begin = time.monotonic()
    r = run(path, "write", "d", stdin=os.urandom(2 << 20), check=False)
    took = time.monotonic() - begin
    assert r.returncode == 6, r.stderr
    assert f"pool {path}".encode() in r.stderr and b"out of data space" in r.stderr
    assert b"past its timeout of 1 s and was stopped" in r.stderr
    assert 1 <= took < 15
    assert gone(pidfile)                  # no hook left behind
    r = run(path, "pool", "set", "--hook-timeout", "0", check=False)
    assert r.returncode == 2 and b"hook-timeout" in r.stderr


def test_cli_import_waits_for_the_hook_that_grows_the_pool(tmp_path):
    """Any command holding the pool itself (here `import`, whose writes are
    the engine's device writes) runs the due hook when the pool is full and
    tries the write once more; under --json the hook's output is JSON too."""
    path = tmp_path / "p"
    hook, count = counting(tmp_path, f"echo grown by the hook; {grow('4M')}")
    make_pool(path, 16, hook)                                # 1 MiB of data space
    data = os.urandom(3 << 19)          # 1.5 MiB: 70% free once grown, no second crossing
    (tmp_path / "img").write_bytes(data)
    r = run(path, "--json", "import", "img", str(tmp_path / "img"))
    assert runs(count) == 1
    said = [json.loads(line) for line in r.stderr.decode().splitlines()]   # every line JSON
    hooks = [x["low_water_hook"] for x in said if "low_water_hook" in x]
    assert len(hooks) == 1 and hooks[0]["exit_status"] == 0
    assert "grown by the hook" in hooks[0]["output"]
    assert run(path, "read", "img").stdout == data


# ---- NBD, through the pool's daemon ----

def test_nbd_and_cli_writes_through_the_daemon_wait_for_the_hook(tmp_path):
    if not shutil.which("qemu-io"):
        pytest.skip("qemu-io is not installed (Debian package qemu-utils)")
    path, sock = tmp_path / "p", tmp_path / "s.sock"
    hook, count = counting(tmp_path, f"echo hook-output; sleep 0.5; {grow('1M')}")
    make_pool(path, 8, hook, mark=30)                        # 512 KiB of data space
    proc = serve(path, sock, "d")
    try:
        u = f"nbd+unix:///d?socket={sock}"

        def qemu_io(*cmds):
            args = [a for c in cmds for a in ("-c", c)]
            return subprocess.run(["qemu-io", "-f", "raw", *args, u], capture_output=True,
                                  text=True, timeout=60)
        w = qemu_io("write -P 0x5a 0 768k")                  # full at 512K: waits for the hook
        assert w.returncode == 0 and "wrote 786432/786432" in w.stdout, w.stdout + w.stderr
        assert runs(count) == 1                              # 768K of 1.5M used: armed again
        r = run(path, "write", "d", "--offset", "768K", stdin=b"c" * (1 << 20))
        assert runs(count) == 2                              # full at 1.5M: waited in the daemon
        assert b"hook-output" not in r.stderr + r.stdout     # its output is the daemon's
        w = qemu_io("read -P 0x5a 0 768k", "write -P 0x11 1792k 256k")   # 2M of 2.5M used
        assert w.returncode == 0 and "verification failed" not in w.stdout, w.stdout
        wait_for(lambda: runs(count) == 3, 15, "the watcher to see the crossing")
        assert run(path, "read", "d", "--offset", "768K", "--length", "1M").stdout == \
            b"c" * (1 << 20)
    finally:
        log = stop(proc)
    assert "low-water hook (pid" in log and "low-water hook: hook-output" in log
    assert "low-water hook: pool is 1.5M" in log


def test_nbdcopy_over_four_connections_into_a_full_pool_runs_the_hook_once(tmp_path):
    if not shutil.which("nbdcopy"):
        pytest.skip("nbdcopy is not installed (Debian package libnbd-bin)")
    path, sock = tmp_path / "p", tmp_path / "s.sock"
    hook, count = counting(tmp_path, f"sleep 0.5; {grow('8M')}")
    make_pool(path, 8, hook, mark=30)
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(4 << 20))
    proc = serve(path, sock, "d")
    try:
        subprocess.run(["nbdcopy", "-C", "4", "--requests", "8", str(src),
                        f"nbd+unix:///d?socket={sock}"], check=True, timeout=60)
        assert runs(count) == 1           # every writer that found the pool full waited for one
    finally:
        stop(proc)
    assert run(path, "read", "d", "--length", "4M").stdout == src.read_bytes()


def test_nbd_write_gets_enospc_after_the_hook_timeout(tmp_path):
    path, sock = tmp_path / "p", tmp_path / "s.sock"
    hook, pidfile = hangs(tmp_path)
    make_pool(path, 4, hook, timeout=1)
    proc = serve(path, sock, "d")
    try:
        c = Client(str(sock))
        c.go("d", structured=False)
        for i in range(4):
            c.request(CMD_WRITE, i * K64, K64, b"f" * K64)
            assert c.reply()[1] == 0
        begin = time.monotonic()
        c.request(CMD_WRITE, 4 * K64, K64, b"g" * K64)       # the pool is full: waits 1 s
        assert c.reply()[1] == NBD_ENOSPC
        assert 0.9 <= time.monotonic() - begin < 8
        begin = time.monotonic()
        c.request(CMD_WRITE, 5 * K64, K64, b"g" * K64)       # past the timeout: at once
        assert c.reply()[1] == NBD_ENOSPC
        assert time.monotonic() - begin < 0.9
        c.close()
        assert not gone(pidfile)          # the hook is left to finish (as dmeventd's) ...
    finally:
        log = stop(proc)
    wait_for(lambda: gone(pidfile), 15, "the hook to be ended")   # ... until the daemon stops
    assert "still running after its timeout" in log


# ---- in one process: the watcher, and the FUSE device files ----

def test_watcher_fires_once_per_crossing_rearms_and_a_full_write_fails_after_it(tmp_path):
    hook, count = counting(tmp_path, "true")
    make_pool(tmp_path / "p", 16, hook)
    pool = Pool.open(tmp_path / "p", commit_interval=0)
    watcher = lowwater.Watcher(pool).start()
    try:
        dev = pool.device("d")
        dev.pwrite(b"a" * 9 * K64, 0)                        # 7 of 16 free: under 50%
        watcher.check()
        wait_for(lambda: runs(count) == 1 and watcher._proc is None, what="the hook")
        dev.pwrite(b"b" * K64, 9 * K64)
        watcher.check()
        assert runs(count) == 1
        pool.resize(64 * K64)
        watcher.check()                                      # above: armed again
        assert not pool.config[lowwater.CONFIG_KEY]["fired"]
        dev.pwrite(b"c" * 30 * K64, 10 * K64)                # 40 of 64 used: a new crossing
        watcher.check()
        wait_for(lambda: runs(count) == 2 and watcher._proc is None, what="the hook again")
        with pytest.raises(NoSpaceError):                    # the hook ran, did not grow: fails
            dev.pwrite(b"d" * 30 * K64, 40 * K64)
        assert runs(count) == 2
    finally:
        watcher.stop()
        pool.close()


def test_fuse_write_waits_for_the_hook(tmp_path):
    from cowblock.attach import FuseAttach, available
    ok, why = available()
    if not ok or os.geteuid() != 0:
        pytest.skip(why or "mounting FUSE here needs root")
    started, grown = tmp_path / "started", tmp_path / "grown"
    hook, count = counting(tmp_path, f"touch {started}; while [ ! -e {grown} ]; do sleep 0.05; "
                                     "done")
    make_pool(tmp_path / "p", 4, hook, timeout=20)
    pool = Pool.open(tmp_path / "p", commit_interval=0)
    watcher = lowwater.Watcher(pool).start()

    def grow_when_asked():   # what the hook asks for, done here: this process holds the pool
        wait_for(started.exists, 20, "the hook")
        pool.resize(16 * K64)
        grown.touch()
    helper = threading.Thread(target=grow_when_asked)
    helper.start()
    try:
        with FuseAttach(pool, tmp_path / "dev") as attach:
            fd = os.open(attach.add("d"), os.O_RDWR)
            try:
                os.pwrite(fd, b"z" * 6 * K64, 0)             # 4 blocks: full mid-write
            finally:
                os.close(fd)
        helper.join()
        assert pool.device("d").pread(6 * K64, 0) == b"z" * 6 * K64
        assert runs(count) == 1
    finally:
        helper.join()
        watcher.stop()
        pool.close()


def test_fuse_write_gets_enospc_after_the_hook_timeout(tmp_path):
    from cowblock.attach import FuseAttach, available
    ok, why = available()
    if not ok or os.geteuid() != 0:
        pytest.skip(why or "mounting FUSE here needs root")
    hook, pidfile = hangs(tmp_path)
    make_pool(tmp_path / "p", 4, hook, timeout=1)
    pool = Pool.open(tmp_path / "p", commit_interval=0)
    log = []
    watcher = lowwater.Watcher(pool, log=log.append).start()
    try:
        with FuseAttach(pool, tmp_path / "dev") as attach:
            fd = os.open(attach.add("d"), os.O_RDWR)
            try:
                os.pwrite(fd, b"f" * 4 * K64, 0)
                begin = time.monotonic()
                with pytest.raises(OSError) as exc:
                    os.pwrite(fd, b"g" * K64, 4 * K64)       # full: waits 1 s for the hook
                assert exc.value.errno == errno.ENOSPC
                assert 0.9 <= time.monotonic() - begin < 8
            finally:
                os.close(fd)
    finally:
        watcher.stop()                    # ends the hook
        pool.close()
    assert gone(pidfile)
    # by SIGTERM: it was not started from a FUSE thread, whose blocked signals it would inherit
    assert any(line.endswith(f"exited -{signal.SIGTERM}") for line in log), log
