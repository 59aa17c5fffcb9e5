"""`cowblock pool copy SRC DST` (cowblock.poolcopy): a whole pool to a new
location, every device, snapshot, label, record and setting, sharing kept;
bad inputs; an interrupted or killed copy leaves nothing that opens as a
pool; local -> RADOS -> local on the throw-away cluster."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from cowblock import Pool, errors, health, poolcopy, rados, transfer

from helpers import pattern

COWBLOCK = shutil.which("cowblock")
MiB = 1 << 20
BS = 65536


def build(path):
    """A pool with what a copy must keep: a snapshot chain sharing blocks, a
    device whose size ends inside a block, an imported file of odd length,
    labels, read-only flags, a mapped block of zeroes, a deleted origin,
    records and settings."""
    p = Pool.create(path, 64 * MiB, BS, commit_interval=None)
    base = p.create_thin("base", 4 * MiB, labels={"role": "web"})
    base.pwrite(pattern(1, 3 * BS + 100), 5000)
    base.pwrite(bytes(BS), 2 * MiB)                     # mapped, all zeroes
    p.snapshot("base", "s1", read_only=True, labels={"when": "monday"})
    base.pwrite(pattern(2, 4096), 8192)                 # base and s1 now differ in one block
    p.snapshot("s1", "s1a")                             # a snapshot of a snapshot
    p.device("s1a").pwrite(pattern(3, 10000), 3 * MiB)
    odd = p.create_thin("odd", 3 * BS + 4096)           # ends inside its last block
    odd.pwrite(pattern(4, 4096), 3 * BS)
    src_file = os.path.join(os.path.dirname(path), "odd.img")
    with open(src_file, "wb") as f:
        f.write(pattern(5, 70001))
    transfer.import_file(p, "imported", src_file)     # cowblock.length 70001
    p.create_thin("gone", MiB).pwrite(pattern(6, 4096), 0)
    p.snapshot("gone", "orphan")
    p.delete("gone")                                   # orphan's origin no longer exists
    for i in range(3):
        p.put_record(f"images/{i}", json.dumps({"n": i}).encode())
    p.put_record(b"\x00binary\xff", bytes(range(256)))
    health.configure(p, low_water_data=30.0)
    p.commit()
    return p


def snapshot_of(p):
    """Everything a copy must keep, device by device."""
    devices = {}
    for i in p.list():
        data = p.device(i.name).pread(i.size, 0)
        devices[i.name] = dict(sha=hashlib.sha256(data).hexdigest(), size=i.size,
                               labels=i.labels, read_only=i.read_only, origin=i.origin,
                               uuid=i.uuid, created=i.created, creation_time=i.creation_time,
                               snap_time=i.snap_time, length=transfer.info_length(i))
    return {"devices": devices, "records": list(p.records()), "config": p.config,
            "mappings": p.mappings(), "data_used": p.stats().data_used,
            "block_size": p.block_size, "data_blocks": p.stats().data_blocks}


@pytest.fixture
def src(tmp_path):
    p = build(str(tmp_path / "src"))
    yield p
    p.close()


def test_local_copy_keeps_every_device_record_and_the_sharing(src, tmp_path):
    want = snapshot_of(src)
    result = poolcopy.copy(src, str(tmp_path / "dst"))
    assert (result.devices, result.records) == (6, 4)
    assert result.data_blocks == want["data_used"]
    assert result.data_bytes < result.data_blocks * BS      # the block of zeroes was not written
    with Pool.open(tmp_path / "dst", read_only=True) as q:
        got = snapshot_of(q)
        assert got == want         # contents, labels, flags, origins, uuids, mappings, usage
        assert got["devices"]["orphan"]["origin"] is None
        assert got["devices"]["imported"]["length"] == 70001
        assert q.check().ok
    assert sorted(os.listdir(tmp_path)) == ["dst", "odd.img", "src"]   # no temporary left
    # the copy is a pool like any other: writable, snapshots above the copied times
    with Pool.open(tmp_path / "dst", commit_interval=None) as q:
        q.snapshot("base", "s2")
        assert q.info("s2").snap_time > max(d["snap_time"] for d in want["devices"].values())
        q.device("base").pwrite(pattern(7, 4096), 0)
        assert q.device("s1").pread(4096, 8192) == src.device("s1").pread(4096, 8192)


def test_sharing_costs_nothing_in_the_copy(tmp_path):
    """Ten snapshots of one 4 MiB device: the copy uses 4 MiB, not 44."""
    with Pool.create(tmp_path / "src", 64 * MiB, BS, commit_interval=None) as p:
        p.create_thin("base", 4 * MiB).pwrite(pattern(8, 4 * MiB), 0)
        for i in range(10):
            p.snapshot("base", f"s{i}")
        poolcopy.copy(p, str(tmp_path / "dst"))
        used = p.stats().data_used
    with Pool.open(tmp_path / "dst", read_only=True) as q:
        assert q.stats().data_used == used == 4 * MiB // BS
    assert os.stat(tmp_path / "dst" / "data").st_blocks * 512 <= 5 * MiB  # 4 MiB stored once


@pytest.mark.parametrize("make", ["pool", "file", "busy-dir"])
def test_an_existing_dst_is_refused_and_left_alone(src, tmp_path, make):
    dst = tmp_path / "dst"
    if make == "pool":
        Pool.create(dst, 16 * MiB, BS).close()
    elif make == "file":
        dst.write_bytes(b"mine")
    else:
        dst.mkdir()
        (dst / "notes.txt").write_text("mine")
    before = sorted(os.listdir(dst)) if dst.is_dir() else dst.read_bytes()
    with pytest.raises(errors.PoolExistsError, match="exists"):
        poolcopy.copy(src, str(dst))
    assert (sorted(os.listdir(dst)) if dst.is_dir() else dst.read_bytes()) == before
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".cowblock-copy")]


def test_an_empty_dst_directory_is_filled(src, tmp_path):
    (tmp_path / "dst").mkdir()
    poolcopy.copy(src, str(tmp_path / "dst"))
    with Pool.open(tmp_path / "dst", read_only=True) as q:
        assert "base" in q


def test_whole_block_writes_go_only_to_free_blocks(tmp_path):
    with Pool.create(tmp_path / "p", 16 * MiB, BS, commit_interval=None) as p:
        p.create_thin("d", MiB).pwrite(pattern(9, BS), 0)
        (used,) = {v for _, v, _ in p.mappings("d")}
        with pytest.raises(errors.BusyError, match=f"data block {used} is in use"):
            p.write_data(used, bytes(BS))
        with pytest.raises(errors.InvalidArgumentError, match="past the end"):
            p.write_data(16 * MiB // BS - 1, bytes(2 * BS))
        with pytest.raises(errors.InvalidArgumentError, match="whole blocks"):
            p.write_data(used + 1, bytes(4096))
        assert p.device("d").pread(BS, 0) == pattern(9, BS)
        p.write_data(used + 1, pattern(10, BS))
        assert p.read_data(used, 2) == pattern(9, BS) + pattern(10, BS)


def test_an_empty_pool_copies(tmp_path):
    with Pool.create(tmp_path / "src", 16 * MiB, 4096) as p:
        result = poolcopy.copy(p, str(tmp_path / "dst"))
    assert (result.devices, result.data_blocks) == (0, 0)
    with Pool.open(tmp_path / "dst", read_only=True) as q:
        assert q.list() == [] and q.block_size == 4096 and q.stats().data_blocks == 4096


def test_a_source_open_for_writing_is_refused_naming_the_holder(src, tmp_path):
    src.close()
    with Pool.open(tmp_path / "src"):
        with pytest.raises(errors.PoolLockedError, match="open for writing by this process"):
            with poolcopy.open_source(str(tmp_path / "src")):
                pass


def test_copy_onto_itself_and_unknown_locations_are_refused(src, tmp_path):
    for same in (src.path, str(tmp_path / "x" / ".." / "src"), src.path + "/"):
        with pytest.raises(errors.InvalidArgumentError, match="onto itself"):
            poolcopy.copy(src, same)
    for bad in ("s3://bucket/pool", "rados:nopool", "rados:/x"):
        with pytest.raises(errors.InvalidArgumentError, match="rados:CEPHPOOL/NAME"):
            poolcopy.copy(src, bad)


def test_an_interrupted_copy_leaves_nothing(src, tmp_path):
    def interrupt(done, total):
        if done:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        poolcopy.copy(src, str(tmp_path / "dst"), progress=interrupt)
    assert sorted(os.listdir(tmp_path)) == ["odd.img", "src"]


KILLED_COPY = """
import sys, time
from cowblock import Pool, poolcopy
def stall(done, total):
    if done:
        print("copying", flush=True)
        time.sleep(60)
with Pool.open(sys.argv[1], read_only=True) as p:
    poolcopy.copy(p, sys.argv[2], progress=stall)
"""


def test_a_killed_copy_leaves_nothing_that_opens_and_the_next_copy_cleans_up(src, tmp_path):
    dst = str(tmp_path / "dst")
    src.close()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_COPY, str(tmp_path / "src"), dst],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "copying\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not os.path.exists(dst)
    (left,) = [n for n in os.listdir(tmp_path) if n.endswith(".cowblock-copy")]
    with pytest.raises(errors.PoolNotFoundError, match="unfinished copy of .*src"):
        Pool.open(tmp_path / left, read_only=True)
    r = subprocess.run([COWBLOCK, "pool", "info", "--pool", str(tmp_path / left)],
                       capture_output=True, text=True)
    assert r.returncode == 3 and "unfinished copy" in r.stderr and "Traceback" not in r.stderr
    with Pool.open(tmp_path / "src", read_only=True) as p:
        poolcopy.copy(p, dst)
    assert sorted(os.listdir(tmp_path)) == ["dst", "odd.img", "src"]


@pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")
def test_cli_copy_json_and_errors(src, tmp_path):
    src.close()
    def run(*args):
        return subprocess.run([COWBLOCK, "--json", "pool", "copy", *map(str, args)],
                              capture_output=True, text=True)
    r = run(tmp_path / "src", tmp_path / "dst")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["devices"] == 6 and out["dest"] == str(tmp_path / "dst")
    r = run(tmp_path / "src", tmp_path / "dst")
    assert r.returncode == 4 and json.loads(r.stderr)["error"]["kind"] == "PoolExistsError"
    r = run(tmp_path / "missing", tmp_path / "d2")
    assert r.returncode == 3 and "no pool at" in r.stderr
    assert not (tmp_path / "d2").exists()


@pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")
def test_cli_refuses_a_pool_its_daemon_serves_naming_it(src, tmp_path):
    src.close()
    sock = tmp_path / "nbd.sock"
    serve = subprocess.Popen([COWBLOCK, "--pool", str(tmp_path / "src"), "serve", "--socket",
                              str(sock), "base"], stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 30
        while not sock.exists() and serve.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        assert serve.poll() is None, serve.stderr.read()
        r = subprocess.run([COWBLOCK, "pool", "copy", str(tmp_path / "src"),
                            str(tmp_path / "dst")], capture_output=True, text=True)
        assert r.returncode != 0
        assert "in use by its daemon" in r.stderr and "daemon stop" in r.stderr, r.stderr
        assert not (tmp_path / "dst").exists()
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    from cowblock.runtime import RuntimeDir
    pid = RuntimeDir(str(tmp_path / "src")).pid()
    if pid:
        os.kill(pid, signal.SIGKILL)


# ---- RADOS ----

def test_local_to_rados_to_local(src, tmp_path, location):
    want = snapshot_of(src)
    poolcopy.copy(src, location)
    src.close()
    shutil.rmtree(rados.cache_dir(location))            # what comes back, comes from RADOS
    with pytest.raises(errors.PoolExistsError):
        with poolcopy.open_source(str(tmp_path / "src")) as p:
            poolcopy.copy(p, location)
    with poolcopy.open_source(location) as p:
        poolcopy.copy(p, str(tmp_path / "back"))    # first: its own reads fetch from RADOS
        assert snapshot_of(p) == want
    with Pool.open(tmp_path / "back", read_only=True) as q:
        assert snapshot_of(q) == want
        assert q.check().ok


def test_rados_unfinished_copy_refuses_to_open_and_is_replaced(src, location):
    plan = {"data_size": 16 * MiB, "block_size": BS, "metadata_size": 0, "node_capacity": 0,
            "from": "/somewhere"}
    poolcopy._create(location, plan).close()        # what a copy killed midway leaves
    with pytest.raises(errors.PoolNotFoundError, match="unfinished copy of /somewhere"):
        Pool.open(location)
    with pytest.raises(errors.PoolLockedError):     # a source held by a writer is refused
        with Pool.open(location, _unfinished_copy=True):
            with poolcopy.open_source(location):
                pass
    poolcopy.copy(src, location)
    with Pool.open(location, read_only=True) as q:
        assert sorted(i.name for i in q.list()) == sorted(i.name for i in src.list())


def test_an_interrupted_copy_to_rados_leaves_nothing(src, location):
    def interrupt(done, total):
        if done:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        poolcopy.copy(src, location, progress=interrupt)
    with pytest.raises(errors.PoolNotFoundError):
        Pool.open(location, read_only=True)
