"""Pools on Ceph RADOS (rados:CEPHPOOL/NAME), against a throw-away single-node
cluster (tools/ceph-cluster.sh, started once per session: about 15-20 s).

Each test opens its pool from a fresh cache directory where it matters, so
what it reads back came from RADOS, not from this host's cache."""
import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from cowblock import Pool, errors, rados

from helpers import pattern

COWBLOCK = shutil.which("cowblock")
MiB = 1 << 20


def rados_cli(ceph, *args):
    return ceph.run("rados", "-p", ceph.pool, *args)


def objects(ceph, loc):
    ns = rados.parse(loc).name
    return sorted(rados_cli(ceph, "--namespace", ns, "ls").split())


def drop_cache(loc):
    path = rados.cache_dir(loc)
    for name in ("data", "metadata"):
        os.unlink(os.path.join(path, name))


def test_cluster_serves_objects(ceph, tmp_path):
    src = tmp_path / "in"
    src.write_bytes(b"cowblock" * 512)
    rados_cli(ceph, "put", "probe", str(src))
    rados_cli(ceph, "get", "probe", str(tmp_path / "out"))
    rados_cli(ceph, "rm", "probe")
    assert (tmp_path / "out").read_bytes() == src.read_bytes()


def test_create_write_snapshot_reopen(ceph, location):
    with Pool.create(location, 64 * MiB, 65536, commit_interval=0) as p:
        base = p.create_thin("base", 8 * MiB)
        base.pwrite(pattern(1, 3 * MiB), 512 * 1024)      # across object boundaries
        p.snapshot("base", "snap")
        base.pwrite(pattern(2, 4096), MiB)
    # every block's home is RADOS: objects for the data written, one per MiB touched
    names = objects(ceph, location)
    assert "superblock" in names
    data = [n for n in names if n.startswith("data.")]
    assert 3 <= len(data) <= 5, names
    drop_cache(location)
    with Pool.open(location, commit_interval=0) as p:
        # the open reads the superblock and the metadata it walks, no data
        opened = p._remote.requests()
        assert opened["data_reads"] == 0 and opened["reads"] <= 3, opened
        want = bytearray(pattern(1, 3 * MiB))
        assert p.device("snap").pread(3 * MiB, 512 * 1024) == want
        # a read fetches its blocks and nothing else: one request per object
        snap = p._remote.requests()
        assert snap["fetched_bytes"] - opened["fetched_bytes"] == 3 * MiB, snap
        assert 3 <= snap["data_reads"] <= 4, snap
        want[MiB - 512 * 1024:MiB - 512 * 1024 + 4096] = pattern(2, 4096)
        assert p.device("base").pread(3 * MiB, 512 * 1024) == want
        base = p._remote.requests()   # only its own block is new to the cache
        assert base["fetched_bytes"] - snap["fetched_bytes"] == 65536, base
        assert p.device("snap").pread(3 * MiB, 512 * 1024) == pattern(1, 3 * MiB)
        assert p.device("base").pread(4096, 0) == bytes(4096)   # never written
        assert p._remote.requests()["data_reads"] == base["data_reads"]   # cached, or unmapped
        assert p.check().ok
        assert {d.name for d in p.list()} == {"base", "snap"}


def test_the_cache_is_never_stale_and_partial_writes_keep_the_rest(ceph, location, tmp_path,
                                                                   monkeypatch):
    """What an earlier open on this host cached is never served after
    another writer changed the pool; a write into part of an uncached block
    (in place, and as a CoW of a snapshot's block) keeps the rest of it."""
    with Pool.create(location, 64 * MiB, 65536, commit_interval=0) as p:
        p.create_thin("d", 4 * MiB).pwrite(pattern(1, 2 * MiB), 0)
    with Pool.open(location, commit_interval=0) as p:
        assert p.device("d").pread(2 * MiB, 0) == pattern(1, 2 * MiB)   # cached here now
    cache = os.environ["COWBLOCK_RADOS_CACHE"]
    monkeypatch.setenv("COWBLOCK_RADOS_CACHE", str(tmp_path / "other-host"))
    with Pool.open(location, commit_interval=0) as p:
        p.device("d").pwrite(pattern(2, MiB), 0)
        p.snapshot("d", "s")
    monkeypatch.setenv("COWBLOCK_RADOS_CACHE", cache)
    with Pool.open(location, commit_interval=0) as p:
        d = p.device("d")
        d.pwrite(b"x" * 512, MiB + 1000)       # into a block shared with s: CoW
        want = bytearray(pattern(2, MiB) + pattern(1, 2 * MiB)[MiB:])
        want[MiB + 1000:MiB + 1512] = b"x" * 512
        assert d.pread(2 * MiB, 0) == want
        assert p.device("s").pread(2 * MiB, 0) == pattern(2, MiB) + pattern(1, 2 * MiB)[MiB:]
    drop_cache(location)
    with Pool.open(location, commit_interval=0) as p:
        p.delete("s")
        p.commit()
        p.device("d").pwrite(b"y" * 100, 70000)   # in place, into an uncached unit
        want[70000:70100] = b"y" * 100
        assert p.device("d").pread(2 * MiB, 0) == want
    drop_cache(location)
    with Pool.open(location, read_only=True) as p:
        assert p.device("d").pread(2 * MiB, 0) == want
        assert p.check().ok


def test_a_requests_blocks_stay_together_under_concurrent_writers(ceph, location):
    """Blocks allocated by one request are contiguous in the data file
    however many requests allocate at once, so a 1 MiB overwrite is one or
    two RADOS writes (the objects it spans), not one per block."""
    from concurrent.futures import ThreadPoolExecutor
    with Pool.create(location, 64 * MiB, 65536, commit_interval=0) as p:
        d = p.create_thin("d", 16 * MiB)
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda off: d.pwrite(pattern(off, MiB), off), range(0, 16 * MiB, MiB)))
        p.commit()
        before = p._remote.requests()["writes"]
        for off in range(0, 16 * MiB, MiB):
            d.pwrite(pattern(off + 1, MiB), off)
        p.commit()
        sent = p._remote.requests()["writes"] - before
        assert sent <= 2 * 16 + 8, sent   # (the commit: a few metadata writes)
        assert d.pread(16 * MiB, 0) == b"".join(pattern(off + 1, MiB)
                                                for off in range(0, 16 * MiB, MiB))


def scatter(d, blocks, seed):
    """Map blocks 0..blocks-1 of d in random order by 4 KiB first writes
    (as rados_nbd.py's first_write_4k job leaves an image); returns what d
    holds."""
    import random
    rng = random.Random(seed)
    want = bytearray(blocks * 65536)
    for vb in rng.sample(range(blocks), blocks):
        at = vb * 65536 + rng.randrange(16) * 4096
        if d is not None:
            d.pwrite(pattern(vb, 4096), at)
        want[at:at + 4096] = pattern(vb, 4096)
    return want


def test_a_scattered_overwrite_is_one_write_per_object(ceph, location):
    """After random 4 KiB first writes a MiB's 16 blocks lie scattered over
    the data file; a 1 MiB overwrite of them goes to a fresh contiguous run
    (one RADOS write) instead of 16 writes in place, the old blocks are freed
    at the commit, and what was written reads back from RADOS."""
    with Pool.create(location, 64 * MiB, 65536, commit_interval=0) as p:
        d = p.create_thin("d", 8 * MiB)
        want = scatter(d, 128, seed=5)
        p.commit()
        used = p.stats().data_used
        for i, off in enumerate(range(0, 8 * MiB, MiB)):
            before = p._remote.requests()["data_writes"]
            d.pwrite(pattern(100 + i, MiB), off)
            p.commit()
            sent = p._remote.requests()["data_writes"] - before
            assert sent <= 2, (off, sent)
            want[off:off + MiB] = pattern(100 + i, MiB)
        assert p.stats().data_used == used   # the old blocks freed, none leaked
        # a run of its own now: written in place, one write a MiB
        before = p._remote.requests()["data_writes"]
        d.pwrite(pattern(200, MiB), 3 * MiB)
        p.commit()
        assert p._remote.requests()["data_writes"] - before == 1
        want[3 * MiB:4 * MiB] = pattern(200, MiB)
        assert d.pread(8 * MiB, 0) == want
    drop_cache(location)
    with Pool.open(location, read_only=True) as p:
        assert p.device("d").pread(8 * MiB, 0) == want
        assert p.check().ok


REDIRECTER = r"""
import sys
from cowblock import Pool
sys.path.insert(0, sys.argv[2])
from helpers import pattern
from test_rados import scatter
p = Pool.open(sys.argv[1], commit_interval=0)
d = p.create_thin("d", 16 << 20)
scatter(d, 256, seed=7)
p.commit()
print("C -1", p.stats().transaction_id, flush=True)
for r in range(1000):
    for i in range(16):
        d.pwrite(pattern(1000 * r + i, 1 << 20), i << 20)
    p.commit()
    print("C", r, p.stats().transaction_id, flush=True)
"""


def test_a_writer_killed_while_redirecting_leaves_a_consistent_pool(ceph, location, tmp_path):
    """SIGKILL a writer in the middle of scattered 1 MiB overwrites (the
    first round redirects every MiB; later ones write the runs in place):
    the next open finds the pool at a commit that returned, or the one
    being made, each block holding that commit's data or the next round's,
    and a clean check."""
    import random
    import signal
    Pool.create(location, 128 * MiB, 65536, commit_interval=0).close()
    child = subprocess.Popen([sys.executable, "-c", REDIRECTER, location,
                              os.path.dirname(os.path.abspath(__file__))],
                             stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, COWBLOCK_RADOS_CACHE=str(tmp_path / "victim")))
    commits = []
    try:
        commits.append(child.stdout.readline().split())
        assert commits[0][:2] == ["C", "-1"], commits
        time.sleep(random.Random().uniform(0.0, 0.6))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    commits += [line.split() for line in child.stdout.read().splitlines()]
    rounds = {int(t): int(r) for _, r, t in commits}
    first = scatter(None, 256, seed=7)
    with Pool.open(location, commit_interval=0) as p:
        txn = p.stats().transaction_id
        assert txn >= max(rounds), ("a commit that returned was lost", txn, rounds)
        assert txn in rounds or txn == max(rounds) + 1, (txn, rounds)
        r = rounds.get(txn, max(rounds.values()) + 1)   # (or the commit being made)
        got = p.device("d").pread(16 * MiB, 0)
        for i in range(16):
            for b in range(16):
                at = i * MiB + b * 65536
                states = [first[at:at + 65536] if k < 0 else
                          pattern(1000 * k + i, MiB)[b * 65536:(b + 1) * 65536] for k in (r, r + 1)]
                assert got[at:at + 65536] in states, (txn, r, i, b)
        assert p.check().ok


def cache_settles(p, limit, seconds=10):
    """The cache's counters once the evictor has brought it within limit."""
    deadline = time.monotonic() + seconds
    while True:
        got = p._remote.requests()
        if got["cached_bytes"] <= limit or time.monotonic() > deadline:
            return got
        time.sleep(0.02)


def test_the_cache_stays_within_its_bound(ceph, location, monkeypatch):
    """$COWBLOCK_RADOS_CACHE_SIZE bounds the data cache: reading 8 times
    more than it holds keeps it (counted, and as the cache file's blocks on
    disk) within the bound, drops what was used least recently (a range read
    again and again stays), and everything reads back right, also after
    writes into dropped ranges (whole and partial units)."""
    with Pool.create(location, 64 * MiB, 65536, commit_interval=0) as p:
        p.create_thin("d", 32 * MiB).pwrite(pattern(3, 32 * MiB), 0)
    want = bytearray(pattern(3, 32 * MiB))
    limit = 4 * MiB
    monkeypatch.setenv("COWBLOCK_RADOS_CACHE_SIZE", "4M")
    with Pool.open(location, commit_interval=0) as p:
        d = p.device("d")
        hot = slice(0, MiB)
        for off in range(MiB, 32 * MiB, MiB):
            assert d.pread(MiB, off) == want[off:off + MiB], off
            assert d.pread(MiB, 0) == want[hot]
        got = cache_settles(p, limit)
        assert got["cached_bytes"] <= limit, got
        assert got["evicted_bytes"] >= 32 * MiB - limit - 2 * MiB, got
        on_disk = os.stat(os.path.join(rados.cache_dir(location), "data")).st_blocks * 512
        assert on_disk <= limit + MiB, on_disk
        reads = got["data_reads"]
        assert d.pread(MiB, 0) == want[hot]
        assert p._remote.requests()["data_reads"] == reads, "the hot range was dropped"
        # writes into dropped ranges: whole units, and part of a unit (fetched first)
        d.pwrite(pattern(4, 3 * MiB), 2 * MiB)
        want[2 * MiB:5 * MiB] = pattern(4, 3 * MiB)
        d.pwrite(b"z" * 100, 20 * MiB + 5000)
        want[20 * MiB + 5000:20 * MiB + 5100] = b"z" * 100
        p.commit()
        assert d.pread(32 * MiB, 0) == want
        assert cache_settles(p, limit)["cached_bytes"] <= limit
    drop_cache(location)
    monkeypatch.setenv("COWBLOCK_RADOS_CACHE_SIZE", "0")   # no bound
    with Pool.open(location, read_only=True) as p:
        assert p.device("d").pread(32 * MiB, 0) == want
        got = p._remote.requests()
        assert got["cached_bytes"] == 32 * MiB and got["evicted_bytes"] == 0, got


def test_a_small_cache_under_concurrent_reads_and_writes(ceph, location, monkeypatch):
    """Readers and writers at once through a cache much smaller than what
    they touch: every read returns what the model holds (nothing dropped
    under a reader, nor before RADOS had it)."""
    import random
    import threading
    size = 16 * MiB
    with Pool.create(location, 64 * MiB, 65536, commit_interval=0) as p:
        p.create_thin("d", size).pwrite(pattern(8, size), 0)
    monkeypatch.setenv("COWBLOCK_RADOS_CACHE_SIZE", "1M")
    want = bytearray(pattern(8, size))
    # each writer owns its own 4 MiB quarter, so the model needs no lock
    errors_seen = []
    with Pool.open(location, commit_interval=0) as p:
        d = p.device("d")

        def work(w):
            rng = random.Random(w)
            base = w * 4 * MiB
            try:
                for i in range(150):
                    off = base + rng.randrange(0, 4 * MiB - 70000)
                    n = rng.choice([4096, 65536, 5000])
                    if rng.random() < 0.4:
                        data = pattern(1000 * w + i, n)
                        d.pwrite(data, off)
                        want[off:off + n] = data
                    else:
                        assert d.pread(n, off) == want[off:off + n], (w, i, off, n)
            except Exception as e:   # (reported by the main thread)
                errors_seen.append(e)

        threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors_seen, errors_seen
        assert p._remote.requests()["evicted_bytes"] > 0
        p.commit()
        assert d.pread(size, 0) == want
    drop_cache(location)
    with Pool.open(location, read_only=True) as p:
        assert p.device("d").pread(size, 0) == want


def test_a_bad_cache_size_is_named(ceph, location, monkeypatch):
    Pool.create(location, 16 * MiB, 65536, commit_interval=0).close()
    monkeypatch.setenv("COWBLOCK_RADOS_CACHE_SIZE", "lots")
    with pytest.raises(errors.InvalidArgumentError, match="COWBLOCK_RADOS_CACHE_SIZE"):
        Pool.open(location)


def test_repair_preview_of_a_lazily_read_pool(ceph, location):
    """The repair preview copies the metadata file: all of it is fetched
    first, not only what this open has read."""
    from cowblock import repair
    # nodes of 4 entries: the mapping tree spans several metadata objects
    with Pool.create(location, 64 * MiB, 4096, commit_interval=0, _node_capacity=4) as p:
        p.create_thin("d", 8 * MiB).pwrite(pattern(1, 4 * MiB), 0)
    with Pool.open(location, commit_interval=0) as p:
        assert p._remote.requests()["reads"] < 4   # the mapping tree not read yet
        plan = repair.preview(p)
        assert plan.report.ok and not plan.dropped, plan.report


def test_trim_removes_objects(ceph, location):
    with Pool.create(location, 64 * MiB, MiB, commit_interval=0) as p:
        d = p.create_thin("d", 8 * MiB)
        d.pwrite(pattern(3, 4 * MiB), 0)
        p.commit()
        before = len([n for n in objects(ceph, location) if n.startswith("data.")])
        p.delete("d")
        p.commit()
        p.trim()
    after = len([n for n in objects(ceph, location) if n.startswith("data.")])
    assert before == 4 and after == 0


def test_second_writer_is_refused_naming_the_holder(ceph, location, tmp_path):
    with Pool.create(location, 16 * MiB, 65536, commit_interval=0):
        # another host, in effect: its own cache directory
        code = f"from cowblock import Pool; Pool.open({location!r})"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, COWBLOCK_RADOS_CACHE=str(tmp_path / "other")))
        assert r.returncode != 0
        last = r.stderr.strip().splitlines()[-1]
        assert "PoolLockedError" in last and f"pid={os.getpid()}" in last, last
    # released at close: the next writer gets it
    Pool.open(location, commit_interval=0).close()


def test_a_killed_writer_is_fenced_and_the_next_open_succeeds(ceph, location, tmp_path):
    """SIGKILL the writer after a commit returned: another process opens the
    pool by itself (the dead holder does not answer the notify, so it is
    blocklisted and its lock broken) and sees that commit."""
    Pool.create(location, 16 * MiB, 65536, commit_interval=0).close()
    code = (f"import sys, time\nfrom cowblock import Pool\n"
            f"p = Pool.open({location!r}, commit_interval=0)\n"
            f"d = p.create_thin('committed', 1 << 20)\nd.pwrite(b'k' * 4096, 0)\np.commit()\n"
            f"print('ready', flush=True)\ntime.sleep(120)\n")
    env = dict(os.environ, COWBLOCK_RADOS_CACHE=str(tmp_path / "victim"))
    victim = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert victim.stdout.readline() == b"ready\n"
    finally:
        victim.kill()
        victim.wait()
    with Pool.open(location, commit_interval=0) as p:
        assert p.device("committed").pread(4096, 0) == b"k" * 4096
        assert p.check().ok
    blocklist = subprocess.run(["timeout", "30", "ceph", "osd", "blocklist", "ls"], text=True,
                               env=dict(os.environ, CEPH_CONF=ceph.conf), capture_output=True)
    assert "127.0.0.1" in blocklist.stdout + blocklist.stderr


def test_a_fenced_writer_cannot_commit(ceph, location, tmp_path):
    """A writer taken over as Ceph's tools do it (its address blocklisted,
    then its lock broken; what a successor does for a dead holder) fails its
    next commit, turns read-only, and the successor's pool is intact."""
    p = Pool.create(location, 16 * MiB, 65536, commit_interval=0)
    try:
        p.create_thin("before", MiB)
        ns = rados.parse(location).name
        holder = json.loads(rados_cli(ceph, "--namespace", ns, "lock", "info", "superblock",
                                      "cowblock"))["lockers"][0]
        subprocess.run(["timeout", "30", "ceph", "osd", "blocklist", "add", holder["addr"]],
                       env=dict(os.environ, CEPH_CONF=ceph.conf), check=True, capture_output=True)
        rados_cli(ceph, "--namespace", ns, "lock", "break", "superblock", "cowblock",
                  holder["name"], "--lock-cookie", holder["cookie"])
        env = dict(os.environ, COWBLOCK_RADOS_CACHE=str(tmp_path / "other"))
        code = (f"from cowblock import Pool\nwith Pool.open({location!r}, commit_interval=0) as p:\n"
                f"    p.create_thin('successor', 1 << 20)")
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        with pytest.raises(errors.PoolIOError):
            p.create_thin("stale", MiB)     # its commit, refused
        with pytest.raises(errors.PoolIOError, match="read-only"):
            p.create_thin("later", MiB)
    finally:
        try:
            p.close()
        except errors.CowblockError:
            pass
        subprocess.run(["timeout", "30", "ceph", "osd", "blocklist", "rm", holder["addr"]],
                       env=dict(os.environ, CEPH_CONF=ceph.conf), capture_output=True)
    drop_cache(location)
    with Pool.open(location, commit_interval=0) as p:
        assert {d.name for d in p.list()} == {"before", "successor"}
        assert p.check().ok


def test_missing_pool_and_bad_locations(ceph):
    with pytest.raises(errors.PoolNotFoundError, match="no pool at rados:"):
        Pool.open(f"rados:{ceph.pool}/never-made")
    with pytest.raises(errors.PoolNotFoundError, match="has no pool nosuchpool"):
        Pool.open("rados:nosuchpool/x")
    r = subprocess.run([COWBLOCK, "--pool", "rados:nosuchpool/x", "ls"], capture_output=True,
                       text=True, env=dict(os.environ, CEPH_CONF=ceph.conf), timeout=60)
    assert r.returncode == 3 and "ceph osd pool create nosuchpool" in r.stderr, r.stderr
    assert "create the Ceph pool first" in r.stderr, r.stderr   # not "cowblock pool create" alone
    for bad in ("rados:", "rados:onlypool", "rados:/x", "rados:p/a/b", "rados:p/.x"):
        with pytest.raises(errors.InvalidArgumentError, match="rados:CEPHPOOL/NAME"):
            Pool.open(bad)


def test_a_missing_ceph_conf_is_named(ceph, monkeypatch):
    monkeypatch.setenv("CEPH_CONF", "/nonexistent/ceph.conf")
    with pytest.raises(errors.InvalidArgumentError, match="/nonexistent/ceph.conf"):
        Pool.open(f"rados:{ceph.pool}/x")


def test_create_refuses_a_taken_name(ceph, location):
    Pool.create(location, 16 * MiB, 65536, commit_interval=0).close()
    with pytest.raises(errors.PoolExistsError, match="exists"):
        Pool.create(location, 16 * MiB, 65536)


@pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")
def test_cli_create_ls_write_read(ceph, location, tmp_path, monkeypatch):
    conf = ceph.conf
    monkeypatch.delenv("CEPH_CONF")   # through --ceph-conf this time
    env = dict(os.environ, COWBLOCK_RADOS_CACHE=str(tmp_path / "cli-cache"))

    def run(*args, stdin=None):
        r = subprocess.run([COWBLOCK, "--pool", location, "--ceph-conf", conf, *args], input=stdin,
                           capture_output=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        return r.stdout

    assert location.encode() in run("pool", "create", "--size", "256M", "--block-size", "64K")
    run("create", "base", "--size", "16M")
    run("write", "base", "--offset", "1M", stdin=b"hello from rados")
    run("snapshot", "base", "s1")
    assert b"s1" in run("ls")
    shutil.rmtree(tmp_path / "cli-cache")     # another host: all from RADOS
    assert run("read", "s1", "--offset", "1M", "--length", "16") == b"hello from rados"
    assert b"clean" in run("pool", "check")


@pytest.mark.slow
def test_build_without_librados_says_why(tmp_path):
    """COWBLOCK_RADOS=0 (as without librados-dev): the core still builds, local
    pools work, and a rados: location says what to install (opt-in: -m slow,
    a build of the core)."""
    import textwrap
    from corebuild import build_core_copy
    build_core_copy(str(tmp_path), env={"COWBLOCK_RADOS": "0"})
    probe = textwrap.dedent(f"""
        from cowblock import Pool, errors
        Pool.create({str(tmp_path / "pool")!r}, 64 * 65536, 65536).close()
        try:
            Pool.open("rados:somepool/x")
        except errors.InvalidArgumentError as e:
            print("refused:", e)
    """)
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path),
                                COWBLOCK_RADOS_CACHE=str(tmp_path / "cache")))
    assert r.returncode == 0, r.stderr
    assert "refused: this cowblock was built without librados: install librados-dev" in r.stdout


@pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")
def test_nbd_serve_from_a_rados_pool(ceph, location, tmp_path):
    """`cowblock serve` (through the pool's daemon) exports a device of a
    RADOS pool; what an NBD client wrote and flushed is in RADOS."""
    import nbdclient
    with Pool.create(location, 64 * MiB, 65536, commit_interval=0) as p:
        p.create_thin("base", 4 * MiB)
    sock = str(tmp_path / "nbd.sock")
    env = dict(os.environ, COWBLOCK_RUNTIME_DIR=str(tmp_path / "run"))
    server = subprocess.Popen([COWBLOCK, "--pool", location, "serve", "--socket", sock, "base"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(300):
            if os.path.exists(sock) or server.poll() is not None:
                break
            time.sleep(0.1)
        assert os.path.exists(sock), server.stderr.read().decode()
        c = nbdclient.Client(sock)
        c.go("base")
        assert c.call(nbdclient.CMD_WRITE, MiB, 8192, pattern(7, 8192)) == 0
        assert c.call(nbdclient.CMD_FLUSH) == 0
        assert c.read(MiB, 8192) == pattern(7, 8192)
        c.close()
    finally:
        server.terminate()
        server.wait(timeout=60)
    drop_cache(location)
    with Pool.open(location, read_only=True) as p:
        assert p.device("base").pread(8192, MiB) == pattern(7, 8192)


RACER = r"""
import sys
from cowblock import Pool, errors
while sys.stdin.readline().strip() == "go":
    try:
        p = Pool.open(sys.argv[1], commit_interval=0)
    except errors.PoolLockedError as e:
        print("lost", str(e).replace("\n", " "), flush=True)
        continue
    print("won", flush=True)
    sys.stdin.readline()          # held until the parent has both answers
    p.close()
    print("closed", flush=True)
"""


def test_two_writers_racing_for_the_lock(ceph, location, tmp_path):
    """Two processes (two hosts, in effect: their own caches) open the free
    pool at the same moment, round after round: exactly one wins, the other
    gets PoolLockedError naming the winner, and nobody is taken for dead."""
    Pool.create(location, 16 * MiB, 65536, commit_interval=0).close()
    racers = [subprocess.Popen([sys.executable, "-c", RACER, location], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, COWBLOCK_RADOS_CACHE=str(tmp_path / f"h{i}")))
              for i in range(2)]
    wins = [0, 0]
    try:
        for _ in range(20):
            for r in racers:
                r.stdin.write("go\n")
            for r in racers:
                r.stdin.flush()
            answers = [r.stdout.readline() for r in racers]
            won = [a.startswith("won") for a in answers]
            assert sum(won) == 1, (answers, [r.stderr.read() if r.poll() is not None else ""
                                             for r in racers])
            winner = won.index(True)
            loser = answers[1 - winner]
            assert loser.startswith("lost") and f"pid={racers[winner].pid}:" in loser, loser
            wins[winner] += 1
            racers[winner].stdin.write("release\n")
            racers[winner].stdin.flush()
            # a winner taken for dead (blocklisted, its lock broken) fails its close
            assert racers[winner].stdout.readline() == "closed\n", racers[winner].stderr.read()
    finally:
        for r in racers:
            r.stdin.close()
            r.wait(timeout=60)
    with Pool.open(location, commit_interval=0) as p:
        assert p.check().ok


def ceph_cli(ceph, *args):
    return ceph.run("ceph", *args)


def test_a_pool_quota_gives_no_space_and_loses_nothing(ceph, tmp_path):
    """A writer that goes on committing over its Ceph pool's quota gets
    NoSpaceError saying so (not a write paused for ever) once the monitor
    flags the pool, and every commit that returned before is there."""
    qpool = f"quota-{uuid.uuid4().hex[:6]}"
    ceph_cli(ceph, "osd", "pool", "create", qpool, "8", "8")
    loc = f"rados:{qpool}/q"
    piece = 256 * 1024
    try:
        p = Pool.create(loc, 64 * MiB, 65536, commit_interval=0)
        committed = 0
        try:
            d = p.create_thin("d", 32 * MiB)
            d.pwrite(pattern(5, 2 * MiB), 0)
            p.commit()
            ceph_cli(ceph, "osd", "pool", "set-quota", qpool, "max_bytes", str(MiB))
            deadline = time.monotonic() + 60   # the monitor's next look at the pool's statistics
            with pytest.raises(errors.NoSpaceError, match="pool.s quota is reached"):
                while time.monotonic() < deadline:
                    d.pwrite(pattern(100 + committed, piece), 2 * MiB + committed * piece)
                    p.commit()
                    committed += 1
                    time.sleep(0.1)
        finally:
            try:
                p.close()
            except errors.CowblockError:
                pass   # (read-only since the failed commit)
        drop_cache(loc)
        with Pool.open(loc, read_only=True) as p:   # (reads go on over the quota)
            d = p.device("d")
            assert d.pread(2 * MiB, 0) == pattern(5, 2 * MiB)
            for i in range(committed):
                assert d.pread(piece, 2 * MiB + i * piece) == pattern(100 + i, piece), i
            assert p.check().ok
    finally:
        ceph_cli(ceph, "osd", "pool", "rm", qpool, qpool, "--yes-i-really-really-mean-it")


def test_a_full_cluster_gives_no_space_naming_it(ceph, location):
    """A full OSD (here: its full ratio set below what it holds) fails the
    commit with NoSpaceError naming the cluster, not the quota; once it is
    no longer full, the pool opens at the commit before."""
    with Pool.create(location, 64 * MiB, 65536, commit_interval=0) as p:
        p.create_thin("d", 8 * MiB).pwrite(pattern(6, 4 * MiB), 0)
    ratios = ("nearfull", 0.85), ("backfillfull", 0.90), ("full", 0.95)
    try:
        for name, _ in ratios:
            ceph_cli(ceph, "osd", f"set-{name}-ratio", "0.0005")
        deadline = time.monotonic() + 30
        while not ceph.full():
            assert time.monotonic() < deadline, "the OSD was not flagged full in 30 s"
            time.sleep(0.5)
        p = Pool.open(location, commit_interval=0)
        with pytest.raises(errors.NoSpaceError, match="the Ceph cluster is full"):
            p.device("d").pwrite(pattern(7, MiB), 4 * MiB)
            p.commit()
        try:
            p.close()
        except errors.CowblockError:
            pass   # (read-only since the failed commit)
    finally:
        for name, ratio in reversed(ratios):
            ceph_cli(ceph, "osd", f"set-{name}-ratio", str(ratio))
        assert ceph.wait_not_full(30)
    drop_cache(location)
    with Pool.open(location, read_only=True) as p:
        assert p.device("d").pread(4 * MiB, 0) == pattern(6, 4 * MiB)
        assert p.check().ok


@pytest.mark.skipif(not os.environ.get("COWBLOCK_TEST_CEPH_OSD_STOP"),
                    reason="opt-in (COWBLOCK_TEST_CEPH_OSD_STOP=1, about 60 s): a bluestore "
                           "cluster of its own, an OSD stopped and started")
def test_an_osd_stopped_mid_workload_blocks_writes_until_it_returns(tmp_path, monkeypatch):
    """Bluestore: while the only OSD is away, commits block (as RBD's writes
    do), none fails; when it is back they go on, and every commit that
    returned is there.  Its monitor port: $COWBLOCK_TEST_BLUESTORE_MON_PORT,
    else $CEPH_MON_PORT + 2 (beside the session's cluster)."""
    import threading
    from cephcluster import SCRIPT
    port = os.environ.get("COWBLOCK_TEST_BLUESTORE_MON_PORT") or str(
        int(os.environ.get("CEPH_MON_PORT", "3300")) + 2)
    cluster = str(tmp_path / "ceph")
    env = dict(os.environ, CEPH_MON_PORT=port)

    def script(*args):
        subprocess.run(["bash", str(SCRIPT), *args], env=env, check=True, capture_output=True,
                       timeout=180)

    script("start", cluster, "bluestore")
    try:
        monkeypatch.setenv("CEPH_CONF", os.path.join(cluster, "ceph.conf"))
        monkeypatch.setenv("COWBLOCK_RADOS_CACHE", str(tmp_path / "cache"))
        loc = "rados:cowblock/osd-stop"
        piece = 64 * 1024
        p = Pool.create(loc, 256 * MiB, 65536, commit_interval=0)
        d = p.create_thin("d", 128 * MiB)
        committed, failures, stop = [0], [], threading.Event()

        def writer():
            try:
                while not stop.is_set() and committed[0] < 2000:
                    d.pwrite(pattern(committed[0], piece), committed[0] * piece)
                    p.commit()
                    committed[0] += 1
            except errors.CowblockError as e:
                failures.append(e)

        t = threading.Thread(target=writer)
        t.start()
        try:
            while committed[0] < 20:
                time.sleep(0.05)
            script("stop-osd", cluster)
            time.sleep(1)    # a commit sent before the OSD went may have returned
            during = committed[0]
            time.sleep(4)
            assert committed[0] == during and not failures, failures   # blocked, not failed
            script("start-osd", cluster)
            deadline = time.monotonic() + 90
            while committed[0] < during + 20 and not failures:
                assert time.monotonic() < deadline, "commits did not resume"
                time.sleep(0.1)
        finally:
            stop.set()
            t.join(timeout=120)
        assert not failures, failures
        p.close()
        drop_cache(loc)
        with Pool.open(loc, read_only=True) as p:
            d = p.device("d")
            for i in range(committed[0]):
                assert d.pread(piece, i * piece) == pattern(i, piece), i
            assert p.check().ok
    finally:
        script("destroy", cluster)
