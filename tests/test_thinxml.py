"""dm-thin interchange checked by thin-provisioning-tools: cowblock ->
thin_restore -> thin_check -> thin_dump -> cowblock, byte-exact."""
import io
import os
import shutil
import signal
import stat
import subprocess
import time
import xml.parsers.expat

import pytest

from cowblock import InvalidArgumentError, Pool
from cowblock.interop import thinxml
from helpers import pattern

BS = 65536
TOOLS = ["thin_restore", "thin_check", "thin_dump", "thin_ls", "thin_delta"]


def need_tools():
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install thin-provisioning-tools)")


def parse_mappings(text):
    """{dev_id: {virtual block: (data block, time)}}, runs expanded."""
    devs, cur = {}, [None]

    def start(name, a):
        if name == "device":
            cur[0] = devs.setdefault(int(a["dev_id"]), {})
        elif name == "single_mapping":
            cur[0][int(a["origin_block"])] = (int(a["data_block"]), int(a["time"]))
        elif name == "range_mapping":
            for i in range(int(a["length"])):
                cur[0][int(a["origin_begin"]) + i] = (int(a["data_begin"]) + i, int(a["time"]))
    p = xml.parsers.expat.ParserCreate()
    p.StartElementHandler = start
    p.Parse(text, True)
    return devs


@pytest.fixture
def deep_pool(tmp_path):
    """base -> s1 -> s2 -> s3 (three levels of snapshots), each written a little."""
    path = tmp_path / "pool"
    pool = Pool.create(path, 512 * BS, BS, commit_interval=0)
    base = pool.create_thin("base", 64 * BS)
    base.pwrite(pattern(1, 40 * BS), 0)
    for i, (origin, name) in enumerate([("base", "s1"), ("s1", "s2"), ("s2", "s3")]):
        pool.snapshot(origin, name, read_only=(name == "s1"))
        target = pool.device(name if name != "s1" else "base")
        target.pwrite(pattern(10 + i, 3 * BS + 17), (5 + 7 * i) * BS + 100)
        target.discard((30 + i) * BS, BS)
    pool.device("s3").pwrite(pattern(99, BS), 50 * BS)   # beyond the base's data
    pool.create_thin("empty", 16 * BS)
    pool.commit()
    yield pool
    pool.close()


def dump_text(pool):
    out, names = io.StringIO(), io.StringIO()
    thinxml.dump(pool, out, names)
    return out.getvalue(), names.getvalue()


def test_times_follow_sharing(deep_pool):
    text, _ = dump_text(deep_pool)
    devs = parse_mappings(text)
    ids = {d.name: d.id for d in deep_pool.list()}
    for name, dev_id in ids.items():
        info = deep_pool.info(name)
        shared = {k for k, _, sh in deep_pool.mappings(name) if sh}
        for vblock, (_, t) in devs.get(dev_id, {}).items():
            if vblock in shared:
                assert t < info.snap_time, (name, vblock)
            else:
                assert t >= info.snap_time, (name, vblock)
        assert info.snap_time < 1 << 24 and dev_id < 1 << 24


def test_round_trip_through_thin_provisioning_tools(deep_pool, tmp_path):
    need_tools()
    text, names = dump_text(deep_pool)
    xml_path, names_path = tmp_path / "pool.xml", tmp_path / "names.json"
    xml_path.write_text(text)
    names_path.write_text(names)
    meta = tmp_path / "meta.bin"
    with open(meta, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["thin_restore", "-i", str(xml_path), "-o", str(meta)], check=True,
                   capture_output=True)
    chk = subprocess.run(["thin_check", str(meta)], capture_output=True, text=True)
    assert chk.returncode == 0, chk.stderr
    assert "leak" not in (chk.stdout + chk.stderr).lower()
    redump = subprocess.run(["thin_dump", str(meta)], check=True, capture_output=True,
                            text=True).stdout
    assert parse_mappings(redump) == parse_mappings(text)
    # thin_ls's exclusive and shared counts equal ours
    ls = subprocess.run(["thin_ls", "--no-headers", "--format",
                         "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS", str(meta)],
                        check=True, capture_output=True, text=True).stdout
    theirs = {int(r.split()[0]): tuple(map(int, r.split()[1:])) for r in ls.strip().splitlines()}
    ours = {r["DEV"]: (r["MAPPED_BLOCKS"], r["EXCLUSIVE_BLOCKS"], r["SHARED_BLOCKS"])
            for r in thinxml.thin_ls_rows(deep_pool)}
    assert theirs == ours
    # thin_delta equals our diff
    ids = {d.name: d.id for d in deep_pool.list()}
    for a, b in [("base", "s1"), ("s1", "s3"), ("s2", "s3")]:
        d = subprocess.run(["thin_delta", "--snap1", str(ids[a]), "--snap2", str(ids[b]),
                            str(meta)], check=True, capture_output=True, text=True).stdout
        assert delta_ranges(d) == delta_ranges(thinxml.delta(deep_pool, a, b)), (a, b)
    # restore thin_dump's XML into a fresh cowblock pool: every device byte for byte
    data_copy = tmp_path / "data.copy"
    shutil.copyfile(deep_pool.path + "/data", data_copy)
    (tmp_path / "redump.xml").write_text(redump)
    new = tmp_path / "restored"
    thinxml.restore(str(tmp_path / "redump.xml"), str(data_copy), str(new),
                    names_path=str(names_path), mode="move")
    with Pool.open(new, read_only=True) as restored:
        assert sorted(d.name for d in restored.list()) == sorted(d.name for d in deep_pool.list())
        for d in deep_pool.list():
            r = restored.info(d.name)
            assert (r.size, r.read_only, r.mapped_blocks) == (d.size, d.read_only, d.mapped_blocks)
            assert restored.device(d.name).pread(d.size, 0) == deep_pool.device(d.name).pread(d.size, 0)
            u1, u2 = restored.usage(d.name), deep_pool.usage(d.name)
            assert (u1.exclusive_blocks, u1.shared_blocks) == (u2.exclusive_blocks, u2.shared_blocks)
        assert restored.check().ok


def delta_ranges(text):
    out = []

    def start(name, a):
        if name in ("same", "different", "left_only", "right_only"):
            out.append((name, int(a["begin"]), int(a["length"])))
    p = xml.parsers.expat.ParserCreate()
    p.StartElementHandler = start
    p.Parse(text, True)
    merged = []
    for kind, begin, length in out:  # writers may split runs differently
        for b in range(begin, begin + length):
            merged.append((kind, b))
    return merged


HAND = """<superblock uuid="" time="2" transaction="5" flags="0" version="2" data_block_size="128" nr_data_blocks="64">
  <def name="shared-leaf">
    <range_mapping origin_begin="10" data_begin="20" length="4" time="0"/>
  </def>
  <device dev_id="0" mapped_blocks="7" transaction="0" creation_time="0" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="3" time="0"/>
    <ref name="shared-leaf"/>
  </device>
  <device dev_id="1" mapped_blocks="7" transaction="1" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
    <single_mapping origin_block="2" data_block="30" time="1"/>
    <ref name="shared-leaf"/>
  </device>
  <device dev_id="7" mapped_blocks="0" transaction="2" creation_time="2" snap_time="2">
  </device>
</superblock>
"""


def test_restore_hand_written_xml(tmp_path):
    data = tmp_path / "data"
    with open(data, "wb") as f:
        for b in range(64):
            f.write(bytes([b]) * BS)
    (tmp_path / "in.xml").write_text(HAND)
    thinxml.restore(str(tmp_path / "in.xml"), str(data), str(tmp_path / "p"))
    with Pool.open(tmp_path / "p", read_only=True) as pool:
        names = sorted(d.name for d in pool.list())
        assert names == ["dev0", "dev1", "dev7"]          # named after their dev_id
        d0, d1 = pool.device("dev0"), pool.device("dev1")
        assert d0.pread(1, 2 * BS) == bytes([2]) and d1.pread(1, 2 * BS) == bytes([30])
        assert d0.pread(1, 12 * BS) == bytes([22]) == d1.pread(1, 12 * BS)
        assert d0.pread(1, 5 * BS) == b"\0"               # unmapped reads zero
        assert pool.info("dev7").mapped_blocks == 0
        assert pool.usage("dev0").shared_blocks == 6 and pool.usage("dev0").exclusive_blocks == 1
        assert pool.check().ok


def test_restore_of_a_pool_mapped_whole(tmp_path):
    """A dump mapping every block of a pool larger than restore's least
    metadata (64 MiB: 1 block for 64 data blocks) restores: the reserve asked
    for its mappings was 2 blocks for every 64, 8 times what they take, so
    any pool more than half mapped was refused as short of metadata.  A data
    file moved in is made owner-only, as the pool's files are."""
    blocks = 1 << 20                          # 64 GiB at 64 KiB: 64 MiB of metadata
    (tmp_path / "in.xml").write_text(
        f'<superblock uuid="" time="0" transaction="1" flags="0" version="2" '
        f'data_block_size="128" nr_data_blocks="{blocks}">\n'
        f'  <device dev_id="1" mapped_blocks="{blocks}" transaction="0" creation_time="0" '
        f'snap_time="0">\n'
        f'    <range_mapping origin_begin="0" data_begin="0" length="{blocks}" time="0"/>\n'
        f'  </device>\n</superblock>\n')
    with open(tmp_path / "data", "wb") as f:
        f.truncate(blocks * BS)               # sparse: only the metadata is written
    os.chmod(tmp_path / "data", 0o644)
    thinxml.restore(str(tmp_path / "in.xml"), str(tmp_path / "data"), str(tmp_path / "p"),
                    mode="move")
    assert stat.S_IMODE(os.stat(tmp_path / "p" / "data").st_mode) == 0o600   # made owner-only
    with Pool.open(tmp_path / "p", read_only=True) as pool:
        assert pool.info("dev1").mapped_blocks == blocks
        assert pool.stats().data_free == 0
        assert pool.check().ok


@pytest.mark.parametrize("change,message", [
    (("<def name", "<bogus/><def name"), "line 2: unknown element <bogus>"),
    (('data_begin="20" length="4"', 'data_begin="62" length="4"'), "past the end of the data device"),
    (('mapped_blocks="7"', 'mapped_blocks="8"'), "mapped_blocks says 8"),
    (('<single_mapping origin_block="2"', '<single_mapping origin_block="1"'), "mapped twice"),
    (('data_block_size="128"', 'data_block_size="384"'), "384 sectors (192 KiB)"),
    (('<ref name="shared-leaf"/>\n  </device>\n  <device dev_id="7"',
      '<ref name="nope"/>\n  </device>\n  <device dev_id="7"'), "names no earlier <def>"),
    (('time="2" transaction', 'time="x" transaction'), "not a non-negative decimal"),
    (("</superblock>", ""), "malformed XML"),
])
def test_restore_rejects_bad_xml(tmp_path, change, message):
    data = tmp_path / "data"
    with open(data, "wb") as f:
        f.truncate(64 * BS)
    (tmp_path / "in.xml").write_text(HAND.replace(*change))
    with pytest.raises(InvalidArgumentError) as exc:
        thinxml.restore(str(tmp_path / "in.xml"), str(data), str(tmp_path / "p"))
    assert message in str(exc.value)
    assert not (tmp_path / "p" / "metadata").exists()


def test_small_blocks_are_refused(tmp_path):
    with Pool.create(tmp_path / "p", 64 * 4096, 4096) as pool:
        with pytest.raises(InvalidArgumentError) as exc:
            thinxml.dump(pool, io.StringIO())
    assert "64 KiB to 1 GiB" in str(exc.value)


def test_cli_dump_restore_and_formats(deep_pool, tmp_path):
    cowblock = shutil.which("cowblock")
    if not cowblock:
        pytest.skip("the cowblock command is not installed")
    path = deep_pool.path
    deep_pool.close()
    run = lambda *a: subprocess.run([cowblock, "--pool", path, *a], capture_output=True,
                                    text=True, check=True).stdout
    run("pool", "dump", "-o", str(tmp_path / "x.xml"), "--names", str(tmp_path / "n.json"))
    assert "<superblock" in (tmp_path / "x.xml").read_text()
    ls = run("ls", "--format", "thin-ls")
    assert "EXCLUSIVE_BLOCKS" in ls and "SHARED_BLOCKS" in ls
    assert "<diff left=" in run("diff", "base", "s3", "--format", "thin-delta")
    subprocess.run([cowblock, "pool", "restore", "--from-xml", str(tmp_path / "x.xml"), "--data",
                    os.path.join(path, "data"), "--names", str(tmp_path / "n.json"),
                    str(tmp_path / "copy")], check=True, capture_output=True)
    out = subprocess.run([cowblock, "--pool", str(tmp_path / "copy"), "read", "s3", "--offset",
                          str(50 * BS), "--length", "100"], capture_output=True, check=True).stdout
    assert out == pattern(99, 100)


@pytest.mark.parametrize("size", [4096, 3 * BS + 4096, 100 * 4096])
def test_dump_and_restore_with_names_keep_sizes_that_end_inside_a_block(tmp_path, size):
    """A device whose size is not a multiple of the pool block (a 4 KiB
    device, an odd-size import) has its last mapped block only partly inside
    it; the sidecar's size must still be accepted, and the device restored
    at that size with its bytes."""
    data = pattern(5, size - 100)
    src = tmp_path / "image.raw"
    src.write_bytes(data)
    with Pool.create(tmp_path / "p", 64 * BS, BS, commit_interval=0) as pool:
        from cowblock import transfer
        transfer.import_file(pool, "odd", str(src))
        tiny = pool.create_thin("tiny", 4096)
        tiny.pwrite(b"tiny", 4000)
        out, names = io.StringIO(), io.StringIO()
        thinxml.dump(pool, out, names)
        expect = {d.name: (d.size, pool.device(d.name).pread(d.size, 0)) for d in pool.list()}
        shutil.copyfile(pool.path + "/data", tmp_path / "data.copy")
    (tmp_path / "x.xml").write_text(out.getvalue())
    (tmp_path / "n.json").write_text(names.getvalue())
    thinxml.restore(str(tmp_path / "x.xml"), str(tmp_path / "data.copy"), str(tmp_path / "r"),
                    names_path=str(tmp_path / "n.json"))
    with Pool.open(tmp_path / "r", read_only=True) as restored:
        for name, (dev_size, content) in expect.items():
            assert restored.info(name).size == dev_size
            assert restored.device(name).pread(dev_size, 0) == content
        assert restored.check().ok


def test_restore_refuses_a_sidecar_size_that_ends_before_a_mapped_block(tmp_path):
    data = tmp_path / "data"
    with open(data, "wb") as f:
        f.truncate(64 * BS)
    (tmp_path / "in.xml").write_text(HAND)
    # device 0 maps virtual blocks 0-2 and 10-13: a size ending in block 13 is
    # fine, one ending at its start is not
    (tmp_path / "n.json").write_text('{"devices": {"0": {"size": %d}}}' % (13 * BS + 4096))
    thinxml.restore(str(tmp_path / "in.xml"), str(data), str(tmp_path / "ok"),
                    names_path=str(tmp_path / "n.json"))
    (tmp_path / "n.json").write_text('{"devices": {"0": {"size": %d}}}' % (13 * BS))
    with pytest.raises(InvalidArgumentError) as exc:
        thinxml.restore(str(tmp_path / "in.xml"), str(data), str(tmp_path / "bad"),
                        names_path=str(tmp_path / "n.json"))
    assert "virtual block 13" in str(exc.value)


def test_a_served_pool_is_dumped_through_its_daemon(deep_pool, tmp_path):
    """`pool dump` of a pool that `cowblock serve` holds goes through the
    daemon's control socket; the dump restores to the same devices."""
    cowblock = shutil.which("cowblock")
    if not cowblock:
        pytest.skip("the cowblock command is not installed")
    path = deep_pool.path
    expect = {d.name: deep_pool.device(d.name).pread(d.size, 0) for d in deep_pool.list()}
    deep_pool.close()
    sock = tmp_path / "nbd.sock"
    server = subprocess.Popen([cowblock, "--pool", path, "serve", "--socket", str(sock)],
                              stderr=subprocess.PIPE)
    try:
        for _ in range(200):
            if sock.exists() and os.path.exists(os.path.join(path, "control.sock")):
                break
            time.sleep(0.05)
        subprocess.run([cowblock, "--pool", path, "pool", "dump", "-o", str(tmp_path / "x.xml"),
                        "--names", str(tmp_path / "n.json")], check=True, capture_output=True)
        shutil.copyfile(os.path.join(path, "data"), tmp_path / "data.copy")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    thinxml.restore(str(tmp_path / "x.xml"), str(tmp_path / "data.copy"), str(tmp_path / "r"),
                    names_path=str(tmp_path / "n.json"))
    with Pool.open(tmp_path / "r", read_only=True) as restored:
        assert {d.name: restored.device(d.name).pread(d.size, 0) for d in restored.list()} == expect
