"""TLS on `cowblock serve`: STARTTLS with PSK (psktool's files) and X.509
(certtool's certificates), against nbdinfo, nbdsh, nbdcopy, fio and
qemu-img, and against a raw client that skips STARTTLS, sends it late, or
brings the wrong key."""
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

import pytest

from cowblock import InvalidArgumentError, Pool
from cowblock.errors import HostFileError
from cowblock.nbd import handshake
from cowblock.nbd.server import Catalog, NBDServer, parse_listen
from cowblock.nbd.tls import TLSConfig
from corebuild import build_core_copy
from helpers import pattern
from nbdclient import (CMD_READ, CMD_WRITE, ERR_INVALID, ERR_TLS_REQD, ERR_UNSUP, OPT_ABORT,
                       OPT_EXPORT_NAME, OPT_INFO, OPT_LIST, OPT_SET_META, OPT_STRUCTURED, REP_ACK,
                       SIMPLE_MAGIC, Client)
from test_nbd import nbdsh, need, pool_dir  # noqa: F401  (pool_dir: the same fixture)

MiB = 1 << 20
COWBLOCK = shutil.which("cowblock")


def tool(name, package="gnutls-bin"):
    if not shutil.which(name):
        pytest.skip(f"{name} is not installed (apt-get install {package})")


def gnutls_tool(*args):
    """psktool or certtool, without a preloaded sanitizer runtime (under
    tests/test_sanitizers.py certtool hangs in it): they only make files."""
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    subprocess.run(args, check=True, capture_output=True, env=env, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """alice's key as psktool writes it, a directory holding it as qemu wants
    (keys.psk), and a file with another key for alice."""
    tool("psktool")
    d = tmp_path_factory.mktemp("psk")
    gnutls_tool("psktool", "-u", "alice", "-p", str(d / "keys.psk"))
    gnutls_tool("psktool", "-u", "alice", "-p", str(d / "wrong.psk"))
    return d


def certtool(*args):
    gnutls_tool("certtool", *args)


def make_ca(d, name):
    certtool("--generate-privkey", "--key-type", "ecdsa", "--outfile", str(d / "ca-key.pem"))
    (d / "ca.info").write_text(f"cn = {name}\nca\ncert_signing_key\nexpiration_days = 30\n")
    certtool("--generate-self-signed", "--load-privkey", str(d / "ca-key.pem"), "--template",
             str(d / "ca.info"), "--outfile", str(d / "ca-cert.pem"))


def sign(ca, d, role, info):
    certtool("--generate-privkey", "--key-type", "ecdsa", "--outfile", str(d / f"{role}-key.pem"))
    (d / f"{role}.info").write_text(info + "signing_key\nencryption_key\nexpiration_days = 30\n")
    certtool("--generate-certificate", "--load-ca-certificate", str(ca / "ca-cert.pem"),
             "--load-ca-privkey", str(ca / "ca-key.pem"), "--load-privkey", str(d / f"{role}-key.pem"),
             "--template", str(d / f"{role}.info"), "--outfile", str(d / f"{role}-cert.pem"))
    shutil.copy(ca / "ca-cert.pem", d / "ca-cert.pem")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """server/ (nbdkit's --tls-certificates layout), client/ (qemu's and
    libnbd's: ca-cert.pem, client-cert.pem, client-key.pem) and stranger/ (a
    client certificate another CA signed)."""
    tool("certtool")
    root = tmp_path_factory.mktemp("x509")
    dirs = {n: root / n for n in ("ca", "other-ca", "server", "client", "stranger")}
    for d in dirs.values():
        d.mkdir()
    make_ca(dirs["ca"], "cowblock test CA")
    make_ca(dirs["other-ca"], "another CA")
    sign(dirs["ca"], dirs["server"], "server",
         "cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\n")
    sign(dirs["ca"], dirs["client"], "client", "cn = client one\ntls_www_client\n")
    sign(dirs["other-ca"], dirs["stranger"], "client", "cn = stranger\ntls_www_client\n")
    shutil.copy(dirs["ca"] / "ca-cert.pem", dirs["stranger"] / "ca-cert.pem")  # trusts our server
    return dirs


class Server:
    """`cowblock serve` in a subprocess (on 127.0.0.1 and a free port unless
    socket= is given); its log is read as it goes."""

    def __init__(self, pool_dir, *args, socket=None):
        if COWBLOCK is None:
            pytest.skip("the cowblock command is not installed")
        where = ["--socket", str(socket)] if socket else ["--listen", "127.0.0.1:0"]
        self.proc = subprocess.Popen([COWBLOCK, "--pool", str(pool_dir), "serve", *where, *args],
                                     stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stderr),
                                       daemon=True)
        self.reader.start()
        for _ in range(400):
            found = [re.search(r"serving .* on (?:127\.0\.0\.1:(\d+)|(/.*?))(?: read-only)?$", line)
                     for line in self.lines]
            found = [m for m in found if m]
            if found:
                self.port = int(found[0].group(1)) if found[0].group(1) else None
                self.sock = found[0].group(2)
                return
            if self.proc.poll() is not None:
                self.reader.join(5)
                raise AssertionError("".join(self.lines))
            time.sleep(0.05)
        raise AssertionError("the server never said it was serving")

    def log(self):
        return "".join(self.lines)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.reader.join(10)
        return self.log()


@pytest.fixture
def psk_server(pool_dir, keys):
    s = Server(pool_dir, "--tls=require", "--tls-psk", str(keys / "keys.psk"))
    yield s
    s.stop()


def nbds(server, export, psk_file, user="alice"):
    # libnbd 1.14 asks getlogin() for a user the URI's authority does not
    # name, even with tls-username, and there is no login under pytest
    return (f"nbds://{user}@127.0.0.1:{server.port}/{export}?tls-psk-file={psk_file}"
            f"&tls-username={user}")


def psk_object(keys, name="tls0"):
    return f"tls-creds-psk,id={name},endpoint=client,dir={keys},username=alice"


def qemu_nbd_opts(server, export, creds="tls0"):
    return (f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={server.port},"
            f"export={export},tls-creds={creds}")


# ---- real clients ----

def test_nbdinfo_with_a_psk_file(psk_server, keys):
    need("nbdinfo")
    out = subprocess.run(["nbdinfo", "--json", nbds(psk_server, "disk", keys / "keys.psk")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + psk_server.log()
    info = json.loads(out.stdout)
    assert info["TLS"] is True and info["exports"][0]["export-size"] == 64 * MiB
    listing = subprocess.check_output(["nbdinfo", "--list", nbds(psk_server, "", keys / "keys.psk")],
                                      text=True, timeout=60)
    assert 'export="disk"' in listing and 'export="image"' in listing
    time.sleep(0.2)
    assert "psk user alice" in psk_server.log()


def test_nbdinfo_with_a_wrong_key_or_user_is_refused(psk_server, keys):
    need("nbdinfo")
    for psk, user in ((keys / "wrong.psk", "alice"), (keys / "keys.psk", "mallory")):
        out = subprocess.run(["nbdinfo", nbds(psk_server, "disk", psk, user)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode != 0
        assert "export-size" not in out.stdout
    time.sleep(0.2)
    assert psk_server.log().count("TLS handshake failed") == 2, psk_server.log()
    assert "PSK user or key is not in the PSK file" in psk_server.log()
    assert "psk user" not in psk_server.log()


def test_qemu_img_with_psk_reads_and_writes_byte_exact(psk_server, keys, pool_dir, tmp_path):
    need("qemu-img")
    obj = ["--object", psk_object(keys)]
    info = subprocess.run(["qemu-img", "info", *obj, "--image-opts",
                           qemu_nbd_opts(psk_server, "disk")], capture_output=True, text=True,
                          timeout=60)
    assert info.returncode == 0, info.stderr
    assert "67108864 bytes" in info.stdout
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(3 * MiB + 12345))
    subprocess.run(["qemu-img", "convert", "-n", *obj, "-f", "raw", str(src), "--target-image-opts",
                    qemu_nbd_opts(psk_server, "disk")], check=True, capture_output=True, timeout=120)
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", *obj, "--image-opts", qemu_nbd_opts(psk_server, "disk"),
                    "-O", "raw", str(back)], check=True, capture_output=True, timeout=120)
    expect = bytearray(64 * MiB)                     # test_nbd's pool_dir, then src over it
    expect[40 * MiB:40 * MiB + 4096] = pattern(2, 4096)
    expect[:src.stat().st_size] = src.read_bytes()
    assert back.read_bytes() == expect


def test_nbdcopy_and_nbdsh_over_tls_are_byte_exact(psk_server, keys, tmp_path):
    """Four TLS connections at once (nbdcopy -C 4), an odd size, read back."""
    need("nbdcopy")
    src = tmp_path / "src.raw"
    with open(src, "wb") as f:
        f.truncate(40 * MiB + 4097)
        for i in range(0, 40, 3):
            f.seek(i * MiB + 777)
            f.write(os.urandom(300000))
    u = nbds(psk_server, "disk", keys / "keys.psk")
    subprocess.run(["nbdcopy", "-C", "4", str(src), u], check=True, timeout=300)
    back = tmp_path / "back.raw"
    subprocess.run(["nbdcopy", "-C", "4", u, str(back)], check=True, timeout=300)
    assert back.read_bytes()[:src.stat().st_size] == src.read_bytes()
    r = nbdsh("-c", f"""
h.set_uri_allow_local_file(True)    # the tls-psk-file
h.connect_uri({u!r})
assert h.get_tls_negotiated()
buf = h.pread(4096, 39 * {MiB} + 777)
assert buf == open({str(src)!r}, "rb").read()[39 * {MiB} + 777:][:4096]
h.pwrite(b"x" * 100003, 12345)
assert h.pread(100003, 12345) == b"x" * 100003
""")
    assert r.returncode == 0, r.stderr


def test_nbdsh_many_requests_in_flight_over_one_tls_session(psk_server, keys):
    """The workers' replies share one TLS session (one sender at a time):
    256 writes and then 256 reads in flight at once, every one verified.
    (fio's nbd engine cannot do TLS here: libnbd refuses tls-psk-file in a
    URI unless the program allows local files, which fio does not.)"""
    r = nbdsh("-c", f"""
import os
h.set_uri_allow_local_file(True)
h.connect_uri({nbds(psk_server, "disk", keys / "keys.psk")!r})
blocks = {{i: os.urandom(4096 + i) for i in range(256)}}
for i, data in blocks.items():
    h.aio_pwrite(data, i * 12289)
while h.aio_in_flight():
    h.poll(-1)
bufs = {{i: nbd.Buffer(4096 + i) for i in blocks}}
cookies = {{i: h.aio_pread(bufs[i], i * 12289) for i in blocks}}
while h.aio_in_flight():
    h.poll(-1)
for i, data in blocks.items():
    assert h.aio_command_completed(cookies[i])
    assert bufs[i].to_bytearray() == data, i
""")
    assert r.returncode == 0, r.stderr


def x509_object(certs, name="tls0", who="client"):
    return f"tls-creds-x509,id={name},endpoint=client,dir={certs[who]}"


def test_qemu_img_and_nbdinfo_with_certificates(pool_dir, certs):
    need("qemu-img")
    need("nbdinfo")
    s = Server(pool_dir, "--tls=require", "--tls-certificates", str(certs["server"]))
    try:
        info = subprocess.run(["qemu-img", "info", "--object", x509_object(certs), "--image-opts",
                               qemu_nbd_opts(s, "disk")], capture_output=True, text=True,
                              timeout=60)
        assert info.returncode == 0, info.stderr
        assert "67108864 bytes" in info.stdout
        out = subprocess.run(["nbdinfo", "--json", f"nbds://localhost:{s.port}/image?"
                              f"tls-certificates={certs['client']}"], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["exports"][0]["is_read_only"] is True
    finally:
        log = s.stop()
    assert log.count("TLS1.3") == 2
    assert log.count("no client certificate") == 2      # none asked for without verify-peer


def test_qemu_img_and_raw_clients_verify_peer_needs_a_certificate_our_ca_signed(pool_dir, certs):
    need("qemu-img")
    s = Server(pool_dir, "--tls=require", "--tls-certificates", str(certs["server"]),
               "--tls-verify-peer")
    try:
        def info(who):
            return subprocess.run(["qemu-img", "info", "--object", x509_object(certs, who=who),
                                   "--image-opts", qemu_nbd_opts(s, "disk")],
                                  capture_output=True, text=True, timeout=60)
        assert info("client").returncode == 0
        # qemu will not even present a certificate its own CA did not sign,
        # so the refusals are shown by a raw client: no certificate, a stranger's
        for who in (None, "stranger"):
            ctx = ssl.create_default_context(cafile=str(certs["client"] / "ca-cert.pem"))
            if who:
                ctx.load_cert_chain(certs[who] / "client-cert.pem", certs[who] / "client-key.pem")
            c = Client(("127.0.0.1", s.port))
            with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
                assert c.starttls(ctx) == REP_ACK   # TLS 1.3: the refusal comes after
                c.go("disk")
            c.close()
    finally:
        log = s.stop()
    assert "x509 CN=client one" in log
    assert log.count("TLS handshake failed") == 2, log
    assert "Certificate is required" in log and "not trusted" in log.lower()
    assert "CN=stranger" not in log


# ---- the protocol, with a raw client ----

@pytest.fixture
def x509_unix(pool_dir, certs, tmp_path):
    """--tls=require with certificates on a Unix socket, and a Python ssl
    context that trusts it (Python's ssl has no PSK before 3.13)."""
    s = Server(pool_dir, "--tls=require", "--tls-certificates", str(certs["server"]),
               socket=tmp_path / "s.sock")
    ctx = ssl.create_default_context(cafile=str(certs["client"] / "ca-cert.pem"))
    yield s, ctx
    s.stop()


def test_a_client_that_skips_starttls_is_refused(x509_unix):
    s, ctx = x509_unix
    c = Client(s.sock)
    for opt, data in ((OPT_LIST, b""), (OPT_STRUCTURED, b""), (99, b"x"),
                      (OPT_INFO, struct.pack(">I", 4) + b"disk" + struct.pack(">H", 0))):
        c.option(opt, data)
        reply = c.option_reply()
        assert reply[1] == ERR_TLS_REQD, (opt, reply)
        assert b"STARTTLS" in reply[2]
    replies = c.go("disk", structured=False)
    assert replies[-1][0] == ERR_TLS_REQD and len(replies) == 1   # GO too: no export info
    c.option(OPT_ABORT)
    assert c.option_reply()[1] == REP_ACK
    c.close()
    c = Client(s.sock)                 # EXPORT_NAME cannot be refused: the client is dropped
    c.option(OPT_EXPORT_NAME, b"disk")
    with pytest.raises((EOFError, ConnectionError)):
        c.recv(1)
    c.close()
    c = Client(s.sock)                 # STARTTLS carries no data
    c.option(5, b"junk")
    assert c.option_reply()[1] == ERR_INVALID
    assert c.starttls(ctx) == REP_ACK
    assert c.starttls(ctx) == ERR_INVALID          # once only
    assert c.go("disk")[-1][0] == REP_ACK
    assert c.read(65536 * 5, 100) == pattern(1, 100)
    c.close()
    assert s.proc.poll() is None


@pytest.mark.parametrize("mode", ["on", "require"])
def test_state_before_starttls_is_forgotten(pool_dir, certs, tmp_path, mode):
    """On an "on" listener a client may negotiate before STARTTLS; all of it
    is forgotten: the server answers as if structured replies and contexts
    had never been asked for."""
    s = Server(pool_dir, f"--tls={mode}", "--tls-certificates", str(certs["server"]),
               socket=tmp_path / "s.sock")
    ctx = ssl.create_default_context(cafile=str(certs["client"] / "ca-cert.pem"))
    try:
        c = Client(s.sock)
        meta = struct.pack(">I", 4) + b"disk" + struct.pack(">II", 1, 15) + b"base:allocation"
        c.option(OPT_STRUCTURED)
        structured = c.option_reply()[1]
        if mode == "on":
            assert structured == REP_ACK
            c.option(OPT_SET_META, meta)
            assert c.replies_until_ack()[-1][0] == REP_ACK
        assert c.starttls(ctx) == REP_ACK
        c.option(OPT_SET_META, meta)                    # needs structured replies: forgotten
        assert c.option_reply()[1] == ERR_INVALID
        replies = c.go("disk", structured=False)
        assert replies[-1][0] == REP_ACK
        assert not struct.unpack(">QH", [d for t, d in replies if t == 3][0][2:12])[1] & (1 << 7)
        c.request(CMD_READ, 65536 * 5, 8)               # a simple reply: no structured chunks
        assert struct.unpack(">I", c.recv(4))[0] == SIMPLE_MAGIC
        assert struct.unpack(">IQ", c.recv(12))[0] == 0 and c.recv(8) == pattern(1, 8)
        c.request(7, 0, 65536)                          # BLOCK_STATUS: no context survived
        assert c.reply()[1] == 22
        c.request(CMD_WRITE, 0, 5, b"hello")
        assert c.reply()[1] == 0 and c.read(0, 5) == b"hello"
        c.close()
    finally:
        s.stop()


def test_plain_and_nbdinfo_tls_clients_are_served_when_tls_is_on(pool_dir, keys, tmp_path):
    s = Server(pool_dir, "--tls=on", "--tls-psk", str(keys / "keys.psk"),
               socket=tmp_path / "s.sock")
    try:
        c = Client(s.sock)
        assert c.go("disk")[-1][0] == REP_ACK
        assert c.read(65536 * 5, 10) == pattern(1, 10)
        c.close()
        if shutil.which("nbdinfo"):
            out = subprocess.run(["nbdinfo", "--json", f"nbds+unix://alice@/disk?socket={s.sock}"
                                  f"&tls-psk-file={keys / 'keys.psk'}&tls-username=alice"],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert json.loads(out.stdout)["TLS"] is True
    finally:
        s.stop()


def test_starttls_without_tls_is_unsupported(pool_dir, tmp_path):
    s = Server(pool_dir, socket=tmp_path / "s.sock")
    try:
        c = Client(s.sock)
        assert c.starttls(None) == ERR_UNSUP
        assert c.go("disk")[-1][0] == REP_ACK           # and the haggling goes on
        c.close()
    finally:
        s.stop()


def test_a_silent_client_after_starttls_times_out(tmp_path, keys):
    with Pool.create(tmp_path / "p", 1 << 20, 4096) as pool:
        pool.create_thin("disk", 1 << 16)
        server, client = socket.socketpair()
        server.settimeout(0.5)
        tls = TLSConfig("require", psk_file=str(keys / "keys.psk"))
        result = {}

        def serve():
            try:
                result["session"] = handshake.negotiate(server, Catalog(pool, None, False), tls)
            except Exception as e:  # noqa: BLE001  (what it raised is the result)
                result["error"] = e

        t = threading.Thread(target=serve)
        began = time.monotonic()
        t.start()
        client.recv(18)
        client.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 5, 0))
        assert client.recv(20)[12:16] == struct.pack(">I", REP_ACK)
        t.join(10)                                      # ... and never a ClientHello
        assert isinstance(result.get("error"), TimeoutError), result
        assert time.monotonic() - began < 5
        server.close()
        client.close()


def test_stop_ends_tls_connections_in_transmission(tmp_path, certs):
    pool = Pool.create(tmp_path / "p", 64 * MiB, 65536)
    pool.create_thin("disk", 8 * MiB)
    tls = TLSConfig("require", certificates=str(certs["server"]))
    server = NBDServer(pool, socket_path=str(tmp_path / "s.sock"), tls=tls)
    server.start()
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    c = Client(str(tmp_path / "s.sock"))
    assert c.starttls(ssl.create_default_context(cafile=str(certs["client"] / "ca-cert.pem"))) \
        == REP_ACK
    c.go("disk")
    c.request(CMD_WRITE, 0, 65536, pattern(3, 65536))
    assert c.reply()[1] == 0
    server._stop.set()
    t.join(5)
    began = time.monotonic()
    server.stop()                                       # the connection is still open
    assert time.monotonic() - began < 10
    assert pool.device("disk").pread(65536, 0) == pattern(3, 65536)
    c.close()
    pool.close()


# ---- configuration ----

def test_a_network_address_needs_tls_that_authenticates(keys, certs):
    psk = str(keys / "keys.psk")
    for tls in (None, TLSConfig("on", psk_file=psk),
                TLSConfig("require", certificates=str(certs["server"]))):
        with pytest.raises(InvalidArgumentError) as exc:
            parse_listen("0.0.0.0:10809", tls=tls)
        assert "--tls=require" in str(exc.value) and "--insecure" in str(exc.value)
    assert parse_listen("0.0.0.0:10809", tls=TLSConfig("require", psk_file=psk)) == \
        ("0.0.0.0", 10809)
    assert parse_listen("0.0.0.0:10809", tls=TLSConfig(
        "require", certificates=str(certs["server"]), verify_peer=True))[1] == 10809
    assert parse_listen("0.0.0.0:10809", insecure=True)[1] == 10809
    assert parse_listen("127.0.0.1:10809")[1] == 10809


def test_bad_tls_configurations_are_refused_with_their_reason(tmp_path, keys, certs):
    psk = str(keys / "keys.psk")
    bad = tmp_path / "bad.psk"
    bad.write_text("alice:00ff\nbob 1234\n")
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(certs["server"] / "ca-cert.pem", half)
    shutil.copy(certs["server"] / "server-cert.pem", half)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(certs["server"], mismatched)
    shutil.copy(certs["client"] / "client-key.pem", mismatched / "server-key.pem")
    cases = [
        (dict(mode="require"), InvalidArgumentError, "needs credentials"),
        (dict(mode="off", psk_file=psk), InvalidArgumentError, "TLS off"),
        (dict(mode="sometimes", psk_file=psk), InvalidArgumentError, "off, on, require"),
        (dict(psk_file=psk, verify_peer=True), InvalidArgumentError, "--tls-certificates"),
        (dict(psk_file=str(tmp_path / "none.psk")), HostFileError, "none.psk"),
        (dict(psk_file=str(bad)), InvalidArgumentError, "bad.psk, line 2: not USERNAME:HEXKEY"),
        (dict(certificates=str(half)), HostFileError, "server-key.pem"),
        (dict(certificates=str(mismatched)), InvalidArgumentError, "server-cert.pem and key"),
    ]
    for kwargs, cls, message in cases:
        with pytest.raises(cls) as exc:
            TLSConfig(**kwargs)
        assert message in str(exc.value), (kwargs, str(exc.value))
    assert not TLSConfig().offered and TLSConfig(psk_file=psk).mode == "on"


def test_cli_tls_options(pool_dir, keys, tmp_path):
    if COWBLOCK is None:
        pytest.skip("the cowblock command is not installed")
    run = lambda *a: subprocess.run([COWBLOCK, "--pool", str(pool_dir), "serve", *a],
                                    capture_output=True, text=True, timeout=30)
    r = run("--listen", "0.0.0.0:0")
    assert r.returncode == 5 and "--tls=require" in r.stderr
    r = run("--socket", str(tmp_path / "s"), "--tls=require")
    assert r.returncode == 5 and "needs credentials" in r.stderr
    r = run("--listen", "0.0.0.0:0", "--tls=on", "--tls-psk", str(keys / "keys.psk"))
    assert r.returncode == 5 and "clients must authenticate" in r.stderr


def test_without_gnutls_tls_says_what_to_install(tmp_path, keys):
    """A core built without GnuTLS still serves plain NBD; asking it for
    TLS names the missing package."""
    build = tmp_path / "build"
    build_core_copy(str(build), env={"COWBLOCK_GNUTLS": "0"})
    probe = subprocess.run(
        [sys.executable, "-c",
         "from cowblock._native import lib; from cowblock.nbd.tls import TLSConfig\n"
         "assert lib.cb_tls_available() == 0\n"
         f"TLSConfig('require', psk_file={str(keys / 'keys.psk')!r})"],
        cwd=str(build), env=dict(os.environ, PYTHONPATH=str(build)), capture_output=True,
        text=True)
    assert probe.returncode != 0
    assert "InvalidArgumentError" in probe.stderr and "libgnutls28-dev" in probe.stderr
