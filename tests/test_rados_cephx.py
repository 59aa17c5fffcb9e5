"""The Ceph caps README.md documents for a client of a RADOS pool, tried
under cephx on the session's cluster (tests/cephcluster.py starts it with
CEPH_AUTH=cephx, so no second cluster is started for this).

A client with exactly the documented caps, each of the two variants, named
as Ceph's tools take it ($CEPH_ARGS: --id, --keyring): creates a pool, a
device, writes, snapshots, commits, reopens from RADOS alone and reads back;
serves a device over NBD; and, its writer SIGKILLed, opens the pool again by
itself (the dead holder is blocklisted, the mon command `osd blocklist`,
and its lock broken).  A client with too few caps gets a clear error, not a
traceback or a hang."""
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from cowblock import Pool, errors

from helpers import pattern

COWBLOCK = shutil.which("cowblock")
README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
MiB = 1 << 20

# (mon caps, osd caps) as README.md gives them, CEPHPOOL and NAME to fill in
DOCUMENTED = {
    "profile": ("profile rbd", "allow rwx pool={pool}"),
    "namespace": ('allow r, allow command "osd blocklist"', "allow rwx pool={pool} namespace={name}"),
}


def as_admin(ceph, tool, *args):
    env = dict(os.environ, CEPH_CONF=ceph.conf)
    env.pop("CEPH_ARGS", None)
    return subprocess.run(["timeout", "60", tool, *args], env=env, check=True,
                          capture_output=True, text=True).stdout


@pytest.fixture
def clients(ceph, tmp_path):
    """make((mon, osd), ...): new clients with exactly these caps, each as
    the $CEPH_ARGS that names it (in the form form, of {name} and
    {keyring}).  Their keys are made here and imported in one call; they are
    removed after the test unless the cluster goes at the session's end."""
    if not ceph.cephx:
        pytest.skip("the cluster runs without cephx (a $COWBLOCK_TEST_CEPH cluster started "
                    "without CEPH_AUTH=cephx)")
    made = []

    def make(*caps, form="--id {name} --keyring {keyring}"):
        args, keyrings = [], []
        for mon, osd in caps:
            name = f"cb-{uuid.uuid4().hex[:8]}"
            keyring = tmp_path / f"client.{name}.keyring"
            subprocess.run(["ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n",
                            f"client.{name}", "--cap", "mon", mon, "--cap", "osd", osd],
                           check=True, capture_output=True)
            made.append(name)
            keyrings.append(keyring.read_text())
            args.append(form.format(name=name, keyring=keyring))
        together = tmp_path / f"import-{len(made)}.keyring"
        together.write_text("".join(keyrings))
        as_admin(ceph, "ceph", "auth", "import", "-i", str(together))
        return args

    yield make
    if not ceph.owned:
        for name in made:
            as_admin(ceph, "ceph", "auth", "rm", f"client.{name}")


def remove_pool_objects(ceph, loc):
    """As the admin: a pool whose dead writer's lock nobody could break
    (rados.destroy would wait for the holder first)."""
    ns = loc.rpartition("/")[2]
    names = as_admin(ceph, "rados", "-p", ceph.pool, "--namespace", ns, "ls").split()
    if names:
        as_admin(ceph, "rados", "-p", ceph.pool, "--namespace", ns, "rm", *names)


def test_readme_states_the_caps_tried_here():
    text = " ".join(README.read_text().split())
    for mon, osd in DOCUMENTED.values():
        caps = f"mon '{mon}' osd '{osd.format(pool='CEPHPOOL', name='NAME')}'"
        assert caps in text, caps


VICTIM = r"""
import sys
from cowblock import Pool
p = Pool.open(sys.argv[1], commit_interval=0)
p.device("base").pwrite(b"v" * 4096, 0)
p.commit()
print("ready", flush=True)
sys.stdin.read()
"""

SUCCESSOR = r"""
import sys
from cowblock import Pool, errors
try:
    with Pool.open(sys.argv[1], commit_interval=0) as p:
        print("opened", p.device("base").pread(4096, 0) == b"v" * 4096, p.check().ok)
except errors.CowblockError as e:
    print("refused", type(e).__name__, str(e).replace("\n", " "))
"""


def serve_and_read(loc, env, tmp_path):
    """`cowblock serve` as this client: what was committed reads back over
    NBD, and a write and flush go through."""
    import nbdclient
    sock = str(tmp_path / "nbd.sock")
    server = subprocess.Popen([COWBLOCK, "--pool", loc, "serve", "--socket", sock, "base"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock) and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not os.path.exists(sock):
            server.kill()
            logs = [p.read_text() for p in pathlib.Path(env["COWBLOCK_RUNTIME_DIR"]).glob("*/daemon.log")]
            pytest.fail(f"no socket: {server.stderr.read().decode()} {logs}")
        c = nbdclient.Client(sock)
        c.go("base")
        assert c.read(0, 4096) == pattern(2, 4096)
        assert c.call(nbdclient.CMD_WRITE, MiB, 4096, pattern(3, 4096)) == 0
        assert c.call(nbdclient.CMD_FLUSH) == 0
        c.close()
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")
def test_the_documented_caps_are_enough(ceph, clients, tmp_path, monkeypatch):
    """Each documented variant, and a third client without the blocklist
    command, whose takeover of a dead writer's pool must fail saying so."""
    caps = dict(DOCUMENTED, **{"no-blocklist": ("allow r", DOCUMENTED["namespace"][1])})
    names = {variant: f"cx-{uuid.uuid4().hex[:10]}" for variant in caps}
    locs = {variant: f"rados:{ceph.pool}/{name}" for variant, name in names.items()}
    ceph_args = dict(zip(caps, clients(*[(mon, osd.format(pool=ceph.pool, name=names[v]))
                                         for v, (mon, osd) in caps.items()])))

    runtime = tempfile.mkdtemp(prefix="cbcx-")   # (short: its sockets' paths must fit)

    def env(variant, host):
        return dict(os.environ, CEPH_ARGS=ceph_args[variant], COWBLOCK_RUNTIME_DIR=runtime,
                    COWBLOCK_RADOS_CACHE=str(tmp_path / variant / host))

    try:
        for variant, loc in locs.items():
            for key, value in env(variant, "here").items():
                monkeypatch.setenv(key, value)
            with Pool.create(loc, 64 * MiB, 65536, commit_interval=0) as p:
                base = p.create_thin("base", 4 * MiB)
                base.pwrite(pattern(1, MiB), 0)
                p.snapshot("base", "s1")
                base.pwrite(pattern(2, 4096), 0)
                p.commit()
            monkeypatch.setenv("COWBLOCK_RADOS_CACHE", str(tmp_path / variant / "elsewhere"))
            with Pool.open(loc, commit_interval=0) as p:     # all from RADOS
                assert p.device("s1").pread(MiB, 0) == pattern(1, MiB)
                assert p.device("base").pread(4096, 0) == pattern(2, 4096)
                assert p.check().ok
        serve_and_read(locs["namespace"], env("namespace", "nbd"), tmp_path)

        # Each client's writer killed holding the lock; the next open of
        # each (all at once: each waits about 5 s for the dead holder) takes over.
        victims = {v: subprocess.Popen([sys.executable, "-c", VICTIM, loc], env=env(v, "victim"),
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                   for v, loc in locs.items()}
        try:
            for v, victim in victims.items():
                assert victim.stdout.readline() == "ready\n", v
        finally:
            for victim in victims.values():
                victim.kill()
                victim.wait()
        successors = {v: subprocess.Popen([sys.executable, "-c", SUCCESSOR, loc],
                                          env=env(v, "successor"), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True)
                      for v, loc in locs.items()}
        said = {}
        for v, proc in successors.items():
            out, err = proc.communicate(timeout=90)
            said[v] = out.strip()
            assert proc.returncode == 0 and "Traceback" not in err, (v, err)
        assert said["profile"] == "opened True True", said
        assert said["namespace"] == "opened True True", said
        refused = said["no-blocklist"]
        assert refused.startswith("refused PoolIOError") and "'osd blocklist'" in refused, refused
    finally:
        for loc in locs.values():
            remove_pool_objects(ceph, loc)
        shutil.rmtree(runtime, ignore_errors=True)


@pytest.mark.skipif(COWBLOCK is None, reason="the cowblock command is not installed")
def test_too_few_caps_get_a_clear_error(ceph, clients, tmp_path, monkeypatch):
    """osd 'allow r' cannot make a pool, osd 'allow rw' (no x: no object
    classes) cannot take its lock: PoolIOError naming the refused operation
    and the caps; the CLI says it in one line, no traceback."""
    loc = f"rados:{ceph.pool}/cx-{uuid.uuid4().hex[:10]}"
    read_only, no_classes = clients(("allow r", f"allow r pool={ceph.pool}"),
                                    ("profile rbd", f"allow rw pool={ceph.pool}"),
                                    form="--name=client.{name} -k {keyring}")
    monkeypatch.setenv("CEPH_ARGS", read_only)
    with pytest.raises(errors.PoolIOError, match=r"creating the pool's superblock object: the "
                       r"Ceph cluster refused this client \(Operation not permitted"):
        Pool.create(loc, 64 * MiB, 65536)
    r = subprocess.run([COWBLOCK, "--pool", loc, "pool", "create", "--size", "64M"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert re.search(r"refused this client .*see the caps in README.md", r.stderr), r.stderr
    monkeypatch.setenv("CEPH_ARGS", no_classes)
    try:
        with pytest.raises(errors.PoolIOError, match=r"taking the pool's lock: the Ceph cluster "
                           r"refused this client"):
            Pool.create(loc, 64 * MiB, 65536)
    finally:
        remove_pool_objects(ceph, loc)


def test_a_client_name_that_is_not_type_dot_id_is_named(ceph, monkeypatch):
    monkeypatch.setenv("CEPH_ARGS", "--name nodot")
    with pytest.raises(errors.InvalidArgumentError, match="names the Ceph client nodot"):
        Pool.open(f"rados:{ceph.pool}/never-made")
