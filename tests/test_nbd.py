"""`cowblock serve` against real NBD clients (nbdinfo, qemu-io, qemu-img,
nbdcopy, fio) and against malformed and hostile requests."""
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from cowblock import Pool
from cowblock.nbd.server import NBDServer
from helpers import pattern
from nbdclient import CMD_BLOCK_STATUS, CMD_DISC, CMD_FLUSH, CMD_READ, CMD_TRIM, CMD_WRITE, Client

MiB = 1 << 20
COWBLOCK = shutil.which("cowblock")


def need(tool):
    if not shutil.which(tool):
        pytest.skip(f"{tool} is not installed (apt-get install "
                    f"{ {'nbdinfo': 'libnbd-bin', 'nbdcopy': 'libnbd-bin'}.get(tool, tool) })")


def uri(sock, name):
    return f"nbd+unix:///{name}?socket={sock}"


class Served:
    """`cowblock serve` in a subprocess, stopped with SIGTERM."""

    def __init__(self, pool_dir, sock, *args):
        if COWBLOCK is None:
            pytest.skip("the cowblock command is not installed")
        self.sock = str(sock)
        self.proc = subprocess.Popen([COWBLOCK, "--pool", str(pool_dir), "serve", "--socket",
                                      self.sock, *args], stderr=subprocess.PIPE)
        for _ in range(200):
            if os.path.exists(self.sock):
                return
            if self.proc.poll() is not None:
                raise AssertionError(self.proc.stderr.read().decode())
            time.sleep(0.05)
        raise AssertionError("the server socket never appeared")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        return self.proc.stderr.read().decode()

    def alive(self):
        return self.proc.poll() is None


@pytest.fixture
def pool_dir(tmp_path):
    path = tmp_path / "pool"
    with Pool.create(path, 256 * MiB, 65536) as pool:
        dev = pool.create_thin("disk", 64 * MiB)
        dev.pwrite(pattern(1, 3 * 65536 + 100), 65536 * 5)
        dev.pwrite(pattern(2, 4096), 40 * MiB)
        pool.snapshot("disk", "image", read_only=True)
    return path


@pytest.fixture
def served(pool_dir, tmp_path):
    s = Served(pool_dir, tmp_path / "nbd.sock")
    yield s
    if s.alive():
        s.stop()


def test_socket_is_owner_only(served):
    assert os.stat(served.sock).st_mode & 0o777 == 0o600


def test_nbdinfo_size_and_map_match_block_status(pool_dir, tmp_path):
    need("nbdinfo")
    with Pool.open(pool_dir) as pool:
        expect = [(e.offset, e.length, 0 if e.mapped else 3)
                  for e in pool.device("disk").block_status()]
    s = Served(pool_dir, tmp_path / "s.sock")
    try:
        info = json.loads(subprocess.check_output(["nbdinfo", "--json", uri(s.sock, "disk")]))
        assert info["exports"][0]["export-size"] == 64 * MiB
        got = json.loads(subprocess.check_output(["nbdinfo", "--map", "--json", uri(s.sock, "disk")]))
        merged = []
        for e in got:
            merged.append((e["offset"], e["length"], e["type"]))
        assert merged == expect
        listing = subprocess.check_output(["nbdinfo", "--list", uri(s.sock, "")]).decode()
        assert 'export="disk"' in listing and 'export="image"' in listing
    finally:
        log = s.stop()
    assert "connection" in log and "stopped; pool committed" in log


def test_qemu_io_unaligned_patterns(served):
    need("qemu-io")
    u = uri(served.sock, "disk")
    cmds = []
    for off, length, pat in [(4097, 10000, 0x55), (65535, 70000, 0xAA), (63 * MiB + 123, 4000, 0x11)]:
        cmds += ["-c", f"write -P {pat:#x} {off} {length}", "-c", f"read -P {pat:#x} {off} {length}"]
    out = subprocess.run(["qemu-io", "-f", "raw", *cmds, u], capture_output=True, text=True)
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout + out.stderr


def test_qemu_img_convert_and_compare(pool_dir, tmp_path):
    need("qemu-img")
    with Pool.open(pool_dir) as pool:
        expected = pool.device("disk").pread(64 * MiB, 0)
    s = Served(pool_dir, tmp_path / "s.sock")
    try:
        out = tmp_path / "out.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri(s.sock, "disk"),
                        str(out)], check=True)
        assert out.read_bytes() == expected
        assert os.stat(out).st_blocks * 512 < 8 * MiB  # holes stayed holes
        subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(out),
                        uri(s.sock, "image")], check=True, capture_output=True)
    finally:
        s.stop()


def test_nbdcopy_in_and_out_with_four_connections_keeps_holes(pool_dir, tmp_path):
    need("nbdcopy")
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(64 * MiB)
        for i in range(0, 64, 8):
            f.seek(i * MiB + 12345)
            f.write(os.urandom(200000))
    s = Served(pool_dir, tmp_path / "s.sock")
    try:
        subprocess.run(["nbdcopy", "-C", "4", str(src), uri(s.sock, "disk")], check=True)
        back = tmp_path / "back.raw"
        subprocess.run(["nbdcopy", "-C", "4", uri(s.sock, "disk"), str(back)], check=True)
        assert back.read_bytes() == src.read_bytes()
        assert os.stat(back).st_blocks * 512 < 16 * MiB
    finally:
        s.stop()
    with Pool.open(pool_dir) as pool:
        mapped = sum(e.length for e in pool.device("disk").block_status() if e.mapped)
        assert mapped < 16 * MiB  # zero ranges were not allocated
        assert pool.check().ok


def nbdsh(*args):
    """nbdsh runs `python3 -m nbd`: the system python has the module."""
    need("nbdsh")
    env = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))
    return subprocess.run(["nbdsh", *args], capture_output=True, text=True, env=env, timeout=120)


def test_unaligned_sizes_through_nbdcopy_qemu_img_and_nbdsh(served, tmp_path):
    """The engine is byte-granular, so the server advertises a minimum block
    size of 1 and libnbd (strict about alignment) and qemu take any length
    and offset, as nbdkit's test-cow-unaligned.sh checks."""
    need("nbdcopy")
    need("qemu-img")
    u = uri(served.sock, "disk")
    info = json.loads(subprocess.check_output(["nbdinfo", "--json", u]))["exports"][0]
    assert info["block_size_minimum"] == 1
    src = tmp_path / "f"
    src.write_bytes(os.urandom(1000003))
    subprocess.run(["nbdcopy", str(src), u], check=True, capture_output=True)
    back = tmp_path / "back"
    subprocess.run(["nbdcopy", u, str(back)], check=True)
    assert back.read_bytes()[:1000003] == src.read_bytes()
    odd = tmp_path / "odd"
    odd.write_bytes(os.urandom(130001))
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(odd),
                    uri(served.sock, "disk")], check=True, capture_output=True)
    r = nbdsh("--connect", u, "-c", f"""
buf = h.pread(130001, 0)
assert buf == open({str(odd)!r}, "rb").read(), "qemu-img's odd tail"
pat = b"abcdefghijklm" * 10000
h.pwrite(pat, 4097)
assert h.pread(len(pat), 4097) == pat
assert h.pread(3, 4096) == buf[4096:4097] + pat[:2]
""")
    assert r.returncode == 0, r.stderr


def test_fio_random_writes_verify(served, tmp_path):
    need("fio")
    if "nbd" not in subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout:
        pytest.skip("this fio has no nbd engine")
    r = subprocess.run(["fio", "--name=v", "--ioengine=nbd", f"--uri={uri(served.sock, 'disk')}",
                        "--rw=randwrite", "--bs=4k", "--size=16M", "--iodepth=16",
                        "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
                        "--output-format=json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout[r.stdout.index("{"):])
    assert result["jobs"][0]["error"] == 0


def test_read_only_export_gives_eperm(served):
    c = Client(served.sock)
    c.go("image")
    assert c.tflags & 2  # READ_ONLY advertised
    c.request(CMD_WRITE, 0, 4, b"abcd")
    assert c.reply()[1] == 1  # EPERM
    c.request(CMD_TRIM, 0, 65536)
    assert c.reply()[1] == 1
    assert c.read(65536 * 5, 10) == pattern(1, 10)  # reads still work
    c.close()


def test_requests_answered_and_errors_keep_the_connection(served):
    c = Client(served.sock)
    c.go("disk")
    c.request(CMD_WRITE, 100, 5, b"hello")
    assert c.reply()[1] == 0
    assert c.read(100, 5) == b"hello"
    c.request(CMD_READ, 64 * MiB - 10, 20)          # past the end
    assert c.reply()[1] == 22                         # EINVAL
    c.request(CMD_WRITE, 64 * MiB - 2, 4, b"abcd")   # past the end
    assert c.reply()[1] == 28                         # ENOSPC
    c.request(42, 0, 0)                               # unknown command
    assert c.reply()[1] == 22
    c.request(CMD_READ, 0, 10, flags=1 << 7)          # unknown flag
    assert c.reply()[1] == 22
    c.request(CMD_FLUSH, 0, 0)
    assert c.reply()[1] == 0
    c.request(CMD_BLOCK_STATUS, 0, 1 * MiB)
    cookie, err, chunks = c.reply()
    assert err == 0 and chunks[0][0] == 5
    ctx, l1, f1 = struct.unpack(">III", chunks[0][1][:12])
    assert (l1, f1) == (65536, 0)  # block 0 now mapped (the write above)
    assert c.read(100, 5) == b"hello"
    c.request(CMD_DISC, 0, 0)
    c.close()


def test_out_of_order_replies(served):
    """Many requests in flight at once, answered (by cookie) whatever the order."""
    c = Client(served.sock)
    c.go("disk", structured=False)
    cookies = {}
    for i in range(64):
        cookies[c.request(CMD_WRITE, i * 4096, 4096, pattern(i, 4096))] = i
    seen = set()
    for _ in range(64):
        cookie, err, _ = c.reply()
        assert err == 0 and cookie in cookies
        seen.add(cookie)
    assert len(seen) == 64
    for i in (0, 17, 63):
        assert c.read(i * 4096, 4096) == pattern(i, 4096)
    c.close()


def test_malformed_handshakes_and_requests(served, pool_dir):
    # bad option magic: dropped
    c = Client(served.sock)
    c.option(7, b"", magic=0x1234)
    with pytest.raises((EOFError, ConnectionError)):
        c.recv(1)
    c.close()
    # an option announcing 1 GiB: refused, not buffered
    c = Client(served.sock)
    c.option(99, length=1 << 30)
    assert c.option_reply()[1] == (1 << 31) + 9   # ERR_TOO_BIG
    c.close()
    # unknown option: ERR_UNSUP and the haggling goes on
    c = Client(served.sock)
    c.option(99, b"xyz")
    assert c.option_reply()[1] == (1 << 31) + 1
    replies = c.go("nope")
    assert replies[-1][0] == (1 << 31) + 6        # ERR_UNKNOWN
    assert b"exports: disk, image" in replies[-1][1]
    assert c.go("disk")[-1][0] == 1                # still usable
    # a write announcing more than the maximum payload: refused and dropped
    c.request(CMD_WRITE, 0, 1 << 30)
    assert c.reply()[1] == 75                      # EOVERFLOW
    c.close()
    # bad request magic: dropped
    c = Client(served.sock)
    c.go("disk")
    c.request(CMD_READ, 0, 10, magic=0xDEADBEEF)
    with pytest.raises((EOFError, ConnectionError)):
        c.reply()
    c.close()
    # a client that vanishes in the middle of a write's payload
    c = Client(served.sock)
    c.go("disk")
    c.s.sendall(struct.pack(">IHHQQI", 0x25609513, 0, CMD_WRITE, 1, 0, 4096) + b"x" * 100)
    c.close()
    # SET_META_CONTEXT before structured replies: invalid, connection lives
    c = Client(served.sock)
    c.option(10, struct.pack(">I", 4) + b"disk" + struct.pack(">I", 0))
    assert c.option_reply()[1] == (1 << 31) + 3
    c.option(2)
    assert c.option_reply()[1] == 1                # ABORT acknowledged
    c.close()
    # the server lives on and the data is intact
    assert served.alive()
    c = Client(served.sock)
    c.go("disk")
    assert c.read(65536 * 5, 100) == pattern(1, 100)
    assert c.read(0, 100) == bytes(100)
    c.close()


def test_default_export_and_full_pool(tmp_path):
    path = tmp_path / "small"
    with Pool.create(path, 16 * 65536, 65536, commit_interval=0) as pool:
        pool.create_thin("only", 64 * MiB)
    s = Served(path, tmp_path / "s.sock")
    try:
        c = Client(s.sock)
        c.go("")                                   # the default export: the only device
        data = os.urandom(65536)
        for i in range(16):
            c.request(CMD_WRITE, i * 65536, 65536, data)
            assert c.reply()[1] == 0
        c.request(CMD_WRITE, 20 * 65536, 65536, data)
        assert c.reply()[1] == 28                  # ENOSPC: the pool is full
        assert c.read(3 * 65536, 65536) == data    # the connection and data live on
        c.request(CMD_TRIM, 0, 2 * 65536)
        assert c.reply()[1] == 0
        c.request(CMD_WRITE, 20 * 65536, 65536, data)
        assert c.reply()[1] == 0                   # freed blocks are used again
        c.close()
    finally:
        s.stop()


def test_snapshots_while_nbd_clients_write_are_point_in_time(tmp_path):
    """A client writes sequence numbers through NBD while the pool takes
    snapshots: each snapshot holds every write acknowledged before it began
    and none sent after it returned."""
    pool = Pool.create(tmp_path / "p", 128 * MiB, 65536, commit_interval=0.2)
    pool.create_thin("disk", 32 * MiB)
    server = NBDServer(pool, socket_path=str(tmp_path / "s.sock"), workers=4)
    server.start()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    c = Client(str(tmp_path / "s.sock"))
    c.go("disk", structured=False)
    acked, sent = {}, {}
    snaps = []
    stop = threading.Event()

    def writer():
        for seq in range(1, 3000):
            slot = seq % 4096
            sent[seq] = time.monotonic_ns()
            c.request(CMD_WRITE, slot * 4096, 8, struct.pack(">Q", seq))
            assert c.reply()[1] == 0
            acked[seq] = time.monotonic_ns()
            if stop.is_set():
                return
    w = threading.Thread(target=writer)
    w.start()
    for i in range(8):
        time.sleep(0.02)
        begin = time.monotonic_ns()
        pool.snapshot("disk", f"s{i}", read_only=True)
        snaps.append((f"s{i}", begin, time.monotonic_ns()))
    stop.set()
    w.join()
    c.close()
    server._stop.set()
    t.join()
    server.stop()
    for name, begin, end in snaps:
        dev = pool.device(name)
        for seq in acked:
            slot = seq % 4096
            got = struct.unpack(">Q", dev.pread(8, slot * 4096))[0]
            later = [s for s in acked if s % 4096 == slot and s > seq]
            if acked[seq] < begin and not any(acked[s] < begin for s in later):
                assert got == seq, f"{name}: write {seq} acknowledged before it is missing"
            if sent[seq] > end:
                assert got != seq, f"{name}: write {seq} sent after it is in it"
    assert pool.check().ok
    pool.close()


@pytest.mark.parametrize("limit", ["options", "seconds"])
def test_a_busy_client_cannot_hold_the_handshake_forever(tmp_path, monkeypatch, limit):
    """The socket timeout stops a silent client; a client that keeps sending
    options (each answered) is stopped by the limits on options and on the
    handshake's total time."""
    from cowblock.nbd import protocol as P
    from cowblock.nbd.handshake import HandshakeError, negotiate
    from cowblock.nbd.server import Catalog
    monkeypatch.setattr(P, "MAX_OPTIONS", 10 if limit == "options" else 10**6)
    monkeypatch.setattr(P, "HANDSHAKE_SECONDS", 10**6 if limit == "options" else 0.5)
    with Pool.create(tmp_path / "p", 1 << 20, 4096) as pool:
        pool.create_thin("disk", 1 << 16)
        server, client = socket.socketpair()
        server.settimeout(5)
        ended = {}

        def serve():
            try:
                negotiate(server, Catalog(pool, None, False))
            except (HandshakeError, TimeoutError) as e:  # the deadline may end a read
                ended["why"] = str(e)
            server.close()

        t = threading.Thread(target=serve)
        t.start()
        client.recv(18)
        client.sendall(struct.pack(">I", 3))
        sent = 0
        try:
            while t.is_alive() and sent < 1000:
                client.sendall(struct.pack(">QII", P.IHAVEOPT, 99, 0))  # unknown: ERR_UNSUP
                sent += 1
                time.sleep(0.1 if limit == "seconds" else 0)
        except OSError:
            pass
        t.join(10)
        client.close()
        assert not t.is_alive()
        if limit == "options":
            assert "10 options" in ended["why"]
        else:
            assert "s allowed" in ended["why"] or "timed out" in ended["why"], ended
            assert sent < 50


def test_two_clients_fill_the_pool_then_it_grows_under_them(tmp_path):
    """Two NBD clients write two devices at once until the pool is full:
    writes that need a block get ENOSPC, nothing else fails (overwrites of
    blocks a device owns, reads), nothing written changes; the pool is grown
    through the control socket while served, and the retries succeed."""
    import cowblock
    path = tmp_path / "p"
    with Pool.create(path, 32 * 65536, 65536, commit_interval=0) as pool:
        pool.set_config({"health": {"min_free_space": 0}})
        pool.create_thin("a", 64 * MiB)
        pool.create_thin("b", 64 * MiB)
    s = Served(path, tmp_path / "s.sock")
    try:
        written, refused = {}, {}

        def fill(name, seed):
            c = Client(s.sock)
            c.go(name)
            written[name], refused[name] = {}, []
            for i in range(32):
                data = pattern(seed + i, 65536)
                c.request(CMD_WRITE, i * 65536, 65536, data)
                err = c.reply()[1]
                if err == 0:
                    written[name][i] = data
                else:
                    assert err == 28, f"{name} block {i}: error {err}, not ENOSPC"
                    refused[name].append(i)
            c.close()

        threads = [threading.Thread(target=fill, args=(n, k)) for n, k in (("a", 0), ("b", 100))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(written["a"]) + len(written["b"]) == 32      # every block given out once
        assert len(refused["a"]) + len(refused["b"]) == 32
        for name, seed in (("a", 0), ("b", 100)):
            c = Client(s.sock)
            c.go(name)
            for i, data in written[name].items():
                assert c.read(i * 65536, 65536) == data
            if written[name]:                                    # an owned block: in place
                i = next(iter(written[name]))
                c.request(CMD_WRITE, i * 65536, 4096, b"o" * 4096)
                assert c.reply()[1] == 0
                written[name][i] = b"o" * 4096 + written[name][i][4096:]
            c.close()
        with cowblock.connect(path) as pool:                     # through the daemon
            pool.resize(96 * 65536)
        for name, seed in (("a", 0), ("b", 100)):
            c = Client(s.sock)
            c.go(name)
            for i in refused[name]:
                c.request(CMD_WRITE, i * 65536, 65536, pattern(seed + i, 65536))
                assert c.reply()[1] == 0
                written[name][i] = pattern(seed + i, 65536)
            for i, data in written[name].items():
                assert c.read(i * 65536, 65536) == data
            c.close()
    finally:
        s.stop()
    with Pool.open(path) as pool:
        assert pool.check().ok
        for name in ("a", "b"):
            dev = pool.device(name)
            for i, data in written[name].items():
                assert dev.pread(65536, i * 65536) == data


def test_two_clients_exhaust_metadata_then_it_grows_under_them(tmp_path):
    """The same with metadata: scattered 4 KiB writes from two clients until
    the metadata runs short.  ENOSPC for what needs more, the pool stays
    writable (the reserve keeps commits possible, FLUSH works), and growing
    the metadata through the control socket lets the retries through."""
    import cowblock
    path = tmp_path / "p"
    blocks = 65536
    with Pool.create(path, 2 * blocks * 4096, 4096, metadata_size=1 << 20,
                     commit_interval=0) as pool:
        pool.set_config({"health": {"min_free_space": 0}})
        pool.create_thin("a", blocks * 4096)
        pool.create_thin("b", blocks * 4096)
    s = Served(path, tmp_path / "s.sock")
    try:
        written, refused = {"a": {}, "b": {}}, {"a": [], "b": []}

        def scatter(name, seed):
            c = Client(s.sock)
            c.go(name)
            for i in range(blocks // 2):
                b = (i * 2654435761 + seed) % blocks
                data = pattern(seed + i, 512)
                c.request(CMD_WRITE, b * 4096, 512, data)
                err = c.reply()[1]
                if err:
                    assert err == 28, f"{name}: error {err}, not ENOSPC"
                    refused[name].append((b, data))
                    if len(refused[name]) > 20:
                        break
                else:
                    written[name][b] = data
            c.request(CMD_FLUSH, 0, 0)                  # commits still work
            assert c.reply()[1] == 0
            c.close()

        threads = [threading.Thread(target=scatter, args=(n, k)) for n, k in (("a", 0), ("b", 7))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert refused["a"] or refused["b"], "the metadata never ran short"
        with cowblock.connect(path) as pool:
            assert not pool.stats().read_only and not pool.stats().needs_check
            pool.resize_metadata(4 << 20)
        for name in ("a", "b"):
            c = Client(s.sock)
            c.go(name)
            for b, data in refused[name]:
                c.request(CMD_WRITE, b * 4096, 512, data)
                assert c.reply()[1] == 0
                written[name][b] = data
            for b, data in written[name].items():
                assert c.read(b * 4096, 512) == data
            c.close()
    finally:
        s.stop()
    with Pool.open(path) as pool:
        assert pool.check().ok
