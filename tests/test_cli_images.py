"""The installed `cowblock` command: import/export, images and containers,
run as a user would (subprocess), against files made on the spot."""
import json
import os
import pty
import random
import shutil
import subprocess

import pytest

from cowblock import Pool
from helpers import write_file

MiB = 1 << 20
BS = 64 * 1024
QEMU_IMG = shutil.which("qemu-img")
COWBLOCK = shutil.which("cowblock")

pytestmark = pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed "
                                                          "(pip install -e .)")


@pytest.fixture
def cb(tmp_path):
    """cb(*args, input=None, rc=0): run cowblock on a fresh 256 MiB pool of
    64 KiB blocks (--pool); returns the CompletedProcess (bytes)."""
    pool = tmp_path / "pool"

    def run(*args, input=None, rc=0, env=None):
        proc = subprocess.run([COWBLOCK, "--pool", str(pool), *map(str, args)], input=input,
                              capture_output=True, timeout=60, env=env)
        assert proc.returncode == rc, (args, proc.returncode, proc.stderr.decode())
        return proc
    run.pool = pool
    run("pool", "create", "--size", "256M", "--block-size", "64K")
    return run


def as_json(proc):
    return json.loads(proc.stdout)




def nonzero(content, unit):
    return [off // unit for off in range(0, len(content), unit) if any(content[off:off + unit])]


def differing(a, b, unit=BS):
    size = max(len(a), len(b))
    a, b = bytes(a).ljust(size, b"\0"), bytes(b).ljust(size, b"\0")
    return [off // unit for off in range(0, size, unit)
            if a[off:off + unit] != b[off:off + unit] and any(b[off:off + unit])]


def qemu_compare(a, b, fmt_b="raw"):
    """qemu-img compare of two images (a raw); skips without qemu-img."""
    if QEMU_IMG is None:
        pytest.skip("qemu-img is not installed (Debian: apt install qemu-utils): "
                    "the byte comparison above ran, qemu-img compare did not")
    proc = subprocess.run([QEMU_IMG, "compare", "-f", "raw", "-F", fmt_b, str(a), str(b)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_image_and_container_workflow(cb, tmp_path):
    rnd = random.Random(42)
    # three layers: random data, written zeroes and holes
    c0 = bytearray(os.urandom(4 * MiB))
    c0[1536 * 1024:2 * MiB] = bytes(512 * 1024)            # zeroes, written
    c0[2 * MiB:3 * MiB] = bytes(MiB)                        # a hole
    write_file(tmp_path / "l0.raw", c0, holes=[(2 * MiB, MiB)])
    c1 = bytearray(c0)
    c1[100_000:100_100] = os.urandom(100)                   # a change inside one block
    c1[256 * 1024:384 * 1024] = bytes(128 * 1024)           # zeroes over the base's data
    c1[2 * MiB + 4096:2 * MiB + 8192] = os.urandom(4096)    # data into the hole
    write_file(tmp_path / "l1.raw", c1)
    c2 = bytearray(c1) + bytearray(os.urandom(256 * 1024))  # grows by 256K
    c2[3 * MiB + 5:3 * MiB + 15] = b"layer two!"
    write_file(tmp_path / "l2.raw", c2, holes=[(2 * MiB + 8192, MiB - 8192)])

    assert as_json(cb("--json", "image", "import", "base", tmp_path / "l0.raw"))["layers"] == [
        "base"]
    out = as_json(cb("--json", "image", "layer", "base", "l1", tmp_path / "l1.raw"))
    assert out["layers"] == ["base", "l1"] and out["parent"] == "base"
    proc = cb("image", "layer", "l1", "l2", tmp_path / "l2.raw")
    assert b"base > l1 > l2" in proc.stdout
    assert proc.stderr == b""  # no progress bar: stderr is not a terminal

    # two containers, written to with `cowblock write`
    cb("container", "create", "l2", "box1")
    cb("container", "create", "l2", "box2")
    box1, box2 = bytearray(c2), bytearray(c2)
    msg = b"hello from container one"
    cb("write", "box1", "--offset", "64K", input=msg)
    box1[BS:BS + len(msg)] = msg
    blob = bytes(rnd.randbytes(70_000))
    cb("write", "box2", "--offset", "3M", input=blob)
    box2[3 * MiB:3 * MiB + len(blob)] = blob

    # commit box1 as a fourth layer; box1 goes on
    out = as_json(cb("--json", "container", "commit", "box1", "l3"))
    assert out["layers"] == ["base", "l1", "l2", "l3"] and out["parent"] == "l2"
    cb("write", "box1", "--offset", "0", input=b"after the commit")

    diff = as_json(cb("--json", "diff", "l2", "l3"))["ranges"]
    assert [(r["kind"], r["begin"], r["length"]) for r in diff] == [("different", 1, 1)]
    diff = as_json(cb("--json", "diff", "box1", "box2"))["ranges"]
    assert [(r["begin"], r["length"]) for r in diff] == [(0, 2), (48, 2)]
    assert as_json(cb("--json", "diff", "l2", "box2"))["ranges"] == [
        {"kind": "different", "begin": 48, "length": 2, "offset": 48 * BS, "bytes": 2 * BS}]

    listed = {i["name"]: i for i in as_json(cb("--json", "image", "ls"))}
    assert {n: i["layers"] for n, i in listed.items()} == {
        "base": ["base"], "l1": ["base", "l1"], "l2": ["base", "l1", "l2"],
        "l3": ["base", "l1", "l2", "l3"]}
    assert listed["l2"]["containers"] == ["box1", "box2"]
    assert {c["name"]: c["image"] for c in as_json(cb("--json", "container", "ls"))} == {
        "box1": "l2", "box2": "l2"}
    assert b"box1" in cb("container", "ls").stdout and b"PARENT" in cb("image", "ls").stdout

    # export and compare with what each device should hold
    expect = {"base": c0, "l1": c1, "l2": c2, "l3": box1, "box2": box2}
    for name, content in expect.items():
        (tmp_path / f"{name}.expect").write_bytes(content)
        cb("export", name, tmp_path / f"{name}.out")
        assert (tmp_path / f"{name}.out").read_bytes() == bytes(content), name
    if QEMU_IMG:
        cb("export", "box2", tmp_path / "box2.qcow2", "--format", "qcow2")

    # sparse: the export leaves holes for unmapped and all-zero 4K chunks
    st = os.stat(tmp_path / "base.out")
    assert st.st_size == len(c0)
    assert st.st_blocks * 512 <= len(nonzero(c0, 4096)) * 4096 + 64 * 1024
    # and the pool holds each block once: the base's non-zero blocks, the
    # blocks each layer changed, a copy for each block box1 wrote (one before
    # the commit, one after: l3 shares box1's blocks), two for box2's write
    with Pool.open(cb.pool, read_only=True) as pool:
        assert pool.stats().data_used == (len(nonzero(c0, BS)) + len(differing(c0, c1))
                                          + len(differing(c1, c2)) + 2 + 2)
        assert pool.info("l3").read_only and not pool.info("box1").read_only

    # removing the containers leaves the images, l3's history included
    assert as_json(cb("--json", "container", "rm", "box1", "box2"))["removed"] == ["box1",
                                                                                   "box2"]
    assert as_json(cb("--json", "container", "ls")) == []
    assert as_json(cb("--json", "image", "ls"))[-1]["layers"] == ["base", "l1", "l2", "l3"]
    cb("pool", "check")

    for name in expect:
        qemu_compare(tmp_path / f"{name}.expect", tmp_path / f"{name}.out")
    qemu_compare(tmp_path / "box2.expect", tmp_path / "box2.qcow2", "qcow2")


def test_kind_errors_and_exit_codes(cb, tmp_path):
    write_file(tmp_path / "a.raw", os.urandom(8192))
    cb("create", "plain", "--size", "1M")
    proc = cb("container", "create", "plain", "box", rc=5)
    assert b"'plain': it is a plain device, not an image" in proc.stderr
    cb("image", "import", "img", tmp_path / "a.raw")
    cb("container", "create", "img", "box")
    assert b"not a container" in cb("container", "rm", "box", "img", rc=5).stderr
    assert b"not a container" in cb("container", "commit", "img", "x", rc=5).stderr
    assert b"not an image" in cb("image", "layer", "box", "x", tmp_path / "a.raw", rc=5).stderr
    cb("container", "create", "nope", "x", rc=3)
    cb("image", "import", "img", tmp_path / "a.raw", rc=4)
    cb("write", "img", input=b"x", rc=7)  # images are read-only
    assert [c["name"] for c in as_json(cb("--json", "container", "ls"))] == ["box"]
    cb("container", "rm", "--deferred", "box")
    assert as_json(cb("--json", "container", "ls")) == []


def test_odd_size_round_trip(cb, tmp_path):
    content = bytearray(os.urandom(MiB + 777))
    content[4096:3 * 4096] = bytes(8192)
    write_file(tmp_path / "odd.raw", content, holes=[(4096, 8192)])
    out = as_json(cb("--json", "import", "odd", tmp_path / "odd.raw"))
    assert out["length"] == len(content) and out["size"] == MiB + 4096
    assert out["labels"] == {"cowblock.length": str(len(content))}
    out = as_json(cb("--json", "export", "odd", tmp_path / "odd.out"))
    assert out["length"] == len(content)
    assert (tmp_path / "odd.out").read_bytes() == bytes(content)
    # exists: refused, then replaced with --force
    assert b"exists already" in cb("export", "odd", tmp_path / "odd.out", rc=5).stderr
    cb("export", "odd", tmp_path / "odd.out", "--force")
    assert (tmp_path / "odd.out").read_bytes() == bytes(content)
    # an image keeps the length too
    cb("image", "import", "oddimg", tmp_path / "odd.raw")
    cb("export", "oddimg", tmp_path / "oddimg.out")
    assert (tmp_path / "oddimg.out").read_bytes() == bytes(content)


def test_stdin_and_stdout(cb, tmp_path):
    content = bytes(os.urandom(300_000)) + bytes(200_000) + b"end"
    out = as_json(cb("--json", "import", "s", "-", input=content))
    assert out["length"] == len(content)
    assert cb("export", "s", "-").stdout == content
    cb("image", "import", "simg", "-", input=content)
    layer = content[:1000] + b"changed" + content[1007:] + b"more"
    cb("image", "layer", "simg", "slayer", "-", input=layer)
    assert cb("export", "slayer", "-").stdout == layer
    assert cb("read", "slayer", "--length", "1007").stdout == layer[:1007]


def test_qcow2_import(cb, tmp_path):
    if QEMU_IMG is None:
        pytest.skip("qemu-img is not installed (Debian: apt install qemu-utils)")
    content = bytearray(os.urandom(2 * MiB))
    content[MiB:MiB + 512 * 1024] = bytes(512 * 1024)
    write_file(tmp_path / "d.raw", content, holes=[(MiB, 512 * 1024)])
    subprocess.run([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", str(tmp_path / "d.raw"),
                    str(tmp_path / "d.qcow2")], check=True)
    out = as_json(cb("--json", "import", "q", tmp_path / "d.qcow2"))
    assert out["mapped"] == len(nonzero(content, BS)) * BS
    cb("export", "q", tmp_path / "q.raw")
    assert (tmp_path / "q.raw").read_bytes() == bytes(content)
    cb("image", "import", "qimg", tmp_path / "d.qcow2")
    cb("export", "qimg", tmp_path / "qimg.qcow2", "--format", "qcow2")
    qemu_compare(tmp_path / "d.raw", tmp_path / "qimg.qcow2", "qcow2")
    assert b"qemu-img convert failed" in cb("export", "q", tmp_path / "x", "--format", "bogus",
                                            rc=5).stderr


def test_progress_bar_only_on_a_terminal(cb, tmp_path):
    write_file(tmp_path / "a.raw", os.urandom(2 * MiB))
    env = dict(os.environ, COWBLOCK_POOL=str(cb.pool), TERM="xterm", COLUMNS="100")
    master, slave = pty.openpty()
    proc = subprocess.Popen([COWBLOCK, "import", "viatty", str(tmp_path / "a.raw")],
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the other end is closed
            break
        if not data:
            break
        seen += data
    os.close(master)
    assert proc.wait(timeout=60) == 0
    assert b"imported viatty" in proc.stdout.read()
    proc.stdout.close()
    assert b"import viatty" in seen  # the bar's description, drawn by rich
    # not a terminal: nothing on stderr
    assert cb("export", "viatty", tmp_path / "a.out").stderr == b""


@pytest.mark.parametrize("args", [["import"], ["export"], ["image"], ["image", "import"],
                                  ["image", "layer"], ["image", "ls"], ["container"],
                                  ["container", "create"], ["container", "commit"],
                                  ["container", "rm"], ["container", "ls"]])
def test_help_has_an_example(args):
    proc = subprocess.run([COWBLOCK, *args, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "Example:" in proc.stdout, proc.stdout + proc.stderr


def test_the_original_length_survives_container_commit_and_snapshot(cb, tmp_path):
    """An image imported from a 10,000,003-byte file exports 10,000,003
    bytes after a container, a commit and a snapshot (not 10,002,432)."""
    content = os.urandom(10_000_003)
    write_file(tmp_path / "odd.raw", content)
    cb("image", "import", "odd", tmp_path / "odd.raw")
    cb("container", "create", "odd", "box")
    cb("write", "box", "--offset", "5", input=b"changed")
    changed = content[:5] + b"changed" + content[12:]
    out = as_json(cb("--json", "container", "commit", "box", "odd-v2"))
    assert out["length"] == 10_000_003
    cb("snapshot", "odd-v2", "snap")
    for name, want in (("odd", content), ("box", changed), ("odd-v2", changed),
                       ("snap", changed)):
        out = as_json(cb("--json", "export", name, tmp_path / f"{name}.out"))
        assert out["length"] == 10_000_003, name
        assert (tmp_path / f"{name}.out").read_bytes() == want, name
    assert {i["name"]: i["length"] for i in as_json(cb("--json", "image", "ls"))} == {
        "odd": 10_000_003, "odd-v2": 10_000_003}
    cb("resize", "snap", "+4K")              # a new size: the whole device is the image now
    assert as_json(cb("--json", "export", "snap", tmp_path / "snap2.out"))["length"] == \
        10_002_432 + 4096


def test_an_image_in_use_stays_and_containers_never_name_a_missing_image(cb, tmp_path):
    write_file(tmp_path / "a.raw", os.urandom(8192))
    cb("image", "import", "base", tmp_path / "a.raw")
    cb("image", "layer", "base", "top", tmp_path / "a.raw")
    cb("container", "create", "top", "box")
    proc = cb("rm", "base", rc=15)
    assert b"cannot remove image 'base': layer 'top' depends on it" in proc.stderr
    proc = cb("rm", "top", "--json", rc=15)
    assert json.loads(proc.stderr)["error"]["kind"] == "ProtectedError"
    assert [c["image"] for c in as_json(cb("--json", "container", "ls"))] == ["top"]
    cb("rm", "top", "--force")
    assert [c["image"] for c in as_json(cb("--json", "container", "ls"))] == [None]
    assert as_json(cb("--json", "image", "ls"))[0]["containers"] == []
    cb("rm", "base")                          # nothing depends on it any more
    cb("pool", "check")
