"""One daemon per pool: listeners as attachments, its life (on demand,
grace, stop), round trips per command, and what a dead or hung daemon
leaves (tests of mounts are in test_mount.py)."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

import cowblock
from cowblock import Pool
from cowblock.control import client
from cowblock.runtime import RuntimeDir, process_alive
from helpers import pattern
from nbdclient import CMD_WRITE, Client

COWBLOCK = shutil.which("cowblock")
QEMU_IO = shutil.which("qemu-io")
pytestmark = pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")
MiB = 1 << 20
GRACE = {"COWBLOCK_DAEMON_GRACE": "0.5"}
REP_ERR_POLICY = (1 << 31) + 2


def wait_for(cond, seconds=30, what="a condition"):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def run(path, *args, check=True, env=None, timeout=120):
    r = subprocess.run([COWBLOCK, "--pool", str(path), *args], capture_output=True, text=True,
                       env=dict(os.environ, **(env or {})), timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{args}: {r.returncode} {r.stderr}")
    return r


def serve(path, sock, *args, env=None):
    proc = subprocess.Popen([COWBLOCK, "--pool", str(path), "serve", "--socket", str(sock), *args],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, **(env or {})))
    wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, what="the listener")
    assert proc.poll() is None, proc.stderr.read()
    return proc


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return proc.stderr.read()


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 512 * MiB, 65536) as p:
        p.create_thin("base", 64 * MiB).pwrite(pattern(1, MiB), 0)
        p.create_thin("s1", 64 * MiB)
    yield path
    pid = RuntimeDir(path).pid()
    if pid:
        os.kill(pid, signal.SIGKILL)


def qemu_io(sock, name, cmd):
    r = subprocess.run([QEMU_IO, "-f", "raw", "-c", cmd, f"nbd+unix:///{name}?socket={sock}"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr
    return r.stdout


@pytest.mark.skipif(QEMU_IO is None, reason="qemu-io is not installed (Debian package qemu-utils)")
def test_two_serves_share_one_daemon_and_stopping_one_leaves_the_other(pool, tmp_path):
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    pa = serve(pool, a, "base")
    pid = RuntimeDir(pool).pid()
    pb = serve(pool, b, "s1")
    assert RuntimeDir(pool).pid() == pid           # one daemon for both
    qemu_io(a, "base", "write -P 0x11 0 1M")
    qemu_io(b, "s1", "write -P 0x22 0 1M")
    qemu_io(a, "base", "read -P 0x11 0 1M")
    qemu_io(b, "s1", "read -P 0x22 0 1M")
    status = json.loads(run(pool, "--json", "daemon", "status").stdout)
    assert sorted(x["address"] for x in status["attachments"]) == sorted([str(a), str(b)])
    log = stop(pb)                                  # the second goes; the first is untouched
    assert "stopped" in log and "connection" in log, log
    assert not b.exists() and a.exists()
    qemu_io(a, "base", "read -P 0x11 0 1M")
    assert RuntimeDir(pool).pid() == pid
    stop(pa)                                        # it started the daemon: the daemon goes too
    wait_for(lambda: not process_alive(pid), 10, "the daemon to exit")
    assert not os.path.exists(RuntimeDir(pool).path)
    with Pool.open(pool) as p:                      # released; both writes committed
        assert p.device("base").pread(4, 0) == b"\x11" * 4
        assert p.device("s1").pread(4, MiB - 4) == b"\x22" * 4


def test_a_second_listener_on_the_same_socket_is_refused_and_harmless(pool, tmp_path):
    a = tmp_path / "a.sock"
    pa = serve(pool, a, "base")
    r = run(pool, "serve", "--socket", str(a), "s1", check=False)
    assert r.returncode == 12 and "exists already" in r.stderr
    assert "Traceback" not in r.stderr
    c = Client(str(a))
    c.go("base", structured=False)
    assert c.read(0, 4) == pattern(1, 4)
    c.close()
    stop(pa)


def test_serve_errors_are_clear(pool, tmp_path):
    r = run(pool, "serve", "--socket", "/nonexistent/dir/x.sock", check=False, env=GRACE)
    assert r.returncode == 11 and "cannot listen on /nonexistent/dir/x.sock" in r.stderr
    assert "Traceback" not in r.stderr
    r = run(pool, "serve", "nope", "--socket", str(tmp_path / "x.sock"), check=False, env=GRACE)
    assert r.returncode == 3 and "no device named 'nope'" in r.stderr
    wait_for(lambda: RuntimeDir(pool).pid() is None, what="the idle daemon to exit")


def test_sigkill_of_a_foreground_serve_removes_only_its_listener(pool, tmp_path):
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    pa = serve(pool, a, "base")
    pb = serve(pool, b, "s1")
    pb.kill()
    pb.wait()
    wait_for(lambda: not b.exists(), what="the killed serve's listener to go")
    c = Client(str(a))
    c.go("base", structured=False)
    assert c.read(0, 4) == pattern(1, 4)
    c.close()
    stop(pa)
    wait_for(lambda: RuntimeDir(pool).pid() is None, what="the daemon to exit")


def test_an_auto_started_daemon_exits_after_its_grace(pool, tmp_path):
    with client.daemon(pool, grace=0.5)[0] as proxy:
        pid = proxy.status()["pid"]
        proxy.serve(["base"], socket=str(tmp_path / "x.sock"), owned=False)
    time.sleep(1.5)
    assert process_alive(pid)                      # a listener is attached
    with cowblock.connect(pool) as proxy:
        lst = proxy.status()["attachments"][0]["id"]
        proxy.unserve(lst)
    wait_for(lambda: not process_alive(pid), 10, "the daemon to exit when idle")
    with Pool.open(pool):
        pass


def test_round_trips_per_command(pool):
    """One control call per CLI command, health included in its reply:
    counted by the daemon itself."""
    proxy, _ = client.daemon(pool)
    with proxy:
        proxy.serve([], socket=None, owned=False)   # keep the daemon while commands come and go

        def calls(*args):
            before = proxy.status()["calls_served"]
            run(pool, *args)
            return proxy.status()["calls_served"] - before - 1   # less the status call itself
        counts = {
            "create": calls("create", "c1", "--size", "8M"),
            "snapshot": calls("snapshot", "c1", "c1-snap", "--read-only"),
            "ls": calls("ls"),
            "ls --usage": calls("ls", "--usage"),
            "info": calls("info", "c1"),
            "rename": calls("rename", "c1-snap", "c1-s"),
            "set": calls("set", "c1", "--label", "k=v"),
            "resize": calls("resize", "c1", "16M"),
            "resize +": calls("resize", "c1", "+4M"),
            "resize -": calls("resize", "c1", "-4M"),
            "rollback": calls("rollback", "c1", "c1-s"),
            "rm": calls("rm", "c1", "c1-s"),
            "pool info": calls("pool", "info"),
            "image ls": calls("image", "ls"),
            "container ls": calls("container", "ls"),
        }
        proxy.stop(force=True)
    assert counts == {k: 1 for k in counts}, counts


def test_sigkill_of_the_daemon_mid_io_then_recovery(pool, tmp_path):
    """Clients get errors, not hangs; the next command cleans up and the pool
    reopens at its last commit."""
    sock = tmp_path / "a.sock"
    pa = serve(pool, sock, "base")
    rt = RuntimeDir(pool)
    pid = rt.pid()
    c = Client(str(sock))
    c.go("base", structured=False)
    c.request(CMD_WRITE, 0, 4096, pattern(7, 4096))
    assert c.reply()[1] == 0
    run(pool, "pool", "info")           # ... and a commit happens at least every second
    time.sleep(1.5)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises((EOFError, OSError)):
        c.request(CMD_WRITE, 4096, 4096, pattern(8, 4096))
        c.reply()
    assert pa.wait(timeout=30) == 14               # the serve says its daemon went away
    assert "daemon stopped" in pa.stderr.read()
    r = run(pool, "ls")                            # notices, cleans up, says so
    assert "note:" in r.stderr and "died" in r.stderr, r.stderr
    assert not os.path.exists(rt.control)
    with Pool.open(pool) as p:
        assert p.device("base").pread(4096, 0) == pattern(7, 4096)
        assert p.check().ok


def test_the_runtime_directory_of_a_pool_deleted_while_its_daemon_was_dead_is_swept(pool, tmp_path):
    """No command of a deleted pool runs again to clean up after its killed
    daemon; the next daemon of any pool removes what it left (the directory,
    its socket, pid file, state and log), and leaves live pools' alone."""
    gone = tmp_path / "gone"
    with Pool.create(gone, 64 * MiB, 65536) as p:
        p.create_thin("d", 16 * MiB)
    client.daemon(gone, grace=60)[0].close()
    dead = RuntimeDir(gone)
    live = RuntimeDir(pool)
    client.daemon(pool, grace=60)[0].close()
    os.kill(dead.pid(), signal.SIGKILL)
    wait_for(lambda: dead.pid() is None, what="the killed daemon to go")
    again = tmp_path / "again"   # a pool made where the old one was (made first: a new inode, a new key)
    with Pool.create(again, 64 * MiB, 65536):
        pass
    shutil.rmtree(gone)
    os.rename(again, gone)
    assert RuntimeDir(gone).path != dead.path
    assert os.path.isdir(dead.path) and os.path.exists(dead.control)
    os.makedirs(os.path.join(dead.path, "build", "layer-tmp"))   # as a kill mid image load leaves
    client.daemon(gone, grace=60)[0].close()   # any daemon sweeps; this one is of the new pool
    assert not os.path.exists(dead.path)
    assert os.path.exists(live.control) and process_alive(live.pid())
    assert "is gone" in open(RuntimeDir(gone).log).read()
    run(gone, "daemon", "stop")
    run(pool, "daemon", "stop")


def test_daemon_stop_force_and_a_hung_daemon(pool, tmp_path):
    sock = tmp_path / "a.sock"
    with client.daemon(pool)[0] as proxy:
        proxy.serve(["base"], socket=str(sock), owned=False)
    c = Client(str(sock))
    c.go("base", structured=False)
    r = run(pool, "daemon", "stop", check=False)
    assert r.returncode == 12 and "NBD client" in r.stderr
    pid = RuntimeDir(pool).pid()
    os.kill(pid, signal.SIGSTOP)                  # hung: calls time out with a clear message
    r = run(pool, "ls", check=False, env={"COWBLOCK_CONTROL_TIMEOUT": "2"})
    assert r.returncode == 14 and "did not answer" in r.stderr and "--force" in r.stderr
    r = run(pool, "--json", "daemon", "stop", "--force", check=False)
    assert r.returncode == 0, r.stderr
    assert any("killed" in line for line in json.loads(r.stdout)["detached"])
    assert not process_alive(pid)
    c.close()
    with Pool.open(pool) as p:
        assert p.check().ok


def test_daemon_stop_force_cuts_clients_and_says_so(pool, tmp_path):
    sock = tmp_path / "a.sock"
    with client.daemon(pool)[0] as proxy:
        proxy.serve(["base"], socket=str(sock), owned=False)
    c = Client(str(sock))
    c.go("base", structured=False)
    r = run(pool, "daemon", "stop", "--force")
    assert "1 client cut off" in r.stdout
    assert RuntimeDir(pool).pid() is None
    c.close()
    r = run(pool, "daemon", "stop")
    assert "no daemon" in r.stdout


def test_nbd_read_write_use_of_a_device_is_exclusive_across_listeners(pool, tmp_path):
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    pa = serve(pool, a, "base")
    pb = serve(pool, b, "base")
    c1, c2 = Client(str(a)), Client(str(a))       # one listener: multi-conn is fine
    c1.go("base", structured=False)
    c2.go("base", structured=False)
    other = Client(str(b))
    rtype, msg = other.go("base", structured=False)[-1]
    assert rtype == REP_ERR_POLICY and b"exported over NBD on" in msg, msg
    ro = serve(pool, tmp_path / "ro.sock", "base", "--read-only")
    reader = Client(str(tmp_path / "ro.sock"))
    rtype, msg = reader.go("base", structured=False)[-1]   # a reader conflicts with a writer too
    assert rtype == REP_ERR_POLICY, msg
    for x in (c1, c2, other, reader):
        x.close()
    for p in (ro, pb, pa):
        stop(p)


@pytest.mark.parametrize("first", ["query", "change"])
def test_proxy_retries_once_when_the_daemon_stops_under_it(pool, first):
    """A daemon closes its control socket before it releases the pool, and
    tells its idle clients that it stops; a client that loses that race goes
    on with the pool itself, whether its next call is a query or a change
    (the notice says the call did not run)."""
    proxy, _ = client.daemon(pool)
    with proxy:
        other = cowblock.connect(pool)
        assert isinstance(other, client.PoolProxy)
        proxy.stop()
        if first == "query":
            assert [d.name for d in other.list()] == ["base", "s1"]   # reconnected, on its own
        other.create_thin("after", MiB)
        other.close()
    with Pool.open(pool) as p:
        assert "after" in p


def dying_daemon(rt, pid):
    """A control socket that takes one connection and closes it unanswered,
    as a daemon killed during a call does, and a pid file naming pid;
    returns the thread that takes the connection."""
    import socket
    import threading
    rt.make()
    with open(rt.pidfile, "w") as f:
        f.write(f"{pid}\n")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(rt.control)
    listener.listen(1)

    def take_one():
        conn, _ = listener.accept()
        conn.recv(1)
        listener.close()        # as a dying daemon's: no one takes the next connection
        conn.close()            # no reply and no stopping notice
    thread = threading.Thread(target=take_one, daemon=True)
    thread.start()
    return thread


def test_a_change_cut_off_by_a_daemon_still_exiting_is_not_sent_again(pool):
    """SIGKILL closes a daemon's sockets before its process is gone, so the
    pid still looks alive when the client sees the connection end.  A call
    that changes the pool must then fail, not run again on the pool's last
    commit: that lost what the dead daemon held uncommitted (NBD writes it
    had acknowledged) while the caller took the call's commit as covering
    them.  Found by the NBD crash torture (tests/test_crash_nbd.py)."""
    rt = RuntimeDir(pool)
    exiting = subprocess.Popen(["sleep", "60"])    # stands for the daemon still exiting
    try:
        dying = dying_daemon(rt, exiting.pid)
        target = cowblock.connect(pool)
        assert isinstance(target, client.PoolProxy)
        with pytest.raises(cowblock.errors.DaemonError, match="died during create_thin"):
            target.create_thin("lost", MiB)
        target.close()
        dying.join()
    finally:
        exiting.kill()
        exiting.wait()
    notes = []
    with cowblock.connect(pool, on_note=notes.append) as p:   # the next command cleans up
        assert isinstance(p, Pool) and "lost" not in p
    assert notes and not os.path.exists(rt.control)


def test_a_query_that_reaches_a_dying_daemon_is_asked_of_the_pool(pool):
    """A daemon killed with SIGKILL still takes connections while it exits;
    a query that reaches it then goes to the pool itself once its leftovers
    are cleaned up (and says so), while a call that changes the pool says
    the daemon died during it (it may or may not have been done)."""
    rt = RuntimeDir(pool)
    dead = subprocess.Popen(["true"])
    dead.wait()

    dying = dying_daemon(rt, dead.pid)
    notes = []
    target = cowblock.connect(pool, on_note=notes.append)
    assert isinstance(target, client.PoolProxy)
    with target:
        assert [d.name for d in target.list()] == ["base", "s1"]
    dying.join()
    assert notes and not os.path.exists(rt.control)

    dying = dying_daemon(rt, dead.pid)
    target = cowblock.connect(pool)
    with pytest.raises(cowblock.errors.DaemonError, match="died during create_thin"):
        target.create_thin("lost", MiB)
    target.close()
    dying.join()
