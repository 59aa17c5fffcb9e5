"""The pool daemon (cowblock.daemon): one process per pool that owns the
pool and everything attached to it, reached through its control socket."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

import cowblock
from cowblock import Pool
from cowblock.control.client import PoolProxy
from cowblock.control.protocol import VERSION
from cowblock.runtime import RuntimeDir
from helpers import pattern
from nbdclient import CMD_WRITE, Client

COWBLOCK = shutil.which("cowblock")
pytestmark = pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")
MiB = 1 << 20


def wait_for(cond, seconds=30, what="a condition"):
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def daemon_pid(path):
    return RuntimeDir(path).pid()


def serve(path, sock, *args):
    """A foreground `cowblock serve`; returns the process once it serves."""
    proc = subprocess.Popen([COWBLOCK, "--pool", str(path), "serve", "--socket", str(sock), *args],
                            stderr=subprocess.PIPE)
    wait_for(lambda: os.path.exists(sock) or proc.poll() is not None, what="the listener")
    assert proc.poll() is None, proc.stderr.read().decode()
    return proc


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    return proc.stderr.read().decode()


@pytest.fixture
def daemon(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 256 * MiB, 65536) as pool:
        pool.create_thin("disk", 32 * MiB).pwrite(pattern(1, MiB), 0)
    sock = tmp_path / "nbd.sock"
    proc = serve(path, sock)
    yield path, str(sock)
    stop(proc)
    wait_for(lambda: daemon_pid(path) is None, what="the daemon to exit")


def run(path, *args, check=True, stdin=None, env=None):
    r = subprocess.run([COWBLOCK, "--pool", str(path), *args], capture_output=True, input=stdin,
                       env=env, timeout=120)
    if check and r.returncode:
        raise AssertionError(f"{args}: {r.returncode} {r.stderr.decode()}")
    return r


def test_cli_works_through_the_daemon(daemon):
    path, _ = daemon
    rt = RuntimeDir(path)
    assert os.stat(rt.control).st_mode & 0o777 == 0o600
    assert os.stat(rt.path).st_mode & 0o777 == 0o700
    assert not os.path.exists(path / "control.sock")     # nothing of the daemon in the pool dir
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
        assert dev.id == pool.info("x").id
        dev.pwrite(b"hello", 4097)
        assert pool.device("x").pread(5, 4097) == b"hello"
        assert pool.info("x").labels == {"a": "b"}
        pool.snapshot("x", "x2")
        assert [r.kind for r in pool.diff("x", "x2")] == []
        assert pool.usage("x2").shared_blocks == 1
        assert pool.info("x2", usage=True).shared_blocks == 1
        with pytest.raises(cowblock.DeviceNotFoundError):
            pool.device("nope").size
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
    assert r.returncode == 12 and b"exported over NBD on" in r.stderr
    r = run(path, "resize", "disk", "16M", check=False)
    assert r.returncode == 12
    r = run(path, "set", "disk", "--read-only", check=False)
    assert r.returncode == 12
    run(path, "resize", "disk", "64M")                 # growing is fine
    c.close()
    wait_for(lambda: run(path, "rename", "disk", "renamed", check=False).returncode == 0,
             what="the server to see the disconnect")


def test_cli_snapshots_are_point_in_time_under_a_continuous_nbd_writer(daemon):
    """A writer logs each acknowledged write while the CLI takes snapshots:
    every snapshot holds all writes acknowledged before it began, none sent
    after it returned."""
    import struct
    import threading
    path, sock = daemon
    c = Client(sock)
    c.go("disk", structured=False)
    acked, sent, stop_ = {}, {}, threading.Event()

    def writer():
        seq = 0
        while not stop_.is_set() and seq < 20000:
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
    stop_.set()
    t.join()
    c.close()
    for name, begin, end in snaps:
        img = run(path, "read", name, "--length", str(2048 * 4096)).stdout
        for slot in range(2048):
            got = struct.unpack(">Q", img[slot * 4096:slot * 4096 + 8])[0]
            mine = [s for s in acked if s % 2048 == slot]
            before = [s for s in mine if acked[s] < begin]
            if before:  # the newest write acknowledged before the snapshot, or a later one
                assert got >= max(before), (name, slot, got, max(before))
            if got not in sent:   # the device's content before the writer began
                assert not before, (name, slot, got)
                continue
            assert sent[got] <= end, (name, slot, got)


def test_on_full_wait_holds_writes_until_the_pool_grows(tmp_path):
    path = tmp_path / "small"
    with Pool.create(path, 8 * 65536, 65536, commit_interval=0) as pool:
        pool.create_thin("d", 64 * MiB)
    sock = tmp_path / "s.sock"
    proc = serve(path, sock, "--on-full", "wait=20")
    try:
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
        stop(proc)


def test_connect_without_daemon_opens_the_pool(tmp_path):
    with Pool.create(tmp_path / "p", 64 * MiB, 65536):
        pass
    with cowblock.connect(tmp_path / "p") as pool:
        assert isinstance(pool, Pool)


# ---- the control socket against hostile clients (what fuzz/atheris/fuzz_control.py found) ----

def _control(tmp_path, busy=("busy",)):
    from cowblock.control.server import ControlServer
    pool = Pool.create(tmp_path / "cp", 64 * MiB, 65536, commit_interval=0)
    pool.create_thin("disk", MiB)
    pool.create_thin("busy", MiB)
    pool.snapshot("disk", "snap", read_only=True)
    return pool, ControlServer(pool, lambda: set(busy))


def _frame(obj):
    import struct
    body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def _exchange(server, *frames):
    """Send frames on a socketpair to the daemon's own loop; its replies."""
    import socket
    import struct
    import threading
    srv, cli = socket.socketpair()
    t = threading.Thread(target=server.serve_connection, args=(srv,))
    t.start()
    cli.sendall(b"".join(frames))
    cli.shutdown(socket.SHUT_WR)
    out = b""
    try:
        while chunk := cli.recv(1 << 20):
            out += chunk
    except ConnectionResetError:  # the daemon dropped the stream with input unread
        pass
    t.join(timeout=30)
    cli.close()
    replies, pos = [], 0
    while pos < len(out):
        (n,) = struct.unpack_from(">I", out, pos)
        replies.append(json.loads(out[pos + 4:pos + 4 + n]))
        pos += 4 + n
    return replies


def _req(call, *args, **kwargs):
    return _frame({"v": VERSION, "call": call, "args": list(args), "kwargs": kwargs})


def test_control_keyword_arguments_cannot_dodge_the_busy_check(tmp_path):
    """The busy check looked at args[0] only: delete(name="busy") removed a
    device that an NBD client was using."""
    pool, server = _control(tmp_path)
    replies = _exchange(server, _req("delete", "busy"), _req("rename", old="busy", new="x"),
                        _req("rollback", name="busy", snapshot="disk"),
                        _req("rollback", "busy", snapshot="disk"),
                        _req("device.resize", "busy", size=65536),
                        _req("device.resize", "busy", "1"), _req("update", "busy", read_only=True),
                        _req("delete", "disk", "busy"), _req("set_read_only", name="busy"),
                        _req("device.resize", "busy", size=2 * MiB))
    assert [r.get("error", {}).get("class") for r in replies] == ["BusyError"] * 9 + [None]
    assert "disk" in pool   # the delete of both was refused before either went
    assert pool.info("busy").size == 2 * MiB
    pool.close()


def test_control_malformed_requests_get_typed_errors_and_the_connection_goes_on(tmp_path):
    """Malformed messages closed the connection without a word (invalid JSON),
    killed the serving thread with a traceback (nesting deeper than the
    recursion limit), or came back as KeyError, IndexError, AttributeError,
    binascii.Error... from the decoder.  Now each gets an
    InvalidArgumentError (TypeError for a wrong number of arguments) and
    the next request on the connection is served."""
    pool, server = _control(tmp_path)
    bad = [b"{x}", b"\xff\xfe[", b"[1,2]", b"[" * 100000, b"null",
           {"call": ["list"]}, {"call": "list", "args": "disk"}, {"call": "list", "kwargs": [1]},
           {"call": "info", "args": [{"$bytes": "!!"}]}, {"call": "info", "args": [{"$bytes": 5}]},
           {"call": "info", "args": [{"$type": "Nope", "fields": {}}]},
           {"call": "info", "args": [{"$type": "Usage"}]},
           {"call": "info", "args": [{"$dict": [[[1], 2]]}]},
           {"call": "info", "args": [{"$datetime": "yesterday"}]},
           {"call": "info", "args": json.loads("[" * 40 + '"disk"' + "]" * 40)},
           {"call": "contains"}, {"call": "device.size"}, {"call": "device.size", "args": ["disk", 1]},
           {"call": "set_labels", "args": ["disk", "ab"]}, {"call": "add_mappings", "args": ["disk", 5]},
           {"call": "set_config", "args": [{"health": "x"}]}]
    replies = _exchange(server, *[_frame({**b, "v": VERSION} if isinstance(b, dict) else b)
                                  for b in bad], _req("list"))
    assert len(replies) == len(bad) + 1
    for req, reply in zip(bad, replies):
        assert reply["error"]["class"] in ("InvalidArgumentError", "TypeError"), (req, reply)
        assert reply["error"]["message"]
    assert [d["fields"]["name"] for d in replies[-1]["ok"]] == ["disk", "busy", "snap"]
    pool.create_thin("after", MiB)   # set_config was refused: new devices still work
    pool.close()


def test_control_exposes_only_the_public_calls(tmp_path):
    pool, server = _control(tmp_path)
    private = ["_h", "_names", "__class__", "__init__", "close", "_load_catalog", "device",
               "device._raw", "device._pool", "device.__class__", "device.__init__", "open",
               "Pool.open", "create", "device.open"]
    replies = _exchange(server, *[_req(name, "disk") for name in private])
    for name, reply in zip(private, replies):
        assert reply["error"]["class"] == "InvalidArgumentError", (name, reply)
        assert "unknown control call" in reply["error"]["message"]
    pool.close()


def test_control_message_limits(tmp_path):
    """A request is bounded in bytes (MAX_MESSAGE), in JSON values
    (MAX_ITEMS: parsing takes tens of bytes per value) and in what it asks
    for (a device.pread of 8 GiB allocated 8 GiB before failing)."""
    import struct
    from cowblock.control import protocol as D
    pool, server = _control(tmp_path)
    pool.device("disk").resize(1 << 40)
    many = b"[" + b"0," * D.MAX_ITEMS + b"0]"
    replies = _exchange(server, _req("device.pread", "disk", 8 << 30, 0), _frame(many),
                        _req("device.pread", "disk", 5, 0),
                        struct.pack(">I", D.MAX_MESSAGE + 1), _req("list"))
    assert replies[0]["error"]["class"] == "InvalidArgumentError"
    assert "at most" in replies[0]["error"]["message"]
    assert replies[1]["error"]["class"] == "InvalidArgumentError"
    assert "JSON values" in replies[1]["error"]["message"]
    assert "ok" in replies[2]
    assert replies[3]["error"]["class"] == "InvalidArgumentError"   # then the stream is dropped
    assert len(replies) == 4
    pool.close()


def test_control_a_client_of_another_version_is_told_so(tmp_path):
    pool, server = _control(tmp_path)
    replies = _exchange(server, _frame({"call": "list"}), _frame({"v": VERSION + 1, "call": "list"}),
                        _req("list"))
    for r in replies[:2]:
        assert r["error"]["class"] == "VersionError"
        assert "cowblock daemon stop" in r["error"]["message"]
    assert "ok" in replies[2]
    pool.close()


def test_the_call_table_is_the_whole_api():
    """Every call of the table resolves to its target, and the proxy offers
    exactly the table's calls."""
    from cowblock.control.calls import CALLS, DAEMON, DEVICE, FUNCTION, POOL
    from cowblock.control.client import DeviceProxy, PoolProxy
    from cowblock.control.server import _resolve
    for name, c in CALLS.items():
        assert callable(_resolve(c.target)), name
    proxy = PoolProxy.__new__(PoolProxy)
    for name, c in CALLS.items():
        if c.kind in (POOL, FUNCTION, DAEMON):
            assert callable(getattr(proxy, name)), name
    with pytest.raises(AttributeError):
        proxy.close_all_devices
    dev = DeviceProxy(proxy, "x")
    for name, c in CALLS.items():
        if c.kind == DEVICE:
            assert callable(getattr(dev, name.split(".", 1)[1])), name
